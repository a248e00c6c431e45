"""The synthetic long-video QA generator: determinism, ground truth in the pixels, mp4 round trip, manifest."""

import json
import os
import re

import numpy as np
import pytest

from qtsplus_hf.synthetic import (
    CELL,
    COLOURS,
    MAX_OBJECTS,
    MIN_OBJECTS,
    GREY,
    SHAPES,
    TASKS,
    answer_token_ids,
    generate_sample,
    iter_samples,
    nearest_colour,
    shape_mask,
    synthetic_tokenizer,
    task_vocabulary,
    write_mp4,
    write_synthetic_dataset,
)
from qtsplus_hf.video_qtsplus import load_video


QUESTION_PATTERNS = {
    "needle": r"What colour is the (\w+)\?",
    "order": r"Which appears first, the (\w+) or the (\w+)\?",
    "localisation": r"At which second does the (\w+) appear\?",
    "counting": r"How many times does the (\w+) appear\?",
}


@pytest.fixture(scope="module")
def samples():
    """Ten samples of each task (seeds 0..39 cycle through the tasks)."""
    return list(iter_samples(range(40)))


def asked_shapes(sample) -> tuple[str, ...]:
    match = re.fullmatch(QUESTION_PATTERNS[sample.task], sample.question)
    assert match, sample.question
    assert all(shape in SHAPES for shape in match.groups())
    return match.groups()


def seconds_showing(sample, shape: str) -> list[int]:
    return sorted({item.second for item in sample.objects if item.shape == shape})


def frames_of(sample, seconds) -> list[int]:
    fps = int(sample.fps)
    return [second * fps + offset for second in sorted(seconds) for offset in range(fps)]


def object_pixels(frame: np.ndarray, item, erode: int = 0) -> np.ndarray:
    """The pixels of a recorded object in a frame, `[N, 3]`; `erode` drops pixels near the shape's edge."""
    mask = shape_mask(item.shape, item.size)
    for _ in range(erode):  # 4-neighbour erosion, so compression ringing at the edges is left out
        mask = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
    return frame[item.top : item.top + item.size, item.left : item.left + item.size][mask]


def test_same_seed_same_sample_other_seed_other_sample():
    for seed in range(4):
        first, again = generate_sample(seed), generate_sample(seed)
        assert np.array_equal(first.frames, again.frames)
        assert (first.task, first.question, first.answer, first.evidence_frames, first.objects) == (
            again.task, again.question, again.answer, again.evidence_frames, again.objects
        )
        other = generate_sample(seed + len(TASKS))  # same task, next seed
        assert other.task == first.task
        assert not np.array_equal(first.frames, other.frames)
        assert first.objects != other.objects
    questions = {generate_sample(seed).question for seed in range(0, 80, len(TASKS))}  # 20 needle samples
    assert len(questions) > 1
    # An explicit task gives that task; the same seed under two tasks gives unrelated videos.
    assert generate_sample(0, "counting").task == "counting"
    assert not np.array_equal(generate_sample(0, "needle").frames, generate_sample(0, "order").frames)


def test_sample_layout(samples):
    assert [sample.task for sample in samples[:8]] == list(TASKS) * 2
    for sample in samples:
        assert sample.frames.shape == (64, 64, 64, 3) and sample.frames.dtype == np.uint8
        assert sample.fps == 2.0
        allowed = {"needle": set(COLOURS), "order": set(SHAPES), "localisation": {str(s) for s in range(32)},
                   "counting": {"1", "2", "3", "4", "5"}}[sample.task]
        assert sample.answer in allowed
        # every object fills one cell of the 8-pixel grid (one vision token of the tiny models)
        assert all(item.size == CELL and item.top % CELL == item.left % CELL == 0 for item in sample.objects)
        # Evidence fills whole temporal patches (frames 2s and 2s + 1), so 2-frame patching keeps it.
        pairs = np.array(sample.evidence_frames).reshape(-1, 2)
        assert (pairs[:, 0] % 2 == 0).all() and (pairs[:, 1] == pairs[:, 0] + 1).all()
        per_second = np.bincount([item.second for item in sample.objects], minlength=32)
        assert per_second.min() >= MIN_OBJECTS and per_second.max() <= MAX_OBJECTS
    # Dense by default: more objects than the 15% of 512 tokens the largest budget keeps.
    assert min(len(sample.objects) for sample in samples if sample.frames.shape[0] == 64) > 77


@pytest.mark.parametrize(
    "options", [{}, dict(seconds=16, frame_size=32, fps=4, max_objects=3, noise=8.0, distractors="grey")]
)
def test_recorded_objects_explain_every_pixel(options):
    """Each recorded object is drawn in its colour on every frame of its second, and nothing else is drawn: all
    other pixels are the background plus light noise. So the absence checks below, made on the ground truth, hold
    for the pixels too."""
    limit = 6 * options.get("noise", 4.0)  # six standard deviations of the pixel noise
    for sample in iter_samples(range(8), **options):
        fps = int(sample.fps)
        assert len(sample.frames) == fps * options.get("seconds", 32)
        for index, frame in enumerate(sample.frames):
            drawn = np.zeros(frame.shape[:2], dtype=bool)
            for item in (item for item in sample.objects if item.second == index // fps):
                pixels = object_pixels(frame, item)
                assert {nearest_colour(pixel) for pixel in pixels} == {item.colour}
                assert np.abs(pixels.astype(int) - item.rgb).max() <= limit
                box = drawn[item.top : item.top + item.size, item.left : item.left + item.size]
                box |= shape_mask(item.shape, item.size)
            assert np.abs(frame[~drawn].astype(int) - sample.background).max() <= limit


def test_distractors_are_coloured_by_default_and_grey_on_request():
    for sample in iter_samples(range(40), seconds=16, frame_size=32, distractors="grey"):
        assert all((item.colour != GREY) == item.evidence for item in sample.objects)
    coloured = [item for sample in iter_samples(range(40), seconds=16, frame_size=32)
                for item in sample.objects if not item.evidence]
    assert {item.colour for item in coloured} == set(COLOURS)


def test_counterfactual_question_names_distractor_shapes_present_in_the_video():
    for sample in iter_samples(range(40), seconds=16, frame_size=32):
        question, counterfactual = sample.question, sample.counterfactual_question
        assert counterfactual is not None and counterfactual != question
        asked = [shape for shape in SHAPES if shape in question]
        named = [shape for shape in SHAPES if shape in counterfactual]
        present = {item.shape for item in sample.objects if not item.evidence}
        assert len(named) == len(asked) and set(named) <= present and not set(named) & set(asked)
        # Same template: only the shape words differ.
        for shape in SHAPES:
            question, counterfactual = question.replace(shape, "X"), counterfactual.replace(shape, "X")
        assert question == counterfactual
        # Evidence columns: the boxes are the evidence objects' cells, in fractions of the frame.
        boxes = [[item.second, item.left / 32, item.top / 32, (item.left + 8) / 32, (item.top + 8) / 32]
                 for item in sample.objects if item.evidence]
        assert sample.evidence_boxes == boxes
        assert sample.evidence_seconds == sorted({box[0] for box in boxes})


def test_shapes_are_distinct_masks():
    masks = {shape: shape_mask(shape, 16) for shape in SHAPES}
    for a in SHAPES:
        assert masks[a].sum() > 60
        for b in SHAPES:
            if a != b:
                assert (masks[a] ^ masks[b]).sum() >= 20, (a, b)
    small = {shape: shape_mask(shape, CELL) for shape in SHAPES}  # the size that is drawn
    assert min((small[a] ^ small[b]).sum() for a in SHAPES for b in SHAPES if a != b) >= 8
    with pytest.raises(ValueError, match="unknown shape"):
        shape_mask("hexagon", 16)


@pytest.mark.parametrize("task", TASKS)
def test_evidence_frames_hold_the_answer(samples, task):
    for sample in (sample for sample in samples if sample.task == task):
        shapes = asked_shapes(sample)
        evidence_seconds = sorted({second for shape in shapes for second in seconds_showing(sample, shape)})
        assert sample.evidence_frames == frames_of(sample, evidence_seconds)
        assert all(item.evidence == (item.shape in shapes) for item in sample.objects)
        answer = sample.answer
        if task == "needle":
            (shape,) = shapes
            (needle,) = [item for item in sample.objects if item.shape == shape]  # one object, one second
            assert needle.colour == answer
            for index in sample.evidence_frames:
                assert {nearest_colour(pixel) for pixel in object_pixels(sample.frames[index], needle)} == {answer}
        elif task == "order":
            (first,), (second,) = (seconds_showing(sample, shape) for shape in shapes)
            assert first != second
            assert answer == shapes[0 if first < second else 1]
        elif task == "localisation":
            (shape,) = shapes
            assert seconds_showing(sample, shape) == [int(answer)]
            # frame i is shown at i / fps seconds: the answer is the whole second the object comes in
            assert int(sample.evidence_frames[0] / sample.fps) == int(answer)
        else:
            (shape,) = shapes
            seconds = seconds_showing(sample, shape)
            assert len(seconds) == int(answer)
            assert len(seconds) == 1 or min(np.diff(seconds)) >= 2  # separate appearances, never adjacent


def test_answers_are_balanced():
    samples = list(iter_samples(range(200), noise=0))
    colours = np.bincount([list(COLOURS).index(s.answer) for s in samples if s.task == "needle"], minlength=6)
    assert colours.min() >= 2, colours  # ~8 each of 50 needles
    seconds = [int(s.answer) for s in samples if s.task == "localisation"]
    assert min(seconds) <= 4 and max(seconds) >= 27  # spread over the whole video
    counts = np.bincount([int(s.answer) for s in samples if s.task == "counting"], minlength=6)[1:]
    assert counts.min() >= 3, counts  # ~10 of each count
    first_named = [asked_shapes(s)[0] == s.answer for s in samples if s.task == "order"]
    assert 10 <= sum(first_named) <= 40  # the first-named shape is the answer about half the time


def test_uniform_temporal_sampling_misses_the_needle():
    """Keeping 10% of the temporal patches, evenly spaced, sees the needle only when its (uniformly drawn) second is
    one of them: probability 4/32 = 0.125 by construction. Measured over 200 needles."""
    seconds, kept = 32, 4
    grid = set(np.linspace(0, seconds - 1, kept).round().astype(int).tolist())
    hits = 0
    for seed in range(200):
        sample = generate_sample(seed, "needle", seconds=seconds, noise=0)
        hits += bool({index // 2 for index in sample.evidence_frames} & grid)
    # 0.125 +- 3 binomial standard deviations (0.023); the lower bound shows needles are not hidden from the grid
    assert 0.055 <= hits / 200 <= 0.2, hits


def test_timestamps_reach_the_model_inputs():
    """Through the project's processor path: one temporal patch per second, second_per_grid_ts = 1, and the
    localisation answer is the temporal index of the evidence patch."""
    from qtsplus_hf.pipeline_video_text_to_text import video_question_inputs
    from qtsplus_hf.tiny import tiny_processor

    processor = tiny_processor(max_pixels=64 * 64, tokenizer=synthetic_tokenizer())
    sample = generate_sample(2)
    assert sample.task == "localisation"
    inputs, frames, metadata = video_question_inputs(processor, sample.frames, sample.question)
    assert inputs["video_grid_thw"].tolist() == [[32, 16, 16]]
    assert [float(s) for s in inputs["second_per_grid_ts"]] == [1.0]
    assert np.array_equal(frames, sample.frames)  # 64x64 is a multiple of the pixel factor 8: no resize
    assert metadata.timestamps[sample.evidence_frames[0]] == int(sample.answer)
    question = processor.tokenizer.decode(inputs["input_ids"][0][inputs["qtsplus_query_mask"][0]])
    assert question == sample.question


@pytest.mark.parametrize("lossless", [True, False])
def test_mp4_round_trip_keeps_the_evidence_colour(tmp_path, lossless):
    sample = generate_sample(4)  # needle
    path = write_mp4(tmp_path / "needle.mp4", sample.frames, sample.fps, lossless=lossless)
    frames, metadata = load_video(path, fps=sample.fps, factor=8, min_pixels=16 * 16, max_pixels=64 * 64)
    assert frames.shape == sample.frames.shape and metadata.sampled_fps == sample.fps
    error = np.abs(frames.astype(int) - sample.frames.astype(int)).mean()
    assert error <= (1.0 if lossless else 6.0), error
    for item in sample.objects:  # every object, the needle included, still reads as its colour
        for index in (2 * item.second, 2 * item.second + 1):
            pixels = object_pixels(frames[index], item, erode=0 if lossless else 1)
            colours = [nearest_colour(pixel) for pixel in pixels]
            assert colours.count(item.colour) >= (len(colours) if lossless else 0.95 * len(colours))
            assert nearest_colour(np.median(pixels, axis=0)) == item.colour
    assert [os.listdir(tmp_path)] == [["needle.mp4"]]


def test_manifest_loads_with_datasets(tmp_path, capsys):
    import datasets

    manifest = write_synthetic_dataset(tmp_path / "data", range(100, 106))
    captured = capsys.readouterr()
    assert "synthetic videos: 100%" in captured.err and "6/6" in captured.err and not captured.out  # a bar
    rows = datasets.load_dataset("json", data_files=manifest, split="train", cache_dir=str(tmp_path / "cache"))
    assert len(rows) == 6
    assert set(rows.column_names) == {"video", "question", "answer", "type", "evidence_frames", "evidence_seconds",
                                      "evidence_boxes", "counterfactual_question", "fps", "seed"}
    for row in rows:
        sample = generate_sample(row["seed"])
        assert row == sample.manifest_row(row["video"])
        assert row["video"] == f"videos/{sample.task}_{sample.seed:06d}.mp4"
        path = os.path.join(os.path.dirname(manifest), row["video"])
        frames, _ = load_video(path, fps=row["fps"], factor=8, min_pixels=16 * 16, max_pixels=64 * 64)
        assert np.abs(frames.astype(int) - sample.frames.astype(int)).mean() <= 1.0
    with open(manifest) as handle:
        assert [json.loads(line)["seed"] for line in handle] == list(range(100, 106))
    assert sorted(os.listdir(tmp_path / "data")) == ["manifest.jsonl", "videos"]  # no temporary files left


def test_writing_without_progress_bars(tmp_path, capsys):
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # what `--no-progress` and HF_HUB_DISABLE_PROGRESS_BARS=1 do
    try:
        write_synthetic_dataset(tmp_path / "data", [100])
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()
    assert capsys.readouterr().err == ""


def test_tokenizer_covers_the_task_vocabulary(samples):
    tokenizer = synthetic_tokenizer()
    ids = answer_token_ids(tokenizer)
    assert len(set(ids.values())) == len(ids) == len(COLOURS) + len(SHAPES) + 64
    vocabulary = set(task_vocabulary())
    for sample in samples:
        assert set(re.findall(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]", sample.question)) <= vocabulary
        messages = [
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": sample.question}]},
            {"role": "assistant", "content": sample.answer},
        ]
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        # the reply is one answer token, then <|im_end|>
        assert encoded[-3:-1] == [ids[sample.answer], tokenizer.convert_tokens_to_ids("<|im_end|>")]
        # task words are whole tokens: one token per word, number or punctuation mark
        words = re.findall(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]", sample.question)
        assert len(tokenizer.encode(sample.question)) == len(words)
        assert tokenizer.decode(tokenizer.encode(sample.question)) == sample.question
    assert len(tokenizer) <= 512
    assert synthetic_tokenizer().get_vocab() == tokenizer.get_vocab()  # deterministic
    assert set(task_vocabulary(max_seconds=40)) < vocabulary and "39" in task_vocabulary(max_seconds=40)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seed=-1), "seed must be a non-negative integer"),
        (dict(seed=1.5), "seed must be a non-negative integer"),
        (dict(seed=0, task="colour"), "unknown task 'colour'"),
        (dict(seed=0, seconds=1), "seconds must be an integer >= 2"),
        (dict(seed=0, frame_size=16), "frame_size must be a multiple of 8 and >= 32"),
        (dict(seed=0, frame_size=36), "frame_size must be a multiple of 8 and >= 32"),
        (dict(seed=0, fps=3), "fps must be a positive even integer"),
        (dict(seed=0, noise=-1.0), "noise must be a standard deviation"),
        (dict(seed=0, max_objects=9), r"max_objects must be an integer in \[1, 8\]"),
        (dict(seed=0, min_objects=5), r"min_objects must be an integer in \[1, max_objects=4\]"),
        (dict(seed=0, distractors="red"), "distractors must be one of grey, coloured"),
    ],
)
def test_bad_generator_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_sample(**kwargs)


def test_bad_writer_arguments(tmp_path):
    frames = generate_sample(0, seconds=16, frame_size=32).frames
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(tmp_path / "a.mp4", frames.astype(np.float32), 2.0)
    with pytest.raises(ValueError, match="even"):
        write_mp4(tmp_path / "a.mp4", frames[:, :31], 2.0)
    with pytest.raises(ValueError, match="does not exist"):
        write_mp4(tmp_path / "missing" / "a.mp4", frames, 2.0)
    with pytest.raises(ValueError, match="distinct"):
        write_synthetic_dataset(tmp_path / "data", [1, 1])
    with pytest.raises(ValueError, match="unknown task"):
        write_synthetic_dataset(tmp_path / "data", [1], task="colour")
    assert os.listdir(tmp_path) == []  # nothing written: arguments are checked before any file
