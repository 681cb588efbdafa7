"""Prefill/decode caching on hand-made traces with obvious numbers, and the modes' orderings on random ones."""

import numpy as np
import pytest

from cfmoe.cache import simulate_cache
from cfmoe.costmodel import custom_profile
from cfmoe.serving_sim import (MODES, _schedule, _step_keys, prefill_keys, simulate_request, simulate_requests,
                                simulate_serving, seed_quota, warm_seed)

# n_experts 4, 2 layers, k 1. Prompt: layer 0 uses {0, 1}, layer 1 uses {1} -> keys 0, 1, 5.
# Decode: two tokens using expert 1 in both layers -> keys 1, 5, 1, 5.
EXPERTS = np.array([[[0], [1]], [[1], [1]], [[1], [1]], [[1], [1]]])
PHASE = np.array([0, 0, 1, 1], np.uint8)


def run(mode, **kwargs):
    return simulate_request(EXPERTS, PHASE, 4, "lru", 2, mode, expert_bytes=1e9, **kwargs)


def test_hand_made_request_in_every_mode():
    unified, cold, warm = (run(mode) for mode in MODES)
    assert prefill_keys(EXPERTS[:2], 4).tolist() == [0, 1, 5]
    # unified: 0, 1, 5 (evicts 0) miss, then every decode access hits
    assert (unified.decode_hits, unified.decode_misses, unified.prefill_loaded_bytes) == (4, 0, 3e9)
    # disaggregated: decode starts cold, misses 1 and 5 once
    assert (cold.decode_hits, cold.decode_misses, cold.decode_loaded_bytes) == (2, 2, 2e9)
    # warm: seeds are each layer's rank-0 expert, 1 and 5, so decode never misses
    assert (warm.decode_hits, warm.decode_hit_rate, warm.final.final_keys.tolist()) == (4, 1.0, [1, 5])
    assert unified.peak_memory_bytes == 2e9 and cold.peak_memory_bytes == warm.peak_memory_bytes == (2 + 4) * 1e9
    assert (cold.prefill_tokens, cold.decode_tokens, cold.prefill_accesses) == (2, 2, 3)


def test_time_follows_the_cost_model():
    device = custom_profile("toy", mem_bandwidth_gbps=1, io_bandwidth_gbps=0.5)
    unified = run("unified", profile=device, resident_bytes=2e9)
    assert unified.prefill_s == pytest.approx(2 + 3 / 0.5)  # resident once, three experts from storage
    assert unified.decode_s == pytest.approx(2 * 2 + 4)  # resident per token, four cached experts
    cold = run("disaggregated", profile=device, resident_bytes=2e9)
    assert cold.decode_s == pytest.approx(2 * 2 + 2 + 2 / 0.5) and cold.time_s == cold.prefill_s + cold.decode_s
    assert cold.row()["decode_tokens_per_s"] == pytest.approx(2 / cold.decode_s)
    assert np.isnan(run("unified").time_s)  # no profile, no time


def test_prefill_reads_cached_experts_in_place_and_keeps_the_decode_cache():
    cold = run("disaggregated", initial=np.array([2, 5]))
    assert cold.prefill_loaded_bytes == 2e9  # 5 was in the decode cache
    assert cold.decode_hits == 3  # 5 kept through prefill; 1 misses once (evicting 2)


def test_warm_seed_rule():
    # 3 prompt tokens, 1 layer, k 2, n_experts 5; scores (decay 0.5): e1 = 1 + .5, e0 = 1 + .25, e2 = .5, e3 = .25
    prompt = np.array([[[0, 3]], [[2, 1]], [[0, 1]]])
    assert warm_seed(prompt, 5, capacity=3).tolist() == [2, 0, 1]  # top 3, lowest score oldest
    assert warm_seed(prompt, 5, capacity=3, tokens=1).tolist() == [1, 0]  # tie: lower id ranks first
    # layer 1 scores e4 = 1.75, e2 = 1.5: a global capacity of 3 over 2 layers gives layer 0 a quota of 2 (e0, e1)
    # and layer 1 a quota of 1 (e4), whatever the scores of other layers; keys are layer * 5 + expert
    two = np.concatenate([prompt, np.array([[[4, 3]], [[4, 2]], [[4, 2]]])], axis=1)
    assert warm_seed(two, 5, capacity=3).tolist() == [0, 1, 9]
    assert [seed_quota(7, "global", 3, layer) for layer in range(3)] == [3, 2, 2]
    assert warm_seed(two, 5, capacity=1, scope="per_layer").tolist() == [1, 9]


def locality_request(rng, n_prompt, n_decode, n_layers=6, n_experts=16, k=2, keep=0.6):
    """A request whose routing keeps each previous expert with probability `keep`, else draws a new one."""
    experts = np.empty((n_prompt + n_decode, n_layers, k), np.int64)
    current = np.stack([rng.choice(n_experts, k, replace=False) for _ in range(n_layers)])
    for t in range(len(experts)):
        for layer in range(n_layers):
            kept = [e for e in current[layer] if rng.random() < keep]
            fresh = rng.permutation(np.setdiff1d(np.arange(n_experts), kept))[:k - len(kept)]
            current[layer] = kept + list(fresh)
        experts[t] = current
    return experts, np.r_[np.zeros(n_prompt, np.uint8), np.ones(n_decode, np.uint8)]


@pytest.mark.parametrize("seed", range(5))
def test_mode_orderings_on_locality_heavy_requests_under_lru(seed):
    rng = np.random.default_rng(seed)
    experts, phase = locality_request(rng, 32, 48)
    for capacity in (8, 16, 32):
        rate = {mode: simulate_request(experts, phase, 16, "lru", capacity, mode, 1.0).decode_hit_rate
                for mode in MODES}
        # LRU keeps the most recent distinct keys, so prefill's leftovers only add to a cold cache
        assert rate["unified"] >= rate["disaggregated"]
        # seeds from the prompt's last tokens beat prefill's leftovers (the last layers' unions)
        assert rate["disaggregated_warm"] >= rate["unified"], capacity


@pytest.mark.parametrize("seed", range(5))
def test_disaggregation_keeps_the_decode_working_set_across_an_interleaved_prefill(seed):
    rng = np.random.default_rng(seed)
    conversation, _ = locality_request(rng, 0, 80)
    unrelated, _ = locality_request(rng, 0, 40, keep=0.0)
    first = (conversation[:40], np.r_[np.zeros(8, np.uint8), np.ones(32, np.uint8)])
    resumed = (np.concatenate([unrelated, conversation[40:]]), np.r_[np.zeros(40, np.uint8), np.ones(40, np.uint8)])
    table = simulate_requests([first, resumed], 16, "lru", 24, expert_bytes=1.0, modes=["unified", "disaggregated"])
    second = table[table.request == 1].set_index("mode").decode_hit_rate
    assert second["disaggregated"] >= second["unified"]


def test_simulate_requests_carries_the_cache_and_counts_bytes():
    rng = np.random.default_rng(0)
    traces = [locality_request(rng, 8, 8) for _ in range(3)]
    table = simulate_requests(traces, 16, "lfu", 12, expert_bytes=2.0)
    assert len(table) == 3 * len(MODES) and table.request.tolist()[:3] == [0, 1, 2]
    assert (table.decode_loaded_bytes == 2.0 * table.decode_misses).all()
    assert (table.decode_hits + table.decode_misses == 8 * 6 * 2).all()
    unified = table[table["mode"] == "unified"]
    expected = [traces[0][0], traces[1][0], traces[2][0]]
    keys = np.concatenate([np.r_[prefill_keys(e[:8], 16), (np.arange(6)[:, None] * 16 + e[8:]).reshape(-1)]
                           for e in expected])
    whole = simulate_cache(keys, "lfu", 12)  # carrying state = one run over the concatenated requests
    assert unified.decode_hits.sum() + (unified.prefill_accesses - unified.prefill_loaded_bytes / 2).sum() == whole.hits
    cold = simulate_requests(traces, 16, "lru", 12, 2.0, modes=["disaggregated"], carry=False)
    assert (cold.prefill_loaded_bytes == 2.0 * cold.prefill_accesses).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "split"}, "unknown mode 'split'; valid: unified, disaggregated, disaggregated_warm"),
    ({"phase": np.array([1, 0, 1, 1])}, "phase must be prefill tokens \\(0\\) then decode tokens \\(1\\)"),
    ({"phase": np.array([0, 1])}, "one phase per token, got shapes \\(4, 2, 1\\) and \\(2,\\)"),
    ({"capacity": 0}, "capacity must be a positive int, got 0"),
])
def test_errors_name_the_bad_value(kwargs, message):
    args = {"experts": EXPERTS, "phase": PHASE, "n_experts": 4, "policy": "lru", "capacity": 2,
            "mode": "unified", "expert_bytes": 1.0} | kwargs
    with pytest.raises(ValueError, match=message):
        simulate_request(**args)


def random_requests(rng, n=5, n_layers=3, n_experts=8, k=2):
    requests = []
    for _ in range(n):
        n_prompt, n_decode = rng.integers(1, 6), rng.integers(1, 12)
        experts = np.stack([np.stack([rng.choice(n_experts, k, replace=False) for _ in range(n_layers)])
                            for _ in range(n_prompt + n_decode)])
        requests.append((experts, np.repeat(np.uint8([0, 1]), [n_prompt, n_decode])))
    return requests


@pytest.mark.parametrize("policy", ["lru", "lfu", "opt", "lopt", "layer_lru"])
@pytest.mark.parametrize("mode", MODES)
def test_serving_one_at_a_time_is_the_sum_of_carried_requests(policy, mode):
    rng = np.random.default_rng(3)
    requests = random_requests(rng)
    device = custom_profile("toy", mem_bandwidth_gbps=2, io_bandwidth_gbps=0.5)
    kwargs = dict(profile=device, resident_bytes=1e9, lookahead=6)
    rows = simulate_requests(requests, 8, policy, 5, 1e9, modes=[mode], **kwargs)
    served = simulate_serving(requests, 8, policy, 5, mode, 1e9, batch=1, **kwargs)
    assert served["decode_hits"] == rows.decode_hits.sum() and served["decode_misses"] == rows.decode_misses.sum()
    assert served["prefill_loaded_bytes"] == rows.prefill_loaded_bytes.sum()
    assert served["decode_s"] == pytest.approx(rows.decode_s.sum())
    assert served["prefill_s"] == pytest.approx(rows.prefill_s.sum())
    assert served["decode_tokens"] == rows.decode_tokens.sum() == served["decode_steps"]


def test_batched_schedule_and_step_keys():
    # requests decode 3, 1 and 2 tokens with batch 2: steps (0,1), then 2 is admitted and steps (0,2), (0,2)
    assert _schedule([3, 1, 2], 2) == [([0, 1], [[(0, 0), (1, 0)]]), ([2], [[(0, 1), (2, 0)], [(0, 2), (2, 1)]])]
    assert _schedule([0, 2], 2) == [([0, 1], [[(1, 0)], [(1, 1)]])]
    # two tokens of 2 layers, k 2, n_experts 4: layer 0 uses {3, 1} then {1, 2}: 3, 1, 2; layer 1: 0, then 4 + 0..
    decodes = {0: np.array([[[3, 1], [0, 2]]]), 1: np.array([[[1, 2], [2, 3]]])}
    assert _step_keys([(0, 0), (1, 0)], decodes, 4).tolist() == [3, 1, 2, 4, 6, 7]


def test_batched_serving_charges_union_reads_and_prefill_pollution():
    # request 0 decodes expert 1 (one layer, k 1) for 6 tokens; request 1's prompt needs experts 2 and 3
    a = (np.array([[[0]]] + [[[1]]] * 6), np.uint8([0] + [1] * 6))
    b = (np.array([[[2]], [[3]], [[1]]]), np.uint8([0, 0, 1]))
    c = (np.array([[[2]], [[3]], [[1]]]), np.uint8([0, 0, 1]))
    unified = simulate_serving([a, b, c], 4, "lru", 2, "unified", 1.0, batch=2)
    split = simulate_serving([a, b, c], 4, "lru", 2, "disaggregated", 1.0, batch=2)
    # batch 2: a and b admitted (prefill 0, then 2, 3), both decode expert 1: one access per step
    assert unified["decode_tokens"] == 8 and unified["decode_steps"] == 6
    # unified: prefills leave {2, 3}; 1 misses; after b finishes, c's prefill (2, 3) evicts 1 -> a misses again
    assert (unified["decode_hits"], unified["decode_misses"]) == (4, 2)
    assert (split["decode_hits"], split["decode_misses"]) == (5, 1)
    assert split["prefill_loaded_bytes"] == 5 and unified["prefill_loaded_bytes"] == 5
