# Copyright 2026 The qtsplus-hf authors. Licensed under the Apache License, Version 2.0.
"""Video QA evaluation: the model's answer per question, accuracy (overall and per question type), the share of
vision tokens kept, latency and, for rows that say where their evidence is, how the selection treated it.

Multiple-choice rows: the choice is the option letter with the highest logit at the first generated position
(`generate` with one new token), so a model that would go on to write "B. blue" or "B" counts the same; the paper
scores VSCQ this way. Free-form rows: the greedy reply, compared with the answer after `normalize_answer`.
"""

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from transformers.utils.logging import tqdm

from .data import LETTERS, VideoQACollator
from .evidence import evidence_figures, evidence_token_mask, patch_start_seconds


METRIC_PATH = os.path.join(os.path.dirname(__file__), "metrics", "video_qa_accuracy.py")


def option_letter_token_ids(tokenizer, num_options: int) -> list[int]:
    """Token id of each option letter `A`, `B`, ...; ValueError when a letter is not a single token."""
    ids = []
    for letter in LETTERS[:num_options]:
        encoded = tokenizer.encode(letter, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"the option letter {letter!r} is not a single token for this tokenizer: {encoded}")
        ids.append(encoded[0])
    return ids


@dataclass
class EvalResult:
    """`metrics`: accuracy, count, accuracy/<type>, count/<type>, mean_kept_ratio, mean_latency_s,
    mean_load_s, and the evidence figures of `evidence_metrics` for rows with evidence. `predictions`: one dict per
    question."""

    metrics: dict
    predictions: list[dict] = field(default_factory=list)

    def table(self) -> str:
        """The metrics as an aligned two-column text table."""
        width = max(len(name) for name in self.metrics)
        lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  -----"]
        for name, value in self.metrics.items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"{name.ljust(width)}  {shown}")
        return "\n".join(lines)


def _synchronized_clock(device: torch.device) -> float:
    """`time.perf_counter()` once queued GPU work is done, so a timed span covers the computation itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def normalize_answer(text: str) -> str:
    """Case, surrounding white space and a final full stop do not count: `" Red."` -> `"red"`."""
    return text.strip().rstrip(".").strip().lower()


@torch.no_grad()
def predict_text(model, batch: dict, processor, keep_ratio: float | None, max_new_tokens: int,
                 **generate_kwargs) -> tuple[str, object]:
    """The greedy reply to one question, and the selection QTSplus made (None when it is disabled).
    `generate_kwargs` (e.g. `qtsplus_selection_scores`) go on to `generate`."""
    outputs = model.generate(
        **batch, qtsplus_keep_ratio=keep_ratio, max_new_tokens=max_new_tokens, do_sample=False,
        return_dict_in_generate=True, **generate_kwargs,
    )
    reply = outputs.sequences[0, batch["input_ids"].shape[1]:]
    return processor.tokenizer.decode(reply, skip_special_tokens=True), outputs.get("qtsplus")


@torch.no_grad()
def predict_option(model, batch: dict, letter_ids: Sequence[int], keep_ratio: float | None,
                   **generate_kwargs) -> tuple[int, object]:
    """Index of the chosen option for one question, and the selection QTSplus made (None when it is disabled).
    `generate_kwargs` (e.g. `qtsplus_selection_scores`) go on to `generate`."""
    outputs = model.generate(
        **batch, qtsplus_keep_ratio=keep_ratio, max_new_tokens=1, do_sample=False, output_logits=True,
        return_dict_in_generate=True, **generate_kwargs,
    )
    first_logits = outputs.logits[0][0]
    choice = int(first_logits[list(letter_ids)].argmax())
    return choice, outputs.get("qtsplus")


EVIDENCE_FIGURES = ("token_recall", "second_recall", "top_scored")


def row_evidence_mask(processor, batch: dict, row: dict) -> torch.Tensor | None:
    """Bool `[M]` over the row's video tokens (one video per row), or None when the row says nothing of evidence."""
    if not (row.get("evidence_seconds") or row.get("evidence_boxes")):
        return None
    video_processor = processor.video_processor
    return evidence_token_mask(
        batch["video_grid_thw"][0].tolist(), patch_start_seconds(batch, 0, video_processor.temporal_patch_size),
        video_processor.merge_size, row.get("evidence_seconds"), row.get("evidence_boxes"),
    )


def selection_evidence(selection, evidence: torch.Tensor, batch: dict, merge_size: int) -> dict[str, float] | None:
    """`evidence_figures` of the first video of a selection."""
    _, grid_h, grid_w = batch["video_grid_thw"][0].tolist()
    return evidence_figures(selection.scores[0], selection.kept_indices[0], evidence,
                            (grid_h // merge_size) * (grid_w // merge_size))


@torch.no_grad()
def counterfactual_evidence(model, processor, collator: VideoQACollator, row: dict, evidence: torch.Tensor,
                            keep_ratio: float | None, device: torch.device,
                            selection_scores: list[torch.Tensor] | None = None) -> dict[str, float] | None:
    """The evidence figures of the row's evidence under its `counterfactual_question` (same video, same budget
    rule): a selector that reads the question keeps and ranks that evidence far less often. `selection_scores`
    (one `[M_v]` tensor per video, of the same video): rank by these, as `generate` did for the row."""
    question = row.get("counterfactual_question")
    if not question:
        return None
    batch = {name: value.to(device) for name, value in collator([{**row, "question": question}]).items()}
    selection = model.select(**batch, qtsplus_keep_ratio=keep_ratio, qtsplus_selection_scores=selection_scores)
    return selection_evidence(ranked_by(selection, selection_scores), evidence, batch,
                              processor.video_processor.merge_size)


def ranked_by(selection, selection_scores: list[torch.Tensor] | None):
    """The selection with the scores that chose its tokens: `selection_scores` when given (a baseline's ranking),
    else the selector's relevance."""
    if selection is None or selection_scores is None:
        return selection
    return replace(selection, scores=[scores.detach() for scores in selection_scores])


def evidence_metrics(predictions: Sequence[dict]) -> dict[str, float]:
    """Means over the rows with evidence: `evidence/<figure>` under the row's own question,
    `evidence_counterfactual/<figure>` under its counterfactual one, `evidence_gap/<figure>` = own − counterfactual
    over the rows that have both, and the counts (`evidence/count`, `evidence_counterfactual/count`)."""
    own = [p["evidence"] for p in predictions if p.get("evidence")]
    metrics = {}
    if not own:
        return metrics
    metrics["evidence/count"] = len(own)
    for figure in EVIDENCE_FIGURES:
        metrics[f"evidence/{figure}"] = sum(e[figure] for e in own) / len(own)
    paired = [p for p in predictions if p.get("evidence") and p.get("evidence_counterfactual")]
    if paired:
        metrics["evidence_counterfactual/count"] = len(paired)
        for figure in EVIDENCE_FIGURES:
            counterfactual = sum(p["evidence_counterfactual"][figure] for p in paired) / len(paired)
            own_paired = sum(p["evidence"][figure] for p in paired) / len(paired)
            metrics[f"evidence_counterfactual/{figure}"] = counterfactual
            metrics[f"evidence_gap/{figure}"] = own_paired - counterfactual
    return metrics


def predict_row(model, processor, batch: dict, row: dict, keep_ratio: float | None,
                max_new_tokens: int, **generate_kwargs) -> tuple[str, str, object]:
    """(prediction, reference, selection) for one row: option letters for multiple choice, normalised text
    otherwise."""
    if row.get("options"):
        letter_ids = option_letter_token_ids(processor.tokenizer, len(row["options"]))
        choice, selection = predict_option(model, batch, letter_ids, keep_ratio, **generate_kwargs)
        return LETTERS[choice], row["answer_letter"], selection
    reply, selection = predict_text(model, batch, processor, keep_ratio, max_new_tokens, **generate_kwargs)
    return normalize_answer(reply), normalize_answer(row["answer"]), selection


def evaluate_video_qa(
    model, processor, rows: Sequence[dict], keep_ratio: float | None = None, fps: float | None = None,
    max_frames: int | None = None, max_new_tokens: int = 16, with_evidence: bool = True,
    keep_ratios: Sequence[float] | None = None,
    selection_scores: Callable[[object, dict], list[torch.Tensor]] | None = None, progress_desc: str = "eval",
) -> EvalResult:
    """Accuracy of `model` on normalised rows (`qtsplus_hf.data.normalize_row`), multiple-choice and free-form,
    one at a time, on the device the model is on.

    Rows with `evidence_seconds` / `evidence_boxes` (and QTSplus on) also get the evidence figures of the selection
    that answered them and, with a `counterfactual_question`, of the selection that question makes on the same
    video (`evidence_metrics`); `with_evidence=False` skips them.

    `keep_ratios` (one per row) overrides `keep_ratio` row by row. `selection_scores(model, batch)` (the batch of
    one row, on the model's device) returns one `[M_v]` tensor per video that ranks the tokens instead of the
    selector's relevance (`qtsplus_selection_scores` of `generate`: a query-agnostic baseline through the same
    model); the evidence figures then use those scores, and computing them counts in `load_s`, not `latency_s`.

    `latency_s` is the model's time to the answer (vision encoder, selector, prefill and, for free-form rows, the
    generated tokens), after one untimed warm-up question; `load_s` is decoding and preprocessing the video.

    A progress bar (`progress_desc`, one step per row) goes to stderr: transformers' `tqdm`, off after
    `transformers.utils.logging.disable_progress_bar()` or with `HF_HUB_DISABLE_PROGRESS_BARS=1`.
    """
    import evaluate

    if not rows:
        raise ValueError("no rows to evaluate")
    if keep_ratios is not None and len(keep_ratios) != len(rows):
        raise ValueError(f"keep_ratios must hold one ratio per row ({len(rows)}), got {len(keep_ratios)}")
    ratios = [keep_ratio] * len(rows) if keep_ratios is None else [float(ratio) for ratio in keep_ratios]
    collator = VideoQACollator(processor, fps=fps, max_frames=max_frames, with_answers=False)
    model.eval()
    device = next(model.parameters()).device

    def ranking(batch: dict) -> list[torch.Tensor] | None:
        if selection_scores is None:
            return None
        with torch.no_grad():
            return selection_scores(model, batch)

    def extra(scores: list[torch.Tensor] | None) -> dict:
        return {} if scores is None else {"qtsplus_selection_scores": scores}

    warm_up = {name: value.to(device) for name, value in collator(rows[:1]).items()}
    predict_row(model, processor, warm_up, rows[0], ratios[0], max_new_tokens, **extra(ranking(warm_up)))
    predictions = []
    for row, ratio in tqdm(zip(rows, ratios), total=len(rows), desc=progress_desc, unit="question"):
        start = time.perf_counter()
        batch = {name: value.to(device) for name, value in collator([row]).items()}
        scores = ranking(batch)
        loaded = _synchronized_clock(device)
        prediction, reference, selection = predict_row(model, processor, batch, row, ratio, max_new_tokens,
                                                       **extra(scores))
        done = _synchronized_clock(device)
        total = int((batch["input_ids"] == model.config.video_token_id).sum())
        kept = sum(selection.num_kept) if selection is not None else total
        predictions.append({
            "question": row["question"], "type": row.get("type"), "prediction": prediction, "answer": reference,
            "kept_tokens": kept, "total_tokens": total, "kept_ratio": kept / max(total, 1),
            "latency_s": done - loaded, "load_s": loaded - start,
        })
        evidence = row_evidence_mask(processor, batch, row) if with_evidence and selection is not None else None
        if evidence is not None:
            merge_size = processor.video_processor.merge_size
            predictions[-1]["evidence"] = selection_evidence(ranked_by(selection, scores), evidence, batch, merge_size)
            predictions[-1]["evidence_counterfactual"] = counterfactual_evidence(
                model, processor, collator, row, evidence, ratio, device, scores
            )
    types = [p["type"] if p["type"] is not None else "untyped" for p in predictions]
    metric = evaluate.load(METRIC_PATH)
    metrics = metric.compute(
        predictions=[p["prediction"] for p in predictions], references=[p["answer"] for p in predictions],
        question_types=types if any(p["type"] is not None for p in predictions) else None,
        kept_ratios=[p["kept_ratio"] for p in predictions],
    )
    metrics["mean_latency_s"] = sum(p["latency_s"] for p in predictions) / len(predictions)
    metrics["mean_load_s"] = sum(p["load_s"] for p in predictions) / len(predictions)
    metrics.update(evidence_metrics(predictions))
    return EvalResult(metrics=metrics, predictions=predictions)


__all__ = [
    "EVIDENCE_FIGURES", "EvalResult", "counterfactual_evidence", "evaluate_video_qa", "evidence_metrics",
    "normalize_answer", "option_letter_token_ids", "predict_option", "predict_row", "predict_text", "ranked_by",
]
