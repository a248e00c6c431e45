"""`python -m qtsplus_hf.video_benchmark` (the README's video-loading figures) on a tiny file: not timed, only that
both loaders run on the test file it writes and report what they returned."""

from qtsplus_hf.video_benchmark import _load, main, write_test_video


def test_both_loaders_read_the_test_video(tmp_path):
    path = write_test_video(str(tmp_path / "test.mp4"), seconds=4, width=128, height=72, native_fps=2)
    ours, theirs = _load("qtsplus", path, fps=1.0), _load("transformers", path, fps=1.0)
    assert ours["total_num_frames"] == theirs["total_num_frames"] == 8
    assert ours["frames_shape"][0] == theirs["frames_shape"][0] == 4  # 4 seconds at fps=1
    assert theirs["frames_shape"][1:] == [72, 128, 3]  # transformers keeps the full size
    for result in (ours, theirs):
        assert result["seconds"] > 0 and isinstance(result["peak_rss_delta_bytes"], int)


def test_missing_video_is_one_line(tmp_path, capsys):
    assert main(["--video", str(tmp_path / "missing.mp4"), "--repeats", "1"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
