"""Issue 11's training signals and scoring options, each against a hand computation or a counterfactual input:
the grounding and distillation losses, the LM-attention teacher, the exploring gate, the weighted aggregation over
question tokens, the relevance embedding, the selection-score override, and the evidence token mask."""

import math

import pytest
import torch

from qtsplus_hf import QTSplusQwen2_5_VLForConditionalGeneration
from qtsplus_hf.evidence import evidence_figures, evidence_token_mask
from qtsplus_hf.selector_qtsplus import (
    IGNORE_INDEX,
    QTSplusSelector,
    distillation_loss,
    grounding_loss,
)
from qtsplus_hf.tiny import tiny_qtsplus_config, video_prompt_batch

from test_selector import make_selector, padded_videos


def test_grounding_loss_is_the_listwise_cross_entropy_of_the_evidence():
    scores = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]])
    video_mask = torch.tensor([[True, True, True, False], [True] * 4])
    evidence = torch.tensor([[False, True, False, False], [True, False, False, True]])
    expected = (-math.log(0.25 / 1.0) + (-math.log(0.1) - math.log(0.4)) / 2) / 2
    assert float(grounding_loss(scores, video_mask, evidence)) == pytest.approx(expected, rel=1e-5)
    # Videos without evidence do not count; no evidence anywhere: no loss.
    only_first = evidence.clone()
    only_first[1] = False
    assert float(grounding_loss(scores, video_mask, only_first)) == pytest.approx(-math.log(0.25), rel=1e-5)
    assert grounding_loss(scores, video_mask, torch.zeros_like(evidence)) is None


def test_distillation_loss_is_kl_of_the_teacher_to_the_normalised_scores():
    scores = torch.tensor([[0.2, 0.6, 0.2]])
    teacher = torch.tensor([[0.1, 0.8, 0.1]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    expected = sum(t * math.log(t / p) for t, p in zip([0.1, 0.8, 0.1], [0.2, 0.6, 0.2]))
    assert float(distillation_loss(scores, mask, teacher)) == pytest.approx(expected, rel=1e-5)
    assert float(distillation_loss(teacher, mask, teacher)) == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(scores, mask, torch.zeros_like(teacher)) is None


def test_weighted_aggregation_matches_a_hand_computation_and_starts_as_the_mean():
    selector = make_selector(qtsplus_score_aggregation="weighted")
    video, video_mask, query, query_mask, _ = padded_videos([12, 7], [3, 2])
    layer = selector.scoring_layers[0]
    q, k, _ = layer.project(query, video)
    k = k.repeat_interleave(layer.num_heads // layer.num_key_value_heads, dim=1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(layer.head_dim)
    probs = logits.masked_fill(~video_mask[:, None, None, :], float("-inf")).softmax(-1)  # [V, H, L, M]
    token_logits = selector.query_token_weights(layer.q_norm(query)).masked_fill(~query_mask[..., None], -math.inf)
    weights = token_logits.softmax(1).permute(0, 2, 1)  # [V, H, L]
    expected = (probs * weights[..., None]).sum(2).amax(1) * video_mask
    scores = selector.score(video, video_mask, query, query_mask)
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-5)
    # Zero-initialised weights: the mean over the real question tokens, per head, then the max over heads.
    torch.nn.init.zeros_(selector.query_token_weights.weight)
    torch.nn.init.zeros_(selector.query_token_weights.bias)
    mean = (probs * query_mask[:, None, :, None]).sum(2) / query_mask.sum(-1)[:, None, None]
    torch.testing.assert_close(selector.score(video, video_mask, query, query_mask), mean.amax(1) * video_mask,
                               atol=1e-6, rtol=1e-5)


def test_exploring_gate_keeps_extra_dropped_tokens_in_training_only():
    selector = make_selector(qtsplus_explore_ratio=0.5)
    video, video_mask, query, query_mask, seconds = padded_videos([40], [3])
    selector.eval()
    keep_eval, _, _, scores = selector(video, video_mask, query, query_mask, seconds, 0.1)
    assert int(keep_eval.sum()) == 4
    selector.train()
    torch.manual_seed(0)
    keep, kept, _, _ = selector(video, video_mask, query, query_mask, seconds, 0.1)
    assert bool((keep & keep_eval).sum() == 4), "the top-n is always kept"
    assert int(keep.sum()) == 4 + 18  # half of the 36 dropped tokens
    assert kept.shape[0] == int(keep.sum())
    # Off: the training gate keeps exactly the top-n.
    selector.config.qtsplus_explore_ratio = 0.0
    keep_off, _, _, _ = selector(video, video_mask, query, query_mask, seconds, 0.1)
    assert torch.equal(keep_off, keep_eval)


def test_explored_tokens_pass_the_lm_gradient_back_to_their_scores():
    """An explored token's gate is 1 + (r - r.detach()) / 4τ: value 1, and d loss / d r = <d loss / d x, x> / 4τ."""
    selector = make_selector(qtsplus_explore_ratio=0.5, qtsplus_num_reencode_layers=0)
    video, video_mask, query, query_mask, seconds = padded_videos([30], [3])
    top_n, _, _, _ = selector.eval()(video, video_mask, query, query_mask, seconds, 0.1)
    torch.manual_seed(0)
    keep, kept, _, scores = selector.train()(video, video_mask, query, query_mask, seconds, 0.1)
    explored = keep & ~top_n
    assert int(explored.sum()) == round(27 * 0.5)
    rows = keep[0].nonzero().flatten()
    torch.testing.assert_close(kept, video[0, rows])  # every gate is 1 in value
    weights = torch.randn(kept.shape, generator=torch.Generator().manual_seed(1))
    weights[top_n[0, rows]] = 0.0  # only the explored tokens reach the loss
    (grad,) = torch.autograd.grad((kept * weights).sum(), scores)
    expected = torch.zeros(30)
    expected[rows] = (weights * video[0, rows]).sum(-1) / (4 * selector.config.qtsplus_tau)
    expected[top_n[0]] = 0.0
    torch.testing.assert_close(grad[0], expected, atol=1e-5, rtol=1e-4)


def test_relevance_embedding_adds_the_normalised_log_relevance_direction():
    config = tiny_qtsplus_config(qtsplus_relevance_embedding=True, qtsplus_num_reencode_layers=0)
    torch.manual_seed(0)
    selector = QTSplusSelector(config).eval()
    torch.nn.init.normal_(selector.relevance_embedding.proj.weight)
    video, video_mask, query, query_mask, seconds = padded_videos([16], [3])
    keep, kept, _, scores = selector(video, video_mask, query, query_mask, seconds, 0.25)
    feature = ((scores[keep].log() + math.log(16)) / math.log(16)).clamp(-1, 1)
    direction = selector.relevance_embedding.proj.weight[:, 0]
    torch.testing.assert_close(kept, video[keep] + feature[:, None] * direction[None, :], atol=1e-5, rtol=1e-5)


def test_selection_scores_choose_the_tokens_and_the_selector_still_scores(two_sample_batch):
    torch.manual_seed(0)
    model = QTSplusQwen2_5_VLForConditionalGeneration(tiny_qtsplus_config()).eval()
    own = model.select(**two_sample_batch, qtsplus_keep_ratio=0.25)
    forced = [torch.arange(m, dtype=torch.float32) for m in own.num_tokens]  # rank by position: the last tokens
    selection = model.select(**two_sample_batch, qtsplus_keep_ratio=0.25, qtsplus_selection_scores=forced)
    for kept, total in zip(selection.kept_indices, selection.num_tokens):
        assert kept.tolist() == list(range(total - math.ceil(0.25 * total), total))
    for mine, theirs in zip(selection.scores, own.scores):
        torch.testing.assert_close(mine, theirs)
    with pytest.raises(ValueError, match="one score per video token"):
        model.select(**two_sample_batch, qtsplus_selection_scores=[torch.zeros(3), torch.zeros(3)])


def _question_batch(config, question_ids, system_ids):
    """One video row: `system_ids` + video + `question_ids`, with the question marked."""
    batch = video_prompt_batch([[(2, 4, 4)]], [1], config, seed=5)
    ids = batch["input_ids"][0]
    video = ids[(ids == config.video_token_id)]
    start = torch.tensor([config.vision_start_token_id]), torch.tensor([config.vision_end_token_id])
    row = torch.cat([torch.tensor(system_ids), start[0], video, start[1], torch.tensor(question_ids)])
    query = torch.zeros_like(row, dtype=torch.bool)
    query[-len(question_ids):] = True
    batch = dict(batch)
    batch["input_ids"], batch["attention_mask"] = row[None], torch.ones_like(row)[None]
    batch["qtsplus_query_mask"] = query[None]
    batch.pop("mm_token_type_ids", None)
    return batch


def test_scores_change_with_the_question_and_not_with_the_system_prompt():
    config = tiny_qtsplus_config()
    torch.manual_seed(0)
    model = QTSplusQwen2_5_VLForConditionalGeneration(config).eval()
    base = model.select(**_question_batch(config, [20, 21, 22], [10, 11, 12])).scores[0]
    other_question = model.select(**_question_batch(config, [20, 40, 22], [10, 11, 12])).scores[0]
    other_system = model.select(**_question_batch(config, [20, 21, 22], [13, 14, 15, 16])).scores[0]
    assert not torch.allclose(base, other_question, atol=1e-4)
    torch.testing.assert_close(base, other_system)


def test_teacher_is_the_lm_attention_of_the_reader_rows_over_the_video(config):
    """The recorder's reader-row attention equals eager attention's probabilities read off the same rows, on a
    right-padded batch (the training collator's layout)."""
    torch.manual_seed(0)
    model = QTSplusQwen2_5_VLForConditionalGeneration(config).eval()
    batch = video_prompt_batch([[(4, 4, 4)], [(2, 4, 6)]], [5, 3], config, padding_side="right")
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    last = batch["attention_mask"].sum(-1) - 1  # each row's last token is its answer: the row before it reads
    labels[torch.arange(2), last] = batch["input_ids"][torch.arange(2), last]
    inputs = model.prepare_qtsplus_inputs(**batch, labels=labels, qtsplus_keep_ratio=1.0, with_teacher=True)
    # Reference: the stock model's eager attention over the full prompt.
    model.model.language_model.set_attn_implementation("eager")
    stock = super(QTSplusQwen2_5_VLForConditionalGeneration, model).forward(
        **{k: v for k, v in batch.items() if k != "qtsplus_query_mask"}, output_attentions=True
    )
    model.model.language_model.set_attn_implementation("sdpa")
    question = batch["qtsplus_query_mask"].bool() & batch["attention_mask"].bool() & (labels == IGNORE_INDEX)
    readers = question.clone()
    readers[:, :-1] |= labels[:, 1:] != IGNORE_INDEX
    video = batch["input_ids"] == config.video_token_id
    expected = []
    for row in range(2):
        attention = sum(layer[row].mean(0)[readers[row]].mean(0) for layer in stock.attentions)
        on_video = attention[video[row]]
        expected.append(on_video / on_video.sum())
    for row, target in enumerate(expected):
        torch.testing.assert_close(inputs.teacher[row, : len(target)], target, atol=1e-6, rtol=1e-5)
    assert float(inputs.teacher[1, len(expected[1]):].abs().sum()) == 0.0  # past the shorter video: nothing


def test_training_forward_adds_the_weighted_signals_to_the_loss(two_sample_batch):
    config = tiny_qtsplus_config(qtsplus_lambda_grounding=0.5, qtsplus_lambda_distill=0.25)
    torch.manual_seed(0)
    model = QTSplusQwen2_5_VLForConditionalGeneration(config).train()
    batch = dict(two_sample_batch)
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    labels[:, -1] = batch["input_ids"][:, -1]
    evidence = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    evidence[0, (batch["input_ids"][0] == config.video_token_id).nonzero()[:2, 0]] = True
    out = model(**batch, labels=labels, qtsplus_keep_ratio=0.5, qtsplus_evidence_mask=evidence)
    assert out.grounding_loss is not None and out.distill_loss is not None
    expected = (out.lm_loss + config.qtsplus_lambda_flops * out.flops_loss + config.qtsplus_lambda_kv * out.kv_loss
                + config.qtsplus_lambda_smooth * out.smooth_loss + 0.5 * out.grounding_loss + 0.25 * out.distill_loss)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    scoring = model.qtsplus.scoring_layers[0].q_proj.weight.grad
    assert scoring is not None and float(scoring.abs().sum()) > 0


def test_evidence_token_mask_from_seconds_and_boxes():
    # 3 temporal patches of 2 s each, a 4x4 merged grid (grid_thw (3, 8, 8), merge 2).
    mask = evidence_token_mask((3, 8, 8), 2.0, 2, seconds=[2.5], boxes=[[4.0, 0.5, 0.0, 0.75, 0.25]])
    expected = torch.zeros(3, 16, dtype=torch.bool)
    expected[1] = True  # second 2.5 lies in patch 1: all of it
    expected[2, 2] = True  # the box x in [0.5, 0.75), y in [0, 0.25) of patch 2: row 0, column 2
    assert torch.equal(mask, expected.flatten())
    with pytest.raises(ValueError, match="evidence box"):
        evidence_token_mask((3, 8, 8), 2.0, 2, boxes=[[0, 0.5, 0.5, 0.4, 0.6]])


def test_evidence_figures_by_hand():
    evidence = torch.zeros(8, dtype=torch.bool)
    evidence[[1, 6]] = True  # tokens_per_patch 4: patch 0 and patch 1 each hold one evidence token
    scores = torch.tensor([0.0, 0.9, 0.1, 0.2, 0.3, 0.4, 0.8, 0.0])
    figures = evidence_figures(scores, torch.tensor([1, 5]), evidence, tokens_per_patch=4)
    assert figures == {"token_recall": 0.5, "second_recall": 0.5, "top_scored": 1.0}
    scores[5] = 0.85  # now the top two are 1 and 5
    assert evidence_figures(scores, torch.tensor([1, 6]), evidence, 4)["top_scored"] == 0.0
    assert evidence_figures(scores, torch.tensor([1]), torch.zeros(8, dtype=torch.bool), 4) is None
