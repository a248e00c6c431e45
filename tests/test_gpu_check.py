"""scripts/gpu_check.py on a machine without a GPU (CI): it parses, refuses to run in one line, and its CPU/GPU device
map covers the model. The GPU run itself is documented in docs/performance.md."""

import importlib.util
import os

import pytest
import torch


SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "gpu_check.py")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # importable without CUDA: nothing runs at import
    return module


def test_help_parses(gpu_check, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--out" in out and "--cpu-dry-run" in out


def test_without_cuda_one_line_error_and_nothing_written(gpu_check, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a CI machine that has a GPU
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "CUDA" in err
    assert list(tmp_path.iterdir()) == []


def test_alternating_device_map_covers_every_parameter(gpu_check):
    from accelerate.utils import check_device_map

    model = gpu_check.every_part_small_model()
    device_map = gpu_check.alternating_device_map(model, ["cuda:0", "cpu"])
    check_device_map(model, device_map)  # raises if a parameter has no device
    for part in ("model.visual", "model.language_model.embed_tokens", "qtsplus.scoring_layers.1",
                 "qtsplus.reencode_layers.1", "qtsplus.budget", "qtsplus.relevance_embedding",
                 "model.language_model.layers.5", "lm_head"):
        assert part in device_map, part
    assert set(device_map.values()) == {"cuda:0", "cpu"}
    values = list(device_map.values())
    assert all(first != second for first, second in zip(values, values[1:]))  # neighbours on different devices
