"""`qtsplus bench` end to end on the smallest random config (not timed: only structure and consistency)."""

import json
import math

import pytest
import torch

from qtsplus_hf.benchmark import BENCH_CONFIGS, FIXED_KEEP_RATIO, TIMED_FIELDS, VARIANTS, bench_config
from qtsplus_hf.cli import main


def test_bench_configs_keep_the_3b_proportions():
    for name in BENCH_CONFIGS:
        config = bench_config(name)
        text, vision = config.text_config, config.vision_config
        head_dim = text.hidden_size // text.num_attention_heads
        assert (text.num_attention_heads, text.num_key_value_heads) == (16, 2)
        section = text.rope_parameters["mrope_section"]
        assert sum(section) == head_dim // 2 and section[1] == section[2] == 1.5 * section[0]  # 16:24:24
        assert vision.out_hidden_size == text.hidden_size and vision.patch_size == 14
        vision_params = vision.depth * (4 * vision.hidden_size**2 + 3 * vision.hidden_size * vision.intermediate_size)
        text_params = text.num_hidden_layers * (
            2 * text.hidden_size**2 + 2 * text.hidden_size * head_dim * text.num_key_value_heads
            + 3 * text.hidden_size * text.intermediate_size
        )
        assert text_params > 3 * vision_params


def test_bench_writes_every_field_and_a_plot(tmp_path, capsys):
    report_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main([
        "bench", "--config", "small", "--frames", "4,2", "--resolution", "56", "--repeats", "1", "--new-tokens", "2",
        "--vision-chunk-frames", "2", "--json", str(report_path), "--plot", str(plot_path),
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # One bar per frame count on stderr (3 variants x (1 timed run + 1 memory measurement)); stdout: one line each.
    assert "bench 2 frames: 100%" in captured.err and "bench 4 frames: 100%" in captured.err
    assert captured.err.count("6/6") >= 2
    assert [line.split(" frames,")[0].strip() for line in captured.out.splitlines()] == ["2", "4"]
    report = json.loads(report_path.read_text())
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["settings"]["frames"] == [2, 4] and report["settings"]["fixed_keep_ratio"] == FIXED_KEEP_RATIO
    assert report["environment"]["torch"] == torch.__version__
    assert [row["frames"] for row in report["rows"]] == [2, 4]
    for row in report["rows"]:
        tokens = row["vision_tokens"]
        assert tokens == row["frames"] // 2 * 4 * 4 // 4  # 56 px / patch 14 = 4 x 4 patches, merge 2
        for variant in VARIANTS:
            result = row[variant]
            for field in TIMED_FIELDS:
                assert result[field] >= 0 and len(result["samples"][field]) == 1
                assert result[field] == result["samples"][field][0]  # the median of one sample
            assert result["time_to_first_token_seconds"] <= result["total_seconds"]
            assert result["vision_encoder_seconds"] > 0
            for field in ("peak_memory_bytes", "vision_peak_memory_bytes"):
                assert isinstance(result[field], int) and result[field] >= 0
            assert result["vision_output_bytes"] == tokens * 256 * 4  # small: LM width 256, float32
            # Prefill = the prompt's text + vision markers + the kept video tokens.
            assert result["prefill_length"] == 8 + 24 + 2 + result["kept_tokens"]
        assert row["stock"]["kept_tokens"] == tokens and row["stock"]["selector_compaction_seconds"] == 0
        assert row["qtsplus_fixed"]["kept_tokens"] == math.ceil(FIXED_KEEP_RATIO * tokens * (1 - 1e-6))
        assert 1 <= row["qtsplus_predicted"]["kept_tokens"] <= tokens
        assert row["qtsplus_predicted"]["selector_compaction_seconds"] > 0
        for variant in VARIANTS[1:]:
            ratio = row["ratio_to_stock"][variant]
            assert ratio["prefill_length"] == row[variant]["prefill_length"] / row["stock"]["prefill_length"]
            assert ratio["time_to_first_token_seconds"] == pytest.approx(
                row[variant]["time_to_first_token_seconds"] / row["stock"]["time_to_first_token_seconds"]
            )
            assert set(ratio) == {"prefill_length", "time_to_first_token_seconds", "total_seconds",
                                  "peak_memory_bytes", "vision_peak_memory_bytes"}
            assert row[variant]["selector_compaction_share"] == pytest.approx(
                row[variant]["selector_compaction_seconds"] / row[variant]["total_seconds"]
            )


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--resolution", "50"], "multiple of 28"),
        (["--frames", "3"], "multiples of 2"),
        (["--vision-chunk-frames", "3"], "qtsplus_vision_chunk_frames"),
    ],
)
def test_bench_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, arguments, message):
    report_path = tmp_path / "bench.json"
    code = main(["bench", "--frames", "2", "--resolution", "28", "--repeats", "1", "--new-tokens", "1",
                 "--json", str(report_path), *arguments])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_analytic_selector_flops_match_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from qtsplus_hf.benchmark import analytic_costs
    from qtsplus_hf.modeling_qtsplus_qwen2_5_vl import QTSplusSelector
    from qtsplus_hf.tiny import tiny_qtsplus_config

    config = tiny_qtsplus_config()
    selector = QTSplusSelector(config).eval()
    video, query = torch.randn(1, 200, 64), torch.randn(1, 7, 64)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        keep, *_ = selector(video, torch.ones(1, 200, dtype=torch.bool), query, torch.ones(1, 7, dtype=torch.bool),
                            torch.zeros(1, 200), keep_ratio=0.11)
    kept = int(keep.sum())
    costs = analytic_costs(config, vision_tokens=200, kept_tokens=kept, text_tokens=9, question_tokens=7)
    # The counter has no formula for the CPU flash-attention kernel of the re-encoder: add its 4 n^2 D by hand.
    assert counter.get_total_flops() + 4 * kept * kept * 64 == costs["selector_flops"]


def test_bench_pipeline_batch_sizes_report_throughput_of_identical_results(tmp_path, capsys):
    """`qtsplus bench --pipeline-batch-sizes`: the bundled model's pipeline at batch 1 and 2 on the same videos; the
    run itself fails if batching changes an answer or a selection."""
    from qtsplus_hf.cli import main

    report_path = tmp_path / "pipeline.json"
    assert main(["bench", "--pipeline-batch-sizes", "2,1", "--pipeline-videos", "3", "--repeats", "1",
                 "--json", str(report_path), "--no-progress"]) == 0
    report = json.loads(report_path.read_text())
    assert [row["batch_size"] for row in report["rows"]] == [1, 2] and report["videos"] == 3
    assert capsys.readouterr().out.count("videos/s") == 2
