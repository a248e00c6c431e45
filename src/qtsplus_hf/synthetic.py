# Copyright 2026 The qtsplus-hf authors. Licensed under the Apache License, Version 2.0.
"""Synthetic long-video question answering whose evidence sits in a few frames.

Each video shows one scene per second (`fps` identical frames apart from light noise, so a scene fills whole
temporal patches of the Qwen2.5-VL vision encoder: at the default 2 fps one temporal patch is one second). Every
scene holds a few coloured shapes on a plain dark background. The question names shapes that only the evidence
scenes contain; distractor shapes fill every other second, so sampling a few seconds uniformly usually misses the
evidence. Four multiple-choice tasks (options A-D, so accuracy is classification):

- `needle`: one shape appears in one second; "What colour is the circle?"
- `order`: two shapes appear once each; "Which appears first, the cross or the square?"
- `localisation`: one shape appears in one second; "At which second does the diamond appear?" (options >= 3 s
  apart, so a model within +-1 s still picks the right one)
- `counting`: one shape appears in 1-5 separate seconds (never two in a row); "How many times does the triangle
  appear?"

Everything is drawn with numpy and is a function of the seed. `generate_sample` / `iter_samples` return frames in
memory for training; `write_synthetic_dataset` writes mp4 files (PyAV) and a JSONL manifest that
`datasets.load_dataset("json", ...)` reads; `synthetic_tokenizer` builds an offline tokenizer for the task's words.
"""

import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .data import MULTIPLE_CHOICE_INSTRUCTION, question_text
from .tiny import byte_level_tokenizer


TASKS = ("needle", "order", "localisation", "counting")
SHAPES = ("square", "circle", "triangle", "cross", "diamond")
# Saturated colours far apart in RGB (and in the chroma of YUV, so H.264 keeps them apart); backgrounds are dark grey.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 235),
    "yellow": (235, 215, 40),
    "purple": (170, 60, 210),
    "cyan": (40, 205, 215),
}
LETTERS = ("A", "B", "C", "D")
DEFAULT_FPS = 2
MIN_SECONDS = 16  # room for 5 separated counting occurrences and 4 localisation options 3 s apart
MIN_FRAME_SIZE = 32
MAX_COUNT = 5
LOCALISATION_OPTION_GAP = 3
COLOUR_JITTER = 10  # per-channel variation of an object's colour around its palette entry
SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True)
class SceneObject:
    """One shape drawn in every frame of one second: its box is `[top : top + size, left : left + size]`."""

    shape: str
    colour: str
    rgb: tuple[int, int, int]
    second: int
    top: int
    left: int
    size: int
    evidence: bool


@dataclass
class SyntheticSample:
    """A video with one multiple-choice question and its ground truth.

    `frames` is uint8 `[T, H, W, 3]` at `fps` frames per second; frame i shows second `i // fps`. `objects` lists
    every shape drawn (evidence and distractors); every pixel outside them is `background` plus noise.
    """

    frames: np.ndarray
    task: str
    question: str
    options: list[str]
    answer: str
    evidence_frames: list[int]
    fps: float
    seed: int
    objects: list[SceneObject]
    background: tuple[int, int, int]

    @property
    def answer_text(self) -> str:
        return self.options[LETTERS.index(self.answer)]

    @property
    def prompt(self) -> str:
        return question_text({"question": self.question, "options": self.options})

    def manifest_row(self, video: str) -> dict:
        """The manifest row for this sample stored at `video` (a path relative to the manifest)."""
        return {
            "video": video, "question": self.question, "options": list(self.options), "answer": self.answer,
            "type": self.task, "evidence_frames": list(self.evidence_frames), "fps": float(self.fps),
            "seed": self.seed,
        }


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Bool `[size, size]`: the pixels of `shape` drawn in a box of that side (tested at pixel centres)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size - 0.5  # in [-0.5, 0.5], centre at 0
    if shape == "square":
        return (np.abs(x) <= 0.42) & (np.abs(y) <= 0.42)
    if shape == "circle":
        return x**2 + y**2 <= 0.25
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= 0.5
    if shape == "cross":
        return (np.abs(x) <= 0.17) | (np.abs(y) <= 0.17)
    # triangle, apex up: the half width grows linearly from the apex (y = -0.45) to the base (y = 0.45)
    return (y >= -0.45) & (y <= 0.45) & (np.abs(x) <= 0.5 * (y + 0.45) / 0.9)


def nearest_colour(rgb: Sequence[float]) -> str:
    """The palette colour closest to an RGB value (Euclidean), e.g. to read a decoded pixel back."""
    names = list(COLOURS)
    distances = np.linalg.norm(np.array([COLOURS[name] for name in names]) - np.asarray(rgb, dtype=float), axis=1)
    return names[int(distances.argmin())]


# --- planning: which shapes appear in which seconds, and the question ------------------------------------------


def _choice(rng: np.random.Generator, items: Sequence, count: int | None = None):
    """`rng.choice` over a sequence of strings / ints, returning python values."""
    if count is None:
        return items[int(rng.integers(len(items)))]
    return [items[i] for i in rng.choice(len(items), size=count, replace=False)]


def _options(
    rng: np.random.Generator, correct: str, wrong: Sequence[str], required: Sequence[str] = ()
) -> tuple[list[str], str]:
    """The correct option, the `required` wrong ones and more from `wrong` up to four, shuffled; returns the
    options and the correct letter."""
    options = [correct, *required] + _choice(rng, list(wrong), len(LETTERS) - 1 - len(required))
    order = rng.permutation(len(options))
    options = [options[i] for i in order]
    return options, LETTERS[options.index(correct)]


def _separated_seconds(rng: np.random.Generator, count: int, seconds: int) -> list[int]:
    """`count` sorted seconds, no two adjacent, uniform over all such sets (pick from a shorter range, then
    spread: the i-th pick moves right by i)."""
    picks = np.sort(rng.choice(seconds - count + 1, size=count, replace=False))
    return [int(pick) + index for index, pick in enumerate(picks)]


def _localisation_options(rng: np.random.Generator, answer: int, seconds: int) -> list[int]:
    """Three wrong seconds, each at least `LOCALISATION_OPTION_GAP` from the answer and from each other."""
    chosen = [answer]
    for _ in range(len(LETTERS) - 1):
        allowed = [s for s in range(seconds) if all(abs(s - c) >= LOCALISATION_OPTION_GAP for c in chosen)]
        chosen.append(_choice(rng, allowed))
    return chosen[1:]


class _Plan(NamedTuple):
    evidence: dict[int, list[tuple[str, str]]]  # second -> the (shape, colour) the question is about
    avoid: set[str]  # shapes the distractors must not use
    question: str
    correct: str
    required: list[str]  # wrong options that must be offered
    wrong: list[str]  # wrong options to pick the rest from


def _plan(task: str, rng: np.random.Generator, seconds: int) -> _Plan:
    """Where the evidence goes, and the question about it."""
    colours = list(COLOURS)
    if task == "needle":
        shape, colour, second = _choice(rng, SHAPES), _choice(rng, colours), int(rng.integers(seconds))
        wrong = [c for c in colours if c != colour]
        return _Plan({second: [(shape, colour)]}, {shape}, f"What colour is the {shape}?", colour, [], wrong)
    if task == "order":
        first, later = _choice(rng, SHAPES, 2)
        times = sorted(int(s) for s in rng.choice(seconds, size=2, replace=False))
        named = _choice(rng, [(first, later), (later, first)])  # the question's naming order
        evidence = {times[0]: [(first, _choice(rng, colours))], times[1]: [(later, _choice(rng, colours))]}
        others = [s for s in SHAPES if s not in (first, later)]
        question = f"Which appears first, the {named[0]} or the {named[1]}?"
        # Both named shapes are offered, so the choice is really between the two.
        return _Plan(evidence, {first, later}, question, first, [later], others)
    if task == "localisation":
        shape, colour, second = _choice(rng, SHAPES), _choice(rng, colours), int(rng.integers(seconds))
        wrong = [str(s) for s in _localisation_options(rng, second, seconds)]
        question = f"At which second does the {shape} appear?"
        return _Plan({second: [(shape, colour)]}, {shape}, question, str(second), [], wrong)
    if task == "counting":
        shape, colour, count = _choice(rng, SHAPES), _choice(rng, colours), int(rng.integers(1, MAX_COUNT + 1))
        evidence = {second: [(shape, colour)] for second in _separated_seconds(rng, count, seconds)}
        wrong = [str(n) for n in range(1, MAX_COUNT + 1) if n != count]
        return _Plan(evidence, {shape}, f"How many times does the {shape} appear?", str(count), [], wrong)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


# --- drawing ---------------------------------------------------------------------------------------------------


def _place(rng: np.random.Generator, sizes: Sequence[int], frame_size: int) -> list[tuple[int, int]]:
    """Top-left corners for boxes of the given sides, at least 2 px apart: rejection sampling, restarting the whole
    layout when early boxes leave no room for a later one."""
    for _layout in range(100):
        corners: list[tuple[int, int, int]] = []
        for size in sizes:
            for _attempt in range(50):
                top, left = (int(v) for v in rng.integers(0, frame_size - size + 1, size=2))
                if all(top + size + 2 <= t or t + s + 2 <= top or left + size + 2 <= l or l + s + 2 <= left
                       for t, l, s in corners):
                    corners.append((top, left, size))
                    break
            else:
                break
        if len(corners) == len(sizes):
            return [(top, left) for top, left, _ in corners]
    # not reached for <= 3 boxes of side <= 0.3 * frame_size (checked over thousands of seeds); a clear failure
    raise RuntimeError("could not place the objects without overlap")


def _scene_objects(
    rng: np.random.Generator, evidence: dict[int, list[tuple[str, str]]], avoid: set, seconds: int,
    frame_size: int, max_objects: int,
) -> list[SceneObject]:
    """Every object of every second: the evidence, plus distractors (shapes not in `avoid`) so that each second
    holds 1 to `max_objects` objects whether or not it is evidence."""
    distractor_shapes = [shape for shape in SHAPES if shape not in avoid]
    low, high = round(0.22 * frame_size), round(0.3 * frame_size)
    objects = []
    for second in range(seconds):
        own = evidence.get(second, [])
        count = int(rng.integers(max(1 - len(own), 0), max_objects - len(own) + 1))
        drawn = [(shape, colour, True) for shape, colour in own]
        drawn += [(_choice(rng, distractor_shapes), _choice(rng, list(COLOURS)), False) for _ in range(count)]
        sizes = [int(rng.integers(low, high + 1)) for _ in drawn]
        for (shape, colour, is_evidence), size, (top, left) in zip(drawn, sizes, _place(rng, sizes, frame_size)):
            jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
            rgb = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255))
            objects.append(SceneObject(shape, colour, rgb, second, top, left, size, is_evidence))
    return objects


def _render(
    rng: np.random.Generator, objects: Sequence[SceneObject], background: tuple[int, int, int], seconds: int,
    frames_per_second: int, frame_size: int, noise: float,
) -> np.ndarray:
    """Draw each second once, repeat it for its frames, add independent noise to every frame."""
    scenes = np.empty((seconds, frame_size, frame_size, 3), dtype=np.float32)
    scenes[:] = background
    for item in objects:
        box = scenes[item.second, item.top : item.top + item.size, item.left : item.left + item.size]
        box[shape_mask(item.shape, item.size)] = item.rgb
    frames = np.repeat(scenes, frames_per_second, axis=0)
    if noise > 0:
        frames += noise * rng.standard_normal(frames.shape, dtype=np.float32)
    return np.clip(frames, 0, 255).round().astype(np.uint8)


# --- public generators -----------------------------------------------------------------------------------------


def _check_options(
    task: str | None, seconds: int = 32, frame_size: int = 64, fps: int = DEFAULT_FPS, noise: float = 4.0,
    max_objects: int = 2,
) -> None:
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if not isinstance(seconds, int) or seconds < MIN_SECONDS:
        raise ValueError(f"seconds must be an integer >= {MIN_SECONDS}, got {seconds!r}")
    if not isinstance(frame_size, int) or frame_size < MIN_FRAME_SIZE:
        raise ValueError(f"frame_size must be an integer >= {MIN_FRAME_SIZE}, got {frame_size!r}")
    if not isinstance(fps, int) or fps < 2 or fps % 2:
        raise ValueError(f"fps must be a positive even integer (whole temporal patches of 2 frames), got {fps!r}")
    if not 0 <= noise <= 50:
        raise ValueError(f"noise must be a standard deviation in [0, 50], got {noise!r}")
    if not isinstance(max_objects, int) or not 1 <= max_objects <= 3:
        raise ValueError(f"max_objects must be 1, 2 or 3, got {max_objects!r}")


def generate_sample(
    seed: int, task: str | None = None, *, seconds: int = 32, frame_size: int = 64, fps: int = DEFAULT_FPS,
    noise: float = 4.0, max_objects: int = 2,
) -> SyntheticSample:
    """One video and question, a pure function of its arguments.

    Args:
        seed: a non-negative integer. With `task=None` the task is `TASKS[seed % 4]`, so any run of consecutive
            seeds is balanced across tasks.
        task: one of `TASKS`, or None.
        seconds: video length; one scene per second, `seconds * fps` frames (default 64 frames).
        frame_size: frame height and width in pixels; use a multiple of patch size x merge size (8 for the tiny
            models) so the processor does not resize. Objects are 22-30% of it.
        fps: frames per second, an even integer, so each second is whole temporal patches of 2 frames.
        noise: standard deviation of the per-frame Gaussian pixel noise (0: plain background).
        max_objects: the most objects in one second (1 to 3); each second holds at least one.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    task = TASKS[seed % len(TASKS)] if task is None else task
    _check_options(task, seconds, frame_size, fps, noise, max_objects)
    # The task is part of the seed so that the same seed gives unrelated videos for different tasks.
    rng = np.random.default_rng([seed, TASKS.index(task)])
    plan = _plan(task, rng, seconds)
    options, answer = _options(rng, plan.correct, plan.wrong, plan.required)
    background = tuple(int(v) for v in rng.integers(20, 56) + rng.integers(-6, 7, size=3))
    objects = _scene_objects(rng, plan.evidence, plan.avoid, seconds, frame_size, max_objects)
    frames = _render(rng, objects, background, seconds, fps, frame_size, noise)
    evidence_frames = [second * fps + offset for second in sorted(plan.evidence) for offset in range(fps)]
    return SyntheticSample(
        frames=frames, task=task, question=plan.question, options=options, answer=answer,
        evidence_frames=evidence_frames, fps=float(fps), seed=seed, objects=objects, background=background,
    )


def iter_samples(seeds: Iterable[int], task: str | None = None, **options) -> Iterator[SyntheticSample]:
    """`generate_sample(seed, task, **options)` for each seed, lazily (for training loops)."""
    for seed in seeds:
        yield generate_sample(seed, task, **options)


# --- files -----------------------------------------------------------------------------------------------------


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float, lossless: bool = True) -> str:
    """Encode uint8 frames `[T, H, W, 3]` as an H.264 mp4 with PyAV; returns the path.

    `lossless=True`: 4:4:4 chroma at quantiser 0, so decoded frames equal the arrays up to RGB<->YUV rounding (what
    a model trained on `generate_sample` arrays sees). `lossless=False`: 4:2:0 at CRF 18, playable in any browser,
    colours still recognisable. Written to a temporary file first, so a failure leaves nothing at `path`.
    Sides must be even (4:2:0 and most players require it).
    """
    import av  # noqa: PLC0415 - optional at import time, like the video loader

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] with T >= 1, got {frames.dtype} {list(frames.shape)}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frame height and width must be even, got {frames.shape[1]}x{frames.shape[2]}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"the folder of {path} does not exist")
    handle, temporary = tempfile.mkstemp(suffix=".mp4", dir=directory)
    os.close(handle)
    try:
        with av.open(temporary, "w", format="mp4") as container:
            options = {"preset": "veryfast", "qp": "0"} if lossless else {"preset": "medium", "crf": "18"}
            stream = container.add_stream("libx264", rate=int(fps) if float(fps).is_integer() else fps,
                                          options=options)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv444p" if lossless else "yuv420p"
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def write_synthetic_dataset(
    directory: str | os.PathLike, seeds: Iterable[int], task: str | None = None, *, lossless: bool = True,
    manifest_name: str = "manifest.jsonl", **options,
) -> str:
    """Write one mp4 per seed under `directory/videos/` and a JSONL manifest; returns the manifest's path.

    Rows: `{"video": "videos/<task>_<seed>.mp4", "question", "options": [4 str], "answer": "A".."D", "type",
    "evidence_frames", "fps", "seed"}` with video paths relative to the manifest, so the folder can move.
    `options` are `generate_sample`'s keyword arguments. Load with
    `datasets.load_dataset("json", data_files=path, split="train")`.
    """
    directory = os.fspath(directory)
    seeds = list(seeds)
    if not seeds:
        raise ValueError("no seeds given")
    if len(set(seeds)) != len(seeds):
        raise ValueError("seeds must be distinct (each names one video file)")
    _check_options(task, **options)  # before any file is written
    os.makedirs(os.path.join(directory, "videos"), exist_ok=True)
    rows = []
    for sample in iter_samples(seeds, task, **options):
        video = f"videos/{sample.task}_{sample.seed:06d}.mp4"
        write_mp4(os.path.join(directory, video), sample.frames, sample.fps, lossless=lossless)
        rows.append(sample.manifest_row(video))
    manifest = os.path.join(directory, manifest_name)
    handle, temporary = tempfile.mkstemp(suffix=".jsonl", dir=directory)
    with os.fdopen(handle, "w") as stream:
        stream.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(temporary, manifest)
    return manifest


# --- vocabulary and tokenizer ----------------------------------------------------------------------------------


def task_texts(max_seconds: int = 64) -> list[str]:
    """Every question, option and answer text the tasks can produce for videos up to `max_seconds` long, as the
    chat template renders them (system prompt, roles, multiple-choice layout)."""
    numbers = [str(n) for n in range(max_seconds)]
    questions = [f"What colour is the {shape}?" for shape in SHAPES]
    questions += [f"Which appears first, the {a} or the {b}?" for a in SHAPES for b in SHAPES if a != b]
    questions += [f"At which second does the {shape} appear?" for shape in SHAPES]
    questions += [f"How many times does the {shape} appear?" for shape in SHAPES]
    option_lines = [f"{letter}. {option}" for letter in LETTERS for option in [*COLOURS, *SHAPES, *numbers]]
    scaffold = [SYSTEM_PROMPT, MULTIPLE_CHOICE_INSTRUCTION, "system\n", "user\n", "assistant\n", *LETTERS]
    return questions + option_lines + scaffold


def task_vocabulary(max_seconds: int = 64) -> list[str]:
    """The sorted words, numbers and punctuation marks of `task_texts` (plus the newline the layout uses)."""
    words = set()
    for text in task_texts(max_seconds):
        words.update(re.findall(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]", text))
    return sorted(words | {"\n"})


def synthetic_tokenizer(max_seconds: int = 64, vocab_size: int = 512):
    """An offline byte-level BPE tokenizer for the synthetic tasks: Qwen's chat special tokens (those of
    `qtsplus_hf.tiny`), the 256 bytes (any text still encodes) and merges learnt from `task_texts`, so the task's
    words are mostly single tokens and each answer letter A-D is one token. Deterministic."""
    tokenizer = byte_level_tokenizer(task_texts(max_seconds) * 4, vocab_size)
    letter_token_ids(tokenizer)  # checks the single-token property
    return tokenizer


def letter_token_ids(tokenizer) -> list[int]:
    """Token ids of the answer letters A-D as the assistant's reply starts with them (for scoring the options)."""
    ids = [tokenizer.encode(letter, add_special_tokens=False) for letter in LETTERS]
    if any(len(encoded) != 1 for encoded in ids):
        raise ValueError(f"the answer letters must be single tokens for this tokenizer, got {ids}")
    return [encoded[0] for encoded in ids]


__all__ = [
    "COLOURS", "DEFAULT_FPS", "LETTERS", "SHAPES", "TASKS", "SceneObject", "SyntheticSample", "generate_sample",
    "iter_samples", "letter_token_ids", "nearest_colour", "shape_mask",
    "synthetic_tokenizer", "task_texts", "task_vocabulary", "write_mp4", "write_synthetic_dataset",
]
