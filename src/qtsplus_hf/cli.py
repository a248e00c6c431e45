"""The `qtsplus` command line."""

import argparse
import sys
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        args.handler(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"qtsplus {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
