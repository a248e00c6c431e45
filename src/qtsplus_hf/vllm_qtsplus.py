"""QTSplus served by vLLM: query-aware video token selection inside vLLM's Qwen2.5-VL.

vLLM loads this module through the plugin (`qtsplus_hf.vllm_plugin`), never `import qtsplus_hf`. The model is vLLM's
own `Qwen2_5_VLForConditionalGeneration` plus the HF model's `QTSplusSelector` (the same module, the same weights,
loaded strictly from the folder's `qtsplus.*` tensors). The method, as vLLM's request flow allows it:

1. **Processing** (frontend, before the model runs): the question is found in the prompt's token ids by the HF
   processor's rule (`QTSplusProcessor.question_token_mask`) and travels with every video of the request as the
   per-video field `qtsplus_question_ids`. It is also a processor keyword argument, so it is part of the multimodal
   cache keys: the same video asked a second question is selected afresh. Each video gets
   n = ceil((1 - `--video-pruning-rate`) * M) placeholders, the count the HF model keeps at that fixed keep ratio.
   The predicted budget cannot work here: the placeholder count is fixed before any model runs.
2. **Encoding** (`embed_multimodal`): vLLM's vision encoder, then the selector scores the video tokens by the
   question's token embeddings, keeps the top n and re-encodes them with their timestamps.
3. **Positions**: text keeps the positions transformers' Qwen2.5-VL gives the full prompt (`get_mrope_input_positions`,
   transformers' rule, which vLLM's own method does not follow after a video). Kept video tokens keep their stock
   MRoPE positions: each carries its position relative to the video's start in extra channels, which
   `recompute_mrope_positions` (vLLM's hook for EVS) writes into the prompt's positions and strips. Decoding continues
   after the prompt's last position, as transformers' `generate` does. `qtsplus_position_mode="sequential"` (the released checkpoints) numbers every
   prompt token 0, 1, 2, ... instead.

With `qtsplus_enabled=False` in the config, everything is vLLM's stock Qwen2.5-VL.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from functools import partial

import torch
from transformers import BatchFeature
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.config import VllmConfig
from vllm.inputs.engine import MultiModalInput
from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate
from vllm.multimodal.processing.context import TimingContext
from vllm.multimodal.processing.inputs import ProcessorInputs

from .modeling_qtsplus_qwen2_5_vl import video_token_timestamps
from .processing_qtsplus import QTSplusProcessor
from .selector_qtsplus import QTSplusSelector, budget_to_token_count

QUESTION_IDS = "qtsplus_question_ids"
# Positions ride in the embeddings' dtype; bfloat16 holds integers exactly only up to 256, so each position is
# written as POSITION_DIGITS base-POSITION_BASE digits (exact in any float type, positions below 128**3).
POSITION_BASE = 128
POSITION_DIGITS = 3
POSITION_CHANNELS = 3 * POSITION_DIGITS


# ----------------------------------------------------------------------------------------------------------------------
# 1. Processing: the question, the placeholder count
# ----------------------------------------------------------------------------------------------------------------------


def keep_ratio_from_pruning_rate(video_pruning_rate: float | None) -> float:
    """QTSplus's fixed keep ratio from vLLM's `--video-pruning-rate` (unset or 0: keep every token)."""
    return 1.0 - (video_pruning_rate or 0.0)


class QTSplusQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    """Stock processing info plus what QTSplus decides at processing time: the question and the kept count."""

    def get_hf_processor(self, **kwargs: object) -> QTSplusProcessor:
        """`QTSplusProcessor` (the stock info loads `Qwen2_5_VLProcessor` by class; the question rule is ours)."""
        return self.ctx.get_hf_processor(QTSplusProcessor, **kwargs)

    def qtsplus_selects(self) -> bool:
        """The folder's config has QTSplus on (off: everything is vLLM's stock Qwen2.5-VL)."""
        return bool(self.get_hf_config().qtsplus_enabled)

    def qtsplus_kept_count(self, num_tokens: int) -> int:
        """n for a video of `num_tokens` LM tokens, as the HF model counts at a fixed keep ratio (no n_max)."""
        keep_ratio = keep_ratio_from_pruning_rate(self.ctx.get_mm_config().video_pruning_rate)
        # float32, as the selector's fixed ratio (`torch.full_like(..., dtype=torch.float32)`): the same ceiling
        rho = torch.tensor([keep_ratio], dtype=torch.float32)
        return int(budget_to_token_count(rho, torch.tensor([num_tokens]), None))

    def qtsplus_question_ids(self, prompt_ids: list[int]) -> tuple[int, ...]:
        """The question's token ids, by `QTSplusProcessor`'s rule (the `qtsplus_query_mask` it gives the HF model)."""
        ids = torch.tensor([prompt_ids])
        mask = self.get_hf_processor().question_token_mask(ids)[0]
        if not mask.any():
            raise ValueError("QTSplus found no question in the prompt: a prompt with a video needs user text")
        return tuple(ids[0][mask].tolist())


class QTSplusQwen2_5_VLDummyInputsBuilder(Qwen2_5_VLDummyInputsBuilder):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        # vLLM's memory profiling runs a prompt of placeholders only; QTSplus needs a question to score by.
        return super().get_dummy_text(mm_counts) + " Describe the video."


class QTSplusQwen2_5_VLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    """Stock processing plus the question of each video and QTSplus's placeholder count."""

    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext) -> MultiModalInput:
        if self.info.qtsplus_selects() and inputs.mm_data_items.get_count("video", strict=False):
            # The HF processor only ever sees the media, so the question joins its keyword arguments here, from the
            # prompt: the kwargs are hashed into the cache keys and reach `_postprocess_hf_mm_data`.
            question = self.info.qtsplus_question_ids(inputs.prompt)
            kwargs = {**inputs.hf_processor_mm_kwargs, QUESTION_IDS: question}
            inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs)
        return super().apply(inputs, timing_ctx)

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        return super()._call_hf_processor(hf_data, without_question(hf_kwargs))

    def _postprocess_hf_mm_data(
        self, mm_inputs: Mapping[str, object], hf_processor_mm_kwargs: Mapping[str, object],
        processed_data: BatchFeature,
    ) -> BatchFeature:
        processed_data = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        question = hf_processor_mm_kwargs.get(QUESTION_IDS)
        if question is not None and "video_grid_thw" in processed_data:
            processed_data[QUESTION_IDS] = torch.tensor([question] * len(processed_data["video_grid_thw"]))
        return processed_data

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if QUESTION_IDS in hf_inputs:
            fields[QUESTION_IDS] = MultiModalFieldConfig.batched("video")
        return fields

    def _get_prompt_updates(
        self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        """Stock placeholders for images; `qtsplus_kept_count(M)` of them for each video."""
        hf_processor_mm_kwargs = without_question(hf_processor_mm_kwargs)
        if not self.info.qtsplus_selects():
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        vocab = self.info.get_tokenizer().get_vocab()
        placeholder = {"image": vocab[processor.image_token], "video": vocab[processor.video_token]}
        merge = self.info.get_hf_config().vision_config.spatial_merge_size

        def replacement(item_idx: int, modality: str) -> list[int]:
            grid_thw = out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data
            count = int(grid_thw.prod()) // merge**2
            if modality == "video":
                count = self.info.qtsplus_kept_count(count)
            return [placeholder[modality]] * count

        return [
            PromptReplacement(modality=modality, target=[placeholder[modality]],
                              replacement=partial(replacement, modality=modality))
            for modality in ("image", "video")
        ]


def without_question(kwargs: Mapping[str, object]) -> dict[str, object]:
    """The processor kwargs the HF processor takes: all but the question, which only vLLM's side reads."""
    return {key: value for key, value in kwargs.items() if key != QUESTION_IDS}


# ----------------------------------------------------------------------------------------------------------------------
# 2. Positions: transformers' rule, and kept tokens' positions carried beside their embeddings
# ----------------------------------------------------------------------------------------------------------------------


def vision_positions(grid_thw: Sequence[int], spatial_merge_size: int, time_interval: int) -> torch.Tensor:
    """`[3, t*h*w]` (T, H, W) positions of an item's LM tokens relative to its first, as transformers numbers them.

    Written here rather than calling `Qwen2_5_VLModel.get_vision_position_ids`: that is a method of the HF model,
    which a vLLM worker never builds; the equivalence tests compare the two rules' results through the tokens."""
    t, h, w = int(grid_thw[0]), int(grid_thw[1]) // spatial_merge_size, int(grid_thw[2]) // spatial_merge_size
    grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
    grid[0] *= time_interval
    return grid.reshape(3, -1)


def decoding_offset(positions: torch.Tensor) -> int:
    """vLLM's `mrope_position_delta` for prompt positions `[3, N]`: decoding continues after the prompt's last
    position, as transformers' `generate` does (it increments the positions of the prompt's last token; vLLM's stock
    method continues after the largest position, which a video's last temporal patch may hold). It depends only on
    text positions, so it is right even when a video's tokens come from the prefix cache and are never selected."""
    return int(positions[0, -1]) + 1 - positions.shape[1]


def positions_as_channels(positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[3, N]` non-negative positions -> `[N, POSITION_CHANNELS]` digits in `dtype`."""
    if positions.numel() and int(positions.max()) >= POSITION_BASE**POSITION_DIGITS:
        raise ValueError(f"a video position of {int(positions.max())} is beyond what QTSplus's vLLM plugin carries")
    digits = [(positions // POSITION_BASE**d) % POSITION_BASE for d in range(POSITION_DIGITS)]
    return torch.cat(digits).T.to(dtype)


def positions_from_channels(channels: torch.Tensor) -> torch.Tensor:
    """Inverse of `positions_as_channels`: `[N, POSITION_CHANNELS]` -> `[3, N]` long."""
    digits = channels.round().long().T.reshape(POSITION_DIGITS, 3, -1)
    return sum(digits[d] * POSITION_BASE**d for d in range(POSITION_DIGITS))


# ----------------------------------------------------------------------------------------------------------------------
# 3. The model
# ----------------------------------------------------------------------------------------------------------------------


@MULTIMODAL_REGISTRY.register_processor(
    QTSplusQwen2_5_VLMultiModalProcessor,
    info=QTSplusQwen2_5_VLProcessingInfo,
    dummy_inputs=QTSplusQwen2_5_VLDummyInputsBuilder,
)
class QTSplusQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL whose video tokens pass through the QTSplus selector at a fixed keep ratio.

    The keep ratio is 1 - `--video-pruning-rate` (vLLM's one switch for video pruning; on this model it drives the
    query-aware selector, not EVS). Unset, every token is kept and re-encoded, as the HF model at keep ratio 1.0.
    """

    # vLLM's pruning methods are a closed list whose default is "evs": that is the name the rate arrives under.
    supported_video_pruning_methods = ("evs",)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # Inference only: in training mode the selector's gate and exploration would change the kept tokens.
        self.qtsplus = QTSplusSelector(self.config).to(vllm_config.model_config.dtype).eval().requires_grad_(False)
        self.qtsplus_keep_ratio = keep_ratio_from_pruning_rate(self.video_pruning_rate)
        selects = bool(self.config.qtsplus_enabled)
        self.qtsplus_sequential = selects and self.config.qtsplus_position_mode == "sequential"
        # Kept tokens' positions are known only after the selector: they travel with the embeddings.
        self.qtsplus_positions_travel = selects and not self.qtsplus_sequential and self.is_multimodal_pruning_enabled

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The stock loader for the stock tensors; the `qtsplus.*` ones go to the selector, all of them (strict)."""
        selector: dict[str, torch.Tensor] = {}

        def stock_weights() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name.startswith("qtsplus."):
                    selector[name.removeprefix("qtsplus.")] = tensor
                else:
                    yield name, tensor

        loaded = super().load_weights(stock_weights())
        self.qtsplus.load_state_dict(selector, strict=True)
        return loaded | {f"qtsplus.{name}" for name in selector}

    # -- encoding ----------------------------------------------------------------------------------------------------

    def embed_multimodal(self, **kwargs: object) -> tuple[torch.Tensor, ...]:
        """One embedding per item, images first or videos first in the kwargs' order (vLLM matches them to the
        placeholders so): stock image features `[N_i, D]`, each video's kept tokens `[n, D]` (or `[n, D + 9]`)."""
        question_ids = kwargs.pop(QUESTION_IDS, None)
        if not self.config.qtsplus_enabled:
            return super().embed_multimodal(**kwargs)
        embeddings: tuple[torch.Tensor, ...] = ()
        for modality, parsed in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality == "image":
                embeddings += tuple(self._process_image_input(parsed))
                continue
            if parsed["type"] == "video_embeds":
                raise ValueError("QTSplus selects from the vision encoder's output: pass video pixels, not "
                                 "video_embeds")
            if question_ids is None:
                raise ValueError(f"QTSplus videos need their question ids ({QUESTION_IDS}); this plugin's "
                                 "processor adds them, a request processed elsewhere lacks them")
            embeddings += self.selected_video_tokens(self._process_video_input(parsed), parsed, question_ids)
        return embeddings

    def selected_video_tokens(
        self, video_embeds: Sequence[torch.Tensor], video_input: Mapping, question_ids: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        """Each video's `[M, D]` tokens -> its kept, re-encoded `[n, D]` tokens (plus position channels when
        they travel). One video at a time: a video's selection never depends on the other requests in the batch."""
        grid_thw = video_input["video_grid_thw"]
        seconds_per_grid = video_input.get("second_per_grid_ts")
        merge = self.config.vision_config.spatial_merge_size
        language_model = self.get_language_model()
        kept_videos = []
        for index, video in enumerate(video_embeds):
            query = language_model.embed_input_ids(question_ids[index].to(video.device))[None]
            seconds = video_token_timestamps(
                grid_thw[index : index + 1],
                None if seconds_per_grid is None else seconds_per_grid[index : index + 1],
                merge, video.device,
            )
            all_tokens = torch.ones(1, len(video), dtype=torch.bool, device=video.device)
            all_question = torch.ones(query.shape[:2], dtype=torch.bool, device=video.device)
            keep, kept, _, _ = self.qtsplus(
                video[None].to(query.dtype), all_tokens, query, all_question, seconds, self.qtsplus_keep_ratio
            )
            kept = kept.to(video.dtype)
            if self.qtsplus_positions_travel:
                interval = self.time_interval(None if seconds_per_grid is None else seconds_per_grid[index])
                relative = vision_positions(grid_thw[index].tolist(), merge, interval)
                channels = positions_as_channels(relative[:, keep[0].cpu()], kept.dtype).to(kept.device)
                kept = torch.cat([kept, channels], dim=-1)
            kept_videos.append(kept)
        return tuple(kept_videos)

    def get_encoder_cudagraph_config(self):
        """The stock config without video: a captured vision tower would bypass `embed_multimodal`, the selector."""
        config = super().get_encoder_cudagraph_config()
        if self.config.qtsplus_enabled:
            config.modalities = [modality for modality in config.modalities if modality != "video"]
        return config

    def time_interval(self, seconds_per_grid: torch.Tensor | None) -> int:
        """Temporal position step of a video from its seconds per temporal patch (a scalar; None: 1 s), as
        transformers computes it: tokens_per_second * int(seconds)."""
        seconds = 1 if seconds_per_grid is None else int(seconds_per_grid)
        return int(self.config.vision_config.tokens_per_second * seconds)

    # -- positions ---------------------------------------------------------------------------------------------------

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        """`[3, N]` positions of the (compacted) prompt and the decoding offset.

        Text and images: transformers' `Qwen2_5_VLModel.get_rope_index` on the full prompt (after an item the text
        continues at its start + max(h, w), not at the item's largest position + 1 as vLLM's stock method has it).
        A video keeping all its tokens gets their stock positions; one keeping fewer gets its start position in its
        slots until `recompute_mrope_positions` writes the kept tokens'.
        """
        if not self.config.qtsplus_enabled:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        length = len(input_tokens)
        if self.qtsplus_sequential:
            return torch.arange(length).expand(3, -1).clone(), 0
        merge = self.config.vision_config.spatial_merge_size
        positions = torch.empty(3, length, dtype=torch.long)
        current, text_start = 0, 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            offset, slots = feature.mm_position.offset, feature.mm_position.length
            grid_thw = feature.data[f"{feature.modality}_grid_thw"].data.tolist()
            positions[:, text_start:offset] = torch.arange(offset - text_start) + current
            current += offset - text_start
            interval = 1
            if feature.modality == "video":
                seconds = feature.data.get("second_per_grid_ts")
                interval = self.time_interval(None if seconds is None else seconds.data)
            relative = vision_positions(grid_thw, merge, interval)
            positions[:, offset : offset + slots] = current + (relative if relative.shape[1] == slots else 0)
            current += max(grid_thw[1], grid_thw[2]) // merge
            text_start = offset + slots
        positions[:, text_start:] = torch.arange(length - text_start) + current
        return positions, decoding_offset(positions)

    def recompute_mrope_positions(
        self, input_ids: list[int] | torch.Tensor, multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.Tensor, num_computed_tokens: int,
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        """Write the kept video tokens' positions that ride in this step's embeddings, strip their channels.

        `input_ids` (N,) the prompt; `multimodal_embeddings` this step's `[n, D]` (images, sequential mode) or
        `[n, D + 9]` (videos whose positions travel) pieces, which fill, in order, the prompt's media slots from
        `num_computed_tokens` on (an item cut by chunked prefill arrives in pieces); `mrope_positions` `[3, N]`. A
        video's positions are relative to its start: the position after the last text token before its slots (its
        `<|vision_start|>`), which this method never changes. Returns the stripped embeddings, the positions and
        the decoding offset (`decoding_offset`).
        """
        if not self.config.qtsplus_enabled:
            return super().recompute_mrope_positions(input_ids, multimodal_embeddings, mrope_positions,
                                                     num_computed_tokens)
        if not multimodal_embeddings:  # vLLM's v1 runner asks at every step, decoding included
            return [], mrope_positions, decoding_offset(mrope_positions)
        ids = torch.as_tensor(input_ids, device="cpu")
        positions = mrope_positions.clone()
        is_media = (ids == self.config.image_token_id) | (ids == self.config.video_token_id)
        media_slots = is_media.nonzero().flatten()
        media_slots = media_slots[media_slots >= num_computed_tokens].to(positions.device)
        last_text = torch.where(is_media, -1, torch.arange(len(ids))).cummax(0).values.to(positions.device)
        width = self.config.text_config.hidden_size
        stripped, cursor = [], 0
        for embedding in multimodal_embeddings:
            slots = media_slots[cursor : cursor + len(embedding)]
            cursor += len(embedding)
            if embedding.shape[-1] == width + POSITION_CHANNELS:
                before = int(last_text[slots[0]])
                start = positions[0, before] + 1 if before >= 0 else 0
                positions[:, slots] = start + positions_from_channels(embedding[:, width:]).to(positions.device)
                embedding = embedding[:, :width]
            stripped.append(embedding)
        return stripped, positions, decoding_offset(positions)
