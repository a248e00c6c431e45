# Copyright 2026 The qtsplus-hf authors. Licensed under the Apache License, Version 2.0.
"""Video question answering data: loading rows with `datasets`, checking them, and collating them for training.

A row is `{video, question, answer}`, optionally with `options` (multiple choice) and a question type. What is
accepted, so that common layouts (the QTSplus-Dataset's among them) load without conversion scripts:

- video: `video`, `video_path` or `vision_id` — a path (relative to `video_root`), or frames in memory
  (an array / tensor `[T, H, W, 3]`, then `fps` in the row says how they were sampled);
- options: a list (`["red", "blue"]`, or `["A. red", "B. blue"]`), a dict `{"A": "red", ...}`, a JSON string of
  either, or columns `A`, `B`, `C`, ... ; the answer: a letter, an index, or the text of an option;
- question type: `type`, `question_type`, `qa_type` or `task`;
- evidence (optional, for the grounding loss and the evidence figures of `qtsplus eval`): `evidence_seconds` (a list
  of seconds, or JSON text of one) and `evidence_boxes` (`[[second, x0, y0, x1, y1], ...]` in fractions of the
  frame); `counterfactual_question`, a question about something else in the same video.

Multiple-choice rows are asked with their lettered options and answered by the letter (the paper's VSCQ
classification); rows without options are free-form answers (VQA) learned by teacher forcing.
"""

import json
import logging
import os
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .evidence import evidence_token_mask, patch_start_seconds
from .processing_qtsplus import MULTIPLE_CHOICE_INSTRUCTION
from .video_qtsplus import load_video_for_processor


logger = logging.getLogger(__name__)

LETTERS = string.ascii_uppercase
VIDEO_KEYS = ("video", "video_path", "vision_id")
TYPE_KEYS = ("type", "question_type", "qa_type", "task")


@dataclass
class SkippedRow:
    """A row left out of the data, and why."""

    index: int
    video: str | None
    reason: str


@dataclass
class VideoQAData:
    """Normalised rows (see `normalize_row`) and the rows that were skipped."""

    rows: list[dict]
    skipped: list[SkippedRow]
    total: int

    def skipped_summary(self, show: int = 3) -> str:
        """One line: how many rows were skipped, with the first few videos and reasons."""
        examples = "; ".join(f"row {s.index} ({s.video}): {s.reason}" for s in self.skipped[:show])
        more = f"; and {len(self.skipped) - show} more" if len(self.skipped) > show else ""
        return f"skipped {len(self.skipped)} of {self.total} rows: {examples}{more}"


def _first_present(row: dict, keys: Iterable[str]) -> Any:
    for key in keys:
        value = row.get(key)
        if value is not None and not (isinstance(value, str) and not value.strip()):
            return value
    return None


def _strip_letter_prefix(option: str, letter: str) -> str:
    """`"B. blue"` / `"(B) blue"` / `"B: blue"` -> `"blue"` when the prefix is this option's own letter."""
    text = option.strip()
    for prefix in (f"{letter}.", f"({letter})", f"{letter}:", f"{letter})"):
        if text.startswith(prefix):
            return text[len(prefix):].strip()
    return text


def _options_of(row: dict) -> list[str] | None:
    options = row.get("options")
    if options is None:
        options = row.get("option")
    if isinstance(options, str) and options.strip().startswith(("[", "{")):
        options = json.loads(options)  # CSV files carry lists as JSON text
    if isinstance(options, dict):
        options = [options[letter] for letter in LETTERS if options.get(letter) is not None]
    if options is None:
        columns = []
        for letter in LETTERS:
            if row.get(letter) is None:
                break
            columns.append(row[letter])
        options = columns or None
    if options is None:
        return None
    if not isinstance(options, (list, tuple)) or not options:
        raise ValueError(f"options must be a non-empty list or an A/B/C... mapping, got {options!r}")
    if len(options) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} options are supported, got {len(options)}")
    return [_strip_letter_prefix(str(option), letter) for option, letter in zip(options, LETTERS)]


def _answer_letter(answer: Any, options: list[str]) -> str:
    """The letter of the right option, from a letter, an index or the option's text."""
    letters = LETTERS[: len(options)]
    if isinstance(answer, (int, np.integer)) and not isinstance(answer, bool):
        if 0 <= answer < len(options):
            return letters[answer]
        raise ValueError(f"answer index {answer} is out of range for {len(options)} options")
    text = str(answer).strip()
    candidate = text.rstrip(".):").lstrip("(")
    if len(candidate) == 1 and candidate.upper() in letters:
        return candidate.upper()
    matches = [letter for letter, option in zip(letters, options) if option.strip().lower() == text.lower()]
    if matches:
        return matches[0]
    raise ValueError(f"the answer {text!r} is not one of the options {options}")


def _json_list(value: Any, name: str) -> list | None:
    """A list column that CSV files hold as JSON text; None when absent."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{name} is not a list (nor JSON text of one): {value!r}") from None
    if isinstance(value, (np.ndarray, torch.Tensor)):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list, got {type(value).__name__}")
    return list(value)


def _evidence_of(row: dict) -> dict:
    """The optional evidence columns, checked: seconds >= 0, boxes `[second, x0, y0, x1, y1]`."""
    seconds = _json_list(row.get("evidence_seconds"), "evidence_seconds")
    boxes = _json_list(row.get("evidence_boxes"), "evidence_boxes")
    if seconds is not None and not all(isinstance(v, (int, float)) and v >= 0 for v in seconds):
        raise ValueError(f"evidence_seconds must be non-negative numbers, got {seconds}")
    for box in boxes or []:
        if not isinstance(box, (list, tuple)) or len(box) != 5 or box[0] < 0:
            raise ValueError(f"each evidence box must be [second, x0, y0, x1, y1], got {box}")
    counterfactual = row.get("counterfactual_question")
    if not isinstance(counterfactual, str) or not counterfactual.strip():
        counterfactual = None
    return {"evidence_seconds": seconds, "evidence_boxes": boxes, "counterfactual_question": counterfactual}


def normalize_row(row: dict, video_root: str | None = None) -> dict:
    """One raw row -> `{video, question, answer, options, answer_letter, type, fps, evidence_seconds,
    evidence_boxes, counterfactual_question}`.

    `answer` is the training target: the letter for multiple choice, the free-form text otherwise.
    Raises ValueError naming what is wrong with the row.
    """
    video = _first_present(row, VIDEO_KEYS)
    if video is None:
        raise ValueError(f"no video (one of {', '.join(VIDEO_KEYS)})")
    if isinstance(video, (str, os.PathLike)):
        video = os.fspath(video)
        if video_root is not None and not os.path.isabs(video):
            video = os.path.join(video_root, video)
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("no question")
    answer = row.get("answer")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise ValueError("no answer")
    options = _options_of(row)
    letter = _answer_letter(answer, options) if options is not None else None
    question_type = _first_present(row, TYPE_KEYS)
    return {
        "video": video,
        "question": question.strip(),
        "answer": letter if letter is not None else str(answer).strip(),
        "options": options,
        "answer_letter": letter,
        "type": None if question_type is None else str(question_type),
        "fps": row.get("fps"),
        **_evidence_of(row),
    }


def question_text(row: dict) -> str:
    """What the user asks: the question, then one `X. option` line per option and the answer-format instruction."""
    if not row.get("options"):
        return row["question"]
    lines = [row["question"]] + [f"{letter}. {option}" for letter, option in zip(LETTERS, row["options"])]
    return "\n".join(lines + [MULTIPLE_CHOICE_INSTRUCTION])


def read_rows(data: Any, split: str = "train") -> list[dict]:
    """Raw rows from a JSON / JSONL / CSV file or a `datasets` folder saved with `save_to_disk`, or rows given."""
    import datasets

    if isinstance(data, (datasets.Dataset, list, tuple)):
        return list(data)
    if isinstance(data, datasets.DatasetDict):
        return list(data[split])
    path = os.fspath(data)
    if os.path.isdir(path):
        loaded = datasets.load_from_disk(path)
        return list(loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded)
    if not os.path.isfile(path):
        raise ValueError(f"data file not found: {path}")
    extension = os.path.splitext(path)[1].lower()
    builder = {".json": "json", ".jsonl": "json", ".csv": "csv"}.get(extension)
    if builder is None:
        raise ValueError(f"data must be .json, .jsonl, .csv or a saved datasets folder, got {path}")
    try:
        return list(datasets.load_dataset(builder, data_files=path, split="train"))
    except (datasets.exceptions.DatasetGenerationError, ValueError) as error:
        raise ValueError(f"cannot read {path} as {builder}: {error.__cause__ or error}") from None


def _video_problem(path: str, checked: dict[str, str | None]) -> str | None:
    """Why a video file cannot be used (None if it decodes), cached per path: rows often share a video."""
    if path not in checked:
        import av

        if not os.path.isfile(path):
            checked[path] = "video file not found"
        else:
            try:
                with av.open(path) as container:
                    if not container.streams.video:
                        checked[path] = "no video stream"
                    else:
                        next(container.decode(video=0))
                        checked[path] = None
            except (av.error.FFmpegError, StopIteration, UnicodeDecodeError) as error:
                checked[path] = f"unreadable video ({type(error).__name__})"
    return checked[path]


def load_video_qa(data: Any, video_root: str | None = None, split: str = "train") -> VideoQAData:
    """Load, normalise and check video QA rows; rows that cannot be used are skipped and reported, never silently.

    Args:
        data: a JSON / JSONL / CSV file, a folder saved by `datasets`, a `datasets.Dataset`, or a list of dicts.
        video_root: the folder relative video paths start from.
        split: the split to take from a `DatasetDict`.
    """
    raw = read_rows(data, split)
    rows, skipped, checked = [], [], {}
    for index, row in enumerate(raw):
        video = _first_present(row, VIDEO_KEYS) if isinstance(row, dict) else None
        shown = video if isinstance(video, str) else None
        try:
            if not isinstance(row, dict):
                raise ValueError("not a mapping")
            normalised = normalize_row(row, video_root)
        except ValueError as error:
            skipped.append(SkippedRow(index, shown, str(error)))
            continue
        if isinstance(normalised["video"], str):
            problem = _video_problem(normalised["video"], checked)
            if problem is not None:
                skipped.append(SkippedRow(index, normalised["video"], problem))
                continue
        rows.append(normalised)
    result = VideoQAData(rows=rows, skipped=skipped, total=len(raw))
    if skipped:
        logger.warning(result.skipped_summary())
    if not rows:
        raise ValueError(f"no usable rows in the data ({result.skipped_summary() if skipped else 'it is empty'})")
    return result


def chat_messages(question: str, answer: str | None = None, question_first: bool = False) -> list[dict]:
    """A user turn holding the video and the question (after the video, or before it with `question_first`), and
    the assistant's answer when there is one."""
    content = [{"type": "video"}, {"type": "text", "text": question}]
    messages = [{"role": "user", "content": content[::-1] if question_first else content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def answer_token_labels(processor, input_ids: torch.Tensor) -> torch.Tensor:
    """Labels `[B, S]`: the tokens of the last assistant turn (its text and `<|im_end|>`), -100 everywhere else."""
    tokenizer = processor.tokenizer
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    labels = torch.full_like(input_ids, -100)
    for row, ids in enumerate(input_ids):
        starts = (ids == im_start).nonzero().flatten().tolist()
        role, content_start = processor._role_header(ids, starts[-1]) if starts else ("", 0)
        if role != "assistant":
            raise ValueError("the last chat turn is not the assistant's answer")
        ends = (ids[content_start:] == im_end).nonzero()
        content_end = content_start + int(ends[0]) + 1 if len(ends) else len(ids)
        labels[row, content_start:content_end] = ids[content_start:content_end]
    return labels


def evidence_sequence_mask(processor, batch: dict, rows: Sequence[dict]) -> torch.Tensor:
    """Bool `[B, S]`: the video placeholder positions of each row's evidence tokens (one video per row)."""
    video_token = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    video_processor = processor.video_processor
    merge_size, temporal_patch_size = video_processor.merge_size, video_processor.temporal_patch_size
    mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for index, row in enumerate(rows):
        starts = patch_start_seconds(batch, index, temporal_patch_size)
        tokens = evidence_token_mask(batch["video_grid_thw"][index].tolist(), starts, merge_size,
                                     row.get("evidence_seconds"), row.get("evidence_boxes"))
        mask[index, (batch["input_ids"][index] == video_token).nonzero().flatten()] = tokens
    return mask


class VideoQACollator:
    """Turn normalised rows into model inputs: decode and sample each video, apply the chat template, run the
    processor (padding on the right for training) and, with `with_answers`, add `labels` for the answer tokens.

    `qtsplus_query_mask` covers the user's text (question and options), never the answer. `keep_ratio`, when
    given, goes into every batch as `qtsplus_keep_ratio` (a fixed share of tokens instead of the predicted budget).
    Rows with `evidence_seconds` / `evidence_boxes` add `qtsplus_evidence_mask` (training batches only).
    `question_first` puts the question before the video in the user turn.
    """

    def __init__(self, processor, fps: float | None = None, min_frames: int | None = None,
                 max_frames: int | None = None, with_answers: bool = True, keep_ratio: float | None = None,
                 question_first: bool = False) -> None:
        self.processor = processor
        self.fps, self.min_frames, self.max_frames = fps, min_frames, max_frames
        self.with_answers = with_answers
        self.keep_ratio = keep_ratio
        self.question_first = question_first

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        texts, videos, metadata = [], [], []
        for row in rows:
            frames, meta = load_video_for_processor(
                self.processor, row["video"], row.get("fps") or self.fps, self.min_frames, self.max_frames
            )
            answer = row["answer"] if self.with_answers else None
            messages = chat_messages(question_text(row), answer, self.question_first)
            texts.append(self.processor.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=not self.with_answers
            ))
            videos.append(frames)
            metadata.append(meta)
        batch = self.processor(
            text=texts, videos=videos, video_metadata=metadata, do_sample_frames=False, padding=True,
            padding_side="right" if self.with_answers else "left", return_tensors="pt",
        )
        if self.with_answers:
            batch["labels"] = answer_token_labels(self.processor, batch["input_ids"])
            batch["labels"][batch["attention_mask"] == 0] = -100
        batch = dict(batch)
        if self.with_answers and any(row.get("evidence_seconds") or row.get("evidence_boxes") for row in rows):
            batch["qtsplus_evidence_mask"] = evidence_sequence_mask(self.processor, batch, rows)
        if self.keep_ratio is not None:
            batch["qtsplus_keep_ratio"] = self.keep_ratio
        return batch


__all__ = [
    "SkippedRow", "VideoQAData", "VideoQACollator", "answer_token_labels", "chat_messages", "load_video_qa",
    "normalize_row", "question_text", "read_rows",
]
