# Copyright 2026 The qtsplus-hf authors. Licensed under the Apache License, Version 2.0.
"""Video loading for QTSplus: Qwen-style frame sampling, streamed PyAV decoding, per-frame pixel budget.

What transformers already provides is used as is: `VideoMetadata` (timestamps, sampled fps, which the Qwen2.5-VL
processor turns into `second_per_grid_ts`) and Qwen2-VL's `smart_resize`. Written here, because
`transformers.video_utils.read_video_pyav` lacks it: decoding that keeps only the sampled frames *and* scales each
one to its pixel budget as it is decoded (transformers keeps the sampled frames at full resolution until the end,
~1.7 GB for ten minutes of 720p at 1 fps), a frame count for containers that do not store one, a total pixel budget
across frames (the reference qwen-vl-utils rule), and clear errors for unreadable files.

Remote-code file: `av` is imported only when a file is decoded.
"""

import math
import os

import numpy as np
import torch
from transformers import Qwen3VLVideoProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
from transformers.video_utils import VideoMetadata


def sample_frame_indices(
    total_frames: int, native_fps: float, fps: float, min_frames: int, max_frames: int, temporal_patch_size: int
) -> np.ndarray:
    """Qwen's rule: duration·fps frames, clamped to [min_frames, max_frames] and to the video, a multiple of the
    temporal patch size, spread uniformly. A video shorter than one temporal patch yields all its frames (the caller
    pads by repeating the last one)."""
    wanted = total_frames / native_fps * fps
    wanted = min(max(wanted, min_frames), max_frames, total_frames)
    count = math.floor(wanted / temporal_patch_size) * temporal_patch_size
    if count == 0:
        return np.arange(total_frames)
    return np.linspace(0, total_frames - 1, count).round().astype(int)


def frame_size(
    height: int, width: int, num_frames: int, factor: int, min_pixels: int, max_pixels: int,
    total_pixels: int, temporal_patch_size: int,
) -> tuple[int, int]:
    """Per-frame (height, width): multiples of `factor`, within `max_pixels` and an even share of `total_pixels`."""
    share = total_pixels / max(num_frames, 1) * temporal_patch_size
    budget = max(min(max_pixels, share), int(min_pixels * 1.05))
    return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=budget)


def _open_video_file(path: str):
    """Open a container, returning it and its first video stream; ValueError for anything that is not a video."""
    import av  # noqa: PLC0415 - only needed to decode files, keeps the remote code importable without it

    if not os.path.isfile(path):
        raise ValueError(f"video file not found: {path}")
    try:
        container = av.open(path)
    except av.error.FFmpegError as error:
        raise ValueError(f"cannot read {path} as a video ({error.strerror or type(error).__name__})") from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path} has no video frames: no video stream (audio-only, empty or not a video)")
    return container, container.streams.video[0]


def _count_frames(container, stream) -> int:
    """The stream's frame count, counted from packets (no decoding) when the container does not store it."""
    if stream.frames:
        return int(stream.frames)
    count = sum(1 for packet in container.demux(stream) if packet.size > 0)
    container.seek(0)
    return count


def decode_video_file(
    path: str, fps: float, min_frames: int, max_frames: int, factor: int, min_pixels: int, max_pixels: int,
    total_pixels: int, temporal_patch_size: int,
) -> tuple[np.ndarray, VideoMetadata]:
    """Stream-decode the sampled frames of a file, each scaled to its budget as soon as it is decoded."""
    import av  # noqa: PLC0415

    container, stream = _open_video_file(path)
    try:
        native_fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        total = _count_frames(container, stream)
        if total == 0:
            raise ValueError(f"{path} has zero decodable video frames")
        indices = sample_frame_indices(total, native_fps, fps, min_frames, max_frames, temporal_patch_size)
        height, width = frame_size(
            stream.codec_context.height, stream.codec_context.width, len(indices), factor, min_pixels, max_pixels,
            total_pixels, temporal_patch_size,
        )
        frames = np.empty((len(indices), height, width, 3), dtype=np.uint8)
        wanted, filled = iter(indices.tolist()), 0
        target = next(wanted)
        for position, frame in enumerate(container.decode(stream)):
            while position == target:  # one decoded frame can fill several slots of a short video
                frames[filled] = frame.to_ndarray(format="rgb24", width=width, height=height)
                filled += 1
                target = next(wanted, None)
            if target is None:
                break
    except av.error.FFmpegError as error:
        raise ValueError(f"{path} is corrupt or truncated ({error.strerror or type(error).__name__})") from None
    finally:
        container.close()
    if filled == 0:
        raise ValueError(f"{path} has zero decodable video frames")
    if filled < len(indices):
        raise ValueError(f"{path} is truncated: decoded {position + 1} frames of the {total} its header announces")
    metadata = VideoMetadata(
        total_num_frames=total, fps=native_fps, width=width, height=height, duration=total / native_fps,
        video_backend="pyav", frames_indices=indices.tolist(),
    )
    return frames, metadata


def frames_to_array(video) -> np.ndarray:
    """A list of PIL images / arrays, or an array / tensor `[T, H, W, C]`, as uint8 `[T, H, W, 3]`."""
    if isinstance(video, torch.Tensor):
        video = video.cpu().numpy()
    if isinstance(video, (list, tuple)):
        if not video:
            raise ValueError("the video has no frames")
        video = np.stack([np.asarray(frame.convert("RGB") if hasattr(frame, "convert") else frame) for frame in video])
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] == 0:
        raise ValueError(f"video frames must have shape [T, H, W, 3] with T >= 1, got {list(video.shape)}")
    if video.dtype != np.uint8:
        scale = 255.0 if video.max() <= 1.0 else 1.0
        video = np.clip(video * scale, 0, 255).round().astype(np.uint8)
    return video


def resize_frames(frames: np.ndarray, height: int, width: int, chunk: int = 16) -> np.ndarray:
    """Antialiased bilinear resize of uint8 `[T, H, W, 3]`, a few frames at a time so float copies stay small."""
    out = np.empty((len(frames), height, width, 3), dtype=np.uint8)
    for start in range(0, len(frames), chunk):
        block = torch.from_numpy(frames[start : start + chunk]).permute(0, 3, 1, 2).float()
        block = torch.nn.functional.interpolate(block, size=(height, width), mode="bilinear", antialias=True)
        out[start : start + chunk] = block.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return out


def load_video(
    video,
    fps: float = 2.0,
    min_frames: int = 4,
    max_frames: int = 768,
    min_pixels: int = 128 * 28 * 28,
    max_pixels: int = 768 * 28 * 28,
    total_pixels: int = int(128000 * 28 * 28 * 0.9),
    factor: int = 28,
    temporal_patch_size: int = 2,
) -> tuple[np.ndarray, VideoMetadata]:
    """Load a video as sampled uint8 frames `[T, H, W, 3]` and their `VideoMetadata`.

    Args:
        video: a file path, a list of frames (PIL images or arrays), or an array / tensor `[T, H, W, C]`. Frames
            given in memory are taken as already sampled at `fps` frames per second.
        fps, min_frames, max_frames: sampling of files (Qwen convention: frames a multiple of the temporal patch).
        min_pixels, max_pixels, total_pixels, factor: the per-frame pixel budget (sides multiples of `factor`,
            the vision patch size × merge size) and the budget over all frames.
    Returns:
        frames with T a multiple of `temporal_patch_size` (a short video repeats its last frame) and their metadata;
        `metadata.timestamps` gives each frame's time in seconds.
    """
    for name, value in (("fps", fps), ("min_frames", min_frames), ("max_frames", max_frames)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if isinstance(video, (str, os.PathLike)):
        frames, metadata = decode_video_file(
            os.fspath(video), fps, min_frames, max_frames, factor, min_pixels, max_pixels, total_pixels,
            temporal_patch_size,
        )
    else:
        frames = frames_to_array(video)
        if len(frames) > max_frames:  # in-memory frames are already sampled; only the cap applies
            keep = np.linspace(0, len(frames) - 1, max(max_frames // temporal_patch_size, 1) * temporal_patch_size)
            frames = frames[keep.round().astype(int)]
        height, width = frame_size(
            frames.shape[1], frames.shape[2], len(frames), factor, min_pixels, max_pixels, total_pixels,
            temporal_patch_size,
        )
        if (height, width) != frames.shape[1:3]:
            frames = resize_frames(frames, height, width)
        metadata = VideoMetadata(
            total_num_frames=len(frames), fps=float(fps), width=width, height=height, duration=len(frames) / fps,
            video_backend="frames", frames_indices=list(range(len(frames))),
        )
    remainder = len(frames) % temporal_patch_size
    if remainder:  # pad to whole temporal patches by repeating the last frame, as the Qwen processors do
        repeats = temporal_patch_size - remainder
        frames = np.concatenate([frames, np.repeat(frames[-1:], repeats, axis=0)])
        metadata.frames_indices = list(metadata.frames_indices) + [metadata.frames_indices[-1]] * repeats
    return frames, metadata


def load_video_for_processor(
    processor, video, fps: float | None = None, min_frames: int | None = None, max_frames: int | None = None
) -> tuple[np.ndarray, VideoMetadata]:
    """`load_video` with a Qwen2.5-VL or Qwen3-VL processor's sampling and pixel settings (arguments given here
    override them), so frames are decoded at the size the processor will use and it need not resize them again.

    Qwen2.5-VL's `size` bounds each frame; Qwen3-VL's bounds the whole clip (frames x height x width), so there each
    frame gets an even share of `longest_edge` and the floor is one merged patch (the processor's own clip floor then
    applies as before).
    """
    video_processor = processor.video_processor
    factor = video_processor.patch_size * video_processor.merge_size
    temporal_patch_size = video_processor.temporal_patch_size
    pixels = dict(min_pixels=video_processor.size["shortest_edge"], max_pixels=video_processor.size["longest_edge"])
    if isinstance(video_processor, Qwen3VLVideoProcessor):
        # `frame_size` shares `total_pixels` per temporal patch: this makes each frame's share longest_edge / T.
        pixels = dict(min_pixels=factor * factor, max_pixels=video_processor.size["longest_edge"],
                      total_pixels=video_processor.size["longest_edge"] // temporal_patch_size)
    return load_video(
        video,
        fps=fps or getattr(video_processor, "fps", None) or 2.0,
        min_frames=min_frames or video_processor.min_frames,
        max_frames=max_frames or video_processor.max_frames,
        factor=factor,
        temporal_patch_size=temporal_patch_size,
        **pixels,
    )


__all__ = ["load_video", "load_video_for_processor", "sample_frame_indices"]

