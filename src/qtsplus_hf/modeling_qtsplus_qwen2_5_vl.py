# Copyright 2026 The qtsplus-hf authors. Licensed under the Apache License, Version 2.0.
"""Qwen2.5-VL with QTSplus, the query-aware visual token selector (arXiv 2511.11910).

The selector and everything around it that does not depend on the backbone live in `selector_qtsplus`; this file is
Qwen2.5-VL's integration, in the order the model runs it:

1. encoding: the vision encoder's merged patch features (one stream; Qwen2.5-VL has no DeepStack);
2. time: a video token's timestamp is its temporal patch index times `second_per_grid_ts` (the processor's
   seconds per temporal patch);
3. positions: the stock 3-D MRoPE positions of the full prompt (`get_rope_index`), of which kept tokens keep theirs,
   or plain sequential positions for the released checkpoints;
4. the model: vision encoder -> selector -> the unchanged Qwen2.5-VL language model on the compacted sequence, and
   `generate` from that prefill.

Remote-code file: it imports only `torch`, `transformers` and its siblings `configuration_qtsplus` and
`selector_qtsplus` (and, through it, `pipeline_video_text_to_text`).
"""

import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.generation.utils import GenerateOutput

from .configuration_qtsplus import QTSplusConfig
from .selector_qtsplus import (
    INIT_SCHEMES,
    QTSplusCausalLMOutputWithPast,
    QTSplusInputs,
    QTSplusModelMixin,
    QTSplusSelection,
    QTSplusSelector,
    compact_rows,
)


def video_token_timestamps(
    video_grid_thw: torch.Tensor, second_per_grid_ts: torch.Tensor | list[float] | None, spatial_merge_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Start time in seconds of the temporal patch of every LM video token, `[V, max M_v]` (0 past a video's end)."""
    if second_per_grid_ts is None:  # the stock model's default spacing: one second per temporal patch
        second_per_grid_ts = [1.0] * len(video_grid_thw)
    grid = video_grid_thw.to(device)
    tokens_per_patch = (grid[:, 1] // spatial_merge_size) * (grid[:, 2] // spatial_merge_size)
    num_tokens = grid[:, 0] * tokens_per_patch
    slots = torch.arange(int(num_tokens.max()), device=device)[None, :]
    interval = torch.as_tensor(second_per_grid_ts, dtype=torch.float32, device=device)
    seconds = (slots // tokens_per_patch[:, None]).float() * interval[:, None]
    return seconds.masked_fill(slots >= num_tokens[:, None], 0.0)


class QTSplusQwen2_5_VLForConditionalGeneration(QTSplusModelMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose video tokens pass through the QTSplus selector before the language model.

    Takes exactly what `Qwen2_5_VLProcessor` (or `QTSplusProcessor`) returns, plus
    `qtsplus_query_mask` (bool `[batch, seq]`, the question tokens) and `qtsplus_keep_ratio` (None = predicted
    budget, a float in (0, 1] = keep that share of every video's tokens). With `config.qtsplus_enabled=False`, or
    without videos, it is the stock model.
    """

    config_class = QTSplusConfig
    config: QTSplusConfig
    stock_class = Qwen2_5_VLForConditionalGeneration
    backbone_name = "Qwen2.5-VL"
    timing_inputs = ("second_per_grid_ts",)
    # device_map keeps each selector layer on one device: the selector calls them as modules, whose hooks move the
    # inputs; a split layer would leave its masks and residual on another device than its projections.
    _no_split_modules = [
        *Qwen2_5_VLForConditionalGeneration._no_split_modules, "QTSplusAttentionLayer", "QTSplusReencodeLayer"
    ]

    # -- the backbone hooks ----------------------------------------------------------------------------------------

    def visual_features(self, pixel_values: torch.Tensor, grid_thw: torch.LongTensor, modality: str) -> list[list]:
        encode = self.model.get_image_features if modality == "image" else self.model.get_video_features
        return [list(encode(pixel_values, grid_thw).pooler_output)]

    def video_token_seconds(
        self, video_grid_thw: torch.LongTensor, device: torch.device,
        second_per_grid_ts: torch.Tensor | list[float] | None = None,
    ) -> torch.Tensor:
        return video_token_timestamps(
            video_grid_thw, second_per_grid_ts, self.config.vision_config.spatial_merge_size, device
        )

    def stock_positions(
        self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
        video_grid_thw: torch.Tensor, attention_mask: torch.Tensor,
        second_per_grid_ts: torch.Tensor | list[float] | None = None,
    ) -> torch.Tensor:
        position_ids, _ = self.model.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts,
            attention_mask=attention_mask,
        )
        return position_ids

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
        second_per_grid_ts: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        qtsplus_query_mask: torch.Tensor | None = None,
        qtsplus_keep_ratio: float | None = None,
        qtsplus_vision_chunk_frames: int | None = None,
        qtsplus_evidence_mask: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ) -> QTSplusCausalLMOutputWithPast:
        r"""
        Same as [`Qwen2_5_VLForConditionalGeneration.forward`] (the cache and the rest pass through `kwargs`), plus:

        qtsplus_query_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`, *optional*):
            The question tokens. Default: the text of the user turns (`config.qtsplus_user_turn_ids` up to
            `qtsplus_turn_end_id`), or every attended non-vision token in a row without them; never a labelled token.
        qtsplus_keep_ratio (`float`, *optional*):
            None: the predicted budget. A float in (0, 1]: keep that share of each video's tokens (1.0 keeps all).
        qtsplus_vision_chunk_frames (`int`, *optional*):
            Overrides `config.qtsplus_vision_chunk_frames` for this call (0 encodes each video at once).
        qtsplus_evidence_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`, *optional*):
            True at the video tokens that show the evidence (training rows with `evidence_seconds` / boxes): with
            labels and `config.qtsplus_lambda_grounding > 0`, the grounding loss ranks them first.

        When the selector runs, `logits` (and the loss) cover the compacted sequence.

        `mm_encoder_outputs` (transformers >= 5.20): features that `generate` encoded once before expanding the batch
        for beams / `num_return_sequences`. Named in the signature because `generate` looks for it there; without
        it, `generate` repeats the flattened pixel rows instead, which scrambles each sample's patches. Only the
        stock path takes it: pre-encoded videos cannot pass through the selector.
        """
        visual_inputs = dict(
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            second_per_grid_ts=second_per_grid_ts,
        )
        qtsplus_inputs = dict(
            qtsplus_query_mask=qtsplus_query_mask,
            qtsplus_keep_ratio=qtsplus_keep_ratio,
            qtsplus_vision_chunk_frames=qtsplus_vision_chunk_frames,
            qtsplus_evidence_mask=qtsplus_evidence_mask,
        )
        return self.qtsplus_forward(input_ids, inputs_embeds, attention_mask, position_ids, labels, visual_inputs,
                                    qtsplus_inputs, mm_encoder_outputs, None,
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
        second_per_grid_ts: torch.Tensor | None = None,
        qtsplus_query_mask: torch.Tensor | None = None,
        qtsplus_keep_ratio: float | None = None,
        qtsplus_vision_chunk_frames: int | None = None,
        qtsplus_selection_scores: list[torch.Tensor] | None = None,
        **kwargs,
    ) -> "torch.LongTensor | GenerateOutput":
        """`GenerationMixin.generate` with the selector run once, at prefill (`QTSplusModelMixin.qtsplus_generate`).

        The language model decodes from the compacted prefix (embeddings, mask and `[4, B, S']` positions, which
        `generate` extends by +1 per new token); the returned sequences still begin with the caller's `input_ids`.
        """
        stock_inputs = dict(
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            second_per_grid_ts=second_per_grid_ts,
        )
        return self.qtsplus_generate(input_ids, stock_inputs, qtsplus_query_mask, qtsplus_keep_ratio,
                                     qtsplus_vision_chunk_frames, qtsplus_selection_scores, kwargs)

    @classmethod
    def from_qwen2_5_vl(
        cls, model_or_path: "Qwen2_5_VLForConditionalGeneration | str", recipe: str | None = None,
        init_scheme: str | None = None, **config_overrides,
    ) -> "QTSplusQwen2_5_VLForConditionalGeneration":
        """Wrap a stock Qwen2.5-VL (an in-memory model, a local directory or a Hub id) into a QTSplus model; see
        `QTSplusModelMixin.from_stock` (with `init_scheme="identity"` and `qtsplus_keep_ratio=1.0` the logits equal
        the stock model's)."""
        return cls.from_stock(model_or_path, recipe=recipe, init_scheme=init_scheme, **config_overrides)


__all__ = [
    "INIT_SCHEMES",
    "QTSplusCausalLMOutputWithPast",
    "QTSplusInputs",
    "QTSplusQwen2_5_VLForConditionalGeneration",
    "QTSplusSelection",
    "QTSplusSelector",
    "compact_rows",
    "video_token_timestamps",
]
