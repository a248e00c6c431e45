"""`python -m qtsplus_hf.video_benchmark`: the README's video-loading figures ("Video loading: what comes from
transformers and what is ours"): `qtsplus_hf.load_video` against `transformers.video_utils.load_video` on one
long H.264 file, seconds and peak RSS growth of each.

Without `--video` it first writes the test file: `--seconds` (600) of `--width` x `--height` (1280 x 720) H.264
(libx264, preset ultrafast, yuv420p) at `--native-fps` (2) frames per second, a moving colour gradient with a
square that crosses the frame (cheap to encode; the decoders still decode every frame). Both loaders then sample
`--fps` (1) frames per second, 600 frames for 10 minutes. Each load runs in a fresh process forked from a
forkserver that has imported numpy, PyAV, torch and transformers but run nothing; the figure is the kernel's peak
RSS (VmHWM after resetting it through /proc/self/clear_refs) minus the RSS before the load, as `qtsplus bench` does
on CPU, and the wall time of the call. The loaders alternate (ours, transformers', ours, ...) and medians of
`--repeats` are printed; the machine's load average is printed with them.
"""

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np


LOADERS = ("qtsplus", "transformers")


def write_test_video(path: str, seconds: int = 600, width: int = 1280, height: int = 720, native_fps: int = 2) -> str:
    """A `seconds`-long H.264 mp4 of a moving gradient and a square; deterministic, written frame by frame."""
    import av

    columns = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    rows = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=native_fps, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(seconds * native_fps):
            frame = np.empty((height, width, 3), dtype=np.uint8)
            frame[..., 0] = (columns + 3 * index) % 256
            frame[..., 1] = (rows + 5 * index) % 256
            frame[..., 2] = (index * 7) % 256
            left, top = (index * 16) % (width - 96), (index * 9) % (height - 96)
            frame[top : top + 96, left : left + 96] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def _load(loader: str, path: str, fps: float) -> dict:
    """Runs in a fresh process: one load, its seconds and peak RSS growth, and what it returned."""
    from .benchmark import _proc_status_kib, _reset_peak_rss

    if loader == "qtsplus":
        from .video_qtsplus import load_video

        call = lambda: load_video(path, fps=fps)  # noqa: E731
    else:
        from transformers.video_utils import load_video

        call = lambda: load_video(path, fps=fps, backend="pyav")  # noqa: E731
    baseline = _reset_peak_rss()
    start = time.perf_counter()
    frames, metadata = call()
    seconds = time.perf_counter() - start
    peak = _proc_status_kib("VmHWM") * 1024 - baseline
    return {"seconds": seconds, "peak_rss_delta_bytes": peak, "frames_shape": list(np.asarray(frames).shape),
            "frames_bytes": int(np.asarray(frames).nbytes), "total_num_frames": int(metadata.total_num_frames)}


def measure(path: str, fps: float = 1.0, repeats: int = 3) -> dict:
    """Medians of `repeats` alternating loads by each loader, one fresh process per load."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["numpy", "av", "torch", "transformers", "transformers.video_utils",
                                    "qtsplus_hf.video_qtsplus", "qtsplus_hf.benchmark"])
    from qtsplus_hf import video_benchmark  # by its module name, also when this file runs as __main__

    samples = {loader: [] for loader in LOADERS}
    with ProcessPoolExecutor(max_workers=1, mp_context=context, max_tasks_per_child=1) as pool:
        for _ in range(repeats):
            for loader in LOADERS:
                samples[loader].append(pool.submit(video_benchmark._load, loader, path, fps).result())
    rows = []
    for loader in LOADERS:
        runs = samples[loader]
        rows.append({
            "loader": loader, "seconds": statistics.median(run["seconds"] for run in runs),
            "peak_rss_delta_bytes": statistics.median(run["peak_rss_delta_bytes"] for run in runs),
            "frames_shape": runs[-1]["frames_shape"], "frames_bytes": runs[-1]["frames_bytes"],
            "total_num_frames": runs[-1]["total_num_frames"],
            "samples": {"seconds": [run["seconds"] for run in runs],
                        "peak_rss_delta_bytes": [run["peak_rss_delta_bytes"] for run in runs]},
        })
    return {"video": path, "video_bytes": os.path.getsize(path), "fps": fps, "repeats": repeats, "rows": rows}


def describe(row: dict) -> str:
    return (f"{row['loader']:>12}: {row['seconds']:.2f} s, "
            f"peak RSS growth {row['peak_rss_delta_bytes'] / 2**20:.0f} MiB, "
            f"frames {'x'.join(map(str, row['frames_shape']))} ({row['frames_bytes'] / 2**20:.0f} MiB) "
            f"of {row['total_num_frames']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="qtsplus_hf.load_video against transformers' load_video.")
    parser.add_argument("--video", default=None, help="an existing file (default: write the test file)")
    parser.add_argument("--keep-video", default=None, help="write the test file here and keep it")
    parser.add_argument("--seconds", type=int, default=600)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--native-fps", type=int, default=2, help="frame rate of the test file")
    parser.add_argument("--fps", type=float, default=1.0, help="frames sampled per second by both loaders")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the report as JSON to this path")
    args = parser.parse_args(argv)
    if args.video and not os.path.isfile(args.video):
        print(f"error: --video: file not found: {args.video}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="qtsplus-video-bench-") as scratch:
        path = args.video
        settings = {"fps": args.fps, "repeats": args.repeats}
        if path is None:
            path = args.keep_video or os.path.join(scratch, "test.mp4")
            start = time.perf_counter()
            write_test_video(path, args.seconds, args.width, args.height, args.native_fps)
            settings.update(seconds=args.seconds, width=args.width, height=args.height, native_fps=args.native_fps,
                            encode_seconds=round(time.perf_counter() - start, 1))
        load_before = os.getloadavg()
        report = measure(path, args.fps, args.repeats)
        report.update(settings=settings, load_average_before=load_before, load_average_after=os.getloadavg(),
                      cpu_count=os.cpu_count())
    for row in report["rows"]:
        print(describe(row))
    print(f"load average (1, 5, 15 min) before {load_before}, after {report['load_average_after']}, "
          f"{os.cpu_count()} CPUs")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
