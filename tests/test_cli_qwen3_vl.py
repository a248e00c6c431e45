"""The command line on the Qwen3-VL backbone: `qtsplus convert --from qwen3_vl` (and `export` / `push --dry-run` of
its folder), its bad inputs, and `qtsplus bench --backbone qwen3_vl` (all offline, tiny or scaled random models)."""

import json
import math
import os

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModel, AutoProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.video_utils import VideoMetadata

from qtsplus_hf import QTSplusQwen3VLForConditionalGeneration, QTSplusQwen3VLProcessor
from qtsplus_hf.cli import main
from qtsplus_hf.tiny import tiny_processor, tiny_qwen3_vl_config_dict, tiny_qwen3_vl_processor


BASE_MODEL = "qtsplus-tests/tiny-qwen3-vl"
QUESTION = "What colour is the circle?"
# Frames 0, 2, 4, 6 of a 4 fps clip: temporal patches at 0.25 s and 1.25 s.
CLIP_METADATA = dict(total_num_frames=8, fps=4.0, frames_indices=[0, 2, 4, 6], video_backend="frames")


@pytest.fixture(scope="module")
def qwen3_stock() -> Qwen3VLForConditionalGeneration:
    torch.manual_seed(0)
    config = Qwen3VLConfig(**tiny_qwen3_vl_config_dict())
    config._attn_implementation = "eager"
    return Qwen3VLForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def stock_folder(qwen3_stock, tmp_path_factory) -> str:
    """A stock Qwen3-VL folder as the Hub has them: the model and the stock `Qwen3VLProcessor` files."""
    folder = tmp_path_factory.mktemp("qwen3_stock")
    qwen3_stock.save_pretrained(folder)
    tiny_qwen3_vl_processor().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def converted_folder(stock_folder, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("qwen3_convert") / "hub"
    code = main(["convert", "--from", "qwen3_vl", stock_folder, "--out", str(out), "--base-model", BASE_MODEL,
                 "--max-tokens", "24"])
    assert code == 0
    return str(out)


def clip_inputs(processor) -> dict:
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    clip = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    return processor(text=[prompt], videos=[clip], video_metadata=[VideoMetadata(**CLIP_METADATA)],
                     do_sample_frames=False, return_tensors="pt")


# ----------------------------------------------------------------------------------------------------------------------
# convert, export, push
# ----------------------------------------------------------------------------------------------------------------------


def test_convert_from_qwen3_vl_loads_with_auto_classes_and_equals_stock_at_keep_1(
    converted_folder, stock_folder, qwen3_stock
):
    model = AutoModel.from_pretrained(converted_folder, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(converted_folder)
    assert type(model) is QTSplusQwen3VLForConditionalGeneration
    assert type(processor) is QTSplusQwen3VLProcessor
    config = model.config
    assert config.model_type == "qtsplus_qwen3_vl" and config.qtsplus_max_tokens == 24
    assert config.qtsplus_base_model == BASE_MODEL
    # The converted model finds the question in this tokenizer's chat format when it gets no query mask.
    settings = processor.chat_turn_settings()
    assert list(config.qtsplus_user_turn_ids) == settings["qtsplus_user_turn_ids"]
    assert config.qtsplus_turn_end_id == settings["qtsplus_turn_end_id"]
    stock_weights = qwen3_stock.state_dict()
    for name, tensor in model.state_dict().items():
        if not name.startswith("qtsplus."):
            assert torch.equal(tensor, stock_weights[name]), name

    # The converted folder's processor gives the stock processor's inputs plus the QTSplus ones.
    inputs = clip_inputs(processor)
    stock_inputs = clip_inputs(AutoProcessor.from_pretrained(stock_folder))
    assert sorted(inputs) == sorted([*stock_inputs, "qtsplus_query_mask", "qtsplus_patch_seconds"])
    for name, value in stock_inputs.items():
        assert torch.equal(inputs[name], value), name
    assert torch.allclose(inputs["qtsplus_patch_seconds"], torch.tensor([0.25, 1.25]))
    with torch.no_grad():
        expected = qwen3_stock(**stock_inputs).logits
        kept_all = model(**inputs, qtsplus_keep_ratio=1.0)
        dropped = model(**inputs, qtsplus_keep_ratio=0.25)
    assert torch.equal(kept_all.logits, expected)
    total = int((inputs["input_ids"] == config.video_token_id).sum())
    assert kept_all.qtsplus.num_kept == [total] and dropped.qtsplus.num_kept == [math.ceil(0.25 * total)]

    metadata = yaml.safe_load(open(os.path.join(converted_folder, "README.md")).read().split("\n---\n")[0][4:])
    assert metadata["base_model"] == BASE_MODEL and "qwen3_vl" in metadata["tags"]
    assert "qwen2_5_vl" not in metadata["tags"]


def test_export_and_push_dry_run_of_a_qwen3_folder(converted_folder, tmp_path, capsys):
    assert main(["export", "--model", converted_folder, "--out", str(tmp_path / "exported")]) == 0
    exported = AutoModel.from_pretrained(tmp_path / "exported")
    assert type(exported) is QTSplusQwen3VLForConditionalGeneration
    assert type(AutoProcessor.from_pretrained(tmp_path / "exported")) is QTSplusQwen3VLProcessor
    assert exported.config.qtsplus_base_model == BASE_MODEL  # recorded in the folder, no --base-model needed
    original = AutoModel.from_pretrained(converted_folder).state_dict()
    assert all(torch.equal(tensor, original[name]) for name, tensor in exported.state_dict().items())
    capsys.readouterr()
    assert main(["push", "--model", str(tmp_path / "exported"), "--repo-id", "someone/qtsplus-qwen3-tiny",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "is valid" in out and "modeling_qtsplus_qwen3_vl.py" in out and "still lacks" not in out


@pytest.fixture(scope="module")
def qwen2_5_folder(stock_model, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("qwen2_5_stock")
    stock_model.save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["convert", "--from", "qwen3_vl", "{qwen2_5}"], "model_type 'qwen2_5_vl', not a stock Qwen3-VL checkpoint"),
        (["convert", "--from", "qwen2_5_vl", "{stock}"], "use --from qwen3_vl"),
        (["convert", "--from", "qwen3_vl", "{converted}"], "use `qtsplus export`"),
        (["convert", "--from", "qwen3_vl", "{stock}", "--processor", "{qwen2_5}"], "are not Qwen3-VL's"),
        (["convert", "--from", "qwen3_vl", "{stock}", "--position-mode", "sequential"], "supported: mrope"),
        (["convert", "--from", "qwen3_vl", "{stock}", "--base-config", "{stock}"], "--from official only"),
        (["export", "--model", "{stock}"], "is not a QTSplus checkpoint (model_type 'qwen3_vl')"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    arguments, message, stock_folder, converted_folder, qwen2_5_folder, tmp_path, capsys
):
    folders = {"{stock}": stock_folder, "{converted}": converted_folder, "{qwen2_5}": qwen2_5_folder}
    out = tmp_path / "out"
    capsys.readouterr()
    code = main([folders.get(argument, argument) for argument in arguments] + ["--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"qtsplus {arguments[0]}: error: ") and message in err, err
    assert list(tmp_path.iterdir()) == []  # no output folder, no staging folder left behind


# ----------------------------------------------------------------------------------------------------------------------
# bench --backbone qwen3_vl
# ----------------------------------------------------------------------------------------------------------------------


# Qwen3-VL-4B-Instruct's config.json (the fields the scaled bench config keeps or scales).
QWEN3_VL_4B = dict(
    text=dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
              intermediate_size=9728, mrope_section=[24, 20, 20], rope_theta=5000000.0),
    vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560, patch_size=16,
                temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=2304,
                deepstack_visual_indexes=[5, 11, 17]),
)


def test_scaled_qwen3_vl_config_has_the_4b_proportions():
    from qtsplus_hf.benchmark import BENCH_CONFIGS, bench_config, scaled_qwen3_vl_4b

    full = Qwen3VLConfig(**scaled_qwen3_vl_4b(scale=1, vision_depth=24, text_layers=36, vocab_size=151936))
    text, vision = full.text_config, full.vision_config
    for field, value in QWEN3_VL_4B["text"].items():
        actual = text.rope_parameters[field] if field in ("mrope_section", "rope_theta") else getattr(text, field)
        assert actual == value, field
    for field, value in QWEN3_VL_4B["vision"].items():
        assert getattr(vision, field) == value, field
    assert text.rope_parameters["mrope_interleaved"] and full.tie_word_embeddings

    for name, sizes in BENCH_CONFIGS.items():
        config = bench_config(name, "qwen3_vl")
        assert type(config) is Qwen3VLConfig
        text, vision = config.text_config, config.vision_config
        assert (text.num_attention_heads, text.num_key_value_heads) == (32, 8)
        assert text.head_dim * 20 == text.hidden_size  # query width 1.6 x the model width, as 4096 / 2560
        assert text.intermediate_size * 2560 == text.hidden_size * 9728 and vision.hidden_size * 2560 == (
            text.hidden_size * 1024)
        section = text.rope_parameters["mrope_section"]
        assert sum(section) == text.head_dim // 2 and section[1] == section[2] <= section[0]
        assert (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size) == (16, 2, 2)
        assert vision.out_hidden_size == text.hidden_size and vision.hidden_size // vision.num_heads >= 16
        assert vision.depth == sizes["vision_depth"] and text.num_hidden_layers == sizes["text_layers"]
        assert vision.deepstack_visual_indexes == [vision.depth * k // 4 - 1 for k in (1, 2, 3)]
    assert bench_config("medium", "qwen3_vl").text_config.rope_parameters["mrope_section"] == [6, 5, 5]  # exact


def test_bench_prompt_has_the_qwen3_layout_with_timestamps():
    from qtsplus_hf.benchmark import bench_config, bench_prompt, timestamp_tokenizer

    config = bench_config("small", "qwen3_vl")
    inputs = bench_prompt(config, frames=6, resolution=64, question_tokens=24, seed=0)
    ids = inputs["input_ids"][0]
    assert inputs["video_grid_thw"].tolist() == [[3, 4, 4]]
    assert int((ids == config.video_token_id).sum()) == 3 * 4  # 4 x 4 patches, merge 2, per temporal patch
    assert torch.allclose(inputs["qtsplus_patch_seconds"], torch.tensor([0.25, 1.25, 2.25]))  # 2 fps
    text = timestamp_tokenizer().decode(ids[ids != config.video_token_id])
    assert [text.count(f"<{second} seconds><|vision_start|>") for second in ("0.2", "1.2", "2.2")] == [1, 1, 1]
    # The outer span holds the three patch spans; the question (24 tokens) closes the prompt.
    assert int((ids == config.vision_start_token_id).sum()) == int((ids == config.vision_end_token_id).sum()) == 4
    assert inputs["qtsplus_query_mask"][0].tolist() == [False] * (len(ids) - 24) + [True] * 24
    assert torch.equal(inputs["mm_token_type_ids"][0], 2 * (ids == config.video_token_id).int())

    # A real checkpoint's vision token ids (Qwen3-VL's): the same layout with those ids in the same places.
    real_ids = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                    vision_end_token_id=151653)
    real = Qwen3VLConfig(**{**config.to_dict(), **real_ids})
    real_inputs = bench_prompt(real, frames=6, resolution=64, question_tokens=24, seed=0)
    for name, value in real_ids.items():
        assert torch.equal(real_inputs["input_ids"][0] == value, ids == getattr(config, name)), name
    assert torch.equal(real_inputs["mm_token_type_ids"], inputs["mm_token_type_ids"])


def test_bench_qwen3_vl_reports_qtsplus_against_stock(tmp_path, capsys):
    from qtsplus_hf.benchmark import FIXED_KEEP_RATIO, TIMED_FIELDS, VARIANTS, bench_config, bench_prompt

    report_path = tmp_path / "bench.json"
    code = main(["bench", "--backbone", "qwen3_vl", "--frames", "4", "--resolution", "64", "--repeats", "1",
                 "--new-tokens", "2", "--json", str(report_path), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert [line.split(" frames,")[0].strip() for line in captured.out.splitlines()] == ["4"]
    report = json.loads(report_path.read_text())
    assert report["settings"]["backbone"] == "qwen3_vl" and report["settings"]["config"] == "small"
    (row,) = report["rows"]
    tokens = row["vision_tokens"]
    assert tokens == 4 // 2 * (64 // 16) ** 2 // 4
    prompt_length = bench_prompt(bench_config("small", "qwen3_vl"), 4, 64, 24, 0)["input_ids"].shape[1]
    for variant in VARIANTS:
        result = row[variant]
        for field in TIMED_FIELDS:
            assert result[field] == result["samples"][field][0]
        assert result["time_to_first_token_seconds"] <= result["total_seconds"]
        assert result["vision_encoder_seconds"] > 0
        for field in ("peak_memory_bytes", "vision_peak_memory_bytes", "allocated_peak_memory_bytes",
                      "vision_allocated_peak_memory_bytes"):
            assert isinstance(result[field], int)
        # The merged features and the 3 DeepStack layers' (LM width 320, float32).
        assert result["vision_output_bytes"] == 4 * tokens * 320 * 4
        assert result["vision_allocated_peak_memory_bytes"] >= result["vision_output_bytes"]
        assert result["prefill_length"] == prompt_length - tokens + result["kept_tokens"]
    assert row["stock"]["kept_tokens"] == tokens and row["stock"]["selector_compaction_seconds"] == 0
    assert row["qtsplus_fixed"]["kept_tokens"] == math.ceil(FIXED_KEEP_RATIO * tokens * (1 - 1e-6)) < tokens
    assert 1 <= row["qtsplus_predicted"]["kept_tokens"] < tokens
    for variant in VARIANTS[1:]:
        assert row[variant]["selector_compaction_seconds"] > 0 and 0 < row[variant]["rho"] <= 0.5
        ratio = row["ratio_to_stock"][variant]
        assert ratio["prefill_length"] == row[variant]["prefill_length"] / row["stock"]["prefill_length"] < 1
    assert row["analytic_qtsplus_fixed"]["lm_prefill_qtsplus_flops"] < row["analytic_qtsplus_fixed"][
        "lm_prefill_stock_flops"]


def test_bench_qwen3_vl_refuses_a_qwen2_5_checkpoint_in_one_line(qwen2_5_folder, tmp_path, capsys):
    code = main(["bench", "--backbone", "qwen3_vl", "--model", qwen2_5_folder, "--frames", "2", "--repeats", "1",
                 "--json", str(tmp_path / "bench.json")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--model must be a stock Qwen3-VL checkpoint for --backbone qwen3_vl, got model_type qwen2_5_vl" in err
    assert list(tmp_path.iterdir()) == []


def test_analytic_vision_costs_of_qwen3_match_torch_flop_counter():
    """The vision encoder's analytic FLOPs of Qwen3-VL (two-matrix GELU MLP, a patch merger per DeepStack layer,
    attention within each frame) equal what torch counts (eager attention, so every product is counted); the
    selector's are checked for both backbones in tests/test_bench.py."""
    from torch.utils.flop_counter import FlopCounterMode

    from qtsplus_hf.benchmark import analytic_costs

    stock_config = Qwen3VLConfig(**tiny_qwen3_vl_config_dict())
    stock_config.vision_config._attn_implementation = "eager"
    stock = Qwen3VLForConditionalGeneration(stock_config).eval()
    grid, vision = torch.tensor([[3, 4, 6]]), stock_config.vision_config
    pixels = torch.randn(int(grid.prod()), vision.in_channels * vision.temporal_patch_size * vision.patch_size**2)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        stock.model.get_video_features(pixels, grid)
    costs = analytic_costs(stock_config, int(grid.prod()) // 4, 1, 0, 0, frame_patches=24)
    patch_embedding = 2 * pixels.numel() * vision.hidden_size  # the Conv3d, left out of the formula (< 1 %)
    assert counter.get_total_flops() == costs["vision_encoder_flops"] + patch_embedding
