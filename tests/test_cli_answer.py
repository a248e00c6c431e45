"""`qtsplus answer`: answer, selection picture, JSON; bad input is one line, exit code 2, nothing written."""

import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from conftest import write_mp4
from test_video_loading import write_audio_only, write_no_frames, write_truncated


def answer(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "qtsplus_hf.cli", "answer", *args],
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize(("num_frames", "fps", "patches"), [(30, 10, 3), (1, 1, 1)])
def test_answer_writes_picture_and_json(tmp_path, tiny_checkpoint, num_frames, fps, patches):
    video = write_mp4(tmp_path / "v.mp4", num_frames, fps)
    viz, report = tmp_path / "kept.png", tmp_path / "out.json"
    result = answer("--model", tiny_checkpoint, "--video", video, "--question", "What colour is the circle?",
                    "--keep-ratio", "0.5", "--viz", str(viz), "--json", str(report))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "vision tokens kept:" in result.stdout and "time: decode" in result.stdout
    data = json.loads(report.read_text())
    assert data["kept_tokens"] == -(-data["total_tokens"] // 2) and data["rho"] == 0.5
    assert set(data["seconds"]) == {"decode", "vision", "selection", "generation"}
    with Image.open(viz) as picture:
        # 2 inches per shown patch (those holding kept tokens: no evidence is known here), 100 dpi
        assert picture.format == "PNG" and picture.size == (200 * len(data["kept_seconds"]), 450)
        assert 1 <= len(data["kept_seconds"]) <= patches


BAD = {
    "missing file": (lambda tmp: ["--video", str(tmp / "nope.mp4")], "video file not found"),
    "not a video": (lambda tmp: ["--video", str((tmp / "a.mp4").write_text("x") and tmp / "a.mp4")], "cannot read"),
    "truncated": (lambda tmp: ["--video", write_truncated(tmp / "cut.mp4")], "corrupt|truncated|cannot read"),
    "zero frames": (lambda tmp: ["--video", write_no_frames(tmp / "empty.mp4")], "no video frames"),
    "audio only": (lambda tmp: ["--video", write_audio_only(tmp / "sound.m4a")], "audio-only"),
    "empty question": (lambda tmp: ["--video", write_mp4(tmp / "v.mp4", 8, 4), "--question", " "], "question is empty"),
    "negative ratio": (lambda tmp: ["--video", write_mp4(tmp / "v.mp4", 8, 4), "--keep-ratio", "-0.1"], "keep-ratio"),
    "ratio above 1": (lambda tmp: ["--video", write_mp4(tmp / "v.mp4", 8, 4), "--keep-ratio", "1.5"], "keep-ratio"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, tiny_checkpoint, case):
    make, message = BAD[case]
    args = make(tmp_path)
    if "--question" not in args:
        args += ["--question", "What colour?"]
    viz, report = tmp_path / "kept.png", tmp_path / "out.json"
    result = answer("--model", tiny_checkpoint, *args, "--viz", str(viz), "--json", str(report))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("qtsplus")]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not viz.exists() and not report.exists()
    assert not [name for name in os.listdir(tmp_path) if name.endswith((".png", ".json"))]


def test_answer_with_the_selector_disabled_reports_every_token(tmp_path):
    import torch

    from qtsplus_hf import QTSplusQwen2_5_VLForConditionalGeneration, save_checkpoint
    from qtsplus_hf.tiny import tiny_processor, tiny_qtsplus_config

    torch.manual_seed(0)
    model = QTSplusQwen2_5_VLForConditionalGeneration(tiny_qtsplus_config(qtsplus_enabled=False)).eval()
    save_checkpoint(model, tiny_processor(), tmp_path / "stock-like")
    report = tmp_path / "out.json"
    result = answer("--model", str(tmp_path / "stock-like"), "--video", write_mp4(tmp_path / "v.mp4", 12, 6),
                    "--question", "What colour?", "--json", str(report))
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(report.read_text())
    assert data["kept_tokens"] == data["total_tokens"] > 0 and data["rho"] == 1.0
