"""save_pretrained writes a folder that loads with trust_remote_code where qtsplus_hf cannot be imported."""

import ast
import copy
import json
import os
import subprocess
import sys
import textwrap

import torch

from qtsplus_hf import QTSplusQwen2_5_VLForConditionalGeneration


REMOTE_FILES = ("configuration_qtsplus.py", "modeling_qtsplus_qwen2_5_vl.py", "selector_qtsplus.py")
AUTO_CLASSES = ("AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText")


def imported_top_level_modules(path, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(open(path).read())
    names = set()
    for node in tree.body if module_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_saved_folder_has_remote_code_and_auto_map(converted_model, tmp_path):
    converted_model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert set(REMOTE_FILES) <= files and "model.safetensors" in files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoConfig"] == "configuration_qtsplus.QTSplusConfig"
    for name in AUTO_CLASSES:
        assert config["auto_map"][name] == "modeling_qtsplus_qwen2_5_vl.QTSplusQwen2_5_VLForConditionalGeneration"
    for name in REMOTE_FILES:
        third_party = imported_top_level_modules(tmp_path / name) - set(sys.stdlib_module_names)
        assert third_party <= {"torch", "transformers"}, (name, third_party)


def trained_looking(model):
    """A copy whose selector has no zero branch (re-encoder residuals, time embedding, budget head all non-zero),
    so a selector weight that failed to load would change the outputs."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.qtsplus.named_parameters():
            if parameter.dim() > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def test_reload_in_a_process_that_cannot_import_the_package(converted_model, two_sample_batch, tmp_path):
    model = trained_looking(converted_model)
    core = model.qtsplus.reencode_layers[0].core
    assert core.o_proj.weight.any() and model.qtsplus.time_embedding is not None
    model.save_pretrained(tmp_path / "model")
    torch.save(two_sample_batch, tmp_path / "batch.pt")
    settings = dict(max_new_tokens=5, do_sample=False)  # the predicted budget: the budget head decides n
    expected = model.generate(**two_sample_batch, **settings)
    with torch.no_grad():
        expected_logits = model(**two_sample_batch).logits
    assert model.select(**two_sample_batch).num_kept != [
        int(n) for n in (two_sample_batch["input_ids"] == model.config.video_token_id).sum(-1)
    ]  # tokens really dropped
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.modules["qtsplus_hf"] = None  # any import of the package now fails
        torch.set_num_threads({torch.get_num_threads()})  # this process's: another count rounds matmuls differently
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
        folder = {str(tmp_path / "model")!r}
        batch = torch.load({str(tmp_path / "batch.pt")!r})
        for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
            assert type(auto.from_pretrained(folder, trust_remote_code=True)).__name__ == (
                "QTSplusQwen2_5_VLForConditionalGeneration")
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        model.config._attn_implementation = "eager"
        print(type(model).__module__.split(".")[0], type(model).__name__)
        print(model.generate(**batch, **{settings!r}).tolist())
        with torch.no_grad():
            torch.save(model(**batch).logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    names, tokens = result.stdout.strip().splitlines()[-2:]
    module_root, class_name = names.split()
    assert (module_root, class_name) == ("transformers_modules", "QTSplusQwen2_5_VLForConditionalGeneration")
    assert json.loads(tokens) == expected.tolist()
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected_logits)


def test_from_pretrained_of_a_stock_checkpoint_gives_an_identity_reencoder(stock_model, tmp_path):
    stock_model.save_pretrained(tmp_path)
    model = QTSplusQwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(model.lm_head.weight, stock_model.lm_head.weight)
    core = model.qtsplus.reencode_layers[0].core
    assert not core.o_proj.weight.any() and not core.ffn.net[2].weight.any()


def test_every_shipped_remote_file_imports_only_torch_transformers_and_numpy(tiny_checkpoint):
    """numpy comes with transformers; PyAV is imported inside the decoding functions only."""
    shipped = sorted(name for name in os.listdir(tiny_checkpoint) if name.endswith(".py"))
    assert shipped == sorted(REMOTE_FILES + ("pipeline_video_text_to_text.py", "processing_qtsplus.py",
                                             "video_qtsplus.py"))
    for name in shipped:
        path = os.path.join(tiny_checkpoint, name)
        module_level = imported_top_level_modules(path, module_level_only=True) - set(sys.stdlib_module_names)
        assert module_level <= {"torch", "transformers", "numpy"}, (name, module_level)
        anywhere = imported_top_level_modules(path) - set(sys.stdlib_module_names)
        assert anywhere <= {"torch", "transformers", "numpy", "av"}, (name, anywhere)
    config = json.loads(open(os.path.join(tiny_checkpoint, "config.json")).read())
    assert config["custom_pipelines"]["video-text-to-text"]["impl"] == (
        "pipeline_video_text_to_text.QTSplusVideoTextToTextPipeline")
    processor_config = json.loads(open(os.path.join(tiny_checkpoint, "processor_config.json")).read())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_qtsplus.QTSplusProcessor"
