"""The `qtsplus` console script: the quick-start command and one-line errors."""

import os
import re
import subprocess
import sys

from qtsplus_hf.default_model import HELD_OUT_SEED_START, synthetic_options
from qtsplus_hf.default_model.train import synthetic_row
from qtsplus_hf.evaluation import normalize_answer
from qtsplus_hf.synthetic import TASKS, generate_sample
from test_default_model import greedy_replies


def run_cli(*args, **env):
    return subprocess.run(
        [sys.executable, "-m", "qtsplus_hf.cli", *args], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, **env),
    )


def test_demo_answers_one_video_per_task_offline_and_writes_pictures(tmp_path):
    result = run_cli("demo", "--output-dir", str(tmp_path), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    answers = re.findall(r"answer: (.+?)   truth: (\S+)   (correct|wrong)", result.stdout)
    truths = [generate_sample(HELD_OUT_SEED_START + i, task, **synthetic_options()) for i, task in enumerate(TASKS)]
    assert [truth for _, truth, _ in answers] == [sample.answer for sample in truths]
    # The same questions answered here from frames in memory (the demo's mp4s are lossless) without the demo's code:
    # its replies, verdicts and count must be those.
    replies = greedy_replies([synthetic_row(HELD_OUT_SEED_START + i, task=task) for i, task in enumerate(TASKS)], 4)
    assert [normalize_answer(reply) for reply, _, _ in answers] == replies
    verdicts = ["correct" if reply == sample.answer else "wrong" for reply, sample in zip(replies, truths)]
    assert [verdict for _, _, verdict in answers] == verdicts
    assert f"\n{verdicts.count('correct')} of 4 correct;" in result.stdout
    for kept, total in re.findall(r"vision tokens kept: (\d+) of (\d+)", result.stdout):
        assert 0 < int(kept) < int(total) == 512
    for task in TASKS:
        with open(tmp_path / f"{task}.png", "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"selection picture: {tmp_path / f'{task}.png'}" in result.stdout
        assert os.path.isfile(tmp_path / f"{task}.mp4")
    for name in ("query_own", "query_counterfactual"):  # one video, two questions about two objects of it
        with open(tmp_path / f"{name}.png", "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"selection picture: {tmp_path / f'{name}.png'}" in result.stdout
    assert re.search(r"overlap: the two questions share \d+ of the \d+ tokens either kept", result.stdout)


def test_bad_argument_is_one_line_and_exit_code_2():
    result = run_cli("demo", "--keep-ratio", "1.5")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--keep-ratio" in result.stderr
    assert "Traceback" not in result.stderr


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("qtsplus-hf ")
