"""cfmoe.locality against textbook formulas written with explicit numpy loops, plus masking, gradient and input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cfmoe.locality import LOSS_KINDS, LocalityLoss, consecutive_pair_mask, locality_loss

TOP_K = 3


# ---- textbook references ---------------------------------------------------------------------------

def softmax(x):
    z = np.exp(x - x.max())
    return z / z.sum()


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def soft_topk(logits, k, temperature):
    ordered = sorted(logits, reverse=True)
    threshold = (ordered[k - 1] + ordered[k]) / 2
    s = np.array([1 / (1 + math.exp(-(x - threshold) / temperature)) for x in logits])
    return s / s.sum()


def reference_pair(x, y, kind, temperature=1.0):
    p, q = softmax(x), softmax(y)
    if kind == "l2":
        return sum((a - b) ** 2 for a, b in zip(p, q))
    if kind == "skl":
        return kl(p, q) + kl(q, p)
    if kind == "js":
        m = (p + q) / 2
        return kl(p, m) / 2 + kl(q, m) / 2
    u, v = soft_topk(x, TOP_K, temperature), soft_topk(y, TOP_K, temperature)
    return 1 - sum(min(a, b) for a, b in zip(u, v))


def reference_loss(layers, mask, kind, temperature=1.0):
    """Mean over valid pairs per layer (0 if none), then mean over layers; layers are (batch, seq, E) float64."""
    per_layer = []
    for logits in layers:
        values = [reference_pair(logits[b, t], logits[b, t + 1], kind, temperature)
                  for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
        per_layer.append(sum(values) / len(values) if values else 0.0)
    return sum(per_layer) / len(per_layer)


def random_inputs(batch=3, seq=7, n_experts=8, n_layers=3, scale=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = [(scale * torch.randn(batch, seq, n_experts, generator=gen)).requires_grad_() for _ in range(n_layers)]
    mask = torch.rand(batch, seq - 1, generator=gen) < 0.6
    mask[0, 0] = True
    return logits, mask


def loss_kwargs(kind):
    return {"kind": kind, "top_k": TOP_K}


# ---- values ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_textbook_formula(kind, seed):
    logits, mask = random_inputs(seed=seed)
    expected = reference_loss([x.detach().double().numpy() for x in logits], mask.numpy(), kind)
    assert locality_loss(logits, mask, **loss_kwargs(kind)).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_temperature_is_used():
    logits, mask = random_inputs()
    expected = reference_loss([x.detach().double().numpy() for x in logits], mask.numpy(), "topk_overlap", 0.3)
    assert locality_loss(logits, mask, "topk_overlap", TOP_K, temperature=0.3).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_zero_for_identical_consecutive_distributions(kind):
    base = torch.randn(1, 1, 8).expand(2, 6, 8)
    shift = torch.randn(2, 6, 1)  # softmax ignores a per-token constant, so the distributions are identical
    loss = locality_loss([base + shift, 3 * base], torch.ones(2, 5, dtype=torch.bool), **loss_kwargs(kind))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_topk_overlap_tends_to_one_minus_ecr():
    logits = torch.tensor([[[5.0, 4, 3, 0, 0, 0], [0, 4, 3, 5, 0, 0], [0, 0, 0, 5, 4, 3]]])  # sets {0,1,2},{1,2,3},{3,4,5}
    loss = locality_loss([logits], torch.ones(1, 2, dtype=torch.bool), "topk_overlap", 3, temperature=1e-2)
    assert loss.item() == pytest.approx(1 - (2 / 3 + 1 / 3) / 2, abs=1e-4)


def test_flattened_and_3d_inputs_agree():
    logits, mask = random_inputs()
    for kind in LOSS_KINDS:
        flat = [x.reshape(-1, x.shape[-1]) for x in logits]
        assert torch.equal(locality_loss(flat, mask, **loss_kwargs(kind)), locality_loss(logits, mask, **loss_kwargs(kind)))


def test_class_matches_function():
    logits, mask = random_inputs()
    for kind in LOSS_KINDS:
        assert torch.equal(LocalityLoss(kind, TOP_K)(logits, mask), locality_loss(logits, mask, kind, TOP_K))


def test_bf16_logits_are_computed_in_float32():
    logits, mask = random_inputs()
    for kind in LOSS_KINDS:
        low = [x.detach().bfloat16().requires_grad_() for x in logits]
        loss = locality_loss(low, mask, **loss_kwargs(kind))
        assert loss.dtype == torch.float32
        assert torch.equal(loss, locality_loss([x.float() for x in low], mask, **loss_kwargs(kind)))
        loss.backward()
        assert all(x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all() for x in low)


# ---- gradients and masks ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("extreme", [False, True])
def test_gradients_are_finite_and_reach_the_logits(kind, extreme):
    logits, mask = random_inputs()
    if extreme:  # every logit exactly ±30: softmax tails near 1e-26, many ties at the top-k boundary
        logits = [torch.where(x.detach() > 0, 30.0, -30.0).requires_grad_() for x in logits]
    loss = locality_loss(logits, mask, **loss_kwargs(kind))
    loss.backward()
    assert torch.isfinite(loss)
    for x in logits:
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_tokens_outside_valid_pairs_do_not_matter(kind):
    logits, _ = random_inputs(batch=2, seq=6)
    mask = torch.tensor([[True, True, False, False, True], [False, False, False, True, True]])
    untouched = [(0, 3), (1, 0), (1, 1), (1, 2)]  # no valid pair includes these tokens
    loss = locality_loss(logits, mask, **loss_kwargs(kind))
    loss.backward()
    changed = [x.detach().clone() for x in logits]
    for x in changed:
        for b, t in untouched:
            x[b, t] = 100 * torch.randn(x.shape[-1])
    assert torch.equal(locality_loss(changed, mask, **loss_kwargs(kind)), loss)
    for x in logits:
        for b, t in untouched:
            assert torch.all(x.grad[b, t] == 0)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_fully_masked_batch_gives_zero_and_zero_grad(kind):
    logits, mask = random_inputs()
    loss = locality_loss(logits, torch.zeros_like(mask), **loss_kwargs(kind))
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.all(x.grad == 0) for x in logits)


def test_consecutive_pair_mask():
    attention = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    documents = torch.tensor([[0, 0, 0, 1, 1], [2, 2, 3, 3, 3]])
    expected_padding = torch.tensor([[False, True, True, True], [True, True, False, False]])
    assert torch.equal(consecutive_pair_mask(attention), expected_padding)
    expected_both = torch.tensor([[False, True, False, True], [True, False, False, False]])
    assert torch.equal(consecutive_pair_mask(attention.bool(), documents), expected_both)


# ---- bad input -------------------------------------------------------------------------------------

def test_bad_input_messages():
    logits, mask = random_inputs()
    with pytest.raises(ValueError, match=r"unknown locality loss kind 'kl'; valid kinds: l2, skl, js, topk_overlap"):
        locality_loss(logits, mask, "kl")
    with pytest.raises(ValueError, match="unknown locality loss kind 'cosine'"):
        LocalityLoss("cosine")
    with pytest.raises(ValueError, match="kind='topk_overlap' needs top_k"):
        LocalityLoss("topk_overlap")
    with pytest.raises(ValueError, match=r"top_k must be in 1..n_experts-1=7, got 8"):
        locality_loss(logits, mask, "topk_overlap", top_k=8)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        LocalityLoss("topk_overlap", 2, temperature=0)
    with pytest.raises(ValueError, match=r"router_logits\[0\] has shape \(20, 8\); .* expected \(21, n_experts\) or \(3, 7, n_experts\)"):
        locality_loss([torch.zeros(20, 8)], mask)
    with pytest.raises(ValueError, match="pair_mask must be a bool tensor of shape"):
        locality_loss(logits, mask.long())
    with pytest.raises(ValueError, match="one tensor per MoE layer"):
        locality_loss(logits[0], mask)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, seq\), got \(7,\)"):
        consecutive_pair_mask(torch.ones(7))
    with pytest.raises(ValueError, match=r"document_ids must have attention_mask's shape \(1, 7\), got \(1, 6\)"):
        consecutive_pair_mask(torch.ones(1, 7), torch.zeros(1, 6))
