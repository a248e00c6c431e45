"""Issue 13: with `qtsplus_enabled=False`, and at `qtsplus_keep_ratio=1.0` after `from_qwen2_5_vl`, the model is the
stock Qwen2.5-VL in every layout a user hits: forward logits `torch.equal` (the same computation, in bf16 too) and
generated tokens equal.

Already covered elsewhere (not repeated here): left-padded video-only batches with one or two videos per row, forward
and greedy generate (test_equivalence.py); the right-padded training loss at keep 1.0 (test_equivalence.py); length
limits and prompt-aware logits processors at keep 1.0 (test_compaction.py); compacted positions of video-only
prompts (test_compaction.py).
"""

import functools

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from qtsplus_hf import QTSplusQwen2_5_VLForConditionalGeneration
from qtsplus_hf.tiny import IMAGE_ID, TEXT_VOCAB, VIDEO_ID, VISION_END_ID, VISION_START_ID, video_prompt_batch


STOCK_INPUT_NAMES = (
    "input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw", "pixel_values_videos",
    "video_grid_thw", "second_per_grid_ts",
)
MODES = ["disabled", "keep_all"]
NEW_TOKENS = 6


def stock_inputs(batch: dict) -> dict:
    """What a stock processor returns for images and videos (no qtsplus_query_mask)."""
    return {name: batch[name] for name in STOCK_INPUT_NAMES if name in batch}


def multimodal_batch(rows, config, padding_side: str = "left", seed: int = 0) -> dict[str, torch.Tensor]:
    """Processor-shaped inputs for rows of `("text", n)`, `("image", (h, w))`, `("video", (t, h, w))` items (patch
    grids, h and w even), each row `[3 text] items [4-token question]`; mm_token_type_ids 0 / 1 / 2 as the stock
    processor's."""
    generator = torch.Generator().manual_seed(seed)
    merge = config.vision_config.spatial_merge_size
    text = lambda n: torch.randint(TEXT_VOCAB.start, TEXT_VOCAB.stop, (n,), generator=generator).tolist()  # noqa: E731
    sequences, grids = [], {"image": [], "video": []}
    for row in rows:
        ids, types = text(3), [0] * 3
        for kind, size in row:
            if kind == "text":
                ids, types = ids + text(size), types + [0] * size
                continue
            grid = (1, *size) if kind == "image" else tuple(size)
            count = grid[0] * grid[1] * grid[2] // merge**2
            token, token_type = (IMAGE_ID, 1) if kind == "image" else (VIDEO_ID, 2)
            ids += [VISION_START_ID] + [token] * count + [VISION_END_ID]
            types += [0] + [token_type] * count + [0]
            grids[kind].append(grid)
        query = [False] * len(ids) + [True] * 4
        sequences.append((ids + text(4), types + [0] * 4, query))

    length = max(len(ids) for ids, _, _ in sequences)
    batch = {name: torch.zeros(len(rows), length, dtype=torch.long) for name in ("input_ids", "attention_mask")}
    batch["mm_token_type_ids"] = torch.zeros(len(rows), length, dtype=torch.int)
    batch["qtsplus_query_mask"] = torch.zeros(len(rows), length, dtype=torch.bool)
    for index, (ids, types, query) in enumerate(sequences):
        span = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
        batch["input_ids"][index, span] = torch.tensor(ids)
        batch["attention_mask"][index, span] = 1
        batch["mm_token_type_ids"][index, span] = torch.tensor(types, dtype=torch.int)
        batch["qtsplus_query_mask"][index, span] = torch.tensor(query)
    vision = config.vision_config
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    for kind, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        if grids[kind]:
            batch[pixels] = torch.randn(sum(t * h * w for t, h, w in grids[kind]), patch_dim, generator=generator)
            batch[f"{kind}_grid_thw"] = torch.tensor(grids[kind], dtype=torch.long)
    if grids["video"]:
        batch["second_per_grid_ts"] = torch.ones(len(grids["video"]))
    return batch


def image_and_video_batch(config, padding_side="left"):
    """Row 0: image, text, video; row 1: video, then image (so image positions follow a video's, and vice versa)."""
    rows = [[("image", (4, 4)), ("text", 2), ("video", (4, 4, 4))], [("video", (2, 4, 6)), ("image", (2, 4))]]
    return multimodal_batch(rows, config, padding_side)


LAYOUTS = {
    "images_only": lambda c: multimodal_batch(
        [[("image", (4, 4))], [("image", (2, 4)), ("text", 2), ("image", (4, 2))]], c
    ),
    "image_and_video": image_and_video_batch,
    "text_only_row_beside_video_rows": lambda c: video_prompt_batch([[(4, 4, 4)], [], [(2, 4, 6)]], [5, 7, 3], c),
    "right_padded": lambda c: video_prompt_batch([[(4, 4, 4)], [(2, 4, 6)]], [5, 3], c, padding_side="right"),
    "second_per_grid_ts": lambda c: dict(
        video_prompt_batch([[(4, 4, 4), (2, 4, 4)], [(2, 4, 6)]], [4, 6], c, seed=3),
        second_per_grid_ts=torch.tensor([0.5, 2.0, 1.5]),
    ),
}


def disabled_of(stock) -> QTSplusQwen2_5_VLForConditionalGeneration:
    """`qtsplus_enabled=False` on the stock weights, with a random selector: were it used, the outputs would change."""
    model = QTSplusQwen2_5_VLForConditionalGeneration.from_qwen2_5_vl(stock, qtsplus_enabled=False)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in model.qtsplus.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator).to(parameter.dtype) * 0.2)
    return model


@pytest.fixture(scope="module")
def disabled_model(stock_model):
    return disabled_of(stock_model)


def model_under_test(mode, disabled, converted):
    """(model, extra generate / forward kwargs) of a mode."""
    return (disabled, {}) if mode == "disabled" else (converted, {"qtsplus_keep_ratio": 1.0})


# -- layouts --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_forward_logits_equal_stock(stock_model, converted_model, disabled_model, config, layout, mode):
    batch = LAYOUTS[layout](config)
    model, extra = model_under_test(mode, disabled_model, converted_model)
    with torch.no_grad():
        expected = stock_model(**stock_inputs(batch)).logits
        got = model(**batch, **extra).logits
    assert torch.equal(got, expected), float((got - expected).abs().max())
    if layout == "second_per_grid_ts":  # a guard: the intervals do change stock's logits, so the layout tests them
        with torch.no_grad():
            at_one_second = stock_model(**stock_inputs(dict(batch, second_per_grid_ts=torch.ones(3)))).logits
        assert not torch.equal(at_one_second, expected)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_greedy_tokens_equal_stock(stock_model, converted_model, disabled_model, config, layout, mode):
    batch = LAYOUTS[layout](config)
    model, extra = model_under_test(mode, disabled_model, converted_model)
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = stock_model.generate(**stock_inputs(batch), **settings)
    assert torch.equal(model.generate(**batch, **extra, **settings), expected)


# -- generation strategies ------------------------------------------------------------------------------------------

STRATEGIES = {
    "beam_search": dict(do_sample=False, num_beams=3),
    "beam_search_num_return_sequences": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "sampling": dict(do_sample=True, top_k=0),
    "sampling_num_return_sequences": dict(do_sample=True, top_k=0, num_return_sequences=3),
    "use_cache_false": dict(do_sample=False, use_cache=False),
}
STRATEGY_BATCHES = {
    "video": lambda c: video_prompt_batch([[(4, 4, 4)], [(2, 4, 6)]], [5, 3], c),
    "images_only": LAYOUTS["images_only"],
}


# Beams and several sequences per prompt on the stock path (disabled, or no video) cover transformers >= 5.20's
# expansion of pre-encoded features (`mm_encoder_outputs`), which QTSplus's forward must name to receive.
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("batch_name", list(STRATEGY_BATCHES))
def test_generation_strategy_equals_stock(stock_model, converted_model, disabled_model, config, batch_name, strategy,
                                          mode):
    batch = STRATEGY_BATCHES[batch_name](config)
    model, extra = model_under_test(mode, disabled_model, converted_model)
    # The scores too: a sampled token survives small logit changes, so equal tokens alone would be a weak test.
    settings = dict(max_new_tokens=NEW_TOKENS, return_dict_in_generate=True, output_scores=True, **STRATEGIES[strategy])

    def run(generating_model, inputs, seed=7):
        torch.manual_seed(seed)  # same seed -> same draws; beams and greedy ignore it
        return generating_model.generate(**inputs, **settings)

    expected, got = run(stock_model, stock_inputs(batch)), run(model, {**batch, **extra})
    rows = len(batch["input_ids"]) * settings.get("num_return_sequences", 1)
    assert expected.sequences.shape == (rows, batch["input_ids"].shape[1] + NEW_TOKENS)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.scores) == len(expected.scores) == NEW_TOKENS
    if strategy == "use_cache_false" and mode == "keep_all" and "pixel_values_videos" in batch:
        # Not the same computation: generate forces use_cache=True when it starts from inputs_embeds (the compacted
        # prefill), while stock recomputes the whole sequence each step; stock's own cached and uncached scores
        # differ by ~1e-7. Features lost in a recomputation would move them by orders of magnitude more.
        for a, b in zip(got.scores, expected.scores):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    else:
        assert all(torch.equal(a, b) for a, b in zip(got.scores, expected.scores))
    if "num_beams" in settings:
        assert torch.equal(got.sequences_scores, expected.sequences_scores)
    if settings["do_sample"]:  # a guard: another seed draws other tokens, so the comparison tests the seeding
        assert not torch.equal(run(stock_model, stock_inputs(batch), seed=8).sequences, expected.sequences)


# -- attention implementation, dtype, loading from a folder ---------------------------------------------------------

@pytest.fixture(scope="module")
def stock_folder(stock_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stock")
    stock_model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def variant_models(stock_folder):
    """name -> (stock, disabled, converted), the stock model loaded as a user loads it: `from_pretrained` with the
    dtype / attention implementation (bf16 this way keeps the rotary `inv_freq` buffers in float32, as
    `from_qwen2_5_vl` does; a stock model cast with `.to(torch.bfloat16)` would have bf16 ones and differ from any
    freshly loaded copy of itself by ~4e-3)."""
    loads = {
        "sdpa": dict(attn_implementation="sdpa"),
        "bf16_eager": dict(attn_implementation="eager", dtype=torch.bfloat16),
        "bf16_sdpa": dict(attn_implementation="sdpa", dtype=torch.bfloat16),
        "from_saved_folder": {},  # the loading defaults, and from_qwen2_5_vl(path) below
    }

    @functools.cache
    def build(name):
        stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(stock_folder, **loads[name]).eval()
        source = stock_folder if name == "from_saved_folder" else stock
        converted = QTSplusQwen2_5_VLForConditionalGeneration.from_qwen2_5_vl(source)
        assert converted.dtype == stock.dtype
        assert converted.config._attn_implementation == stock.config._attn_implementation
        return stock, disabled_of(stock), converted

    return build


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", ["sdpa", "bf16_eager", "bf16_sdpa", "from_saved_folder"])
def test_variant_logits_and_greedy_tokens_equal_stock(variant_models, config, variant, mode):
    # bf16 too is the same computation in the same order as stock's, so equality is exact, not a tolerance.
    stock, disabled, converted = variant_models(variant)
    model, extra = model_under_test(mode, disabled, converted)
    two_videos = video_prompt_batch([[(4, 4, 4), (2, 4, 4)], [(2, 4, 6)]], [4, 6], config)
    for batch in (image_and_video_batch(config), two_videos):
        with torch.no_grad():
            expected = stock(**stock_inputs(batch)).logits
            got = model(**batch, **extra).logits
        assert got.dtype == expected.dtype == stock.dtype
        assert torch.equal(got, expected), float((got.float() - expected.float()).abs().max())
        settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
        expected_tokens = stock.generate(**stock_inputs(batch), **settings)
        assert torch.equal(model.generate(**batch, **extra, **settings), expected_tokens)


# -- issue 13's mutation 2: images are not text in the compacted sequence's 3-D positions ---------------------------

@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_image_and_video_prompt_keeps_stock_positions_when_compacted(stock_model, converted_model, config,
                                                                     padding_side):
    batch = image_and_video_batch(config, padding_side)
    stock_positions, _ = stock_model.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
        video_grid_thw=batch["video_grid_thw"], second_per_grid_ts=batch["second_per_grid_ts"],
        attention_mask=batch["attention_mask"],
    )
    prefill = converted_model.prepare_qtsplus_inputs(**batch, qtsplus_keep_ratio=0.5)
    assert prefill.selection.num_kept == [8, 6]  # half of 16 and of 12

    # The original positions that survive: every attended non-video token and the kept video tokens.
    attended = batch["attention_mask"].bool()
    video_positions = batch["input_ids"] == VIDEO_ID
    survivors = attended & ~video_positions
    placeholders = video_positions.nonzero()  # (row, column), video after video
    offset = 0
    for kept, total in zip(prefill.selection.kept_indices, prefill.selection.num_tokens):
        rows_cols = placeholders[offset + kept]
        survivors[rows_cols[:, 0], rows_cols[:, 1]] = True
        offset += total
    new_attended = prefill.attention_mask.bool()
    for row in range(len(attended)):
        assert torch.equal(prefill.position_ids[1:, row, new_attended[row]], stock_positions[:, row, survivors[row]])
        # the image tokens really are 2-D: two tokens of one image share a temporal position
        image_slots = prefill.input_ids[row][new_attended[row]] == IMAGE_ID
        assert len(prefill.position_ids[1, row, new_attended[row]][image_slots].unique()) == 1
    # padding stays on the caller's side
    assert bool(new_attended[:, -1 if padding_side == "left" else 0].all())
    next_position = stock_positions.masked_fill(~attended[None], 0).amax(dim=(0, 2)) + 1
    assert prefill.rope_deltas.flatten().tolist() == (next_position - new_attended.sum(-1)).tolist()

    with torch.no_grad():
        expected = stock_model(**stock_inputs(batch)).logits
        got = converted_model(**batch, qtsplus_keep_ratio=1.0).logits
    assert torch.equal(got, expected)
