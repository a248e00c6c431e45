"""Tiny random Qwen2.5-VL / QTSplus configurations and hand-built video prompts.

Used by the tests and by the offline quick-start command: nothing here downloads anything.
"""

from collections.abc import Sequence

import torch

from .configuration_qtsplus import QTSplusConfig
from .selector_qtsplus import chat_turn_settings


SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
)
PAD_ID, IM_START_ID, IM_END_ID, VISION_START_ID, VISION_END_ID, IMAGE_ID, VIDEO_ID = range(len(SPECIAL_TOKENS))
VOCAB_SIZE = 320
TEXT_VOCAB = range(len(SPECIAL_TOKENS), 300)
# The Qwen2-VL chat format: a default system turn, `<|im_start|>role\n...<|im_end|>\n` turns, one vision span per
# image or video entry.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = (
    "You are a helpful assistant. What colour is the circle? Which object appears first? At which second does the "
    "square appear? How many times does the triangle appear? Describe the video. The answer is red green blue "
    "yellow purple orange circle square triangle star 0 1 2 3 4 5 6 7 8 9 seconds times first before after"
)


def tiny_config_dict(**overrides) -> dict:
    """Keyword arguments of a ~0.2M-parameter Qwen2.5-VL: vision depth 2 / width 32, LM 2 layers / width 64, GQA."""
    config = dict(
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=4,
            temporal_patch_size=2,
            spatial_merge_size=2,
            window_size=16,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
        ),
        text_config=dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=PAD_ID,
            eos_token_id=IM_END_ID,
            pad_token_id=PAD_ID,
        ),
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )
    config.update(overrides)
    return config


def tiny_qtsplus_config(**overrides) -> QTSplusConfig:
    """A tiny `QTSplusConfig` (eager attention, so CPU results are exact and deterministic)."""
    config = QTSplusConfig(**tiny_config_dict(**overrides))
    config._attn_implementation = "eager"
    return config


def padded_rows(rows: list[list[int]], query_rows: list[list[bool]], padding_side: str) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask` and `qtsplus_query_mask` `[B, max len]` of token rows, padded on `padding_side`."""
    length = max(len(ids) for ids in rows)
    batch = {name: torch.zeros(len(rows), length, dtype=torch.long) for name in ("input_ids", "attention_mask")}
    batch["qtsplus_query_mask"] = torch.zeros(len(rows), length, dtype=torch.bool)
    for index, (ids, query) in enumerate(zip(rows, query_rows)):
        span = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
        batch["input_ids"][index, span] = torch.tensor(ids)
        batch["attention_mask"][index, span] = 1
        batch["qtsplus_query_mask"][index, span] = torch.tensor(query)
    return batch


def video_prompt_batch(
    videos_per_sample: Sequence[Sequence[tuple[int, int, int]]],
    question_lengths: Sequence[int],
    config: QTSplusConfig,
    padding_side: str = "left",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Model inputs shaped like a Qwen2.5-VL processor's, built by hand.

    Each sample is `[system text] (<vision_start> <video_pad>*M <vision_end>)* [question]`; `videos_per_sample[b]`
    lists the patch grids (t, h, w) of sample b's videos (h and w even). Returns input_ids, attention_mask,
    mm_token_type_ids, pixel_values_videos, video_grid_thw, second_per_grid_ts and qtsplus_query_mask.
    """
    generator = torch.Generator().manual_seed(seed)
    merge = config.vision_config.spatial_merge_size
    rows, query_rows, grids = [], [], []
    for grids_of_sample, question_length in zip(videos_per_sample, question_lengths):
        ids = torch.randint(TEXT_VOCAB.start, TEXT_VOCAB.stop, (3,), generator=generator).tolist()
        for t, h, w in grids_of_sample:
            ids += [VISION_START_ID] + [VIDEO_ID] * (t * h * w // merge**2) + [VISION_END_ID]
            grids.append((t, h, w))
        query_start = len(ids)
        ids += torch.randint(TEXT_VOCAB.start, TEXT_VOCAB.stop, (question_length,), generator=generator).tolist()
        rows.append(ids)
        query_rows.append([False] * query_start + [True] * question_length)

    batch = padded_rows(rows, query_rows, padding_side)
    batch["mm_token_type_ids"] = 2 * (batch["input_ids"] == VIDEO_ID).int()

    vision = config.vision_config
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    num_patches = sum(t * h * w for t, h, w in grids)
    batch["pixel_values_videos"] = torch.randn(num_patches, patch_dim, generator=generator)
    batch["video_grid_thw"] = torch.tensor(grids, dtype=torch.long)
    batch["second_per_grid_ts"] = torch.full((len(grids),), 1.0)
    return batch


def byte_level_tokenizer(corpus: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer trained here on `corpus` (deterministic, offline) with Qwen's special tokens and
    the chat template of this module; every byte is in its alphabet, so any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_vllm_config(**overrides) -> QTSplusConfig:
    """The tiny config at widths vLLM's CPU build serves: LM width 128 with 4 heads of 32 (its CPU attention has
    kernels for head dims 32, 64, 80, ..., not the tiny model's 16), the tiny tokenizer's chat ids, SDPA."""
    base = tiny_config_dict()
    text_config = dict(
        base["text_config"], hidden_size=128, intermediate_size=256,
        # mrope_section sums to head_dim / 2 = 16
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
    )
    settings = dict(
        text_config=text_config, vision_config=dict(base["vision_config"], out_hidden_size=128),
        **chat_turn_settings(tiny_tokenizer()),
    )
    config = QTSplusConfig(**tiny_config_dict(**{**settings, **overrides}))
    config._attn_implementation = "sdpa"
    return config


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences, with Qwen's specials (fits `VOCAB_SIZE`)."""
    return byte_level_tokenizer([CORPUS] * 4, VOCAB_SIZE - 20)


def tiny_processor(min_pixels: int = 16 * 16, max_pixels: int = 32 * 32, fps: float = 2.0, tokenizer=None):
    """A `QTSplusProcessor` for the tiny config: patch 4, merge 2 (pixel factor 8), small frames; `tokenizer`
    defaults to `tiny_tokenizer()`."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from .processing_qtsplus import QTSplusProcessor

    vision = dict(
        patch_size=4, temporal_patch_size=2, merge_size=2,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )
    return QTSplusProcessor(
        image_processor=Qwen2VLImageProcessor(**vision),
        video_processor=Qwen2VLVideoProcessor(**vision, fps=fps, min_frames=2, max_frames=768),
        tokenizer=tokenizer if tokenizer is not None else tiny_tokenizer(),
        chat_template=CHAT_TEMPLATE,
    )


# --- Qwen3-VL -------------------------------------------------------------------------------------------------------

# Qwen3-VL's chat format differs from Qwen2-VL's in one way that changes the tokens: no default system turn (the
# system turn appears only when the messages start with one). Each video entry still renders as
# `<|vision_start|><|video_pad|><|vision_end|>`; the processor then replaces only the `<|video_pad|>`, with one
# `<{t:.1f} seconds><|vision_start|><|video_pad|>*M<|vision_end|>` group per temporal patch, so the template's
# `<|vision_start|>` ... `<|vision_end|>` stays around the groups.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen3_vl_config_dict(**overrides) -> dict:
    """Keyword arguments of a tiny random `transformers.Qwen3VLConfig`: vision depth 2 / width 32 with DeepStack taps
    after both blocks, LM 2 layers / width 64 (4 heads of 16, 2 KV heads), interleaved M-RoPE. Builds and runs on
    transformers 5.17 and 5.24 (both read `rope_parameters`)."""
    config = dict(
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=4,
            temporal_patch_size=2,
            spatial_merge_size=2,
            # an 8x8 learned grid (must be a square), bilinearly resampled to each frame's patch grid
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        ),
        text_config=dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=4096,
            # mrope_section sums to head_dim // 2 = 8 frequencies; interleaved as T H W T H W T T (the real
            # [24, 20, 20] of head_dim 128 in miniature)
            rope_parameters={
                "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True,
            },
            bos_token_id=PAD_ID,
            eos_token_id=IM_END_ID,
            pad_token_id=PAD_ID,
        ),
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )
    config.update(overrides)
    return config


def tiny_qwen3_vl_processor(
    min_pixels: int = 16 * 16,
    max_pixels: int = 32 * 32,
    fps: float = 2.0,
    tokenizer=None,
    processor_class=None,
    video_max_pixels: int = 16 * 32 * 32,
):
    """A Qwen3-VL processor for `tiny_qwen3_vl_config_dict()`: patch 4, merge 2 (pixel factor 8), small frames.

    `min_pixels`/`max_pixels` bound an image's pixels; `video_max_pixels` bounds a whole clip's (Qwen3's video
    resize budgets frames x height x width, and `min_pixels` is its floor too). `tokenizer` defaults to
    `tiny_tokenizer()`, `processor_class` to `transformers.Qwen3VLProcessor`.
    """
    from transformers import Qwen2VLImageProcessor, Qwen3VLVideoProcessor

    if processor_class is None:
        from transformers import Qwen3VLProcessor as processor_class

    vision = dict(patch_size=4, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return processor_class(
        image_processor=Qwen2VLImageProcessor(**vision, size={"shortest_edge": min_pixels, "longest_edge": max_pixels}),
        video_processor=Qwen3VLVideoProcessor(
            **vision, size={"shortest_edge": min_pixels, "longest_edge": video_max_pixels},
            fps=fps, min_frames=2, max_frames=768, cap_pixels_per_frame=False,
        ),
        tokenizer=tokenizer if tokenizer is not None else tiny_tokenizer(),
        chat_template=QWEN3_CHAT_TEMPLATE,
    )


def qwen3_patch_seconds(num_patches: int, video_fps: float = 2.0, temporal_patch_size: int = 2) -> list[float]:
    """The time of each temporal patch of a clip whose frames are `0, 1, ...` at `video_fps`, computed as the
    Qwen3-VL processor does (mean of the first and last frame time of the patch; the text shows it with `:.1f`)."""
    times = [index / video_fps for index in range(num_patches * temporal_patch_size)]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def qwen3_video_prompt_batch(
    videos_per_sample: Sequence[Sequence],
    question_lengths: Sequence[int],
    config,
    padding_side: str = "left",
    seed: int = 0,
    tokenizer=None,
    video_fps: float = 2.0,
) -> dict[str, torch.Tensor]:
    """Model inputs laid out as the Qwen3-VL processor lays them out, built by hand.

    Each sample is `[system text] (visual)* [question]`; `videos_per_sample[b]` lists sample b's visual inputs in
    order: a patch grid `(t, h, w)` (h and w even) is a video, `("image", (1, h, w))` an image. A video renders as
    `<|vision_start|>` + per temporal patch `<{s:.1f} seconds><|vision_start|><|video_pad|>*(h*w/4)<|vision_end|>`
    + `<|vision_end|>` (the template's outer pair around the processor's groups), its frames taken as `0, 1, ...`
    at `video_fps`; an image as `<|vision_start|><|image_pad|>*(h*w/4)<|vision_end|>`. Vision tokens are the
    config's ids (so the layout also fits a real checkpoint's config); timestamp text is encoded with `tokenizer`
    (default `tiny_tokenizer()`).

    Returns input_ids, attention_mask, mm_token_type_ids (1 on image pads, 2 on video pads, 0 elsewhere,
    timestamps included), qtsplus_query_mask (the question tokens), qtsplus_patch_seconds (float
    `[sum of t over videos]`, each temporal patch's time, unrounded), pixel_values_videos and video_grid_thw (when
    there are videos), pixel_values and image_grid_thw (when there are images).
    """
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    generator = torch.Generator().manual_seed(seed)
    vision = config.vision_config
    merge, temporal = vision.spatial_merge_size, vision.temporal_patch_size
    start, end = config.vision_start_token_id, config.vision_end_token_id
    rows, query_rows, video_grids, image_grids, seconds = [], [], [], [], []
    timestamp_ids = {}
    for entries, question_length in zip(videos_per_sample, question_lengths):
        ids = torch.randint(TEXT_VOCAB.start, TEXT_VOCAB.stop, (3,), generator=generator).tolist()
        for entry in entries:
            if isinstance(entry[0], str):
                kind, (t, h, w) = entry
                if kind != "image":
                    raise ValueError(f"unknown visual entry {entry!r}")
                ids += [start] + [config.image_token_id] * (t * h * w // merge**2) + [end]
                image_grids.append((t, h, w))
                continue
            t, h, w = entry
            ids.append(start)
            for second in qwen3_patch_seconds(t, video_fps, temporal):
                text = f"<{second:.1f} seconds>"
                if text not in timestamp_ids:
                    timestamp_ids[text] = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += timestamp_ids[text] + [start] + [config.video_token_id] * (h * w // merge**2) + [end]
                seconds.append(second)
            ids.append(end)
            video_grids.append((t, h, w))
        query_start = len(ids)
        ids += torch.randint(TEXT_VOCAB.start, TEXT_VOCAB.stop, (question_length,), generator=generator).tolist()
        rows.append(ids)
        query_rows.append([False] * query_start + [True] * question_length)

    batch = padded_rows(rows, query_rows, padding_side)
    batch["mm_token_type_ids"] = (
        (batch["input_ids"] == config.image_token_id).int() + 2 * (batch["input_ids"] == config.video_token_id).int()
    )

    patch_dim = vision.in_channels * temporal * vision.patch_size**2
    if video_grids:
        num_patches = sum(t * h * w for t, h, w in video_grids)
        batch["pixel_values_videos"] = torch.randn(num_patches, patch_dim, generator=generator)
        batch["video_grid_thw"] = torch.tensor(video_grids, dtype=torch.long)
    batch["qtsplus_patch_seconds"] = torch.tensor(seconds, dtype=torch.float)
    if image_grids:
        num_patches = sum(t * h * w for t, h, w in image_grids)
        batch["pixel_values"] = torch.randn(num_patches, patch_dim, generator=generator)
        batch["image_grid_thw"] = torch.tensor(image_grids, dtype=torch.long)
    return batch
