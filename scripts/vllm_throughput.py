"""Throughput of a batch of video requests served by vLLM, with QTSplus against the same model without it.

    python scripts/vllm_throughput.py [--requests 8] [--frames 32] [--frame-size 112] [--json out.json]

What it measures: one random-weight Qwen2.5-VL-shaped QTSplus checkpoint (LM width 512, 8 heads of 64, 2 KV heads,
4 layers; vision depth 2, width 128; built into --workdir) served by vLLM through the `qtsplus_hf` plugin. N requests,
each a different random video (--frames frames of --frame-size pixels square: with patch 4 and merge 2, every 8x8
pixel block of every 2 frames is one LM token) and a different question, greedy, --max-tokens output tokens each
(`ignore_eos`), all submitted in one `llm.generate` call (continuous batching). The wall time of that call covers
the whole request path: video preprocessing, vision encoder, the selector (QTSplus variants), prefill and decoding.

Variants, each in its own fresh subprocess (no engine shares memory or caches with another):

- `stock`: `hf_overrides={"qtsplus_enabled": False}`, vLLM's own Qwen2.5-VL on the same weights;
- `qtsplus-1.0`: QTSplus keeping every video token (selector and re-encoding run, nothing is cut);
- `qtsplus-0.25`: keep ratio 0.25 (`video_pruning_rate=0.75`);
- `qtsplus-0.11`: keep ratio 0.11 (`video_pruning_rate=0.89`, the paper's largest cut).

Each variant runs a warm-up batch (--warmup-requests requests), then the timed batch --repeats times, each repeat
with fresh videos and questions; prefix caching and the multimodal processor cache are off, so no repeat reuses
anything. The report is the median. Output: a markdown table on stdout, and with --json the figures as JSON.
Besides wall time the table gives the engine process's CPU time over the batch (`time.process_time`; the engine
runs in-process, `VLLM_ENABLE_V1_MULTIPROCESSING=0`): on a shared machine it moves far less than wall time.

The figures are CPU figures (vLLM's CPU build, float32, eager) with random weights: they show how the cost of a
request scales with the video tokens that reach the LM, not what a GPU serving a real checkpoint would give.
"""

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time


LOG = logging.getLogger("vllm_throughput")
ARCHITECTURE = "QTSplusQwen2_5_VLForConditionalGeneration"
# name -> (QTSplus enabled, video_pruning_rate)
VARIANTS = {
    "stock": (False, None),
    "qtsplus-1.0": (True, None),
    "qtsplus-0.25": (True, 0.75),
    "qtsplus-0.11": (True, 0.89),
}
PATCH, MERGE, TEMPORAL = 4, 2, 2
FPS = 2.0


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(
        prog="vllm_throughput.py",
        description="vLLM throughput of a batch of video requests, QTSplus against stock Qwen2.5-VL (CPU, random "
                    "weights).")
    parser.add_argument("--requests", type=int, default=8, help="requests in the timed batch (default 8)")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (default 32)")
    parser.add_argument("--repeats", type=int, default=2, help="timed batches per variant; median (default 2)")
    parser.add_argument("--warmup-requests", type=int, default=1, help="requests of the warm-up batch (default 1)")
    parser.add_argument("--frames", type=int, default=32, help="frames per video, even (default 32)")
    parser.add_argument("--frame-size", type=int, default=112,
                        help="frame side in pixels, a multiple of 8 (default 112)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096,
                        help="vLLM's token budget per engine step (chunked prefill; default 4096, its CPU default)")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of the engines (default 1, the torch thread count vLLM's CPU build "
                             "serves with; more threads thrash on a shared machine)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)} (default all)")
    parser.add_argument("--workdir", default=None,
                        help="folder for the checkpoint (default: a temporary one, removed); a checkpoint this "
                             "script built there for the same frame size and seed is reused")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON to PATH")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, videos and questions (default 0)")
    parser.add_argument("--verbose", action="store_true", help="progress logging and vLLM's own INFO logs")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    for name in ("requests", "max_tokens", "repeats", "frames", "frame_size", "max_num_batched_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.warmup_requests < 0:
        parser.error("--warmup-requests must be at least 0")
    if args.frames % TEMPORAL:
        parser.error(f"--frames must be even (temporal patch {TEMPORAL}), got {args.frames}")
    if args.frame_size % (PATCH * MERGE):
        parser.error(f"--frame-size must be a multiple of {PATCH * MERGE}, got {args.frame_size}")
    variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown or not variants:
        parser.error(f"unknown --variants {','.join(unknown) or '(none)'}: choose from {','.join(VARIANTS)}")
    args.variants = variants
    if args.worker is not None and (args.worker not in VARIANTS or args.worker_out is None or args.workdir is None):
        parser.error("internal --worker needs a known variant, --worker-out and --workdir")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Sizes, checkpoint, requests
# ----------------------------------------------------------------------------------------------------------------------


def video_tokens(args) -> int:
    """LM tokens of one video before any selection."""
    side = args.frame_size // (PATCH * MERGE)
    return args.frames // TEMPORAL * side * side


def max_model_len(args) -> int:
    """Room for the full video, the chat text and the question, and the output; a multiple of 256."""
    need = video_tokens(args) + 128 + args.max_tokens
    return -(-need // 256) * 256


def build_checkpoint(path: str, args) -> None:
    """A random-weight QTSplus checkpoint bigger than tiny, servable by vLLM's CPU build, and its processor."""
    import torch

    from qtsplus_hf import QTSplusQwen2_5_VLForConditionalGeneration
    from qtsplus_hf.tiny import tiny_config_dict, tiny_processor, tiny_vllm_config

    base = tiny_config_dict()
    text_config = dict(
        base["text_config"], hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=max(8192, max_model_len(args)),
        # mrope_section sums to head_dim / 2 = 32
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
    )
    vision_config = dict(
        base["vision_config"], depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=512,
        # 32 pixels = 4x4 merged tokens per window, as Qwen2.5-VL's 112 pixels at patch 14
        window_size=32, fullatt_block_indexes=[1],
    )
    torch.manual_seed(args.seed)
    config = tiny_vllm_config(text_config=text_config, vision_config=vision_config)
    config.architectures = [ARCHITECTURE]
    model = QTSplusQwen2_5_VLForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    pixels = args.frame_size * args.frame_size
    tiny_processor(min_pixels=pixels, max_pixels=pixels, fps=FPS).save_pretrained(path)


def requests(args, processor, count: int, seed: int) -> list[dict]:
    """`count` vLLM prompts, each a different random video and a different question of CORPUS words."""
    import numpy as np

    from qtsplus_hf.tiny import CORPUS

    words = [word.strip("?.") for word in CORPUS.split()]
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(count):
        frames = rng.integers(0, 256, size=(args.frames, args.frame_size, args.frame_size, 3), dtype=np.uint8)
        metadata = {
            "total_num_frames": args.frames, "fps": FPS, "duration": args.frames / FPS,
            "frames_indices": list(range(args.frames)), "do_sample_frames": False, "video_backend": "numpy",
        }
        question = " ".join(rng.choice(words, size=int(rng.integers(6, 12)))).capitalize() + "?"
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append({"prompt": prompt, "multi_modal_data": {"video": (frames, metadata)}})
    return prompts


# ----------------------------------------------------------------------------------------------------------------------
# One variant (in its own process)
# ----------------------------------------------------------------------------------------------------------------------


def run_variant(args) -> dict:
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    import qtsplus_hf  # noqa: F401  (registers the processor class with the Auto classes)

    enabled, rate = VARIANTS[args.worker]
    path = os.path.join(args.workdir, "checkpoint")
    processor = AutoProcessor.from_pretrained(path)
    video_token_id = processor.tokenizer.convert_tokens_to_ids(processor.video_token)
    # K and V, float32, every layer, every sequence at the full length, with a margin
    kv_bytes = 2 * 4 * 2 * 64 * 4 * max_model_len(args) * args.requests
    started = time.perf_counter()
    llm = LLM(
        model=path, enforce_eager=True, dtype="float32", seed=args.seed,
        max_model_len=max_model_len(args), max_num_seqs=args.requests,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory_bytes=max(256 << 20, 2 * kv_bytes),
        limit_mm_per_prompt={"video": 1, "image": 0},
        video_pruning_rate=rate,
        hf_overrides=None if enabled else {"qtsplus_enabled": False},
        enable_prefix_caching=False, mm_processor_cache_gb=0,
    )
    startup_s = time.perf_counter() - started
    sampling = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)

    if args.warmup_requests:
        LOG.info("%s: warm-up with %d request(s)", args.worker, args.warmup_requests)
        llm.generate(requests(args, processor, args.warmup_requests, args.seed + 1000), sampling, use_tqdm=False)

    runs = []
    for repeat in range(args.repeats):
        batch = requests(args, processor, args.requests, args.seed + 1 + repeat)
        started, cpu_started = time.perf_counter(), time.process_time()
        outputs = llm.generate(batch, sampling, use_tqdm=False)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        prompt_ids = [output.prompt_token_ids for output in outputs]
        runs.append({
            "wall_s": wall,
            "cpu_s": cpu,
            "video_tokens_per_request": [sum(1 for t in ids if t == video_token_id) for ids in prompt_ids],
            "prompt_tokens": sum(len(ids) for ids in prompt_ids),
            "output_tokens": sum(len(output.outputs[0].token_ids) for output in outputs),
            "cached_tokens": sum(output.num_cached_tokens or 0 for output in outputs),
        })
        LOG.info("%s: repeat %d: %.2f s", args.worker, repeat + 1, wall)
    return {"variant": args.worker, "qtsplus_enabled": enabled, "video_pruning_rate": rate,
            "keep_ratio": 1.0 - (rate or 0.0), "startup_s": startup_s, "runs": runs}


# ----------------------------------------------------------------------------------------------------------------------
# The parent: checkpoint, one subprocess per variant, the report
# ----------------------------------------------------------------------------------------------------------------------


def spawn_variant(args, variant: str, workdir: str) -> dict:
    out = os.path.join(workdir, f"{variant}.json")
    command = [
        sys.executable, os.path.abspath(__file__), "--worker", variant, "--worker-out", out, "--workdir", workdir,
        "--requests", str(args.requests), "--max-tokens", str(args.max_tokens), "--repeats", str(args.repeats),
        "--warmup-requests", str(args.warmup_requests), "--frames", str(args.frames),
        "--frame-size", str(args.frame_size), "--seed", str(args.seed),
        "--max-num-batched-tokens", str(args.max_num_batched_tokens),
    ] + (["--verbose"] if args.verbose else [])
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env["OMP_NUM_THREADS"] = str(args.threads)
    if not args.verbose:
        env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    started = time.perf_counter()
    process = subprocess.run(command, env=env)
    if process.returncode != 0 or not os.path.exists(out):
        return {"variant": variant, "error": f"worker exited with status {process.returncode}"}
    with open(out) as handle:
        result = json.load(handle)
    result["process_s"] = time.perf_counter() - started
    return result


def summarise(result: dict) -> dict:
    runs = result["runs"]
    wall = statistics.median(run["wall_s"] for run in runs)
    last = runs[-1]
    requests_per_batch = len(last["video_tokens_per_request"])
    output_tokens = statistics.median(run["output_tokens"] for run in runs)
    return dict(
        wall_s=wall,
        cpu_s=statistics.median(run["cpu_s"] for run in runs),
        video_tokens_per_request=statistics.median(t for run in runs for t in run["video_tokens_per_request"]),
        prompt_tokens=last["prompt_tokens"],
        requests_per_s=requests_per_batch / wall,
        output_tokens_per_s=output_tokens / wall,
        cached_tokens=sum(run["cached_tokens"] for run in runs),
    )


def table(results: list[dict]) -> str:
    stock = next((r["summary"] for r in results if r["variant"] == "stock" and "summary" in r), None)
    lines = [
        "| variant | keep ratio | video tokens / request | prompt tokens (batch) | wall s (median) | requests/s "
        "| output tokens/s | throughput vs stock | CPU s (median) | CPU time, stock / variant |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        if "summary" not in result:
            lines.append(f"| {result['variant']} | | | | failed: {result['error']} | | | | | |")
            continue
        s = result["summary"]
        ratio = f"{s['requests_per_s'] / stock['requests_per_s']:.2f}x" if stock else "n/a"
        cpu_ratio = f"{stock['cpu_s'] / s['cpu_s']:.2f}x" if stock else "n/a"
        keep = "(stock)" if not result["qtsplus_enabled"] else f"{result['keep_ratio']:.2f}"
        lines.append(
            f"| {result['variant']} | {keep} | {s['video_tokens_per_request']:.0f} | {s['prompt_tokens']} "
            f"| {s['wall_s']:.2f} | {s['requests_per_s']:.3f} | {s['output_tokens_per_s']:.1f} | {ratio} "
            f"| {s['cpu_s']:.2f} | {cpu_ratio} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    if args.worker is not None:
        result = run_variant(args)
        with open(args.worker_out, "w") as handle:
            json.dump(result, handle)
        return 0

    started = time.perf_counter()
    temporary = None
    workdir = args.workdir
    if workdir is None:
        temporary = tempfile.TemporaryDirectory(prefix="qtsplus-vllm-throughput-")
        workdir = temporary.name
    os.makedirs(workdir, exist_ok=True)
    try:
        checkpoint = os.path.join(workdir, "checkpoint")
        marker = os.path.join(checkpoint, "throughput_build.json")
        build = {"frame_size": args.frame_size, "seed": args.seed, "max_model_len": max_model_len(args)}
        built = None
        if os.path.exists(marker):
            with open(marker) as handle:
                built = json.load(handle)
        if built != build:
            LOG.info("building the checkpoint in %s", checkpoint)
            build_checkpoint(checkpoint, args)
            with open(marker, "w") as handle:
                json.dump(build, handle)
        results = []
        for variant in args.variants:
            LOG.info("variant %s", variant)
            result = spawn_variant(args, variant, workdir)
            if "runs" in result:
                result["summary"] = summarise(result)
            results.append(result)
    finally:
        if temporary is not None:
            temporary.cleanup()
    total_s = time.perf_counter() - started

    print(f"vLLM on CPU ({os.cpu_count()} cores, {args.threads} engine thread(s)), float32, random weights: "
          f"{args.requests} requests per batch, "
          f"each one video of {args.frames} frames at {args.frame_size}x{args.frame_size} "
          f"({video_tokens(args)} video tokens before selection), {args.max_tokens} output tokens (greedy, "
          f"ignore_eos); median of {args.repeats} timed batch(es) after a warm-up of {args.warmup_requests}.\n")
    print(table(results))
    print(f"\nTotal script time {total_s:.0f} s.")
    if args.json:
        report = {"args": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
                  "cpu_count": os.cpu_count(), "video_tokens_before_selection": video_tokens(args),
                  "max_model_len": max_model_len(args), "total_s": total_s, "results": results}
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0 if all("summary" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
