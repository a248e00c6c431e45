# Copyright 2026 The qtsplus-hf authors. Licensed under the Apache License, Version 2.0.
"""Answering one question about one video with a loaded checkpoint, timing each stage, and drawing the selection:
the shared path of `qtsplus answer` and `qtsplus demo`."""

import time
from dataclasses import dataclass

import numpy as np


class StageTimer:
    """Wall time spent inside given modules (forward hooks), e.g. the vision encoder and the selector."""

    def __init__(self, **modules) -> None:
        self.seconds = dict.fromkeys(modules, 0.0)
        self._started: dict[str, float] = {}
        self._hooks = []
        for name, module in modules.items():
            self._hooks.append(module.register_forward_pre_hook(lambda *_, n=name: self._start(n)))
            self._hooks.append(module.register_forward_hook(lambda *_, n=name: self._stop(n)))

    def _start(self, name: str) -> None:
        self._started[name] = time.perf_counter()

    def _stop(self, name: str) -> None:
        self.seconds[name] += time.perf_counter() - self._started.pop(name)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


@dataclass
class VideoAnswer:
    """What `answer_video` returns: `result` is the JSON-able summary `qtsplus answer --json` writes."""

    result: dict
    inputs: dict
    frames: np.ndarray
    selection: object  # QTSplusSelection, or None when QTSplus is disabled

    @property
    def answer(self) -> str:
        return self.result["answer"]


def answer_video(
    model, processor, video, question: str, keep_ratio: float | None = None, fps: float | None = None,
    max_frames: int | None = None, max_new_tokens: int = 32,
) -> VideoAnswer:
    """Greedy answer to `question` about `video` (a file path or frames), with kept tokens, ρ and stage times."""
    import torch

    from .pipeline_video_text_to_text import video_question_inputs

    start = time.perf_counter()
    inputs, frames, _ = video_question_inputs(processor, video, question, fps=fps, max_frames=max_frames)
    decode_seconds = time.perf_counter() - start
    timer = StageTimer(vision=model.model.visual, selection=model.qtsplus)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            outputs = model.generate(
                **inputs, qtsplus_keep_ratio=keep_ratio, max_new_tokens=max_new_tokens, do_sample=False,
                return_dict_in_generate=True,
            )
    finally:
        timer.remove()
    generate_seconds = time.perf_counter() - start
    answer = processor.batch_decode(outputs.sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    selection = outputs.get("qtsplus")
    total = int((inputs["input_ids"] == model.config.video_token_id).sum())
    result = {
        "answer": answer,
        "kept_tokens": selection.num_kept[0] if selection else total,
        "total_tokens": total,
        "rho": float(selection.rho[0]) if selection else 1.0,
        "kept_seconds": selection.timestamps[0].unique().tolist() if selection else [],
        "seconds": {
            "decode": decode_seconds,
            "vision": timer.seconds["vision"],
            "selection": timer.seconds["selection"],
            "generation": generate_seconds - timer.seconds["vision"] - timer.seconds["selection"],
        },
    }
    return VideoAnswer(result, inputs, frames, selection)


def save_answer_picture(path: str, processor, answered: VideoAnswer, title: str, evidence=None) -> tuple[int, int]:
    """The selection picture of `qtsplus answer --viz`: the temporal patches holding kept tokens or evidence with the
    kept patches lit and the evidence cells outlined, relevance over time (see `qtsplus_hf.visualize`). Returns the
    picture's (width, height) in pixels.

    `evidence`: optional bool `[M]` over the video's tokens (`qtsplus_hf.evidence.evidence_token_mask`).
    ValueError when QTSplus is disabled (nothing was selected).
    """
    from .evidence import patch_start_seconds
    from .visualize import save_selection_png, selection_figure_data

    if answered.selection is None:
        raise ValueError("QTSplus is disabled in this model (qtsplus_enabled=false): there is no selection to draw")
    video_processor = processor.video_processor
    inputs = answered.inputs
    data = selection_figure_data(
        answered.frames, tuple(inputs["video_grid_thw"][0].tolist()), answered.selection.kept_indices[0],
        answered.selection.scores[0], video_processor.merge_size, video_processor.temporal_patch_size,
        patch_start_seconds(inputs, 0, video_processor.temporal_patch_size), evidence=evidence,
    )
    return save_selection_png(path, data, title)


def format_seconds(seconds: dict) -> str:
    return ", ".join(f"{name} {value * 1000:.0f} ms" for name, value in seconds.items())


__all__ = ["StageTimer", "VideoAnswer", "answer_video", "format_seconds", "save_answer_picture"]
