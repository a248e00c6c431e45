"""`qtsplus bench`: the stock Qwen2.5-VL (or, `--backbone qwen3_vl`, Qwen3-VL) and QTSplus on the same weights, side
by side in one run.

For each frame count, three variants run on one synthetic video prompt: `stock` (`Qwen2_5_VLForConditionalGeneration`
or `Qwen3VLForConditionalGeneration`),
`qtsplus_predicted` (the predicted budget) and `qtsplus_fixed` (keep ratio 0.11, the paper's 89% compression). Timed
runs alternate the variants (A/B/C/A/B/C) after one warm-up run of each on a 2-frame video (what a warm-up removes,
lazy initialisation and first-call allocations, does not depend on the video length, and a full-size one would
add a fourth of the bench's time), and medians are reported. Peak memory is
measured apart from the timed runs (see `measure_peak_memory`).
"""

import functools
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import transformers
from transformers import Qwen3VLConfig, StoppingCriteria, StoppingCriteriaList

from . import BACKBONES
from .selector_qtsplus import QTSplusModelMixin
from .tiny import IM_END_ID, IMAGE_ID, PAD_ID, SPECIAL_TOKENS, VIDEO_ID, VISION_END_ID, VISION_START_ID


FIXED_KEEP_RATIO = 0.11
VARIANTS = ("stock", "qtsplus_predicted", "qtsplus_fixed")
TIMED_FIELDS = (
    "vision_encoder_seconds", "selector_compaction_seconds", "time_to_first_token_seconds", "total_seconds",
)
RATIO_FIELDS = (
    "prefill_length", "time_to_first_token_seconds", "total_seconds", "peak_memory_bytes", "vision_peak_memory_bytes",
    "allocated_peak_memory_bytes", "vision_allocated_peak_memory_bytes",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def scaled_qwen2_5_vl_3b(scale: int, vision_depth: int, text_layers: int, vocab_size: int) -> dict:
    """Qwen2.5-VL-3B's shape with every width divided by `scale` and fewer layers.

    Kept from the 3B model: patch 14, temporal patch 2, merge 2, window 112 px, one full-attention vision layer per
    block of layers, 16 query / 2 key-value LM heads (GQA 8:1), mrope_section in the ratio 16:24:24 of the head
    dimension, SwiGLU widths 2.67x (vision) and 5.375x (LM) the model width, vision width 5/8 of the LM's, the LM
    several times the vision encoder's parameters with about its FLOPs per video token (the encoder sees 4 patches
    per LM token).
    """
    text_hidden, vision_hidden = 2048 // scale, 1280 // scale
    head_dim = text_hidden // 16
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # 16:24:24 of head_dim / 2 = 64 in 3B
    return dict(
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden, intermediate_size=round(3420 / scale / 4) * 4,
            # head_dim 16: the vision rotary embedding needs a multiple of 4 (3B: 16 heads of 80).
            num_heads=vision_hidden // 16, out_hidden_size=text_hidden, patch_size=14, temporal_patch_size=2,
            spatial_merge_size=2, window_size=112, fullatt_block_indexes=list(range(3, vision_depth, 4)),
            tokens_per_second=2,
        ),
        text_config=dict(
            vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=round(11008 / scale),
            num_hidden_layers=text_layers, num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section},
            bos_token_id=PAD_ID, eos_token_id=IM_END_ID, pad_token_id=PAD_ID, tie_word_embeddings=True,
        ),
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID, tie_word_embeddings=True,
    )


def scaled_qwen3_vl_4b(scale: int, vision_depth: int, text_layers: int, vocab_size: int) -> dict:
    """Qwen3-VL-4B's shape with every width divided by `scale` and fewer layers.

    Qwen3-VL-4B-Instruct: LM width 2560, 36 layers, 32 query / 8 key-value heads of head_dim 128 (query width 4096,
    1.6x the model width), SwiGLU 9728 (3.8x), interleaved MRoPE with mrope_section 24 / 20 / 20 (T / H / W of
    head_dim / 2 = 64), rope_theta 5e6, tied embeddings; vision encoder depth 24, width 1024 (0.4x the LM's), 16
    heads, GELU MLP 4096 (4x, not gated), patch 16, temporal patch 2, merge 2, a learned 48 x 48 position grid
    (2304), DeepStack taps after blocks 5, 11 and 17 (at a quarter, half and three quarters of the depth), merger
    output 2560.

    Kept here: 32 / 8 heads (GQA 4:1) with head_dim = width / 20 (query width 1.6x the model width), the MLP ratios,
    the vision width 0.4x the LM's, 4B's 16 vision heads where that leaves a head_dim of at least 16, else heads of
    16 (as the Qwen2.5-VL bench config: the vision rotary embedding needs a multiple of 4), patch / temporal patch /
    merge, the 2304 position grid, DeepStack at the quarters of the depth, tied embeddings, and the mrope_section
    nearest to 24:20:20 with H = W (exact from head_dim 32). `scale=1, vision_depth=24, text_layers=36` is 4B's
    shape.
    """
    text_hidden, vision_hidden = 2560 // scale, 1024 // scale
    head_dim = 128 // scale
    spatial = head_dim // 2 * 20 // 64  # H and W frequencies: 20 of 64 in 4B, 5 of 16, 2 of 8
    section = [head_dim // 2 - 2 * spatial, spatial, spatial]
    return dict(
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden, intermediate_size=4096 // scale,
            num_heads=min(16, vision_hidden // 16), out_hidden_size=text_hidden, patch_size=16, temporal_patch_size=2,
            spatial_merge_size=2, num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh",
            deepstack_visual_indexes=[vision_depth * quarter // 4 - 1 for quarter in (1, 2, 3)],
        ),
        text_config=dict(
            vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=9728 // scale,
            num_hidden_layers=text_layers, num_attention_heads=32, num_key_value_heads=8, head_dim=head_dim,
            max_position_embeddings=32768, hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": section,
                             "mrope_interleaved": True},
            bos_token_id=PAD_ID, eos_token_id=IM_END_ID, pad_token_id=PAD_ID, tie_word_embeddings=True,
        ),
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID, tie_word_embeddings=True,
    )


# Scaled so that a CPU run with ~16k vision tokens stays within minutes (small) or shows a larger model (medium).
# The same settings serve both backbones: 4 / 24 vision and 6 / 36 LM layers are a sixth of Qwen3-VL-4B's depths.
BENCH_CONFIGS = {
    "small": dict(scale=8, vision_depth=4, text_layers=6, vocab_size=2048),
    "medium": dict(scale=4, vision_depth=8, text_layers=12, vocab_size=4096),
}
# --backbone (a key of `qtsplus_hf.BACKBONES`) -> the scaled shape of its reference size.
SCALED_SHAPES = {"qwen2_5_vl": scaled_qwen2_5_vl_3b, "qwen3_vl": scaled_qwen3_vl_4b}
DEFAULT_BACKBONE = "qwen2_5_vl"


def check_backbone(backbone: str) -> None:
    if backbone not in SCALED_SHAPES:
        raise ValueError(f"unknown backbone {backbone!r}; choose from {sorted(SCALED_SHAPES)}")


def qtsplus_class(backbone: str) -> type:
    check_backbone(backbone)
    return BACKBONES[backbone][1]


def backbone_label(backbone: str) -> str:
    """How reports name the backbone: "Qwen2.5-VL", "Qwen3-VL"."""
    return qtsplus_class(backbone).backbone_name


def bench_config(name: str, backbone: str = DEFAULT_BACKBONE):
    """The random bench model's config: Qwen2.5-VL-3B's shape (`scaled_qwen2_5_vl_3b`) or, for `qwen3_vl`,
    Qwen3-VL-4B's (`scaled_qwen3_vl_4b`), scaled by `BENCH_CONFIGS[name]`."""
    check_backbone(backbone)
    if name not in BENCH_CONFIGS:
        raise ValueError(f"unknown bench config {name!r}; choose from {sorted(BENCH_CONFIGS)}")
    stock_config_class = qtsplus_class(backbone).stock_class.config_class
    return stock_config_class(**SCALED_SHAPES[backbone](**BENCH_CONFIGS[name]))


@dataclass
class BenchSettings:
    frames: Sequence[int] = (16, 32, 64, 128, 256)
    resolution: int = 224
    repeats: int = 3
    device: str = "cpu"
    dtype: str = "float32"
    new_tokens: int = 8
    question_tokens: int = 24
    vision_chunk_frames: int | None = None
    seed: int = 0
    backbone: str = DEFAULT_BACKBONE


# ----------------------------------------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------------------------------------


@contextmanager
def quiet_progress_bars():
    """transformers' weight loading / saving bars, one per memory process, would bury the bench's own lines and
    progress bars (which `run_bench` creates outside this, so they follow the caller's setting)."""
    enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers.utils.logging.enable_progress_bar()


def load_stock(source: str, device: str, dtype: str, backbone: str = DEFAULT_BACKBONE):
    """The stock model of `backbone` (`Qwen2_5_VLForConditionalGeneration`, `Qwen3VLForConditionalGeneration`)."""
    with quiet_progress_bars():
        model = qtsplus_class(backbone).stock_class.from_pretrained(
            source, dtype=DTYPES[dtype], attn_implementation="sdpa"
        )
    return model.to(device).eval()


def qtsplus_from_stock(stock, seed: int) -> QTSplusModelMixin:
    """QTSplus made from the stock model (`from_qwen2_5_vl` / `from_qwen3_vl`, identity initialisation); the
    selector's random parts come from `seed`, so every process agrees."""
    torch.manual_seed(seed)
    (model_class,) = [model_class for _, model_class, _ in BACKBONES.values() if type(stock) is model_class.stock_class]
    return model_class.from_stock(stock)


def share_stock_tensors(qtsplus: QTSplusModelMixin, stock) -> None:
    """Point QTSplus's stock parameters at the stock model's tensors: one copy of the weights in memory."""
    qtsplus.load_state_dict(stock.state_dict(), strict=False, assign=True)
    qtsplus.tie_weights()


def video_grid(config, frames: int, resolution: int) -> tuple[int, int, int]:
    """The patch grid (t, h, w) of `frames` square frames of `resolution` pixels; ValueError for sizes the vision
    encoder cannot take."""
    vision = config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    if resolution < factor or resolution % factor:
        raise ValueError(f"--resolution must be a positive multiple of {factor} (patch x merge), got {resolution}")
    if frames < vision.temporal_patch_size or frames % vision.temporal_patch_size:
        raise ValueError(f"frame counts must be multiples of {vision.temporal_patch_size}, got {frames}")
    return frames // vision.temporal_patch_size, resolution // vision.patch_size, resolution // vision.patch_size


def video_prompt(config, frames: int, resolution: int, question_tokens: int, seed: int) -> dict[str, torch.Tensor]:
    """One synthetic video question shaped like a Qwen2.5-VL processor's output: random pixels and text ids."""
    vision = config.vision_config
    grid = video_grid(config, frames, resolution)
    generator = torch.Generator().manual_seed(seed)
    num_tokens = grid[0] * grid[1] * grid[2] // vision.spatial_merge_size**2
    # Text ids from a range clear of special tokens in both the random configs and real Qwen vocabularies.
    text_ids = range(len(SPECIAL_TOKENS) + 100, len(SPECIAL_TOKENS) + 600)
    text = torch.randint(text_ids.start, text_ids.stop, (8 + question_tokens,), generator=generator).tolist()
    ids = text[:8] + [config.vision_start_token_id] + [config.video_token_id] * num_tokens
    ids += [config.vision_end_token_id] + text[8:]
    input_ids = torch.tensor([ids])
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": 2 * (input_ids == config.video_token_id).int(),
        "pixel_values_videos": torch.randn(grid[0] * grid[1] * grid[2], patch_dim, generator=generator),
        "video_grid_thw": torch.tensor([grid]),
        "second_per_grid_ts": torch.tensor([1.0]),
    }


@functools.lru_cache(maxsize=1)
def timestamp_tokenizer():
    """The byte-level tokenizer of `qtsplus_hf.tiny` (built once): it writes the Qwen3-VL prompts' timestamp text."""
    from .tiny import tiny_tokenizer

    return tiny_tokenizer()


def qwen3_video_prompt(config, frames: int, resolution: int, question_tokens: int, seed: int) -> dict:
    """One synthetic video question laid out as the Qwen3-VL processor lays it out (`tiny.qwen3_video_prompt_batch`,
    with the config's vision token ids, so a real checkpoint's config works too): 3 system tokens,
    `<|vision_start|>`, per temporal patch its timestamp text `<0.2 seconds>` (frames at 2 fps, as the processor
    samples by default) and its own `<|vision_start|> <|video_pad|>* <|vision_end|>`, `<|vision_end|>`, then the
    question; random pixels and text ids. Carries `qtsplus_query_mask` (the question) and `qtsplus_patch_seconds`
    (the patches' times), which only the QTSplus variants get; the timestamps are written with
    `timestamp_tokenizer()`.
    """
    from .tiny import qwen3_video_prompt_batch

    grid = video_grid(config, frames, resolution)
    return qwen3_video_prompt_batch([[grid]], [question_tokens], config, seed=seed, tokenizer=timestamp_tokenizer())


def bench_prompt(config, frames: int, resolution: int, question_tokens: int, seed: int) -> dict:
    """The bench's video question for the config's backbone: `video_prompt` (Qwen2.5-VL) or `qwen3_video_prompt`."""
    if isinstance(config, Qwen3VLConfig):  # the stock config or QTSplus's subclass of it
        return qwen3_video_prompt(config, frames, resolution, question_tokens, seed)
    return video_prompt(config, frames, resolution, question_tokens, seed)


def variant_inputs(inputs: dict, variant: str) -> dict:
    """The inputs a variant gets: the stock model gets what a stock processor returns (no `qtsplus_*` entries)."""
    if variant == "stock":
        return {name: value for name, value in inputs.items() if not name.startswith("qtsplus_")}
    return inputs


def on_device(inputs: dict, device: str, dtype: str) -> dict:
    return {
        name: value.to(device, DTYPES[dtype]) if name == "pixel_values_videos" else value.to(device)
        for name, value in inputs.items()
    }


def variant_kwargs(variant: str, chunk_frames: int | None) -> dict:
    if variant == "stock":
        return {}
    keep_ratio = FIXED_KEEP_RATIO if variant == "qtsplus_fixed" else None
    return {"qtsplus_keep_ratio": keep_ratio, "qtsplus_vision_chunk_frames": chunk_frames}


# ----------------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class FirstTokenClock(StoppingCriteria):
    """Never stops generation; notes when the first new token exists (generate calls it after every step)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.first_token_at: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.first_token_at is None:
            synchronize(self.device)
            self.first_token_at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@contextmanager
def stage_clock(model, device: str):
    """Seconds in the vision encoder (forward hooks) and in `prepare_qtsplus_inputs` (QTSplus only)."""
    seconds = {"vision": 0.0, "prepare": 0.0}
    started = {}

    def start(name):
        synchronize(device)
        started[name] = time.perf_counter()

    def stop(name):
        synchronize(device)
        seconds[name] += time.perf_counter() - started.pop(name)

    hooks = [
        model.model.visual.register_forward_pre_hook(lambda *_: start("vision")),
        model.model.visual.register_forward_hook(lambda *_: stop("vision")),
    ]
    wrapped = isinstance(model, QTSplusModelMixin)
    if wrapped:
        # An instance attribute shadows the method for the duration of the run: generate looks it up on `self`.
        prepare = model.prepare_qtsplus_inputs

        def timed_prepare(**inputs):
            start("prepare")
            try:
                return prepare(**inputs)
            finally:
                stop("prepare")

        model.prepare_qtsplus_inputs = timed_prepare
    try:
        yield seconds
    finally:
        for hook in hooks:
            hook.remove()
        if wrapped:
            del model.prepare_qtsplus_inputs


def generate_fixed_length(model, inputs: dict, variant: str, settings: BenchSettings, clock: FirstTokenClock | None):
    return model.generate(
        **variant_inputs(inputs, variant), **variant_kwargs(variant, settings.vision_chunk_frames),
        max_new_tokens=settings.new_tokens,
        min_new_tokens=settings.new_tokens, do_sample=False, return_dict_in_generate=True,
        stopping_criteria=StoppingCriteriaList([clock] if clock else []),
    )


@torch.no_grad()
def timed_run(model, inputs: dict, variant: str, settings: BenchSettings) -> dict:
    """One generate of `new_tokens` tokens: stage times, time to first token, total, kept tokens, prefill length."""
    clock = FirstTokenClock(settings.device)
    with stage_clock(model, settings.device) as seconds:
        synchronize(settings.device)
        start = time.perf_counter()
        outputs = generate_fixed_length(model, inputs, variant, settings, clock)
        synchronize(settings.device)
        total = time.perf_counter() - start
    num_tokens = int((inputs["input_ids"] == model.config.video_token_id).sum())
    selection = outputs.get("qtsplus")
    kept = selection.num_kept[0] if selection is not None else num_tokens
    result = {
        "kept_tokens": kept,
        "prefill_length": inputs["input_ids"].shape[1] - num_tokens + kept,
        "vision_encoder_seconds": seconds["vision"],
        # Everything QTSplus runs before the LM apart from the vision encoder: scoring, budget, top-n, re-encoding,
        # compaction (and the MRoPE index, which the stock forward computes too, a few ms).
        "selector_compaction_seconds": max(seconds["prepare"] - seconds["vision"], 0.0) if selection else 0.0,
        "time_to_first_token_seconds": clock.first_token_at - start,
        "total_seconds": total,
    }
    if selection is not None:
        result["rho"] = float(selection.rho[0])
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> int:
    """Reset the kernel's high-water mark VmHWM to the current RSS (Linux >= 4.0) and return that RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _proc_status_kib("VmRSS") * 1024


def _peak_rss_delta(run: Callable[[], object]) -> int:
    baseline = _reset_peak_rss()
    run()
    return _proc_status_kib("VmHWM") * 1024 - baseline


def allocated_peak_bytes(run: Callable[[], object]) -> int:
    """Peak of the bytes that torch's CPU allocator holds for tensors during `run`, above what it held before.

    `torch.profiler` with `profile_memory=True` records every CPU tensor allocation and free (size and time); their
    running sum, in time order, is the live-tensor curve, and its maximum the peak. It depends only on which tensors
    the code allocates and when, not on the process, the allocator's caches or the machine's load: with one torch
    thread the same run gives the same number every time. It counts tensors only (not the interpreter, libraries'
    own buffers such as oneDNN scratch space, or memory malloc keeps after a free), so it is below the RSS figure.
    """
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # otherwise kineto prints its start / stop lines on stderr
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    events = [
        event for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):  # stable: ties keep the recorded order
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _vision_stage(model, inputs: dict, variant: str, chunk_frames: int | None):
    if variant == "stock":
        return lambda: model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    return lambda: model.encode_videos(inputs["pixel_values_videos"], inputs["video_grid_thw"], chunk_frames)


@torch.no_grad()
def _cpu_memory_child(source: str, variant: str, frames: int, settings: BenchSettings, stage: str) -> int:
    """Runs in a fresh process: load, warm up on a 2-frame video, then the peak RSS delta of `stage` ("vision": the
    vision encoder alone; "total": the whole generate)."""
    stock = load_stock(source, settings.device, settings.dtype, settings.backbone)
    model = stock if variant == "stock" else qtsplus_from_stock(stock, settings.seed)
    del stock
    config = model.config
    warm = on_device(bench_prompt(config, 2, settings.resolution, settings.question_tokens, settings.seed), "cpu",
                     settings.dtype)
    generate_fixed_length(model, warm, variant, settings, None)
    inputs = on_device(
        bench_prompt(config, frames, settings.resolution, settings.question_tokens, settings.seed), "cpu",
        settings.dtype,
    )
    if stage == "vision":
        return _peak_rss_delta(_vision_stage(model, inputs, variant, settings.vision_chunk_frames))
    return _peak_rss_delta(lambda: generate_fixed_length(model, inputs, variant, settings, None))


def vision_output_bytes(model, inputs: dict) -> int:
    """Bytes of the LM-ready video features, which the vision stage's peak includes and which grow with the video
    (Qwen3-VL: the merged features and, of the same size, each DeepStack layer's)."""
    vision = model.config.vision_config
    tokens = int(inputs["video_grid_thw"].prod(-1).sum()) // vision.spatial_merge_size**2
    streams = 1 + len(getattr(vision, "deepstack_visual_indexes", None) or ())
    return streams * tokens * vision.out_hidden_size * inputs["pixel_values_videos"].element_size()


def measure_peak_memory(source: str, model, inputs: dict, variant: str, frames: int, settings: BenchSettings) -> dict:
    """Peak memory above what was allocated before the run, of the vision stage and of the whole generate.

    CUDA: `max_memory_allocated` after `reset_peak_memory_stats`, in this process.
    CPU: the peak resident set size in a fresh process per measurement (vision stage and whole generate apart),
    forked from a forkserver that has imported torch but run nothing. In one process the allocator keeps memory freed
    by an earlier run (of any variant or stage) resident, so a later run would reuse it and show too small a delta.
    The kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs) catches short peaks that sampling RSS
    would miss. RSS is noisy (what malloc returns to the kernel, and when, varies), so CPU rows also carry
    `allocated_peak_memory_bytes` / `vision_allocated_peak_memory_bytes`: the allocator-level peak of
    `allocated_peak_bytes`, taken in this process on the warm model, the same number on every run. On CUDA
    `max_memory_allocated` is already allocator-level: both field pairs hold it.
    """
    vision_run = _vision_stage(model, inputs, variant, settings.vision_chunk_frames)

    def generate_run():
        return generate_fixed_length(model, inputs, variant, settings, None)

    if settings.device.startswith("cuda"):
        result = {}
        for field, run in (("vision_peak_memory_bytes", vision_run), ("peak_memory_bytes", generate_run)):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
            with torch.no_grad():
                run()
            torch.cuda.synchronize()
            result[field] = torch.cuda.max_memory_allocated() - baseline
        result["vision_allocated_peak_memory_bytes"] = result["vision_peak_memory_bytes"]
        result["allocated_peak_memory_bytes"] = result["peak_memory_bytes"]
        return result
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "qtsplus_hf.benchmark"])
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=context, max_tasks_per_child=1) as pool:
            result = {
                field: pool.submit(_cpu_memory_child, source, variant, frames, settings, stage).result()
                for field, stage in (("vision_peak_memory_bytes", "vision"), ("peak_memory_bytes", "total"))
            }
    except BrokenProcessPool as error:
        raise OSError(f"the memory measurement process for {variant} at {frames} frames died (out of memory?)") from error
    with torch.no_grad():
        result["vision_allocated_peak_memory_bytes"] = allocated_peak_bytes(vision_run)
        result["allocated_peak_memory_bytes"] = allocated_peak_bytes(generate_run)
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Analytic cost: FLOPs (a multiply-add counts 2) and bytes moved, derived in docs/performance.md
# ----------------------------------------------------------------------------------------------------------------------


def analytic_costs(config, vision_tokens: int, kept_tokens: int, text_tokens: int, question_tokens: int,
                   bytes_per_value: int = 4, time_embedding_dim: int = 64, kept_timestamps: int | None = None,
                   frame_patches: int | None = None) -> dict:
    """FLOPs and bytes of the selector (one scoring and one re-encode layer), the LM prefill on the stock and on
    the compacted sequence, and the vision encoder, for one video.

    `kept_timestamps`: distinct timestamps among the kept tokens (the time embedding projects each once; default
    `kept_tokens`, an upper bound). `frame_patches`: patches per temporal patch (h x w), for the full attention of
    Qwen3-VL's vision blocks within a frame (None: left out, as Qwen2.5-VL's windowed attention is).

    FLOPs count the matrix products (norms, softmax and other element-wise work are O(tokens x width), below 1%).
    Bytes count weights read once, tensors written by each product (read once by the next), and the KV cache;
    attention scores are not stored by the fused SDPA kernels, except the selector's question-row probabilities.
    The query width is heads x head_dim: the model width for Qwen2.5-VL, 1.6 x it for Qwen3-VL (head_dim 128 at
    width 2560); Qwen3-VL's vision MLP has two matrices (Qwen2.5-VL's SwiGLU three) and it runs one patch merger per
    DeepStack layer besides the main one.
    """
    text, vision = config.text_config, config.vision_config
    width, heads, kv_heads = text.hidden_size, text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or width // heads
    q_width, kv_width, inner = heads * head_dim, head_dim * kv_heads, text.intermediate_size
    m, n, q = vision_tokens, kept_tokens, question_tokens

    def lm_prefill(length: int) -> tuple[int, int]:
        flops = text.num_hidden_layers * (
            length * (4 * width * q_width + 4 * width * kv_width + 6 * width * inner)
            + 2 * length * length * q_width  # causal attention: half of QK^T and PV, 4 S^2 (H d)
        )
        weights = 2 * width * q_width + 2 * width * kv_width + 3 * width * inner
        # q, attn; o, residual; k, v (the cache); MLP
        activations = length * (2 * q_width + 2 * width + 2 * kv_width + 3 * inner)
        return flops, text.num_hidden_layers * (weights + activations) * bytes_per_value

    scoring = 2 * m * width * kv_width + 2 * q * width * q_width + 2 * q * m * q_width
    steps = n if kept_timestamps is None else kept_timestamps
    reencode = (
        n * (4 * width * q_width + 16 * width * width + 4 * width * kv_width)  # q, o; 4D feed-forward; k, v
        + 2 * steps * time_embedding_dim * width + 4 * n * n * q_width
    )
    selector_values = (
        m * width + m * kv_width + 2 * heads * q * m  # features read, keys, question-row probabilities (write + read)
        + n * (2 * q_width + 12 * width + 2 * kv_width)  # re-encoder: q, attn, o, residual, 4D feed-forward twice, k, v
        + 6 * width * q_width + 8 * width * width + 2 * width * kv_width  # weights: scoring q/k, re-encoder q/k/v/o, FF
    )
    stock_flops, stock_bytes = lm_prefill(m + text_tokens)
    qtsplus_flops, qtsplus_bytes = lm_prefill(n + text_tokens)
    patches, v_width = m * vision.spatial_merge_size**2, vision.hidden_size
    deepstack = getattr(vision, "deepstack_visual_indexes", None)
    if deepstack is None:  # Qwen2.5-VL: SwiGLU MLP, one merger
        vision_flops = patches * vision.depth * (8 * v_width * v_width + 6 * v_width * vision.intermediate_size)
        mergers = 1
    else:  # Qwen3-VL: GELU MLP of two matrices, full attention within each frame, a merger per DeepStack layer too
        vision_flops = patches * vision.depth * (8 * v_width * v_width + 4 * v_width * vision.intermediate_size)
        if frame_patches is not None:
            vision_flops += patches * vision.depth * 4 * frame_patches * v_width
        mergers = 1 + len(deepstack)
    vision_flops += mergers * (m * 2 * (4 * v_width) * (4 * v_width) + m * 2 * 4 * v_width * width)  # merger MLPs
    return {
        "selector_scoring_flops": scoring, "selector_reencode_flops": reencode,
        "selector_flops": scoring + reencode, "selector_bytes": selector_values * bytes_per_value,
        "lm_prefill_stock_flops": stock_flops, "lm_prefill_stock_bytes": stock_bytes,
        "lm_prefill_qtsplus_flops": qtsplus_flops, "lm_prefill_qtsplus_bytes": qtsplus_bytes,
        "vision_encoder_flops": vision_flops,
    }


# ----------------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------------


def median_row(samples: list[dict]) -> dict:
    row = {field: statistics.median(sample[field] for sample in samples) for field in TIMED_FIELDS}
    for field in ("kept_tokens", "prefill_length", "rho"):
        if field in samples[0]:
            row[field] = samples[-1][field]
    row["samples"] = {field: [sample[field] for sample in samples] for field in TIMED_FIELDS}
    return row


def ratios(row: dict, stock: dict) -> dict:
    return {field: row[field] / stock[field] if stock[field] else math.nan for field in RATIO_FIELDS}


def environment(device: str) -> dict:
    if device.startswith("cuda"):
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as cpuinfo:
                names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
            device_name = names[0] if names else device_name
    return {
        "device_name": device_name, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
    }


def check_settings(settings: BenchSettings) -> None:
    if not settings.frames:
        raise ValueError("--frames: give at least one frame count")
    if settings.repeats < 1 or settings.new_tokens < 1:
        raise ValueError("--repeats and --new-tokens must be positive")
    if settings.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {settings.dtype!r}")
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if settings.device != "cpu" and not settings.device.startswith("cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {settings.device!r}")


def run_bench(settings: BenchSettings, model_dir: str | None = None, config_name: str = "small",
              log: Callable[[str], None] = lambda _: None) -> dict:
    """Benchmark stock vs QTSplus for every frame count; returns the JSON-ready report.

    `settings.backbone` picks the stock model: `qwen2_5_vl` (random weights: `scaled_qwen2_5_vl_3b`, the
    `video_prompt` layout) or `qwen3_vl` (`scaled_qwen3_vl_4b`, the `qwen3_video_prompt` layout with timestamps);
    QTSplus is made from it with `from_qwen2_5_vl` / `from_qwen3_vl` and shares its weights."""
    check_settings(settings)
    check_backbone(settings.backbone)
    stock_class = qtsplus_class(settings.backbone).stock_class
    with tempfile.TemporaryDirectory(prefix="qtsplus-bench-") as scratch:
        if model_dir is None:
            torch.manual_seed(settings.seed)
            random_model = stock_class(bench_config(config_name, settings.backbone)).to(DTYPES[settings.dtype])
            with quiet_progress_bars():
                random_model.save_pretrained(scratch)  # the memory processes load these very weights
            del random_model
            source = scratch
        elif not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise ValueError(f"--model: no config.json in {model_dir}")
        else:
            source = model_dir
        if settings.backbone != DEFAULT_BACKBONE:  # checked before loading: the stock class would load it anyway
            from .convert import load_config_dict

            model_type = load_config_dict(source).get("model_type")
            if model_type != settings.backbone:
                raise ValueError(f"--model must be a stock {backbone_label(settings.backbone)} checkpoint for "
                                 f"--backbone {settings.backbone}, got model_type {model_type}")
        stock = load_stock(source, settings.device, settings.dtype, settings.backbone)
        if stock.config.model_type != settings.backbone:
            raise ValueError(f"--model must be a stock {backbone_label(settings.backbone)} checkpoint, got model_type "
                             f"{stock.config.model_type}")
        qtsplus = qtsplus_from_stock(stock, settings.seed)
        share_stock_tensors(qtsplus, stock)
        models = {"stock": stock, "qtsplus_predicted": qtsplus, "qtsplus_fixed": qtsplus}
        warm_up = on_device(
            bench_prompt(stock.config, 2, settings.resolution, settings.question_tokens, settings.seed),
            settings.device, settings.dtype,
        )
        for variant in VARIANTS:  # one short run of each code path first, not recorded
            timed_run(models[variant], warm_up, variant, settings)
        rows = []
        for frames in settings.frames:
            inputs = on_device(
                bench_prompt(stock.config, frames, settings.resolution, settings.question_tokens, settings.seed),
                settings.device, settings.dtype,
            )
            samples = {variant: [] for variant in VARIANTS}
            # One step per timed run and per variant's memory measurement; closed before `log` prints the row.
            with transformers.utils.logging.tqdm(total=(settings.repeats + 1) * len(VARIANTS), unit="run",
                                                 desc=f"bench {frames} frames") as bar:
                for _ in range(settings.repeats):  # A/B/C/A/B/C: drifting machine load hits every variant alike
                    for variant in VARIANTS:
                        samples[variant].append(timed_run(models[variant], inputs, variant, settings))
                        bar.update()
                row = {"frames": frames,
                       "vision_tokens": int((inputs["input_ids"] == stock.config.video_token_id).sum())}
                for variant in VARIANTS:
                    row[variant] = median_row(samples[variant])
                    row[variant].update(
                        measure_peak_memory(source, models[variant], inputs, variant, frames, settings),
                        vision_output_bytes=vision_output_bytes(models[variant], inputs),
                    )
                    bar.update()
            for variant in VARIANTS[1:]:
                row[variant]["selector_compaction_share"] = (
                    row[variant]["selector_compaction_seconds"] / row[variant]["total_seconds"]
                )
            row["ratio_to_stock"] = {variant: ratios(row[variant], row["stock"]) for variant in VARIANTS[1:]}
            text_tokens = row["stock"]["prefill_length"] - row["vision_tokens"]
            if "qtsplus_query_mask" in inputs:  # Qwen3-VL: the question; else every token outside the vision span
                question_tokens, extra = int(inputs["qtsplus_query_mask"].sum()), {
                    "frame_patches": int(inputs["video_grid_thw"][0, 1:].prod())
                }
            else:
                question_tokens, extra = text_tokens - 2, {}
            row["analytic_qtsplus_fixed"] = analytic_costs(
                stock.config, row["vision_tokens"], row["qtsplus_fixed"]["kept_tokens"], text_tokens,
                question_tokens=question_tokens, bytes_per_value=torch.finfo(DTYPES[settings.dtype]).bits // 8,
                **extra,
            )
            log(summary_line(row))
            rows.append(row)
    return {
        "settings": {**asdict(settings), "frames": list(settings.frames), "model": model_dir,
                     "config": None if model_dir else config_name, "fixed_keep_ratio": FIXED_KEEP_RATIO},
        "environment": environment(settings.device),
        "memory_method": "cuda max_memory_allocated" if settings.device.startswith("cuda") else (
            "peak RSS (VmHWM after clear_refs) minus RSS before the run, one fresh forkserver process per measurement"
        ),
        "allocated_memory_method": "cuda max_memory_allocated" if settings.device.startswith("cuda") else (
            "peak of live CPU tensor bytes (torch.profiler profile_memory events, summed in time order) above the "
            "start, on the warm model in the bench process"
        ),
        "rows": rows,
    }


def summary_line(row: dict) -> str:
    fixed, stock = row["qtsplus_fixed"], row["stock"]
    ratio = row["ratio_to_stock"]["qtsplus_fixed"]
    return (
        f"{row['frames']:>4} frames, {row['vision_tokens']} vision tokens: TTFT stock "
        f"{stock['time_to_first_token_seconds']:.2f}s, QTSplus@{FIXED_KEEP_RATIO} {fixed['time_to_first_token_seconds']:.2f}s "
        f"(x{ratio['time_to_first_token_seconds']:.2f}), peak memory x{ratio['peak_memory_bytes']:.2f} "
        f"(allocated x{ratio['allocated_peak_memory_bytes']:.2f}), "
        f"predicted keeps {row['qtsplus_predicted']['kept_tokens']}"
    )


def save_plot(report: dict, path: str) -> None:
    """Tokens and latency against frames for the three variants, written to a temporary file then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    frames = [row["frames"] for row in report["rows"]]
    figure, (tokens_axis, latency_axis) = pyplot.subplots(1, 2, figsize=(11, 4.2))
    tokens_axis.plot(frames, [row["vision_tokens"] for row in report["rows"]], "k:", marker="o", label="vision tokens M")
    for variant, style in zip(VARIANTS, ("C0", "C1", "C2")):
        label = variant.replace("qtsplus_fixed", f"qtsplus keep {FIXED_KEEP_RATIO}").replace("_", " ")
        tokens_axis.plot(frames, [row[variant]["prefill_length"] for row in report["rows"]], style, marker="o",
                         label=f"{label}: LM prefill")
        latency_axis.plot(frames, [row[variant]["time_to_first_token_seconds"] for row in report["rows"]], style,
                          marker="o", label=f"{label}: first token")
        latency_axis.plot(frames, [row[variant]["total_seconds"] for row in report["rows"]], style, linestyle="--",
                          marker="x", label=f"{label}: {report['settings']['new_tokens']} tokens")
    for axis, ylabel in ((tokens_axis, "tokens"), (latency_axis, "seconds (median)")):
        axis.set_xlabel("frames")
        axis.set_ylabel(ylabel)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    environment_line = report["environment"]["device_name"]
    backbone = backbone_label(report["settings"].get("backbone", DEFAULT_BACKBONE))
    figure.suptitle(f"stock {backbone} vs QTSplus, same weights ({environment_line})", fontsize=10)
    figure.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".png", delete=False) as handle:
        temporary = handle.name
    try:
        figure.savefig(temporary, format="png", dpi=110)
        os.replace(temporary, path)
    finally:
        pyplot.close(figure)
        if os.path.exists(temporary):
            os.remove(temporary)


# ----------------------------------------------------------------------------------------------------------------------
# Selector profile (docs/performance.md): the selector alone at long-video sizes, random weights
# ----------------------------------------------------------------------------------------------------------------------


RELEASED_SELECTOR_FILE = "src/model/qts_plus_tokenizer/qts_plus.py"  # in a checkout of github.com/Siyou-Li/QTSplus


def load_released_selector_module(path: str):
    """The released selector's module (`QTSplus`), imported at run time from a checkout of the released repository
    (its root, or the file `RELEASED_SELECTOR_FILE` itself); nothing of it is copied into this package."""
    import importlib.util

    file = path if os.path.isfile(path) else os.path.join(path, RELEASED_SELECTOR_FILE)
    if not os.path.isfile(file):
        raise ValueError(f"no released selector at {path} (expected {RELEASED_SELECTOR_FILE} in the checkout)")
    name = "qtsplus_released_selector"
    loaded = sys.modules.get(name)
    if loaded is not None and loaded.__file__ == file:
        return loaded
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class _FixedReleasedBudget(torch.nn.Module):
    """Stands in for the released budget head: the same ρ for every video, so that it keeps ceil(ρM) = n tokens."""

    def __init__(self, rho: float) -> None:
        super().__init__()
        self.rho = rho

    def forward(self, sq, log_m, r_max, entropy):
        return torch.full_like(r_max, self.rho)


@torch.no_grad()
def profile_selector(num_tokens: int = 50_000, hidden_size: int = 2048, question_tokens: int = 32,
                     keep_ratio: float | None = FIXED_KEEP_RATIO, repeats: int = 3, seed: int = 0,
                     heads: int = 16, kv_heads: int = 2, kept_tokens: int | None = None,
                     released: str | None = None, peak_memory: bool = True) -> dict:
    """Median seconds of scoring, budget + top-n, and the whole selector on one video of `num_tokens` tokens, with
    a selector of width `hidden_size` and `heads` / `kv_heads` attention heads (default: 3B's 16 / 2; one scoring
    and one re-encode layer, float32, eval, no grad), and the peak RSS delta of one call.

    `kept_tokens` fixes n (instead of `keep_ratio`; None: the predicted budget). `released`: a checkout of the
    released code (see `load_released_selector_module`); its selector, built at the same width and heads with
    ρ fixed so that it keeps the same n, is timed in turn with this one (released, ours, released, ours, ...), and
    `ratio_to_released` = our median / its median.
    Run it in a fresh process (`python -c`): the first call's peak is measured after a small warm-up.
    """
    from .selector_qtsplus import QTSplusSelector, budget_to_token_count, top_n_mask
    from .tiny import tiny_qtsplus_config

    if kept_tokens is not None:
        if not 1 <= kept_tokens <= num_tokens:
            raise ValueError(f"kept_tokens must be in [1, {num_tokens}], got {kept_tokens}")
        keep_ratio = kept_tokens / num_tokens
    torch.manual_seed(seed)
    head_dim = hidden_size // heads
    config = tiny_qtsplus_config(text_config=dict(
        vocab_size=320, hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=1,
        num_attention_heads=heads, num_key_value_heads=kv_heads, bos_token_id=0, eos_token_id=2, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                         "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]},
    ))
    selector = QTSplusSelector(config).eval()
    video = torch.randn(1, num_tokens, hidden_size)
    video_mask = torch.ones(1, num_tokens, dtype=torch.bool)
    query = torch.randn(1, question_tokens, hidden_size)
    query_mask = torch.ones(1, question_tokens, dtype=torch.bool)
    seconds = (torch.arange(num_tokens) // 256).float()[None]
    inputs = (video, video_mask, query, query_mask, seconds, keep_ratio)
    selector(*(tensor[:, :512] if tensor.dim() > 1 else tensor for tensor in inputs[:5]), keep_ratio)  # warm-up
    peak = _peak_rss_delta(lambda: selector(*inputs)) if peak_memory else None

    def seconds_of(run) -> float:
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    scores = selector.score(video, video_mask, query, query_mask)
    counts = budget_to_token_count(
        selector.predict_rho(query, query_mask, scores, video_mask) if keep_ratio is None
        else torch.tensor([keep_ratio]), video_mask.sum(-1), config.qtsplus_max_tokens if keep_ratio is None else None,
    )
    kept = int(counts[0])
    if kept_tokens is not None and kept != kept_tokens:
        raise RuntimeError(f"the selector keeps {kept} tokens, not kept_tokens={kept_tokens}")
    report = {
        "num_tokens": num_tokens, "hidden_size": hidden_size, "heads": heads, "kv_heads": kv_heads,
        "question_tokens": question_tokens, "kept_tokens": kept, "threads": torch.get_num_threads(),
        "scoring_seconds": seconds_of(lambda: selector.score(video, video_mask, query, query_mask)),
        "top_n_seconds": seconds_of(lambda: top_n_mask(scores, counts, video_mask)),
    }
    if released is None:
        report["selector_seconds"] = seconds_of(lambda: selector(*inputs))
    else:
        module = load_released_selector_module(released)
        theirs = module.QTSplus(d_model=hidden_size, n_heads=heads, n_kv_heads=kv_heads, nmax=num_tokens).eval()
        theirs.budget = _FixedReleasedBudget((kept - 0.5) / num_tokens)  # ceil(ρM) = n, whatever the rounding
        if len(theirs(video, query, mode="infer")["indices"][0]) != kept:  # also its warm-up
            raise RuntimeError("the released selector did not keep the same number of tokens")
        samples = {"released": [], "ours": []}
        for _ in range(repeats):  # alternating: drifting machine load hits both alike
            runs = (("released", lambda: theirs(video, query, mode="infer")), ("ours", lambda: selector(*inputs)))
            for name, run in runs:
                start = time.perf_counter()
                run()
                samples[name].append(time.perf_counter() - start)
        report["selector_seconds"] = statistics.median(samples["ours"])
        report["released_selector_seconds"] = statistics.median(samples["released"])
        report["ratio_to_released"] = report["selector_seconds"] / report["released_selector_seconds"]
        report["samples"] = samples
        report["released"] = os.path.abspath(released)
    report["peak_rss_delta_bytes"] = peak
    report["video_features_bytes"] = video.numel() * video.element_size()
    return report


# ----------------------------------------------------------------------------------------------------------------------
# the pipeline, batched
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def pipeline_throughput(batch_sizes: Sequence[int], videos: int = 16, repeats: int = 3, model_dir: str | None = None,
                        seed: int = 0, max_new_tokens: int = 4) -> dict:
    """Videos per second of `pipeline("video-text-to-text")` at each batch size, on the same `videos` synthetic
    32-second videos and questions (the bundled default model unless `model_dir`): medians of `repeats` passes,
    the batch sizes alternating within each repeat. Raises if a batch size changes any answer or selection."""
    from transformers import AutoModel, AutoProcessor, pipeline

    from .default_model import HELD_OUT_SEED_START, default_model_path, synthetic_options
    from .synthetic import generate_sample

    folder = model_dir or default_model_path()
    model = AutoModel.from_pretrained(folder).eval()
    pipe = pipeline("video-text-to-text", model=model, processor=AutoProcessor.from_pretrained(folder))
    samples = [generate_sample(HELD_OUT_SEED_START + seed + index, **synthetic_options()) for index in range(videos)]
    inputs = [{"video": sample.frames, "text": sample.question} for sample in samples]
    settings = {"max_new_tokens": max_new_tokens, "do_sample": False}
    pipe(inputs[:2], batch_size=2, **settings)  # warm-up
    seconds = {size: [] for size in batch_sizes}
    results = {}
    for _ in range(repeats):
        for size in batch_sizes:
            start = time.perf_counter()
            results[size] = pipe(inputs, batch_size=size, **settings)
            seconds[size].append(time.perf_counter() - start)
    reference = [(r["generated_text"], r["qtsplus"]["kept"]) for r in results[batch_sizes[0]]]
    for size in batch_sizes[1:]:
        if [(r["generated_text"], r["qtsplus"]["kept"]) for r in results[size]] != reference:
            raise RuntimeError(f"batch size {size} changed an answer or a selection")
    rows = [{"batch_size": size, "seconds": statistics.median(seconds[size]),
             "videos_per_second": videos / statistics.median(seconds[size])} for size in batch_sizes]
    for row in rows:
        row["speedup"] = row["videos_per_second"] / rows[0]["videos_per_second"]
    return {"videos": videos, "repeats": repeats, "model": folder, "threads": torch.get_num_threads(), "rows": rows}
