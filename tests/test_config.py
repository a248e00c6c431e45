import pytest

from qtsplus_hf import QTSplusConfig
from qtsplus_hf.tiny import tiny_config_dict


def test_defaults_follow_the_paper():
    config = QTSplusConfig(**tiny_config_dict())
    assert config.model_type == "qtsplus_qwen2_5_vl"
    assert (config.qtsplus_rho_min, config.qtsplus_rho_max, config.qtsplus_tau) == (0.05, 0.5, 0.1)
    assert config.qtsplus_max_tokens == 2560
    assert (config.qtsplus_num_scoring_layers, config.qtsplus_num_reencode_layers) == (1, 1)
    assert (config.qtsplus_lambda_flops, config.qtsplus_lambda_kv, config.qtsplus_lambda_smooth) == (1.0, 1.7, 0.05)
    assert config.qtsplus_enabled and config.qtsplus_time_embedding


def test_save_and_reload_keeps_every_field(tmp_path):
    config = QTSplusConfig(**tiny_config_dict(), qtsplus_rho_min=0.1, qtsplus_max_tokens=7, qtsplus_enabled=False)
    config.save_pretrained(tmp_path)
    reloaded = QTSplusConfig.from_pretrained(tmp_path)
    assert reloaded.qtsplus_rho_min == 0.1 and reloaded.qtsplus_max_tokens == 7 and not reloaded.qtsplus_enabled
    assert reloaded.text_config.rope_parameters["mrope_section"] == [2, 3, 3]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"qtsplus_rho_min": 0.6, "qtsplus_rho_max": 0.5}, "qtsplus_rho_min"),
        ({"qtsplus_rho_max": 1.5}, "qtsplus_rho_max"),
        ({"qtsplus_rho_min": 0.0}, "qtsplus_rho_min"),
        ({"qtsplus_tau": 0.0}, "qtsplus_tau"),
        ({"qtsplus_tau": -1.0}, "qtsplus_tau"),
        ({"qtsplus_max_tokens": 0}, "qtsplus_max_tokens"),
        ({"qtsplus_num_scoring_layers": 0}, "qtsplus_num_scoring_layers"),
        ({"qtsplus_num_reencode_layers": -1}, "qtsplus_num_reencode_layers"),
        ({"qtsplus_lambda_kv": -0.1}, "qtsplus_lambda_kv"),
        ({"qtsplus_vision_chunk_frames": 3}, "qtsplus_vision_chunk_frames"),
    ],
)
def test_out_of_range_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        QTSplusConfig(**tiny_config_dict(), **overrides)
