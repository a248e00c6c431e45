"""The synthetic benchmark report of issue 11: the EVS-style baseline's scores, the targets table computed from the
results, an end-to-end run on the bundled model, and the command line's errors."""

import math

import pytest
import torch

from qtsplus_hf.default_model import default_model_path
from qtsplus_hf.default_model.benchmark import (
    EVS, FIRST_PATCH_SCORE, FULL, PREDICTED, UNIFORM, ablation_row, benchmark, evs_scores, fixed_ratio_row, main,
    render_report,
)
from qtsplus_hf.synthetic import TASKS


torch.set_num_threads(1)


def three_patches_of_2x2() -> torch.Tensor:
    """3 temporal patches of 2 x 2 merged tokens (grid 3 x 4 x 4 at merge size 2), 2-d features."""
    first = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]])
    second = first.clone()
    second[1] = torch.tensor([1.0, 0.0])  # token 1 turns by 90 degrees: 1 - cos = 1
    second[2] = 3 * first[2]  # token 2 only grows: 1 - cos = 0
    third = second.clone()
    third[0] = torch.tensor([1.0, 1.0])  # 45 degrees from [1, 0]: 1 - cos = 1 - 1 / sqrt 2
    third[3] = -second[3]  # reversed: 1 - cos = 2
    return torch.cat([first, second, third])


def test_evs_scores_are_the_change_from_the_same_place_in_the_previous_patch():
    scores = evs_scores(three_patches_of_2x2(), (3, 4, 4), merge_size=2)
    expected = [FIRST_PATCH_SCORE] * 4 + [0.0, 1.0, 0.0, 0.0] + [1 - 1 / math.sqrt(2), 0.0, 0.0, 2.0]
    assert scores.tolist() == pytest.approx(expected, abs=1e-6)


def test_evs_ranks_the_whole_first_patch_first_then_the_largest_change():
    scores = evs_scores(three_patches_of_2x2(), (3, 4, 4), merge_size=2)
    order = scores.argsort(descending=True, stable=True).tolist()
    assert sorted(order[:4]) == [0, 1, 2, 3]  # the first temporal patch, whatever changes later
    assert order[4:7] == [11, 5, 8]  # reversed (2), turned (1), 45 degrees (0.29)
    # Even a first patch that never changes outranks a later token that changes completely.
    still = torch.ones(8, 3)
    still[4] = -1.0
    assert evs_scores(still, (2, 4, 4), 2).argsort(descending=True, stable=True)[:4].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="features must be"):
        evs_scores(torch.zeros(10, 2), (3, 4, 4), 2)


def metrics(overall, kept=0.09, **changes) -> dict:
    shown = {"accuracy": overall, **{f"accuracy/{task}": overall for task in TASKS},
             "localisation_within_1s": overall, "mean_kept_ratio": kept, "mean_latency_s": 0.02,
             "most_common_reply": 0.25, "evidence/count": 4, "evidence/token_recall": 0.95,
             "evidence/second_recall": 1.0, "evidence/top_scored": 0.85, "evidence_counterfactual/count": 4,
             "evidence_counterfactual/top_scored": 0.05, "evidence_gap/top_scored": 0.8}
    shown.update(changes)
    return {name: value for name, value in shown.items() if value is not None}


def targets_of(report: str) -> dict[str, list[str]]:
    """target -> [wanted, measured, met or missed] from the report's targets table."""
    table = report.split("## Targets of issue 11")[1].split("Environment:")[0]
    rows = [line.strip("|").split(" | ") for line in table.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows[1:]}


def test_report_says_met_or_missed_from_the_figures():
    predicted = metrics(0.97, **{"accuracy/order": 0.5, "evidence_counterfactual/top_scored": 0.25})
    results = [
        (PREDICTED, predicted),
        (fixed_ratio_row(0.1), metrics(0.9, kept=0.1)),
        (UNIFORM, metrics(0.7, **{key: None for key in predicted if key.startswith("evidence")})),
        (EVS, metrics(0.77)),  # 0.97 - 0.77 is 19.999... points in floating point: still 20 points
        (ablation_row("no re-encoder"), metrics(0.9, **{"accuracy/order": 0.3})),
        (FULL, metrics(1.0, kept=1.0)),
    ]
    report = render_report(results, 4, 10_000_000, "python -m qtsplus_hf.default_model.benchmark --count 4")
    targets = targets_of(report)
    assert targets["kept ratio at the predicted budget"] == ["<= 15%", "9.0%", "met"]
    assert targets["evidence token recall at the predicted budget (own question)"] == [">= 90%", "95.0%", "met"]
    assert targets["asked object top-scored (own question)"][1:] == ["85.0%", "met"]
    assert targets["asked object top-scored (counterfactual question)"][1:] == ["25.0%", "missed"]
    assert targets["needle at the predicted budget"][1:] == ["97.0%", "met"]
    assert targets["order at the predicted budget"][1:] == ["50.0%", "missed"]
    assert targets["overall vs no selection"][1:] == ["-3.0 points", "met"]
    assert targets["overall vs the query-agnostic baselines at the same token count"][1:] == [
        "uniform +27.0 points, EVS +20.0 points", "met"]
    assert targets["ablation no re-encoder vs the full model"] == [
        "-", "overall -7.0, needle -7.0, order -20.0, localisation -7.0, counting -7.0 points", "-"]
    # The uniform row has no evidence figures; the EVS row has them.
    uniform_line = next(line for line in report.splitlines() if line.startswith(f"| {UNIFORM} |"))
    assert uniform_line.rstrip(" |").endswith("| - | - | - | - | -")
    evs_line = next(line for line in report.splitlines() if line.startswith(f"| {EVS} |"))
    assert evs_line.rstrip(" |").endswith("| 95.0 | 100.0 | 85.0 | 5.0 | +80.0")
    assert "python -m qtsplus_hf.default_model.benchmark --count 4" in report

    # Worse figures turn the same targets to missed.
    results[0] = (PREDICTED, metrics(0.96, kept=0.2, **{"evidence/token_recall": 0.5}))
    results[3] = (EVS, metrics(0.8))
    targets = targets_of(render_report(results, 4, 10_000_000, "cmd"))
    assert targets["kept ratio at the predicted budget"][1:] == ["20.0%", "missed"]
    assert targets["evidence token recall at the predicted budget (own question)"][1:] == ["50.0%", "missed"]
    assert targets["overall vs no selection"][1:] == ["-4.0 points", "missed"]
    assert targets["overall vs the query-agnostic baselines at the same token count"][1:] == [
        "uniform +26.0 points, EVS +16.0 points", "missed"]


def test_benchmark_on_the_bundled_model_gives_evs_the_predicted_token_count_per_row():
    lines = []
    model = default_model_path()
    results = dict(benchmark(model, [("same model", model)], count=4, log=lines.append))
    assert len(lines) == len(results) == 8  # predicted, 3 fixed ratios, uniform, EVS, the ablation, no selection
    predicted, evs = results[PREDICTED], results[EVS]
    kept = [p["kept_tokens"] for p in predicted.predictions]
    assert [p["kept_tokens"] for p in evs.predictions] == kept
    assert [p["total_tokens"] for p in evs.predictions] == [p["total_tokens"] for p in predicted.predictions]
    assert all(0 < k < p["total_tokens"] for k, p in zip(kept, predicted.predictions))
    # EVS does not read the question: the counterfactual question ranks the evidence the same way.
    assert evs.metrics["evidence_gap/top_scored"] == 0.0
    assert "evidence/token_recall" not in results[UNIFORM].metrics
    assert results[FULL].metrics["mean_kept_ratio"] == 1.0 and results[FULL].metrics["evidence/token_recall"] == 1.0
    # The same model as its own ablation: the same answers, so no difference.
    same = results[ablation_row("same model")]
    assert [p["prediction"] for p in same.predictions] == [p["prediction"] for p in predicted.predictions]
    report = render_report([(name, result.metrics) for name, result in results.items()], 4, 10_000_000, "cmd")
    assert "| ablation same model vs the full model | - | overall +0.0," in report


@pytest.mark.parametrize("value, message", [
    ("no-equals-sign", "--ablation must be NAME=DIR"),
    ("=somewhere", "--ablation must be NAME=DIR"),
    ("no re-encoder=/nonexistent/folder", "is not a checkpoint folder"),
])
def test_bad_ablation_is_one_line_error_and_exit_code_2(tmp_path, capsys, value, message):
    output = tmp_path / "report.md"
    assert main(["--ablation", value, "--count", "4", "--output", str(output)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ") and message in error
    assert not output.exists()


def test_main_writes_the_report_with_the_command_that_made_it(tmp_path, capsys):
    output = tmp_path / "report.md"
    model = default_model_path()
    assert main(["--ablation", f"no re-encoder={model}", "--count", "4", "--output", str(output)]) == 0
    report = output.read_text()
    assert (f"python -m qtsplus_hf.default_model.benchmark --ablation 'no re-encoder={model}' --count 4 "
            f"--seed-start 10000000 --output {output}") in report
    assert f"| {ablation_row('no re-encoder')} |" in report and "| met or missed |" in report
    assert [path.name for path in tmp_path.iterdir()] == ["report.md"]  # no temporary file left
    assert len(capsys.readouterr().out.splitlines()) == 8 + 1  # one line per configuration, then "written"
