"""Qwen3-VL checkpoints on the Hub path: a saved folder that loads with trust_remote_code where qtsplus_hf cannot be
imported (Auto classes, processor, pipeline on a real mp4), a PEFT LoRA adapter round trip, and bad inputs."""

import ast
import copy
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.video_utils import VideoMetadata

from qtsplus_hf import QTSplusQwen3VLConfig, QTSplusQwen3VLForConditionalGeneration, QTSplusQwen3VLProcessor
from qtsplus_hf.tiny import TEXT_VOCAB, qwen3_video_prompt_batch, tiny_qwen3_vl_config_dict, tiny_qwen3_vl_processor

from conftest import write_mp4


QUESTION = "What colour is the circle?"
MODEL_CLASS = "modeling_qtsplus_qwen3_vl.QTSplusQwen3VLForConditionalGeneration"
AUTO_MODEL_CLASSES = ("AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText")
SHIPPED = ("modeling_qtsplus_qwen3_vl.py", "pipeline_video_text_to_text.py", "selector_qtsplus.py", "video_qtsplus.py")
QWEN2_5_FILES = ("modeling_qtsplus_qwen2_5_vl.py", "configuration_qtsplus.py", "processing_qtsplus.py")
# A numpy clip given to the processor with its metadata: frames 0, 2, 4, 6 of a 4 fps video, so the temporal patches
# are at 0.25 s and 1.25 s (the model's fallback, one second per patch, would say 0 and 1).
CLIP_METADATA = dict(total_num_frames=8, fps=4.0, frames_indices=[0, 2, 4, 6], video_backend="frames")
CLIP_SECONDS = [0.25, 1.25]
# Makes qtsplus_hf unimportable in a fresh interpreter: off sys.path, its editable-install finder off sys.meta_path,
# and any remaining import of it an ImportError.
WITHOUT_PACKAGE = textwrap.dedent(
    """
    import importlib.util, os, sys
    sys.path[:] = [p for p in sys.path if not os.path.exists(os.path.join(p or ".", "qtsplus_hf"))]
    sys.meta_path[:] = [f for f in sys.meta_path if "qtsplus" not in repr(f).lower()]
    assert importlib.util.find_spec("qtsplus_hf") is None, "qtsplus_hf is still importable"
    sys.modules["qtsplus_hf"] = None
    """
)


def run_without_package(script: str, tmp_path) -> str:
    """Run `script` in a fresh interpreter that cannot import qtsplus_hf (offline, own modules cache); its stdout.

    It uses this process's torch thread count: another count reduces matmuls in another order, and its float results
    would differ from the in-process ones in the last bits (the suite runs on one thread, a fresh process on all)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    threads = f"import torch\ntorch.set_num_threads({torch.get_num_threads()})\n"
    result = subprocess.run([sys.executable, "-c", WITHOUT_PACKAGE + threads + textwrap.dedent(script)],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures: one converted tiny Qwen3-VL with a selector that looks trained, saved once
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor() -> QTSplusQwen3VLProcessor:
    return tiny_qwen3_vl_processor(processor_class=QTSplusQwen3VLProcessor)


@pytest.fixture(scope="module")
def stock() -> Qwen3VLForConditionalGeneration:
    torch.manual_seed(0)
    config = Qwen3VLConfig(**tiny_qwen3_vl_config_dict())
    config._attn_implementation = "eager"
    return Qwen3VLForConditionalGeneration(config).eval()


def convert(stock, processor) -> QTSplusQwen3VLForConditionalGeneration:
    return QTSplusQwen3VLForConditionalGeneration.from_qwen3_vl(stock, **processor.chat_turn_settings())


@pytest.fixture(scope="module")
def model(stock, processor) -> QTSplusQwen3VLForConditionalGeneration:
    """Converted, then every selector tensor perturbed (norms off 1, zero-initialised re-encoder outputs, biases and
    the time embedding non-zero), so that any selector weight that failed to load would show."""
    model = convert(stock, processor)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.qtsplus.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def batch(model, processor) -> dict:
    """Left-padded batch of 2: sample 0 an image then a 4x4x4 video (16 tokens), sample 1 a 2x4x6 video (12 tokens)."""
    return qwen3_video_prompt_batch([[("image", (1, 4, 4)), (4, 4, 4)], [(2, 4, 6)]], [5, 3], model.config,
                                    tokenizer=processor.tokenizer)


def clip_prompt(processor) -> str:
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def clip_inputs(processor, clip):
    return processor(text=[clip_prompt(processor)], videos=[clip], video_metadata=[VideoMetadata(**CLIP_METADATA)],
                     do_sample_frames=False, return_tensors="pt")


@pytest.fixture(scope="module")
def folder(model, processor, tmp_path_factory) -> str:
    """What a user does: the model's and the processor's save_pretrained into one folder."""
    path = tmp_path_factory.mktemp("qwen3_checkpoint")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def imports(path) -> tuple[set[str], set[str], set[str]]:
    """Top-level modules imported at module level, anywhere, and the sibling modules of relative imports."""
    tree = ast.parse(open(path).read())
    module_level, anywhere, relative = set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = {node.module.split(".")[0]}
        elif isinstance(node, ast.ImportFrom):  # `from .x import y`, or `from . import x`
            relative |= {node.module} if node.module else {alias.name for alias in node.names}
            continue
        else:
            continue
        anywhere |= names
        if node in tree.body or any(node in getattr(parent, "body", []) for parent in tree.body
                                    if isinstance(parent, ast.Try)):
            module_level |= names
    return module_level, anywhere, relative


# ----------------------------------------------------------------------------------------------------------------------
# 1. The saved folder
# ----------------------------------------------------------------------------------------------------------------------


def test_saved_folder_ships_the_qwen3_files_and_auto_map(folder):
    files = set(os.listdir(folder))
    assert "model.safetensors" in files
    shipped = sorted(name for name in files if name.endswith(".py"))
    assert shipped == sorted(SHIPPED), shipped  # and so none of QWEN2_5_FILES
    assert not files & set(QWEN2_5_FILES)

    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["model_type"] == "qtsplus_qwen3_vl"
    assert config["architectures"] == ["QTSplusQwen3VLForConditionalGeneration"]
    assert config["auto_map"] == {"AutoConfig": "modeling_qtsplus_qwen3_vl.QTSplusQwen3VLConfig",
                                  **{name: MODEL_CLASS for name in AUTO_MODEL_CLASSES}}
    assert config["custom_pipelines"]["video-text-to-text"]["impl"] == (
        "pipeline_video_text_to_text.QTSplusVideoTextToTextPipeline")
    processor_config = json.load(open(os.path.join(folder, "processor_config.json")))
    assert processor_config["auto_map"] == {"AutoProcessor": "modeling_qtsplus_qwen3_vl.QTSplusQwen3VLProcessor"}
    assert processor_config["processor_class"] == "QTSplusQwen3VLProcessor"

    stdlib = set(sys.stdlib_module_names)
    for name in shipped:
        module_level, anywhere, relative = imports(os.path.join(folder, name))
        # numpy comes with transformers; PyAV only inside the decoding functions.
        assert module_level - stdlib <= {"torch", "transformers", "numpy"}, (name, module_level - stdlib)
        assert anywhere - stdlib <= {"torch", "transformers", "numpy", "av"}, (name, anywhere - stdlib)
        assert {f"{sibling}.py" for sibling in relative} <= set(shipped), (name, relative)


# ----------------------------------------------------------------------------------------------------------------------
# 2. Auto classes and AutoProcessor without the package
# ----------------------------------------------------------------------------------------------------------------------


def test_auto_classes_reload_the_folder_without_the_package(model, batch, clip, clip_inputs, folder, tmp_path):
    # Preconditions that make the comparisons below mean something.
    assert torch.allclose(clip_inputs["qtsplus_patch_seconds"], torch.tensor(CLIP_SECONDS))
    with torch.no_grad():
        expected = {name: model(**inputs) for name, inputs in (("batch", batch), ("clip", clip_inputs))}
        untimed = {key: value for key, value in batch.items() if key != "qtsplus_patch_seconds"}
        assert not torch.equal(model(**untimed).logits, expected["batch"].logits)  # the re-encoder uses the times
    total = [int(n) for n in (batch["input_ids"] == model.config.video_token_id).sum(-1)]
    assert expected["batch"].qtsplus.num_kept != total  # tokens really dropped

    torch.save({"batch": batch, "clip": dict(clip_inputs)}, tmp_path / "inputs.pt")
    np.save(tmp_path / "clip.npy", clip)
    script = f"""
        import json, numpy as np, torch
        from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                                  AutoProcessor)
        from transformers.video_utils import VideoMetadata
        folder = {folder!r}
        inputs = torch.load("inputs.pt")
        report = {{"config": type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__}}
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        report["processor"] = [type(processor).__module__.split(".")[0], type(processor).__name__]
        messages = [{{"role": "user", "content": [{{"type": "video"}}, {{"type": "text", "text": {QUESTION!r}}}]}}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        processed = processor(text=[prompt], videos=[np.load("clip.npy")],
                              video_metadata=[VideoMetadata(**{CLIP_METADATA!r})], do_sample_frames=False,
                              return_tensors="pt")
        torch.save(dict(processed), "processed.pt")
        outputs = {{}}
        for auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
            model = auto.from_pretrained(folder, trust_remote_code=True).eval()
            model.config._attn_implementation = "eager"
            report[auto.__name__] = [type(model).__module__.split(".")[0], type(model).__name__]
            with torch.no_grad():
                for name, batch in (("batch", inputs["batch"]), ("clip", processed)):
                    out = model(**batch)
                    outputs[auto.__name__, name] = (out.logits, [k.tolist() for k in out.qtsplus.kept_indices])
        outputs["state_dict"] = model.state_dict()
        torch.save(outputs, "outputs.pt")
        print(json.dumps(report))
        """
    report = json.loads(run_without_package(script, tmp_path).strip().splitlines()[-1])
    assert report["config"] == "QTSplusQwen3VLConfig"
    assert report["processor"] == ["transformers_modules", "QTSplusQwen3VLProcessor"]

    processed = torch.load(tmp_path / "processed.pt")
    assert sorted(processed) == sorted(clip_inputs)  # qtsplus_query_mask and qtsplus_patch_seconds included
    for key, value in clip_inputs.items():
        assert torch.equal(processed[key], value), key

    outputs = torch.load(tmp_path / "outputs.pt")
    reloaded, saved = outputs.pop("state_dict"), model.state_dict()
    assert sorted(reloaded) == sorted(saved)
    assert not [name for name in saved if not torch.equal(reloaded[name], saved[name])]
    for auto in AUTO_MODEL_CLASSES:
        assert report[auto] == ["transformers_modules", "QTSplusQwen3VLForConditionalGeneration"]
        for name in ("batch", "clip"):
            logits, kept = outputs[auto, name]
            assert torch.equal(logits, expected[name].logits), (auto, name)
            assert kept == [k.tolist() for k in expected[name].qtsplus.kept_indices], (auto, name)


# ----------------------------------------------------------------------------------------------------------------------
# 3. pipeline("video-text-to-text") on real mp4 files without the package
# ----------------------------------------------------------------------------------------------------------------------


def test_pipeline_from_the_folder_answers_like_generate(model, processor, folder, tmp_path):
    from qtsplus_hf.pipeline_video_text_to_text import video_question_inputs

    # 3 s each, sampled at 2 fps into 6 frames: temporal patches at 0.3 / 1.45 / 2.6 s and 0.33 / 1.33 / 2.67 s.
    videos = [write_mp4(tmp_path / f"v{i}.mp4", n, fps, w, h, seed=i)
              for i, (n, fps, w, h) in enumerate([(30, 10, 64, 48), (9, 3, 40, 56)])]
    settings = dict(max_new_tokens=4, do_sample=False)
    expected = []
    for video in videos:
        inputs, _, _ = video_question_inputs(processor, video, QUESTION)
        tokens = model.generate(**inputs, **settings)
        selection = model.select(**inputs)
        total = int((inputs["input_ids"] == model.config.video_token_id).sum())
        seconds = inputs["qtsplus_patch_seconds"]
        assert len(seconds) == 3 and not torch.equal(seconds, torch.arange(3.0))  # the file's real times
        expected.append({
            "text": processor.batch_decode(tokens[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0],
            "kept": selection.num_kept[0], "total": total, "patch_seconds": seconds.tolist(),
            "kept_seconds": selection.timestamps[0].unique().tolist(),
        })
    assert all(e["kept"] < e["total"] for e in expected)  # the predicted budget drops tokens

    script = f"""
        import json, sys
        from transformers import pipeline
        pipe = pipeline("video-text-to-text", model={folder!r}, trust_remote_code=True)
        samples = [{{"video": v, "text": {QUESTION!r}}} for v in {videos!r}]
        print(json.dumps({{
            "classes": [type(pipe).__name__, type(pipe.model).__name__, type(pipe.processor).__name__],
            "modules": sorted({{type(o).__module__.split(".")[0] for o in (pipe, pipe.model, pipe.processor)}}),
            "single": pipe(video=samples[0]["video"], text={QUESTION!r}, **{settings!r}),
            "one_at_a_time": pipe(samples, **{settings!r}),
            "batched": pipe(samples, batch_size=2, **{settings!r}),
        }}))
        """
    report = json.loads(run_without_package(script, tmp_path).strip().splitlines()[-1])
    assert report["classes"] == ["QTSplusVideoTextToTextPipeline", "QTSplusQwen3VLForConditionalGeneration",
                                 "QTSplusQwen3VLProcessor"]
    assert report["modules"] == ["transformers_modules"]
    assert report["single"] == report["one_at_a_time"][0]
    for results in (report["one_at_a_time"], report["batched"]):
        for result, wanted in zip(results, expected, strict=True):
            assert result["generated_text"] == wanted["text"]
            stats = result["qtsplus"]
            assert (stats["kept"], stats["total"]) == (wanted["kept"], wanted["total"])
            assert stats["ratio"] == pytest.approx(wanted["kept"] / wanted["total"])
            assert stats["kept_seconds"] == pytest.approx(wanted["kept_seconds"])
            assert set(stats["kept_seconds"]) <= set(wanted["patch_seconds"])  # times of the file, not 0, 1, 2


# ----------------------------------------------------------------------------------------------------------------------
# 4. PEFT LoRA on the language model
# ----------------------------------------------------------------------------------------------------------------------


def test_lora_adapter_round_trips_and_the_selector_stays_trainable(model, stock, processor, batch, tmp_path):
    from peft import PeftModel

    from qtsplus_hf.training import TrainOptions, parameters_without_gradient, prepare_model_for_mode

    options = TrainOptions(model="unused", data="unused", output="unused", mode="lora", lora_r=4, lora_alpha=8,
                           lora_dropout=0.0)
    peft_model = prepare_model_for_mode(copy.deepcopy(model), options)
    names = dict(peft_model.named_parameters())
    lora = [name for name in names if "lora_" in name]
    for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert any(f"language_model.layers.1.self_attn.{projection}.lora_B" in name for name in lora), projection
    assert not [name for name in lora if "language_model.layers." not in name]  # no vision / selector LoRA
    trainable = {name for name, parameter in names.items() if parameter.requires_grad}
    selector = {name for name in names if ".qtsplus.modules_to_save.default." in name}
    assert trainable == set(lora) | (selector - set(parameters_without_gradient(peft_model)))
    assert any(".budget." in name for name in trainable) and any("reencode_layers" in name for name in trainable)

    # The selector still learns: one training step's gradients reach it and the LoRA weights.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in lora:  # lora_B starts at zero: a no-op adapter would reload as "equal" even if lost
            names[name].copy_(torch.randn(names[name].shape, generator=generator) * 0.1)
        for name in selector:  # and a selector that is not the base model's
            names[name].add_(torch.randn(names[name].shape, generator=generator) * 0.05)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -batch["input_ids"].shape[1] // 2:] = batch["input_ids"][:, -batch["input_ids"].shape[1] // 2:]
    labels[batch["qtsplus_query_mask"] | (batch["attention_mask"] == 0)] = -100
    labels[batch["input_ids"] == model.config.video_token_id] = -100
    peft_model.train()
    peft_model(**batch, labels=labels).loss.backward()
    with_grad = {name for name, parameter in names.items() if parameter.grad is not None and parameter.grad.any()}
    for part in (".budget.", "reencode_layers.0.core.q_proj", "time_embedding", "scoring_layers.0.q_proj",
                 "layers.0.self_attn.q_proj.lora_A"):
        assert any(part in name for name in with_grad), part
    assert with_grad <= trainable
    peft_model.zero_grad()
    peft_model.eval()

    with torch.no_grad():
        expected = peft_model(**batch)
        assert not torch.equal(expected.logits, model(**batch).logits)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter, save_embedding_layers=False)  # no Hub lookup for the base config
    adapter_config = json.load(open(adapter / "adapter_config.json"))
    assert adapter_config["modules_to_save"] == ["qtsplus"]

    reloaded = PeftModel.from_pretrained(convert(stock, processor), adapter).eval()
    with torch.no_grad():
        got = reloaded(**batch)
    assert torch.equal(got.logits, expected.logits)
    assert [k.tolist() for k in got.qtsplus.kept_indices] == [k.tolist() for k in expected.qtsplus.kept_indices]


# ----------------------------------------------------------------------------------------------------------------------
# 5. Bad inputs
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def encoder_calls(model):
    """The number of vision encoder calls while the test runs (errors of the caller's inputs come before it)."""
    calls = []
    handle = model.model.visual.register_forward_pre_hook(lambda *_: calls.append(1))
    yield calls
    handle.remove()


def test_placeholder_count_not_matching_the_features(model, batch):
    bad = dict(batch, input_ids=batch["input_ids"].clone())
    first = (bad["input_ids"][1] == model.config.video_token_id).nonzero()[0, 0]
    bad["input_ids"][1, first] = TEXT_VOCAB.start
    with pytest.raises(ValueError, match=r"video placeholder tokens \(27\) do not match the video features \(28"):
        model(**bad)
    with pytest.raises(ValueError, match="do not match the video features"):
        model.generate(**bad, max_new_tokens=2)


def test_empty_question(model, batch, encoder_calls):
    bad = dict(batch, qtsplus_query_mask=batch["qtsplus_query_mask"].clone())
    bad["qtsplus_query_mask"][1] = False
    with pytest.raises(ValueError, match=r"question is empty in batch row\(s\) \[1\]"):
        model(**bad)
    with pytest.raises(ValueError, match=r"question is empty in batch row\(s\) \[1\]"):
        model.generate(**bad, max_new_tokens=2)
    assert not encoder_calls


def test_query_mask_of_the_wrong_shape(model, batch, encoder_calls):
    bad = dict(batch, qtsplus_query_mask=batch["qtsplus_query_mask"][:, 1:])
    with pytest.raises(ValueError, match=r"qtsplus_query_mask must have the shape of input_ids \(2, \d+\)"):
        model(**bad)
    assert not encoder_calls


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5, "half", True])
def test_keep_ratio_out_of_range(model, batch, ratio, encoder_calls):
    with pytest.raises(ValueError, match=r"qtsplus_keep_ratio must be None or a number in \(0, 1\]"):
        model(**batch, qtsplus_keep_ratio=ratio)
    with pytest.raises(ValueError, match=r"qtsplus_keep_ratio must be None or a number in \(0, 1\]"):
        model.generate(**batch, qtsplus_keep_ratio=ratio, max_new_tokens=2)
    assert not encoder_calls


def test_embeddings_instead_of_ids_with_a_video(model, batch, encoder_calls):
    bad = dict(batch)
    embeds = model.get_input_embeddings()(bad.pop("input_ids"))
    with pytest.raises(ValueError, match="with pixel_values_videos, pass input_ids"):
        model(inputs_embeds=embeds, **bad)
    assert not encoder_calls


@pytest.mark.parametrize("seconds", [[0.5, 1.5, 2.5, 3.5, 4.5], list(range(7)), []])
def test_patch_seconds_of_the_wrong_length(model, batch, seconds, encoder_calls):
    bad = dict(batch, qtsplus_patch_seconds=torch.tensor(seconds, dtype=torch.float))
    message = rf"qtsplus_patch_seconds must hold one time per temporal patch \(6 from video_grid_thw\), got {len(seconds)}"
    with pytest.raises(ValueError, match=message):
        model(**bad)
    with pytest.raises(ValueError, match=message):
        model.generate(**bad, max_new_tokens=2)
    assert not encoder_calls


def test_sequential_position_mode_is_rejected(stock):
    with pytest.raises(ValueError, match="QTSplusQwen3VLConfig.qtsplus_position_mode must be 'mrope', got 'sequential'"):
        QTSplusQwen3VLConfig(**tiny_qwen3_vl_config_dict(), qtsplus_position_mode="sequential")
    with pytest.raises(ValueError, match="qtsplus_position_mode must be 'mrope'"):
        QTSplusQwen3VLForConditionalGeneration.from_qwen3_vl(stock, qtsplus_position_mode="sequential")
    assert QTSplusQwen3VLConfig(**tiny_qwen3_vl_config_dict()).qtsplus_position_mode == "mrope"


def test_file_frames_are_decoded_at_the_size_the_qwen3_processor_keeps(processor, tmp_path):
    """Qwen3-VL's pixel budget covers the whole clip: the loader gives each frame its share, so the processor finds
    frames already at its size (before, each frame got the whole clip's budget and was decoded at full size)."""
    from qtsplus_hf.video_qtsplus import load_video_for_processor

    path = write_mp4(tmp_path / "large.mp4", num_frames=8, fps=2, width=160, height=96)
    frames, metadata = load_video_for_processor(processor, path)
    assert frames.shape[1] * frames.shape[2] * len(frames) <= processor.video_processor.size["longest_edge"]
    prompt = clip_prompt(processor)
    inputs = processor(text=[prompt], videos=[frames], video_metadata=[metadata], do_sample_frames=False,
                       return_tensors="pt")
    patch = processor.video_processor.patch_size
    _, grid_h, grid_w = inputs["video_grid_thw"][0].tolist()
    assert (grid_h * patch, grid_w * patch) == frames.shape[1:3]


def test_trainer_fine_tunes_a_stock_qwen3_folder_with_lora_and_distillation(stock, tmp_path):
    """`qtsplus train` on a stock Qwen3-VL folder: converted on the way in (the Qwen3 processor adds the mask and the
    patch seconds), trained through the Trainer with LoRA and the distillation teacher (the full-prompt LM pass with
    DeepStack), written as a QTSplus Qwen3-VL checkpoint that loads back."""
    from transformers import AutoModel

    from qtsplus_hf.training import TrainOptions, train

    source = tmp_path / "stock"
    stock.save_pretrained(source)
    tiny_qwen3_vl_processor().save_pretrained(source)  # a stock Qwen3VLProcessor's files
    rows = []
    for index in range(4):
        write_mp4(tmp_path / f"clip{index}.mp4", num_frames=8, fps=2, seed=index)
        rows.append({"video": f"clip{index}.mp4", "question": "What colour is the circle?", "answer": "red"})
    with open(tmp_path / "train.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    result = train(TrainOptions(
        model=str(source), data=str(tmp_path / "train.jsonl"), video_root=str(tmp_path), output=str(tmp_path / "out"),
        mode="lora", lora_r=4, merge=True, max_steps=2, batch_size=2, learning_rate=1e-3, logging_steps=1,
        distill_weight=0.5,
    ))
    losses = [entry for entry in result.log_history if "distill_loss" in entry]
    assert losses and all(math.isfinite(entry["loss"]) and entry["distill_loss"] > 0 for entry in losses), \
        result.log_history
    trained = AutoModel.from_pretrained(tmp_path / "out")
    assert isinstance(trained, QTSplusQwen3VLForConditionalGeneration)
    assert trained.config.qtsplus_lambda_distill == 0.5


def test_evidence_seconds_land_in_the_qwen3_patch_that_shows_them(processor):
    """Training rows' `evidence_seconds` become tokens by the patches' real spans: at 1 fps a Qwen3-VL patch of frames
    0 and 1 is written `<0.5 seconds>` and shows [0, 2) s (the one-second-per-patch fallback would put 1.5 s in the
    second patch)."""
    from qtsplus_hf.evidence import evidence_token_mask, patch_start_seconds

    frames = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    metadata = VideoMetadata(total_num_frames=6, fps=1.0, frames_indices=list(range(6)), width=32, height=32)
    inputs = processor(text=[clip_prompt(processor)], videos=[frames], video_metadata=[metadata],
                       do_sample_frames=False, return_tensors="pt")
    assert inputs["qtsplus_patch_seconds"].tolist() == [0.5, 2.5, 4.5]
    assert patch_start_seconds(inputs, 0, processor.video_processor.temporal_patch_size) == [0.0, 2.0, 4.0]
    grid = inputs["video_grid_thw"][0].tolist()
    per_patch = grid[1] * grid[2] // processor.video_processor.merge_size**2
    starts = patch_start_seconds(inputs, 0, processor.video_processor.temporal_patch_size)
    for second, patch in ((0.0, 0), (1.5, 0), (2.0, 1), (5.9, 2)):
        mask = evidence_token_mask(grid, starts, processor.video_processor.merge_size, [second])
        assert mask.view(-1, per_patch).any(-1).nonzero().flatten().tolist() == [patch], second
    assert not evidence_token_mask(grid, starts, processor.video_processor.merge_size, [6.0]).any()


def test_vision_spans_nest_and_an_unclosed_one_takes_no_text():
    """Qwen3-VL's timestamps sit inside the video's outer span (not question text); a span that never closes (a
    truncated prompt) does not take the text after it out of the question."""
    from qtsplus_hf.selector_qtsplus import inside_vision_spans
    from qtsplus_hf.tiny import VIDEO_ID, VISION_END_ID as END, VISION_START_ID as START

    ids = [50, START, 60, START, VIDEO_ID, END, 61, START, VIDEO_ID, END, END, 70, START, 71]
    inside = inside_vision_spans(torch.tensor([ids]), START, END)[0].tolist()
    assert inside == [False] + [True] * 10 + [False, False, False]
