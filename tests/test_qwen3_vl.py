"""QTSplus on Qwen3-VL, checked against the stock Qwen3-VL and against hand computations.

1. With `qtsplus_enabled=False`, and at `qtsplus_keep_ratio=1.0` after `from_qwen3_vl`, the model is the stock model:
   forward logits and generated tokens / scores `torch.equal` in every layout (one video, a left-padded batch, two
   videos in a sample, an image before a video) and under beam search.
2. At keep 0.25 the compacted prefill is the prompt with the dropped `<|video_pad|>` removed, the kept tokens at their
   stock MRoPE positions, and decoding continues at stock's next position: the model's logits and greedy decoding
   equal the stock language model run by hand on the stock model's own inputs with the dropped positions removed.
3. DeepStack: the kept tokens' DeepStack features (the same kept indices) reach the first LM layers; without them the
   keep-1.0 logits are no longer stock's.
4. Chunked vision encoding gives the whole-video features.
5. Timestamps: the real processor's `qtsplus_patch_seconds` are the times written in the prompt, the selection's
   timestamps follow them, the question mask is the question alone.
6. The selector reads the question. 7. Training reaches the selector.
"""

import copy
import inspect
import math
import re

import numpy as np
import pytest
import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

from qtsplus_hf.modeling_qtsplus_qwen3_vl import (
    QTSplusQwen3VLConfig,
    QTSplusQwen3VLForConditionalGeneration,
    QTSplusQwen3VLProcessor,
)
from qtsplus_hf.selector_qtsplus import chat_turn_settings, question_mask
from qtsplus_hf.tiny import (
    IMAGE_ID,
    PAD_ID,
    TEXT_VOCAB,
    VIDEO_ID,
    VISION_END_ID,
    VISION_START_ID,
    qwen3_video_prompt_batch,
    tiny_qwen3_vl_config_dict,
    tiny_qwen3_vl_processor,
    tiny_tokenizer,
)


STOCK_INPUT_NAMES = (
    "input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw", "pixel_values_videos",
    "video_grid_thw",
)
# transformers renamed `past_key_values` to `cache` in 5.2x.
CACHE_KWARG = "cache" if "cache" in inspect.signature(Qwen3VLTextModel.forward).parameters else "past_key_values"
MODES = ["disabled", "keep_all"]
NEW_TOKENS = 6
MERGE = 4  # spatial_merge_size ** 2 of the tiny config


def stock_inputs(batch: dict) -> dict:
    """What a stock Qwen3-VL processor returns (no qtsplus_* entries)."""
    return {name: batch[name] for name in STOCK_INPUT_NAMES if name in batch}


def joined(items) -> torch.Tensor:
    """One DeepStack layer / pooled output as one tensor (5.17 gives a tensor, later versions a tuple per item)."""
    return items if isinstance(items, torch.Tensor) else torch.cat(list(items))


def randomise_selector(model, seed: int):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.qtsplus.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator).to(parameter.dtype) * 0.2)
    return model


# -- models and inputs ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def config():
    config = QTSplusQwen3VLConfig(**tiny_qwen3_vl_config_dict())
    config._attn_implementation = "eager"
    return config


@pytest.fixture(scope="module")
def stock():
    torch.manual_seed(0)
    config = Qwen3VLConfig(**tiny_qwen3_vl_config_dict())
    config._attn_implementation = "eager"
    return Qwen3VLForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def converted(stock):
    torch.manual_seed(1)
    model = QTSplusQwen3VLForConditionalGeneration.from_qwen3_vl(stock)
    assert model.config._attn_implementation == "eager" and not model.training
    return model


@pytest.fixture(scope="module")
def disabled(stock):
    """`qtsplus_enabled=False` on the stock weights with a random selector: were it used, the outputs would change."""
    return randomise_selector(QTSplusQwen3VLForConditionalGeneration.from_qwen3_vl(stock, qtsplus_enabled=False), 5)


@pytest.fixture(scope="module")
def randomised(stock, tokenizer):
    """A converted model whose selector (scoring, budget, re-encoder, time embedding) is random and non-zero, and
    which finds the user turns of the tiny tokenizer's chat format by itself."""
    model = QTSplusQwen3VLForConditionalGeneration.from_qwen3_vl(stock, **chat_turn_settings(tokenizer))
    return randomise_selector(model, 11)


LAYOUT_SPECS = {
    "one_video": ([[(4, 4, 4)]], [5], 0),
    "left_padded_batch": ([[(4, 4, 4)], [(2, 4, 6)]], [5, 3], 1),
    "two_videos_one_sample": ([[(4, 4, 4), (2, 4, 4)], [(2, 4, 6)]], [4, 6], 3),
    # Row 1 puts an image before its video; row 0's video comes first in the batch, so in row-major order the
    # visual rows are video, image, video (DeepStack joins them in sequence order, not images first).
    "image_then_video": ([[(2, 4, 6)], [("image", (1, 4, 4)), (4, 4, 4)]], [3, 5], 5),
}


@pytest.fixture(scope="module")
def layouts(config, tokenizer):
    return {
        name: qwen3_video_prompt_batch(videos, questions, config, seed=seed, tokenizer=tokenizer)
        for name, (videos, questions, seed) in LAYOUT_SPECS.items()
    }


def model_under_test(mode, disabled, converted):
    return (disabled, {}) if mode == "disabled" else (converted, {"qtsplus_keep_ratio": 1.0})


# -- hand-built references --------------------------------------------------------------------------------------------

def stock_positions(stock, batch):
    positions, _ = stock.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch.get("image_grid_thw"),
        video_grid_thw=batch.get("video_grid_thw"), attention_mask=batch["attention_mask"],
    )
    return positions


@torch.no_grad()
def stock_language_model_inputs(stock, batch) -> dict:
    """The stock model's language-model inputs of the full prompt, built from its own pieces as
    `Qwen3VLModel.forward` builds them: embeddings, `[3, B, S]` positions, the visual mask and the DeepStack layers
    (rows of all visual positions in row-major order)."""
    ids = batch["input_ids"]
    embeds = stock.get_input_embeddings()(ids).clone()
    image_mask, video_mask = ids == IMAGE_ID, ids == VIDEO_ID
    video = stock.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"])
    embeds[video_mask] = joined(video.pooler_output)
    video_layers = [joined(layer) for layer in video.deepstack_features]
    image_layers = None
    if "pixel_values" in batch:
        image = stock.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        embeds[image_mask] = joined(image.pooler_output)
        image_layers = [joined(layer) for layer in image.deepstack_features]
    visual = image_mask | video_mask
    layers = []
    for index, video_layer in enumerate(video_layers):
        joint = video_layer.new_zeros(int(visual.sum()), video_layer.shape[-1])
        joint[video_mask[visual]] = video_layer
        if image_layers is not None:
            joint[image_mask[visual]] = image_layers[index]
        layers.append(joint)
    return {"embeds": embeds, "positions": stock_positions(stock, batch), "visual": visual, "layers": layers,
            "video_layers": video_layers}


def survivors_of(batch, selection) -> torch.Tensor:
    """Bool `[B, S]`: the original positions that a compacted prefill keeps (every attended non-video token and the
    selection's kept video tokens), built from the selection by hand."""
    attended = batch["attention_mask"].bool()
    video_positions = batch["input_ids"] == VIDEO_ID
    survivors = attended & ~video_positions
    placeholders = video_positions.nonzero()  # (row, column), video after video in row-major order
    offset = 0
    for kept, total in zip(selection.kept_indices, selection.num_tokens):
        rows_cols = placeholders[offset + kept]
        survivors[rows_cols[:, 0], rows_cols[:, 1]] = True
        offset += total
    assert offset == len(placeholders)
    return survivors


@torch.no_grad()
def compacted_reference(stock, batch, survivors) -> dict:
    """The stock model's own language-model inputs with the dropped positions removed, rows left-padded."""
    full = stock_language_model_inputs(stock, batch)
    batch_size = survivors.shape[0]
    length = int(survivors.sum(-1).max())
    ids = torch.full((batch_size, length), PAD_ID, dtype=torch.long)
    mask = torch.zeros(batch_size, length, dtype=torch.long)
    positions = torch.zeros(3, batch_size, length, dtype=torch.long)
    embeds = stock.get_input_embeddings()(ids).clone()
    for row in range(batch_size):
        count = int(survivors[row].sum())
        span = slice(length - count, length)
        ids[row, span] = batch["input_ids"][row, survivors[row]]
        mask[row, span] = 1
        positions[:, row, span] = full["positions"][:, row, survivors[row]]
        embeds[row, span] = full["embeds"][row, survivors[row]]
    attended = batch["attention_mask"].bool()
    next_position = full["positions"].masked_fill(~attended[None], 0).amax(dim=(0, 2)) + 1
    return {
        "ids": ids, "mask": mask, "positions": positions, "embeds": embeds, "next_position": next_position,
        "visual_pos_masks": ((ids == IMAGE_ID) | (ids == VIDEO_ID)) & mask.bool(),
        "deepstack": [layer[survivors[full["visual"]]] for layer in full["layers"]],
    }


def cache_of(outputs):
    return getattr(outputs, CACHE_KWARG)


@torch.no_grad()
def reference_decoding(stock, reference, steps: int):
    """The stock language model on the reference prefill, then greedy steps with the cache whose three MRoPE rows
    continue at stock's next position (the text row at the attended length). Returns the prefill logits and the
    per-step logits."""
    mask = reference["mask"]
    text_row = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    outputs = stock.model.language_model(
        inputs_embeds=reference["embeds"], attention_mask=mask,
        position_ids=torch.cat([text_row[None], reference["positions"]]),
        visual_pos_masks=reference["visual_pos_masks"], deepstack_visual_embeds=reference["deepstack"],
        use_cache=True,
    )
    logits = stock.lm_head(outputs.last_hidden_state)
    prefill_logits, step_logits = logits, []
    attended, next_position = mask.sum(-1), reference["next_position"]
    for step in range(steps):
        step_logits.append(logits[:, -1])
        token = logits[:, -1].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        position = torch.stack([attended + step] + [next_position + step] * 3)[..., None]
        outputs = stock.model.language_model(
            inputs_embeds=stock.get_input_embeddings()(token)[:, None], attention_mask=mask, position_ids=position,
            use_cache=True, **{CACHE_KWARG: cache_of(outputs)},
        )
        logits = stock.lm_head(outputs.last_hidden_state)
    return prefill_logits, step_logits


# -- 1. the stock model, exactly --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", list(LAYOUT_SPECS))
def test_forward_logits_equal_stock(stock, converted, disabled, layouts, layout, mode):
    batch = layouts[layout]
    model, extra = model_under_test(mode, disabled, converted)
    with torch.no_grad():
        expected = stock(**stock_inputs(batch)).logits
        outputs = model(**batch, **extra)
    assert outputs.logits.shape == expected.shape
    assert torch.equal(outputs.logits, expected), float((outputs.logits - expected).abs().max())
    if mode == "keep_all":  # the selector ran and kept everything
        assert outputs.qtsplus.num_kept == outputs.qtsplus.num_tokens
        assert outputs.qtsplus.num_tokens == [t * h * w // MERGE for t, h, w in batch["video_grid_thw"].tolist()]
    else:
        assert outputs.qtsplus is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", list(LAYOUT_SPECS))
def test_greedy_generate_equals_stock(stock, converted, disabled, layouts, layout, mode):
    batch = layouts[layout]
    model, extra = model_under_test(mode, disabled, converted)
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    expected = stock.generate(**stock_inputs(batch), **settings)
    got = model.generate(**batch, **extra, **settings)
    assert expected.sequences.shape == (len(batch["input_ids"]), batch["input_ids"].shape[1] + NEW_TOKENS)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.logits) == NEW_TOKENS and all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits))


STRATEGIES = {
    "beam_search": dict(num_beams=2),
    "beam_search_two_sequences": dict(num_beams=2, num_return_sequences=2),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_beam_search_equals_stock(stock, converted, disabled, layouts, strategy, mode):
    # Beams grow the batch after the prefill was built: the DeepStack rows must be repeated per beam, per row (the
    # rows have different numbers of visual tokens, and row 1's are image and video rows).
    batch = layouts["image_then_video"]
    model, extra = model_under_test(mode, disabled, converted)
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_scores=True,
                    **STRATEGIES[strategy])
    expected = stock.generate(**stock_inputs(batch), **settings)
    got = model.generate(**batch, **extra, **settings)
    rows = len(batch["input_ids"]) * settings.get("num_return_sequences", 1)
    assert expected.sequences.shape[0] == rows
    assert torch.equal(got.sequences, expected.sequences)
    assert torch.equal(got.sequences_scores, expected.sequences_scores)
    assert all(torch.equal(a, b) for a, b in zip(got.scores, expected.scores))


def test_keep_all_loss_equals_stock_loss(stock, converted, layouts):
    batch = layouts["left_padded_batch"]
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -2:] = batch["input_ids"][:, -2:]  # left padded: the last two tokens of every row (the answer)
    with torch.no_grad():
        expected = stock(**stock_inputs(batch), labels=labels).loss
        outputs = converted(**batch, labels=labels, qtsplus_keep_ratio=1.0)
    assert torch.equal(outputs.lm_loss, expected)


# -- 2. the compacted prefill at keep 0.25 ----------------------------------------------------------------------------

COMPACTED_LAYOUTS = ["left_padded_batch", "two_videos_one_sample", "image_then_video"]


@pytest.mark.parametrize("layout", COMPACTED_LAYOUTS)
def test_prefill_is_text_plus_kept_tokens_at_stock_positions(stock, converted, layouts, layout):
    batch = layouts[layout]
    with torch.no_grad():
        prefill = converted.prepare_qtsplus_inputs(**batch, qtsplus_keep_ratio=0.25)
    selection = prefill.selection
    grids = batch["video_grid_thw"].tolist()
    totals = [t * h * w // MERGE for t, h, w in grids]
    assert selection.num_tokens == totals
    assert selection.num_kept == [math.ceil(m / 4) for m in totals]
    for kept, total in zip(selection.kept_indices, totals):
        assert torch.equal(kept, kept.sort().values) and len(kept.unique()) == len(kept) and int(kept.max()) < total

    # Attended length per row by hand: the row's attended non-video tokens plus its videos' kept tokens (the videos
    # of a row are those listed for it, in order).
    attended = batch["attention_mask"].bool()
    text_tokens = (attended & (batch["input_ids"] != VIDEO_ID)).sum(-1).tolist()
    kept_per_row, video = [], 0
    for entries in LAYOUT_SPECS[layout][0]:
        videos_here = sum(1 for entry in entries if not isinstance(entry[0], str))
        kept_per_row.append(sum(selection.num_kept[video : video + videos_here]))
        video += videos_here
    new_attended = prefill.attention_mask.bool()
    assert new_attended.sum(-1).tolist() == [t + k for t, k in zip(text_tokens, kept_per_row)]
    assert prefill.inputs_embeds.shape[:2] == prefill.attention_mask.shape
    assert prefill.inputs_embeds.shape[1] == max(t + k for t, k in zip(text_tokens, kept_per_row))
    assert bool(new_attended[:, -1].all())  # still left padded

    survivors = survivors_of(batch, selection)
    positions = stock_positions(stock, batch)
    for row in range(len(attended)):
        assert torch.equal(prefill.input_ids[row, new_attended[row]], batch["input_ids"][row, survivors[row]])
        assert torch.equal(prefill.position_ids[1:, row, new_attended[row]], positions[:, row, survivors[row]])
    # Decoding continues at stock's next position: rope_deltas + attended length = max stock position + 1.
    next_position = positions.masked_fill(~attended[None], 0).amax(dim=(0, 2)) + 1
    assert (prefill.rope_deltas.flatten() + new_attended.sum(-1)).tolist() == next_position.tolist()
    # the same from stock's own rope_deltas: each row's shift grows by the tokens it dropped
    _, stock_deltas = stock.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch.get("image_grid_thw"),
        video_grid_thw=batch["video_grid_thw"], attention_mask=batch["attention_mask"],
    )
    dropped = attended.sum(-1) - new_attended.sum(-1)
    assert prefill.rope_deltas.flatten().tolist() == (stock_deltas.flatten() + dropped).tolist()


@pytest.mark.parametrize("layout", ["left_padded_batch", "image_then_video"])
def test_compacted_forward_and_greedy_decoding_equal_the_stock_lm_without_the_dropped_tokens(
    stock, converted, layouts, layout
):
    """With the identity initialisation the kept tokens are the encoder's features, so keep 0.25 must be the stock
    language model on stock's own embeddings, positions and DeepStack rows with the dropped positions removed,
    decoding on from stock's next position."""
    batch = layouts[layout]
    with torch.no_grad():
        outputs = converted(**batch, qtsplus_keep_ratio=0.25)
    survivors = survivors_of(batch, outputs.qtsplus)
    reference = compacted_reference(stock, batch, survivors)
    prefill_logits, step_logits = reference_decoding(stock, reference, NEW_TOKENS)
    mask = reference["mask"].bool()
    assert outputs.logits.shape == prefill_logits.shape
    assert torch.equal(outputs.logits[mask], prefill_logits[mask]), float(
        (outputs.logits[mask] - prefill_logits[mask]).abs().max()
    )

    generated = converted.generate(**batch, qtsplus_keep_ratio=0.25, max_new_tokens=NEW_TOKENS, do_sample=False,
                                   return_dict_in_generate=True, output_logits=True)
    prompt_length = batch["input_ids"].shape[1]
    assert torch.equal(generated.sequences[:, :prompt_length], batch["input_ids"])  # the caller's prompt
    expected_tokens = torch.stack([logits.argmax(-1) for logits in step_logits], dim=1)
    assert torch.equal(generated.sequences[:, prompt_length:], expected_tokens)
    for got, expected in zip(generated.logits, step_logits):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # a guard: the position matters, decoding one position further on gives other logits
    shifted = dict(reference, next_position=reference["next_position"] + 1)
    _, shifted_logits = reference_decoding(stock, shifted, 2)
    assert not torch.allclose(shifted_logits[1], step_logits[1], rtol=0, atol=1e-4)


# -- 3. DeepStack -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", COMPACTED_LAYOUTS)
def test_deepstack_inputs_are_the_stock_features_at_the_kept_indices(stock, converted, layouts, layout):
    batch = layouts[layout]
    with torch.no_grad():
        prefill = converted.prepare_qtsplus_inputs(**batch, qtsplus_keep_ratio=0.25)
    extras = prefill.language_model_extras
    selection = prefill.selection
    reference = compacted_reference(stock, batch, survivors_of(batch, selection))
    assert set(extras) == {"visual_pos_masks", "deepstack_visual_embeds"}
    visual = extras["visual_pos_masks"]
    assert torch.equal(visual, reference["visual_pos_masks"])
    ids, mask = prefill.input_ids, prefill.attention_mask.bool()
    assert torch.equal(visual, ((ids == VIDEO_ID) | (ids == IMAGE_ID)) & mask)
    assert int(visual.sum()) == sum(selection.num_kept) + int((batch["input_ids"] == IMAGE_ID).sum())
    layers = extras["deepstack_visual_embeds"]
    assert len(layers) == len(stock.config.vision_config.deepstack_visual_indexes) == 2
    for got, expected in zip(layers, reference["deepstack"]):
        assert got.shape == expected.shape and torch.equal(got, expected)

    if layout == "two_videos_one_sample":  # no images: the rows are each video's kept rows, video after video
        full = stock_language_model_inputs(stock, batch)
        for layer, stock_layer in zip(layers, full["video_layers"]):
            per_video = stock_layer.split(selection.num_tokens)
            expected = torch.cat([video[kept] for video, kept in zip(per_video, selection.kept_indices)])
            assert torch.equal(layer, expected)
        # a guard: the kept indices are not simply the first tokens, so the gather is tested
        assert any(not torch.equal(kept, torch.arange(len(kept))) for kept in selection.kept_indices)


@pytest.mark.parametrize("layout", ["left_padded_batch", "image_then_video"])
def test_keep_all_equals_stock_only_because_deepstack_is_injected(stock, converted, layouts, layout, monkeypatch):
    batch = layouts[layout]
    original = converted.compacted_language_model_extras

    def zeroed(*args, **kwargs):
        extras = original(*args, **kwargs)
        return {**extras, "deepstack_visual_embeds": [torch.zeros_like(layer)
                                                      for layer in extras["deepstack_visual_embeds"]]}

    with torch.no_grad():
        expected = stock(**stock_inputs(batch)).logits
        assert torch.equal(converted(**batch, qtsplus_keep_ratio=1.0).logits, expected)
        monkeypatch.setattr(converted, "compacted_language_model_extras", zeroed)
        without = converted(**batch, qtsplus_keep_ratio=1.0).logits
    attended = batch["attention_mask"].bool()
    assert float((without - expected)[attended].abs().max()) > 1e-3
    # The change starts at the first visual position: the text before it is untouched.
    visual = (batch["input_ids"] == VIDEO_ID) | (batch["input_ids"] == IMAGE_ID)
    for row in range(len(attended)):
        start, first = int(attended[row].nonzero()[0]), int(visual[row].nonzero()[0])
        assert torch.equal(without[row, start:first], expected[row, start:first])
        assert not torch.equal(without[row, first:], expected[row, first:])


def test_generate_passes_deepstack_to_its_prefill(converted, layouts, monkeypatch):
    """Removing DeepStack from generate's prefill changes its first new token's logits."""
    batch = layouts["left_padded_batch"]
    settings = dict(qtsplus_keep_ratio=0.25, max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                    output_logits=True)
    with_deepstack = converted.generate(**batch, **settings)
    monkeypatch.setattr(converted, "generation_extras", lambda prefill: {})
    without = converted.generate(**batch, **settings)
    assert not torch.allclose(with_deepstack.logits[0], without.logits[0], rtol=0, atol=1e-4)


# -- 4. chunked vision encoding ---------------------------------------------------------------------------------------

def test_chunked_vision_encoding_gives_the_whole_video_features(stock, converted, layouts):
    batch = layouts["two_videos_one_sample"]  # videos of t = 4 and 2 (and 2), chunks of one temporal patch
    assert batch["video_grid_thw"][0, 0] == 4
    pixels, grid = batch["pixel_values_videos"], batch["video_grid_thw"]
    with torch.no_grad():
        whole = converted.encode_video_streams(pixels, grid, chunk_frames=0)
        chunked = converted.encode_video_streams(pixels, grid, chunk_frames=2)
        full = stock_language_model_inputs(stock, batch)
    assert len(whole) == len(chunked) == 3  # the merged features and two DeepStack layers
    stock_video = stock.model.get_video_features(pixels, grid)
    stock_streams = [joined(stock_video.pooler_output)] + full["video_layers"]
    for whole_stream, chunked_stream, stock_stream in zip(whole, chunked, stock_streams):
        assert [len(v) for v in chunked_stream] == [t * h * w // MERGE for t, h, w in grid.tolist()]
        torch.testing.assert_close(torch.cat(chunked_stream), torch.cat(whole_stream), rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.cat(whole_stream), stock_stream, rtol=0, atol=0)

    with torch.no_grad():
        expected = converted(**batch, qtsplus_keep_ratio=0.25)
        got = converted(**batch, qtsplus_keep_ratio=0.25, qtsplus_vision_chunk_frames=2)
    assert [k.tolist() for k in got.qtsplus.kept_indices] == [k.tolist() for k in expected.qtsplus.kept_indices]
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-5)


# -- 5. timestamps and the question mask with the real processor ------------------------------------------------------

QUESTION = "What colour is the circle?"
FPS = 3.0
FRAMES = [0, 2, 3, 5, 7, 8, 10, 11]  # uneven spacing: the times are not a multiple of a fixed interval


def video_question_prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return tiny_qwen3_vl_processor(processor_class=QTSplusQwen3VLProcessor, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def processed(processor):
    video = np.random.default_rng(0).integers(0, 256, (len(FRAMES), 32, 32, 3), dtype=np.uint8)
    metadata = dict(fps=FPS, frames_indices=list(FRAMES), total_num_frames=12)
    return processor(text=[video_question_prompt(processor, QUESTION)], videos=[video], video_metadata=[metadata],
                     do_sample_frames=False, return_tensors="pt")


def test_patch_seconds_are_the_timestamps_written_in_the_prompt(processor, processed):
    seconds = processed["qtsplus_patch_seconds"]
    grid = processed["video_grid_thw"].tolist()
    assert grid[0][0] == len(FRAMES) // 2 == len(seconds)
    # by hand: the mean time of the two frames of each temporal patch
    frame_times = [index / FPS for index in FRAMES]
    by_hand = [(frame_times[i] + frame_times[i + 1]) / 2 for i in range(0, len(FRAMES), 2)]
    torch.testing.assert_close(seconds, torch.tensor(by_hand), rtol=0, atol=1e-6)
    text = processor.tokenizer.decode(processed["input_ids"][0])
    written = [float(value) for value in re.findall(r"<(\d+\.\d) seconds>", text)]
    assert written == [round(value, 1) for value in by_hand] == [0.3, 1.3, 2.5, 3.5]
    assert all(abs(s - w) <= 0.05 + 1e-6 for s, w in zip(seconds.tolist(), written))


def test_selection_timestamps_are_the_patch_seconds_of_the_kept_tokens(randomised, processed):
    selection = randomised.select(**processed, qtsplus_keep_ratio=0.5)
    _, h, w = processed["video_grid_thw"][0].tolist()
    kept = selection.kept_indices[0]
    expected = processed["qtsplus_patch_seconds"][kept // (h * w // MERGE)]
    assert torch.equal(selection.timestamps[0], expected)
    assert len(expected.unique()) > 1  # a guard: the kept tokens span several temporal patches


def test_batched_prompts_keep_each_videos_own_times(processor, randomised):
    """Two prompts, two videos of other lengths and rates: the seconds come video after video, and each video's kept
    tokens get its own patches' times (not the first video's, not one second apart)."""
    generator = np.random.default_rng(1)
    videos = [generator.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (len(FRAMES), 20)]
    metadata = [dict(fps=FPS, frames_indices=list(FRAMES), total_num_frames=12),
                dict(fps=5.0, frames_indices=list(range(20)), total_num_frames=20)]
    texts = [video_question_prompt(processor, question) for question in (QUESTION, "Which object appears first?")]
    inputs = processor(text=texts, videos=videos, video_metadata=metadata, do_sample_frames=False, padding=True,
                       return_tensors="pt")
    grids = inputs["video_grid_thw"].tolist()
    assert [t for t, _, _ in grids] == [4, 10]
    seconds = inputs["qtsplus_patch_seconds"]
    by_hand = [(a + b) / 2 for frames, fps in ((FRAMES, FPS), (list(range(20)), 5.0))
               for a, b in zip([i / fps for i in frames[0::2]], [i / fps for i in frames[1::2]])]
    torch.testing.assert_close(seconds, torch.tensor(by_hand), rtol=0, atol=1e-6)
    written = [float(value) for text in processor.tokenizer.batch_decode(inputs["input_ids"])
               for value in re.findall(r"<(\d+\.\d) seconds>", text)]
    assert written == [round(value, 1) for value in by_hand]
    selection = randomised.select(**inputs, qtsplus_keep_ratio=0.5)
    for kept, stamps, patch_seconds, (_, h, w) in zip(selection.kept_indices, selection.timestamps,
                                                      seconds.split([t for t, _, _ in grids]), grids):
        assert torch.equal(stamps, patch_seconds[kept // (h * w // MERGE)])


def test_reencoder_reads_the_patch_seconds(randomised, processed):
    with torch.no_grad():
        expected = randomised(**processed, qtsplus_keep_ratio=0.5)
        later = randomised(**dict(processed, qtsplus_patch_seconds=processed["qtsplus_patch_seconds"] + 7.0),
                           qtsplus_keep_ratio=0.5)
    assert [k.tolist() for k in later.qtsplus.kept_indices] == [k.tolist() for k in expected.qtsplus.kept_indices]
    assert torch.equal(later.qtsplus.timestamps[0], expected.qtsplus.timestamps[0] + 7.0)
    assert not torch.allclose(later.logits, expected.logits, rtol=0, atol=1e-4)


def test_query_mask_is_the_question_only(processor, processed):
    ids, mask = processed["input_ids"][0], processed["qtsplus_query_mask"][0]
    question_ids = processor.tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    last_vision_end = int((ids == VISION_END_ID).nonzero().max())
    question_start = last_vision_end + 1
    assert mask.nonzero().flatten().tolist() == list(range(question_start, question_start + len(question_ids)))
    assert ids[mask].tolist() == question_ids and processor.tokenizer.decode(ids[mask]) == QUESTION
    # the timestamp text is there, inside the vision span, and unmasked
    first_vision_start = int((ids == VISION_START_ID).nonzero().min())
    inside = ids[first_vision_start : last_vision_end + 1]
    text_inside = ~torch.isin(inside, torch.tensor([VISION_START_ID, VISION_END_ID, VIDEO_ID]))
    assert int(text_inside.sum()) > 0 and not mask[first_vision_start : last_vision_end + 1].any()
    assert not mask[ids == VIDEO_ID].any()


def test_default_question_mask_gives_the_processor_masks_scores(randomised, processed):
    inputs = dict(processed)
    processor_mask = inputs.pop("qtsplus_query_mask")
    config = randomised.config
    assert torch.equal(question_mask(inputs["input_ids"], inputs["attention_mask"], None, None, config), processor_mask)
    with_mask = randomised.select(**inputs, qtsplus_query_mask=processor_mask, qtsplus_keep_ratio=0.5)
    default = randomised.select(**inputs, qtsplus_keep_ratio=0.5)
    assert torch.equal(default.scores[0], with_mask.scores[0])
    # a guard: the mask matters, the question plus the timestamp text scores otherwise
    ids = inputs["input_ids"]
    wider = processor_mask | (~torch.isin(ids, torch.tensor([VISION_START_ID, VISION_END_ID, VIDEO_ID]))
                              & (torch.arange(ids.shape[1]) < int(processor_mask[0].nonzero().min())))
    other = randomised.select(**inputs, qtsplus_query_mask=wider, qtsplus_keep_ratio=0.5)
    assert not torch.allclose(other.scores[0], with_mask.scores[0], rtol=0, atol=1e-6)


def test_processor_prompt_keep_all_equals_stock(stock, converted, processed):
    with torch.no_grad():
        expected = stock(**stock_inputs(processed)).logits
        got = converted(**processed, qtsplus_keep_ratio=1.0).logits
    assert torch.equal(got, expected)


# -- 6. the selector reads the question -------------------------------------------------------------------------------

def test_different_questions_give_different_scores(randomised, layouts):
    batch = layouts["one_video"]
    question = batch["qtsplus_query_mask"]
    generator = torch.Generator().manual_seed(9)
    other = dict(batch, input_ids=batch["input_ids"].clone())
    other["input_ids"][question] = torch.randint(TEXT_VOCAB.start, TEXT_VOCAB.stop, (int(question.sum()),),
                                                 generator=generator)
    assert not torch.equal(other["input_ids"], batch["input_ids"])
    scores = randomised.select(**batch, qtsplus_keep_ratio=0.25).scores[0]
    assert torch.equal(randomised.select(**batch, qtsplus_keep_ratio=0.25).scores[0], scores)  # deterministic
    changed = randomised.select(**other, qtsplus_keep_ratio=0.25).scores[0]
    assert not torch.allclose(changed, scores, rtol=0, atol=1e-6)
    # and only the question: other text outside it (the system text) leaves the scores as they are
    system = dict(batch, input_ids=batch["input_ids"].clone())
    system["input_ids"][0, 0] = TEXT_VOCAB.start + (int(system["input_ids"][0, 0]) + 1 - TEXT_VOCAB.start) % len(
        TEXT_VOCAB
    )
    assert torch.equal(randomised.select(**system, qtsplus_keep_ratio=0.25).scores[0], scores)


# -- 7. training ------------------------------------------------------------------------------------------------------

def test_training_at_the_predicted_budget_reaches_scoring_layers_and_budget_head(converted, config, tokenizer):
    model = copy.deepcopy(converted).train()
    batch = qwen3_video_prompt_batch([[(4, 4, 4)], [(2, 4, 6)]], [6, 5], config, padding_side="right", seed=2,
                                     tokenizer=tokenizer)
    labels = torch.full_like(batch["input_ids"], -100)
    for row, length in enumerate(batch["attention_mask"].sum(-1).tolist()):  # the last two real tokens: answer
        labels[row, length - 2 : length] = batch["input_ids"][row, length - 2 : length]
    batch["qtsplus_query_mask"] &= labels == -100
    outputs = model(**batch, labels=labels)  # qtsplus_keep_ratio=None: the predicted budget
    selection = outputs.qtsplus
    rho_min, rho_max = model.config.qtsplus_rho_min, model.config.qtsplus_rho_max
    for rho, kept, total in zip(selection.rho.tolist(), selection.num_kept, selection.num_tokens):
        assert rho_min <= rho <= rho_max
        assert kept == max(1, min(total, model.config.qtsplus_max_tokens, math.ceil(rho * total - 1e-6)))
        assert kept < total
    assert torch.isfinite(outputs.loss) and torch.isfinite(outputs.lm_loss)
    weighted = (config.qtsplus_lambda_flops * outputs.flops_loss + config.qtsplus_lambda_kv * outputs.kv_loss
                + config.qtsplus_lambda_smooth * outputs.smooth_loss)
    torch.testing.assert_close(outputs.loss, outputs.lm_loss + weighted)

    # The language-model loss alone must reach the selector (through the straight-through gate): the auxiliary
    # terms would reach the budget head anyway.
    outputs.lm_loss.backward()
    selector = model.qtsplus
    for name, parameter in [("scoring q_proj", selector.scoring_layers[0].q_proj.weight),
                            ("scoring k_proj", selector.scoring_layers[0].k_proj.weight),
                            ("budget mlp.0", selector.budget.mlp[0].weight),
                            ("budget mlp.2", selector.budget.mlp[2].weight)]:
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("scheme", ["identity", "released"])
def test_selector_attention_copies_the_lms_head_norms_and_has_no_bias(stock, scheme):
    """Qwen3's attention normalises each head's queries and keys and has no q/k/v bias: the selector's layers are
    shaped the same and copy those norms (decoder layer i, or the last one for the released scheme's scoring)."""
    source = copy.deepcopy(stock)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in source.model.language_model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.copy_(1 + torch.randn(norm.weight.shape, generator=generator))
    model = QTSplusQwen3VLForConditionalGeneration.from_qwen3_vl(source, init_scheme=scheme,
                                                                  qtsplus_num_reencode_layers=2)
    decoder = source.model.language_model.layers
    pairs = [(model.qtsplus.scoring_layers[0], decoder[-1] if scheme == "released" else decoder[0])]
    pairs += [(layer.core, decoder[i]) for i, layer in enumerate(model.qtsplus.reencode_layers)]
    for target, layer in pairs:
        assert target.q_proj.bias is None and target.k_proj.bias is None and target.v_proj.bias is None
        assert torch.equal(target.q_head_norm.weight, layer.self_attn.q_norm.weight)
        assert torch.equal(target.k_head_norm.weight, layer.self_attn.k_norm.weight)
        assert torch.equal(target.q_proj.weight, layer.self_attn.q_proj.weight)
