"""Tiny random Qwen2.5-VL / QTSplus configurations and hand-built video prompts.

Used by the tests and by the offline quick-start command: nothing here downloads anything.
"""

from collections.abc import Sequence

import torch

from .configuration_qtsplus import QTSplusConfig


PAD_ID, IMAGE_ID, VIDEO_ID, VISION_START_ID, VISION_END_ID = 0, 120, 121, 122, 123
TEXT_VOCAB = range(1, 100)


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
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=1,
            eos_token_id=2,
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

    length = max(len(ids) for ids in rows)
    batch = {name: torch.zeros(len(rows), length, dtype=torch.long) for name in ("input_ids", "attention_mask")}
    batch["qtsplus_query_mask"] = torch.zeros(len(rows), length, dtype=torch.bool)
    for index, (ids, query) in enumerate(zip(rows, query_rows)):
        span = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
        batch["input_ids"][index, span] = torch.tensor(ids)
        batch["attention_mask"][index, span] = 1
        batch["qtsplus_query_mask"][index, span] = torch.tensor(query)
    batch["mm_token_type_ids"] = 2 * (batch["input_ids"] == VIDEO_ID).int()

    vision = config.vision_config
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    num_patches = sum(t * h * w for t, h, w in grids)
    batch["pixel_values_videos"] = torch.randn(num_patches, patch_dim, generator=generator)
    batch["video_grid_thw"] = torch.tensor(grids, dtype=torch.long)
    batch["second_per_grid_ts"] = torch.full((len(grids),), 1.0)
    return batch
