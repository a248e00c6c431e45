"""`qtsplus convert --from official`: a checkpoint in the released QTSplus key layout lands tensor for tensor."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen2_5_VLConfig

from qtsplus_hf import QTSplusQwen2_5_VLForConditionalGeneration
from qtsplus_hf.cli import main
from qtsplus_hf.convert import from_official_checkpoint, official_config_to_qtsplus, official_state_dict_to_qtsplus
from qtsplus_hf.tiny import tiny_config_dict, tiny_processor, tiny_qtsplus_config


# The released layout as the issue describes it, written out here independently of the converter's table.
def released_name(key: str) -> str:
    if key.startswith("model.visual."):
        return "model.vision_tower." + key[len("model.visual."):]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]  # embed_tokens, layers.N, norm
    if key.startswith("qtsplus."):
        return "model.qts_plus.selector." + key[len("qtsplus."):]
    assert key.startswith("lm_head."), key
    return key


OFFICIAL_SETTINGS = {"qts_plus_rho_min": 0.1, "qts_plus_rho_max": 0.6, "qts_plus_tau_s": 0.2, "qts_plus_nmax": 48,
                     "lambda_t": 0.5, "lambda_m": 1.5, "lambda_s": 0.1}


@pytest.fixture(scope="module")
def released_checkpoint(tmp_path_factory):
    """A tiny random model saved the way the released checkpoints are: official key names, a flat text config with
    `qts_plus_*` settings, two safetensors shards with an index, processor files; plus a stock base config."""
    root = tmp_path_factory.mktemp("official")
    torch.manual_seed(7)
    source = QTSplusQwen2_5_VLForConditionalGeneration(tiny_qtsplus_config(
        qtsplus_position_mode="sequential", qtsplus_num_scoring_layers=2, qtsplus_budget_hidden_size=32,
    ))
    tensors = {released_name(key): tensor.clone() for key, tensor in source.state_dict().items()}
    # An inv_freq table some training code saves alongside; the converter recomputes it.
    tensors["model.vision_tower.rotary_pos_emb.inv_freq"] = torch.ones(4)
    folder = root / "QTSplus-tiny"
    folder.mkdir()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({key: tensors[key].contiguous() for key in keys}, folder / shard)
    index = {"metadata": {}, "weight_map": {key: shard for shard, keys in shards.items() for key in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    text_config = tiny_config_dict()["text_config"]
    config = {"model_type": "qts_plus_qwen2_5_vl_causal_lm", "architectures": ["QTSplusQwen2_5_VLTextForCausalLM"],
              "vision_tower": "qwen2_5_vl_vision", "enable_qts_plus": True, "qts_plus_scoring_layers": 2,
              "qts_plus_reencode_layers": 1, **text_config, **OFFICIAL_SETTINGS}
    (folder / "config.json").write_text(json.dumps(config))
    tiny_processor().save_pretrained(folder)
    Qwen2_5_VLConfig(**tiny_config_dict()).save_pretrained(root / "base")
    return folder, root / "base", tensors


def test_every_released_tensor_lands_with_its_value(released_checkpoint, tmp_path):
    folder, base, tensors = released_checkpoint
    assert main(["convert", "--from", "official", str(folder), "--out", str(tmp_path / "hub"),
                 "--base-config", str(base), "--base-model", "AlpachinoNLP/QTSplus-3B"]) == 0
    model, loading = QTSplusQwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path / "hub", output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"] and not loading["mismatched_keys"]
    state = model.state_dict()
    landed = {}
    for key, tensor in tensors.items():
        if key.endswith("inv_freq"):
            continue
        name = next(name for name in state if released_name(name) == key)
        assert torch.equal(state[name], tensor), key
        landed[name] = key
    assert set(landed) == set(state)  # nothing in the model that the checkpoint did not fill
    config = model.config
    assert (config.qtsplus_position_mode, config.qtsplus_time_embedding) == ("sequential", False)
    assert model.qtsplus.time_embedding is None
    assert (config.qtsplus_num_scoring_layers, config.qtsplus_num_reencode_layers) == (2, 1)
    assert config.qtsplus_budget_hidden_size == 32 and config.qtsplus_base_model == "AlpachinoNLP/QTSplus-3B"
    assert (config.qtsplus_rho_min, config.qtsplus_rho_max, config.qtsplus_tau, config.qtsplus_max_tokens) == (
        0.1, 0.6, 0.2, 48)
    assert (config.qtsplus_lambda_flops, config.qtsplus_lambda_kv, config.qtsplus_lambda_smooth) == (0.5, 1.5, 0.1)


def test_a_tensor_outside_the_layout_or_a_missing_one_is_refused(released_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="model.mm_projector.weight"):
        official_state_dict_to_qtsplus({"model.mm_projector.weight": torch.zeros(2, 2)})
    folder, base, tensors = released_checkpoint
    broken = tmp_path / "broken"
    broken.mkdir()
    kept = {key: value.contiguous() for key, value in tensors.items() if not key.endswith("layers.1.mlp.up_proj.weight")}
    save_file(kept, broken / "model.safetensors")
    (broken / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match=r"language_model\.layers\.1\.mlp\.up_proj\.weight"):
        from_official_checkpoint(str(broken), base_config=str(base))


def test_without_a_base_config_the_standard_qwen2_5_vl_vision_encoder_is_assumed():
    """The released 3B config: a flat text config with the legacy rope format, no vision config."""
    released = {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
                "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
                **OFFICIAL_SETTINGS}
    config = official_config_to_qtsplus(released, {"qtsplus_num_scoring_layers": 1})
    vision = config.vision_config
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.out_hidden_size) == (32, 1280, 16, 2048)
    assert vision.fullatt_block_indexes == [7, 15, 23, 31] and vision.window_size == 112
    assert config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    assert config.tie_word_embeddings and config.video_token_id == 151656
    assert config.qtsplus_max_tokens == 48 and config.qtsplus_position_mode == "sequential"


def test_cli_errors_are_one_line_with_exit_code_2(released_checkpoint, tmp_path, capsys):
    folder, base, _ = released_checkpoint
    cases = [
        (["convert", "--from", "official", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a")], "not found"),
        (["convert", "--from", "official", str(folder), "--out", str(tmp_path / "b"), "--scoring-layers", "3",
          "--base-model", "AlpachinoNLP/QTSplus-3B"], "--scoring-layers"),
        (["convert", "--from", "official", str(folder), "--out", str(tmp_path / "c"), "--base-config", str(base),
          "--base-model", str(tmp_path)], "not a Hub model id"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and err.startswith("qtsplus convert: error:"), err
    assert sorted(path.name for path in tmp_path.iterdir()) == []
