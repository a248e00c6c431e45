"""Converting checkpoints into QTSplus Hub folders: a stock Qwen2.5-VL, or the paper's released QTSplus checkpoints.

The released checkpoints (QTSplus-3B / -7B / -3B-FT) are a Qwen2.5-VL *text* causal LM with the vision encoder and
the selector attached to its inner model:

| released key                          | this project's key                   |
| ------------------------------------- | ------------------------------------ |
| `model.vision_tower.*`                | `model.visual.*`                     |
| `model.embed_tokens.*`, `model.layers.N.*`, `model.norm.*` | `model.language_model.*` |
| `lm_head.*`                           | `lm_head.*`                          |
| `model.qts_plus.selector.*`           | `qtsplus.*` (same sub-keys: `scoring_layers.N`, `budget.mlp.{0,2}`, `reencode_layers.N.core`) |

Their language model saw the selection spliced into the prompt with plain sequential positions and no time
embedding, so the converted config sets `qtsplus_position_mode="sequential"` and `qtsplus_time_embedding=False`.
"""

import json
import os
import re

import torch

from .configuration_qtsplus import QTSplusConfig
from .modeling_qtsplus_qwen2_5_vl import QTSplusQwen2_5_VLForConditionalGeneration


OFFICIAL_PREFIXES = (
    ("model.vision_tower.", "model.visual."),
    ("model.qts_plus.selector.", "qtsplus."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
# Rotary frequency tables are recomputed from the config; older code saved them although they are not weights.
RECOMPUTED_BUFFER = re.compile(r"(^|\.)(rotary_emb|rotary_pos_emb)\.inv_freq$")
# The released training configuration's names for the settings that have a QTSplusConfig counterpart.
OFFICIAL_SETTINGS = {
    "qts_plus_rho_min": "qtsplus_rho_min",
    "qts_plus_rho_max": "qtsplus_rho_max",
    "qts_plus_tau_s": "qtsplus_tau",
    "qts_plus_nmax": "qtsplus_max_tokens",
    "lambda_t": "qtsplus_lambda_flops",
    "lambda_m": "qtsplus_lambda_kv",
    "lambda_s": "qtsplus_lambda_smooth",
}
TEXT_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "sliding_window", "use_sliding_window", "max_window_layers", "attention_dropout",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "layer_types",
)
TOKEN_ID_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
# The vision encoder shared by every Qwen2.5-VL size (3B, 7B, 72B: only the merger's output width differs, and it
# equals the LM width). Used when neither the released config nor --base-config carries a vision config.
QWEN2_5_VL_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu",
)


# ----------------------------------------------------------------------------------------------------------------------
# keys
# ----------------------------------------------------------------------------------------------------------------------


def official_to_qtsplus_key(key: str) -> str | None:
    """This project's name for a released-checkpoint tensor; None for a recomputed buffer. ValueError if unknown."""
    if RECOMPUTED_BUFFER.search(key):
        return None
    for official, ours in OFFICIAL_PREFIXES:
        if key.startswith(official):
            return ours + key[len(official):]
    raise ValueError(f"tensor {key!r} is outside the released QTSplus layout "
                     f"(expected prefixes {[prefix for prefix, _ in OFFICIAL_PREFIXES]})")


def official_state_dict_to_qtsplus(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename every tensor of a released checkpoint (the tensors themselves are not copied)."""
    renamed = {}
    for key, tensor in state_dict.items():
        new_key = official_to_qtsplus_key(key)
        if new_key is not None:
            renamed[new_key] = tensor
    return renamed


def selector_shape(state_dict: dict[str, torch.Tensor]) -> dict:
    """qtsplus_* settings that the selector tensors themselves fix (layer counts, budget head width)."""
    def count(prefix: str) -> int:
        pattern = re.compile(rf"^qtsplus\.{prefix}\.(\d+)\.")
        return len({match.group(1) for key in state_dict if (match := pattern.match(key))})

    if "qtsplus.budget.mlp.0.weight" not in state_dict:
        raise ValueError("the checkpoint holds no QTSplus selector (model.qts_plus.selector.budget.mlp.0.weight)")
    return {
        "qtsplus_num_scoring_layers": count("scoring_layers"),
        "qtsplus_num_reencode_layers": count("reencode_layers"),
        "qtsplus_budget_hidden_size": state_dict["qtsplus.budget.mlp.0.weight"].shape[0],
    }


# ----------------------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------------------


def official_config_to_qtsplus(
    official: dict, selector_settings: dict, base_config: dict | None = None, **overrides
) -> QTSplusConfig:
    """A `QTSplusConfig` for a released checkpoint.

    Args:
        official: the released `config.json` (a Qwen2.5-VL text config plus `qts_plus_*` / `lambda_*` settings).
        selector_settings: what `selector_shape` read from the tensors.
        base_config: a stock Qwen2.5-VL config dict for the vision encoder and the special token ids; without it
            the released config's own `vision_config` is used, else the standard Qwen2.5-VL vision encoder.
        overrides: further `qtsplus_*` settings.
    """
    text_source = official.get("text_config") or official
    text_config = {key: text_source[key] for key in TEXT_CONFIG_KEYS if key in text_source}
    if "hidden_size" not in text_config:
        raise ValueError("the released config.json has no hidden_size: it is not a Qwen2.5-VL text config")
    if base_config is not None:
        vision_config = dict(base_config["vision_config"])
        token_ids = {key: base_config[key] for key in TOKEN_ID_KEYS if key in base_config}
    else:
        vision_config = official.get("vision_config") or {**QWEN2_5_VL_VISION,
                                                          "out_hidden_size": text_config["hidden_size"]}
        token_ids = {key: official[key] for key in TOKEN_ID_KEYS if key in official}
    settings = {ours: official[theirs] for theirs, ours in OFFICIAL_SETTINGS.items() if theirs in official}
    settings.update(selector_settings)
    settings.update(qtsplus_position_mode="sequential", qtsplus_time_embedding=False)
    settings.update(overrides)
    return QTSplusConfig(
        text_config=text_config,
        vision_config=vision_config,
        tie_word_embeddings=bool(text_config.get("tie_word_embeddings", False)),
        **token_ids,
        **settings,
    )


# ----------------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------------


def read_safetensors_folder(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        shards = ["model.safetensors"]
    else:
        raise ValueError(f"no safetensors weights in {folder} (model.safetensors or model.safetensors.index.json)")
    state_dict = {}
    for shard in shards:
        state_dict.update(load_file(os.path.join(folder, shard)))
    return state_dict


def load_config_dict(path: str) -> dict:
    """A config.json given as the file or as its folder."""
    path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise ValueError(f"config.json not found at {path}")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def from_official_checkpoint(
    folder: str, base_config: str | None = None, **overrides
) -> QTSplusQwen2_5_VLForConditionalGeneration:
    """Load a released QTSplus checkpoint folder (local) as a `QTSplusQwen2_5_VLForConditionalGeneration`.

    Every tensor must land: a tensor outside the released layout, or a model parameter the checkpoint lacks, is a
    ValueError. `base_config`: path of a stock Qwen2.5-VL config.json (or its folder) for the vision settings.
    """
    if not os.path.isdir(folder):
        raise ValueError(f"checkpoint folder not found: {folder}")
    official = load_config_dict(folder)
    state_dict = official_state_dict_to_qtsplus(read_safetensors_folder(folder))
    config = official_config_to_qtsplus(
        official, selector_shape(state_dict), None if base_config is None else load_config_dict(base_config),
        **overrides,
    )
    dtypes = {tensor.dtype for tensor in state_dict.values() if tensor.is_floating_point()}
    try:
        model, loading = QTSplusQwen2_5_VLForConditionalGeneration.from_pretrained(
            None, config=config, state_dict=state_dict, dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32,
            output_loading_info=True,
        )
    except RuntimeError as error:  # size mismatches: the tensors and the config disagree
        raise ValueError(f"the released checkpoint does not fit the converted config: {error}") from error
    problems = {name: sorted(map(str, loading[name])) for name in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if model.config.tie_word_embeddings:  # a tied lm_head is stored once, as the embedding
        problems["missing_keys"] = [key for key in problems["missing_keys"] if key != "lm_head.weight"]
    if any(problems.values()):
        raise ValueError(f"the released checkpoint does not fit the converted config: {problems}")
    return model.eval()


def load_processor(folder: str, processor_class: type | None = None):
    """The QTSplus processor from the tokenizer / processor files in `folder`: `processor_class` (default
    `QTSplusProcessor`, for a stock Qwen2.5-VL layout; `QTSplusQwen3VLProcessor` for a Qwen3-VL one)."""
    if processor_class is None:
        from .processing_qtsplus import QTSplusProcessor as processor_class

    try:
        return processor_class.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"no usable processor / tokenizer files in {folder}: {error}") from error


__all__ = [
    "from_official_checkpoint",
    "official_config_to_qtsplus",
    "official_state_dict_to_qtsplus",
    "official_to_qtsplus_key",
]
