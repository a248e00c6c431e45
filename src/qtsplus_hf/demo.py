# Copyright 2026 The qtsplus-hf authors. Licensed under the Apache License, Version 2.0.
"""`qtsplus demo`: the main job on the bundled default model, offline.

One held-out synthetic video per task is written as an mp4, the bundled model answers its question at the
predicted budget, and the selection picture of each answer is written beside it.
"""

import os
import tempfile
import time

from .answering import answer_video, format_seconds, save_answer_picture
from .default_model import HELD_OUT_SEED_START, default_model_path, synthetic_options
from .evaluation import normalize_answer
from .synthetic import TASKS, generate_sample, write_mp4


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


def run_demo(output_dir: str | None = None, seed: int | None = None, model_path: str | None = None,
             keep_ratio: float | None = None, log=print) -> list[dict]:
    """Ask one question of each task about its own video (seeds `seed`, `seed + 1`, ...; default the first held-out
    ones); returns one result per task (also printed)."""
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
        title = f"{sample.question}  ->  {answered.answer.strip()}   (kept {result['kept_tokens']}/{result['total_tokens']})"
        save_answer_picture(picture, processor, answered, title)
        correct = normalize_answer(answered.answer) == sample.answer
        log(f"\n[{task}] {video} ({len(sample.frames)} frames, {len(sample.frames) / sample.fps:.0f} s)")
        log(f"question: {sample.question}")
        verdict = "correct" if correct else "wrong"
        log(f"answer: {answered.answer.strip() or '(empty)'}   truth: {sample.answer}   {verdict}")
        log(f"vision tokens kept: {result['kept_tokens']} of {result['total_tokens']} (rho = {result['rho']:.3f}), "
            f"from seconds {', '.join(f'{s:g}' for s in result['kept_seconds'][:12])}"
            f"{' ...' if len(result['kept_seconds']) > 12 else ''}; evidence at seconds "
            f"{', '.join(str(frame // int(sample.fps)) for frame in sample.evidence_frames[::int(sample.fps)])}")
        log(f"time: {format_seconds(result['seconds'])}")
        log(f"selection picture: {picture}")
        results.append({"task": task, "correct": correct, "picture": picture, "video": video, **result})
    log(f"\n{sum(r['correct'] for r in results)} of {len(results)} correct; videos and pictures in {folder}")
    return results


__all__ = ["run_demo"]
