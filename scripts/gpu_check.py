"""The GPU check of docs/performance.md, in one command for a machine with one CUDA GPU (about 5-8 minutes on one
H200-class GPU; 3B-shaped random weights, nothing downloaded):

    python scripts/gpu_check.py --out gpu_check.json

Sections, each recorded in the JSON (rewritten after every section, so a run cut short keeps what it measured),
with `passed` and the figures it compared:

1. `parity_sdpa` / `parity_flash_attention_2`: a Qwen2.5-VL-3B-shaped stock model (random weights, bf16) and QTSplus
   made from it by `from_qwen2_5_vl`, at `qtsplus_keep_ratio=1.0`: logits on a video prompt and greedy tokens.
   flash_attention_2 runs only where `flash_attn` is installed (else `skipped`).
2. `cpu_gpu_mix`: the small bench config in float32 with every selector part (2 scoring and 2 re-encode layers,
   weighted aggregation, relevance and time embeddings), dispatched by `accelerate.dispatch_model(model, device_map,
   main_device="cpu")` with the vision tower, embed_tokens, every selector part, every LM layer, the norm and lm_head
   alternating between cuda:0 and the CPU (each runs where it is placed): forward with labels (logits, losses,
   selection) and greedy generate against the same model on the CPU alone (tokens and selection equal, logits and
   losses within 1e-4; TF32 off).
3. `device_map_auto` / `device_map_auto_offload`: the 3B-shaped QTSplus checkpoint loaded with `device_map="auto"`
   in bf16, first as it fits (all on the GPU), then with `max_memory` of a few GiB for the GPU (the rest offloaded to
   the CPU, executed on the GPU): logits, selection and greedy tokens against the checkpoint on one GPU.
4. `bench`: `qtsplus bench --device cuda --dtype bfloat16 --model <the 3B-shaped stock checkpoint> --frames 64,256,600`
   (`run_bench`): TTFT, peak memory (`max_memory_allocated`), QTSplus / stock ratios and the vision stage's share
   of the time to first token, per frame count.

Exit status 0 when every check passed, 1 when one failed (the JSON says which), 2 without a CUDA GPU (one line on
stderr, nothing run). `--cpu-dry-run` runs the same code on the CPU with small sizes, to check the script itself on a
machine without a GPU; its figures mean nothing.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback


SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "src")
if os.path.isdir(SRC) and SRC not in sys.path:  # a checkout without `pip install -e .`
    sys.path.insert(0, SRC)

FLOAT32_TOLERANCE = 1e-4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="QTSplus GPU check: bf16 parity, CPU/GPU device maps, bench (one JSON).")
    parser.add_argument("--out", required=True, help="the JSON report to write")
    parser.add_argument("--frames", default="64,256,600", help="bench frame counts (default 64,256,600)")
    parser.add_argument("--resolution", type=int, default=224, help="bench frame side in pixels (default 224)")
    parser.add_argument("--repeats", type=int, default=2, help="bench timed runs per variant (default 2)")
    parser.add_argument("--parity-frames", type=int, default=32, help="frames of the parity / device_map prompt")
    parser.add_argument("--offload-gpu-memory", default="3GiB", help="GPU max_memory of the offload check")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: parity,mix,device_map,bench")
    parser.add_argument("--workdir", default=None,
                        help="folder for the two ~7.5 GB random checkpoints (default: a temporary one, removed)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run on the CPU with small sizes (checks the script itself; figures mean nothing)")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------------------------------------


def qwen2_5_vl_3b_config_dict() -> dict:
    """Qwen2.5-VL-3B-Instruct's shape (`scaled_qwen2_5_vl_3b` at scale 1, with 3B's 16 vision heads of 80 and its
    full-attention blocks 7, 15, 23, 31) and its vocabulary size; the special token ids are the tiny models'."""
    from qtsplus_hf.benchmark import scaled_qwen2_5_vl_3b

    config = scaled_qwen2_5_vl_3b(scale=1, vision_depth=32, text_layers=36, vocab_size=151936)
    config["vision_config"].update(num_heads=16, fullatt_block_indexes=[7, 15, 23, 31])
    config["text_config"].update(max_position_embeddings=128000)
    return config


def small_config_dict() -> dict:
    from qtsplus_hf.benchmark import BENCH_CONFIGS, scaled_qwen2_5_vl_3b

    return scaled_qwen2_5_vl_3b(**BENCH_CONFIGS["small"])


def random_stock_model(config_dict: dict, device: str, dtype, attn_implementation: str = "sdpa", seed: int = 0):
    """Random weights built on `device` directly (no CPU copy of a 3B model)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(**config_dict)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    return model.eval()


def prompt(config, frames: int, resolution: int, device: str, dtype_name: str) -> dict:
    from qtsplus_hf.benchmark import on_device, video_prompt

    return on_device(video_prompt(config, frames, resolution, question_tokens=24, seed=0), device, dtype_name)


def compare(actual, expected) -> dict:
    """Largest absolute difference, the reference's scale, exact equality and top-1 agreement of two logit tensors."""
    actual, expected = actual.float().cpu(), expected.float().cpu()
    return {
        "max_abs_diff": float((actual - expected).abs().max()), "max_abs_reference": float(expected.abs().max()),
        "exact": bool(torch_equal(actual, expected)),
        "argmax_agreement": float((actual.argmax(-1) == expected.argmax(-1)).float().mean()),
    }


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def same_selection(actual, expected) -> bool:
    return all(torch_equal(a.cpu(), b.cpu()) for a, b in zip(actual.kept_indices, expected.kept_indices))


# ----------------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------------


def check_parity(stock, qtsplus, inputs: dict, implementation: str) -> dict:
    """QTSplus at keep 1.0 against the stock model on the same weights: bf16 logits and greedy tokens."""
    import torch

    stock.set_attn_implementation(implementation)
    qtsplus.set_attn_implementation(implementation)
    with torch.no_grad():
        expected = stock(**inputs).logits
        actual = qtsplus(**inputs, qtsplus_keep_ratio=1.0).logits
        settings = dict(max_new_tokens=8, do_sample=False)
        stock_tokens = stock.generate(**inputs, **settings)
        qtsplus_tokens = qtsplus.generate(**inputs, **settings, qtsplus_keep_ratio=1.0)
    result = compare(actual, expected)
    result["tokens_equal"] = bool(torch_equal(stock_tokens.cpu(), qtsplus_tokens.cpu()))
    # bf16 keeps 8 bits of mantissa: a few units in the last place of the largest logit, if the paths differ at all.
    result["tolerance"] = 2e-2 * result["max_abs_reference"]
    result["passed"] = result["tokens_equal"] and result["max_abs_diff"] <= result["tolerance"]
    return result


def every_part_small_model(seed: int = 0):
    """The small bench config in float32, untied, with every selector module, randomly initialised throughout (a
    converted model's zeroed re-encoder would hide a device error behind a zero)."""
    import torch

    from qtsplus_hf import QTSplusConfig, QTSplusQwen2_5_VLForConditionalGeneration

    config_dict = small_config_dict()
    config_dict["tie_word_embeddings"] = False
    config_dict["text_config"]["tie_word_embeddings"] = False
    config = QTSplusConfig(**config_dict, qtsplus_num_scoring_layers=2, qtsplus_num_reencode_layers=2,
                           qtsplus_score_aggregation="weighted", qtsplus_relevance_embedding=True)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return QTSplusQwen2_5_VLForConditionalGeneration(config).eval()


def alternating_device_map(model, devices: list[str]) -> dict:
    """Every dispatchable part on its own entry (the vision tower whole, embed_tokens, every selector module and
    layer, every LM decoder layer, the norm, the rotary embedding, lm_head), devices assigned in turn."""
    from torch import nn

    parts = ["model.visual"]
    language_model = model.model.language_model
    parts += ["model.language_model.embed_tokens"]
    for name, child in model.qtsplus.named_children():
        if isinstance(child, nn.ModuleList):  # one entry per layer
            parts += [f"qtsplus.{name}.{index}" for index in range(len(child))]
        else:
            parts.append(f"qtsplus.{name}")
    parts += [f"model.language_model.layers.{index}" for index in range(len(language_model.layers))]
    parts += ["model.language_model.norm", "model.language_model.rotary_emb", "lm_head"]
    return {part: devices[index % len(devices)] for index, part in enumerate(parts)}


def check_cpu_gpu_mix(gpu: str) -> dict:
    """Real CPU / GPU mixing with accelerate hooks against the CPU alone, float32."""
    import torch
    from accelerate import dispatch_model
    from accelerate.utils import check_device_map

    from qtsplus_hf.tiny import video_prompt_batch

    model = every_part_small_model()
    # Sample 0 holds two videos (so the selector pads), sample 1 one; left padding; labels on the last two tokens.
    batch = video_prompt_batch([[(4, 8, 8), (2, 8, 8)], [(2, 8, 12)]], [6, 9], model.config, seed=3)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -2:] = batch["input_ids"][:, -2:]
    settings = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        expected = model(**batch, labels=labels)
        expected_tokens = model.generate(**batch, **settings)
    device_map = alternating_device_map(model, [gpu, "cpu"])
    check_device_map(model, device_map)  # every parameter has a device
    dispatch_model(model, device_map, main_device="cpu", skip_keys=sorted(model._skip_keys_device_placement),
                   force_hooks=True)
    devices = sorted({str(parameter.device) for parameter in model.parameters()})
    with torch.no_grad():
        actual = model(**batch, labels=labels)
        actual_tokens = model.generate(**batch, **settings)
    result = {"device_map": device_map, "parameter_devices": devices, "logits": compare(actual.logits, expected.logits)}
    result["losses_abs_diff"] = {
        name: float((getattr(actual, name).float().cpu() - getattr(expected, name).float().cpu()).abs().max())
        for name in ("loss", "lm_loss", "flops_loss", "kv_loss", "smooth_loss")
    }
    result["rho_abs_diff"] = float((actual.qtsplus.rho.cpu() - expected.qtsplus.rho.cpu()).abs().max())
    result["selection_equal"] = same_selection(actual.qtsplus, expected.qtsplus)
    result["tokens_equal"] = bool(torch_equal(actual_tokens.cpu(), expected_tokens.cpu()))
    result["tolerance"] = FLOAT32_TOLERANCE
    result["passed"] = (
        result["tokens_equal"] and result["selection_equal"] and result["logits"]["max_abs_diff"] <= FLOAT32_TOLERANCE
        and max(result["losses_abs_diff"].values()) <= FLOAT32_TOLERANCE
    )
    return result


def check_device_map_auto(folder: str, inputs: dict, device: str, dtype, max_memory: dict | None,
                          offload_folder: str) -> dict:
    """`from_pretrained(..., device_map="auto")` against the same checkpoint on one device."""
    import torch

    from qtsplus_hf import QTSplusQwen2_5_VLForConditionalGeneration as QTSplus

    settings = dict(max_new_tokens=8, do_sample=False)
    reference = QTSplus.from_pretrained(folder, dtype=dtype).to(device).eval()
    with torch.no_grad():
        expected = reference(**inputs)
        expected_tokens = reference.generate(**inputs, **settings)
    del reference
    empty_cache(device)
    model = QTSplus.from_pretrained(folder, dtype=dtype, device_map="auto", max_memory=max_memory,
                                    offload_folder=offload_folder).eval()
    placed = {}  # transformers sets hf_device_map only when the map has more than one device
    for name, where in (getattr(model, "hf_device_map", None) or {"": str(next(model.parameters()).device)}).items():
        placed.setdefault(str(where), []).append(name)
    with torch.no_grad():
        actual = model(**inputs)
        actual_tokens = model.generate(**inputs, **settings)
    result = {"max_memory": max_memory, "modules_per_device": {where: len(names) for where, names in placed.items()},
              "logits": compare(actual.logits, expected.logits),
              "selection_equal": same_selection(actual.qtsplus, expected.qtsplus),
              "tokens_equal": bool(torch_equal(actual_tokens.cpu(), expected_tokens.cpu()))}
    del model
    empty_cache(device)
    result["tolerance"] = 2e-2 * result["logits"]["max_abs_reference"]
    result["passed"] = (result["tokens_equal"] and result["selection_equal"]
                        and result["logits"]["max_abs_diff"] <= result["tolerance"])
    return result


def run_bench_check(stock_folder: str, frames: list[int], resolution: int, repeats: int, device: str,
                    dtype_name: str) -> dict:
    from qtsplus_hf.benchmark import VARIANTS, BenchSettings, run_bench

    settings = BenchSettings(frames=frames, resolution=resolution, repeats=repeats, device=device, dtype=dtype_name,
                             new_tokens=8)
    report = run_bench(settings, model_dir=stock_folder, log=lambda line: print(line, flush=True))
    summary = []
    for row in report["rows"]:
        entry = {"frames": row["frames"], "vision_tokens": row["vision_tokens"]}
        for variant in VARIANTS:
            result = row[variant]
            entry[variant] = {
                "ttft_seconds": result["time_to_first_token_seconds"], "total_seconds": result["total_seconds"],
                "peak_memory_mib": result["peak_memory_bytes"] / 2**20,
                "vision_peak_memory_mib": result["vision_peak_memory_bytes"] / 2**20,
                "vision_share_of_ttft": result["vision_encoder_seconds"] / result["time_to_first_token_seconds"],
                "kept_tokens": result["kept_tokens"],
            }
        entry["ratio_to_stock"] = {
            variant: {field: row["ratio_to_stock"][variant][field]
                      for field in ("time_to_first_token_seconds", "peak_memory_bytes", "vision_peak_memory_bytes")}
            for variant in VARIANTS[1:]
        }
        summary.append(entry)
    return {"summary": summary, "report": report, "passed": True}


def empty_cache(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def environment(device: str) -> dict:
    import accelerate
    import torch
    import transformers
    from transformers.utils import is_flash_attn_2_available

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "python": sys.version.split()[0], "flash_attn_2_available": bool(is_flash_attn_2_available())}
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, gpu_count=torch.cuda.device_count())
    return info


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------


def write_report(path: str, report: dict) -> None:
    temporary = f"{path}.partial"
    with open(temporary, "w") as handle:
        json.dump(report, handle, indent=2, default=str)
    os.replace(temporary, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("error: gpu_check needs a CUDA GPU and torch.cuda.is_available() is False; nothing was run "
              "(--cpu-dry-run checks the script on the CPU)", file=sys.stderr)
        return 2
    out_folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_folder):
        print(f"error: --out: the folder {out_folder} does not exist", file=sys.stderr)
        return 2
    skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    frames = [int(count) for count in args.frames.split(",")]
    device, dtype_name = ("cpu", "bfloat16") if args.cpu_dry_run else ("cuda", "bfloat16")
    gpu = "cpu" if args.cpu_dry_run else "cuda:0"
    dtype = torch.bfloat16
    if args.cpu_dry_run:  # small sizes: the same code, minutes less
        frames, resolution, parity_frames, repeats = [2, 4], 56, 4, 1
        big_config = small_config_dict()
        offload_memory = {"cpu": "4MiB"}
    else:
        resolution, parity_frames, repeats = args.resolution, args.parity_frames, args.repeats
        big_config = qwen2_5_vl_3b_config_dict()
        offload_memory = {0: args.offload_gpu_memory, "cpu": "200GiB"}
    # float32 comparisons mean float32: no TF32 in matmuls or convolutions (the patch embedding is a Conv3d).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    started = time.perf_counter()
    report = {"command": " ".join(["python", "scripts/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "cpu_dry_run": args.cpu_dry_run, "environment": environment(device), "checks": {}}
    checks = report["checks"]

    def run(name: str, function, *arguments, **keywords) -> None:
        section_start = time.perf_counter()
        print(f"[{time.perf_counter() - started:6.0f} s] {name} ...", flush=True)
        try:
            checks[name] = function(*arguments, **keywords)
        except Exception as error:  # noqa: BLE001 - recorded, and the other sections still run
            checks[name] = {"passed": False, "error": f"{type(error).__name__}: {error}",
                            "traceback": traceback.format_exc()[-4000:]}
        checks[name]["seconds"] = round(time.perf_counter() - section_start, 1)
        print(f"[{time.perf_counter() - started:6.0f} s] {name}: "
              f"{'passed' if checks[name].get('passed') else checks[name].get('skipped') or 'FAILED'}", flush=True)
        report["seconds"] = round(time.perf_counter() - started, 1)
        write_report(args.out, report)

    workdir = args.workdir or tempfile.mkdtemp(prefix="qtsplus-gpu-check-", dir=out_folder)
    stock_folder, qtsplus_folder = os.path.join(workdir, "stock"), os.path.join(workdir, "qtsplus")
    try:
        if not {"parity", "device_map", "bench"} <= skip:
            def build_and_save() -> dict:
                from qtsplus_hf import QTSplusQwen2_5_VLForConditionalGeneration as QTSplus

                stock = random_stock_model(big_config, device, dtype)
                torch.manual_seed(1)
                qtsplus = QTSplus.from_qwen2_5_vl(stock)
                inputs = prompt(stock.config, parity_frames, resolution, device, dtype_name)
                if "parity" not in skip:
                    implementations = ["sdpa"]
                    if report["environment"]["flash_attn_2_available"] and device == "cuda":
                        implementations.append("flash_attention_2")
                    else:
                        checks["parity_flash_attention_2"] = {
                            "skipped": "flash_attn is not installed" if device == "cuda" else "no GPU"}
                    for implementation in implementations:
                        start = time.perf_counter()
                        try:  # a failed parity check must not cost the checkpoints the later sections need
                            checks[f"parity_{implementation}"] = check_parity(stock, qtsplus, inputs, implementation)
                        except Exception as error:  # noqa: BLE001
                            checks[f"parity_{implementation}"] = {
                                "passed": False, "error": f"{type(error).__name__}: {error}",
                                "traceback": traceback.format_exc()[-4000:]}
                        checks[f"parity_{implementation}"]["seconds"] = round(time.perf_counter() - start, 1)
                    stock.set_attn_implementation("sdpa")
                    qtsplus.set_attn_implementation("sdpa")
                stock.save_pretrained(stock_folder)
                qtsplus.save_pretrained(qtsplus_folder)
                parameters = sum(parameter.numel() for parameter in stock.parameters())
                return {"passed": True, "stock_parameters": parameters,
                        "prompt_tokens": int(inputs["input_ids"].shape[1]),
                        "config": {"vision": stock.config.vision_config.to_dict(),
                                   "text": stock.config.text_config.to_dict()}}

            run("build_3b_shaped_models", build_and_save)
            empty_cache(device)
        if "mix" not in skip:
            run("cpu_gpu_mix", check_cpu_gpu_mix, gpu)
        if "device_map" not in skip and os.path.isdir(qtsplus_folder):
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(stock_folder)
            inputs = prompt(config, parity_frames, resolution, device, dtype_name)
            offload_folder = os.path.join(workdir, "offload")
            run("device_map_auto", check_device_map_auto, qtsplus_folder, inputs, device, dtype, None, offload_folder)
            run("device_map_auto_offload", check_device_map_auto, qtsplus_folder, inputs, device, dtype,
                offload_memory, offload_folder)
        if "bench" not in skip and os.path.isdir(stock_folder):
            run("bench", run_bench_check, stock_folder, frames, resolution, repeats, device, dtype_name)
        for section, names, folder in (("device_map", ("device_map_auto",), qtsplus_folder),
                                       ("bench", ("bench",), stock_folder)):
            if section not in skip and not os.path.isdir(folder):
                for name in names:
                    checks[name] = {"passed": False, "error": "not run: build_3b_shaped_models saved no checkpoint"}
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    failed = [name for name, check in checks.items() if not check.get("passed") and "skipped" not in check]
    report.update(passed=not failed, failed=failed, seconds=round(time.perf_counter() - started, 1))
    write_report(args.out, report)
    print(f"{'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)}; "
          f"{report['seconds']:.0f} s; report: {args.out}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
