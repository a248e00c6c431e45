"""Dropping unselected video tokens: prefill length, kept positions, cached decoding."""

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from conftest import CACHE_KWARG


@pytest.mark.parametrize("keep_ratio", [0.25, None])
@pytest.mark.parametrize("batch_name", ["two_sample_batch", "two_video_batch"])
def test_prefill_is_text_plus_kept_tokens_at_their_stock_positions(converted_model, keep_ratio, batch_name, request):
    batch = request.getfixturevalue(batch_name)
    model = converted_model
    prefill = model.prepare_qtsplus_inputs(**batch, qtsplus_keep_ratio=keep_ratio)
    selection = prefill.selection
    if keep_ratio is not None:
        assert selection.num_kept == [-(-m // 4) for m in selection.num_tokens]  # ceil(M / 4)

    video_positions = batch["input_ids"] == model.config.video_token_id
    attended = batch["attention_mask"].bool()
    text_per_row = (attended & ~video_positions).sum(-1)
    stock_positions, _ = model.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], video_grid_thw=batch["video_grid_thw"],
        second_per_grid_ts=batch["second_per_grid_ts"], attention_mask=batch["attention_mask"],
    )

    # Which original sequence positions should survive, built from the selection by hand.
    survivors = attended & ~video_positions
    flat_video = video_positions.nonzero()  # (row, column) of every placeholder, video after video
    offset = 0
    kept_per_row = torch.zeros(len(attended), dtype=torch.long)
    for kept, total in zip(selection.kept_indices, selection.num_tokens):
        rows_cols = flat_video[offset + kept]
        survivors[rows_cols[:, 0], rows_cols[:, 1]] = True
        kept_per_row[rows_cols[0, 0]] += len(kept)
        offset += total

    new_attended = prefill.attention_mask.bool()
    assert new_attended.sum(-1).tolist() == (text_per_row + kept_per_row).tolist()
    assert prefill.inputs_embeds.shape[1] == int(new_attended.sum(-1).max())
    for row in range(len(attended)):
        expected = stock_positions[:, row, survivors[row]]
        torch.testing.assert_close(prefill.position_ids[1:, row, new_attended[row]], expected, rtol=0, atol=0)
    # Left padding is preserved so generation appends after the last real token.
    assert bool(new_attended[:, -1].all())
    # rope_deltas: the next position minus the number of attended prefill tokens.
    next_position = stock_positions.amax(dim=(0, 2)) + 1
    assert prefill.rope_deltas.flatten().tolist() == (next_position - new_attended.sum(-1)).tolist()


def test_kept_timestamps_follow_the_grid(converted_model, two_video_batch):
    batch = dict(two_video_batch, second_per_grid_ts=torch.tensor([0.5, 2.0, 1.0]))
    selection = converted_model.select(**batch, qtsplus_keep_ratio=0.5)
    for v, (kept, (t, h, w), interval) in enumerate(
        zip(selection.kept_indices, batch["video_grid_thw"].tolist(), batch["second_per_grid_ts"].tolist())
    ):
        tokens_per_frame_patch = h * w // 4
        torch.testing.assert_close(selection.timestamps[v], (kept // tokens_per_frame_patch).float() * interval)
        assert float(selection.timestamps[v].max()) < t * interval


def greedy_by_hand(model, batch, keep_ratio, steps):
    """Step-by-step greedy decoding with the KV cache from the compacted prefix."""
    prefill = model.prepare_qtsplus_inputs(**batch, qtsplus_keep_ratio=keep_ratio)
    embeds, mask, positions = prefill.inputs_embeds, prefill.attention_mask, prefill.position_ids
    outputs = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
    cache = outputs.cache if hasattr(outputs, "cache") and outputs.cache is not None else outputs.past_key_values
    tokens = []
    for _ in range(steps):
        next_token = outputs.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(next_token)
        mask = torch.cat([mask, torch.ones_like(next_token)], dim=-1)
        positions = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
        outputs = model(
            inputs_embeds=model.get_input_embeddings()(next_token), attention_mask=mask,
            position_ids=positions[..., -1:], use_cache=True, **{CACHE_KWARG: cache},
        )
        cache = outputs.cache if hasattr(outputs, "cache") and outputs.cache is not None else outputs.past_key_values
    return torch.cat(tokens, dim=-1)


@pytest.mark.parametrize("keep_ratio", [0.25, None])
@pytest.mark.parametrize("batch_name", ["two_sample_batch", "two_video_batch"])
def test_generate_equals_hand_written_cached_greedy_decode(converted_model, keep_ratio, batch_name, request):
    batch = request.getfixturevalue(batch_name)
    with torch.no_grad():
        expected = greedy_by_hand(converted_model, batch, keep_ratio, steps=5)
    generated = converted_model.generate(**batch, qtsplus_keep_ratio=keep_ratio, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    assert torch.equal(generated[:, batch["input_ids"].shape[1] :], expected)


def test_generate_runs_vision_and_selector_once(converted_model, two_sample_batch):
    calls = {"visual": 0, "selector": 0}
    hooks = [
        converted_model.model.visual.register_forward_hook(lambda *_: calls.__setitem__("visual", calls["visual"] + 1)),
        converted_model.qtsplus.register_forward_hook(lambda *_: calls.__setitem__("selector", calls["selector"] + 1)),
    ]
    try:
        converted_model.generate(**two_sample_batch, qtsplus_keep_ratio=0.25, max_new_tokens=4, do_sample=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"visual": 1, "selector": 1}


def test_dropping_tokens_changes_the_prediction_input(converted_model, two_sample_batch):
    """A guard that the compacted path is really taken: fewer LM positions than the stock prompt."""
    with torch.no_grad():
        outputs = converted_model(**two_sample_batch, qtsplus_keep_ratio=0.25)
    assert outputs.logits.shape[1] < two_sample_batch["input_ids"].shape[1]
    assert outputs.qtsplus.num_kept == [4, 3]


def test_generate_with_several_sequences_per_prompt_keeps_the_prompt_in_front(converted_model, two_sample_batch):
    torch.manual_seed(0)
    out = converted_model.generate(**two_sample_batch, qtsplus_keep_ratio=0.25, max_new_tokens=3, do_sample=True,
                                   num_return_sequences=2, return_dict_in_generate=True)
    prompt = two_sample_batch["input_ids"]
    assert out.sequences.shape == (4, prompt.shape[1] + 3)
    assert torch.equal(out.sequences[:, : prompt.shape[1]], prompt.repeat_interleave(2, dim=0))
    assert out["qtsplus"].num_kept == [4, 3]


def test_rope_deltas_continue_after_the_stock_positions_when_the_last_patch_is_dropped(converted_model, config):
    from qtsplus_hf.tiny import video_prompt_batch

    batch = video_prompt_batch([[(16, 4, 4)]], [3], config)
    stock_positions, stock_deltas = converted_model.model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], video_grid_thw=batch["video_grid_thw"],
        second_per_grid_ts=batch["second_per_grid_ts"], attention_mask=batch["attention_mask"],
    )
    prefill = converted_model.prepare_qtsplus_inputs(**batch, qtsplus_keep_ratio=0.1)
    assert prefill.selection.num_kept == [7]  # ceil(0.1 * 64)
    next_position = prefill.rope_deltas[0, 0] + prefill.attention_mask.sum()
    assert int(next_position) == int(stock_positions.max()) + 1


class PreferToken(LogitsProcessor):
    """Adds 100 to one token's logit (an early end of sequence, on demand)."""

    def __init__(self, token_id: int) -> None:
        self.token_id = token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.token_id] += 100.0
        return scores


@pytest.mark.parametrize("limit", ["max_length", "min_length"])
def test_length_limits_count_the_callers_prompt(converted_model, stock_model, two_sample_batch, limit):
    from conftest import stock_inputs

    prompt = two_sample_batch["input_ids"].shape[1]
    settings = {"max_length": prompt + 5} if limit == "max_length" else {"min_length": prompt + 5, "max_new_tokens": 8}
    if limit == "max_length":
        out = converted_model.generate(**two_sample_batch, qtsplus_keep_ratio=0.25, do_sample=False, **settings)
        assert out.shape[1] == prompt + 5
    else:
        # The end-of-sequence token pushed to the top at every step: it is blocked until the caller's prompt + 5
        # tokens, then comes at once (counting the compacted prompt instead would block it for the dropped tokens).
        eos = converted_model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        out = converted_model.generate(**two_sample_batch, qtsplus_keep_ratio=0.25, do_sample=False,
                                       logits_processor=LogitsProcessorList([PreferToken(eos)]), **settings)
        assert out.shape[1] == prompt + 6
        assert (out[:, -1] == eos).all() and not (out[:, prompt:-1] == eos).any()
    # and with nothing dropped, exactly the stock behaviour, a prompt-aware logits processor included
    expected = stock_model.generate(**stock_inputs(two_sample_batch), do_sample=False, repetition_penalty=1.3,
                                    no_repeat_ngram_size=2, **settings)
    got = converted_model.generate(**two_sample_batch, qtsplus_keep_ratio=1.0, do_sample=False,
                                   repetition_penalty=1.3, no_repeat_ngram_size=2, **settings)
    assert torch.equal(got, expected)


def test_return_dict_false_gives_a_tuple(converted_model, two_sample_batch):
    with torch.no_grad():
        as_tuple = converted_model(**two_sample_batch, qtsplus_keep_ratio=0.5, return_dict=False)
        as_output = converted_model(**two_sample_batch, qtsplus_keep_ratio=0.5)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], as_output.logits)


def test_second_per_grid_ts_as_a_list(converted_model, two_sample_batch):
    batch = dict(two_sample_batch, second_per_grid_ts=[0.5, 2.0])
    selection = converted_model.select(**batch, qtsplus_keep_ratio=1.0)
    assert float(selection.timestamps[1].max()) == 2.0  # 2 temporal patches of 2 s


@pytest.mark.parametrize("chunk_frames", [2, 4, 6])
def test_chunked_vision_encoding_equals_whole_videos(converted_model, two_video_batch, chunk_frames):
    model = converted_model
    grids, pixels = two_video_batch["video_grid_thw"], two_video_batch["pixel_values_videos"]
    with torch.no_grad():
        whole = model.encode_videos(pixels, grids)
        model.config.qtsplus_vision_chunk_frames = chunk_frames
        try:
            chunked = model.encode_videos(pixels, grids)
        finally:
            model.config.qtsplus_vision_chunk_frames = 0
    assert [len(f) for f in chunked] == [len(f) for f in whole] == [16, 8, 12]
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
