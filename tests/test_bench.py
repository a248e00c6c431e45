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
                assert len(result["samples"][field]) == 1
                assert result[field] == result["samples"][field][0]  # the median of one sample
            assert result["time_to_first_token_seconds"] <= result["total_seconds"]
            assert result["vision_encoder_seconds"] > 0
            for field in ("peak_memory_bytes", "vision_peak_memory_bytes", "allocated_peak_memory_bytes",
                          "vision_allocated_peak_memory_bytes"):
                assert isinstance(result[field], int)  # the probes themselves: tested on known runs below
            # The vision stage's allocated peak holds at least its output; the whole generate runs that stage and
            # more (the LM, with the video features live), so its peak is higher.
            assert result["vision_allocated_peak_memory_bytes"] >= result["vision_output_bytes"]
            assert result["allocated_peak_memory_bytes"] > result["vision_allocated_peak_memory_bytes"]
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
                                  "peak_memory_bytes", "vision_peak_memory_bytes", "allocated_peak_memory_bytes",
                                  "vision_allocated_peak_memory_bytes"}
            assert ratio["allocated_peak_memory_bytes"] == (
                row[variant]["allocated_peak_memory_bytes"] / row["stock"]["allocated_peak_memory_bytes"]
            )
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


def test_rss_probe_reports_the_peak_of_the_run_alone():
    """The CPU memory probe of `qtsplus bench` on a known run: a 64 MiB block freed before a 16 MiB one reads as
    64 MiB (the high-water mark, not the sum nor what is left), and an earlier, higher peak of the process does
    not count."""
    import numpy as np

    from qtsplus_hf.benchmark import _peak_rss_delta

    mib = 1 << 20
    earlier = np.ones(160 * mib, np.uint8)
    del earlier

    def run():
        block = np.ones(64 * mib, np.uint8)  # np.ones writes every page (np.zeros would leave them untouched)
        del block
        np.ones(16 * mib, np.uint8)

    assert 60 * mib <= _peak_rss_delta(run) <= 70 * mib


def qwen3_config_with_a_wide_query():
    from qtsplus_hf import QTSplusQwen3VLConfig
    from qtsplus_hf.tiny import tiny_qwen3_vl_config_dict

    text = dict(tiny_qwen3_vl_config_dict()["text_config"], head_dim=32)  # 4 heads of 32: query width 128 vs 64
    return QTSplusQwen3VLConfig(**tiny_qwen3_vl_config_dict(text_config=text))


@pytest.mark.parametrize("backbone", ["qwen2_5_vl", "qwen3_vl"])
def test_analytic_selector_flops_match_torch_flop_counter(backbone):
    """Qwen3-VL: with its head_dim the query width (heads x head_dim) differs from the model width."""
    from torch.utils.flop_counter import FlopCounterMode

    from qtsplus_hf.benchmark import analytic_costs
    from qtsplus_hf.selector_qtsplus import QTSplusSelector
    from qtsplus_hf.tiny import tiny_qtsplus_config

    config = tiny_qtsplus_config() if backbone == "qwen2_5_vl" else qwen3_config_with_a_wide_query()
    selector = QTSplusSelector(config).eval()
    video, query = torch.randn(1, 200, 64), torch.randn(1, 7, 64)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        keep, *_ = selector(video, torch.ones(1, 200, dtype=torch.bool), query, torch.ones(1, 7, dtype=torch.bool),
                            torch.zeros(1, 200), keep_ratio=0.11)
    kept = int(keep.sum())
    # All timestamps are 0: the time embedding projects one.
    costs = analytic_costs(config, vision_tokens=200, kept_tokens=kept, text_tokens=9, question_tokens=7,
                           kept_timestamps=1)
    # The counter has no formula for the CPU flash-attention kernel of the re-encoder: add its 4 n^2 (H d) by hand.
    query_width = config.text_config.num_attention_heads * selector.scoring_layers[0].head_dim
    assert counter.get_total_flops() + 4 * kept * kept * query_width == costs["selector_flops"]


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


def test_allocated_peak_is_exact_and_the_same_on_every_run():
    """The allocator-level peak beside RSS: exact on a known sequence of tensors, and equal on repeated runs of a
    whole QTSplus generate (RSS of the same run varies by tens of percent, docs/performance.md)."""
    from qtsplus_hf import QTSplusQwen2_5_VLForConditionalGeneration
    from qtsplus_hf.benchmark import allocated_peak_bytes
    from qtsplus_hf.tiny import tiny_qtsplus_config, video_prompt_batch

    kept = []

    def known():
        first = torch.ones(1000)  # 4,000 bytes live
        second = torch.add(first, first)  # 8,000
        del first  # 4,000
        third = torch.ones(3000)  # 16,000: the peak
        del third  # 4,000
        kept.append(second)

    assert allocated_peak_bytes(known) == 16_000
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        config = tiny_qtsplus_config()
        model = QTSplusQwen2_5_VLForConditionalGeneration(config).eval()
        batch = video_prompt_batch([[(4, 4, 4)]], [4], config)
        settings = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, qtsplus_keep_ratio=0.25)
        with torch.no_grad():
            model.generate(**batch, **settings)  # warm-up: lazy first-call allocations
            peaks = [allocated_peak_bytes(lambda: model.generate(**batch, **settings)) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    assert peaks[0] > 0 and peaks == [peaks[0]] * 3, peaks


RELEASED_STUB = '''
import math
import torch

calls = []


class QTSplus(torch.nn.Module):
    """Stands in for the released selector: keeps the first ceil(rho M) tokens its budget head asks for."""

    def __init__(self, d_model, n_heads=8, n_kv_heads=None, nmax=2560, **kwargs):
        super().__init__()
        self.shape = (d_model, n_heads, n_kv_heads)
        self.budget = None

    def forward(self, Xv, Qt, mode="train"):
        calls.append((self.shape, tuple(Xv.shape), tuple(Qt.shape), mode))
        rho = self.budget(Qt.mean(1), None, Xv.new_zeros(Xv.shape[0]), None)
        n = int(torch.ceil(rho * Xv.shape[1])[0])
        return {"indices": [torch.arange(n)], "Z": [Xv[0, :n]]}
'''


def test_bench_selector_profile_times_ours_alternating_with_a_released_checkout(tmp_path, capsys):
    """`qtsplus bench --selector-profile`: the selector alone at the given width, heads, question length and kept
    counts, and the released selector (here a stub in a checkout's layout) at the same settings, in turn."""
    import sys

    from qtsplus_hf.benchmark import RELEASED_SELECTOR_FILE

    stub = tmp_path / "checkout" / RELEASED_SELECTOR_FILE
    stub.parent.mkdir(parents=True)
    stub.write_text(RELEASED_STUB)
    report_path = tmp_path / "selector.json"
    args = ["bench", "--selector-profile", "64,96", "--selector-width", "32", "--selector-heads", "4",
            "--selector-kv-heads", "2", "--selector-question-tokens", "3", "--repeats", "2", "--threads", "1"]
    assert main([*args, "--selector-kept", "10,96", "--released-selector", str(tmp_path / "checkout"),
                 "--json", str(report_path)]) == 0, capsys.readouterr().err
    rows = json.loads(report_path.read_text())["rows"]
    assert [(row["num_tokens"], row["kept_tokens"]) for row in rows] == [(64, 10), (96, 96)]
    for row in rows:
        assert (row["hidden_size"], row["heads"], row["kv_heads"], row["question_tokens"]) == (32, 4, 2, 3)
        assert len(row["samples"]["ours"]) == len(row["samples"]["released"]) == 2
        assert row["ratio_to_released"] == pytest.approx(row["selector_seconds"] / row["released_selector_seconds"])
    released = sys.modules["qtsplus_released_selector"]
    # One check call, then one per repeat, each at our sizes and in inference mode.
    assert released.calls == [((32, 4, 2), (1, m, 32), (1, 3, 32), "infer") for m in (64,) * 3 + (96,) * 3]
    assert capsys.readouterr().out.count("ratio") == 2

    assert main([*args, "--selector-keep-ratio", "0.5"]) == 0  # no released checkout: ours alone
    assert "n=32 " in capsys.readouterr().out
    assert main([*args, "--selector-kept", "10"]) == 2  # one count per size
    assert main([*args, "--released-selector", str(tmp_path)]) == 2  # not a checkout
