# Copyright 2026 The qtsplus-hf authors. Licensed under the Apache License, Version 2.0.
"""QTSplus, the query-aware visual token selector (arXiv 2511.11910), once for every backbone.

The selector works on video features `[V, M, D]`, the question of each video's sample `[V, L, D]` and the timestamp
of every video token `[V, M]`; nothing in it knows which vision-language model produced them. The file reads in the
order of the method:

0. settings: the `qtsplus_*` fields that every backbone's config adds to its parent (`QTSplusConfigMixin`);
1. building blocks (RMSNorm, GELU feed-forward, a GQA attention layer shaped like the LM's);
2. scoring: the question attends to the video tokens, relevance `r_j` = max over heads and question tokens;
3. budget: a small MLP predicts the retention ratio ρ, `n = clamp(ceil(ρM), 1, n_max)`;
4. selection: hard top-n in original order, with a straight-through threshold gate in training;
5. re-encoding: self-attention over the kept tokens with their absolute timestamps injected;
5b. the training signals that teach the selector which tokens the question needs (grounding, distillation);
6. finding the question in a chat prompt (`QTSplusProcessorMixin` for processors, the model's own fallback);
7. what every backbone's model shares around the selector (`QTSplusModelMixin`): the vision encoder run in chunks,
   the compacted prefill (unselected video positions dropped from embeddings, mask, labels and positions), the
   losses, `generate` with the selector run once at prefill, conversion from a stock model and saving.

A backbone is one modeling file (`modeling_qtsplus_<backbone>.py`): its config, its processor and its model class,
each `QTSplus*Mixin` first and the stock transformers class second, plus the hooks that differ (how its vision encoder
returns features, when its video tokens were recorded, its rotary positions, extra visual streams such as DeepStack).

Remote-code file: it imports only `torch`, `transformers` and its sibling `pipeline_video_text_to_text` (which
imports `video_qtsplus`).
"""

import copy
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel, initialization
from transformers.dynamic_module_utils import custom_object_save
from transformers.feature_extraction_utils import BatchFeature
from transformers.generation.utils import GenerateOutput
from transformers.utils import logging

from .pipeline_video_text_to_text import PIPELINE_TASK, QTSplusVideoTextToTextPipeline

try:  # transformers >= 5.20 shares one multimodal output class across models
    from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast as _StockCausalLMOutput
except ImportError:  # transformers 5.17 - 5.19: each Qwen VL model has its own class, all a causal LM output + this

    from transformers.modeling_outputs import CausalLMOutputWithPast

    @dataclass
    class _StockCausalLMOutput(CausalLMOutputWithPast):
        rope_deltas: torch.LongTensor | None = None


IGNORE_INDEX = -100
# How `initialize_selector_from_language_model` copies LM layers into the selector.
INIT_SCHEMES = ("identity", "released")


# ----------------------------------------------------------------------------------------------------------------------
# 0. Settings
# ----------------------------------------------------------------------------------------------------------------------


POSITION_MODES = ("mrope", "sequential")
SCORE_AGGREGATIONS = ("max", "weighted")
# Qwen's tokenizers (Qwen2.5 and Qwen3): `<|im_start|>user\n` opens a user turn, `<|im_end|>` closes every turn.
QWEN_USER_TURN_IDS = (151644, 872, 198)
QWEN_TURN_END_ID = 151645
# Settings one option away (`from_qwen2_5_vl(recipe=...)`, `qtsplus convert --recipe`, `qtsplus train --recipe`).
# "released": the released training script's recipe for QTSplus-3B (script/training_example.sh: tau_s 0.5,
# lambda_t 0.1 (FLOPs), lambda_m 0.17 (KV), lambda_s 0.05, nmax 512, 1 scoring and 2 re-encode layers); its
# rho range, [0.05, 0.5], is the default here too.
RECIPES = {
    "released": {
        "qtsplus_tau": 0.5,
        "qtsplus_lambda_flops": 0.1,
        "qtsplus_lambda_kv": 0.17,
        "qtsplus_lambda_smooth": 0.05,
        "qtsplus_max_tokens": 512,
        "qtsplus_num_scoring_layers": 1,
        "qtsplus_num_reencode_layers": 2,
    },
}


@dataclass(kw_only=True, repr=False)
class QTSplusConfigMixin:
    r"""
    The flat `qtsplus_*` settings of the QTSplus selector, added to a vision-language config by subclassing
    `(QTSplusConfigMixin, StockConfig)` (the fields join the stock config's dataclass fields; validation runs first).

    The selector reuses the language model's width and attention head layout (`text_config.hidden_size`,
    `num_attention_heads`, `num_key_value_heads`, `head_dim`), so that its attention layers can be initialised from
    LM decoder layers.

    Args:
        qtsplus_enabled (`bool`, defaults to `True`):
            `False` makes the model behave exactly like the stock model (the selector weights stay loaded).
        qtsplus_rho_min (`float`, defaults to 0.05) / qtsplus_rho_max (`float`, defaults to 0.5):
            Range of the predicted retention ratio ρ, `0 < rho_min <= rho_max <= 1`.
        qtsplus_tau (`float`, defaults to 0.1):
            Temperature of the differentiable training gate `σ((r - t) / τ)`.
        qtsplus_max_tokens (`int`, defaults to 2560):
            n_max, the most tokens kept per video at the predicted budget.
        qtsplus_num_scoring_layers (`int`, defaults to 1):
            Cross-attention layers through which the question scores the video tokens (at least 1).
        qtsplus_num_reencode_layers (`int`, defaults to 1):
            Self-attention layers over the kept tokens; 0 disables the re-encoder.
        qtsplus_time_embedding (`bool`, defaults to `True`):
            Inject each kept token's absolute timestamp (seconds) into the re-encoder (`"mrope"` position mode only).
        qtsplus_lambda_flops / qtsplus_lambda_kv / qtsplus_lambda_smooth (`float`, defaults 1.0 / 1.7 / 0.05):
            Weights of the auxiliary losses (FLOPs proxy, KV proxy, smoothness of ρ) added to the LM loss.
        qtsplus_budget_hidden_size (`int`, defaults to 256):
            Hidden width of the budget head MLP `(d + 3) -> hidden -> 1`.
        qtsplus_time_embedding_dim (`int`, defaults to 64):
            Number of sinusoidal features of a timestamp before the learned projection to the model width.
        qtsplus_vision_chunk_frames (`int`, defaults to 0):
            Encode videos this many frames at a time (a multiple of the temporal patch size) so the vision encoder's
            activation memory no longer grows with video length; 0 encodes each video at once. The features are the
            same: the supported vision encoders attend only within a temporal patch.
        qtsplus_position_mode (`str`, defaults to `"mrope"`):
            How the language model sees the compacted sequence. `"mrope"`: kept video tokens keep their original 3-D
            MRoPE positions and the re-encoder adds absolute time (this project's model). `"sequential"`: the
            selection is spliced into the prompt with plain positions 0, 1, 2, ... on all three rotary axes and no
            time embedding, the way the paper's released Qwen2.5-VL checkpoints were trained
            (`qtsplus convert --from official`).
        qtsplus_lambda_grounding (`float`, defaults to 0.0):
            Weight of the grounding loss, for training rows that mark their evidence (`qtsplus_evidence_mask`):
            the listwise cross-entropy `-mean_{j in E} log(r_j / sum_k r_k)` over each video's evidence tokens E.
        qtsplus_lambda_distill (`float`, defaults to 0.0):
            Weight of relevance distillation: `KL(a || r / sum r)`, `a` the language model's own attention from the
            answer-predicting and question positions over every video token, in a no-gradient pass that keeps all
            tokens (the teacher of FlexSelect).
        qtsplus_explore_ratio (`float`, defaults to 0.0):
            Exploring training gate: besides the top-n tokens, this share of each video's dropped tokens is kept at
            random in training, so that evidence the selector ranks low still reaches the LM and its loss can raise
            the token's score. 0 keeps the deterministic gate; inference is always plain top-n.
        qtsplus_score_aggregation (`str`, defaults to `"max"`):
            How a token's relevance gathers the question tokens' attention. `"max"`: the maximum over heads and
            question tokens (the paper's form, what the released checkpoints use). `"weighted"`: per head, a
            softmax-weighted sum over the question tokens with weights read from each token by a learned linear
            map (zero-initialised, so it starts as the mean), then the maximum over heads.
        qtsplus_relevance_embedding (`bool`, defaults to `False`):
            Add each kept token's relevance, `clamp(log(r_j M) / log M, -1, 1)` (1: all of the attention, 0: uniform),
            through a learned direction to the kept token before re-encoding, so the language model can tell which
            kept tokens the question points at instead of re-deriving it (this project's addition; zeroed by
            conversion from a stock model, so a converted model is unchanged; the released checkpoints have none).
        qtsplus_user_turn_ids (`list[int]`, defaults to Qwen's `<|im_start|>user\n`, `[151644, 872, 198]`) /
        qtsplus_turn_end_id (`int`, defaults to Qwen's `<|im_end|>`, 151645):
            How the model finds the question when the caller passes no `qtsplus_query_mask`: the text of the user
            turns (from after this header to the turn's end token), vision spans and labels excluded. A row with no
            user turn falls back to every attended token outside the vision spans. `chat_turn_settings(tokenizer)`
            gives the values for another tokenizer.
        qtsplus_base_model (`str`, *optional*):
            Hub id of the checkpoint this model was converted from (set by conversion and `qtsplus convert`); the
            model card's `base_model`.
    """

    # Class settings of a backbone, not saved fields: the position modes it supports, and whether its LM attention
    # normalises each head's queries and keys (Qwen3), which the selector's attention layers then copy.
    supported_position_modes: ClassVar[tuple[str, ...]] = POSITION_MODES
    selector_head_norms: ClassVar[bool] = False

    qtsplus_enabled: bool = True
    qtsplus_rho_min: float = 0.05
    qtsplus_rho_max: float = 0.5
    qtsplus_tau: float = 0.1
    qtsplus_max_tokens: int = 2560
    qtsplus_num_scoring_layers: int = 1
    qtsplus_num_reencode_layers: int = 1
    qtsplus_time_embedding: bool = True
    qtsplus_lambda_flops: float = 1.0
    qtsplus_lambda_kv: float = 1.7
    qtsplus_lambda_smooth: float = 0.05
    qtsplus_budget_hidden_size: int = 256
    qtsplus_time_embedding_dim: int = 64
    qtsplus_vision_chunk_frames: int = 0
    qtsplus_position_mode: str = "mrope"
    qtsplus_lambda_grounding: float = 0.0
    qtsplus_lambda_distill: float = 0.0
    qtsplus_explore_ratio: float = 0.0
    qtsplus_score_aggregation: str = "max"
    qtsplus_relevance_embedding: bool = False
    qtsplus_user_turn_ids: list[int] | tuple[int, ...] = QWEN_USER_TURN_IDS
    qtsplus_turn_end_id: int = QWEN_TURN_END_ID
    qtsplus_base_model: str | None = None

    def __post_init__(self, **kwargs):
        self._validate_qtsplus()
        super().__post_init__(**kwargs)

    def _validate_qtsplus(self) -> None:
        name = type(self).__name__

        def fail(field: str, expected: str) -> None:
            raise ValueError(f"{name}.{field} must be {expected}, got {getattr(self, field)!r}")

        for field in ("qtsplus_rho_min", "qtsplus_rho_max"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                fail(field, "a number in (0, 1]")
        if self.qtsplus_rho_min > self.qtsplus_rho_max:
            raise ValueError(
                f"{name}.qtsplus_rho_min ({self.qtsplus_rho_min}) must not exceed "
                f"qtsplus_rho_max ({self.qtsplus_rho_max})"
            )
        if not isinstance(self.qtsplus_tau, (int, float)) or self.qtsplus_tau <= 0:
            fail("qtsplus_tau", "a positive number")
        for field, minimum in (
            ("qtsplus_max_tokens", 1),
            ("qtsplus_num_scoring_layers", 1),
            ("qtsplus_num_reencode_layers", 0),
            ("qtsplus_budget_hidden_size", 1),
            ("qtsplus_time_embedding_dim", 2),
            ("qtsplus_vision_chunk_frames", 0),
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                fail(field, f"an integer >= {minimum}")
        if self.qtsplus_time_embedding_dim % 2:
            fail("qtsplus_time_embedding_dim", "even (sine and cosine pairs)")
        temporal_patch_size = getattr(self.vision_config, "temporal_patch_size", None)
        if temporal_patch_size is None and isinstance(self.vision_config, dict):
            temporal_patch_size = self.vision_config.get("temporal_patch_size")
        if self.qtsplus_vision_chunk_frames % (temporal_patch_size or 2):
            fail("qtsplus_vision_chunk_frames", f"a multiple of the temporal patch size ({temporal_patch_size or 2})")
        if self.qtsplus_position_mode not in self.supported_position_modes:
            fail("qtsplus_position_mode", " or ".join(repr(mode) for mode in self.supported_position_modes))
        if self.qtsplus_score_aggregation not in SCORE_AGGREGATIONS:
            fail("qtsplus_score_aggregation", " or ".join(repr(mode) for mode in SCORE_AGGREGATIONS))
        turn_ids = self.qtsplus_user_turn_ids
        if not isinstance(turn_ids, (list, tuple)) or not turn_ids or not all(
            isinstance(token, int) and not isinstance(token, bool) and token >= 0 for token in turn_ids
        ):
            fail("qtsplus_user_turn_ids", "a non-empty list of token ids")
        self.qtsplus_user_turn_ids = list(turn_ids)
        if isinstance(self.qtsplus_turn_end_id, bool) or not isinstance(self.qtsplus_turn_end_id, int) or (
            self.qtsplus_turn_end_id < 0
        ):
            fail("qtsplus_turn_end_id", "a token id (an integer >= 0)")
        if self.qtsplus_base_model is not None and not isinstance(self.qtsplus_base_model, str):
            fail("qtsplus_base_model", "None or a Hub model id")
        if isinstance(self.qtsplus_explore_ratio, bool) or not isinstance(self.qtsplus_explore_ratio, (int, float)) or (
            not 0.0 <= self.qtsplus_explore_ratio < 1.0
        ):
            fail("qtsplus_explore_ratio", "a number in [0, 1)")
        for field in ("qtsplus_lambda_flops", "qtsplus_lambda_kv", "qtsplus_lambda_smooth", "qtsplus_lambda_grounding",
                      "qtsplus_lambda_distill"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                fail(field, "a non-negative number")


# ----------------------------------------------------------------------------------------------------------------------
# 1. Building blocks
# ----------------------------------------------------------------------------------------------------------------------


class QTSplusRMSNorm(nn.Module):
    """RMSNorm with float32 statistics. Shapes: `[..., D] -> [..., D]`."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden_states.to(dtype)


class QTSplusFeedForward(nn.Module):
    """GELU feed-forward `D -> 4D -> D` (`net.0`, `net.2`: the released checkpoints' key layout)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, 4 * hidden_size), nn.GELU(), nn.Linear(4 * hidden_size, hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.net(hidden_states)


class QTSplusAttentionLayer(nn.Module):
    """Pre-norm attention + feed-forward block shaped like the LM's decoder attention (GQA; q/k/v bias when the LM's
    has one, as Qwen2.5's; per-head q/k RMSNorm when the LM's has one, as Qwen3's; no o bias).

    No rotary embedding: the selector is order-free; order is restored by positions and timestamps later.
    The same parameters serve the scoring cross-attention (question -> video) and, inside a re-encode layer, the
    self-attention over kept tokens. Its projections (and head norms) can be copied from an LM decoder layer.
    """

    def __init__(self, config: QTSplusConfigMixin) -> None:
        super().__init__()
        text_config = config.text_config
        hidden_size = text_config.hidden_size
        self.num_heads = text_config.num_attention_heads
        self.num_key_value_heads = text_config.num_key_value_heads
        self.head_dim = getattr(text_config, "head_dim", None) or hidden_size // self.num_heads
        # Qwen2.5's text config has no `attention_bias`: its attention always has q/k/v biases.
        bias = getattr(text_config, "attention_bias", True)
        self.q_norm = QTSplusRMSNorm(hidden_size, text_config.rms_norm_eps)
        self.kv_norm = QTSplusRMSNorm(hidden_size, text_config.rms_norm_eps)
        self.q_proj = nn.Linear(hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.q_head_norm = self.k_head_norm = None
        if config.selector_head_norms:
            self.q_head_norm = QTSplusRMSNorm(self.head_dim, text_config.rms_norm_eps)
            self.k_head_norm = QTSplusRMSNorm(self.head_dim, text_config.rms_norm_eps)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden_size, bias=False)
        self.ffn_norm = QTSplusRMSNorm(hidden_size, text_config.rms_norm_eps)
        self.ffn = QTSplusFeedForward(hidden_size)
        self.key_block_size = 8192  # video tokens normalised and projected at a time when scoring (`project_keys`)

    def project(
        self, queries: torch.Tensor, keys_values: torch.Tensor, time_embeds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`[B, L, D]`, `[B, M, D]` -> q `[B, H, L, d]`, k and v `[B, H_kv, M, d]`.

        `time_embeds` (`[B, M, D]`, self-attention only) is added after both norms, inside the attention branch.
        Both norms are called as modules: under a `device_map` with offload a module's weight exists only while its
        own forward runs.
        """
        query_in, kv_in = self.q_norm(queries), self.kv_norm(keys_values)
        if time_embeds is not None:
            query_in, kv_in = query_in + time_embeds, kv_in + time_embeds
        batch, query_len, _ = queries.shape
        kv_len = keys_values.shape[1]
        q = self.head_normed(self.q_proj(query_in).view(batch, query_len, self.num_heads, self.head_dim), "q")
        k = self.head_normed(self.k_proj(kv_in).view(batch, kv_len, self.num_key_value_heads, self.head_dim), "k")
        v = self.v_proj(kv_in).view(batch, kv_len, self.num_key_value_heads, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def head_normed(self, states: torch.Tensor, which: str) -> torch.Tensor:
        """`[B, N, heads, d]` through the per-head norm of queries (`which="q"`) or keys, when the layer has one."""
        norm = self.q_head_norm if which == "q" else self.k_head_norm
        return states if norm is None else norm(states)

    def finish(self, residual: torch.Tensor, attn_output: torch.Tensor) -> torch.Tensor:
        """`attn_output [B, H, L, d]` -> `residual + o_proj(attn)`, then `+ ffn(ffn_norm(.))`. Shape `[B, L, D]`."""
        batch, _, length, _ = attn_output.shape
        hidden = residual + self.o_proj(attn_output.transpose(1, 2).reshape(batch, length, -1))
        return hidden + self.ffn(self.ffn_norm(hidden))

    def project_keys(self, keys_values: torch.Tensor, with_values: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`[B, M, D]` -> k and v `[B, H_kv, M, d]` (v is None unless `with_values`), normalised block by block.

        The float32 norm of the video is needed one projection at a time, so it is computed `key_block_size` tokens
        at a time (a loop over blocks, not tokens): its temporaries stay `[B, block, D]` instead of `[B, M, D]`
        (M ~ 1e5 tokens, D = 2048 on long videos). Rows are independent, so the result is the same.
        """
        batch, kv_len, _ = keys_values.shape
        keys, values = [], []
        for block in keys_values.split(self.key_block_size, dim=1):
            normed = self.kv_norm(block)
            keys.append(self.k_proj(normed))
            if with_values:
                values.append(self.v_proj(normed))
        shape = (batch, kv_len, self.num_key_value_heads, self.head_dim)
        # One block (M <= key_block_size) is used as it is: a cat would copy it.
        k = self.head_normed((keys[0] if len(keys) == 1 else torch.cat(keys, dim=1)).view(shape), "k").transpose(1, 2)
        v = None
        if with_values:
            v = (values[0] if len(values) == 1 else torch.cat(values, dim=1)).view(shape).transpose(1, 2)
        return k, v

    def cross_attention_probs(
        self, queries: torch.Tensor, keys_values: torch.Tensor, key_mask: torch.Tensor, with_output: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention probabilities of the queries over the keys, and the attention output.

        Args:
            queries: `[B, L, D]`; keys_values: `[B, M, D]`; key_mask: bool `[B, M]`, False = padding, or None when
            no key is padding; with_output: False skips the value projection and the output (the last scoring
            layer needs only probs).
        Returns:
            probs `[B, H_kv, G*L, M]` (float32; head `h = kv*G + g`, rows ordered `(g, l)`) and
            attention output `[B, H, L, d]` (None without `with_output`).
        """
        batch, length, _ = queries.shape
        q = self.q_proj(self.q_norm(queries)).view(batch, length, self.num_heads, self.head_dim)
        q = self.head_normed(q, "q").transpose(1, 2)
        k, v = self.project_keys(keys_values, with_values=with_output)
        groups = self.num_heads // self.num_key_value_heads
        # Group the query heads by their shared key/value head instead of repeating k and v (M can be ~1e5). Only
        # the question rows exist, L << M; scaling and masking happen in place on the one [B, H, L, M] buffer.
        q = q.reshape(batch, self.num_key_value_heads, groups * length, self.head_dim)
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)).div_(math.sqrt(self.head_dim))
        if key_mask is not None:
            logits = logits.masked_fill_(~key_mask[:, None, None, :], torch.finfo(logits.dtype).min)
        probs = logits.softmax(dim=-1)
        if not with_output:
            return probs, None
        attn_output = torch.matmul(probs.to(v.dtype), v).view(batch, self.num_heads, length, self.head_dim)
        return probs, attn_output

    def forward(
        self, queries: torch.Tensor, keys_values: torch.Tensor, key_mask: torch.Tensor, with_output: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One scoring step: `cross_attention_probs`, then the updated queries `finish(queries, attention)` `[B, L, D]`
        (None without `with_output`). Called as the module, so that a `device_map`'s hook moves every input to
        this layer's device first."""
        probs, attn_output = self.cross_attention_probs(queries, keys_values, key_mask, with_output)
        return probs, (self.finish(queries, attn_output) if with_output else None)


class QTSplusBudgetHead(nn.Module):
    """ρ = ρ_min + (ρ_max − ρ_min)·σ(MLP([mean(Q), log M, max r, H(p)])), MLP `(D+3) -> hidden -> 1` with GELU."""

    def __init__(self, config: QTSplusConfigMixin) -> None:
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.rho_min = config.qtsplus_rho_min
        self.rho_max = config.qtsplus_rho_max
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size + 3, config.qtsplus_budget_hidden_size),
            nn.GELU(),
            nn.Linear(config.qtsplus_budget_hidden_size, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`features [V, D+3]` -> ρ `[V]` (float32)."""
        logits = self.mlp(features).squeeze(-1).float()
        return self.rho_min + (self.rho_max - self.rho_min) * torch.sigmoid(logits)


class QTSplusTimeEmbedding(nn.Module):
    """Absolute time in seconds -> sinusoidal features -> `Linear` to the model width. `[...] -> [..., D]`."""

    def __init__(self, config: QTSplusConfigMixin) -> None:
        super().__init__()
        self.num_frequencies = config.qtsplus_time_embedding_dim // 2
        self.proj = nn.Linear(config.qtsplus_time_embedding_dim, config.text_config.hidden_size)

    def forward(self, seconds: torch.Tensor) -> torch.Tensor:
        # The tokens of a temporal patch share its timestamp: each distinct one is embedded once, then gathered.
        distinct, index = torch.unique(seconds, return_inverse=True)
        exponent = torch.arange(self.num_frequencies, device=seconds.device, dtype=torch.float32) / self.num_frequencies
        angles = distinct.float()[..., None] * torch.exp(-math.log(10000.0) * exponent)
        return self.proj(torch.cat([angles.sin(), angles.cos()], dim=-1).to(self.proj.weight.dtype))[index]


class QTSplusRelevanceEmbedding(nn.Module):
    """Relevance r of a kept token -> `clamp(log(r·M) / log M, -1, 1)` -> a learned direction `[..., D]`.

    The feature is 1 for a token holding all of a question row's attention and 0 for uniform attention, whatever M.
    A model built from scratch starts with a unit-norm direction, visible to the LM from the first step (at zero
    it would be a saddle: the LM cannot learn to use a direction that is not there); conversion from a stock model
    zeroes it so that a converted model still equals the stock one.
    """

    def __init__(self, config: QTSplusConfigMixin) -> None:
        super().__init__()
        self.proj = nn.Linear(1, config.text_config.hidden_size, bias=False)
        self.proj.unit_norm_init = True

    def forward(self, scores: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        """`scores [V, N]` (kept tokens' r), `num_tokens [V]` (M per video) -> `[V, N, D]`."""
        log_m = num_tokens.float().clamp_min(2).log()[:, None]
        feature = ((scores.float().clamp_min(1e-12).log() + log_m) / log_m).clamp(-1.0, 1.0)
        return self.proj(feature[..., None].to(self.proj.weight.dtype))


class QTSplusReencodeLayer(nn.Module):
    """Self-attention over the kept tokens of a video, time injected inside the attention branch.

    Its residual branches (`core.o_proj`, `core.ffn.net.2`) start at zero, so a fresh layer is the identity.
    """

    def __init__(self, config: QTSplusConfigMixin) -> None:
        super().__init__()
        self.core = QTSplusAttentionLayer(config)
        # Read by `_init_weights` on the Linear itself: transformers skips init hooks on parameter-less parents.
        for residual_output in (self.core.o_proj, self.core.ffn.net[2]):
            residual_output.zero_init = True

    def forward(
        self, hidden_states: torch.Tensor, key_mask: torch.Tensor, time_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        """`hidden_states [V, N, D]`, bool `key_mask [V, N]` (False = padding; None: no padding), `time_embeds
        [V, N, D]` or None. Without a mask SDPA may pick a fused kernel that takes none (flash on CUDA)."""
        q, k, v = self.core.project(hidden_states, hidden_states, time_embeds)
        attn_output = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if key_mask is None else key_mask[:, None, None, :],
            enable_gqa=self.core.num_heads != self.core.num_key_value_heads,
        )
        return self.core.finish(hidden_states, attn_output)


# ----------------------------------------------------------------------------------------------------------------------
# 2-5. The selector
# ----------------------------------------------------------------------------------------------------------------------


def budget_to_token_count(rho: torch.Tensor, num_tokens: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    """n = clamp(ceil(ρ·M), 1, n_max) per video (`max_tokens=None`: no n_max, as for a caller-fixed ratio).

    ρ arrives in float32, whose rounding would turn ρ=0.1, M=30 into ceil(3.00000004) = 4: the product is shrunk by
    a relative 1e-6 (well above float32's 6e-8) before the ceiling.
    """
    counts = torch.ceil(rho.detach().double() * num_tokens.double() * (1 - 1e-6)).long()
    upper = num_tokens if max_tokens is None else num_tokens.clamp(max=max_tokens)
    return torch.minimum(counts.clamp(min=1), upper)


def top_n_mask(scores: torch.Tensor, counts: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Bool `[V, M]`, True at each video's `counts[v]` highest `scores` among its `valid` tokens."""
    order = scores.masked_fill(~valid, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    rank_kept = torch.arange(scores.shape[-1], device=scores.device)[None, :] < counts[:, None]
    return torch.zeros_like(valid).scatter(-1, order, rank_kept)


def soft_threshold(
    scores: torch.Tensor, rho: torch.Tensor, valid: torch.Tensor, tau: float, iterations: int = 40,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Threshold t `[V]` with Σ_j σ((r_j − t)/τ) = min(ρ·M, n_max) over the valid tokens, differentiable in r and ρ.

    The soft budget is capped like the hard count, so the gate never credits tokens that n_max dropped.

    Bisection finds the root without a graph; one Newton step from it (whose value change is ~0) then carries the
    exact implicit-function gradient dt/dr, dt/dρ, without back-propagating through the iterations.
    """
    target = rho * valid.sum(-1)
    if max_tokens is not None:
        target = target.clamp(max=float(max_tokens))
    with torch.no_grad():
        detached = scores.detach()
        low = detached.masked_fill(~valid, float("inf")).amin(-1) - 20 * tau
        high = detached.masked_fill(~valid, float("-inf")).amax(-1) + 20 * tau
        for _ in range(iterations):
            mid = (low + high) / 2
            kept_mass = (torch.sigmoid((detached - mid[:, None]) / tau) * valid).sum(-1)
            too_many = kept_mass > target.detach()
            low, high = torch.where(too_many, mid, low), torch.where(too_many, high, mid)
        root = (low + high) / 2
    gate = torch.sigmoid((scores - root[:, None]) / tau) * valid
    residual = gate.sum(-1) - target
    slope = -(gate * (1 - gate)).sum(-1) / tau
    return root - residual / slope.clamp(max=-1e-12)


class QTSplusSelector(nn.Module):
    """Scores video tokens by the question, predicts the budget, keeps top-n, re-encodes them with time.

    Parameter layout (maps 1:1 onto the released checkpoints' `qts_plus.selector.*`): `scoring_layers.N`,
    `budget.mlp.{0,2}`, `reencode_layers.N.core`, plus `time_embedding.proj` (this project's absolute-time input)
    and, when configured, `relevance_embedding.proj` (this project's relevance input).
    """

    def __init__(self, config: QTSplusConfigMixin) -> None:
        super().__init__()
        self.config = config
        self.scoring_layers = nn.ModuleList(
            [QTSplusAttentionLayer(config) for _ in range(config.qtsplus_num_scoring_layers)]
        )
        self.budget = QTSplusBudgetHead(config)
        # Aggregation over the question tokens: "max" (the released form) or "weighted" (see `weighted_relevance`).
        self.query_token_weights = None
        if config.qtsplus_score_aggregation == "weighted":
            self.query_token_weights = nn.Linear(config.text_config.hidden_size, config.text_config.num_attention_heads)
            self.query_token_weights.zero_init = True
        self.reencode_layers = nn.ModuleList(
            [QTSplusReencodeLayer(config) for _ in range(config.qtsplus_num_reencode_layers)]
        )
        # The released checkpoints (sequential positions) were trained without a time input.
        use_time = (
            config.qtsplus_time_embedding
            and config.qtsplus_num_reencode_layers > 0
            and config.qtsplus_position_mode == "mrope"
        )
        self.time_embedding = QTSplusTimeEmbedding(config) if use_time else None
        self.relevance_embedding = QTSplusRelevanceEmbedding(config) if config.qtsplus_relevance_embedding else None
        # Running mean of ρ over training, the reference of the smoothness loss (not saved with the weights).
        self.register_buffer("rho_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("rho_count", torch.zeros((), dtype=torch.float64), persistent=False)

    def score(
        self, video: torch.Tensor, video_mask: torch.Tensor, query: torch.Tensor, query_mask: torch.Tensor
    ) -> torch.Tensor:
        """Relevance r `[V, M]` in [0, 1]: max over heads and question tokens of the last layer's attention (or the
        learned weighting of `weighted_relevance`).

        Args:
            video `[V, M, D]`, video_mask bool `[V, M]`, query `[V, L, D]`, query_mask bool `[V, L]`.
        """
        home = video.device
        # No padded video token (one video, or videos of one length): no key mask to apply.
        key_mask = None if bool(video_mask.all()) else video_mask
        for layer in self.scoring_layers[:-1]:
            _, query = layer(query, video, key_mask)
        last = self.scoring_layers[-1]
        probs, _ = last(query, video, key_mask, with_output=False)
        # Under a device_map the last layer may sit elsewhere: reduce there, return r on the video's device.
        video_mask, query_mask = video_mask.to(probs.device), query_mask.to(probs.device)
        groups = probs.shape[2] // query.shape[1]
        if self.query_token_weights is not None:
            return (self.weighted_relevance(probs, last.q_norm(query), query_mask) * video_mask).to(home)
        if bool(query_mask.all()):  # no padded question row: one max over heads and rows
            return (probs.amax(dim=(1, 2)) * video_mask).to(home)
        # Max over the key/value heads first (a [V, G*L, M] result, H_kv times smaller than probs); then padded
        # question rows must not vote: probabilities are >= 0, so zeroing them removes them from the max.
        per_row = probs.amax(dim=1)
        row_mask = query_mask.repeat(1, groups)[:, :, None]
        return (per_row.masked_fill(~row_mask, 0.0).amax(dim=1) * video_mask).to(home)

    def weighted_relevance(self, probs: torch.Tensor, query: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        """Aggregation `"weighted"`: r_j = max over heads h of Σ_l w_hl p_hlj, w_h = softmax over the question
        tokens of a learned linear read of each token (zero-initialised: the mean over tokens).

        Under the max over tokens every question row votes with its full attention, so the rows of words that name
        nothing ("what", "is", "the") add the same saliency to every question; learned weights let the rows of the
        words that name the evidence decide. `probs [V, H_kv, G*L, M]` (rows `(g, l)`), `query [V, L, D]`.
        """
        batch, kv_heads, rows, length = probs.shape
        groups = rows // query.shape[1]
        logits = self.query_token_weights(query).to(probs.device).float()
        logits = logits.masked_fill(~query_mask[..., None], float("-inf"))
        weights = logits.softmax(dim=1).transpose(1, 2).reshape(batch, kv_heads, groups * query.shape[1])
        per_head = (probs * weights[..., None]).view(batch, kv_heads, groups, -1, length).sum(3)
        return per_head.amax(dim=(1, 2))

    def predict_rho(
        self, query: torch.Tensor, query_mask: torch.Tensor, scores: torch.Tensor, video_mask: torch.Tensor
    ) -> torch.Tensor:
        """ρ `[V]` from [mean question embedding, log M, max r, entropy of p = r / Σr]."""
        query_mean = (query * query_mask[..., None]).sum(1) / query_mask.sum(1, keepdim=True)
        num_tokens = video_mask.sum(-1).float()
        p = scores / scores.sum(-1, keepdim=True).clamp_min(1e-12)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
        stats = torch.stack([num_tokens.log(), scores.amax(-1), entropy], dim=-1)
        return self.budget(torch.cat([query_mean.float(), stats], dim=-1).to(query.dtype)).to(query.device)

    def reencode(self, kept: torch.Tensor, kept_mask: torch.Tensor | None, seconds: torch.Tensor) -> torch.Tensor:
        """Kept tokens `[V, N, D]`, bool `kept_mask [V, N]` (None: no padding), timestamps `seconds [V, N]` ->
        `[V, N, D]`."""
        time_embeds = self.time_embedding(seconds) if self.time_embedding is not None else None
        for layer in self.reencode_layers:
            kept = layer(kept, kept_mask, time_embeds)
        return kept

    def forward(
        self,
        video: torch.Tensor,
        video_mask: torch.Tensor,
        query: torch.Tensor,
        query_mask: torch.Tensor,
        seconds: torch.Tensor,
        keep_ratio: float | None = None,
        selection_scores: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Select and re-encode, batched over videos padded to a common length.

        Args:
            video `[V, M, D]`, video_mask bool `[V, M]`, query `[V, L, D]` (the question of each video's sample),
            query_mask bool `[V, L]`, seconds `[V, M]` (timestamp of every video token), keep_ratio: None for the
            predicted budget, else a fixed ratio in (0, 1] (n_max does not apply then), selection_scores `[V, M]`:
            rank the tokens by these instead of r when choosing the top-n (query-agnostic baselines); r still
            feeds the budget and the relevance embedding.
        Returns:
            keep bool `[V, M]`; kept tokens re-encoded, flattened in video order `[Σn, D]`; ρ `[V]` (with graph);
            scores `[V, M]`.

        Devices: all inputs on one device, where keep, ρ and scores are returned; sub-modules that a `device_map`
        puts elsewhere are called as modules (their hooks move the inputs) and their results are moved back, except
        the kept tokens, returned from the last re-encode layer's device for the caller to move to its embeddings.
        """
        scores = self.score(video, video_mask, query, query_mask)
        num_tokens = video_mask.sum(-1)
        if keep_ratio is None:
            rho = self.predict_rho(query, query_mask, scores, video_mask)
            counts = budget_to_token_count(rho, num_tokens, self.config.qtsplus_max_tokens)
        else:
            rho = torch.full_like(num_tokens, keep_ratio, dtype=torch.float32)
            counts = budget_to_token_count(rho, num_tokens, None)
        keep = top_n_mask(scores if selection_scores is None else selection_scores, counts, video_mask)

        kept_features = video
        if self.training:
            # Straight-through gate: forward value exactly 1 on kept tokens, gradient of σ((r − t)/τ) backwards,
            # so the LM loss reaches the scoring layers (through r) and the budget head (through t(ρ)).
            tau = self.config.qtsplus_tau
            cap = self.config.qtsplus_max_tokens if keep_ratio is None else None
            threshold = soft_threshold(scores, rho, video_mask, tau, max_tokens=cap)
            soft = torch.sigmoid((scores - threshold[:, None]) / tau)
            gate = keep.to(soft.dtype) + (soft - soft.detach())
            explored = self.explored_tokens(keep, video_mask)
            if explored is not None:
                # Far below the threshold σ' vanishes, so an explored token gets the gate's steepest slope, 1 / 4τ:
                # if the LM's loss falls with it, its score rises.
                explore_gate = 1.0 + (scores - scores.detach()) / (4 * tau)
                gate = torch.where(explored, explore_gate, gate)
                keep = keep | explored
                counts = keep.sum(-1)
            kept_features = video * gate[..., None].to(video.dtype)

        # Pack each video's kept tokens to the front of a [V, N] grid, in their original order. When every video
        # keeps N (one video, the usual case) the grid has no padding: it is the kept tokens in video order as they
        # are, and the re-encoder gets no mask (None), so SDPA can use a kernel that takes none.
        packed_shape = (video.shape[0], int(counts.max()))
        if bool((counts == packed_shape[1]).all()):
            packed = kept_features[keep].view(*packed_shape, video.shape[-1])
            packed_seconds = seconds[keep].view(packed_shape)
            packed_scores = scores[keep].view(packed_shape) if self.relevance_embedding is not None else None
            packed_mask = None
        else:
            slot = keep.long().cumsum(-1) - 1
            rows = torch.arange(video.shape[0], device=video.device)[:, None].expand_as(keep)[keep]
            packed = video.new_zeros(*packed_shape, video.shape[-1])
            packed[rows, slot[keep]] = kept_features[keep]
            packed_seconds = seconds.new_zeros(packed_shape)
            packed_seconds[rows, slot[keep]] = seconds[keep]
            packed_mask = torch.arange(packed_shape[1], device=video.device)[None, :] < counts[:, None]
            if self.relevance_embedding is not None:
                packed_scores = scores.new_zeros(packed_shape)
                packed_scores[rows, slot[keep]] = scores[keep]
        if self.relevance_embedding is not None:
            packed = packed + self.relevance_embedding(packed_scores, num_tokens).to(packed.device, packed.dtype)
        if len(self.reencode_layers) > 0:
            packed = self.reencode(packed, packed_mask, packed_seconds)
        # The last re-encode layer's device (device_map); the caller moves the tokens to its embeddings.
        if packed_mask is None:
            return keep, packed.flatten(0, 1), rho, scores
        return keep, packed[packed_mask.to(packed.device)], rho, scores

    def explored_tokens(self, keep: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor | None:
        """Bool `[V, M]`: `qtsplus_explore_ratio` of each video's dropped tokens, drawn uniformly (None when off).

        Without them a token the selector drops never reaches the LM, so no loss can tell that it mattered (the
        released code's Gumbel gate explores in the same spirit).
        """
        ratio = self.config.qtsplus_explore_ratio
        if ratio <= 0:
            return None
        dropped = video_mask & ~keep
        extra = torch.round(dropped.sum(-1).double() * ratio).long()
        return top_n_mask(torch.rand(keep.shape, device=keep.device), extra, dropped)

    def smoothness_loss(self, rho: torch.Tensor) -> torch.Tensor:
        """(ρ − running mean of ρ over training)², averaged over videos; the running mean updates in training."""
        if self.training:
            with torch.no_grad():
                self.rho_sum += rho.detach().double().sum().to(self.rho_sum.device)
                self.rho_count += rho.numel()
        if self.rho_count == 0:
            return (rho - rho.detach().mean()).pow(2).mean()
        return (rho - (self.rho_sum / self.rho_count).to(rho.device, rho.dtype)).pow(2).mean()


# ----------------------------------------------------------------------------------------------------------------------
# 5b. Training signals that teach the selector which tokens the question needs
# ----------------------------------------------------------------------------------------------------------------------


def relevance_distribution(scores: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
    """log p `[V, M]`, p = r / Σr over each video's tokens (float32; -inf past a video's end)."""
    scores = scores.float().clamp_min(1e-12).masked_fill(~video_mask, 0.0)
    return (scores.log() - scores.sum(-1, keepdim=True).log()).masked_fill(~video_mask, float("-inf"))


def grounding_loss(scores: torch.Tensor, video_mask: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor | None:
    """Listwise cross-entropy `-mean_{j in E} log(r_j / Σ_k r_k)`, averaged over the videos with evidence E.

    A ranking loss rather than a BCE on r: only the order of the scores decides what top-n keeps, and a video's
    evidence is a handful of its M tokens. `scores`, bool `video_mask` and bool `evidence`: `[V, M]`.
    """
    evidence = evidence & video_mask
    counts = evidence.sum(-1)
    if not bool((counts > 0).any()):
        return None
    log_p = relevance_distribution(scores, video_mask).masked_fill(~evidence, 0.0)
    per_video = -log_p.sum(-1) / counts.clamp_min(1)
    return per_video[counts > 0].mean()


def distillation_loss(scores: torch.Tensor, video_mask: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor | None:
    """KL(a || r / Σr), averaged over videos; `teacher` a `[V, M]` distribution per video (rows of zeros: skipped)."""
    has_target = teacher.sum(-1) > 0
    if not bool(has_target.any()):
        return None
    log_p = relevance_distribution(scores, video_mask)
    log_teacher = teacher.clamp_min(1e-12).log()
    per_video = (teacher * (log_teacher - log_p.masked_fill(~video_mask, 0.0))).masked_fill(~video_mask, 0.0).sum(-1)
    return per_video[has_target].mean()


class ReaderAttentionRecorder:
    """Records, during one no-gradient LM pass, the attention that the reader rows pay to every key.

    The LM runs with the `"qtsplus_reader_sdpa"` attention function: the stock SDPA for its output, plus, for the
    reader rows only (`rows [B, R]`, -1 = none), their causal softmax over the keys, averaged over heads and rows and
    summed over layers into `attention [B, S]`. R is the question and answer length, so this costs `[B, H, R, S]`
    per layer, where eager attention (`output_attentions=True`) would materialise `[B, H, S, S]`.
    """

    def __init__(self, rows: torch.Tensor, key_mask: torch.Tensor) -> None:
        self.rows, self.key_mask = rows, key_mask.bool()
        self.attention = torch.zeros(key_mask.shape, dtype=torch.float32, device=key_mask.device)

    def record(self, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> None:
        """`query [B, H, S, d]`, `key [B, H_kv, S, d]` (after the rotary embedding)."""
        batch, heads, _, head_dim = query.shape
        # Each decoder layer may sit on its own device (device_map): compute there, sum on the recorder's device.
        valid_rows = self.rows.to(query.device) >= 0
        rows = self.rows.to(query.device).clamp_min(0)
        picked = query.gather(2, rows[:, None, :, None].expand(batch, heads, -1, head_dim)).float()
        keys = key.float().repeat_interleave(heads // key.shape[1], dim=1)
        logits = torch.matmul(picked, keys.transpose(-1, -2)) * (scaling or head_dim**-0.5)
        positions = torch.arange(key.shape[2], device=key.device)
        key_mask = self.key_mask.to(key.device)
        allowed = key_mask[:, None, :] & (positions[None, None, :] <= rows[:, :, None])  # [B, R, S]
        probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).nan_to_num(0.0).mean(1)
        probs = probs * valid_rows[..., None]
        self.attention += (probs.sum(1) / valid_rows.sum(-1, keepdim=True).clamp_min(1)).to(self.attention.device)


def _reader_sdpa_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """SDPA attention that also feeds the module's `ReaderAttentionRecorder`, when one is attached."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    recorder = getattr(module, "qtsplus_reader_recorder", None)
    if recorder is not None:
        recorder.record(query, key, kwargs.get("scaling"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("qtsplus_reader_sdpa", _reader_sdpa_attention)




# ----------------------------------------------------------------------------------------------------------------------
# 6. Finding the question
# ----------------------------------------------------------------------------------------------------------------------


# The answer-format line of multiple-choice prompts (the common Qwen-VL evaluation wording). It says nothing about
# which moments matter, so it is not part of the question the selector scores by.
MULTIPLE_CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def chat_turn_settings(tokenizer) -> dict:
    """The config fields with which a model finds the user turns in `tokenizer`'s chat format when it gets no
    `qtsplus_query_mask`: `qtsplus_user_turn_ids` (the ids of `<|im_start|>user\\n`) and `qtsplus_turn_end_id`."""
    return {
        "qtsplus_user_turn_ids": tokenizer.encode("<|im_start|>user\n", add_special_tokens=False),
        "qtsplus_turn_end_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
    }


def inside_vision_spans(input_ids: torch.Tensor, vision_start_id: int, vision_end_id: int) -> torch.Tensor:
    """Bool `[B, S]`: the token lies within a `<|vision_start|>` ... `<|vision_end|>` span, markers included.

    Spans nest: Qwen3-VL writes each temporal patch's timestamp text (`<1.0 seconds>`) inside the video's outer span,
    before the patch's own span. Those timestamps are text tokens, but they are the video's, not the question's.
    """
    starts = (input_ids == vision_start_id).long().cumsum(-1)
    is_end = input_ids == vision_end_id
    ends = is_end.long().cumsum(-1)
    # A span that never closes (a truncated prompt) does not swallow the text after it.
    closed_later = is_end.flip(-1).cumsum(-1).flip(-1) > 0
    return ((starts - ends > 0) & closed_later) | is_end


class QTSplusProcessorMixin:
    r"""
    Makes a Qwen-family vision-language processor add `qtsplus_query_mask` (bool `[batch, seq]`) to its outputs: the
    text content of the user messages, the question QTSplus scores the video by. The system prompt, role markers,
    vision spans (with any timestamp text inside them), the multiple-choice answer-format line
    (`MULTIPLE_CHOICE_INSTRUCTION`) and anything in an assistant turn are not part of it. Text without chat markers
    counts as one user message. Subclass `(QTSplusProcessorMixin, StockProcessor)`.

    `apply_chat_template(..., tokenize=True, return_dict=True)` calls the processor, so it carries the mask too.
    """

    def __call__(self, *args, **kwargs) -> BatchFeature:
        outputs = super().__call__(*args, **kwargs)
        if "input_ids" not in outputs:  # media only (vLLM calls it so): no text, no question
            return outputs
        input_ids = outputs["input_ids"]
        if isinstance(input_ids, torch.Tensor):
            mask = self.question_token_mask(input_ids.reshape(-1, input_ids.shape[-1])).reshape(input_ids.shape)
            if "attention_mask" in outputs:
                mask &= outputs["attention_mask"].bool()
        else:  # python lists, possibly ragged (no padding) or a single unbatched row
            rows = input_ids if input_ids and isinstance(input_ids[0], list) else [input_ids]
            mask = [self.question_token_mask(torch.tensor([row]))[0].tolist() for row in rows]
            mask = mask if rows is input_ids else mask[0]
        outputs["qtsplus_query_mask"] = mask
        return outputs

    def question_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool `[batch, seq]` from `input_ids [batch, seq]`: the tokens of user-message text (no vision spans)."""
        tokenizer = self.tokenizer
        im_start, im_end, vision_start, vision_end = tokenizer.convert_tokens_to_ids(
            ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
        )
        vision_ids = torch.tensor(tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"]))
        special_ids = torch.tensor(tokenizer.all_special_ids + [im_start, im_end])
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for row, ids in enumerate(input_ids):
            starts = (ids == im_start).nonzero().flatten().tolist()
            if not starts:  # plain text: all of it is the question
                mask[row] = ~torch.isin(ids, special_ids)
                continue
            for start in starts:
                role, content_start = self._role_header(ids, start)
                if role != "user":
                    continue
                ends = (ids[content_start:] == im_end).nonzero()
                content_end = content_start + int(ends[0]) if len(ends) else len(ids)
                mask[row, content_start:content_end] = True
        in_vision = inside_vision_spans(input_ids, vision_start, vision_end) | torch.isin(input_ids, vision_ids)
        return mask & ~in_vision & ~self._instruction_tokens(input_ids)

    def chat_turn_settings(self) -> dict:
        """`chat_turn_settings(self.tokenizer)`."""
        return chat_turn_settings(self.tokenizer)

    def _instruction_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool `[batch, seq]`: where `MULTIPLE_CHOICE_INSTRUCTION` occurs as a token sequence."""
        found = torch.zeros_like(input_ids, dtype=torch.bool)
        pattern = torch.tensor(self.tokenizer.encode(MULTIPLE_CHOICE_INSTRUCTION, add_special_tokens=False))
        if len(pattern) > input_ids.shape[1]:
            return found
        windows = input_ids.unfold(1, len(pattern), 1)  # [batch, seq - P + 1, P]
        for row, start in (windows == pattern.to(input_ids.device)).all(-1).nonzero().tolist():
            found[row, start : start + len(pattern)] = True
        return found

    def _role_header(self, ids: torch.Tensor, start: int) -> tuple[str, int]:
        """The role after `<|im_start|>` at `start` (it ends at the first newline) and where the content begins."""
        header = ""
        for position in range(start + 1, min(start + 9, len(ids))):
            header += self.tokenizer.decode(ids[position : position + 1])
            if "\n" in header:
                return header.split("\n")[0].strip(), position + 1
        return header.strip(), min(start + 9, len(ids))

    @property
    def model_input_names(self) -> list[str]:
        return super().model_input_names + ["qtsplus_query_mask"]


def question_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None, query_mask: torch.Tensor | None,
    config,
) -> torch.Tensor:
    """Bool `[B, S]`, never a label: the caller's `query_mask`, else the text of the user turns (`user_turn_text`),
    else (a row without a user turn) every attended token outside the vision spans. `config`: a QTSplus config."""
    if query_mask is not None:
        if query_mask.shape != input_ids.shape:
            raise ValueError(
                f"qtsplus_query_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(query_mask.shape)}"
            )
        question = query_mask.bool() & attention_mask.bool()
    else:
        vision = inside_vision_spans(input_ids, config.vision_start_token_id, config.vision_end_token_id)
        vision |= torch.isin(input_ids, torch.tensor([config.image_token_id, config.video_token_id],
                                                     device=input_ids.device))
        question = attention_mask.bool() & ~vision
        user_text, has_user_turn = user_turn_text(input_ids, config.qtsplus_user_turn_ids, config.qtsplus_turn_end_id)
        question = torch.where(has_user_turn[:, None], question & user_text, question)
    if labels is not None:  # the answer must never steer the selection
        question = question & (labels == IGNORE_INDEX)
    has_video = (input_ids == config.video_token_id).any(-1)
    empty = (has_video & ~question.any(-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"the question is empty in batch row(s) {empty}: qtsplus_query_mask (or, without it, the attended "
            "non-vision, non-label tokens) must mark at least one token in every sample with a video"
        )
    return question


def user_turn_text(input_ids: torch.Tensor, header_ids: list[int], end_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool `[B, S]` True from after each `header_ids` sequence up to the next `end_id` (the user turns' content in
    the chat format), and bool `[B]`: the row has one.

    The question the released selector was trained on: without it, the system prompt and the role markers of
    every turn would vote in the scoring and feed the budget head's mean question embedding.
    """
    header = torch.tensor(header_ids, device=input_ids.device)
    batch, length = input_ids.shape
    content_starts = torch.zeros_like(input_ids, dtype=torch.bool)
    if length > len(header):
        header_at = (input_ids.unfold(1, len(header), 1) == header).all(-1)  # [B, S - H + 1]: a header starts
        content_starts[:, len(header):] = header_at[:, : length - len(header)]
    positions = torch.arange(length, device=input_ids.device).expand(batch, length)
    none = torch.full_like(positions, -1)
    last_start = torch.where(content_starts, positions, none).cummax(-1).values
    last_end = torch.where(input_ids == end_id, positions, none).cummax(-1).values
    return last_start > last_end, content_starts.any(-1)


# ----------------------------------------------------------------------------------------------------------------------
# 7. Around the selector: what every backbone's model shares
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class QTSplusSelection:
    """What the selector kept, one entry per video in the order the videos appear in the batch.

    Attributes:
        kept_indices: `list[LongTensor [n_v]]`, ascending indices into that video's M_v tokens.
        num_tokens: `list[int]`, M_v, the video's token count before selection.
        rho: `Tensor [num_videos]`, the retention ratio used (predicted, or the caller's `qtsplus_keep_ratio`).
        scores: `list[Tensor [M_v]]`, relevance r in [0, 1] of every token of the video.
        timestamps: `list[Tensor [n_v]]`, time in seconds of the temporal patch of each kept token.
    """

    kept_indices: list[torch.Tensor]
    num_tokens: list[int]
    rho: torch.Tensor
    scores: list[torch.Tensor]
    timestamps: list[torch.Tensor]

    @property
    def num_kept(self) -> list[int]:
        return [int(indices.numel()) for indices in self.kept_indices]


@dataclass
class QTSplusCausalLMOutputWithPast(_StockCausalLMOutput):
    """The stock multimodal causal LM output plus the selection and the loss terms.

    `loss` = `lm_loss` + λ_flops·`flops_loss` + λ_kv·`kv_loss` + λ_smooth·`smooth_loss` (+ λ_grounding·
    `grounding_loss` and λ_distill·`distill_loss` when those signals are on; unweighted terms here).
    `logits` cover the compacted sequence (text + kept video tokens) when QTSplus ran.
    """

    qtsplus: QTSplusSelection | None = None
    lm_loss: torch.Tensor | None = None
    flops_loss: torch.Tensor | None = None
    kv_loss: torch.Tensor | None = None
    smooth_loss: torch.Tensor | None = None
    grounding_loss: torch.Tensor | None = None
    distill_loss: torch.Tensor | None = None


@dataclass
class QTSplusInputs:
    """The compacted prefill the language model runs on (see `QTSplusModelMixin.prepare_qtsplus_inputs`).

    Attributes:
        input_ids: `[batch, S']`, the ids of the kept tokens (for logits processors such as repetition penalty).
        inputs_embeds: `[batch, S', D]`, text embeddings and re-encoded kept video tokens.
        attention_mask: `[batch, S']`.
        position_ids: `[4, batch, S']`, a text row (for mask construction, as `generate` builds it) then the
            temporal / height / width MRoPE rows; kept tokens keep their original positions (position mode
            `"sequential"`: every row is 0, 1, 2, ... over the attended tokens).
        labels: `[batch, S']` or None.
        rope_deltas: `[batch, 1]`, next MRoPE position minus the number of attended prefill tokens.
        selection: the per-video selection.
        rho_for_losses: `[num_videos]`, ρ with its graph (for the auxiliary losses).
        scores_for_losses: `[V, M]`, relevance r with its graph, zero past each video's end (`video_mask [V, M]`).
        evidence: bool `[V, M]`, the caller's evidence tokens (`qtsplus_evidence_mask`), or None.
        teacher: `[V, M]`, the LM's attention over every video token, a distribution per video (None unless asked).
        language_model_extras: further keyword inputs of the language model for this prefill, compacted like the
            sequence (Qwen3-VL: `visual_pos_masks` and `deepstack_visual_embeds`), or None.
    """

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    rope_deltas: torch.Tensor
    selection: QTSplusSelection
    rho_for_losses: torch.Tensor
    scores_for_losses: torch.Tensor
    video_mask: torch.Tensor
    evidence: torch.Tensor | None = None
    teacher: torch.Tensor | None = None
    language_model_extras: dict | None = None


def compact_rows(
    tensor: torch.Tensor, keep: torch.Tensor, destination: torch.Tensor, length: int, pad_value: float | int
) -> torch.Tensor:
    """Move the kept entries of `tensor [B, S, ...]` to `destination [B, S]` in a new `[B, length, ...]` tensor."""
    rows = torch.arange(tensor.shape[0], device=tensor.device)[:, None].expand_as(keep)[keep]
    out = tensor.new_full((tensor.shape[0], length, *tensor.shape[2:]), pad_value)
    out[rows, destination[keep]] = tensor[keep]
    return out


class QTSplusModelMixin:
    """The selector inside a vision-language model: `class QTSplusX(QTSplusModelMixin, StockX)`.

    The backbone's class sets `config_class`, `stock_class`, `backbone_name`, `timing_inputs` and
    `_no_split_modules`, and implements the hooks:
    `visual_features` (its encoder's outputs as streams), `video_token_seconds` (when each video token was
    recorded), `stock_positions` (its rotary positions of the full prompt) and, for extra visual inputs of its
    language model, `compacted_language_model_extras` / `full_language_model_extras`; its `forward` and `generate`
    name its own inputs and call `qtsplus_forward` / `qtsplus_generate`.
    """

    stock_class: ClassVar[type]
    backbone_name: ClassVar[str]  # how the model card and reports name the backbone ("Qwen2.5-VL")
    # The backbone's per-video time inputs (processor outputs) that the hooks take as keyword arguments; those named
    # `qtsplus_*` are this project's, which the stock model never gets.
    timing_inputs: ClassVar[tuple[str, ...]] = ()
    _auto_class_names = ("AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText")
    # The loss adds per-batch means (the auxiliary terms) to the LM loss, so the Trainer must average micro-batches
    # itself under gradient accumulation instead of handing `num_items_in_batch` to the LM loss alone.
    accepts_loss_kwargs = False

    def __init__(self, config) -> None:
        super().__init__(config)
        self.qtsplus = QTSplusSelector(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if getattr(module, "unit_norm_init", False):  # the relevance embedding's direction
            initialization.normal_(module.weight, std=module.weight.shape[0] ** -0.5)
        # Re-encoder residual outputs start at zero: a fresh re-encoder is the identity.
        if getattr(module, "zero_init", False):
            initialization.zeros_(module.weight)
            if module.bias is not None:
                initialization.zeros_(module.bias)
        if isinstance(module, QTSplusSelector):
            # Non-persistent buffers come from no checkpoint: without this, from_pretrained leaves them as
            # uninitialised memory, and the smoothness loss starts from garbage (even NaN).
            initialization.zeros_(module.rho_sum)
            initialization.zeros_(module.rho_count)

    # -- backbone hooks --------------------------------------------------------------------------------------------

    def visual_features(self, pixel_values: torch.Tensor, grid_thw: torch.LongTensor, modality: str) -> list[list]:
        """The encoder's features of `pixel_values` (`modality` "image" or "video") as streams, each a list over the
        items (`[N_i, D]` tensors): stream 0 the LM's visual tokens, the rest extra per-token inputs (DeepStack)."""
        raise NotImplementedError

    def video_token_seconds(self, video_grid_thw: torch.LongTensor, device: torch.device, **timing) -> torch.Tensor:
        """Time in seconds of the temporal patch of every LM video token, `[V, max M_v]` (0 past a video's end)."""
        raise NotImplementedError

    def stock_positions(
        self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
        video_grid_thw: torch.Tensor, attention_mask: torch.Tensor, **timing,
    ) -> torch.Tensor:
        """The stock model's MRoPE positions `[3, B, S]` of the full prompt."""
        raise NotImplementedError

    def compacted_language_model_extras(
        self, keep: torch.Tensor, video_mask: torch.Tensor, image_streams: list[list] | None,
        video_streams: list[list], kept_ids: torch.Tensor, attention_mask: torch.Tensor,
    ) -> dict | None:
        """Extra keyword inputs of the language model for the compacted prefill (None: the backbone has none).

        `keep`, `video_mask`: bool `[V, max M_v]`, the kept and the real tokens of each video; `kept_ids`,
        `attention_mask`: `[B, S']`, the compacted sequence."""
        return None

    def full_language_model_extras(
        self, input_ids: torch.Tensor, image_streams: list[list] | None, video_streams: list[list]
    ) -> dict:
        """Extra keyword inputs of the language model for the full prompt (the distillation teacher's pass)."""
        return {}

    # -- inputs ----------------------------------------------------------------------------------------------------

    def _check_keep_ratio(self, keep_ratio: float | None) -> None:
        if keep_ratio is None:
            return
        if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"qtsplus_keep_ratio must be None or a number in (0, 1], got {keep_ratio!r}")

    def _check_chunk_frames(self, chunk_frames: int | None) -> None:
        if chunk_frames is None:
            return
        temporal_patch_size = self.config.vision_config.temporal_patch_size
        if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 0 or (
            chunk_frames % temporal_patch_size
        ):
            raise ValueError(
                "qtsplus_vision_chunk_frames must be None or an integer >= 0 that is a multiple of the temporal patch "
                f"size ({temporal_patch_size}), got {chunk_frames!r}"
            )

    def _video_owner(self, video_positions: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        """Batch row of each video `[V]`, checking that no video's placeholders straddle two rows.

        `video_positions [B, S]` marks the placeholders; videos fill them in row-major order, like `masked_scatter`.
        """
        row_ends = video_positions.sum(-1).cumsum(0)
        video_ends = num_tokens.cumsum(0)
        owner = torch.searchsorted(row_ends, video_ends - num_tokens, right=True)
        last_owner = torch.searchsorted(row_ends, video_ends - 1, right=True)
        if not torch.equal(owner, last_owner):
            raise ValueError("the video placeholder tokens of one video are split across batch rows")
        return owner

    def encode_video_streams(
        self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.LongTensor, chunk_frames: int | None = None
    ) -> list[list[torch.Tensor]]:
        """`visual_features` of the videos, encoded `chunk_frames` frames at a time (0: whole videos; None:
        `config.qtsplus_vision_chunk_frames`): streams, each a list of `[M_v, D]` per video.

        The supported encoders never attend across temporal patches (Qwen2.5-VL: window attention within a frame
        patch and full attention within one temporal patch; Qwen3-VL: full attention within one temporal patch, with
        position embeddings that depend only on the frame size), so chunks of whole temporal patches give the same
        features while bounding the encoder's activation memory.
        """
        self._check_chunk_frames(chunk_frames)
        if chunk_frames is None:
            chunk_frames = self.config.qtsplus_vision_chunk_frames
        chunk = chunk_frames // self.config.vision_config.temporal_patch_size
        if chunk == 0:
            return self.visual_features(pixel_values_videos, video_grid_thw, "video")
        merge = self.config.vision_config.spatial_merge_size**2
        streams, offset = None, 0
        for grid_t, grid_h, grid_w in video_grid_thw.tolist():
            videos, written = None, 0
            for start in range(0, grid_t, chunk):  # a loop over chunks of frames, not tokens
                grid = torch.tensor([[min(chunk, grid_t - start), grid_h, grid_w]], device=video_grid_thw.device)
                rows = int(grid.prod())
                pieces = [stream[0] for stream in
                          self.visual_features(pixel_values_videos[offset : offset + rows], grid, "video")]
                if videos is None:  # filled chunk by chunk: concatenating at the end would hold the features twice
                    videos = [piece.new_empty(grid_t * grid_h * grid_w // merge, piece.shape[-1]) for piece in pieces]
                for video, piece in zip(videos, pieces):
                    video[written : written + len(piece)] = piece
                offset, written = offset + rows, written + len(pieces[0])
            streams = [[] for _ in videos] if streams is None else streams
            for stream, video in zip(streams, videos):
                stream.append(video)
        return streams

    def encode_videos(
        self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.LongTensor, chunk_frames: int | None = None
    ) -> list[torch.Tensor]:
        """The LM's visual tokens `[M_v, D]` per video (stream 0 of `encode_video_streams`)."""
        return self.encode_video_streams(pixel_values_videos, video_grid_thw, chunk_frames)[0]

    def prepare_qtsplus_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values_videos: torch.Tensor,
        video_grid_thw: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        qtsplus_query_mask: torch.Tensor | None = None,
        qtsplus_keep_ratio: float | None = None,
        qtsplus_vision_chunk_frames: int | None = None,
        qtsplus_evidence_mask: torch.Tensor | None = None,
        qtsplus_selection_scores: list[torch.Tensor] | None = None,
        with_teacher: bool = False,
        **timing,
    ) -> QTSplusInputs:
        """Run the vision encoder and the selector once and build the compacted prefill (see `QTSplusInputs`).

        Unselected `<|video_pad|>` positions are removed from the embeddings, mask, labels and positions; the rows
        are re-padded to the longest one on the side the batch was padded on (left unless a row ends in padding).
        `timing`: the backbone's time inputs (`timing_inputs`, e.g. Qwen2.5-VL's `second_per_grid_ts`).
        `qtsplus_evidence_mask` (bool `[B, S]`, True at evidence video tokens) feeds the grounding loss;
        `with_teacher` runs the LM once more on every token, without gradient, for the distillation target.
        `qtsplus_selection_scores` (one `[M_v]` tensor per video) ranks the tokens instead of the selector's relevance
        when the top-n is chosen: a query-agnostic baseline (e.g. EVS-style temporal change) run through the same
        model at the same budget.
        """
        unknown = sorted(set(timing) - set(self.timing_inputs))
        if unknown:
            raise TypeError(f"prepare_qtsplus_inputs() got unexpected keyword arguments {unknown}")
        self._check_keep_ratio(qtsplus_keep_ratio)
        if input_ids is None:
            raise ValueError("QTSplus needs input_ids to find the question and the video placeholders")
        if video_grid_thw is None:
            raise ValueError("video_grid_thw is required with pixel_values_videos")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if mm_token_type_ids is None:
            mm_token_type_ids = (input_ids == self.config.image_token_id).int() + 2 * (
                input_ids == self.config.video_token_id
            ).int()
        question = question_mask(input_ids, attention_mask, labels, qtsplus_query_mask, self.config)
        # Before any encoder runs: it checks the time inputs against the grids (a wrong length is a user error).
        seconds = self.video_token_seconds(video_grid_thw, input_ids.device, **timing)
        image_streams = image_embeds = None
        if pixel_values is not None:
            image_streams = self.visual_features(pixel_values, image_grid_thw, "image")
            image_embeds = torch.cat(image_streams[0])

        video_positions = input_ids == self.config.video_token_id
        video_streams = self.encode_video_streams(pixel_values_videos, video_grid_thw, qtsplus_vision_chunk_frames)
        video_embeds = video_streams[0]
        num_tokens = torch.tensor([len(v) for v in video_embeds], device=input_ids.device)
        if int(video_positions.sum()) != int(num_tokens.sum()):
            raise ValueError(
                f"video placeholder tokens ({int(video_positions.sum())}) do not match the video features "
                f"({int(num_tokens.sum())} from video_grid_thw); the prompt and the videos disagree"
            )
        owner = self._video_owner(video_positions, num_tokens)

        # Question of each video's sample, padded: [V, L, D] and [V, L]. Only the question (here) and the compacted
        # sequence (below) are embedded: a [B, S, D] embedding of every placeholder is as large as the video features.
        question_embeds = self._question_embeddings(input_ids, question, image_embeds)
        question_lengths = question.sum(-1)
        query_slots = torch.arange(int(question_lengths.max()), device=input_ids.device)
        query_mask = query_slots[None, :] < question_lengths[:, None]
        query = question_embeds.new_zeros(*query_mask.shape, question_embeds.shape[-1])
        query[query_mask.to(query.device)] = question_embeds
        # One video (the usual case) is used as it is: padding would copy all M_v x D features.
        video = video_embeds[0][None] if len(video_embeds) == 1 else nn.utils.rnn.pad_sequence(video_embeds, True)
        video = video.to(question_embeds.dtype)
        # Devices (device_map): the selector's inputs and results live on the video features' device, the sequence
        # bookkeeping (counts, masks, ids, positions) on input_ids', the compacted embeddings on the embedding layer's.
        video_mask = torch.arange(video.shape[1], device=video.device)[None, :] < num_tokens.to(video.device)[:, None]
        seconds = seconds.to(video.device)
        selection_scores = None
        if qtsplus_selection_scores is not None:
            if [len(v) for v in qtsplus_selection_scores] != num_tokens.tolist():
                raise ValueError(f"qtsplus_selection_scores must hold one score per video token, "
                                 f"{num_tokens.tolist()} per video; got {[len(v) for v in qtsplus_selection_scores]}")
            selection_scores = nn.utils.rnn.pad_sequence(
                [v.to(video.device, torch.float32) for v in qtsplus_selection_scores], batch_first=True
            )
        keep, kept_tokens, rho, scores = self.qtsplus(
            video, video_mask, query[owner.to(query.device)].to(video.device), query_mask[owner].to(video.device),
            seconds, qtsplus_keep_ratio, selection_scores,
        )
        keep, rho, scores = keep.to(video.device), rho.to(video.device), scores.to(video.device)

        # Drop the unselected placeholders (and the old padding: the shortened rows are padded afresh), then embed
        # the compacted ids and place the image features and the re-encoded kept tokens.
        sequence_keep = attention_mask != 0
        sequence_keep[video_positions] = keep[video_mask].to(sequence_keep.device)
        new_lengths = sequence_keep.sum(-1)
        length = int(new_lengths.max())
        right_padded = bool((attention_mask[:, -1] == 0).any())
        destination = sequence_keep.long().cumsum(-1) - 1
        if not right_padded:
            destination = destination + (length - new_lengths)[:, None]
        compact = partial(compact_rows, keep=sequence_keep, destination=destination, length=length)
        new_attention_mask = compact(attention_mask, pad_value=0)
        text_positions = (new_attention_mask.long().cumsum(-1) - 1).masked_fill(new_attention_mask == 0, 0)
        position_ids = None
        if self.config.qtsplus_position_mode == "sequential":
            # The released checkpoints' LM saw the spliced sequence as plain text: 0, 1, 2, ... on every rotary
            # axis, so decoding continues at the attended length (rope_deltas 0).
            mrope_positions = text_positions[None].expand(3, -1, -1)
            rope_deltas = torch.zeros_like(new_lengths)[:, None]
        else:
            position_ids = self.stock_positions(
                input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask, **timing
            )
            mrope_positions = compact(position_ids.permute(1, 2, 0), pad_value=0).permute(2, 0, 1)
            # Decoding continues after the largest stock position, which a dropped video token may have held.
            next_position = position_ids.masked_fill(attention_mask[None] == 0, 0).amax(dim=(0, 2)) + 1
            rope_deltas = (next_position - new_attention_mask.sum(-1))[:, None]

        kept_ids = compact(input_ids, pad_value=self.config.text_config.pad_token_id or 0)
        inputs_embeds = self._compacted_embeddings(kept_ids, new_attention_mask, image_embeds, kept_tokens)
        extras = self.compacted_language_model_extras(
            keep, video_mask, image_streams, video_streams, kept_ids, new_attention_mask
        )

        evidence = teacher = None
        if qtsplus_evidence_mask is not None:
            if qtsplus_evidence_mask.shape != input_ids.shape:
                raise ValueError(f"qtsplus_evidence_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(qtsplus_evidence_mask.shape)}")
            evidence = torch.zeros_like(video_mask)
            on_video = qtsplus_evidence_mask.to(input_ids.device).bool()[video_positions]
            evidence[video_mask] = on_video.to(evidence.device)
        if with_teacher:
            teacher = self.reader_attention_over_video(
                input_ids, attention_mask, labels, question, video_embeds, image_embeds, position_ids, video_mask,
                self.full_language_model_extras(input_ids, image_streams, video_streams),
            )

        kept_per_video = keep.sum(-1).tolist()
        selection = QTSplusSelection(
            kept_indices=list(keep.nonzero()[:, 1].split(kept_per_video)),
            num_tokens=num_tokens.tolist(),
            rho=rho.detach(),
            scores=list(scores[video_mask].detach().split(num_tokens.tolist())),
            timestamps=list(seconds[keep].split(kept_per_video)),
        )
        return QTSplusInputs(
            input_ids=kept_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=new_attention_mask,
            position_ids=torch.cat([text_positions[None], mrope_positions], dim=0),
            labels=None if labels is None else compact(labels, pad_value=IGNORE_INDEX),
            rope_deltas=rope_deltas,
            selection=selection,
            rho_for_losses=rho,
            scores_for_losses=scores,
            video_mask=video_mask,
            evidence=evidence,
            teacher=teacher,
            language_model_extras=extras,
        )

    @torch.no_grad()
    def reader_attention_over_video(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
        question: torch.Tensor, video_embeds: list[torch.Tensor], image_embeds: torch.Tensor | None,
        position_ids: torch.Tensor | None, video_mask: torch.Tensor, extras: dict | None = None,
    ) -> torch.Tensor:
        """The distillation target `[V, M]`: the LM's attention over every raw video token (as the stock model sees
        the prompt), from the question tokens and the positions that predict the answer, averaged over heads, rows
        and layers and normalised per video (a row of zeros where no reader row comes after the video).

        `position_ids` `[3, B, S]`, the stock MRoPE positions (None: plain positions, the `"sequential"` mode);
        `extras`: further language-model inputs of the full prompt (`full_language_model_extras`).
        """
        readers = question.clone()
        if labels is not None:
            readers[:, :-1] |= labels[:, 1:] != IGNORE_INDEX
        else:  # the position that predicts the first new token
            readers[torch.arange(len(readers)), attention_mask.long().cumsum(-1).argmax(-1)] = True
        readers &= attention_mask.bool()
        counts = readers.sum(-1)
        slots = torch.arange(int(counts.max()), device=readers.device)
        rows = torch.full((len(readers), len(slots)), -1, dtype=torch.long, device=readers.device)
        rows[slots[None, :] < counts[:, None]] = readers.nonzero()[:, 1]
        recorder = ReaderAttentionRecorder(rows, attention_mask)

        inputs_embeds = self.get_input_embeddings()(input_ids)
        if image_embeds is not None:
            image_mask, _ = self.model.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds,
                                                            image_features=image_embeds)
            inputs_embeds = inputs_embeds.masked_scatter(
                image_mask, image_embeds.to(inputs_embeds.device, inputs_embeds.dtype)
            )
        video_slots = (input_ids == self.config.video_token_id)[..., None].to(inputs_embeds.device)
        inputs_embeds = inputs_embeds.masked_scatter(
            video_slots, torch.cat(video_embeds).to(inputs_embeds.device, inputs_embeds.dtype)
        )

        language_model = self.model.language_model
        previous = language_model.config._attn_implementation
        attention_layers = [layer.self_attn for layer in language_model.layers]
        language_model.set_attn_implementation("qtsplus_reader_sdpa")
        try:
            for layer in attention_layers:
                layer.qtsplus_reader_recorder = recorder
            language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False, **(extras or {}))
        finally:
            for layer in attention_layers:
                del layer.qtsplus_reader_recorder
            language_model.set_attn_implementation(previous)
        on_video = recorder.attention[input_ids == self.config.video_token_id]
        teacher = torch.zeros(video_mask.shape, dtype=torch.float32, device=video_mask.device)
        teacher[video_mask] = on_video.to(video_mask.device)
        return teacher / teacher.sum(-1, keepdim=True).clamp_min(1e-12)

    def _question_embeddings(
        self, input_ids: torch.Tensor, question: torch.Tensor, image_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        """Embeddings `[Q, D]` of the question tokens, row-major; image features where a question covers an image."""
        question_embeds = self.get_input_embeddings()(input_ids[question])
        if image_embeds is not None:
            image_positions = input_ids == self.config.image_token_id
            image_rank = image_positions.flatten().long().cumsum(0).view_as(input_ids) - 1
            in_question = image_positions[question]
            picked = image_embeds[image_rank[question][in_question].to(image_embeds.device)]
            question_embeds[in_question.to(question_embeds.device)] = picked.to(
                question_embeds.device, question_embeds.dtype
            )
        return question_embeds

    def _compacted_embeddings(
        self, kept_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor | None,
        kept_tokens: torch.Tensor,
    ) -> torch.Tensor:
        """`[B, S', D]`: embeddings of the compacted ids, image features and the kept video tokens in their slots."""
        inputs_embeds = self.get_input_embeddings()(kept_ids)
        if image_embeds is not None:
            image_mask, _ = self.model.get_placeholder_mask(
                kept_ids, inputs_embeds=inputs_embeds, image_features=image_embeds
            )
            inputs_embeds = inputs_embeds.masked_scatter(
                image_mask, image_embeds.to(inputs_embeds.device, inputs_embeds.dtype)
            )
        # As the stock model: features and masks move to the embeddings' device (device_map) before the scatter.
        video_slots = ((kept_ids == self.config.video_token_id) & attention_mask.bool()).to(inputs_embeds.device)
        return inputs_embeds.masked_scatter(
            video_slots[..., None], kept_tokens.to(inputs_embeds.device, inputs_embeds.dtype)
        )

    def _runs_selector(self, pixel_values_videos: torch.Tensor | None) -> bool:
        return bool(self.config.qtsplus_enabled) and pixel_values_videos is not None

    # -- public API ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def select(self, **inputs) -> QTSplusSelection:
        """Run only the vision encoder and the selector on processor outputs; returns the `QTSplusSelection`."""
        if inputs.get("pixel_values_videos") is None:
            raise ValueError("select() needs pixel_values_videos (and video_grid_thw): there is no video to select from")
        return self.prepare_qtsplus_inputs(**inputs).selection

    def auxiliary_losses(self, rho: torch.Tensor, num_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Compute proxies per video, averaged: FLOPs (ρM)²/n_max², KV cache ρM/n_max, smoothness of ρ."""
        kept = rho * num_tokens.to(rho.dtype)
        max_tokens = float(self.config.qtsplus_max_tokens)
        return {
            "flops_loss": (kept / max_tokens).pow(2).mean(),
            "kv_loss": (kept / max_tokens).mean(),
            "smooth_loss": self.qtsplus.smoothness_loss(rho),
        }

    def selection_losses(self, prefill: QTSplusInputs) -> dict[str, torch.Tensor]:
        """The grounding and distillation terms (unweighted) that apply to this batch: the rows have evidence / a
        teacher target, and their weight is positive."""
        losses = {}
        if prefill.evidence is not None and self.config.qtsplus_lambda_grounding > 0:
            value = grounding_loss(prefill.scores_for_losses, prefill.video_mask, prefill.evidence)
            if value is not None:
                losses["grounding_loss"] = value
        if prefill.teacher is not None:
            value = distillation_loss(prefill.scores_for_losses, prefill.video_mask, prefill.teacher)
            if value is not None:
                losses["distill_loss"] = value
        return losses

    def check_forward_inputs(
        self, pixel_values_videos: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
        position_ids: torch.Tensor | None, mm_encoder_outputs: dict | None, keep_ratio: float | None,
        chunk_frames: int | None,
    ) -> None:
        """The errors of `forward`'s inputs that the selector rules out, before any work."""
        self._check_keep_ratio(keep_ratio)
        self._check_chunk_frames(chunk_frames)
        pre_encoded = {key: value for key, value in (mm_encoder_outputs or {}).items() if value is not None}
        if pre_encoded and (self._runs_selector(pixel_values_videos) or (
                self.config.qtsplus_enabled and "video" in pre_encoded)):
            raise ValueError("pre-encoded features (mm_encoder_outputs) cannot pass through the QTSplus selector: "
                             "pass pixel_values / pixel_values_videos, or disable QTSplus (qtsplus_enabled=False)")
        if self._runs_selector(pixel_values_videos) and (inputs_embeds is not None or position_ids is not None):
            raise ValueError("with pixel_values_videos, pass input_ids (not inputs_embeds / position_ids): QTSplus "
                             "builds the embeddings and positions of the compacted sequence itself")

    @contextmanager
    def language_model_extras_applied(self, extras: dict | None, batch_size: int) -> Iterator[None]:
        """Within the block, the stock forward's language model gets `extras` (`QTSplusInputs.language_model_extras`)
        for a batch of `batch_size` rows; a backbone without extra inputs has nothing to apply."""
        yield

    def qtsplus_forward(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        labels: torch.LongTensor | None,
        visual_inputs: dict,
        qtsplus_inputs: dict,
        mm_encoder_outputs: dict | None,
        language_model_extras: dict | None,
        kwargs: dict,
    ) -> QTSplusCausalLMOutputWithPast:
        """The body of every backbone's `forward`: the stock forward when the selector does not run (QTSplus disabled,
        no video; `language_model_extras` then apply to a call with `inputs_embeds`, `generate`'s first step), else the
        stock forward on the compacted prefill of `prepare_qtsplus_inputs`, with the selection and the loss terms.

        `visual_inputs`: the processor's visual tensors and grids, with the backbone's time inputs; `qtsplus_inputs`:
        `qtsplus_query_mask`, `qtsplus_keep_ratio`, `qtsplus_vision_chunk_frames`, `qtsplus_evidence_mask`;
        `kwargs`: the rest of the stock forward's inputs (cache, `logits_to_keep`, ...).
        """
        pixel_values_videos = visual_inputs.get("pixel_values_videos")
        self.check_forward_inputs(pixel_values_videos, inputs_embeds, position_ids, mm_encoder_outputs,
                                  qtsplus_inputs["qtsplus_keep_ratio"], qtsplus_inputs["qtsplus_vision_chunk_frames"])
        return_dict = kwargs.pop("return_dict", None)
        stock_inputs = dict(attention_mask=attention_mask, position_ids=position_ids, labels=labels, return_dict=True,
                            **kwargs)
        if not self._runs_selector(pixel_values_videos):
            stock_visual = {name: value for name, value in visual_inputs.items() if not name.startswith("qtsplus_")}
            if mm_encoder_outputs is not None:
                stock_visual["mm_encoder_outputs"] = mm_encoder_outputs
            extras = language_model_extras if inputs_embeds is not None else None
            with self.language_model_extras_applied(extras, 0 if inputs_embeds is None else len(inputs_embeds)):
                outputs = super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, **stock_visual,
                                          **stock_inputs)
            result = QTSplusCausalLMOutputWithPast(**outputs, lm_loss=outputs.loss)
            return result if return_dict is not False else result.to_tuple()

        prefill = self.prepare_qtsplus_inputs(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, **visual_inputs, **qtsplus_inputs,
            with_teacher=labels is not None and self.training and self.config.qtsplus_lambda_distill > 0,
        )
        stock_inputs.update(
            attention_mask=prefill.attention_mask, position_ids=prefill.position_ids, labels=prefill.labels
        )
        with self.language_model_extras_applied(prefill.language_model_extras, len(prefill.inputs_embeds)):
            outputs = super().forward(inputs_embeds=prefill.inputs_embeds, **stock_inputs)
        self.model.rope_deltas = prefill.rope_deltas
        result = self.with_selection_losses(outputs, prefill, labels)
        return result if return_dict is not False else result.to_tuple()

    def with_selection_losses(
        self, outputs, prefill: QTSplusInputs, labels: torch.Tensor | None
    ) -> QTSplusCausalLMOutputWithPast:
        """The stock model's outputs on the compacted prefill, plus the selection and (with labels) the loss terms."""
        result = QTSplusCausalLMOutputWithPast(**outputs, qtsplus=prefill.selection, lm_loss=outputs.loss)
        if labels is None:
            return result
        num_tokens = torch.tensor(prefill.selection.num_tokens, device=prefill.rho_for_losses.device)
        # Computed on the selector side, added where the LM's loss is (device_map), as stock MoE aux losses.
        aux = {name: value.to(outputs.loss.device) for name, value in
               self.auxiliary_losses(prefill.rho_for_losses, num_tokens).items()}
        result.loss = (
            outputs.loss
            + self.config.qtsplus_lambda_flops * aux["flops_loss"]
            + self.config.qtsplus_lambda_kv * aux["kv_loss"]
            + self.config.qtsplus_lambda_smooth * aux["smooth_loss"]
        )
        for name, value in self.selection_losses(prefill).items():
            aux[name] = value = value.to(outputs.loss.device)
            result.loss = result.loss + getattr(self.config, f"qtsplus_lambda_{name.removesuffix('_loss')}") * value
        for name, value in aux.items():
            setattr(result, name, value)
        return result

    def generation_extras(self, prefill: QTSplusInputs) -> dict:
        """Keyword inputs of `forward` that carry `prefill.language_model_extras` through `generate` (none here)."""
        return {}

    def qtsplus_generate(
        self,
        input_ids: torch.LongTensor | None,
        stock_inputs: dict,
        qtsplus_query_mask: torch.Tensor | None,
        qtsplus_keep_ratio: float | None,
        qtsplus_vision_chunk_frames: int | None,
        qtsplus_selection_scores: list[torch.Tensor] | None,
        generate_kwargs: dict,
    ) -> "torch.LongTensor | GenerateOutput":
        """`GenerationMixin.generate` with the selector run once, at prefill (`stock_inputs`: the processor's outputs
        other than `input_ids`).

        The language model decodes from the compacted prefix (embeddings, mask and `[4, B, S']` positions, which
        `generate` extends by +1 per new token); the returned sequences still begin with the caller's `input_ids`.
        """
        self._check_keep_ratio(qtsplus_keep_ratio)
        self._check_chunk_frames(qtsplus_vision_chunk_frames)
        if not self._runs_selector(stock_inputs.get("pixel_values_videos")):
            stock_inputs = {key: value for key, value in stock_inputs.items()
                            if value is not None and not key.startswith("qtsplus_")}
            return super().generate(input_ids, **stock_inputs, **generate_kwargs)
        if input_ids is None:
            raise ValueError("QTSplus generate needs input_ids alongside pixel_values_videos")

        with torch.no_grad():
            prefill = self.prepare_qtsplus_inputs(
                input_ids=input_ids, qtsplus_query_mask=qtsplus_query_mask, qtsplus_keep_ratio=qtsplus_keep_ratio,
                qtsplus_vision_chunk_frames=qtsplus_vision_chunk_frames,
                qtsplus_selection_scores=qtsplus_selection_scores, **stock_inputs,
            )
        self.model.rope_deltas = prefill.rope_deltas
        dropped = input_ids.shape[1] - prefill.input_ids.shape[1]
        outputs = super().generate(
            input_ids=prefill.input_ids,  # what logits processors (repetition penalty, ...) see as the prompt
            inputs_embeds=prefill.inputs_embeds,
            attention_mask=prefill.attention_mask,
            position_ids=prefill.position_ids,
            **self.generation_extras(prefill),
            **self._shift_length_limits(generate_kwargs, dropped),
        )
        # Swap the compacted prompt for the caller's (repeated when num_return_sequences / beams grew the batch).
        sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
        prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
        sequences = torch.cat([prompt, sequences[:, prefill.input_ids.shape[1]:]], dim=-1)
        if isinstance(outputs, torch.Tensor):
            return sequences
        outputs.sequences = sequences
        outputs["qtsplus"] = prefill.selection
        return outputs

    def _shift_length_limits(self, kwargs: dict, dropped: int) -> dict:
        """`max_length` / `min_length` count the prompt: shorten them by the tokens the selector dropped."""
        kwargs = dict(kwargs)
        config = kwargs.get("generation_config") or self.generation_config
        if kwargs.get("max_length") is None and kwargs.get("max_new_tokens") is None and config.max_new_tokens is None:
            kwargs["max_length"] = config.max_length  # the config's limit also counts the caller's full prompt
        for name in ("max_length", "min_length"):
            if kwargs.get(name):
                kwargs[name] = max(int(kwargs[name]) - dropped, 0)
        return kwargs

    # -- conversion and saving -------------------------------------------------------------------------------------

    @torch.no_grad()
    def initialize_selector_from_language_model(self, scheme: str = "identity") -> None:
        """Copy the selector's attention from LM decoder layers (q/k/v/o and, where the LM has them, the per-head
        q/k norms; q_norm and kv_norm from `input_layernorm`, ffn_norm from `post_attention_layernorm`; the GELU
        feed-forward has no LM counterpart).

        `scheme` (`INIT_SCHEMES`):
            `"identity"` (this project's): scoring layer i and re-encode layer i from decoder layer i, then the
            re-encoder's residual outputs (o_proj, the feed-forward's output) zeroed, so the converted model equals
            the stock one at keep ratio 1.0 and training starts from it.
            `"released"` (the released code's): every scoring layer from the last decoder layer, re-encode layer i
            from decoder layer i, o_proj kept and the feed-forward at its random initialisation, so the re-encoder
            changes the kept tokens from the start.
        The relevance embedding (this project's; the released model has none) starts at zero in both.
        """
        if scheme not in INIT_SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(INIT_SCHEMES)}, got {scheme!r}")
        decoder_layers = self.model.language_model.layers
        last = len(decoder_layers) - 1
        pairs = [(layer, last if scheme == "released" else i) for i, layer in enumerate(self.qtsplus.scoring_layers)]
        pairs += [(layer.core, i) for i, layer in enumerate(self.qtsplus.reencode_layers)]
        for target, index in pairs:
            source = decoder_layers[min(index, last) if scheme == "released" else index % len(decoder_layers)]
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(target, name).load_state_dict(getattr(source.self_attn, name).state_dict())
            if target.q_head_norm is not None:
                target.q_head_norm.weight.copy_(source.self_attn.q_norm.weight)
                target.k_head_norm.weight.copy_(source.self_attn.k_norm.weight)
            target.q_norm.weight.copy_(source.input_layernorm.weight)
            target.kv_norm.weight.copy_(source.input_layernorm.weight)
            target.ffn_norm.weight.copy_(source.post_attention_layernorm.weight)
        if self.qtsplus.relevance_embedding is not None:
            self.qtsplus.relevance_embedding.proj.weight.zero_()
        for layer in self.qtsplus.reencode_layers:
            output = layer.core.ffn.net[2]
            if scheme == "released":
                output.weight.normal_(std=self.config.text_config.initializer_range)
                output.bias.zero_()
            else:
                layer.core.o_proj.weight.zero_()
                output.weight.zero_()
                output.bias.zero_()

    @classmethod
    def from_stock(
        cls, model_or_path: "PreTrainedModel | str", recipe: str | None = None, init_scheme: str | None = None,
        **config_overrides,
    ) -> "QTSplusModelMixin":
        """Wrap a stock model of `cls.stock_class` (an in-memory model, a local directory or a Hub id) into a
        QTSplus model.

        All stock weights are copied (an in-memory model is left untouched; one loaded here is handed over without a
        copy); the selector is initialised from LM decoder layers (`initialize_selector_from_language_model`). With
        the default `init_scheme="identity"` the re-encoder residuals start at zero, so with
        `qtsplus_keep_ratio=1.0` the logits equal the stock model's (position mode `"mrope"`; `"sequential"` changes
        the positions the LM sees). `config_overrides` set `qtsplus_*` fields (for example
        `qtsplus_max_tokens=1024`); `qtsplus_base_model` defaults to the stock model's Hub id, if it has one.
        `recipe="released"`: the settings of the released QTSplus-3B training script (`RECIPES["released"]`, which
        explicit overrides still replace) and, unless `init_scheme` says otherwise, the released initialisation.
        """
        stock_class = cls.stock_class
        unknown = sorted(key for key in config_overrides if not key.startswith("qtsplus_"))
        if unknown:
            raise ValueError(f"conversion only takes qtsplus_* overrides, got {unknown}")
        if recipe is not None:
            if recipe not in RECIPES:
                raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
            config_overrides = {**RECIPES[recipe], **config_overrides}
            init_scheme = init_scheme or recipe
        init_scheme = init_scheme or "identity"
        if init_scheme not in INIT_SCHEMES:
            raise ValueError(f"init_scheme must be one of {', '.join(INIT_SCHEMES)}, got {init_scheme!r}")
        stock = model_or_path
        if not isinstance(stock, stock_class):
            # The stock class knows the legacy key layouts of Hub checkpoints (`visual.*`, `model.layers.*`).
            stock = stock_class.from_pretrained(model_or_path)
            state_dict = stock.state_dict()
            # A Hub id is the base model a model card can link to; a local folder is not.
            config_overrides.setdefault("qtsplus_base_model", None if os.path.isdir(model_or_path) else model_or_path)
        else:
            state_dict = {name: tensor.clone() for name, tensor in stock.state_dict().items()}
            name = stock.config.name_or_path
            config_overrides.setdefault("qtsplus_base_model", None if not name or os.path.isdir(name) else name)
        config_dict = stock.config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version"):
            config_dict.pop(key, None)
        config = cls.config_class(**config_dict, **config_overrides)
        # from_pretrained builds on the meta device and initialises only what the state dict lacks (the selector):
        # no second random initialisation of a multi-billion-parameter model.
        # Quietly: its load report would call the selector keys, missing by design, a problem, and its progress bar
        # would count tensors that are already in memory.
        verbosity, progress_bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
        logging.set_verbosity_error()
        logging.disable_progress_bar()
        try:
            model, loading = cls.from_pretrained(
                None, config=config, state_dict=state_dict, dtype=stock.dtype,
                attn_implementation=stock.config._attn_implementation, output_loading_info=True,
            )
        finally:
            logging.set_verbosity(verbosity)
            if progress_bar:
                logging.enable_progress_bar()
        missing, unexpected = loading["missing_keys"], loading["unexpected_keys"]
        if unexpected or any(not key.startswith("qtsplus.") for key in missing) or loading["mismatched_keys"]:
            raise ValueError(f"checkpoint does not fit {stock_class.__name__}: missing {sorted(missing)}, unexpected "
                             f"{sorted(unexpected)}, mismatched {sorted(loading['mismatched_keys'])}")
        model.to(stock.device)
        # Where the weights came from (`from_pretrained(None, ...)` records none): PEFT reads it when saving adapters.
        model.config._name_or_path = stock.config._name_or_path
        model.initialize_selector_from_language_model(init_scheme)
        model.generation_config = copy.deepcopy(stock.generation_config)
        return model.train() if stock.training else model.eval()

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained` (and so `push_to_hub`), with `auto_map` for every Auto class this model
        serves and the `video-text-to-text` pipeline: its file (with the video loader it imports) beside the model's
        and its `custom_pipelines` entry in config.json, so the folder serves `pipeline(..., trust_remote_code=True)`.
        """
        if self._auto_class is not None:
            reference = f"{self.__class__.__module__.split('.')[-1]}.{self.__class__.__name__}"
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}),
                                    **{name: reference for name in self._auto_class_names}}
            self._save_pipeline_code(save_directory, kwargs.get("is_main_process", True))
        super().save_pretrained(save_directory, *args, **kwargs)

    def _save_pipeline_code(self, save_directory, is_main_process: bool) -> None:
        # What `Pipeline.save_pretrained` records for a registered custom pipeline; that method saves a tokenizer and
        # an image processor but not a multimodal processor, so the model writes the entry itself.
        pipeline_class = QTSplusVideoTextToTextPipeline
        self.config.custom_pipelines = {
            PIPELINE_TASK: {
                "impl": f"{pipeline_class.__module__.split('.')[-1]}.{pipeline_class.__name__}",
                "pt": ("AutoModel",),
                "type": "multimodal",
            }
        }
        if is_main_process:
            os.makedirs(save_directory, exist_ok=True)
            custom_object_save(pipeline_class, save_directory)


__all__ = [
    "INIT_SCHEMES",
    "MULTIPLE_CHOICE_INSTRUCTION",
    "QTSplusCausalLMOutputWithPast",
    "QTSplusConfigMixin",
    "QTSplusInputs",
    "QTSplusModelMixin",
    "QTSplusProcessorMixin",
    "QTSplusSelection",
    "QTSplusSelector",
    "RECIPES",
    "chat_turn_settings",
]
