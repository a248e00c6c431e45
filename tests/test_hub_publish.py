"""`qtsplus convert --from qwen2_5_vl`, `qtsplus export`, the model card and `qtsplus push --dry-run` (all offline)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml

from qtsplus_hf import QTSplusQwen2_5_VLForConditionalGeneration, save_checkpoint
from qtsplus_hf.cli import main
from qtsplus_hf.selector_qtsplus import QTSplusSelector
from qtsplus_hf.tiny import tiny_processor


REMOTE_CODE = ("configuration_qtsplus.py", "modeling_qtsplus_qwen2_5_vl.py", "pipeline_video_text_to_text.py",
               "processing_qtsplus.py", "selector_qtsplus.py", "video_qtsplus.py")
BASE_MODEL = "qtsplus-tests/tiny-qwen2.5-vl"


@pytest.fixture(scope="module")
def converted_folder(stock_model, tmp_path_factory):
    """`qtsplus convert --from qwen2_5_vl` of a saved tiny stock checkpoint, weights sharded at 300 kB."""
    root = tmp_path_factory.mktemp("publish")
    stock_model.save_pretrained(root / "stock")
    tiny_processor().save_pretrained(root / "stock")
    code = main(["convert", "--from", "qwen2_5_vl", str(root / "stock"), "--out", str(root / "hub"),
                 "--base-model", BASE_MODEL, "--max-tokens", "24", "--max-shard-size", "300KB"])
    assert code == 0
    return root / "hub"


def front_matter_and_body(path) -> tuple[dict, str]:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def test_convert_writes_a_complete_sharded_hub_folder(converted_folder, stock_model):
    files = set(os.listdir(converted_folder))
    assert set(REMOTE_CODE) <= files
    assert {"config.json", "generation_config.json", "processor_config.json", "tokenizer.json",
            "chat_template.jinja", "README.md", "model.safetensors.index.json"} <= files
    index = json.loads((converted_folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and shards <= files and "model.safetensors" not in files
    model = QTSplusQwen2_5_VLForConditionalGeneration.from_pretrained(converted_folder)
    assert model.config.qtsplus_max_tokens == 24 and model.config.qtsplus_base_model == BASE_MODEL
    stock = stock_model.state_dict()
    for name, tensor in model.state_dict().items():
        if not name.startswith("qtsplus."):
            assert torch.equal(tensor, stock[name]), name


def test_card_is_yaml_front_matter_and_markdown_with_the_real_numbers(converted_folder, stock_model):
    metadata, body = front_matter_and_body(converted_folder / "README.md")
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "video-text-to-text"
    assert metadata["base_model"] == BASE_MODEL and metadata["license"] == "apache-2.0"
    assert {"qtsplus", "video", "token-selection"} <= set(metadata["tags"])
    config = QTSplusQwen2_5_VLForConditionalGeneration.config_class.from_pretrained(converted_folder)
    stock_parameters = sum(parameter.numel() for parameter in stock_model.parameters())
    selector_parameters = sum(parameter.numel() for parameter in QTSplusSelector(config).parameters())
    assert f"| {stock_parameters:,} |" in body and f"| {selector_parameters:,} |" in body
    assert "| most tokens kept per video (n_max) | 24 |" in body
    assert f"| retention ratio ρ range | [{config.qtsplus_rho_min}, {config.qtsplus_rho_max}] |" in body
    assert "| position mode | `mrope` |" in body
    assert "```python" in body and "2511.11910" in body and "@misc{" in body  # usage snippets and citation


def test_export_round_trip_in_a_process_without_the_package(converted_model, two_sample_batch, tmp_path):
    """Export, then load through every Auto class and the pipeline where qtsplus_hf cannot be imported."""
    model = converted_model
    save_checkpoint(model, tiny_processor(), tmp_path / "checkpoint")
    assert main(["export", "--model", str(tmp_path / "checkpoint"), "--out", str(tmp_path / "hub"),
                 "--base-model", BASE_MODEL]) == 0

    settings = dict(max_new_tokens=5, do_sample=False, qtsplus_keep_ratio=0.5)
    expected_tokens = model.generate(**two_sample_batch, **settings).tolist()
    frames = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "frames.npy", frames)
    from transformers import pipeline

    local = pipeline("video-text-to-text", model=model, processor=tiny_processor())
    expected_answer = local(video=frames, text="What colour is the circle?", max_new_tokens=4, qtsplus_keep_ratio=0.5)
    torch.save(two_sample_batch, tmp_path / "batch.pt")
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np, torch
        sys.modules["qtsplus_hf"] = None  # any import of the package now fails
        from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline
        folder = {str(tmp_path / "hub")!r}
        names = [type(AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)).__name__]
        model = AutoModel.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager").eval()
        names.append(type(model).__module__.split(".")[0] + ":" + type(model).__name__)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        names.append(type(processor).__name__)
        tokens = model.generate(**torch.load({str(tmp_path / "batch.pt")!r}), **{settings!r}).tolist()
        pipe = pipeline("video-text-to-text", model=folder, trust_remote_code=True)
        pipe.model.config._attn_implementation = "eager"
        frames = np.load({str(tmp_path / "frames.npy")!r})
        answer = pipe(video=frames, text="What colour is the circle?", max_new_tokens=4, qtsplus_keep_ratio=0.5)
        print(json.dumps({{"names": names, "tokens": tokens, "answer": answer, "pipeline": type(pipe).__name__}}))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    model_class = "QTSplusQwen2_5_VLForConditionalGeneration"
    assert report["names"] == [model_class, f"transformers_modules:{model_class}", "QTSplusProcessor"]
    assert report["pipeline"] == "QTSplusVideoTextToTextPipeline"
    assert report["tokens"] == expected_tokens
    assert report["answer"] == json.loads(json.dumps(expected_answer))


def test_push_dry_run_lists_every_file_with_its_size(converted_folder, capsys):
    assert main(["push", "--model", str(converted_folder), "--repo-id", "someone/qtsplus-tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in os.listdir(converted_folder):
        size = os.path.getsize(converted_folder / name)
        line = next(line for line in out.splitlines() if line.endswith(f"  {name}"))
        assert (f"{size} B" if size < 1024 else f"{size / 1024:.1f} KiB") in line
    assert f"{len(os.listdir(converted_folder))} files" in out


def remove_file(folder, name):
    os.remove(folder / name)


def edit_json(folder, name, edit):
    data = json.loads((folder / name).read_text())
    edit(data)
    (folder / name).write_text(json.dumps(data))


BREAKAGES = {
    "missing configuration file": (lambda f: remove_file(f, "configuration_qtsplus.py"), "configuration_qtsplus.py"),
    "missing video helpers": (lambda f: remove_file(f, "video_qtsplus.py"), "video_qtsplus.py"),
    "auto_map to a missing class": (
        lambda f: edit_json(f, "config.json", lambda c: c["auto_map"].update(
            AutoModelForImageTextToText="modeling_qtsplus_qwen2_5_vl.QTSplusForVideoQA")),
        "defines no class QTSplusForVideoQA",
    ),
    "processor auto_map to a missing file": (
        lambda f: edit_json(f, "processor_config.json", lambda c: c["auto_map"].update(
            AutoProcessor="processing_missing.QTSplusProcessor")),
        "processing_missing.py",
    ),
    "missing weight shard": (lambda f: remove_file(f, "model-00002-of-00005.safetensors"),
                             "model-00002-of-00005.safetensors"),
    "truncated weights": (lambda f: (f / "model-00001-of-00005.safetensors").write_bytes(b"\x08"), "not readable"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_push_refuses_a_broken_folder_in_one_line(converted_folder, tmp_path, capsys, breakage):
    folder = tmp_path / "hub"
    shutil.copytree(converted_folder, folder)
    damage, message = BREAKAGES[breakage]
    damage(folder)
    for dry_run in (["--dry-run"], []):  # a real push validates before any network call
        assert main(["push", "--model", str(folder), "--repo-id", "someone/qtsplus-tiny", *dry_run]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_export_refuses_a_non_empty_folder_and_leaves_nothing_on_failure(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    assert main(["export", "--model", tiny_checkpoint, "--out", str(tmp_path / "taken"),
                 "--base-model", BASE_MODEL]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["taken"]
    assert main(["export", "--model", tiny_checkpoint, "--out", str(tmp_path / "new"),
                 "--base-model", str(tmp_path / "taken")]) == 2
    assert "not a Hub model id" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["taken"]


def test_base_model_must_be_a_hub_id_but_may_share_a_local_folder_name(tmp_path, monkeypatch):
    from qtsplus_hf.hub import check_base_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "Qwen" / "Qwen2.5-VL-3B-Instruct").mkdir(parents=True)  # a `--local-dir` download of the same name
    assert check_base_model("Qwen/Qwen2.5-VL-3B-Instruct") == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert check_base_model(None) is None  # unknown: the card will not name one
    for path in (str(tmp_path / "Qwen" / "Qwen2.5-VL-3B-Instruct"), "./Qwen/Qwen2.5-VL-3B-Instruct"):
        with pytest.raises(ValueError, match="--base-model"):
            check_base_model(path)


def test_a_local_stock_folder_converts_without_base_model_and_push_says_what_is_missing(
    stock_model, tmp_path, capsys
):
    stock_model.save_pretrained(tmp_path / "stock")
    tiny_processor().save_pretrained(tmp_path / "stock")
    assert main(["convert", "--from", "qwen2_5_vl", str(tmp_path / "stock"), "--out", str(tmp_path / "hub")]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("qtsplus convert:")]
    assert len(warnings) == 1 and "base model is unknown" in warnings[0], err
    metadata, body = front_matter_and_body(tmp_path / "hub" / "README.md")
    assert "base_model" not in metadata and "| base model | not recorded |" in body
    assert main(["push", "--model", str(tmp_path / "hub"), "--repo-id", "someone/qtsplus-tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "still lacks: README.md names no base_model" in out

    # A Hub cache snapshot names its repository: the card links it without --base-model.
    snapshot = tmp_path / "cache" / "models--Qwen--Qwen2.5-VL-3B-Instruct" / "snapshots" / "0123abc"
    shutil.copytree(tmp_path / "stock", snapshot)
    assert main(["convert", "--from", "qwen2_5_vl", str(snapshot), "--out", str(tmp_path / "hub2")]) == 0
    assert front_matter_and_body(tmp_path / "hub2" / "README.md")[0]["base_model"] == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert main(["push", "--model", str(tmp_path / "hub2"), "--repo-id", "someone/qtsplus-tiny", "--dry-run"]) == 0
    assert "still lacks" not in capsys.readouterr().out


def test_convert_with_the_released_recipe_and_initialisation(stock_model, tmp_path):
    """`--recipe released`: the released QTSplus-3B training settings (explicit options still win) and the released
    initialisation: every scoring layer from the last decoder layer, re-encode layer i from layer i with o_proj."""
    from qtsplus_hf.configuration_qtsplus import RECIPES

    stock_model.save_pretrained(tmp_path / "stock")
    tiny_processor().save_pretrained(tmp_path / "stock")
    assert main(["convert", "--from", "qwen2_5_vl", str(tmp_path / "stock"), "--out", str(tmp_path / "hub"),
                 "--recipe", "released", "--max-tokens", "24"]) == 0
    model = QTSplusQwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "hub")
    expected = {**RECIPES["released"], "qtsplus_max_tokens": 24}
    assert {field: getattr(model.config, field) for field in expected} == expected
    decoder = stock_model.model.language_model.layers
    for layer in model.qtsplus.scoring_layers:
        assert torch.equal(layer.q_proj.weight, decoder[-1].self_attn.q_proj.weight)
        assert torch.equal(layer.o_proj.weight, decoder[-1].self_attn.o_proj.weight)
    for index, layer in enumerate(model.qtsplus.reencode_layers):
        assert torch.equal(layer.core.k_proj.weight, decoder[index].self_attn.k_proj.weight)
        assert torch.equal(layer.core.o_proj.weight, decoder[index].self_attn.o_proj.weight)
        assert layer.core.ffn.net[2].weight.any()
