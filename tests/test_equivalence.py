"""With QTSplus disabled, or keeping every token of a freshly converted model, we are the stock Qwen2.5-VL."""

import copy

import pytest
import torch

from qtsplus_hf import QTSplusConfig, QTSplusQwen2_5_VLForConditionalGeneration

from conftest import stock_inputs


BATCHES = ["two_sample_batch", "two_video_batch"]


def disabled_copy(stock_model) -> QTSplusQwen2_5_VLForConditionalGeneration:
    """A QTSplus model with a random selector, the stock weights and `qtsplus_enabled=False`."""
    config = QTSplusConfig(**{**stock_model.config.to_dict(), "model_type": None}, qtsplus_enabled=False)
    config._attn_implementation = "eager"
    torch.manual_seed(5)
    model = QTSplusQwen2_5_VLForConditionalGeneration(config).eval()
    missing, unexpected = model.load_state_dict(stock_model.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("qtsplus.") for key in missing)
    return model


def attended_logits(logits, batch):
    return logits[batch["attention_mask"].bool()]


@pytest.mark.parametrize("batch_name", BATCHES)
def test_disabled_forward_matches_stock(stock_model, batch_name, request):
    batch = request.getfixturevalue(batch_name)
    model = disabled_copy(stock_model)
    with torch.no_grad():
        expected = stock_model(**stock_inputs(batch)).logits
        got = model(**batch).logits  # the query mask is accepted and ignored
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert got.shape == expected.shape


@pytest.mark.parametrize("batch_name", BATCHES)
def test_keep_all_forward_matches_stock(stock_model, converted_model, batch_name, request):
    batch = request.getfixturevalue(batch_name)
    with torch.no_grad():
        expected = stock_model(**stock_inputs(batch)).logits
        outputs = converted_model(**batch, qtsplus_keep_ratio=1.0)
    assert outputs.logits.shape == expected.shape
    torch.testing.assert_close(attended_logits(outputs.logits, batch), attended_logits(expected, batch), atol=1e-5, rtol=0)
    assert outputs.qtsplus.num_kept == outputs.qtsplus.num_tokens


@pytest.mark.parametrize("batch_name", BATCHES)
def test_greedy_generate_matches_stock(stock_model, converted_model, batch_name, request):
    batch = request.getfixturevalue(batch_name)
    settings = dict(max_new_tokens=6, do_sample=False)
    expected = stock_model.generate(**stock_inputs(batch), **settings)
    assert torch.equal(converted_model.generate(**batch, qtsplus_keep_ratio=1.0, **settings), expected)
    assert torch.equal(disabled_copy(stock_model).generate(**batch, **settings), expected)


def test_keep_all_training_loss_matches_stock_and_adds_the_weighted_auxiliary_terms(stock_model, converted_model):
    from qtsplus_hf.tiny import video_prompt_batch

    batch = video_prompt_batch([[(4, 4, 4)], [(2, 4, 6)]], [5, 3], converted_model.config, padding_side="right")
    labels = torch.full_like(batch["input_ids"], -100)
    for row, length in enumerate(batch["attention_mask"].sum(-1).tolist()):  # the last three real tokens: the answer
        labels[row, length - 3 : length] = batch["input_ids"][row, length - 3 : length]
    batch.pop("qtsplus_query_mask")
    with torch.no_grad():
        expected = stock_model(**stock_inputs(batch), labels=labels).loss
        outputs = converted_model(**batch, labels=labels, qtsplus_keep_ratio=1.0)
    torch.testing.assert_close(outputs.lm_loss, expected, atol=1e-6, rtol=0)
    config = converted_model.config
    kept = torch.tensor([16.0, 12.0])  # every token, ratio 1.0
    torch.testing.assert_close(outputs.flops_loss, (kept / config.qtsplus_max_tokens).pow(2).mean())
    torch.testing.assert_close(outputs.kv_loss, (kept / config.qtsplus_max_tokens).mean())
    weighted = (
        config.qtsplus_lambda_flops * outputs.flops_loss
        + config.qtsplus_lambda_kv * outputs.kv_loss
        + config.qtsplus_lambda_smooth * outputs.smooth_loss
    )
    torch.testing.assert_close(outputs.loss, outputs.lm_loss + weighted)


def test_converted_model_has_lm_initialised_selector(stock_model, converted_model):
    scoring = converted_model.qtsplus.scoring_layers[0]
    source = stock_model.model.language_model.layers[0]
    assert torch.equal(scoring.q_proj.weight, source.self_attn.q_proj.weight)
    assert torch.equal(scoring.k_proj.bias, source.self_attn.k_proj.bias)
    assert torch.equal(scoring.kv_norm.weight, source.input_layernorm.weight)
    reencode = converted_model.qtsplus.reencode_layers[0].core
    assert torch.equal(reencode.v_proj.weight, source.self_attn.v_proj.weight)
    assert not reencode.o_proj.weight.any() and not reencode.ffn.net[2].weight.any()


def test_stock_weights_are_copied_not_shared(stock_model):
    stock = copy.deepcopy(stock_model)
    model = QTSplusQwen2_5_VLForConditionalGeneration.from_qwen2_5_vl(stock, qtsplus_max_tokens=32)
    assert model.config.qtsplus_max_tokens == 32 and model.config.model_type == "qtsplus_qwen2_5_vl"
    with torch.no_grad():
        stock.lm_head.weight.add_(1.0)
    assert not torch.equal(stock.lm_head.weight, model.lm_head.weight)
