# Copyright 2026 The qtsplus-hf authors. Licensed under the Apache License, Version 2.0.
"""Configuration of Qwen2.5-VL with a QTSplus query-aware visual token selector.

Remote-code file: it imports only `transformers` so that `save_pretrained` can ship it beside the weights.
"""

from transformers import Qwen2_5_VLConfig


POSITION_MODES = ("mrope", "sequential")
SCORE_AGGREGATIONS = ("max", "weighted")
# Qwen2.5's tokenizer: `<|im_start|>user\n` opens a user turn, `<|im_end|>` closes every turn.
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

class QTSplusConfig(Qwen2_5_VLConfig):
    r"""
    A [`Qwen2_5_VLConfig`] plus the flat `qtsplus_*` settings of the QTSplus selector (arXiv 2511.11910).

    The selector reuses the language model's width and attention head layout (`text_config.hidden_size`,
    `num_attention_heads`, `num_key_value_heads`), so that its attention layers can be initialised from LM
    decoder layers.

    Args:
        qtsplus_enabled (`bool`, defaults to `True`):
            `False` makes the model behave exactly like the stock Qwen2.5-VL (the selector weights stay loaded).
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
            same: the Qwen2.5-VL vision encoder attends only within a temporal patch.
        qtsplus_position_mode (`str`, defaults to `"mrope"`):
            How the language model sees the compacted sequence. `"mrope"`: kept video tokens keep their original 3-D
            MRoPE positions and the re-encoder adds absolute time (this project's model). `"sequential"`: the
            selection is spliced into the prompt with plain positions 0, 1, 2, ... on all three rotary axes and no
            time embedding, the way the paper's released checkpoints were trained (`qtsplus convert --from official`).
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
            the token's score. 0 keeps today's deterministic gate; inference is always plain top-n.
        qtsplus_score_aggregation (`str`, defaults to `"max"`):
            How a token's relevance gathers the question tokens' attention. `"max"`: the maximum over heads and
            question tokens (the paper's form, what the released checkpoints use). `"weighted"`: per head, a
            softmax-weighted sum over the question tokens with weights read from each token by a learned linear
            map (zero-initialised, so it starts as the mean), then the maximum over heads.
        qtsplus_relevance_embedding (`bool`, defaults to `False`):
            Add each kept token's relevance, `clamp(log(r_j M) / log M, -1, 1)` (1: all of the attention, 0: uniform),
            through a learned direction to the kept token before re-encoding, so the language model can tell which
            kept tokens the question points at instead of re-deriving it (this project's addition; zeroed by
            `from_qwen2_5_vl`, so a converted model is unchanged; the released checkpoints have none).
        qtsplus_user_turn_ids (`list[int]`, defaults to Qwen2.5's `<|im_start|>user\n`, `[151644, 872, 198]`) /
        qtsplus_turn_end_id (`int`, defaults to Qwen2.5's `<|im_end|>`, 151645):
            How the model finds the question when the caller passes no `qtsplus_query_mask`: the text of the user
            turns (from after this header to the turn's end token), vision tokens and labels excluded. A row with no
            user turn falls back to every attended non-vision token. `QTSplusProcessor.chat_turn_settings()` gives
            the values for another tokenizer.
        qtsplus_base_model (`str`, *optional*):
            Hub id of the checkpoint this model was converted from (set by `from_qwen2_5_vl` and `qtsplus convert`);
            the model card's `base_model`.
    """

    model_type = "qtsplus_qwen2_5_vl"

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
        def fail(field: str, expected: str) -> None:
            raise ValueError(f"QTSplusConfig.{field} must be {expected}, got {getattr(self, field)!r}")

        for field in ("qtsplus_rho_min", "qtsplus_rho_max"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                fail(field, "a number in (0, 1]")
        if self.qtsplus_rho_min > self.qtsplus_rho_max:
            raise ValueError(
                f"QTSplusConfig.qtsplus_rho_min ({self.qtsplus_rho_min}) must not exceed "
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
        if self.qtsplus_position_mode not in POSITION_MODES:
            fail("qtsplus_position_mode", " or ".join(repr(mode) for mode in POSITION_MODES))
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


__all__ = ["QTSplusConfig", "QWEN_TURN_END_ID", "QWEN_USER_TURN_IDS", "RECIPES"]
