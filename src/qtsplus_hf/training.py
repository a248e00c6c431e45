# Copyright 2026 The qtsplus-hf authors. Licensed under the Apache License, Version 2.0.
"""Fine-tuning QTSplus with `transformers.Trainer`: selector-only, PEFT LoRA, or full.

The model's loss already holds the weighted auxiliary terms; `QTSplusTrainer` only adds their logging. Multi-GPU
runs are the Trainer's own (`torchrun` / `accelerate launch` around `qtsplus train`); parameters that never get a
gradient are frozen, so DDP needs no `find_unused_parameters`.
"""

import logging
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from transformers import PreTrainedModel, ProcessorMixin, Trainer, TrainingArguments
from transformers.utils import logging as transformers_logging

from .selector_qtsplus import RECIPES
from .data import VideoQACollator, VideoQAData, load_video_qa, normalize_row
from .hub import check_output_folder, save_checkpoint, staged_output_folder


MODES = ("selector", "lora", "full")
HALF_DTYPES = (torch.bfloat16, torch.float16)
# The language model's attention and MLP projections; anchored on `language_model` so the selector's own
# q/k/v/o projections (trained in full through `modules_to_save`) are not matched.
LORA_TARGET_MODULES = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
# Recipe fields that size the selector's weights: a trained checkpoint keeps its own.
LAYER_COUNT_FIELDS = ("qtsplus_num_scoring_layers", "qtsplus_num_reencode_layers")

logger = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    """Everything `qtsplus train` takes; `train(TrainOptions(...))` is the same run from Python."""

    model: str
    data: str
    output: str
    mode: str = "lora"
    video_root: str | None = None
    epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 1e-4
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    warmup_steps: float = 0.0  # an int: steps; a float in [0, 1): share of the steps
    weight_decay: float = 0.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    gradient_checkpointing: bool = False
    bf16: bool = False
    fps: float | None = None
    max_frames: int | None = None
    keep_ratio: float | None = None  # None: the predicted budget; a float in (0, 1]: that share of every video
    logging_steps: int = 10
    seed: int = 0
    merge: bool = False
    # Training signals for the selector (None: the checkpoint's own `qtsplus_*` setting, 0 unless trained with it).
    grounding_weight: float | None = None  # qtsplus_lambda_grounding: rows with evidence_seconds / evidence_boxes
    distill_weight: float | None = None  # qtsplus_lambda_distill: the LM's attention over every token as teacher
    explore_ratio: float | None = None  # qtsplus_explore_ratio: share of dropped tokens kept at random
    # "released": the released QTSplus-3B training settings (`RECIPES`): τ, the λs and n_max on any checkpoint; the
    # layer counts too when a stock Qwen2.5-VL is converted (with the released initialisation).
    recipe: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("epochs", "learning_rate", "batch_size", "gradient_accumulation_steps", "logging_steps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.keep_ratio is not None and not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.merge and self.mode != "lora":
            raise ValueError("merge applies to mode 'lora' only (the other modes write a full checkpoint already)")
        for name in ("grounding_weight", "distill_weight"):
            if getattr(self, name) is not None and not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.explore_ratio is not None and not 0.0 <= self.explore_ratio < 1.0:
            raise ValueError(f"explore_ratio must be in [0, 1), got {self.explore_ratio}")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")

    def selector_signals(self) -> dict[str, float]:
        """The `qtsplus_*` config fields these options set (those given)."""
        fields_of = {"grounding_weight": "qtsplus_lambda_grounding", "distill_weight": "qtsplus_lambda_distill",
                     "explore_ratio": "qtsplus_explore_ratio"}
        return {field: getattr(self, name) for name, field in fields_of.items() if getattr(self, name) is not None}


def load_model_and_processor(path: str, recipe: str | None = None) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A QTSplus checkpoint of any backbone (`qtsplus_hf.BACKBONES`), or a stock one converted on the fly
    (`from_stock`, with `recipe`), and its processor. `recipe` on a QTSplus checkpoint sets the recipe's settings
    that need no new weights."""
    from transformers import AutoConfig, AutoProcessor

    from . import BACKBONES

    if not os.path.isdir(path):
        raise ValueError(f"model folder not found: {path}")
    config = AutoConfig.from_pretrained(path)
    backbone = next((classes for name, classes in BACKBONES.items()
                     if isinstance(config, classes[0]) or config.model_type == name), None)
    if backbone is None:
        raise ValueError(f"{path} holds a {config.model_type!r} model, not QTSplus or one of its backbones "
                         f"({', '.join(BACKBONES)})")
    config_class, model_class, processor_class = backbone
    processor = AutoProcessor.from_pretrained(path)
    if not isinstance(processor, processor_class):  # the stock processor: same parts, plus the mask
        processor = processor_class(
            image_processor=processor.image_processor, video_processor=processor.video_processor,
            tokenizer=processor.tokenizer, chat_template=processor.chat_template,
        )
    if not isinstance(config, config_class):
        model = model_class.from_stock(path, recipe=recipe, **processor.chat_turn_settings())
        return model, processor
    model = model_class.from_pretrained(path)
    if recipe is not None:
        settings = RECIPES[recipe]
        for field in LAYER_COUNT_FIELDS:
            if settings[field] != getattr(model.config, field):
                logger.warning("recipe %s: %s stays %s (the checkpoint's weights fix it; the recipe has %s)",
                               recipe, field, getattr(model.config, field), settings[field])
        for field, value in settings.items():
            if field not in LAYER_COUNT_FIELDS:
                setattr(model.config, field, value)
    return model, processor


def parameters_without_gradient(model: torch.nn.Module, keep_ratio: float | None = None) -> list[str]:
    """Names of selector parameters no loss reaches: the last scoring layer contributes only its attention
    probabilities (`q_norm`, `kv_norm`, `q_proj`, `k_proj`), so its value/output projections and feed-forward
    stay unused (they exist to hold the released checkpoints' weights); at a fixed `keep_ratio` the budget head
    is unused too. Freezing them lets DDP run without `find_unused_parameters`."""
    last = None
    for name, _ in model.named_modules():
        match = re.search(r"(.*scoring_layers)\.(\d+)$", name)
        if match:
            last = max(last or 0, int(match.group(2)))
    patterns = [rf"scoring_layers\.{last}\.(v_proj|o_proj|ffn_norm|ffn)\."] if last is not None else []
    if keep_ratio is not None:
        patterns.append(r"qtsplus\.(modules_to_save\.default\.)?budget\.")
    if not patterns:
        return []
    unused = re.compile("|".join(patterns))
    return [name for name, _ in model.named_parameters() if unused.search(name)]


def prepare_model_for_mode(model, options: TrainOptions):
    """Freeze and wrap the model for the training mode; returns the model to train (a `PeftModel` for lora)."""
    if options.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
            target_modules=LORA_TARGET_MODULES, modules_to_save=["qtsplus"],
        )
        model = get_peft_model(model, lora)
    else:
        model.requires_grad_(options.mode == "full")
        model.qtsplus.requires_grad_(True)
    unused = set(parameters_without_gradient(model, options.keep_ratio))
    for name, parameter in model.named_parameters():
        if name in unused:
            parameter.requires_grad_(False)
        elif parameter.requires_grad and parameter.dtype in HALF_DTYPES:
            # Trained weights stay in float32 (bf16 rounds small optimizer steps away); mixed precision is autocast's.
            parameter.data = parameter.data.float()
    return model


class QTSplusTrainer(Trainer):
    """`Trainer` that also logs the LM loss, each auxiliary loss, mean ρ and mean kept tokens per video."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            self._record(outputs)
        return (loss, outputs) if return_outputs else loss

    def _record(self, outputs) -> None:
        for name in ("lm_loss", "flops_loss", "kv_loss", "smooth_loss", "grounding_loss", "distill_loss"):
            value = getattr(outputs, name, None)
            if value is not None:
                self._sums[name] += float(value.detach())
                self._counts[name] += 1
        selection = getattr(outputs, "qtsplus", None)
        if selection is not None:
            self._sums["rho"] += float(selection.rho.detach().float().mean())
            self._counts["rho"] += 1
            self._sums["kept_tokens"] += sum(selection.num_kept) / len(selection.num_kept)
            self._counts["kept_tokens"] += 1

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log: add the means since the last one
            for name, total in self._sums.items():
                logs[name] = round(total / self._counts[name], 6)
            self._sums.clear()
            self._counts.clear()
        super().log(logs, *args, **kwargs)


def _checkpointing_arguments(enabled: bool) -> dict:
    """Activation checkpointing without a reentrant pass; transformers 5.2x renamed `gradient_checkpointing*`."""
    if not enabled:
        return {}
    names = {field.name for field in fields(TrainingArguments)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {prefix: True, f"{prefix}_kwargs": {"use_reentrant": False}}


def training_arguments(
    options: TrainOptions, output_dir: str, half_dtype: torch.dtype | None = None
) -> TrainingArguments:
    """`half_dtype`: the checkpoint's bf16 / fp16, whose frozen weights then need autocast of the same kind."""
    bf16 = options.bf16 or half_dtype == torch.bfloat16
    return TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=options.epochs,
        max_steps=options.max_steps,
        learning_rate=options.learning_rate,
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        warmup_steps=options.warmup_steps,
        weight_decay=options.weight_decay,
        **_checkpointing_arguments(options.gradient_checkpointing),
        bf16=bf16,
        fp16=half_dtype == torch.float16,
        # Without an accelerator, say so: the Trainer then runs DDP over CPU processes (gloo) under torchrun and
        # accepts bf16 (CPU autocast); otherwise every process would train alone.
        use_cpu=not torch.accelerator.is_available(),
        logging_steps=options.logging_steps,
        # A NaN or infinite loss must show in the logs; the Trainer's default filter would log it as a smaller number.
        logging_nan_inf_filter=False,
        # The step bar follows transformers' switch (`disable_progress_bar()`, `HF_HUB_DISABLE_PROGRESS_BARS=1`,
        # `qtsplus train --no-progress`), which the Trainer's own bar ignores; None: the Trainer's default.
        disable_tqdm=None if transformers_logging.is_progress_bar_enabled() else True,
        save_strategy="no",
        report_to="none",
        seed=options.seed,
        remove_unused_columns=False,  # rows go to the collator as they are: it decodes the videos
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


class NormalizedRows(torch.utils.data.Dataset):
    """A map-style dataset of raw rows, normalised when read (`qtsplus_hf.data.normalize_row`).

    For rows made on the fly (e.g. synthetic videos generated from the index): holding every video in memory at
    once is what a list would need. A bad row raises its ValueError when read instead of being skipped up front.
    """

    def __init__(self, rows: torch.utils.data.Dataset, video_root: str | None = None) -> None:
        if not hasattr(rows, "__len__"):
            raise ValueError("a dataset of rows must have a length (a map-style torch Dataset)")
        self.rows, self.video_root = rows, video_root

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return normalize_row(self.rows[index], self.video_root)


def build_trainer(
    model: PreTrainedModel, processor: ProcessorMixin, rows: Sequence[dict] | torch.utils.data.Dataset, options: TrainOptions,
    output_dir: str | None = None, half_dtype: torch.dtype | None = None,
) -> QTSplusTrainer:
    """The Trainer for normalised rows (see `qtsplus_hf.data.normalize_row`), a list or a `NormalizedRows`."""
    collator = VideoQACollator(
        processor, fps=options.fps, max_frames=options.max_frames, keep_ratio=options.keep_ratio
    )
    arguments = training_arguments(options, output_dir or options.output, half_dtype)
    dataset = rows if isinstance(rows, torch.utils.data.Dataset) else list(rows)
    return QTSplusTrainer(model=model, args=arguments, train_dataset=dataset, data_collator=collator)


def save_trained(model: PreTrainedModel, processor: ProcessorMixin, options: TrainOptions, directory: str) -> None:
    """Write the result into `directory`: a full checkpoint (selector / full modes, or lora with `merge`) or a LoRA
    adapter. With `merge`, the folder holds the merged checkpoint and `adapter/` the adapter it came from."""
    if options.mode != "lora":
        save_checkpoint(model, processor, directory)
        return
    adapter_dir = os.path.join(directory, "adapter") if options.merge else directory
    model.save_pretrained(adapter_dir)
    processor.save_pretrained(adapter_dir)
    if options.merge:
        save_checkpoint(model.merge_and_unload(), processor, directory)


@dataclass
class TrainResult:
    output: str
    train_rows: int
    skipped_rows: int
    log_history: list[dict]  # the Trainer's, with lm_loss, flops_loss, kv_loss, smooth_loss, rho, kept_tokens


def train(options: TrainOptions, rows: Sequence[dict] | torch.utils.data.Dataset | None = None) -> TrainResult:
    """Fine-tune `options.model` on `options.data` (or on `rows` given directly, e.g. frames in memory).

    `rows` may also be a map-style `torch.utils.data.Dataset` of raw rows, read lazily (videos generated or decoded
    per item); its rows are normalised as they are read, not checked up front.
    Everything is written into a staging folder next to `options.output` and moved into place at the end, so a
    failed run leaves no half-written output. Under torchrun / accelerate every process trains and the main process
    alone writes the result.
    """
    check_output_folder(options.output)
    model, processor = load_model_and_processor(options.model, options.recipe)
    if isinstance(rows, torch.utils.data.Dataset) and not isinstance(rows, (list, tuple)):
        lazy = NormalizedRows(rows, options.video_root)
        data = VideoQAData(rows=lazy, skipped=[], total=len(lazy))
    else:
        data = load_video_qa(options.data if rows is None else rows, options.video_root)
    for field, value in options.selector_signals().items():
        setattr(model.config, field, value)
    half_dtype = model.dtype if model.dtype in HALF_DTYPES else None
    torch.manual_seed(options.seed)
    model = prepare_model_for_mode(model, options)
    trainer = None
    with staged_output_folder(options.output, publish=lambda: trainer.is_world_process_zero()) as staging:
        trainer = build_trainer(model, processor, data.rows, options, output_dir=staging, half_dtype=half_dtype)
        trainer.train()
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            save_trained(trainer.model, processor, options, staging)
    return TrainResult(options.output, len(data.rows), len(data.skipped), trainer.state.log_history)


def options_from_namespace(namespace) -> TrainOptions:
    """`TrainOptions` from parsed command-line arguments of the same names."""
    return TrainOptions(**{field.name: getattr(namespace, field.name) for field in fields(TrainOptions)
                           if hasattr(namespace, field.name)})


__all__ = [
    "LORA_TARGET_MODULES", "MODES", "NormalizedRows", "QTSplusTrainer", "TrainOptions", "TrainResult", "build_trainer",
    "load_model_and_processor", "parameters_without_gradient", "prepare_model_for_mode", "save_trained", "train",
]
