"""Training mode through the whole model: the LM loss reaches the selector."""

import copy

import torch

from qtsplus_hf.tiny import video_prompt_batch


def test_lm_loss_gradients_reach_scoring_budget_and_reencoder(converted_model):
    model = copy.deepcopy(converted_model).train()
    batch = video_prompt_batch([[(4, 4, 4)], [(2, 4, 6), (2, 4, 4)]], [5, 3], model.config, padding_side="right")
    labels = torch.full_like(batch["input_ids"], -100)
    for row, length in enumerate(batch["attention_mask"].sum(-1).tolist()):
        labels[row, length - 2 : length] = batch["input_ids"][row, length - 2 : length]
    batch["qtsplus_query_mask"] &= labels == -100
    outputs = model(**batch, labels=labels)
    assert outputs.qtsplus.num_kept != outputs.qtsplus.num_tokens  # the predicted budget really dropped tokens
    outputs.lm_loss.backward()  # the LM loss alone, not the auxiliary terms
    selector = model.qtsplus
    for name, parameter in [
        ("scoring q_proj", selector.scoring_layers[0].q_proj.weight),
        ("scoring k_proj", selector.scoring_layers[0].k_proj.weight),
        ("budget head", selector.budget.mlp[0].weight),
        ("re-encoder o_proj", selector.reencode_layers[0].core.o_proj.weight),
        ("re-encoder feed-forward", selector.reencode_layers[0].core.ffn.net[2].weight),
    ]:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_eval_and_train_keep_the_same_tokens(converted_model, two_sample_batch):
    model = copy.deepcopy(converted_model)
    with torch.no_grad():
        evaluated = model.eval()(**two_sample_batch).qtsplus
        trained = model.train()(**two_sample_batch).qtsplus
    for a, b in zip(evaluated.kept_indices, trained.kept_indices):
        assert torch.equal(a, b)


def test_loaded_model_starts_the_smoothness_reference_from_zero(tmp_path):
    """rho_sum / rho_count are non-persistent: from_pretrained must initialise them, not leave raw memory."""
    from qtsplus_hf import QTSplusQwen2_5_VLForConditionalGeneration
    from qtsplus_hf.tiny import tiny_qtsplus_config

    model = QTSplusQwen2_5_VLForConditionalGeneration(tiny_qtsplus_config())
    model.qtsplus.rho_sum.fill_(5.0)
    model.qtsplus.rho_count.fill_(7.0)
    model.save_pretrained(tmp_path)
    # Leave freed scalar-sized blocks holding 5.0 for the allocator to hand out again, so raw memory shows.
    litter = [torch.full((), 5.0, dtype=torch.float64) for _ in range(1000)]
    del litter
    loaded = QTSplusQwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path).train()
    assert float(loaded.qtsplus.rho_sum) == 0.0 and float(loaded.qtsplus.rho_count) == 0.0
    rho = torch.tensor([0.2, 0.4])
    torch.testing.assert_close(loaded.qtsplus.smoothness_loss(rho), torch.tensor(0.01))  # around their own mean 0.3


def test_the_released_recipe_is_one_option_away_for_training(stock_model, tiny_checkpoint, tmp_path, caplog):
    """`TrainOptions(recipe="released")` / `qtsplus train --recipe released`: a stock folder is converted with the
    recipe's layer counts and initialisation; a QTSplus checkpoint takes τ, the λs and n_max and keeps its layers."""
    from qtsplus_hf.configuration_qtsplus import RECIPES
    from qtsplus_hf.tiny import tiny_processor
    from qtsplus_hf.training import LAYER_COUNT_FIELDS, load_model_and_processor

    recipe = RECIPES["released"]
    stock_model.save_pretrained(tmp_path / "stock")
    tiny_processor().save_pretrained(tmp_path / "stock")
    converted, _ = load_model_and_processor(str(tmp_path / "stock"), "released")
    assert {field: getattr(converted.config, field) for field in recipe} == recipe
    last_layer = stock_model.model.language_model.layers[-1].self_attn.q_proj.weight
    assert torch.equal(converted.qtsplus.scoring_layers[0].q_proj.weight, last_layer)

    checkpoint, _ = load_model_and_processor(tiny_checkpoint, "released")
    for field, value in recipe.items():
        if field not in LAYER_COUNT_FIELDS:
            assert getattr(checkpoint.config, field) == value, field
    assert checkpoint.config.qtsplus_num_reencode_layers == len(checkpoint.qtsplus.reencode_layers) == 1
    assert "qtsplus_num_reencode_layers stays 1" in caplog.text
