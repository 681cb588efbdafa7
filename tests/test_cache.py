"""The numba cache simulator against slow obvious references, Belady's optimality, and its error messages."""

from functools import lru_cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cfmoe.cache import POLICIES, access_keys, default_lookahead, hit_rate_curve, simulate_cache


def reference(keys, policy, capacity, n_experts, lookahead=None, scope="global", initial=(), counts=None,
              halflife=None):
    """Pure Python, O(capacity) per miss: hits per access and the final (key, count) list, oldest first."""
    keys = [int(k) for k in keys]
    layer = [k // n_experts for k in keys]
    runs = []  # (layer, first, last position) of each maximal same-layer run
    for i, lay in enumerate(layer):
        if runs and runs[-1][0] == lay and runs[-1][2] == i - 1:
            runs[-1][2] = i
        else:
            runs.append([lay, i, i])

    def next_use(key, i):
        return next((j for j in range(i + 1, len(keys)) if keys[j] == key), float("inf"))

    def stale(key, now):  # a whole run of its layer started after its last use and ended before now
        return any(lay == key // n_experts and first > state[key][0] and end < now for lay, first, end in runs)

    def pool(key):
        return key // n_experts if scope == "per_layer" else 0

    counts = [1] * len(initial) if counts is None else list(counts)
    state = {k: [t - len(initial), c] for t, (k, c) in enumerate(zip(initial, counts))}  # key -> [last, count]
    aged = {k: float(c) for k, c in zip(initial, counts)}  # lfu_aging: the decayed count at the last access

    def decayed(k, now):
        return aged[k] * 2.0 ** (-(now - state[k][0]) / halflife)

    hits = []
    for i, key in enumerate(keys):
        hits.append(key in state)
        if key in state:
            state[key][1] += 1
            aged[key] = decayed(key, i) + 1 if halflife else 0
        else:
            members = [k for k in state if pool(k) == pool(key)]
            if len(members) == capacity:
                lru = min(members, key=lambda k: state[k][0])
                if policy == "lru":
                    victim = lru
                elif policy == "lfu":
                    victim = min(members, key=lambda k: tuple(state[k][::-1]))
                elif policy == "lfu_aging":
                    victim = min(members, key=lambda k: (decayed(k, i), state[k][0]))
                elif policy == "layer_lru":
                    run_start = next(first for lay, first, end in runs if first <= i <= end)
                    spared = [k for k in members if k // n_experts == key // n_experts and state[k][0] >= run_start]
                    victim = lru if stale(lru, i) else max([k for k in members if k not in spared] or members,
                                                           key=lambda k: state[k][0])
                else:
                    outside = [k for k in members if next_use(k, i - 1) > i + lookahead] if policy == "lopt" else []
                    victim = (min(outside, key=lambda k: state[k][0]) if outside else
                              max(members, key=lambda k: (next_use(k, i - 1), -state[k][0])))
                del state[victim]
            state[key], aged[key] = [i, 1], 1.0
        state[key][0] = i
    final = sorted(state, key=lambda k: state[k][0])
    return hits, final, [state[k][1] for k in final]


def locality_trace(rng, n_tokens, n_layers, n_experts, k, keep):
    """Routing where each token keeps each of the previous token's experts with probability `keep`."""
    experts = np.empty((n_tokens, n_layers, k), np.int64)
    for layer in range(n_layers):
        current = rng.choice(n_experts, k, replace=False)
        for t in range(n_tokens):
            kept = [e for e in current if rng.random() < keep]
            fresh = rng.permutation(np.setdiff1d(np.arange(n_experts), kept))[:k - len(kept)]
            current = np.array(kept + list(fresh))
            experts[t, layer] = current
    return experts


def cases(n):
    rng = np.random.default_rng(7)
    for case in range(n):
        n_layers, n_experts, k = rng.integers(1, 4), rng.integers(3, 9), rng.integers(1, 3)
        experts = locality_trace(rng, int(rng.integers(5, 30)), n_layers, n_experts, k, keep=rng.random())
        keys = access_keys(experts, n_experts)
        if case % 3 == 0:  # also traces that are not in decode order
            keys = rng.permutation(keys)
        capacity = int(rng.integers(1, n_experts + 1)) if case % 2 else int(rng.integers(1, n_layers * n_experts + 1))
        yield keys, int(n_experts), capacity, int(rng.integers(0, 2 * n_layers * k + 1)), rng


@pytest.mark.parametrize("scope", ["global", "per_layer"])
@pytest.mark.parametrize("policy", POLICIES)
def test_matches_reference_exactly(policy, scope):
    for keys, n_experts, capacity, lookahead, rng in cases(25):
        present = np.unique(keys)
        initial = rng.permutation(present)[:rng.integers(0, min(capacity, present.size) + 1)]
        if scope == "per_layer":  # no more than capacity keys of one layer
            initial = np.array([key for i, key in enumerate(initial)
                                if np.sum(initial[:i] // n_experts == key // n_experts) < capacity], np.int64)
        for start in ([], initial):
            halflife = lookahead + 1 if policy == "lfu_aging" else None
            hits, final, counts = reference(keys, policy, capacity, n_experts, lookahead, scope, list(start),
                                            halflife=halflife)
            result = simulate_cache(keys, policy, capacity, lookahead=lookahead, n_experts=n_experts,
                                    scope=scope, initial=np.asarray(start, np.int64), halflife=halflife)
            context = (policy, scope, capacity, lookahead, keys.tolist(), list(start))
            assert result.hits_mask.tolist() == hits, context
            assert result.final_keys.tolist() == final, context
            assert result.final_counts.tolist() == counts, context
            assert result.hits + result.misses == result.accesses == keys.size


@pytest.mark.parametrize("policy", POLICIES)
def test_layers_array_sparse_and_negative_keys_agree(policy):
    keys, n_experts, capacity, lookahead, _ = next(cases(1))
    base = simulate_cache(keys, policy, capacity, lookahead=lookahead, n_experts=n_experts, halflife=5)
    explicit = simulate_cache(keys * 10**9 - 5, policy, capacity, lookahead=lookahead, layers=keys // n_experts,
                              halflife=5)
    assert explicit.hits_mask.tolist() == base.hits_mask.tolist()
    np.testing.assert_allclose(explicit.layer_hit_rate, base.layer_hit_rate)
    assert (explicit.final_keys == base.final_keys * 10**9 - 5).all()


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_continuing_from_a_result_equals_one_run(policy):
    for keys, n_experts, capacity, _, _ in cases(10):
        whole = simulate_cache(keys, policy, capacity)
        half = keys.size // 2
        first = simulate_cache(keys[:half], policy, capacity)
        second = simulate_cache(keys[half:], policy, capacity, initial=first)
        assert np.concatenate([first.hits_mask, second.hits_mask]).tolist() == whole.hits_mask.tolist()
        assert second.final_keys.tolist() == whole.final_keys.tolist()


def test_layer_hit_rate_and_access_keys_order():
    experts = np.array([[[1, 0], [2, 3]], [[1, 2], [2, 0]]])  # 2 tokens, 2 layers, k=2, n_experts=4
    keys = access_keys(experts, 4)
    assert keys.tolist() == [1, 0, 6, 7, 1, 2, 6, 4]
    result = simulate_cache(keys, "lru", 8, n_experts=4)
    assert result.hits == 2 and result.layer_hit_rate.tolist() == [0.25, 0.25]
    assert default_lookahead(28, 6) == 336


def test_hit_rate_curve_table():
    keys = access_keys(np.random.default_rng(0).integers(0, 4, (20, 2, 2)), 4)
    table = hit_rate_curve(keys, ["lru", "opt"], [1, 4, 8])
    assert table.columns.tolist() == ["policy", "capacity", "hits", "accesses", "hit_rate"]
    assert len(table) == 6 and (table.accesses == keys.size).all()
    assert table.hit_rate.iloc[-1] == (keys.size - np.unique(keys).size) / keys.size  # all fit: cold misses only


def brute_force_misses(keys, capacity):
    """The fewest misses any demand-caching eviction sequence can achieve."""
    @lru_cache(maxsize=None)
    def best(i, cache):
        if i == len(keys):
            return 0
        if keys[i] in cache:
            return best(i + 1, cache)
        if len(cache) < capacity:
            return 1 + best(i + 1, cache | {keys[i]})
        return 1 + min(best(i + 1, (cache - {v}) | {keys[i]}) for v in cache)
    return best(0, frozenset())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=12), st.integers(1, 3))
def test_opt_equals_exhaustive_optimum(keys, capacity):
    keys = np.asarray(keys, np.int64)
    assert simulate_cache(keys, "opt", capacity).misses == brute_force_misses(tuple(keys.tolist()), capacity)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 9), max_size=80), st.integers(1, 6), st.integers(0, 30), st.data())
def test_opt_is_never_beaten(keys, capacity, lookahead, data):
    keys = np.asarray(keys, np.int64)
    initial = data.draw(st.lists(st.integers(0, 9), unique=True, max_size=capacity))
    opt = simulate_cache(keys, "opt", capacity, initial=np.asarray(initial, np.int64))
    for policy in POLICIES:
        other = simulate_cache(keys, policy, capacity, lookahead=lookahead, n_experts=5,
                               initial=np.asarray(initial, np.int64), halflife=lookahead + 1)
        assert opt.hits >= other.hits, policy


@pytest.mark.parametrize("kwargs, message", [
    ({"capacity": 0}, "capacity must be a positive int, got 0"),
    ({"capacity": 2.5}, "capacity must be a positive int, got 2.5"),
    ({"policy": "fifo"}, "unknown policy 'fifo'; valid: lru, lfu, opt, lopt, layer_lru, lfu_aging"),
    ({"scope": "layer"}, "unknown scope 'layer'; valid: global, per_layer"),
    ({"keys": np.array([1.0, 2.0])}, "keys must be a 1-D integer array, got float64 of shape (2,)"),
    ({"keys": np.zeros((2, 2), np.int64)}, "keys must be a 1-D integer array, got int64 of shape (2, 2)"),
    ({"policy": "lopt"}, "lopt needs an integer lookahead >= 0"),
    ({"scope": "per_layer"}, "needs the layer of each access: pass n_experts or layers"),
    ({"initial": [1, 2, 3]}, "initial holds 3 keys, more than capacity 2"),
    ({"initial": [1, 1]}, "initial keys must be distinct, got [1, 1]"),
    ({"layers": [0]}, "layers must hold one non-negative layer per access (3)"),
])
def test_errors_name_the_bad_value(kwargs, message):
    args = {"keys": np.array([1, 2, 1]), "policy": "lru", "capacity": 2} | kwargs
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        simulate_cache(**args)


def test_access_keys_rejects_bad_experts():
    with pytest.raises(ValueError, match="outside \\[0, 4\\) for n_experts=4"):
        access_keys(np.array([[[4]]]), 4)
    with pytest.raises(ValueError, match="must be an integer array \\(n_tokens, n_layers, k\\)"):
        access_keys(np.zeros((2, 3)), 4)
