# Copyright 2026 The qtsplus-hf authors. Licensed under the Apache License, Version 2.0.
"""Qwen3-VL with QTSplus, the query-aware visual token selector (arXiv 2511.11910).

The selector and everything around it that does not depend on the backbone live in `selector_qtsplus`; this one file
is Qwen3-VL's integration: its config, its processor and its model, in the order the model runs them:

1. encoding: the vision encoder returns the merged patch features and, per DeepStack layer, features of the same
   tokens from intermediate encoder blocks (streams 1.. of `visual_features`);
2. time: the processor writes each temporal patch's time as text (`<1.2 seconds>`, inside the video's vision span,
   before the patch's tokens); those tokens stay in the prompt, and the same times, from the same video metadata,
   reach the re-encoder (`qtsplus_patch_seconds`, added by `QTSplusQwen3VLProcessor`);
3. positions: the stock interleaved MRoPE positions of the full prompt (`get_rope_index`, one temporal patch per
   vision span), of which kept tokens keep theirs; decoding continues where the stock model's would;
4. DeepStack: the language model adds each DeepStack layer's features to the hidden states of its first layers at
   the visual positions; the compacted prefill carries them for the kept tokens only, compacted with the same kept
   indices as the main features, through a pre-hook on the language model (the stock forward passes none with
   `inputs_embeds`);
5. the model: vision encoder -> selector -> the unchanged Qwen3-VL language model on the compacted sequence, and
   `generate` from that prefill.

Remote-code file: it imports only `torch`, `transformers` and its sibling `selector_qtsplus` (and, through it,
`pipeline_video_text_to_text` and `video_qtsplus`).
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
from transformers.feature_extraction_utils import BatchFeature
from transformers.generation.utils import GenerateOutput
from transformers.utils import logging

from .selector_qtsplus import (
    QTSplusCausalLMOutputWithPast,
    QTSplusConfigMixin,
    QTSplusInputs,
    QTSplusModelMixin,
    QTSplusProcessorMixin,
)


logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Config and processor
# ----------------------------------------------------------------------------------------------------------------------


class QTSplusQwen3VLConfig(QTSplusConfigMixin, Qwen3VLConfig):
    r"""
    A [`Qwen3VLConfig`] plus the flat `qtsplus_*` settings of the QTSplus selector, documented on
    [`QTSplusConfigMixin`]. Position mode `"mrope"` only (the `"sequential"` mode is the released Qwen2.5-VL
    checkpoints'); the selector's attention layers have Qwen3's per-head q/k norms and no q/k/v bias (the LM's).
    """

    model_type = "qtsplus_qwen3_vl"
    supported_position_modes = ("mrope",)
    selector_head_norms = True


class QTSplusQwen3VLProcessor(QTSplusProcessorMixin, Qwen3VLProcessor):
    r"""
    A [`Qwen3VLProcessor`] whose outputs also carry `qtsplus_query_mask` (bool `[batch, seq]`, the user-message text
    without vision spans or the timestamp text inside them; see [`QTSplusProcessorMixin`]) and, with videos,
    `qtsplus_patch_seconds` (float `[sum over videos of T_v]`): the time of each temporal patch, computed from the
    video metadata exactly as the timestamp text is (unrounded; the text shows one decimal).
    """

    def _process_videos(self, videos, **kwargs) -> tuple[BatchFeature, list[str]]:
        """The stock video outputs plus `qtsplus_patch_seconds`; the processor's `__call__` merges them into its
        output (a tensor with `return_tensors="pt"`)."""
        processed, replacements = super()._process_videos(videos, **kwargs)  # the stock text has filled a missing fps
        temporal_patch_size = self.video_processor.temporal_patch_size
        seconds = []
        for metadata, grid in zip(processed["video_metadata"], processed["video_grid_thw"]):
            times = self._calculate_timestamps(list(metadata.frames_indices), metadata.fps, temporal_patch_size)
            seconds += times[: int(grid[0])]  # as the text: one time per temporal patch of the processed video
        processed["qtsplus_patch_seconds"] = seconds
        return processed, replacements

    @property
    def model_input_names(self) -> list[str]:
        return super().model_input_names + ["qtsplus_patch_seconds"]


# ----------------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------------


def patch_token_seconds(
    video_grid_thw: torch.Tensor, patch_seconds: torch.Tensor | None, spatial_merge_size: int, device: torch.device
) -> torch.Tensor:
    """Time in seconds of every LM video token, `[V, max M_v]` (0 past a video's end), from the time of each temporal
    patch `patch_seconds [sum_v T_v]` (None: 0, 1, 2, ... seconds, an approximation with a warning; the prompt's text
    says otherwise unless frames were sampled at 2 fps from 0.25 s).
    """
    grid = video_grid_thw.to(device)
    tokens_per_patch = (grid[:, 1] // spatial_merge_size) * (grid[:, 2] // spatial_merge_size)
    num_patches = int(grid[:, 0].sum())
    if patch_seconds is None:
        logger.warning_once(
            "QTSplus Qwen3-VL got no qtsplus_patch_seconds: the re-encoder assumes one second per temporal patch, "
            "which may disagree with the timestamp text. QTSplusQwen3VLProcessor adds them."
        )
        patch_seconds = torch.cat([torch.arange(int(t), dtype=torch.float32) for t in grid[:, 0].tolist()])
    patch_seconds = torch.as_tensor(patch_seconds, dtype=torch.float32).flatten().to(device)
    if len(patch_seconds) != num_patches:
        raise ValueError(f"qtsplus_patch_seconds must hold one time per temporal patch ({num_patches} from "
                         f"video_grid_thw), got {len(patch_seconds)}")
    per_token = patch_seconds.repeat_interleave(tokens_per_patch.repeat_interleave(grid[:, 0]))
    return torch.nn.utils.rnn.pad_sequence(
        list(per_token.split((grid[:, 0] * tokens_per_patch).tolist())), batch_first=True
    )


def split_per_item(features: torch.Tensor | tuple[torch.Tensor, ...], sizes: list[int]) -> list[torch.Tensor]:
    """One DeepStack layer's features as a list over the images / videos: transformers >= 5.20 splits them already,
    5.17 - 5.19 return one tensor for all."""
    return list(features.split(sizes)) if isinstance(features, torch.Tensor) else list(features)


class QTSplusQwen3VLForConditionalGeneration(QTSplusModelMixin, Qwen3VLForConditionalGeneration):
    """Qwen3-VL whose video tokens pass through the QTSplus selector before the language model.

    Takes exactly what `Qwen3VLProcessor` (or `QTSplusQwen3VLProcessor`) returns, plus `qtsplus_query_mask` (bool
    `[batch, seq]`, the question tokens), `qtsplus_patch_seconds` (the time of each temporal patch) and
    `qtsplus_keep_ratio` (None = predicted budget, a float in (0, 1] = keep that share of every video's tokens).
    With `config.qtsplus_enabled=False`, or without videos, it is the stock model.
    """

    config_class = QTSplusQwen3VLConfig
    config: QTSplusQwen3VLConfig
    stock_class = Qwen3VLForConditionalGeneration
    backbone_name = "Qwen3-VL"
    timing_inputs = ("qtsplus_patch_seconds",)
    # device_map keeps each selector layer on one device (see the Qwen2.5-VL model).
    _no_split_modules = [
        *Qwen3VLForConditionalGeneration._no_split_modules, "QTSplusAttentionLayer", "QTSplusReencodeLayer"
    ]

    # -- the backbone hooks ----------------------------------------------------------------------------------------

    def visual_features(self, pixel_values: torch.Tensor, grid_thw: torch.LongTensor, modality: str) -> list[list]:
        """Stream 0: the merged features per item; streams 1..: one per DeepStack layer, the same tokens."""
        outputs = self.model.get_image_features(pixel_values, grid_thw)  # videos: the same encoder call
        sizes = (grid_thw.prod(-1) // self.config.vision_config.spatial_merge_size**2).tolist()
        return [list(outputs.pooler_output)] + [split_per_item(layer, sizes) for layer in outputs.deepstack_features]

    def video_token_seconds(
        self, video_grid_thw: torch.LongTensor, device: torch.device, qtsplus_patch_seconds: torch.Tensor | None = None
    ) -> torch.Tensor:
        return patch_token_seconds(
            video_grid_thw, qtsplus_patch_seconds, self.config.vision_config.spatial_merge_size, device
        )

    def stock_positions(
        self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
        video_grid_thw: torch.Tensor, attention_mask: torch.Tensor, qtsplus_patch_seconds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        position_ids, _ = self.model.get_rope_index(
            input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw, attention_mask=attention_mask,
        )
        return position_ids

    def compacted_language_model_extras(
        self, keep: torch.Tensor, video_mask: torch.Tensor, image_streams: list[list] | None,
        video_streams: list[list], kept_ids: torch.Tensor, attention_mask: torch.Tensor,
    ) -> dict:
        """`visual_pos_masks [B, S']` and `deepstack_visual_embeds` (per DeepStack layer `[n_visual, D]`): the
        kept video tokens' rows (the same kept indices as the main features) and every image's, in sequence order."""
        kept_rows = [row[real] for row, real in zip(keep.unbind(0), video_mask.unbind(0))]
        video_layers = [
            torch.cat([video[rows.to(video.device)] for video, rows in zip(layer, kept_rows)])
            for layer in video_streams[1:]
        ]
        image_layers = None if image_streams is None else [torch.cat(layer) for layer in image_streams[1:]]
        return self.deepstack_inputs(kept_ids, attention_mask, image_layers, video_layers)

    def full_language_model_extras(
        self, input_ids: torch.Tensor, image_streams: list[list] | None, video_streams: list[list]
    ) -> dict:
        image_layers = None if image_streams is None else [torch.cat(layer) for layer in image_streams[1:]]
        return self.deepstack_inputs(input_ids, torch.ones_like(input_ids), image_layers,
                                     [torch.cat(layer) for layer in video_streams[1:]])

    def deepstack_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_layers: list[torch.Tensor] | None,
        video_layers: list[torch.Tensor],
    ) -> dict:
        """The language model's DeepStack inputs for a sequence, joining image and video rows in sequence order as
        the stock `Qwen3VLModel.forward` does."""
        image_mask = (input_ids == self.config.image_token_id) & attention_mask.bool()
        video_mask = (input_ids == self.config.video_token_id) & attention_mask.bool()
        if image_layers is None:
            return {"visual_pos_masks": video_mask, "deepstack_visual_embeds": video_layers}
        visual_mask = image_mask | video_mask
        image_rows, video_rows = image_mask[visual_mask], video_mask[visual_mask]
        joint_layers = []
        for image_layer, video_layer in zip(image_layers, video_layers):
            joint = video_layer.new_zeros(int(visual_mask.sum()), video_layer.shape[-1])
            joint[image_rows.to(joint.device)] = image_layer.to(joint.device, joint.dtype)
            joint[video_rows.to(joint.device)] = video_layer
            joint_layers.append(joint)
        return {"visual_pos_masks": visual_mask, "deepstack_visual_embeds": joint_layers}

    @contextmanager
    def language_model_extras_applied(self, extras: dict | None, batch_size: int) -> Iterator[None]:
        """Within the block, the language model gets `extras` (`deepstack_inputs`) instead of the stock forward's
        empty DeepStack inputs (it passes none with `inputs_embeds`); rows are repeated when `generate` expanded the
        batch (beams, `num_return_sequences`) after the prefill was built."""
        if extras is None:
            yield
            return
        deepstack = self._expanded_deepstack(extras, batch_size)

        def inject(module, args, kwargs):
            return args, {**kwargs, **deepstack}

        handle = self.model.language_model.register_forward_pre_hook(inject, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @staticmethod
    def _expanded_deepstack(deepstack: dict, batch_size: int) -> dict:
        mask = deepstack["visual_pos_masks"]
        repeats = batch_size // mask.shape[0]
        if repeats == 1 and batch_size == mask.shape[0]:
            return deepstack
        if repeats == 0 or batch_size % mask.shape[0]:
            raise ValueError(f"the DeepStack inputs of {mask.shape[0]} prefill rows cannot serve a batch of "
                             f"{batch_size} rows (only whole repeats of each row, as generate's expansion)")
        counts = mask.sum(-1).tolist()
        layers = [
            torch.cat([rows.repeat(repeats, 1) for rows in layer.split(counts)])
            for layer in deepstack["deepstack_visual_embeds"]
        ]
        return {"visual_pos_masks": mask.repeat_interleave(repeats, dim=0), "deepstack_visual_embeds": layers}

    def generation_extras(self, prefill: QTSplusInputs) -> dict:
        return {"qtsplus_deepstack": prefill.language_model_extras}

    # -- the model -------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        qtsplus_query_mask: torch.Tensor | None = None,
        qtsplus_patch_seconds: torch.Tensor | None = None,
        qtsplus_keep_ratio: float | None = None,
        qtsplus_vision_chunk_frames: int | None = None,
        qtsplus_evidence_mask: torch.Tensor | None = None,
        qtsplus_deepstack: dict | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ) -> QTSplusCausalLMOutputWithPast:
        r"""
        Same as [`Qwen3VLForConditionalGeneration.forward`] (the cache and the rest pass through `kwargs`), plus the
        QTSplus inputs of the Qwen2.5-VL model (`qtsplus_query_mask`, `qtsplus_keep_ratio`,
        `qtsplus_vision_chunk_frames`, `qtsplus_evidence_mask`) and:

        qtsplus_patch_seconds (`torch.FloatTensor` of shape `(sum of T_v,)`, *optional*):
            The time of each temporal patch, as `QTSplusQwen3VLProcessor` returns it (the re-encoder's absolute time).
        qtsplus_deepstack (`dict`, *optional*):
            Set by `generate`: the compacted prefill's DeepStack inputs, applied to the call that gets its
            `inputs_embeds`.

        When the selector runs, `logits` (and the loss) cover the compacted sequence. `mm_encoder_outputs`: as for
        the Qwen2.5-VL model (transformers >= 5.20, stock path only).
        """
        visual_inputs = dict(
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            qtsplus_patch_seconds=qtsplus_patch_seconds,
        )
        qtsplus_inputs = dict(
            qtsplus_query_mask=qtsplus_query_mask,
            qtsplus_keep_ratio=qtsplus_keep_ratio,
            qtsplus_vision_chunk_frames=qtsplus_vision_chunk_frames,
            qtsplus_evidence_mask=qtsplus_evidence_mask,
        )
        return self.qtsplus_forward(input_ids, inputs_embeds, attention_mask, position_ids, labels, visual_inputs,
                                    qtsplus_inputs, mm_encoder_outputs, qtsplus_deepstack,
                                    dict(logits_to_keep=logits_to_keep, **kwargs))

    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        qtsplus_patch_seconds: torch.Tensor | None = None,
        qtsplus_query_mask: torch.Tensor | None = None,
        qtsplus_keep_ratio: float | None = None,
        qtsplus_vision_chunk_frames: int | None = None,
        qtsplus_selection_scores: list[torch.Tensor] | None = None,
        **kwargs,
    ) -> "torch.LongTensor | GenerateOutput":
        """`GenerationMixin.generate` with the selector run once, at prefill (`QTSplusModelMixin.qtsplus_generate`);
        the prefill's DeepStack inputs reach its first forward call as `qtsplus_deepstack`."""
        stock_inputs = dict(
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            qtsplus_patch_seconds=qtsplus_patch_seconds,
        )
        return self.qtsplus_generate(input_ids, stock_inputs, qtsplus_query_mask, qtsplus_keep_ratio,
                                     qtsplus_vision_chunk_frames, qtsplus_selection_scores, kwargs)

    @classmethod
    def from_qwen3_vl(
        cls, model_or_path: "Qwen3VLForConditionalGeneration | str", recipe: str | None = None,
        init_scheme: str | None = None, **config_overrides,
    ) -> "QTSplusQwen3VLForConditionalGeneration":
        """Wrap a stock Qwen3-VL (an in-memory model, a local directory or a Hub id) into a QTSplus model; see
        `QTSplusModelMixin.from_stock` (with `init_scheme="identity"` and `qtsplus_keep_ratio=1.0` the logits equal
        the stock model's)."""
        return cls.from_stock(model_or_path, recipe=recipe, init_scheme=init_scheme, **config_overrides)


__all__ = [
    "QTSplusQwen3VLConfig",
    "QTSplusQwen3VLForConditionalGeneration",
    "QTSplusQwen3VLProcessor",
    "patch_token_seconds",
]
