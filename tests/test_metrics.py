"""cfmoe.metrics against slow, obvious references (Python loops and sets), hand examples and Monte Carlo."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cfmoe import metrics


# ---- slow references, written the obvious way ----------------------------------------------------

def ref_ecr_pairs(experts):
    """[pair][layer] |S_t ∩ S_{t+1}| / k with Python sets."""
    trace = experts.tolist()
    return [[len(set(a) & set(b)) / len(a) for a, b in zip(trace[t], trace[t + 1])] for t in range(len(trace) - 1)]


def ref_gds_pairs(probs):
    """[pair][layer] (cos + 1) / 2 in float64 with explicit sums."""
    out = []
    for t in range(len(probs) - 1):
        row = []
        for p, q in zip(probs[t].astype(float).tolist(), probs[t + 1].astype(float).tolist()):
            dot = sum(a * b for a, b in zip(p, q))
            row.append((dot / math.sqrt(sum(a * a for a in p) * sum(b * b for b in q)) + 1) / 2)
        out.append(row)
    return out


def ref_mean(pairs, valid_pairs=None, per_layer=False):
    kept = [row for t, row in enumerate(pairs) if valid_pairs is None or valid_pairs[t]]
    layers = [sum(row[layer] for row in kept) / len(kept) for layer in range(len(kept[0]))]
    return layers if per_layer else sum(layers) / len(layers)


def ref_reuse_distances(experts):
    n_tokens, n_layers, k = experts.shape
    out = np.zeros(experts.shape, int)
    for layer in range(n_layers):
        last = {}
        for t in range(n_tokens):
            for j in range(k):
                e = int(experts[t, layer, j])
                out[t, layer, j] = t - last[e] if e in last else 0
                last[e] = t
    return out


def ref_load(experts, n_experts):
    n_tokens, n_layers, _ = experts.shape
    load = np.zeros((n_layers, n_experts))
    for t in range(n_tokens):
        for layer in range(n_layers):
            for e in experts[t, layer]:
                load[layer, e] += 1 / n_tokens
    return load


def simulate_lru(draws, capacity, sequential):
    """Hit rate of one LRU cache over per-token expert sets, after a warm-up quarter of the tokens."""
    cache, hits, accesses = OrderedDict(), 0, 0
    warm = len(draws) // 4
    for t, experts in enumerate(draws):
        if not sequential:  # the whole set is looked up before any of it is inserted
            hits += sum(e in cache for e in experts) if t >= warm else 0
        for e in experts:
            if sequential and t >= warm:
                hits += e in cache
            cache[e] = None
            cache.move_to_end(e)
            if sequential:
                while len(cache) > capacity:
                    cache.popitem(last=False)
        while len(cache) > capacity:  # LRU entries first, so the current token's set goes last
            cache.popitem(last=False)
        accesses += len(experts) if t >= warm else 0
    return hits / accesses


# ---- random traces ---------------------------------------------------------------------------------

@st.composite
def traces(draw, min_tokens=2):
    """A random trace (experts, n_experts) whose tokens often repeat the previous set, so overlaps vary."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_tokens, n_layers = draw(st.integers(min_tokens, 25)), draw(st.integers(1, 4))
    n_experts = draw(st.integers(1, 12))
    k = draw(st.integers(1, n_experts))
    experts = np.argsort(rng.random((n_tokens, n_layers, n_experts)), axis=-1)[..., :k]
    for t in np.flatnonzero(rng.random(n_tokens - 1) < draw(st.floats(0, 0.8))) + 1:
        experts[t] = experts[t - 1]
    return experts, n_experts


def random_trace(n_tokens=200, n_layers=3, k=4, n_experts=16, seed=0):
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((n_tokens, n_layers, n_experts)), axis=-1)[..., :k]


# ---- equality with the references ------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(traces(), st.integers(0, 2**32 - 1))
def test_ecr_matches_reference(trace, mask_seed):
    experts, _ = trace
    pairs = ref_ecr_pairs(experts)
    assert metrics.expert_consistency_rate(experts) == pytest.approx(ref_mean(pairs))
    np.testing.assert_allclose(metrics.expert_consistency_rate(experts, per_layer=True), ref_mean(pairs, per_layer=True))
    valid = np.random.default_rng(mask_seed).random(len(experts) - 1) < 0.5
    valid[0] = True
    np.testing.assert_allclose(metrics.expert_consistency_rate(experts, True, valid), ref_mean(pairs, valid, True))
    assert metrics.expert_consistency_rate(experts, valid_pairs=valid) == pytest.approx(ref_mean(pairs, valid))


@settings(max_examples=40, deadline=None)
@given(traces())
def test_lal_matches_reference(trace):
    experts, _ = trace
    per_layer = ref_mean(ref_ecr_pairs(experts), per_layer=True)
    n_layers = len(per_layer)
    expected = sum(ecr * (layer + 1) / n_layers for layer, ecr in enumerate(per_layer))
    assert metrics.layer_aware_locality(experts) == pytest.approx(expected)


@settings(max_examples=60, deadline=None)
@given(traces(min_tokens=1))
def test_reuse_distances_and_histogram_match_reference(trace):
    experts, _ = trace
    expected = ref_reuse_distances(experts)
    np.testing.assert_array_equal(metrics.reuse_distances(experts), expected)
    n_tokens, n_layers, k = experts.shape
    hist = metrics.reuse_distance_histogram(experts)
    assert hist.shape == (n_layers, max(n_tokens, 2))
    for layer in range(n_layers):
        for d in range(hist.shape[1]):
            assert hist[layer, d] == np.sum(expected[:, layer] == d)
    np.testing.assert_array_equal(hist.sum(axis=1), n_tokens * k)
    folded = metrics.reuse_distance_histogram(experts, max_distance=2)
    np.testing.assert_array_equal(folded[:, 2], (expected >= 2).sum(axis=(0, 2)))


@settings(max_examples=40, deadline=None)
@given(traces(min_tokens=1))
def test_load_matches_reference(trace):
    experts, n_experts = trace
    load = metrics.expert_load(experts, n_experts)
    np.testing.assert_allclose(load, ref_load(experts, n_experts))
    np.testing.assert_allclose(load.sum(axis=1), experts.shape[-1])
    k = experts.shape[-1]
    np.testing.assert_allclose(metrics.max_load_ratio(experts, n_experts), load.max(axis=1) / (k / n_experts))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_gds_matches_reference(dtype):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(30, 3, 8)) * 2
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(dtype)
    probs[5:9] = probs[4]  # some identical neighbours
    pairs = ref_gds_pairs(probs)
    valid = rng.random(29) < 0.6
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(metrics.gate_distribution_similarity(probs), ref_mean(pairs), rtol=rtol)
    np.testing.assert_allclose(metrics.gate_distribution_similarity(probs, True, valid), ref_mean(pairs, valid, True), rtol=rtol)


def test_ecr_accepts_any_integer_layout():
    experts = random_trace()
    expected = metrics.expert_consistency_rate(experts)
    assert metrics.expert_consistency_rate(experts.astype(np.int16)) == expected
    assert metrics.expert_consistency_rate(np.asfortranarray(experts)) == expected
    assert metrics.expert_consistency_rate(experts.tolist()) == expected


# ---- hand examples ---------------------------------------------------------------------------------

def test_identical_tokens_give_ecr_and_gds_one():
    experts = np.tile(np.array([[3, 1, 4], [0, 5, 2]]), (10, 1, 1))
    assert metrics.expert_consistency_rate(experts) == 1.0
    assert metrics.layer_aware_locality(experts) == pytest.approx(1.5)  # (1/2 + 2/2) with two layers
    probs = np.tile(np.array([[0.7, 0.2, 0.1]]), (10, 1, 1))
    assert metrics.gate_distribution_similarity(probs) == pytest.approx(1.0)


def test_hand_example():
    experts = np.array([[0, 1], [1, 2], [2, 3], [0, 1]])[:, None, :]  # one layer, k=2
    assert metrics.expert_consistency_rate(experts) == pytest.approx((0.5 + 0.5 + 0) / 3)
    valid = np.array([True, False, True])
    assert metrics.expert_consistency_rate(experts, valid_pairs=valid) == pytest.approx(0.25)
    np.testing.assert_array_equal(metrics.reuse_distances(experts)[:, 0], [[0, 0], [1, 0], [1, 0], [3, 2]])
    np.testing.assert_array_equal(metrics.reuse_distance_histogram(experts), [[4, 2, 1, 1]])
    np.testing.assert_allclose(metrics.expert_load(experts, 5), [[0.5, 0.75, 0.5, 0.25, 0.0]])
    np.testing.assert_allclose(metrics.max_load_ratio(experts, 5), [0.75 / (2 / 5)])


def test_lal_weights_the_last_layer_by_one():
    experts = np.array([[[0, 1], [0, 1]], [[1, 2], [0, 1]]])  # layer ECRs 0.5 and 1
    assert metrics.layer_aware_locality(experts) == pytest.approx(0.5 * 1 / 2 + 1.0 * 2 / 2)


def test_gds_hand_values():
    orthogonal = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert metrics.gate_distribution_similarity(orthogonal) == pytest.approx(0.5)
    assert metrics.gate_distribution_similarity(-np.array([[[1.0, 2.0]], [[-1.0, -2.0]]])) == pytest.approx(0.0)


# ---- the i.i.d. baseline ---------------------------------------------------------------------------

def test_iid_ecr_matches_random_routing():
    assert metrics.iid_ecr(6, 64) == 6 / 64
    experts = random_trace(n_tokens=20_000, n_layers=2, k=6, n_experts=64, seed=3)
    assert metrics.expert_consistency_rate(experts) == pytest.approx(6 / 64, abs=0.004)


def test_iid_lru_hand_values():
    assert metrics.iid_lru_hit_rate(1, 64, 16) == 16 / 64
    assert metrics.iid_lru_hit_rate(6, 64, 16, sequential=False) == 16 / 64
    assert metrics.iid_lru_hit_rate(2, 4, 2) == pytest.approx((2 / 4 + 1 / 3) / 2)
    np.testing.assert_allclose(metrics.iid_lru_hit_curve(3, 8, [0, 1, 8, 20]), [0, 1 / 8 / 3, 1, 1])


@pytest.mark.parametrize("sequential", [False, True])
def test_iid_lru_matches_monte_carlo(sequential):
    n_experts, k, capacities = 16, 4, [1, 3, 4, 7, 12, 16]
    rng = np.random.default_rng(7)
    draws = np.argsort(rng.random((12_000, n_experts)), axis=-1)[:, :k].tolist()
    simulated = [simulate_lru(draws, c, sequential) for c in capacities]
    np.testing.assert_allclose(metrics.iid_lru_hit_curve(k, n_experts, capacities, sequential), simulated, atol=0.01)


# ---- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("experts, match", [
    (np.zeros((4, 2), int), r"shape \(n_tokens, n_layers, k\).*\(4, 2\)"),
    (np.zeros((0, 2, 1), int), r"no empty axis"),
    (np.zeros((4, 2, 1)), r"integer expert ids, got dtype float64"),
    (np.array([[[0, 1]], [[2, -3]]]), r"expert -3; expert ids must be >= 0"),
    (np.array([[[0, 1]], [[2, 2]]]), r"experts\[1, 0\] selects expert 2 twice"),
])
def test_bad_experts(experts, match):
    with pytest.raises(ValueError, match=match):
        metrics.expert_consistency_rate(experts)


def test_bad_arguments():
    experts = random_trace(n_tokens=5)
    with pytest.raises(ValueError, match=r"valid_pairs must be a bool array of shape \(4,\)"):
        metrics.expert_consistency_rate(experts, valid_pairs=np.ones(5, bool))
    with pytest.raises(ValueError, match="no valid consecutive pair"):
        metrics.expert_consistency_rate(experts, valid_pairs=np.zeros(4, bool))
    with pytest.raises(ValueError, match="no valid consecutive pair"):
        metrics.expert_consistency_rate(experts[:1])
    with pytest.raises(ValueError, match=r"expert 1[0-5], out of range for n_experts=10 \(valid: 0..9\)"):
        metrics.expert_load(experts, 10)
    with pytest.raises(ValueError, match="max_distance must be >= 1, got 0"):
        metrics.reuse_distance_histogram(experts, max_distance=0)
    with pytest.raises(ValueError, match=r"probs must have shape \(n_tokens, n_layers, n_experts\)"):
        metrics.gate_distribution_similarity(np.ones((3, 4)))
    with pytest.raises(ValueError, match="probs must be floating point, got dtype int64"):
        metrics.gate_distribution_similarity(np.ones((3, 1, 4), int))
    with pytest.raises(ValueError, match=r"probs\[1:3, 0\] has an all-zero or non-finite vector"):
        metrics.gate_distribution_similarity(np.array([[[1.0, 0]], [[1.0, 0]], [[0.0, 0]]]))
    with pytest.raises(ValueError, match="k must be in 1..n_experts=8, got k=9"):
        metrics.iid_ecr(9, 8)
    with pytest.raises(ValueError, match="capacities must be a 1-D array of integers >= 0"):
        metrics.iid_lru_hit_curve(2, 8, [4, -1])


def test_sparse_expert_ids_cost_memory_by_distinct_ids_not_by_size(monkeypatch):
    experts = random_trace(n_tokens=50, n_layers=2, k=2, n_experts=8)
    sparse = np.where(experts == 7, 200_000_000, experts)  # one huge id: a (2, 2e8) table would take 3.2 GB
    tables = []
    scan = metrics._scan
    monkeypatch.setattr(metrics, "_scan", lambda ids, n, *rest: tables.append(n) or scan(ids, n, *rest))
    assert metrics.expert_consistency_rate(sparse) == metrics.expert_consistency_rate(experts)
    np.testing.assert_array_equal(metrics.reuse_distances(sparse), metrics.reuse_distances(experts))
    assert max(tables) <= 8
    with pytest.raises(ValueError, match=r"^experts holds expert 200000000, out of range for n_experts=8 \(valid: 0..7\)"):
        metrics.expert_load(sparse, 8)
    with pytest.raises(ValueError, match=r"^experts holds expert -1; expert ids must be >= 0$"):
        metrics.expert_load(np.where(experts == 7, -1, experts), 8)
