# Copyright 2026 The qtsplus-hf authors. Licensed under the Apache License, Version 2.0.
"""`qtsplus demo`: the main job on the bundled default model, offline.

One held-out synthetic video per task is written as an mp4, the bundled model answers its question at the
predicted budget, and the selection picture of each answer is written beside it (the evidence outlined). Then the
query-awareness part: one held-out needle video is asked about two different objects in it, its own question and
its `counterfactual_question` (a distractor shape of the same video); for each, the answer, what was kept, whether
the asked object's tokens were kept and top-scored, and a picture; and how many kept tokens the two selections share.
"""

import os
import re
import tempfile
import time

from .answering import answer_video, format_seconds, save_answer_picture
from .default_model import HELD_OUT_SEED_START, default_model_path, synthetic_options
from .evaluation import normalize_answer
from .evidence import evidence_figures, evidence_token_mask
from .synthetic import SHAPES, TASKS, SyntheticSample, generate_sample, write_mp4


QUERY_TASK = "needle"
QUERY_SEED_TRIES = 100  # held-out seeds tried for a needle video with a counterfactual question


def asked_shapes(question: str) -> list[str]:
    """The shapes a synthetic question names ("the circle"), in the order it names them."""
    return [match for match in re.findall(r"\bthe (\w+)", question) if match in SHAPES]


def object_boxes(sample: SyntheticSample, shapes) -> list[list[float]]:
    """`[second, x0, y0, x1, y1]` (fractions of the frame, as `SyntheticSample.evidence_boxes`) of every object of
    the video whose shape is in `shapes`."""
    side = sample.frame_size
    return [[item.second, item.left / side, item.top / side, (item.left + item.size) / side,
             (item.top + item.size) / side] for item in sample.objects if item.shape in set(shapes)]


def _evidence_mask(processor, answered, boxes):
    """Bool `[M]` over the answered video's tokens: the tokens of `boxes`."""
    inputs = answered.inputs
    return evidence_token_mask(inputs["video_grid_thw"][0].tolist(), float(inputs["second_per_grid_ts"][0]),
                               processor.video_processor.merge_size, boxes=boxes)


def _tokens_per_patch(processor, answered) -> int:
    _, grid_h, grid_w = answered.inputs["video_grid_thw"][0].tolist()
    merge = processor.video_processor.merge_size
    return (grid_h // merge) * (grid_w // merge)


def kept_seconds_of(kept_indices, tokens_per_patch: int, second_per_grid: float) -> list[float]:
    """The ascending distinct start seconds of the temporal patches holding `kept_indices`."""
    return sorted({int(index) // tokens_per_patch * second_per_grid for index in kept_indices})


def selection_overlap(own: list[int], counterfactual: list[int]) -> dict[str, int]:
    """How many kept tokens two selections of the same video share: `shared`, `union`, and each one's count."""
    own, counterfactual = set(own), set(counterfactual)
    return {"shared": len(own & counterfactual), "union": len(own | counterfactual), "own": len(own),
            "counterfactual": len(counterfactual)}


def _seconds_text(seconds) -> str:
    return ", ".join(f"{second:g}" for second in seconds) or "none"


def demo_output_folder(path: str | None) -> str:
    """`path` (created if its parent exists), or a new temporary folder."""
    if path is None:
        return tempfile.mkdtemp(prefix="qtsplus-demo-")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--output-dir {path} exists and is not a folder")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ValueError(f"--output-dir: the folder that would hold {path} does not exist")
    os.makedirs(path, exist_ok=True)
    return path


def query_sample(seed: int) -> SyntheticSample:
    """The first held-out needle video from `seed` on that has a counterfactual question."""
    for candidate in range(seed, seed + QUERY_SEED_TRIES):
        sample = generate_sample(candidate, QUERY_TASK, **synthetic_options())
        if sample.counterfactual_question:
            return sample
    raise ValueError(f"no {QUERY_TASK} video with a counterfactual question among seeds {seed} to "
                     f"{seed + QUERY_SEED_TRIES - 1}")


def ask_about_object(model, processor, video: str, question: str, boxes, picture: str, keep_ratio: float | None,
                     log=print) -> dict:
    """Answer `question` about `video`, whose asked object lies in `boxes` (`[second, x0, y0, x1, y1]` each); write
    the selection picture (the object outlined) to `picture`; print and return the answer, the selection
    (`kept_indices`, `kept_seconds`, ...) and how the object's tokens fared (`object_*`)."""
    answered = answer_video(model, processor, video, question, keep_ratio=keep_ratio, max_new_tokens=4)
    result, selection = answered.result, answered.selection
    per_patch = _tokens_per_patch(processor, answered)
    interval = float(answered.inputs["second_per_grid_ts"][0])
    kept = selection.kept_indices[0].tolist() if selection is not None else []
    mask = _evidence_mask(processor, answered, boxes)
    figures = (evidence_figures(selection.scores[0], selection.kept_indices[0], mask, per_patch)
               if selection is not None else None)
    object_kept = int(mask[kept].sum()) if kept else 0
    shapes = ", ".join(asked_shapes(question)) or "asked object"
    reply = answered.answer.strip()
    if selection is not None:
        title = f"{question}  ->  {reply}   (kept {result['kept_tokens']}/{result['total_tokens']})"
        save_answer_picture(picture, processor, answered, title, evidence=mask)
    log(f"question: {question}")
    log(f"answer: {reply or '(empty)'}")
    log(f"vision tokens kept: {result['kept_tokens']} of {result['total_tokens']} (rho = {result['rho']:.3f})")
    log(f"kept seconds: {_seconds_text(result['kept_seconds'])}")
    log(f"{shapes} tokens: {object_kept} of {int(mask.sum())} kept, at seconds "
        f"{_seconds_text(kept_seconds_of(mask.nonzero().flatten().tolist(), per_patch, interval))}; top-scored: "
        f"{'yes' if figures and figures['top_scored'] else 'no'}")
    log(f"selection picture: {picture if selection is not None else 'not drawn (QTSplus is disabled)'}")
    return {
        "question": question, "answer": answered.answer, **result, "kept_indices": kept,
        "grid_thw": answered.inputs["video_grid_thw"][0].tolist(), "tokens_per_patch": per_patch,
        "second_per_grid": interval, "object_boxes": [list(box) for box in boxes], "object_tokens": int(mask.sum()),
        "object_tokens_kept": object_kept, "object_kept": object_kept > 0,
        "object_top_scored": bool(figures and figures["top_scored"]),
        "object_token_recall": figures["token_recall"] if figures else 0.0,
        "picture": picture if selection is not None else None,
    }


def run_demo(output_dir: str | None = None, seed: int | None = None, model_path: str | None = None,
             keep_ratio: float | None = None, log=print) -> dict:
    """Ask one question of each task about its own video (seeds `seed`, `seed + 1`, ...; default the first held-out
    ones), then two questions about two objects of one needle video (`query_sample(seed)`); everything is printed.

    Returns `{"folder", "tasks": [one dict per task: task, correct, picture, video, and `answer_video`'s result],
    "query_awareness": {"video", "seed", "own", "counterfactual" (each `ask_about_object`'s dict),
    "overlap" (`selection_overlap` of their kept indices)}}`.
    """
    from transformers import AutoModel, AutoProcessor

    seed = HELD_OUT_SEED_START if seed is None else seed
    folder = demo_output_folder(output_dir)
    path = model_path or default_model_path()
    start = time.perf_counter()
    model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    log(f"model: {path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"loaded in {time.perf_counter() - start:.1f} s)")
    results = []
    for offset, task in enumerate(TASKS):
        sample = generate_sample(seed + offset, task, **synthetic_options())
        video = write_mp4(os.path.join(folder, f"{task}.mp4"), sample.frames, sample.fps)
        answered = answer_video(model, processor, video, sample.question, keep_ratio=keep_ratio, max_new_tokens=4)
        result = answered.result
        picture = os.path.join(folder, f"{task}.png")
        title = (f"{sample.question}  ->  {answered.answer.strip()}   "
                 f"(kept {result['kept_tokens']}/{result['total_tokens']})")
        save_answer_picture(picture, processor, answered, title,
                            evidence=_evidence_mask(processor, answered, sample.evidence_boxes))
        correct = normalize_answer(answered.answer) == sample.answer
        log(f"\n[{task}] {video} ({len(sample.frames)} frames, {len(sample.frames) / sample.fps:.0f} s)")
        log(f"question: {sample.question}")
        verdict = "correct" if correct else "wrong"
        log(f"answer: {answered.answer.strip() or '(empty)'}   truth: {sample.answer}   {verdict}")
        log(f"vision tokens kept: {result['kept_tokens']} of {result['total_tokens']} (rho = {result['rho']:.3f}), "
            f"from seconds {', '.join(f'{s:g}' for s in result['kept_seconds'][:12])}"
            f"{' ...' if len(result['kept_seconds']) > 12 else ''}; evidence at seconds "
            f"{', '.join(str(second) for second in sample.evidence_seconds)}")
        log(f"time: {format_seconds(result['seconds'])}")
        log(f"selection picture: {picture}")
        results.append({"task": task, "correct": correct, "picture": picture, "video": video, **result})
    log(f"\n{sum(r['correct'] for r in results)} of {len(results)} correct; videos and pictures in {folder}")

    sample = query_sample(seed)
    video = os.path.join(folder, f"{QUERY_TASK}.mp4") if sample.seed == seed else write_mp4(
        os.path.join(folder, f"query_{QUERY_TASK}.mp4"), sample.frames, sample.fps)
    log(f"\n[query awareness] {video}: two questions about two different objects of the same video")
    log("\n(own question)")
    own = ask_about_object(model, processor, video, sample.question, sample.evidence_boxes,
                           os.path.join(folder, "query_own.png"), keep_ratio, log)
    log(f"truth: {sample.answer}")
    log("\n(counterfactual question: a distractor shape of the same video)")
    counterfactual = ask_about_object(
        model, processor, video, sample.counterfactual_question,
        object_boxes(sample, asked_shapes(sample.counterfactual_question)),
        os.path.join(folder, "query_counterfactual.png"), keep_ratio, log)
    overlap = selection_overlap(own["kept_indices"], counterfactual["kept_indices"])
    same = overlap["shared"] == overlap["union"]
    log(f"\noverlap: the two questions share {overlap['shared']} of the {overlap['union']} tokens either kept "
        f"(own kept {overlap['own']}, counterfactual kept {overlap['counterfactual']})"
        f"{': the same selection, it did not depend on the question' if same else ''}")
    return {"folder": folder, "tasks": results, "query_awareness": {
        "video": video, "seed": sample.seed, "own": own, "counterfactual": counterfactual, "overlap": overlap}}


__all__ = ["ask_about_object", "asked_shapes", "kept_seconds_of", "object_boxes", "query_sample", "run_demo",
           "selection_overlap"]
