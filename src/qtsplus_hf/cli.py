"""The `qtsplus` command line."""

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence

from . import __version__


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) with exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def keep_ratio(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def run_demo(args: argparse.Namespace) -> None:
    """Select from a random video on a tiny random model, and compare the LM prefill with the stock model's."""
    import torch

    from .modeling_qtsplus_qwen2_5_vl import QTSplusQwen2_5_VLForConditionalGeneration
    from .tiny import tiny_qtsplus_config, video_prompt_batch

    torch.manual_seed(args.seed)
    config = tiny_qtsplus_config(qtsplus_max_tokens=args.max_tokens)
    model = QTSplusQwen2_5_VLForConditionalGeneration(config).eval()
    grid = (args.temporal_patches, 8, 8)  # 16 LM tokens per temporal patch (2 frames)
    batch = video_prompt_batch([[grid]], [6], config, seed=args.seed)
    start = time.perf_counter()
    with torch.no_grad():
        prefill = model.prepare_qtsplus_inputs(**batch, qtsplus_keep_ratio=args.keep_ratio)
    elapsed = time.perf_counter() - start
    selection = prefill.selection
    print(f"qtsplus-hf {__version__} demo: tiny random Qwen2.5-VL + QTSplus, random video of {2 * grid[0]} frames")
    print(f"vision tokens kept: {selection.num_kept[0]} of {selection.num_tokens[0]} (rho = {float(selection.rho[0]):.3f})")
    print(f"LM prefill length: {prefill.inputs_embeds.shape[1]} (stock: {batch['input_ids'].shape[1]})")
    covered = len(set(selection.timestamps[0].tolist()))
    print(f"kept tokens come from {covered} of {grid[0]} temporal patches (one second each)")
    print(f"vision + selection time: {elapsed * 1000:.1f} ms")


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


class StageTimer:
    """Wall time spent inside given modules (forward hooks), e.g. the vision encoder and the selector."""

    def __init__(self, **modules) -> None:
        self.seconds = dict.fromkeys(modules, 0.0)
        self._started: dict[str, float] = {}
        self._hooks = []
        for name, module in modules.items():
            self._hooks.append(module.register_forward_pre_hook(lambda *_, n=name: self._start(n)))
            self._hooks.append(module.register_forward_hook(lambda *_, n=name: self._stop(n)))

    def _start(self, name: str) -> None:
        self._started[name] = time.perf_counter()

    def _stop(self, name: str) -> None:
        self.seconds[name] += time.perf_counter() - self._started.pop(name)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def run_answer(args: argparse.Namespace) -> None:
    """Answer a question about a video file, report what QTSplus kept and where the time went."""
    if not args.question.strip():
        raise ValueError("the question is empty")
    for flag, path in (("--viz", args.viz), ("--json", args.json)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"{flag}: the folder of {path} does not exist")
    if not os.path.isfile(args.video):
        raise ValueError(f"video file not found: {args.video}")
    if not os.path.isdir(args.model):
        raise ValueError(f"model folder not found: {args.model}")

    import torch
    from transformers import AutoModel, AutoProcessor

    from .pipeline_video_text_to_text import video_question_inputs

    model = AutoModel.from_pretrained(args.model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    start = time.perf_counter()
    inputs, frames, metadata = video_question_inputs(
        processor, args.video, args.question, fps=args.fps, max_frames=args.max_frames
    )
    decode_seconds = time.perf_counter() - start
    timer = StageTimer(vision=model.model.visual, selection=model.qtsplus)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            outputs = model.generate(
                **inputs, qtsplus_keep_ratio=args.keep_ratio, max_new_tokens=args.max_new_tokens, do_sample=False,
                return_dict_in_generate=True,
            )
    finally:
        timer.remove()
    generate_seconds = time.perf_counter() - start
    answer = processor.batch_decode(outputs.sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    selection = outputs.get("qtsplus")
    total = int((inputs["input_ids"] == model.config.video_token_id).sum())
    result = {
        "answer": answer,
        "kept_tokens": selection.num_kept[0] if selection else total,
        "total_tokens": total,
        "rho": float(selection.rho[0]) if selection else 1.0,
        "kept_seconds": selection.timestamps[0].unique().tolist() if selection else [],
        "seconds": {
            "decode": decode_seconds,
            "vision": timer.seconds["vision"],
            "selection": timer.seconds["selection"],
            "generation": generate_seconds - timer.seconds["vision"] - timer.seconds["selection"],
        },
    }
    print(f"answer: {answer}")
    print(f"vision tokens kept: {result['kept_tokens']} of {result['total_tokens']} (rho = {result['rho']:.3f})")
    print("time: " + ", ".join(f"{name} {value * 1000:.0f} ms" for name, value in result["seconds"].items()))
    if args.viz and selection is None:
        print("selection picture: not drawn, QTSplus is disabled in this model (qtsplus_enabled=false)")
    elif args.viz:
        from .visualize import save_selection_png, selection_figure_data

        video_processor = processor.video_processor
        data = selection_figure_data(
            frames, tuple(inputs["video_grid_thw"][0].tolist()), selection.kept_indices[0], selection.scores[0],
            video_processor.merge_size, video_processor.temporal_patch_size, float(inputs["second_per_grid_ts"][0]),
        )
        title = f"{args.question}  ->  {answer}   (kept {result['kept_tokens']}/{result['total_tokens']})"
        save_selection_png(args.viz, data, title)
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
    """Multiple-choice accuracy (overall, per question type), mean kept ratio and latency of a checkpoint."""
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise ValueError(f"--json: the folder of {args.json} does not exist")
    from .data import load_video_qa
    from .evaluation import evaluate_multiple_choice
    from .training import load_model_and_processor

    import torch

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise ValueError(f"--device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available")
    model, processor = load_model_and_processor(args.model)
    model.to(device)
    data = load_video_qa(args.data, args.video_root)
    rows = data.rows[: args.limit] if args.limit else data.rows
    result = evaluate_multiple_choice(model, processor, rows, args.keep_ratio, args.fps, args.max_frames)
    result.metrics["skipped"] += len(data.skipped)
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
    train.set_defaults(handler=run_train)


def add_eval_parser(commands) -> None:
    evaluation = commands.add_parser("eval", help="multiple-choice accuracy, kept ratio and latency on QA data")
    evaluation.add_argument("--model", required=True, help="QTSplus (or stock Qwen2.5-VL) checkpoint folder")
    evaluation.add_argument("--data", required=True, help="JSON / JSONL / CSV file or saved datasets folder")
    evaluation.add_argument("--video-root", default=None, help="folder that relative video paths start from")
    evaluation.add_argument("--keep-ratio", type=keep_ratio, default=None, help="fixed keep ratio (default: predicted)")
    evaluation.add_argument("--fps", type=float, default=None)
    evaluation.add_argument("--max-frames", type=positive_int, default=None)
    evaluation.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N usable rows")
    evaluation.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    evaluation.add_argument("--json", default=None, help="write metrics and per-question predictions here")
    evaluation.set_defaults(handler=run_eval)
def frame_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"must be positive frame counts, got {text!r}")
    return sorted(set(counts))


def run_bench(args: argparse.Namespace) -> None:
    """Stock Qwen2.5-VL vs QTSplus on the same weights: tokens, stage times, first-token latency, peak memory."""
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"{flag}: the folder of {path} does not exist")
    if args.model and not os.path.isdir(args.model):
        raise ValueError(f"--model: folder not found: {args.model}")
    from .benchmark import BenchSettings, run_bench as bench, save_plot

    settings = BenchSettings(
        frames=args.frames, resolution=args.resolution, repeats=args.repeats, device=args.device, dtype=args.dtype,
        new_tokens=args.new_tokens, vision_chunk_frames=args.vision_chunk_frames, seed=args.seed,
    )
    report = bench(settings, model_dir=args.model, config_name=args.config, log=print)
    if args.json:
        write_json_atomically(args.json, report)
    if args.plot:
        save_plot(report, args.plot)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="qtsplus", description="QTSplus query-aware video token selection.")
    parser.add_argument("--version", action="version", version=f"qtsplus-hf {__version__}")
    commands = parser.add_subparsers(dest="command")
    demo = commands.add_parser("demo", help="select tokens from a random video on a tiny random model (offline)")
    demo.add_argument("--temporal-patches", type=positive_int, default=32, help="video length in temporal patches")
    demo.add_argument("--keep-ratio", type=keep_ratio, default=None, help="fixed keep ratio (default: predicted)")
    demo.add_argument("--max-tokens", type=positive_int, default=2560, help="n_max, the most tokens kept")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=run_demo)

    answer = commands.add_parser("answer", help="answer a question about a video file")
    answer.add_argument("--model", required=True, help="QTSplus checkpoint folder")
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

    bench = commands.add_parser("bench", help="stock Qwen2.5-VL vs QTSplus on the same weights: tokens, time, memory")
    source = bench.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="a stock Qwen2.5-VL checkpoint folder")
    source.add_argument("--config", choices=("small", "medium"), default="small",
                        help="random Qwen2.5-VL-3B-shaped model (default: small)")
    bench.add_argument("--frames", type=frame_counts, default=[16, 32, 64, 128, 256], help="e.g. 16,32,64,128,256")
    bench.add_argument("--resolution", type=positive_int, default=224, help="frame side in pixels")
    bench.add_argument("--repeats", type=positive_int, default=3, help="timed runs per variant (after a warm-up)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    bench.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    bench.add_argument("--new-tokens", type=positive_int, default=8, help="tokens generated per run")
    bench.add_argument("--vision-chunk-frames", type=int, default=None,
                       help="QTSplus encodes videos this many frames at a time (default: the model config's)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", default=None, help="write the report as JSON to this path")
    bench.add_argument("--plot", default=None, help="write a PNG of tokens and latency against frames")
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
    try:
        args.handler(args)
    except (ValueError, OSError) as error:
        print(f"qtsplus {args.command}: error: {error}", file=sys.stderr)
        return 2
    finally:
        library_logger.removeHandler(handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
