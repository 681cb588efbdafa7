"""Notebook 03's building blocks: request traces, capacity grids and memory saved at equal throughput."""

import numpy as np
import pandas as pd
import pytest

from cfmoe import costmodel, data, stats
from cfmoe.stages import cache_management as cache_study
from cfmoe.routing import DECODE, PREFILL, trace_forward
from tiny_models import PAD_ID, tiny_moe, tiny_tokenizer


def test_requests_are_prompt_then_article_and_traces_label_them():
    tok, lm = tiny_tokenizer(), tiny_moe("olmoe")
    requests = cache_study.request_inputs(tok, 3, decode_tokens=20, max_positions=200)
    task = data.entry_task("test")
    assert [r["title"] for r in requests] == task["title"][:3]
    for r, row in zip(requests, task.select(range(3))):
        assert r["prompt"] == tok(row["prompt"])["input_ids"]
        assert r["decode"] == tok(row["target"], add_special_tokens=False)["input_ids"][:20]
    traces = cache_study.request_traces(lm, requests, PAD_ID, batch_size=2)  # padded batches
    for r, trace in zip(requests, traces):
        alone, = trace_forward(lm, [r["prompt"] + r["decode"]])
        np.testing.assert_array_equal(trace.experts, alone.experts)
        assert trace.phase.tolist() == [PREFILL] * len(r["prompt"]) + [DECODE] * len(r["decode"])
        assert trace.meta["title"] == r["title"]
    n_prompt = len(requests[0]["prompt"])
    with pytest.raises(ValueError, match=f"has {n_prompt} tokens, leaving 1 of the model's {n_prompt + 1} positions"):
        cache_study.request_inputs(tok, 1, decode_tokens=20, max_positions=n_prompt + 1)


def test_capacity_grid_holds_the_levels():
    grid = cache_study.capacity_grid(384, 24, (0.25, 0.5, 0.75))
    assert {96, 192, 288} <= set(grid.tolist()) and grid.min() == 16 and grid.max() == 384
    assert cache_study.capacity_grid(10, 3, (0.25,)).tolist() == [2, 3, 7, 10]  # thirds, plus rint(2.5) = 2


def test_memory_saved_reads_the_candidate_curve_at_the_baseline_levels():
    # hit rate: control 0.8 x share, cfmoe 1.6 x share (capped at 1), on shares i/48
    shares = np.arange(1, 49) / 48
    curves = pd.concat([pd.DataFrame({"run": run, "policy": "lru", "scope": "global", "capacity": shares * 384,
                                      "cached_share": shares, "hit_rate": np.minimum(1, slope * shares)})
                        for run, slope in (("lora_control", 0.8), ("cfmoe", 1.6))])
    sizes = costmodel.deepseek_moe_16b(4.5)
    throughput = cache_study.throughput_curves(curves, sizes, 384)
    saved = cache_study.memory_saved(throughput, [0.25, 0.5])
    assert list(saved.columns) == ["device", "policy", "cached_share", "tokens_per_s", "memory_base_gb",
                                   "memory_cfmoe_gb", "memory_saved"]
    memory = lambda share: (sizes.w_resident + share * sizes.n_routed * sizes.expert_bytes) / 1e9  # noqa: E731
    for device in ("cpu", "npu"):
        rows = saved[saved.device == device]
        assert rows.memory_base_gb.tolist() == pytest.approx([memory(0.25), memory(0.5)])
        assert rows.memory_cfmoe_gb.tolist() == pytest.approx([memory(0.125), memory(0.25)])  # half the share
        assert rows.tokens_per_s.tolist() == pytest.approx(
            costmodel.tokens_per_second(sizes, costmodel.PROFILES[device], np.array([0.2, 0.4])).tolist())
    assert (saved.memory_saved == 1 - saved.memory_cfmoe_gb / saved.memory_base_gb).all()


def test_oracle_policies_are_labelled_for_readers():
    oracle = "oracle (knows future routing)"
    assert oracle in cache_study.policy_label("opt") and oracle in cache_study.policy_label("lopt")
    assert oracle not in cache_study.policy_label("lru") and cache_study.policy_label("lru") == "LRU"
    assert cache_study.policy_label("lopt/disaggregated_warm") == f"LOPT, {oracle} / disaggregated_warm"
    assert set(cache_study.ORACLE_POLICIES) == {"opt", "lopt"} and cache_study.HEADLINE_POLICY == "lru"


def test_oracle_labels_reach_the_figure_legends():
    from cfmoe.present import plots

    curves = pd.DataFrame([{"run": "cfmoe", "scope": "global", "policy": p, "cached_share": s, "hit_rate": s}
                           for p in ("lru", "opt") for s in (0.25, 0.5)])
    fig = plots.hit_rate_curves(curves, cache_study.POLICY_LABELS)
    legends = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert cache_study.policy_label("opt") in legends and "LRU" in legends


def test_control_and_cfmoe_run_for_every_seed_base_and_daft_once():
    plan = cache_study.run_plan((3, 1, 2))
    assert plan[:4] == [("base", 3), ("lora_control", 3), ("cfmoe", 3), ("cfmoe_daft", 3)]
    assert plan[4:] == [("lora_control", 1), ("cfmoe", 1), ("lora_control", 2), ("cfmoe", 2)]
    assert [cache_study.run_name(*key) for key in plan[:2]] == ["base", "lora_control-seed3"]


def seeded_curves():
    """Hit-rate curves per seed: control 0.8 x share; CFMoE 1.6 x share (seed 0) or 1.2 x share (seed 1) under LRU,
    and 2.4 x share under the oracle LOPT."""
    shares = np.arange(1, 49) / 48
    rows = []
    for seed, slope in ((0, 1.6), (1, 1.2)):
        for policy, factor in (("lru", 1.0), ("lopt", 1.5)):
            for run, s in (("lora_control", 0.8), ("cfmoe", slope * factor)):
                rows.append(pd.DataFrame({"run": run, "seed": seed, "policy": policy, "scope": "global",
                                          "capacity": shares * 384, "cached_share": shares,
                                          "hit_rate": np.minimum(1, s * shares)}))
    return pd.concat(rows, ignore_index=True)


def test_memory_saved_per_seed_same_policy_headline_with_t_interval():
    sizes = costmodel.deepseek_moe_16b(4.5)
    throughput = cache_study.throughput_curves(seeded_curves(), sizes, 384)
    assert set(throughput.seed) == {0, 1} and len(throughput) == 2 * 2 * 2 * 2 * 48  # seeds x policies x runs x devices
    saved = pd.concat([cache_study.memory_saved(throughput[throughput.seed == seed], [0.25, 0.5],
                                                ("lora_control", p), ("cfmoe", p)).assign(seed=seed)
                       for seed in (0, 1) for p in ("lru", "lopt")], ignore_index=True)
    assert set(saved.policy) == {"lru", "lopt"}  # same policy on both sides: no "lru->lopt" row
    requests = pd.DataFrame([{"run": run, "seed": seed, "decode_ecr": ecr, "decode_ecr_over_k_e": ecr / 0.1}
                             for seed, (c, f) in enumerate([(0.2, 0.4), (0.22, 0.33)])
                             for run, ecr in (("lora_control", c), ("cfmoe", f))])
    m = cache_study.memory_headline(saved, requests)
    per_seed = saved[saved.policy == "lru"].groupby("seed").memory_saved.mean()
    assert m["policy"] == "lru" and m["seeds"] == 2
    assert m["headline"] == pytest.approx(stats.mean_interval(per_seed))
    assert m["per_policy"]["lru"] == m["headline"] and m["per_policy"]["lopt"][0] > m["headline"][0]
    lru = saved[saved.policy == "lru"]
    assert m["saved_gb"][0] == pytest.approx((lru.memory_base_gb - lru.memory_cfmoe_gb).groupby(lru.seed).mean().mean())
    assert m["delta_ecr"] == pytest.approx(stats.mean_interval([0.2, 0.11]))
    assert m["cfmoe_ecr_over_k_e"][0] == pytest.approx((4 + 3.3) / 2)
    summary = cache_study.memory_summary(saved).set_index("policy")
    assert summary.loc["lopt", "oracle"] and not summary.loc["lru", "oracle"] and summary.loc["lru", "headline"]
    assert "oracle (knows future routing)" in summary.loc["lopt", "policy_label"]
    # a table from before seeds reads as one seed, without an interval
    one = cache_study.memory_headline(saved[saved.seed == 0].drop(columns="seed"),
                                      requests[requests.seed == 0].drop(columns=["seed", "decode_ecr_over_k_e"]))
    assert one["seeds"] == 1 and np.isnan(one["headline"][1]) and np.isnan(one["cfmoe_ecr_over_k_e"][0])


def test_best_of_names_n():
    combos = pd.DataFrame([{"source": "served requests", "model": "cfmoe", "policy": p, "mean_memory_saved": v}
                           for p, v in (("lru/unified", 0.3), ("lopt/unified", 0.4), ("lru/disaggregated", 0.2))]
                          + [{"source": "served requests", "model": "cfmoe_daft", "policy": "lru/unified",
                              "mean_memory_saved": 0.9}])
    best, n = cache_study.best_of(combos)
    assert (best.policy, n) == ("lopt/unified", 3)


def test_long_prompts_flush_the_unified_decode_cache():
    from cfmoe.routing import DECODE, PREFILL, RoutingTrace
    from cfmoe.stages.cache_management import long_prompt_modes

    rng = np.random.default_rng(0)
    n_layers, n_experts, k = 2, 16, 2
    # every request decodes with experts 0 and 1 in every layer; the prompts use the other 14 experts
    decode = np.tile(np.array([0, 1]), (12, n_layers, 1))
    requests = [RoutingTrace(np.concatenate([decode[:2], decode]), None,
                             np.r_[np.full(2, PREFILL), np.full(12, DECODE)], np.zeros(14, int), n_experts)
                for _ in range(4)]
    stream = np.stack([[rng.choice(np.arange(2, n_experts), k, replace=False) for _ in range(n_layers)]
                       for _ in range(300)])
    table = long_prompt_modes(requests, stream, n_experts, capacity=8, prompt_lengths=(1, 256), batches=(1,))
    rate = table.set_index(["prompt_tokens", "mode"]).decode_hit_rate
    # a long prompt through the decode cache evicts the decode working set; disaggregated prefill keeps it
    assert rate[(256, "unified")] < rate[(256, "disaggregated")]
    assert rate[(256, "disaggregated")] == rate[(1, "disaggregated")]
    assert (table[table["mode"] == "unified"].vs_unified == 0).all()
    with pytest.raises(ValueError, match="prompt length 512 exceeds the 300 tokens"):
        long_prompt_modes(requests, stream, n_experts, capacity=8, prompt_lengths=(512,))
