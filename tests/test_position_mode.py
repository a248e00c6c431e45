"""qtsplus_position_mode="sequential": the LM sees the spliced selection with plain positions, as the released models."""

import pytest
import torch

from qtsplus_hf import QTSplusConfig, QTSplusQwen2_5_VLForConditionalGeneration
from qtsplus_hf.tiny import tiny_config_dict, tiny_qtsplus_config


@pytest.fixture(scope="module")
def sequential_model():
    torch.manual_seed(2)
    return QTSplusQwen2_5_VLForConditionalGeneration(tiny_qtsplus_config(qtsplus_position_mode="sequential")).eval()


def reference_logits(model, inputs_embeds, attention_mask):
    """The text LM on given embeddings with positions 0, 1, 2, ... over the attended tokens (left padding)."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.model.language_model(
        inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=positions
    ).last_hidden_state
    return model.lm_head(hidden)


def test_mrope_is_the_default_and_an_unknown_mode_is_refused_naming_the_field():
    assert QTSplusConfig(**tiny_config_dict()).qtsplus_position_mode == "mrope"
    with pytest.raises(ValueError, match="qtsplus_position_mode"):
        QTSplusConfig(**tiny_config_dict(), qtsplus_position_mode="rope")


def test_sequential_mode_has_no_time_embedding(sequential_model):
    assert sequential_model.qtsplus.time_embedding is None
    assert not any("time_embedding" in name for name, _ in sequential_model.named_parameters())


def test_prefill_is_the_prompt_with_unselected_placeholders_removed_and_plain_positions(
    sequential_model, two_sample_batch
):
    with torch.no_grad():
        prefill = sequential_model.prepare_qtsplus_inputs(**two_sample_batch, qtsplus_keep_ratio=0.5)
    video_id = sequential_model.config.video_token_id
    for row in range(2):
        ids = two_sample_batch["input_ids"][row][two_sample_batch["attention_mask"][row].bool()]
        kept_ids = prefill.input_ids[row][prefill.attention_mask[row].bool()]
        text = ids[ids != video_id]
        assert torch.equal(kept_ids[kept_ids != video_id], text)  # all text kept, in order
        assert int((kept_ids == video_id).sum()) == prefill.selection.num_kept[row]
        attended = prefill.position_ids[:, row][:, prefill.attention_mask[row].bool()]
        assert torch.equal(attended, torch.arange(len(kept_ids)).expand(4, -1))
    assert not prefill.rope_deltas.any()


def test_forward_and_greedy_decoding_match_the_text_lm_on_plain_positions(sequential_model, two_sample_batch):
    model = sequential_model
    with torch.no_grad():
        prefill = model.prepare_qtsplus_inputs(**two_sample_batch, qtsplus_keep_ratio=0.5)
        logits = model(**two_sample_batch, qtsplus_keep_ratio=0.5).logits
        expected = reference_logits(model, prefill.inputs_embeds, prefill.attention_mask)
        mask = prefill.attention_mask.bool()
        torch.testing.assert_close(logits[mask], expected[mask], atol=1e-5, rtol=0)

        # Greedy decoding by hand, recomputing the whole sequence each step (no cache, no rope_deltas).
        embeds, attention_mask, tokens = prefill.inputs_embeds, prefill.attention_mask, []
        for _ in range(5):
            next_token = reference_logits(model, embeds, attention_mask)[:, -1].argmax(-1)
            tokens.append(next_token)
            embeds = torch.cat([embeds, model.get_input_embeddings()(next_token)[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        generated = model.generate(**two_sample_batch, qtsplus_keep_ratio=0.5, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated[:, two_sample_batch["input_ids"].shape[1]:], torch.stack(tokens, dim=1))
