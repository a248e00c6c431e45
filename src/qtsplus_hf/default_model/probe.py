# Copyright 2026 The qtsplus-hf authors. Licensed under the Apache License, Version 2.0.
"""Short from-scratch probes of the selector's training signals: `python -m qtsplus_hf.default_model.probe ...`.

One run trains the default model's architecture from a fresh initialisation on one synthetic task at a fixed keep
ratio, with the chosen signals (grounding, distillation, exploring gate) and scoring options, and every
`--eval-every` steps prints one JSON line measured on held-out videos: the mean LM and grounding / distillation
losses of the last 20 steps, held-out accuracy at the training keep ratio, and how often the asked object is the
top-scored token under its own question (`top_own`) and under the counterfactual question (`top_counterfactual`).
The figures of docs/design-notes.md ("Measured while making the selector read the question") come from these runs.

It is a plain PyTorch loop (AdamW, linear warm-up over 5% of the steps, gradient clipping at 1.0, like the Trainer's
defaults) rather than `qtsplus_hf.training.train`, so that held-out figures can be taken mid-run without
checkpointing.
"""

import argparse
import json
import sys
import tempfile
import time

import torch

from ..data import VideoQACollator, normalize_row
from ..evaluation import evidence_metrics, predict_text, row_evidence_mask, selection_evidence
from ..hub import save_checkpoint
from ..synthetic import TASKS, generate_sample
from ..training import load_model_and_processor
from . import FRAME_SIZE, HELD_OUT_SEED_START
from .train import build_initial_checkpoint


def probe_row(seed: int, task: str, seconds: int, distractors: str, question: str | None = None) -> dict:
    sample = generate_sample(seed, task, seconds=seconds, frame_size=FRAME_SIZE, distractors=distractors)
    return normalize_row({"video": sample.frames, "fps": sample.fps, "question": question or sample.question,
                          "answer": sample.answer, "type": sample.task, **sample.evidence_columns()})


@torch.no_grad()
def held_out_figures(model, processor, rows: list[dict], keep_ratio: float, question_first: bool) -> dict:
    """Accuracy at `keep_ratio` and the mean evidence figures (own and counterfactual question) over `rows`."""
    model.eval()
    collator = VideoQACollator(processor, with_answers=False, question_first=question_first)
    predictions, correct = [], 0
    merge_size = processor.video_processor.merge_size
    for row in rows:
        batch = collator([row])
        reply, selection = predict_text(model, batch, processor, keep_ratio, max_new_tokens=2)
        correct += reply.strip() == row["answer"]
        evidence = row_evidence_mask(processor, batch, row)
        entry = {"evidence": selection_evidence(selection, evidence, batch, merge_size)}
        if row["counterfactual_question"]:
            other = collator([{**row, "question": row["counterfactual_question"]}])
            entry["evidence_counterfactual"] = selection_evidence(
                model.select(**other, qtsplus_keep_ratio=keep_ratio), evidence, other, merge_size)
        predictions.append(entry)
    model.train()
    metrics = evidence_metrics(predictions)
    return {"accuracy": correct / len(rows), "top_own": metrics["evidence/top_scored"],
            "top_counterfactual": metrics.get("evidence_counterfactual/top_scored"),
            "token_recall": metrics["evidence/token_recall"]}


def run_probe(args: argparse.Namespace, log=print) -> list[dict]:
    overrides = {"qtsplus_score_aggregation": args.score_aggregation,
                 "qtsplus_relevance_embedding": not args.no_relevance_embedding,
                 "qtsplus_lambda_grounding": args.grounding_weight, "qtsplus_lambda_distill": args.distill_weight,
                 "qtsplus_explore_ratio": args.explore_ratio}
    if args.init:  # continue from a saved probe (`--save`): its architecture, these signals
        model, processor = load_model_and_processor(args.init)
        for name in ("qtsplus_lambda_grounding", "qtsplus_lambda_distill", "qtsplus_explore_ratio"):
            setattr(model.config, name, overrides[name])
    else:
        with tempfile.TemporaryDirectory() as folder:
            build_initial_checkpoint(folder, args.seed, **overrides)
            model, processor = load_model_and_processor(folder)
    collator = VideoQACollator(processor, keep_ratio=args.keep_ratio, question_first=args.question_first)
    held_out = [probe_row(HELD_OUT_SEED_START + i, args.task, args.seconds, args.distractors)
                for i in range(args.eval_count)]
    if args.freeze_vision:
        model.model.visual.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=0.0)
    torch.manual_seed(args.seed)
    model.train()
    start, history, results = time.perf_counter(), [], []
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = args.learning_rate * min(1.0, step / max(1.0, 0.05 * args.steps))
        seeds = range(step * args.batch_size, (step + 1) * args.batch_size)
        batch = collator([probe_row(seed, args.task, args.seconds, args.distractors) for seed in seeds])
        if args.oracle_selection:  # keep the evidence tokens first: what the LM learns from a perfect selector
            video = batch["input_ids"] == model.config.video_token_id
            batch["qtsplus_selection_scores"] = [mask[row].float() for mask, row in
                                                 zip(batch["qtsplus_evidence_mask"], video)]
        outputs = model(**batch)
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        history.append([0.0 if getattr(outputs, name) is None else float(getattr(outputs, name).detach())
                        for name in ("lm_loss", "grounding_loss", "distill_loss")])
        if step % args.eval_every == 0 or step == args.steps:
            recent = history[-20:]
            means = [round(sum(values) / len(recent), 3) for values in zip(*recent)]
            result = {"tag": args.tag, "step": step, "seconds": round(time.perf_counter() - start),
                      "lm_loss": means[0], "grounding_loss": means[1], "distill_loss": means[2],
                      **{name: round(value, 3) if value is not None else None for name, value in
                         held_out_figures(model, processor, held_out, args.keep_ratio, args.question_first).items()}}
            log(json.dumps(result))
            results.append(result)
    if args.save:
        save_checkpoint(model, processor, args.save)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Probe how fast the selector learns to read the question.")
    parser.add_argument("--task", choices=TASKS, default="needle")
    parser.add_argument("--seconds", type=int, default=2)
    parser.add_argument("--distractors", choices=("coloured", "grey"), default="coloured")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--keep-ratio", type=float, default=0.25)
    parser.add_argument("--grounding-weight", type=float, default=0.0)
    parser.add_argument("--distill-weight", type=float, default=0.0)
    parser.add_argument("--explore-ratio", type=float, default=0.0)
    parser.add_argument("--score-aggregation", choices=("max", "weighted"), default="weighted")
    parser.add_argument("--no-relevance-embedding", action="store_true")
    parser.add_argument("--question-first", action="store_true", help="the question before the video")
    parser.add_argument("--freeze-vision", action="store_true", help="keep the vision encoder at its initialisation")
    parser.add_argument("--oracle-selection", action="store_true",
                        help="train with the evidence tokens ranked first (the LM's task under a perfect selector)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-count", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, help="write the trained model here")
    parser.add_argument("--init", default=None, help="start from this saved probe instead of a fresh model")
    parser.add_argument("--tag", default="probe")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        run_probe(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
