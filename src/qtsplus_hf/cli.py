"""The `qtsplus` command line."""

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence

from . import BACKBONES, __version__
from .configuration_qtsplus import RECIPES


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) with exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def explore_ratio(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def keep_ratio(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars on stderr (as HF_HUB_DISABLE_PROGRESS_BARS=1 does)")


def run_demo(args: argparse.Namespace) -> None:
    """The bundled default model answers one held-out synthetic video per task (see `qtsplus_hf.demo`)."""
    from .demo import run_demo as demo

    demo(output_dir=args.output_dir, seed=args.seed, keep_ratio=args.keep_ratio)


def write_json_atomically(path: str, payload: dict) -> None:
    """Write JSON beside `path`, then rename: the file appears complete or not at all (with the umask's mode)."""
    directory = os.path.dirname(os.path.abspath(path))
    handle = tempfile.NamedTemporaryFile("w", dir=directory, suffix=".json", delete=False)
    try:
        with handle:
            json.dump(payload, handle, indent=2)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(handle.name, 0o666 & ~umask)  # NamedTemporaryFile creates it private (0600)
        os.replace(handle.name, path)
    except BaseException:
        if os.path.exists(handle.name):
            os.remove(handle.name)
        raise


def run_answer(args: argparse.Namespace) -> None:
    """Answer a question about a video file, report what QTSplus kept and where the time went."""
    from .default_model import default_model_path

    if not args.question.strip():
        raise ValueError("the question is empty")
    for flag, path in (("--viz", args.viz), ("--json", args.json)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"{flag}: the folder of {path} does not exist")
    if not os.path.isfile(args.video):
        raise ValueError(f"video file not found: {args.video}")
    model_path = args.model or default_model_path()
    if not os.path.isdir(model_path):
        raise ValueError(f"model folder not found: {model_path}")

    from transformers import AutoModel, AutoProcessor

    from .answering import answer_video, format_seconds, save_answer_picture

    model = AutoModel.from_pretrained(model_path, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
    answered = answer_video(model, processor, args.video, args.question, args.keep_ratio, args.fps, args.max_frames,
                            args.max_new_tokens)
    result = answered.result
    print(f"answer: {answered.answer}")
    print(f"vision tokens kept: {result['kept_tokens']} of {result['total_tokens']} (rho = {result['rho']:.3f})")
    print("time: " + format_seconds(result["seconds"]))
    if args.viz and answered.selection is None:
        print("selection picture: not drawn, QTSplus is disabled in this model (qtsplus_enabled=false)")
    elif args.viz:
        title = f"{args.question}  ->  {answered.answer}   (kept {result['kept_tokens']}/{result['total_tokens']})"
        save_answer_picture(args.viz, processor, answered, title)
        print(f"selection picture: {args.viz}")
    if args.json:
        write_json_atomically(args.json, result)


def run_train(args: argparse.Namespace) -> None:
    """Fine-tune with the Trainer (selector, lora or full) and write a checkpoint or a LoRA adapter."""
    from .training import options_from_namespace, train

    result = train(options_from_namespace(args))
    final = [entry for entry in result.log_history if "train_loss" in entry]
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    print(f"trained on {result.train_rows} rows ({result.skipped_rows} skipped), mode {args.mode}")
    if losses:
        print(f"loss: first logged {losses[0]:.4f}, last logged {losses[-1]:.4f}")
    if final:
        print(f"steps: {final[-1]['step']}, mean training loss {final[-1]['train_loss']:.4f}")
    print(f"written: {result.output}")


def run_eval(args: argparse.Namespace) -> None:
    """Accuracy (overall, per question type), mean kept ratio and latency of a checkpoint on video QA rows."""
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise ValueError(f"--json: the folder of {args.json} does not exist")
    if (args.data is None) == (args.synthetic is None):
        raise ValueError("give exactly one of --data and --synthetic")
    from .data import load_video_qa
    from .default_model import default_model_path
    from .evaluation import evaluate_video_qa
    from .training import load_model_and_processor

    import torch

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise ValueError(f"--device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available")
    model, processor = load_model_and_processor(args.model or default_model_path())
    model.to(device)
    if args.synthetic is not None:
        from .default_model import HELD_OUT_SEED_START
        from .default_model.train import held_out_rows

        start = HELD_OUT_SEED_START if args.synthetic_seed_start is None else args.synthetic_seed_start
        rows, skipped = held_out_rows(args.synthetic, start=start), 0
    else:
        data = load_video_qa(args.data, args.video_root)
        rows, skipped = (data.rows[: args.limit] if args.limit else data.rows), len(data.skipped)
    result = evaluate_video_qa(model, processor, rows, args.keep_ratio, args.fps, args.max_frames)
    result.metrics["skipped"] = skipped
    print(result.table())
    if args.json:
        write_json_atomically(args.json, {"metrics": result.metrics, "predictions": result.predictions})


def add_train_parser(commands) -> None:
    train = commands.add_parser("train", help="fine-tune on video QA data with the Trainer (selector, lora, full)")
    train.add_argument("--model", required=True, help="QTSplus (or stock Qwen2.5-VL) checkpoint folder")
    train.add_argument("--data", required=True, help="JSON / JSONL / CSV file or saved datasets folder")
    train.add_argument("--output", required=True, help="new folder for the checkpoint or LoRA adapter")
    train.add_argument("--mode", choices=("selector", "lora", "full"), default="lora")
    train.add_argument("--video-root", default=None, help="folder that relative video paths start from")
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    train.add_argument("--learning-rate", type=float, default=1e-4)
    train.add_argument("--batch-size", type=positive_int, default=1, help="per device")
    train.add_argument("--gradient-accumulation-steps", type=positive_int, default=1)
    train.add_argument("--warmup-steps", type=float, default=0.0, help="steps, or a share of them if below 1")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--lora-r", type=positive_int, default=16)
    train.add_argument("--lora-alpha", type=positive_int, default=32)
    train.add_argument("--lora-dropout", type=float, default=0.05)
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--bf16", action="store_true", help="bf16 mixed precision (where the device supports it)")
    train.add_argument("--fps", type=float, default=None, help="frames sampled per second (default: processor's)")
    train.add_argument("--max-frames", type=positive_int, default=None)
    train.add_argument("--keep-ratio", type=keep_ratio, default=None,
                       help="train at a fixed keep ratio (default: the predicted budget)")
    train.add_argument("--logging-steps", type=positive_int, default=10)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--merge", action="store_true", help="lora: also write the merged full checkpoint")
    train.add_argument("--grounding-weight", type=non_negative_float, default=None,
                       help="weight of the grounding loss on rows with evidence_seconds / evidence_boxes")
    train.add_argument("--distill-weight", type=non_negative_float, default=None,
                       help="weight of distilling the LM's attention over every video token into the scores")
    train.add_argument("--explore-ratio", type=explore_ratio, default=None,
                       help="share of each video's dropped tokens kept at random in training, in [0, 1)")
    train.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                       help="released: the released QTSplus-3B settings (tau 0.5, lambdas 0.1 / 0.17 / 0.05, n_max "
                            "512; converting a stock model: 2 re-encode layers and the released initialisation)")
    add_progress_flag(train)
    train.set_defaults(handler=run_train)


def add_eval_parser(commands) -> None:
    evaluation = commands.add_parser("eval", help="multiple-choice accuracy, kept ratio and latency on QA data")
    evaluation.add_argument("--model", default=None,
                            help="QTSplus (or stock Qwen2.5-VL) checkpoint folder (default: the bundled model)")
    evaluation.add_argument("--data", default=None, help="JSON / JSONL / CSV file or saved datasets folder")
    evaluation.add_argument("--synthetic", type=positive_int, default=None,
                            help="instead of --data: N synthetic videos generated in memory (held-out seeds)")
    evaluation.add_argument("--synthetic-seed-start", type=non_negative_int, default=None,
                            help="first seed of --synthetic (default: the held-out range the default model never saw)")
    evaluation.add_argument("--video-root", default=None, help="folder that relative video paths start from")
    evaluation.add_argument("--keep-ratio", type=keep_ratio, default=None, help="fixed keep ratio (default: predicted)")
    evaluation.add_argument("--fps", type=float, default=None)
    evaluation.add_argument("--max-frames", type=positive_int, default=None)
    evaluation.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N usable rows")
    evaluation.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    evaluation.add_argument("--json", default=None, help="write metrics and per-question predictions here")
    add_progress_flag(evaluation)
    evaluation.set_defaults(handler=run_eval)
def positive_integers(text: str, what: str) -> list[int]:
    """Comma-separated positive integers, in the order given; `what` names them in the error."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"must be positive {what}, got {text!r}")
    return counts


def frame_counts(text: str) -> list[int]:
    return sorted(set(positive_integers(text, "frame counts")))


def token_counts(text: str) -> list[int]:
    return positive_integers(text, "token counts")


def run_bench(args: argparse.Namespace) -> None:
    """Stock Qwen2.5-VL (or Qwen3-VL, `--backbone qwen3_vl`) vs QTSplus on the same weights: tokens, stage times,
    first-token latency, peak memory."""
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"{flag}: the folder of {path} does not exist")
    if args.model and not os.path.isdir(args.model):
        raise ValueError(f"--model: folder not found: {args.model}")
    if args.backbone != "qwen2_5_vl" and (args.pipeline_batch_sizes or args.selector_profile):
        raise ValueError("--backbone applies to the stock-vs-QTSplus bench, not to --pipeline-batch-sizes or "
                         "--selector-profile")
    if args.pipeline_batch_sizes:
        run_pipeline_bench(args)
        return
    if args.selector_profile:
        run_selector_profile(args)
        return
    from .benchmark import BenchSettings, run_bench as bench, save_plot

    settings = BenchSettings(
        frames=args.frames, resolution=args.resolution, repeats=args.repeats, device=args.device, dtype=args.dtype,
        new_tokens=args.new_tokens, vision_chunk_frames=args.vision_chunk_frames, seed=args.seed,
        backbone=args.backbone,
    )
    report = bench(settings, model_dir=args.model, config_name=args.config, log=print)
    if args.json:
        write_json_atomically(args.json, report)
    if args.plot:
        save_plot(report, args.plot)


def run_pipeline_bench(args: argparse.Namespace) -> None:
    """`qtsplus bench --pipeline-batch-sizes 1,4,8`: videos per second of the pipeline at each batch size."""
    if args.plot:
        raise ValueError("--plot applies to the stock-vs-QTSplus bench, not to --pipeline-batch-sizes")
    from .benchmark import pipeline_throughput

    report = pipeline_throughput(args.pipeline_batch_sizes, videos=args.pipeline_videos, repeats=args.repeats,
                                 model_dir=args.model, seed=args.seed)
    for row in report["rows"]:
        print(f"batch {row['batch_size']:>3}: {row['videos_per_second']:.2f} videos/s "
              f"({row['seconds']:.2f} s for {report['videos']} videos, {row['speedup']:.2f}x batch 1)")
    if args.json:
        write_json_atomically(args.json, report)


def run_selector_profile(args: argparse.Namespace) -> None:
    """`qtsplus bench --selector-profile 4096,16384`: the selector alone on one video of each size (random weights),
    optionally side by side with the released selector (`--released-selector`)."""
    if args.plot:
        raise ValueError("--plot applies to the stock-vs-QTSplus bench, not to --selector-profile")
    kept = args.selector_kept
    if kept is not None and len(kept) != len(args.selector_profile):
        raise ValueError(f"--selector-kept needs one count per --selector-profile size ({len(args.selector_profile)})")
    if args.selector_width % args.selector_heads or args.selector_heads % args.selector_kv_heads:
        raise ValueError("--selector-width must be a multiple of --selector-heads, and that of --selector-kv-heads")
    import torch

    from .benchmark import profile_selector

    threads = torch.get_num_threads()
    rows = []
    for index, tokens in enumerate(args.selector_profile):
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        try:
            row = profile_selector(
                tokens, args.selector_width, args.selector_question_tokens, keep_ratio=args.selector_keep_ratio,
                repeats=args.repeats, seed=args.seed, heads=args.selector_heads, kv_heads=args.selector_kv_heads,
                kept_tokens=None if kept is None else kept[index], released=args.released_selector,
            )
        finally:  # main() may run inside a longer process (tests): leave torch's threads as they were
            torch.set_num_threads(threads)
        line = (f"M={row['num_tokens']} n={row['kept_tokens']} width {row['hidden_size']} heads "
                f"{row['heads']}/{row['kv_heads']} L={row['question_tokens']} ({row['threads']} threads): "
                f"scoring {row['scoring_seconds']:.3f} s, top-n {row['top_n_seconds']:.4f} s, "
                f"selector {row['selector_seconds']:.3f} s, "
                f"peak RSS delta {row['peak_rss_delta_bytes'] / 2**20:.0f} MiB")
        if "ratio_to_released" in row:
            line += (f"; released selector {row['released_selector_seconds']:.3f} s, "
                     f"ratio {row['ratio_to_released']:.2f}")
        print(line, flush=True)
        rows.append(row)
    if args.json:
        write_json_atomically(args.json, {"torch": torch.__version__, "repeats": args.repeats, "rows": rows})


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="qtsplus", description="QTSplus query-aware video token selection.")
    parser.add_argument("--version", action="version", version=f"qtsplus-hf {__version__}")
    commands = parser.add_subparsers(dest="command")
    demo = commands.add_parser(
        "demo", help="the bundled model answers one synthetic video per question type, with selection pictures")
    demo.add_argument("--output-dir", default=None, help="folder for the videos and pictures (default: a new temp one)")
    demo.add_argument("--seed", type=non_negative_int, default=None,
                      help="seed of the first video (default: the held-out range the default model never saw)")
    demo.add_argument("--keep-ratio", type=keep_ratio, default=None, help="fixed keep ratio (default: predicted)")
    demo.set_defaults(handler=run_demo)

    answer = commands.add_parser("answer", help="answer a question about a video file")
    answer.add_argument("--model", default=None, help="QTSplus checkpoint folder (default: the bundled model)")
    answer.add_argument("--video", required=True, help="video file")
    answer.add_argument("--question", required=True)
    answer.add_argument("--keep-ratio", type=keep_ratio, default=None, help="fixed keep ratio (default: predicted)")
    answer.add_argument("--fps", type=float, default=None, help="frames sampled per second (default: processor's)")
    answer.add_argument("--max-frames", type=positive_int, default=None)
    answer.add_argument("--max-new-tokens", type=positive_int, default=32)
    answer.add_argument("--viz", default=None, help="write a PNG of the kept patches and relevance over time")
    answer.add_argument("--json", default=None, help="write the result as JSON to this path")
    answer.set_defaults(handler=run_answer)
    add_train_parser(commands)
    add_eval_parser(commands)

    from .hub_commands import add_hub_commands  # export, push, convert

    add_hub_commands(commands)

    bench = commands.add_parser("bench", help="stock Qwen2.5-VL (or Qwen3-VL) vs QTSplus on the same weights: tokens, "
                                              "time, memory")
    bench.add_argument("--backbone", choices=tuple(BACKBONES), default="qwen2_5_vl",
                       help="the stock model: qwen2_5_vl (default) or qwen3_vl (its prompt layout, with timestamps)")
    source = bench.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="a stock checkpoint folder of the --backbone")
    source.add_argument("--config", choices=("small", "medium"), default="small",
                        help="random model shaped like Qwen2.5-VL-3B (or, --backbone qwen3_vl, Qwen3-VL-4B) "
                             "(default: small)")
    bench.add_argument("--frames", type=frame_counts, default=[16, 32, 64, 128, 256], help="e.g. 16,32,64,128,256")
    bench.add_argument("--resolution", type=positive_int, default=224, help="frame side in pixels")
    bench.add_argument("--repeats", type=positive_int, default=3, help="timed runs per variant (after a warm-up)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    bench.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    bench.add_argument("--new-tokens", type=positive_int, default=8, help="tokens generated per run")
    bench.add_argument("--vision-chunk-frames", type=int, default=None,
                       help="QTSplus encodes videos this many frames at a time (default: the model config's)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--pipeline-batch-sizes", type=frame_counts, default=None,
                       help="instead: pipeline('video-text-to-text') throughput at these batch sizes, e.g. 1,4,8 "
                            "(the bundled default model on synthetic videos, or the QTSplus folder --model)")
    bench.add_argument("--pipeline-videos", type=positive_int, default=16, help="videos per --pipeline-batch-sizes pass")
    bench.add_argument("--selector-profile", type=token_counts, default=None, metavar="M[,M...]",
                       help="instead: the selector alone (random weights, one video of M tokens each, float32), "
                            "seconds of scoring, top-n and the whole selector, e.g. 4096,16384")
    bench.add_argument("--selector-width", type=positive_int, default=2048, help="--selector-profile: model width")
    bench.add_argument("--selector-heads", type=positive_int, default=16, help="--selector-profile: attention heads")
    bench.add_argument("--selector-kv-heads", type=positive_int, default=2, help="--selector-profile: key/value heads")
    bench.add_argument("--selector-question-tokens", type=positive_int, default=32,
                       help="--selector-profile: question tokens")
    bench.add_argument("--selector-keep-ratio", type=keep_ratio, default=0.11,
                       help="--selector-profile: fixed keep ratio (default 0.11)")
    bench.add_argument("--selector-kept", type=token_counts, default=None, metavar="N[,N...]",
                       help="--selector-profile: kept tokens, one per size (instead of --selector-keep-ratio)")
    bench.add_argument("--released-selector", default=None, metavar="CHECKOUT",
                       help="--selector-profile: also time the released selector from this checkout of "
                            "github.com/Siyou-Li/QTSplus (imported at run time), alternating with ours")
    bench.add_argument("--threads", type=positive_int, default=None,
                       help="--selector-profile: torch threads (default: torch's)")
    bench.add_argument("--json", default=None, help="write the report as JSON to this path")
    bench.add_argument("--plot", default=None, help="write a PNG of tokens and latency against frames")
    add_progress_flag(bench)
    bench.set_defaults(handler=run_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    # The library reports through `logging` (e.g. skipped data rows): show its warnings on stderr, one line each.
    library_logger = logging.getLogger("qtsplus_hf")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"qtsplus {args.command}: %(message)s"))
    handler.setLevel(logging.WARNING)
    library_logger.addHandler(handler)
    bars_were_on = dataset_bars_were_on = False
    if getattr(args, "no_progress", False):
        import datasets.utils
        from transformers.utils import logging as transformers_logging

        # transformers' switch covers our bars, the Trainer's and the Hub's; datasets (reading --data) has its own.
        bars_were_on = transformers_logging.is_progress_bar_enabled()
        dataset_bars_were_on = not datasets.utils.are_progress_bars_disabled()
        transformers_logging.disable_progress_bar()
        datasets.utils.disable_progress_bars()
    try:
        args.handler(args)
    except (ValueError, OSError) as error:
        print(f"qtsplus {args.command}: error: {error}", file=sys.stderr)
        return 2
    finally:
        library_logger.removeHandler(handler)
        if bars_were_on:  # main() may run inside a longer Python process (tests): leave the switches as they were
            transformers_logging.enable_progress_bar()
        if dataset_bars_were_on:
            datasets.utils.enable_progress_bars()
    return 0


if __name__ == "__main__":
    sys.exit(main())
