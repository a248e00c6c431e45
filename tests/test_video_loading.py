"""Loading videos: Qwen frame sampling, timestamps, pixel budget, memory, and unreadable files."""

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from qtsplus_hf import load_video

from conftest import write_mp4


@pytest.mark.parametrize(
    ("num_frames", "native_fps", "width", "height"), [(40, 10, 64, 48), (90, 30, 80, 40), (7, 5, 48, 64), (13, 24, 96, 96)]
)
def test_sampling_follows_the_fps_rule(tmp_path, num_frames, native_fps, width, height):
    path = write_mp4(tmp_path / "v.mp4", num_frames, native_fps, width, height, lossless=True)
    frames, metadata = load_video(path, fps=2.0, min_frames=2, max_frames=768, min_pixels=8 * 8,
                                  max_pixels=32 * 32, factor=8)
    duration = num_frames / native_fps
    expected = math.floor(min(max(duration * 2.0, 2), num_frames) / 2) * 2
    assert len(frames) == expected and metadata.total_num_frames == num_frames
    assert metadata.frames_indices == np.linspace(0, num_frames - 1, expected).round().astype(int).tolist()
    np.testing.assert_allclose(metadata.timestamps, np.array(metadata.frames_indices) / native_fps)
    assert max(metadata.timestamps) < duration
    assert frames.dtype == np.uint8 and frames.shape[1] % 8 == 0 and frames.shape[2] % 8 == 0
    assert frames.shape[1] * frames.shape[2] <= 32 * 32
    # the right frames were kept: the red channel encodes the frame index; a neighbouring frame is 1 level away
    decoded_index = frames[..., 0].reshape(len(frames), -1).mean(-1)
    assert np.abs(decoded_index - np.array(metadata.frames_indices)).max() < 0.25


def test_max_frames_caps_the_sample(tmp_path):
    path = write_mp4(tmp_path / "v.mp4", 60, 10)
    frames, _ = load_video(path, fps=4.0, max_frames=10, min_pixels=64, max_pixels=1024, factor=8)
    assert len(frames) == 10


def test_one_frame_video_is_padded_to_a_temporal_patch(tmp_path):
    frames, metadata = load_video(write_mp4(tmp_path / "v.mp4", 1, 1), min_pixels=64, max_pixels=1024, factor=8)
    assert len(frames) == 2 and np.array_equal(frames[0], frames[1]) and metadata.frames_indices == [0, 0]


@pytest.mark.parametrize("kind", ["array", "pil", "float_tensor"])
def test_frames_in_memory(kind):
    import torch

    array = np.random.default_rng(0).integers(0, 255, (5, 40, 56, 3), dtype=np.uint8)
    video = {"array": array, "pil": [Image.fromarray(f) for f in array],
             "float_tensor": torch.from_numpy(array).float() / 255}[kind]
    frames, metadata = load_video(video, fps=2.0, min_pixels=64, max_pixels=40 * 56, factor=8)
    assert frames.shape == (6, 40, 56, 3)  # padded to whole temporal patches
    assert np.abs(frames[:5].astype(int) - array).max() <= 1
    assert metadata.timestamps[:5] == [0.0, 0.5, 1.0, 1.5, 2.0]


def write_audio_only(path):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return str(path)


def write_no_frames(path):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()  # header only, not a single frame
    return str(path)


def write_truncated(path):
    write_mp4(path, 40, 10)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return str(path)


BAD_VIDEOS = {
    "missing": (lambda tmp: str(tmp / "nope.mp4"), "video file not found"),
    "not_a_video": (lambda tmp: (tmp / "notes.mp4").write_text("hello") and str(tmp / "notes.mp4"), "cannot read"),
    "truncated": (lambda tmp: write_truncated(tmp / "cut.mp4"), "corrupt|truncated|cannot read|zero decodable"),
    "no_frames": (lambda tmp: write_no_frames(tmp / "empty.mp4"), "no video frames|zero decodable"),
    "audio_only": (lambda tmp: write_audio_only(tmp / "sound.m4a"), "no video stream \\(audio-only"),
}


@pytest.mark.parametrize("kind", sorted(BAD_VIDEOS))
def test_unreadable_videos_raise_a_clear_value_error(tmp_path, kind):
    make, message = BAD_VIDEOS[kind]
    with pytest.raises(ValueError, match=message):
        load_video(make(tmp_path))


def test_ten_minutes_of_720p_at_1_fps_loads_in_under_1_gib(tmp_path):
    import av

    path = tmp_path / "long.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=2, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        frame = np.zeros((720, 1280, 3), dtype=np.uint8)
        for index in range(1200):  # 600 s at 2 fps
            frame[..., 0] = index % 256
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    script = textwrap.dedent(
        f"""
        import resource
        from qtsplus_hf import load_video
        def rss_kib():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
        baseline = rss_kib()
        frames, metadata = load_video({str(path)!r}, fps=1.0, max_frames=768)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(len(frames), frames.shape[1], frames.shape[2], peak - baseline)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    count, height, width, growth_kib = map(int, result.stdout.split()[-4:])
    assert count == 600 and height % 28 == 0 and width % 28 == 0
    assert growth_kib < 1024 * 1024, f"peak RSS grew by {growth_kib / 1024:.0f} MiB"


def test_in_memory_frames_are_capped_and_resized_in_chunks():
    import torch

    array = np.random.default_rng(1).integers(0, 255, (40, 64, 64, 3), dtype=np.uint8)
    frames, metadata = load_video(array, max_frames=8, min_pixels=64, max_pixels=32 * 32, factor=8)
    assert frames.shape == (8, 32, 32, 3) and len(metadata.frames_indices) == 8
    chosen = array[np.linspace(0, 39, 8).round().astype(int)]
    whole = torch.nn.functional.interpolate(torch.from_numpy(chosen).permute(0, 3, 1, 2).float(), size=(32, 32),
                                            mode="bilinear", antialias=True)
    expected = whole.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    assert np.array_equal(frames, expected)
