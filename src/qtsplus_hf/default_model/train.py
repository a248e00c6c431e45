# Copyright 2026 The qtsplus-hf authors. Licensed under the Apache License, Version 2.0.
"""Train the bundled default model from scratch: `python -m qtsplus_hf.default_model.train --output DIR`.

A tiny Qwen2.5-VL-shaped QTSplus (vision encoder, 4-layer LM, selector and re-encoder) with an offline tokenizer for
the synthetic tasks' words is built, saved, and trained through `qtsplus_hf.training.train` in stages, each starting
from the previous stage's folder (a curriculum, `STAGES`): the needle task on 2-second videos, every task on
8-second videos, every task on 32-second videos, all at fixed keep ratios (the LM sees only what the selector keeps),
and last the predicted budget, where the budget head learns ρ against the auxiliary FLOPs / KV losses.

Training videos are `qtsplus_hf.synthetic` samples generated on the fly from seeds below `HELD_OUT_SEED_START`;
after every stage the held-out accuracy per task is printed (measured, not inferred from the loss).
Everything is seeded; results are repeatable on the same machine and library versions.
"""

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import transformers

from ..data import normalize_row
from ..evaluation import evaluate_video_qa
from ..hub import save_checkpoint
from ..modeling_qtsplus_qwen2_5_vl import QTSplusQwen2_5_VLForConditionalGeneration
from ..processing_qtsplus import chat_turn_settings
from ..synthetic import TASKS, generate_sample, synthetic_tokenizer
from ..tiny import tiny_processor, tiny_qtsplus_config
from ..training import TrainOptions, load_model_and_processor, train
from . import FRAME_SIZE, HELD_OUT_SEED_START, VIDEO_SECONDS


@dataclass(frozen=True)
class Stage:
    name: str
    seconds: int
    keep_ratio: float | None  # None: the predicted budget
    steps: int
    learning_rate: float
    tasks: tuple[str, ...] = TASKS
    batch_size: int = 16
    distractors: str = "coloured"  # `generate_sample`'s option: "grey" only for the LM's warm-up
    # The selector's training signals (`TrainOptions` / `qtsplus train` options of the same names).
    grounding_weight: float = 0.0
    distill_weight: float = 0.0
    explore_ratio: float = 0.0


# Measured on 2 cores with `python -m qtsplus_hf.default_model.probe` (docs/design-notes.md). With coloured
# distractors a from-scratch LM stayed at chance for 200-600 steps even when it was shown only the evidence token (an
# oracle selection, one kept token); with grey distractors it answered 100% within 200 steps. Warmed up that way on
# grey videos, it then kept answering coloured needles (94% held-out after 300 more steps at one kept token) while
# the grounding loss taught the selector which shape the question names (asked object top-scored 100%, under the
# counterfactual question 0%). The weighted question aggregation learns that binding within 100-200 steps where the
# released form (max over question tokens) stayed at 60-90% top-scored. So: the needle task on 2-second grey videos
# at one kept token, then coloured ones, then more kept tokens (the LM must use the relevance embedding to tell the
# evidence from kept distractors), then every task on 8-second and 32-second videos, then the predicted budget.
# Selection is on throughout: the LM only ever sees what the selector keeps.
GROUNDING_WEIGHT = 0.5
ONE_TOKEN = 0.03  # ceil(0.03 * 32) = 1 of a 2-second video's 32 tokens
STAGES = (
    Stage("needle-2s-grey-1-token", 2, ONE_TOKEN, 200, 1e-3, ("needle",), distractors="grey",
          grounding_weight=GROUNDING_WEIGHT),
    Stage("needle-2s-1-token", 2, ONE_TOKEN, 400, 1e-3, ("needle",), grounding_weight=GROUNDING_WEIGHT),
    Stage("needle-2s-0.1", 2, 0.1, 400, 1e-3, ("needle",), grounding_weight=GROUNDING_WEIGHT),
    Stage("all-tasks-8s-0.05", 8, 0.05, 1500, 1e-3, grounding_weight=GROUNDING_WEIGHT),
    Stage("all-tasks-32s-0.05", VIDEO_SECONDS, 0.05, 300, 3e-4, batch_size=8, grounding_weight=GROUNDING_WEIGHT),
    Stage("predicted-budget-32s", VIDEO_SECONDS, None, 150, 2e-4, batch_size=8, grounding_weight=GROUNDING_WEIGHT),
)
# Tokens per video at 32 px and 2 fps: (32 / 8)^2 = 16 per second, 512 for 32 s.
MODEL_SETTINGS = dict(
    qtsplus_rho_min=0.05,
    qtsplus_rho_max=0.15,
    qtsplus_max_tokens=96,
    qtsplus_budget_hidden_size=64,
    qtsplus_time_embedding_dim=32,
    qtsplus_score_aggregation="weighted",
    qtsplus_relevance_embedding=True,
)


def tiny_model_config(num_reencode_layers: int = 1, **overrides):
    """~1M parameters: vision depth 2 / width 64, LM 4 layers / width 128, vocabulary of the synthetic tokenizer.
    `overrides`: `qtsplus_*` settings that replace `MODEL_SETTINGS` (the ablations)."""
    tokenizer = synthetic_tokenizer(max_seconds=VIDEO_SECONDS)
    vocab_size = 64 * -(-len(tokenizer) // 64)
    config = tiny_qtsplus_config(
        vision_config=dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128, patch_size=4,
            temporal_patch_size=2, spatial_merge_size=2, window_size=8, fullatt_block_indexes=[],
            tokens_per_second=2,
        ),
        text_config=dict(
            vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
            bos_token_id=0, eos_token_id=2, pad_token_id=0,
        ),
        qtsplus_num_reencode_layers=num_reencode_layers,
        **chat_turn_settings(tokenizer),
        **{**MODEL_SETTINGS, **overrides},
    )
    return config, tokenizer


def build_initial_checkpoint(directory: str, seed: int, num_reencode_layers: int = 1, **overrides) -> None:
    """Randomly initialised model + processor (pixels normalised like Qwen's, frames not resized) in `directory`."""
    config, tokenizer = tiny_model_config(num_reencode_layers, **overrides)
    torch.manual_seed(seed)
    model = QTSplusQwen2_5_VLForConditionalGeneration(config)
    processor = tiny_processor(min_pixels=FRAME_SIZE * FRAME_SIZE, max_pixels=FRAME_SIZE * FRAME_SIZE,
                               tokenizer=tokenizer)
    save_checkpoint(model, processor, directory)


def synthetic_row(seed: int, seconds: int = VIDEO_SECONDS, task: str | None = None,
                  distractors: str = "coloured") -> dict:
    """A raw row with frames in memory for `seed` (task `TASKS[seed % 4]` unless given), with its evidence columns
    (`evidence_seconds`, `evidence_boxes`, `counterfactual_question`)."""
    sample = generate_sample(seed, task, seconds=seconds, frame_size=FRAME_SIZE, distractors=distractors)
    return {"video": sample.frames, "fps": sample.fps, "question": sample.question, "answer": sample.answer,
            "type": sample.task, "seed": sample.seed, **sample.evidence_columns()}


class SyntheticVideoQA(torch.utils.data.Dataset):
    """Rows generated on demand from seeds `first_seed .. first_seed + length - 1`, cycling through `tasks`."""

    def __init__(self, first_seed: int, length: int, seconds: int, tasks: tuple[str, ...] = TASKS,
                 distractors: str = "coloured") -> None:
        if first_seed + length > HELD_OUT_SEED_START:
            raise ValueError("training seeds would reach into the held-out range")
        self.first_seed, self.length, self.seconds, self.tasks = first_seed, length, seconds, tasks
        self.distractors = distractors

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        seed = self.first_seed + index
        return synthetic_row(seed, self.seconds, self.tasks[seed % len(self.tasks)], self.distractors)


def held_out_rows(count: int, seconds: int = VIDEO_SECONDS, start: int = HELD_OUT_SEED_START,
                  tasks: tuple[str, ...] = TASKS) -> list[dict]:
    """`count` normalised held-out rows, seed `s` asking task `tasks[s % len(tasks)]` (so `TASKS[s % 4]` by
    default, as `generate_sample` does)."""
    seeds = range(start, start + count)
    return [normalize_row(synthetic_row(seed, seconds, tasks[seed % len(tasks)])) for seed in seeds]


def held_out_accuracy(directory: str, count: int, seconds: int, keep_ratio: float | None,
                      tasks: tuple[str, ...] = TASKS, progress_desc: str = "eval held-out") -> dict:
    model, processor = load_model_and_processor(directory)
    rows = held_out_rows(count, seconds, tasks=tasks)
    metrics = evaluate_video_qa(model, processor, rows, keep_ratio=keep_ratio, progress_desc=progress_desc).metrics
    shown = {"accuracy": metrics["accuracy"], "mean_kept_ratio": metrics["mean_kept_ratio"]}
    shown.update({task: metrics[f"accuracy/{task}"] for task in tasks})
    # What the selector does with the question: the asked object top-scored under its own / another question.
    for name in ("evidence/token_recall", "evidence/top_scored", "evidence_counterfactual/top_scored"):
        if name in metrics:
            shown[name] = metrics[name]
    return {name: round(value, 3) for name, value in shown.items()}


def ablated_stages(stages=STAGES, **signals) -> tuple[Stage, ...]:
    """`stages` with the given training signals (`grounding_weight`, `distill_weight`, `explore_ratio`) replaced in
    every stage (None: kept)."""
    changes = {name: value for name, value in signals.items() if value is not None}
    return tuple(dataclasses.replace(stage, **changes) for stage in stages)


def train_default_model(
    output: str, seed: int = 0, num_reencode_layers: int = 1, stages=STAGES, steps_scale: float = 1.0,
    eval_count: int = 64, log=print, **model_overrides,
) -> list[dict]:
    """Run the whole curriculum into `output` (a new or empty folder); returns one summary per stage.
    `model_overrides`: `qtsplus_*` settings of the initial model (e.g. `qtsplus_time_embedding=False`)."""
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ValueError(f"output {output} exists and is not an empty folder")
    work = tempfile.mkdtemp(prefix=".qtsplus-default-", dir=os.path.dirname(os.path.abspath(output)))
    summaries = []
    try:
        previous = os.path.join(work, "initial")
        build_initial_checkpoint(previous, seed, num_reencode_layers, **model_overrides)
        next_seed = 0
        for index, stage in enumerate(stages):
            steps = max(1, round(stage.steps * steps_scale))
            folder = os.path.join(work, f"stage{index}")
            rows = SyntheticVideoQA(next_seed, steps * stage.batch_size, stage.seconds, stage.tasks, stage.distractors)
            next_seed += len(rows)  # every training video is new
            options = TrainOptions(
                model=previous, data="", output=folder, mode="full", max_steps=steps, batch_size=stage.batch_size,
                learning_rate=stage.learning_rate, warmup_steps=0.05, keep_ratio=stage.keep_ratio,
                logging_steps=max(1, steps // 5), seed=seed + index, grounding_weight=stage.grounding_weight,
                distill_weight=stage.distill_weight, explore_ratio=stage.explore_ratio,
            )
            start = time.perf_counter()
            result = train(options, rows=rows)
            seconds = time.perf_counter() - start
            losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
            accuracy = held_out_accuracy(folder, eval_count, stage.seconds, stage.keep_ratio, stage.tasks,
                                         progress_desc=f"eval {stage.name}")
            summary = {"stage": stage.name, "steps": steps, "train_seconds": round(seconds, 1),
                       "last_logged_loss": losses[-1] if losses else None, "held_out": accuracy}
            log(json.dumps(summary))
            summaries.append(summary)
            previous = folder
        os.makedirs(output, exist_ok=True)
        for name in os.listdir(previous):
            shutil.move(os.path.join(previous, name), os.path.join(output, name))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summaries


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train the bundled default QTSplus model on synthetic videos.")
    parser.add_argument("--output", required=True, help="new (or empty) folder for the checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-reencode-layers", type=int, default=1, help="0: the ablation without re-encoder")
    parser.add_argument("--no-time-embedding", action="store_true", help="the ablation without absolute time")
    parser.add_argument("--score-aggregation", choices=("max", "weighted"), default=None,
                        help="the ablation with the released form (max) of the question aggregation")
    parser.add_argument("--no-relevance-embedding", action="store_true",
                        help="the ablation whose LM does not see the kept tokens' relevance")
    parser.add_argument("--grounding-weight", type=float, default=None,
                        help="replace every stage's grounding weight (0: LM loss only)")
    parser.add_argument("--distill-weight", type=float, default=None, help="every stage's distillation weight")
    parser.add_argument("--explore-ratio", type=float, default=None, help="every stage's exploring-gate share")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's steps (pilots)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--eval-count", type=int, default=64, help="held-out videos evaluated after each stage")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    args = parser.parse_args(argv)
    if args.no_progress:
        transformers.utils.logging.disable_progress_bar()
    # One thread: on a shared 2-core machine two intra-op threads spin against other processes and a step took
    # 2-20x longer (measured); the tiny model gains little from a second thread anyway.
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    overrides = {}
    if args.no_time_embedding:
        overrides["qtsplus_time_embedding"] = False
    if args.score_aggregation is not None:
        overrides["qtsplus_score_aggregation"] = args.score_aggregation
    if args.no_relevance_embedding:
        overrides["qtsplus_relevance_embedding"] = False
    try:
        stages = ablated_stages(STAGES, grounding_weight=args.grounding_weight, distill_weight=args.distill_weight,
                                explore_ratio=args.explore_ratio)
        train_default_model(args.output, args.seed, args.num_reencode_layers, stages, args.steps_scale,
                            args.eval_count, **overrides)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"written: {args.output} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
