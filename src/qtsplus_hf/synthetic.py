# Copyright 2026 The qtsplus-hf authors. Licensed under the Apache License, Version 2.0.
"""Synthetic long-video question answering whose evidence sits in a few frames.

Each video shows one scene per second (`fps` identical frames apart from light noise, so a scene fills whole
temporal patches of the Qwen2.5-VL vision encoder: at the default 2 fps one temporal patch is one second). Every
scene holds a few shapes on a plain dark background, each filling one cell of an 8-pixel grid. The question names
shapes that only the evidence scenes contain; distractor shapes (coloured like the evidence by default, so only the
asked shape tells the evidence apart; grey on request) fill every second, so sampling a few seconds uniformly
usually misses the evidence. Four tasks, each answered with one word or number:

- `needle`: one shape appears in one second; "What colour is the circle?" -> "red"
- `order`: two shapes appear once each; "Which appears first, the cross or the square?" -> "square"
- `localisation`: one shape appears in one second; "At which second does the diamond appear?" -> "12"
- `counting`: one shape appears in 1-5 separate seconds (never two in a row); "How many times does the triangle
  appear?" -> "3"

Why one grid cell per object: it is one vision token of the tiny default model (patch 4, merge 2), so a shape is a
pattern inside one token. Shapes of 7-16 pixels placed anywhere, spread over several tokens, were not told apart by
that model after 1,200 training steps (it learnt to answer with some colour in the video, not the asked shape's).

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
from transformers.utils.logging import tqdm

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
# `distractors="grey"` (a diagnostic) draws every distractor grey: only the evidence is coloured (see `generate_sample`).
GREY = "grey"
GREY_RGB = (150, 150, 150)
DISTRACTOR_MODES = ("grey", "coloured")
DEFAULT_FPS = 2
MIN_SECONDS = 2  # the order task needs two seconds
# Default scene density: every second holds 2-4 objects (about 96 in a 32-second video), more than the 5-15% of its
# 512 tokens a budget keeps, so keeping every object cannot pass without reading the question.
MIN_OBJECTS, MAX_OBJECTS = 2, 4
MIN_FRAME_SIZE = 32
MAX_COUNT = 5  # at most (seconds + 1) // 2 in shorter videos: occurrences are never in adjacent seconds
CELL = 8  # objects fill one cell of an 8-pixel grid: one vision token of the tiny models (patch 4, merge 2)
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
    """A video with one question and its ground truth `answer` (a colour, shape or number, as text).

    `frames` is uint8 `[T, H, W, 3]` at `fps` frames per second; frame i shows second `i // fps`. `objects` lists
    every shape drawn (evidence and distractors); every pixel outside them is `background` plus noise.
    """

    frames: np.ndarray
    task: str
    question: str
    answer: str
    evidence_frames: list[int]
    fps: float
    seed: int
    objects: list[SceneObject]
    background: tuple[int, int, int]
    counterfactual_question: str | None = None

    @property
    def frame_size(self) -> int:
        return int(self.frames.shape[1])

    @property
    def evidence_seconds(self) -> list[int]:
        """The seconds that show the evidence."""
        return sorted({item.second for item in self.objects if item.evidence})

    @property
    def evidence_boxes(self) -> list[list[float]]:
        """`[second, x0, y0, x1, y1]` per evidence object, the box in fractions of the frame (see
        `qtsplus_hf.evidence`)."""
        side = self.frame_size
        return [[item.second, item.left / side, item.top / side, (item.left + item.size) / side,
                 (item.top + item.size) / side] for item in self.objects if item.evidence]

    def evidence_columns(self) -> dict:
        """The ground truth of where the evidence is, and the counterfactual question, as row columns."""
        return {"evidence_frames": list(self.evidence_frames), "evidence_seconds": self.evidence_seconds,
                "evidence_boxes": self.evidence_boxes, "counterfactual_question": self.counterfactual_question}

    def manifest_row(self, video: str) -> dict:
        """The manifest row for this sample stored at `video` (a path relative to the manifest)."""
        return {
            "video": video, "question": self.question, "answer": self.answer,
            "type": self.task, **self.evidence_columns(), "fps": float(self.fps), "seed": self.seed,
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
    """The palette colour (or grey) closest to an RGB value (Euclidean), e.g. to read a decoded pixel back."""
    palette = {**COLOURS, GREY: GREY_RGB}
    names = list(palette)
    distances = np.linalg.norm(np.array([palette[name] for name in names]) - np.asarray(rgb, dtype=float), axis=1)
    return names[int(distances.argmin())]


# --- planning: which shapes appear in which seconds, and the question ------------------------------------------


def _choice(rng: np.random.Generator, items: Sequence, count: int | None = None):
    """`rng.choice` over a sequence of strings / ints, returning python values."""
    if count is None:
        return items[int(rng.integers(len(items)))]
    return [items[i] for i in rng.choice(len(items), size=count, replace=False)]


def _separated_seconds(rng: np.random.Generator, count: int, seconds: int) -> list[int]:
    """`count` sorted seconds, no two adjacent, uniform over all such sets (pick from a shorter range, then
    spread: the i-th pick moves right by i)."""
    picks = np.sort(rng.choice(seconds - count + 1, size=count, replace=False))
    return [int(pick) + index for index, pick in enumerate(picks)]


class _Plan(NamedTuple):
    evidence: dict[int, list[tuple[str, str]]]  # second -> the (shape, colour) the question is about
    avoid: set[str]  # shapes the distractors must not use
    question: str
    answer: str


def _plan(task: str, rng: np.random.Generator, seconds: int) -> _Plan:
    """Where the evidence goes, and the question about it."""
    colours = list(COLOURS)
    if task == "needle":
        shape, colour, second = _choice(rng, SHAPES), _choice(rng, colours), int(rng.integers(seconds))
        return _Plan({second: [(shape, colour)]}, {shape}, f"What colour is the {shape}?", colour)
    if task == "order":
        first, later = _choice(rng, SHAPES, 2)
        times = sorted(int(s) for s in rng.choice(seconds, size=2, replace=False))
        named = _choice(rng, [(first, later), (later, first)])  # the question's naming order
        evidence = {times[0]: [(first, _choice(rng, colours))], times[1]: [(later, _choice(rng, colours))]}
        question = f"Which appears first, the {named[0]} or the {named[1]}?"
        return _Plan(evidence, {first, later}, question, first)
    if task == "localisation":
        shape, colour, second = _choice(rng, SHAPES), _choice(rng, colours), int(rng.integers(seconds))
        question = f"At which second does the {shape} appear?"
        return _Plan({second: [(shape, colour)]}, {shape}, question, str(second))
    if task == "counting":
        most = min(MAX_COUNT, (seconds + 1) // 2)
        shape, colour, count = _choice(rng, SHAPES), _choice(rng, colours), int(rng.integers(1, most + 1))
        evidence = {second: [(shape, colour)] for second in _separated_seconds(rng, count, seconds)}
        return _Plan(evidence, {shape}, f"How many times does the {shape} appear?", str(count))
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


# --- drawing ---------------------------------------------------------------------------------------------------


def _cells(rng: np.random.Generator, count: int, frame_size: int) -> list[tuple[int, int]]:
    """Top-left corners of `count` distinct cells of the `CELL`-pixel grid, chosen uniformly."""
    per_side = frame_size // CELL
    picks = rng.choice(per_side * per_side, size=count, replace=False)
    return [(int(pick) // per_side * CELL, int(pick) % per_side * CELL) for pick in picks]


def _scene_objects(
    rng: np.random.Generator, evidence: dict[int, list[tuple[str, str]]], avoid: set, seconds: int,
    frame_size: int, min_objects: int, max_objects: int, distractors: str,
) -> list[SceneObject]:
    """Every object of every second: the evidence, plus distractors (shapes not in `avoid`, grey or coloured) so
    that each second holds `min_objects` to `max_objects` objects whether or not it is evidence."""
    distractor_shapes = [shape for shape in SHAPES if shape not in avoid]
    objects = []
    for second in range(seconds):
        own = evidence.get(second, [])
        count = int(rng.integers(max(min_objects - len(own), 0), max_objects - len(own) + 1))
        drawn = [(shape, colour, True) for shape, colour in own]
        drawn += [(_choice(rng, distractor_shapes), GREY if distractors == "grey" else _choice(rng, list(COLOURS)),
                   False) for _ in range(count)]
        for (shape, colour, is_evidence), (top, left) in zip(drawn, _cells(rng, len(drawn), frame_size)):
            jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=1 if colour == GREY else 3)
            base = GREY_RGB if colour == GREY else COLOURS[colour]
            rgb = tuple(int(v) for v in np.clip(np.array(base) + jitter, 0, 255))
            objects.append(SceneObject(shape, colour, rgb, second, top, left, CELL, is_evidence))
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
    max_objects: int = MAX_OBJECTS, distractors: str = "coloured", min_objects: int = MIN_OBJECTS,
) -> None:
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if not isinstance(seconds, int) or seconds < MIN_SECONDS:
        raise ValueError(f"seconds must be an integer >= {MIN_SECONDS}, got {seconds!r}")
    if not isinstance(frame_size, int) or frame_size < MIN_FRAME_SIZE or frame_size % CELL:
        raise ValueError(f"frame_size must be a multiple of {CELL} and >= {MIN_FRAME_SIZE}, got {frame_size!r}")
    if not isinstance(fps, int) or fps < 2 or fps % 2:
        raise ValueError(f"fps must be a positive even integer (whole temporal patches of 2 frames), got {fps!r}")
    if not 0 <= noise <= 50:
        raise ValueError(f"noise must be a standard deviation in [0, 50], got {noise!r}")
    cells = (frame_size // CELL) ** 2 if isinstance(frame_size, int) else 0
    if not isinstance(max_objects, int) or not 1 <= max_objects <= min(8, cells):
        raise ValueError(f"max_objects must be an integer in [1, {min(8, cells)}], got {max_objects!r}")
    if not isinstance(min_objects, int) or not 1 <= min_objects <= max_objects:
        raise ValueError(f"min_objects must be an integer in [1, max_objects={max_objects}], got {min_objects!r}")
    if distractors not in DISTRACTOR_MODES:
        raise ValueError(f"distractors must be one of {', '.join(DISTRACTOR_MODES)}, got {distractors!r}")


def generate_sample(
    seed: int, task: str | None = None, *, seconds: int = 32, frame_size: int = 64, fps: int = DEFAULT_FPS,
    noise: float = 4.0, max_objects: int = MAX_OBJECTS, distractors: str = "coloured", min_objects: int = MIN_OBJECTS,
) -> SyntheticSample:
    """One video and question, a pure function of its arguments.

    Args:
        seed: a non-negative integer. With `task=None` the task is `TASKS[seed % 4]`, so any run of consecutive
            seeds is balanced across tasks.
        task: one of `TASKS`, or None.
        seconds: video length; one scene per second, `seconds * fps` frames (default 64 frames).
        frame_size: frame height and width in pixels, a multiple of `CELL` (the tiny models' patch size x merge
            size, so the processor does not resize either); each object fills one `CELL` x `CELL` grid cell.
        fps: frames per second, an even integer, so each second is whole temporal patches of 2 frames.
        noise: standard deviation of the per-frame Gaussian pixel noise (0: plain background).
        max_objects / min_objects: the most / fewest objects in one second (1 to 8, at most one per grid cell).
        distractors: `"coloured"` (the default): distractors take palette colours too, so only the asked shape tells
            the evidence apart and a selector must read the question; `"grey"` (a diagnostic): every distractor is
            grey, so the evidence is the only colour and can be found without the question.

    The sample's `counterfactual_question` asks the same task about distractor shape(s) present in the video
    (None when too few distinct ones are): the same video, a question whose evidence is elsewhere.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    task = TASKS[seed % len(TASKS)] if task is None else task
    _check_options(task, seconds, frame_size, fps, noise, max_objects, distractors, min_objects)
    # The task is part of the seed so that the same seed gives unrelated videos for different tasks.
    rng = np.random.default_rng([seed, TASKS.index(task)])
    plan = _plan(task, rng, seconds)
    background = tuple(int(v) for v in rng.integers(20, 56) + rng.integers(-6, 7, size=3))
    objects = _scene_objects(rng, plan.evidence, plan.avoid, seconds, frame_size, min_objects, max_objects,
                             distractors)
    frames = _render(rng, objects, background, seconds, fps, frame_size, noise)
    counterfactual = _counterfactual_question(rng, task, plan, objects)
    evidence_frames = [second * fps + offset for second in sorted(plan.evidence) for offset in range(fps)]
    return SyntheticSample(
        frames=frames, task=task, question=plan.question, answer=plan.answer,
        evidence_frames=evidence_frames, fps=float(fps), seed=seed, objects=objects, background=background,
        counterfactual_question=counterfactual,
    )


def _counterfactual_question(
    rng: np.random.Generator, task: str, plan: _Plan, objects: Sequence[SceneObject]
) -> str | None:
    """The task's question with its shape(s) replaced by distractor shapes present in the video (drawn after the
    frames, so the video does not depend on it)."""
    present = sorted({item.shape for item in objects if not item.evidence})
    asked = [shape for shape in SHAPES if shape in plan.question]
    if len(present) < len(asked):
        return None
    swap = dict(zip(sorted(asked, key=plan.question.index), _choice(rng, present, len(asked))))
    return re.sub(r"the (\w+)", lambda match: f"the {swap.get(match.group(1), match.group(1))}", plan.question)


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
    `datasets.load_dataset("json", data_files=path, split="train")`. A progress bar goes to stderr (transformers'
    `tqdm`: off after `transformers.utils.logging.disable_progress_bar()` or with `HF_HUB_DISABLE_PROGRESS_BARS=1`).
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
    for sample in tqdm(iter_samples(seeds, task, **options), total=len(seeds), desc="synthetic videos", unit="video"):
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
    """Every question and answer text the tasks can produce for videos up to `max_seconds` long, and the chat
    template's fixed text (system prompt, role names)."""
    questions = [f"What colour is the {shape}?" for shape in SHAPES]
    questions += [f"Which appears first, the {a} or the {b}?" for a in SHAPES for b in SHAPES if a != b]
    questions += [f"At which second does the {shape} appear?" for shape in SHAPES]
    questions += [f"How many times does the {shape} appear?" for shape in SHAPES]
    answers = [*COLOURS, *SHAPES, *(str(n) for n in range(max_seconds))]
    scaffold = [SYSTEM_PROMPT, "system\n", "user\n", "assistant\n"]
    return questions + answers + scaffold


def task_vocabulary(max_seconds: int = 64) -> list[str]:
    """The sorted words, numbers and punctuation marks of `task_texts` (plus the newline the layout uses)."""
    words = set()
    for text in task_texts(max_seconds):
        words.update(re.findall(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]", text))
    return sorted(words | {"\n"})


def synthetic_tokenizer(max_seconds: int = 64, vocab_size: int = 512):
    """An offline byte-level BPE tokenizer for the synthetic tasks: Qwen's chat special tokens (those of
    `qtsplus_hf.tiny`), the 256 bytes (any text still encodes) and merges learnt from `task_texts`, so every answer
    (as the assistant's reply starts with it) is one token. Deterministic."""
    tokenizer = byte_level_tokenizer(task_texts(max_seconds) * 4, vocab_size)
    answer_token_ids(tokenizer, max_seconds)  # checks the single-token property
    return tokenizer


def answer_token_ids(tokenizer, max_seconds: int = 64) -> dict[str, int]:
    """The token id of every possible answer text; ValueError when one is not a single token."""
    ids = {}
    for answer in [*COLOURS, *SHAPES, *(str(n) for n in range(max_seconds))]:
        encoded = tokenizer.encode(answer, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"the answer {answer!r} is not a single token for this tokenizer: {encoded}")
        ids[answer] = encoded[0]
    return ids


__all__ = [
    "CELL", "COLOURS", "DEFAULT_FPS", "DISTRACTOR_MODES", "GREY", "MAX_OBJECTS", "MIN_OBJECTS", "SHAPES", "TASKS", "SceneObject", "SyntheticSample", "generate_sample",
    "answer_token_ids", "iter_samples", "nearest_colour", "shape_mask",
    "synthetic_tokenizer", "task_texts", "task_vocabulary", "write_mp4", "write_synthetic_dataset",
]
