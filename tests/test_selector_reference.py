"""The optimised selector and compaction against straightforward reference computations.

The model scores with grouped heads, projects the video keys in blocks, skips the last scoring layer's values,
re-encodes with `scaled_dot_product_attention`, and embeds only the question and the compacted sequence. The
references below do none of that: repeated key/value heads, explicit softmax, one video at a time, full-sequence
embeddings with boolean compaction row by row.
"""

import math

import pytest
import torch

from qtsplus_hf.selector_qtsplus import IGNORE_INDEX, QTSplusRMSNorm, QTSplusSelector, question_mask
from qtsplus_hf.tiny import IMAGE_ID, VIDEO_ID, VISION_END_ID, VISION_START_ID, tiny_qtsplus_config, video_prompt_batch


def trained_looking_selector(**overrides) -> QTSplusSelector:
    torch.manual_seed(0)
    selector = QTSplusSelector(tiny_qtsplus_config(**overrides))
    for module in selector.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.2)
    return selector.eval()


def reference_attention(layer, queries, keys_values, key_mask, time_embeds=None):
    """Probabilities `[H, L, M]` and output `[L, D]` (before the residual) of one layer for ONE sequence."""
    query_in, kv_in = layer.q_norm(queries), layer.kv_norm(keys_values)
    if time_embeds is not None:
        query_in, kv_in = query_in + time_embeds, kv_in + time_embeds
    heads, kv_heads, head_dim = layer.num_heads, layer.num_key_value_heads, layer.head_dim
    q = layer.q_proj(query_in).view(-1, heads, head_dim).transpose(0, 1)
    k = layer.k_proj(kv_in).view(-1, kv_heads, head_dim).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    v = layer.v_proj(kv_in).view(-1, kv_heads, head_dim).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    logits = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    probs = logits.masked_fill(~key_mask[None, None, :], float("-inf")).softmax(-1)
    return probs, (probs @ v).transpose(0, 1).reshape(queries.shape[0], -1)


def reference_layer(layer, queries, keys_values, key_mask, time_embeds=None):
    _, attended = reference_attention(layer, queries, keys_values, key_mask, time_embeds)
    hidden = queries + layer.o_proj(attended)
    return hidden + layer.ffn(layer.ffn_norm(hidden))


def reference_selection(selector, video, video_mask, query, query_mask, seconds, keep_ratio):
    """Scores, keep mask and re-encoded kept tokens, one video at a time with plain attention."""
    all_scores, all_keep, all_kept = [], [], []
    for v in range(video.shape[0]):
        tokens, questions = video[v][video_mask[v]], query[v][query_mask[v]]
        everything = torch.ones(len(tokens), dtype=torch.bool)
        for layer in selector.scoring_layers[:-1]:
            questions = reference_layer(layer, questions, tokens, everything)
        probs, _ = reference_attention(selector.scoring_layers[-1], questions, tokens, everything)
        scores = probs.amax(dim=(0, 1))
        count = math.ceil(keep_ratio * len(tokens) * (1 - 1e-6))
        kept_index = scores.argsort(descending=True, stable=True)[:count].sort().values
        kept = tokens[kept_index]
        time_embeds = selector.time_embedding(seconds[v][video_mask[v]][kept_index])
        for layer in selector.reencode_layers:
            kept = reference_layer(layer.core, kept, kept, torch.ones(count, dtype=torch.bool), time_embeds)
        keep = torch.zeros(video.shape[1], dtype=torch.bool)
        keep[kept_index] = True
        all_scores.append(scores)
        all_keep.append(keep)
        all_kept.append(kept)
    return all_scores, torch.stack(all_keep), torch.cat(all_kept)


@pytest.mark.parametrize("num_scoring_layers", [1, 2])
@pytest.mark.parametrize("block_size", [8192, 7])  # one block, and several blocks with a ragged last one
def test_selector_equals_the_plain_reference(num_scoring_layers, block_size):
    selector = trained_looking_selector(qtsplus_num_scoring_layers=num_scoring_layers)
    for layer in selector.scoring_layers:
        layer.key_block_size = block_size
    generator = torch.Generator().manual_seed(1)
    lengths, query_lengths = [40, 23], [5, 2]
    video = torch.randn(2, 40, 64, generator=generator)
    video_mask = torch.arange(40)[None] < torch.tensor(lengths)[:, None]
    query = torch.randn(2, 5, 64, generator=generator)
    query_mask = torch.arange(5)[None] < torch.tensor(query_lengths)[:, None]
    seconds = (torch.arange(40) // 4).float()[None].expand(2, -1)
    with torch.no_grad():
        keep, kept, _, scores = selector(video, video_mask, query, query_mask, seconds, keep_ratio=0.3)
        ref_scores, ref_keep, ref_kept = reference_selection(
            selector, video, video_mask, query, query_mask, seconds, keep_ratio=0.3
        )
    for v, length in enumerate(lengths):
        torch.testing.assert_close(scores[v, :length], ref_scores[v], atol=1e-6, rtol=1e-5)
        assert not bool(scores[v, length:].any())
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(kept, ref_kept, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad", [False, True])  # inference takes in-place steps, training does not
@pytest.mark.parametrize("lengths", [[40], [40, 40], [40, 23]])
def test_unpadded_fast_paths_equal_the_plain_reference(monkeypatch, lengths, grad):
    """No padding (one video, or videos of one length, every question row used): the scoring applies no key mask,
    the kept tokens are packed without a scatter and the re-encoder's SDPA gets no mask. A padded batch keeps the
    mask. Both equal the reference."""
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    selector = trained_looking_selector()
    for module in selector.modules():  # norms of one input that differ in their weights (self-attention)
        if isinstance(module, QTSplusRMSNorm):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    generator = torch.Generator().manual_seed(3)
    videos = len(lengths)
    video = torch.randn(videos, 40, 64, generator=generator)
    video_mask = torch.arange(40)[None] < torch.tensor(lengths)[:, None]
    query = torch.randn(videos, 5, 64, generator=generator)
    query_mask = torch.ones(videos, 5, dtype=torch.bool)
    seconds = (torch.arange(40) // 4).float()[None].expand(videos, -1)
    with torch.set_grad_enabled(grad):
        keep, kept, _, scores = selector(video, video_mask, query, query_mask, seconds, keep_ratio=0.3)
    assert (masks[0] is None) == (min(lengths) == max(lengths))
    with torch.no_grad():
        ref_scores, ref_keep, ref_kept = reference_selection(
            selector, video, video_mask, query, query_mask, seconds, keep_ratio=0.3
        )
    for v, length in enumerate(lengths):
        torch.testing.assert_close(scores[v, :length], ref_scores[v], atol=1e-6, rtol=1e-5)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(kept, ref_kept, atol=1e-5, rtol=1e-5)


def test_time_embedding_equals_the_plain_formula():
    """It embeds each distinct timestamp once and gathers; the plain formula embeds every token."""
    embedding = trained_looking_selector().time_embedding
    seconds = torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.5, 3.0, 7.5], [2.0, 0.0, 2.0, 9.0, 9.0, 0.5, 1.0]])
    exponent = torch.arange(embedding.num_frequencies, dtype=torch.float32) / embedding.num_frequencies
    angles = seconds[..., None] * torch.exp(-math.log(10000.0) * exponent)
    plain = angles.sin() @ embedding.proj.weight[:, : embedding.num_frequencies].T
    plain = plain + angles.cos() @ embedding.proj.weight[:, embedding.num_frequencies :].T + embedding.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(embedding(seconds), plain, atol=1e-5, rtol=1e-5)


def image_and_video_batch(config):
    """One row: text, a 4-token image, a 16-token video, a question; the caller's question mask covers the image."""
    batch = video_prompt_batch([[(4, 4, 4)]], [5], config, seed=2)
    ids = batch["input_ids"][0].tolist()
    ids = ids[:3] + [VISION_START_ID] + [IMAGE_ID] * 4 + [VISION_END_ID] + ids[3:]
    input_ids = torch.tensor([ids])
    query_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    query_mask[0, 3:9] = True
    query_mask[0, -5:] = True
    vision = config.vision_config
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return dict(
        batch, input_ids=input_ids, attention_mask=torch.ones_like(input_ids), qtsplus_query_mask=query_mask,
        mm_token_type_ids=(input_ids == IMAGE_ID).int() + 2 * (input_ids == VIDEO_ID).int(),
        pixel_values=torch.randn(16, patch_dim, generator=torch.Generator().manual_seed(5)),
        image_grid_thw=torch.tensor([[1, 4, 4]]),
    )


def reference_prefill(model, batch, keep_ratio):
    """The compacted ids and embeddings built the plain way: embed everything, scatter, drop row by row."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    embeds = model.get_input_embeddings()(input_ids)
    if batch.get("pixel_values") is not None:
        image = torch.cat(model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output)
        embeds = embeds.masked_scatter((input_ids == IMAGE_ID)[..., None], image)
    question = question_mask(input_ids, attention_mask, None, batch.get("qtsplus_query_mask"), model.config)
    video_positions = input_ids == model.config.video_token_id
    features = model.encode_videos(batch["pixel_values_videos"], batch["video_grid_thw"])
    num_tokens = torch.tensor([len(f) for f in features])
    owner = model._video_owner(video_positions, num_tokens)
    video = torch.nn.utils.rnn.pad_sequence(features, batch_first=True)
    video_mask = torch.arange(video.shape[1])[None] < num_tokens[:, None]
    queries = [embeds[row][question[row]] for row in range(len(input_ids))]
    query = torch.nn.utils.rnn.pad_sequence(queries, batch_first=True)
    query_mask = torch.arange(query.shape[1])[None] < torch.tensor([len(q) for q in queries])[:, None]
    seconds = torch.nn.utils.rnn.pad_sequence(
        [(torch.arange(t) * 1.0).repeat_interleave(h * w // 4) for t, h, w in batch["video_grid_thw"].tolist()],
        batch_first=True,
    )
    keep, kept, _, scores = model.qtsplus(video, video_mask, query[owner], query_mask[owner], seconds, keep_ratio)
    survives = attention_mask.bool().clone()
    survives[video_positions] = keep[video_mask]
    embeds = embeds.masked_scatter((video_positions & survives)[..., None], kept)
    rows = [(input_ids[r][survives[r]], embeds[r][survives[r]]) for r in range(len(input_ids))]
    return rows, scores[video_mask]


@pytest.mark.parametrize("keep_ratio", [0.5, None])
@pytest.mark.parametrize("batch_name", ["two_video_batch", "image_and_video"])
def test_prefill_equals_the_plain_reference(converted_model, two_video_batch, config, keep_ratio, batch_name):
    batch = two_video_batch if batch_name == "two_video_batch" else image_and_video_batch(config)
    model = converted_model
    with torch.no_grad():
        prefill = model.prepare_qtsplus_inputs(**batch, qtsplus_keep_ratio=keep_ratio)
        rows, ref_scores = reference_prefill(model, batch, keep_ratio)
    torch.testing.assert_close(torch.cat(prefill.selection.scores), ref_scores, atol=1e-6, rtol=1e-5)
    attended = prefill.attention_mask.bool()
    for row, (ref_ids, ref_embeds) in enumerate(rows):
        assert torch.equal(prefill.input_ids[row][attended[row]], ref_ids)
        torch.testing.assert_close(prefill.inputs_embeds[row][attended[row]], ref_embeds, atol=1e-5, rtol=1e-5)
        assert not bool(prefill.inputs_embeds[row][~attended[row]].any())


def test_labels_stay_out_of_the_question_and_follow_the_compaction(converted_model, two_sample_batch):
    labels = two_sample_batch["input_ids"].masked_fill(two_sample_batch["attention_mask"] == 0, IGNORE_INDEX)
    labels[:, :-2] = IGNORE_INDEX
    prefill = converted_model.prepare_qtsplus_inputs(**two_sample_batch, labels=labels, qtsplus_keep_ratio=0.5)
    assert torch.equal(prefill.labels[:, -2:], two_sample_batch["input_ids"][:, -2:])
    assert bool((prefill.labels[:, :-2] == IGNORE_INDEX).all())
    # The answer never steers the selection, even where the caller's question mask covers it: the scores equal
    # those of a mask without the labelled tokens, and differ from letting them in.
    query_mask = two_sample_batch["qtsplus_query_mask"].clone()
    query_mask[:, -2:] = True
    with_answer = dict(two_sample_batch, qtsplus_query_mask=query_mask)
    without_answer = dict(two_sample_batch, qtsplus_query_mask=query_mask & (labels == IGNORE_INDEX))
    scores = [converted_model.prepare_qtsplus_inputs(**batch, **extra, qtsplus_keep_ratio=0.5).selection.scores
              for batch, extra in ((with_answer, {"labels": labels}), (without_answer, {}), (with_answer, {}))]
    assert all(torch.equal(a, b) for a, b in zip(scores[0], scores[1]))
    assert not all(torch.equal(a, b) for a, b in zip(scores[0], scores[2]))


def test_per_call_chunk_override_equals_the_config_setting(converted_model, two_video_batch):
    model = converted_model
    with torch.no_grad():
        whole = model.prepare_qtsplus_inputs(**two_video_batch, qtsplus_keep_ratio=0.5, qtsplus_vision_chunk_frames=0)
        chunked = model.prepare_qtsplus_inputs(**two_video_batch, qtsplus_keep_ratio=0.5, qtsplus_vision_chunk_frames=2)
        generated = model.generate(
            **two_video_batch, qtsplus_keep_ratio=0.5, qtsplus_vision_chunk_frames=4, max_new_tokens=3, do_sample=False
        )
        reference = model.generate(**two_video_batch, qtsplus_keep_ratio=0.5, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(chunked.inputs_embeds, whole.inputs_embeds, atol=1e-5, rtol=0)
    assert torch.equal(generated, reference)
    for bad in (3, -2, 2.0, True):
        with pytest.raises(ValueError, match="qtsplus_vision_chunk_frames"):
            model(**two_video_batch, qtsplus_vision_chunk_frames=bad)
