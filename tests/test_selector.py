"""The selector on its own: scoring, budget, top-n, the training gate and the re-encoder."""

import math

import pytest
import torch

from qtsplus_hf.selector_qtsplus import (
    QTSplusSelector,
    budget_to_token_count,
    soft_threshold,
    top_n_mask,
)
from qtsplus_hf.tiny import tiny_qtsplus_config


def make_selector(**overrides) -> QTSplusSelector:
    torch.manual_seed(0)
    selector = QTSplusSelector(tiny_qtsplus_config(**overrides))
    for module in selector.modules():  # a trained-looking selector: no zero branches
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.2)
    return selector.eval()


def padded_videos(lengths, query_lengths, dim=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    videos = torch.randn(len(lengths), max(lengths), dim, generator=generator)
    video_mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    query = torch.randn(len(lengths), max(query_lengths), dim, generator=generator)
    query_mask = torch.arange(max(query_lengths))[None, :] < torch.tensor(query_lengths)[:, None]
    seconds = torch.arange(max(lengths)).float()[None, :].expand(len(lengths), -1) / 4
    return videos * video_mask[..., None], video_mask, query * query_mask[..., None], query_mask, seconds


def test_scores_are_the_max_attention_probability_over_heads_and_question_tokens():
    selector = make_selector()
    video, video_mask, query, query_mask, _ = padded_videos([12], [3])
    layer = selector.scoring_layers[0]
    # Hand computation with the key/value heads repeated, as the LM's attention does.
    q, k, _ = layer.project(query, video)
    k = k.repeat_interleave(layer.num_heads // layer.num_key_value_heads, dim=1)
    probs = (q @ k.transpose(-1, -2) / math.sqrt(layer.head_dim)).softmax(-1)
    expected = probs.amax(dim=(1, 2))
    scores = selector.score(video, video_mask, query, query_mask)
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-5)
    assert scores.shape == (1, 12) and bool(((scores >= 0) & (scores <= 1)).all())


def test_budget_count_is_clamped_ceil():
    rho = torch.tensor([0.1, 0.25, 0.5, 0.01, 0.5])
    num_tokens = torch.tensor([30, 10, 7, 20, 1000])
    counts = budget_to_token_count(rho, num_tokens, max_tokens=100)
    assert counts.tolist() == [3, 3, 4, 1, 100]  # ceil(3.0)=3, ceil(2.5)=3, ceil(3.5)=4, clamp 0.2->1, n_max
    assert budget_to_token_count(torch.tensor([1.0]), torch.tensor([1000]), None).tolist() == [1000]


def test_top_n_keeps_the_highest_scores_of_each_video():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.0], [0.5, 0.2, 0.7, 0.0, 0.0]])
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    keep = top_n_mask(scores, torch.tensor([2, 3]), valid)
    assert keep.tolist() == [[False, True, False, True, False], [True, True, True, False, False]]


@pytest.mark.parametrize("keep_ratio", [None, 0.25])
def test_selection_shapes_counts_and_order(keep_ratio):
    selector = make_selector(qtsplus_max_tokens=6)
    video, video_mask, query, query_mask, seconds = padded_videos([40, 9], [4, 2])
    keep, kept, rho, scores = selector(video, video_mask, query, query_mask, seconds, keep_ratio)
    num_tokens = video_mask.sum(-1)
    if keep_ratio is None:
        assert bool(((rho >= 0.05) & (rho <= 0.5)).all())
        expected = [min(max(math.ceil(r * m * (1 - 1e-6)), 1), 6) for r, m in zip(rho.tolist(), num_tokens.tolist())]
    else:
        expected = [math.ceil(keep_ratio * m) for m in num_tokens.tolist()]
    assert keep.sum(-1).tolist() == expected
    assert kept.shape == (sum(expected), 64)
    assert not bool((keep & ~video_mask).any()), "padding was selected"
    for v in range(2):
        indices = keep[v].nonzero().flatten()
        assert torch.equal(indices, indices.unique(sorted=True))  # ascending and unique
        dropped = scores[v][video_mask[v] & ~keep[v]]
        if dropped.numel():
            assert scores[v][indices].min() >= dropped.max()


def test_batch_of_two_videos_equals_one_at_a_time():
    selector = make_selector()
    video, video_mask, query, query_mask, seconds = padded_videos([40, 9], [4, 2])
    keep, kept, rho, scores = selector(video, video_mask, query, query_mask, seconds)
    offset = 0
    for v, length in enumerate([40, 9]):
        single = selector(
            video[v : v + 1, :length], video_mask[v : v + 1, :length], query[v : v + 1, : query_mask[v].sum()],
            query_mask[v : v + 1, : query_mask[v].sum()], seconds[v : v + 1, :length],
        )
        n = int(single[0].sum())
        assert torch.equal(single[0][0], keep[v, :length])
        torch.testing.assert_close(single[1], kept[offset : offset + n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(single[2], rho[v : v + 1])
        torch.testing.assert_close(single[3][0], scores[v, :length], atol=1e-6, rtol=1e-5)
        offset += n


def test_soft_threshold_hits_the_budget_and_has_the_implicit_gradient():
    torch.manual_seed(0)
    scores = torch.rand(2, 50, dtype=torch.float64, requires_grad=True)
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, 30:] = False
    rho = torch.tensor([0.2, 0.4], dtype=torch.float64, requires_grad=True)
    tau = 0.1
    t = soft_threshold(scores, rho, valid, tau)
    kept_mass = (torch.sigmoid((scores - t[:, None]) / tau) * valid).sum(-1)
    torch.testing.assert_close(kept_mass, rho * valid.sum(-1))
    # Implicit differentiation by hand: F(t, ρ) = Σ σ((r − t)/τ) − ρM = 0 gives dt/dρ = −M / (Σ σ'(·)/τ).
    t.sum().backward()
    s = torch.sigmoid((scores.detach() - t.detach()[:, None]) / tau) * valid
    expected = -valid.sum(-1) / ((s * (1 - s)).sum(-1) / tau)
    torch.testing.assert_close(rho.grad, expected)
    # ... and agrees with a finite difference of the root itself.
    step = 1e-6
    shifted = soft_threshold(scores.detach(), rho.detach() + torch.tensor([step, 0.0], dtype=torch.float64), valid, tau)
    assert abs((shifted[0] - t[0]).item() / step - rho.grad[0].item()) < 1e-3 * abs(rho.grad[0].item())


def test_training_gate_sends_gradients_to_scoring_and_budget_and_leaves_forward_values_unchanged():
    selector = make_selector()
    video, video_mask, query, query_mask, seconds = padded_videos([40, 9], [4, 2])
    selector.eval()
    _, kept_eval, _, _ = selector(video, video_mask, query, query_mask, seconds)
    selector.train()
    keep, kept, rho, _ = selector(video, video_mask, query, query_mask, seconds)
    torch.testing.assert_close(kept, kept_eval)  # hard keep/drop in the forward pass
    (kept * torch.randn_like(kept)).sum().backward()
    layer = selector.scoring_layers[0]
    for name, parameter in [
        ("scoring q_proj", layer.q_proj.weight), ("scoring k_proj", layer.k_proj.weight),
        ("scoring kv_norm", layer.kv_norm.weight), ("budget mlp.0", selector.budget.mlp[0].weight),
        ("budget mlp.2", selector.budget.mlp[2].weight),
        ("re-encoder q_proj", selector.reencode_layers[0].core.q_proj.weight),
        ("time embedding", selector.time_embedding.proj.weight),
    ]:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_fresh_reencoder_is_the_identity_and_time_changes_a_trained_one(config):
    from qtsplus_hf import QTSplusQwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    selector = QTSplusQwen2_5_VLForConditionalGeneration(config).qtsplus.eval()
    kept = torch.randn(2, 5, 64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    seconds = torch.arange(5.0)[None].expand(2, -1)
    assert torch.equal(selector.reencode(kept, mask, seconds), kept)
    trained = make_selector()
    earlier = trained.reencode(kept, mask, seconds)
    later = trained.reencode(kept, mask, seconds + 30.0)
    assert not torch.allclose(earlier, later), "the timestamps do not reach the re-encoder"


def test_training_gate_budget_is_capped_by_n_max():
    selector = make_selector(qtsplus_max_tokens=4).train()
    video, video_mask, query, query_mask, seconds = padded_videos([64], [3])
    keep, _, rho, scores = selector(video, video_mask, query, query_mask, seconds)
    assert int(keep.sum()) == 4
    threshold = soft_threshold(scores, rho, video_mask, 0.1, max_tokens=4)
    soft_mass = torch.sigmoid((scores - threshold[:, None]) / 0.1).sum()
    torch.testing.assert_close(soft_mass, torch.tensor(4.0), atol=1e-3, rtol=0)


def test_predicted_budget_is_the_budget_head_on_the_question_and_the_score_statistics():
    """ρ by hand: ρ_min + (ρ_max − ρ_min)·σ(MLP([mean question, log M, max r, H(r / Σr)])), per video of a padded
    batch (M, the entropy and the question mean over each video's own tokens), then n = min(⌈ρM⌉, n_max)."""
    selector = make_selector(qtsplus_rho_min=0.05, qtsplus_rho_max=0.9, qtsplus_max_tokens=30)
    video, video_mask, query, query_mask, seconds = padded_videos([40, 9], [4, 2])
    keep, _, rho, scores = selector(video, video_mask, query, query_mask, seconds)
    head = selector.budget.mlp
    for v, (length, question) in enumerate([(40, 4), (9, 2)]):
        r = scores[v, :length]
        p = r / r.sum()
        features = torch.cat([query[v, :question].mean(0),
                              torch.stack([torch.tensor(length).float().log(), r.max(), -(p * p.log()).sum()])])
        with torch.no_grad():
            expected = 0.05 + 0.85 * torch.sigmoid(head(features)).squeeze()
        torch.testing.assert_close(rho[v], expected, atol=1e-6, rtol=0)
        assert int(keep[v].sum()) == min(math.ceil(float(expected) * length), 30)
