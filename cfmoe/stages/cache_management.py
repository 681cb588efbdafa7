"""Notebook 03 (`03_cache_management`): WikiText-2 test entries served through simulated expert caches, and the memory saved.

    python -m cfmoe.stages cache_management --preset cpu

Requests. Each of the first `cache.requests` WikiText-2 test entries is one request: the authors' entry
prompt is its prefill and the first `cache.decode_tokens` tokens of the article its decode, teacher-forced.
Teacher forcing gives exactly the routing the model would use while generating that text (a tested property
of `routing.trace_generate`), so every model is measured on the same real text rather than on its own
samples (notebook 04 measures generated text).

Hit rates. `hit_rate_curves`: the decode accesses of all requests in order through one cache (prefill
disaggregated, so it never touches the decode cache), per policy, scope and capacity. `serving_modes`:
requests one after another, or continuously batched, under unified / disaggregated / warm prefill.
Throughput. The authors' cost model turns hit rates into decode tokens/s: at the paper's scale (DeepSeek-
MoE-16B in 4.5-bit, capacities as the same share of its routed experts) and at our own model's sizes.

Seeds. The LoRA control and CFMoE of every fine-tuning seed (`finetune.seeds`) are traced and their hit-rate
curves simulated, so memory saved at equal throughput (CFMoE vs the control, the same policy on both sides) is
measured per seed and summarized as the mean with a 95% Student-t interval over seeds (`memory_summary`,
`memory_headline`); the base model, DAFT and the serving-mode comparison use the primary seed only. The
headline policy is LRU: OPT and LOPT are oracles (they know future routing) and are labelled so
(`policy_label`); the best of the served combinations (`best_of`) is a maximum over N of them, not a headline.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .. import cache, claims, costmodel, data, evaluate, metrics, moe, routing, serving_sim, stats
from ..config import StudyConfig
from ..determinism import make_deterministic
from ..present import plots
from ..provenance import save_figure, save_table
from . import runs

NOTEBOOK = "03_cache_management"
DEVICES = tuple(costmodel.PROFILES)
SEEDED_RUNS = ("lora_control", "cfmoe")  # simulated for every fine-tuning seed; base and DAFT for the primary one
HEADLINE_POLICY = "lru"  # the headline compares CFMoE and the control under the same, practical policy
ORACLE_POLICIES = ("opt", "lopt")  # they read future accesses: bounds, not policies a server can run
ORACLE = "oracle (knows future routing)"
POLICY_LABELS = {"lru": "LRU", "lfu": "LFU", "layer_lru": "layer LRU (ours)", "opt": f"OPT, {ORACLE}",
                 "lopt": f"LOPT, {ORACLE}"}


def policy_label(policy: str) -> str:
    """A policy (or a served 'policy/mode') as a reader sees it: OPT and LOPT named as oracles."""
    name, _, mode = policy.partition("/")
    label = POLICY_LABELS.get(name, name)
    return f"{label} / {mode}" if mode else label


def run_plan(seeds) -> list[tuple[str, int]]:
    """The (run, seed) models notebook 03 traces: every run of the primary seed (`seeds[0]`; the base model is
    not fine-tuned and carries it), and the control and CFMoE of every other seed."""
    seeds = list(seeds)
    return [(run, seeds[0]) for run in runs.FINETUNE_RUNS] + [(run, s) for s in seeds[1:] for run in SEEDED_RUNS]


def run_name(run: str, seed: int) -> str:
    """A model's name in the trace and simulation caches: the run, and for a fine-tuned run its seed."""
    return run if run == "base" else f"{run}-seed{seed}"


def request_inputs(tokenizer, n_requests: int, decode_tokens: int, max_positions: int) -> list[dict]:
    """Token ids of each request: the entry prompt (prefill) then the article's first tokens (decode)."""
    task = data.entry_task("test")
    n = len(task) if n_requests <= 0 else min(n_requests, len(task))
    requests = []
    for row in task.select(range(n)):
        prompt = tokenizer(row["prompt"])["input_ids"]
        room = min(decode_tokens, max_positions - len(prompt))
        if room < 2:
            raise ValueError(f"prompt of {row['title']!r} has {len(prompt)} tokens, leaving {room} of the model's "
                             f"{max_positions} positions for decode; lower cache.decode_tokens or use a longer model")
        article = tokenizer(row["target"], add_special_tokens=False)["input_ids"][:room]
        requests.append({"title": row["title"], "prompt": prompt, "decode": article})
    return requests


@torch.no_grad()
def request_traces(lm, requests: list[dict], pad_id: int, batch_size: int = 8) -> list[routing.RoutingTrace]:
    """Teacher-forced routing of each request, prompt tokens labelled prefill and article tokens decode."""
    traces = []
    for start in range(0, len(requests), batch_size):
        batch = [r["prompt"] + r["decode"] for r in requests[start:start + batch_size]]
        width = max(map(len, batch))
        ids = torch.tensor([seq + [pad_id] * (width - len(seq)) for seq in batch])
        mask = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq in batch])
        for request, trace in zip(requests[start:], routing.trace_forward(lm, ids, mask)):
            trace.phase[len(request["prompt"]):] = routing.DECODE
            trace.meta["title"] = request["title"]
            traces.append(trace)
    return traces


def _in_order(table: pd.DataFrame, orders: dict) -> pd.DataFrame:
    """Rows sorted stably by each column's given order of values (the order the simulations were listed in)."""
    rank = {column: table[column].map({value: i for i, value in enumerate(values)}) for column, values in orders.items()}
    return table.assign(**{f"_{c}": r for c, r in rank.items()}).sort_values(
        [f"_{c}" for c in orders], kind="stable").drop(columns=[f"_{c}" for c in orders]).reset_index(drop=True)


def capacity_grid(n_routed: int, points: int, shares) -> np.ndarray:
    """Capacities at i/points of the routed experts (i = 1..points) plus those of the throughput levels."""
    grid = np.rint(np.linspace(0, n_routed, points + 1)[1:]).astype(int)
    return np.unique(np.r_[grid, level_capacities(n_routed, shares)].clip(1, n_routed))


def level_capacities(n_routed: int, shares) -> np.ndarray:
    return np.rint(np.asarray(shares) * n_routed).astype(int).clip(1, n_routed)


def hit_rate_curves(traces: dict, n_experts: int, n_layers: int, top_k: int, capacities, per_layer_capacities,
                    policies) -> pd.DataFrame:
    """Decode hit rate of every model, policy and capacity, with one global pool and with per-layer pools."""
    rows = []
    lookahead = cache.default_lookahead(n_layers, top_k)
    for run, run_traces in traces.items():
        keys = np.concatenate([cache.access_keys(t.decode.experts, n_experts) for t in run_traces])
        for scope, grid in (("global", capacities), ("per_layer", per_layer_capacities)):
            curve = cache.hit_rate_curve(keys, list(policies), grid, lookahead=lookahead, scope=scope,
                                         n_experts=n_experts)
            slots = curve.capacity * (n_layers if scope == "per_layer" else 1)
            rows.append(curve.assign(run=run, scope=scope, cached_share=slots / (n_layers * n_experts)))
    return pd.concat(rows, ignore_index=True)


def serving_modes(traces: dict, n_experts: int, capacities, policies, batch_sizes, sizes: costmodel.ModelSizes,
                  profile: costmodel.DeviceProfile) -> pd.DataFrame:
    """Every request served in order under each prefill mode, policy, batch width and capacity."""
    rows = []
    for run, run_traces in traces.items():
        for batch in batch_sizes:
            plan = serving_sim.serving_plan([(t.experts, t.phase) for t in run_traces], n_experts, int(batch))
            for policy in policies:
                for capacity in capacities:
                    for mode in serving_sim.MODES:
                        row = serving_sim.simulate_serving(plan, n_experts, policy, int(capacity), mode,
                                                           sizes.expert_bytes, profile=profile,
                                                           resident_bytes=sizes.resident_bytes)
                        rows.append({"run": run, **row, "cached_share": capacity / sizes.n_routed})
    return pd.DataFrame(rows)


def throughput_curves(curves: pd.DataFrame, sizes: costmodel.ModelSizes, n_routed: int) -> pd.DataFrame:
    """Tokens/s against memory for each hit-rate curve and device, at `sizes`' scale.

    A capacity is carried over as the same share of the routed experts, so `sizes` may be a larger model of
    the same routing geometry (the paper's DeepSeek-MoE-16B).
    """
    frames = []
    by = ["run", "seed", "policy", "scope"] if "seed" in curves else ["run", "policy", "scope"]
    for device in DEVICES:
        for keys, group in curves.groupby(by, sort=False):
            share = group.cached_share.to_numpy()
            tp = costmodel.throughput_curve(sizes, costmodel.PROFILES[device],
                                            share * sizes.n_routed, group.hit_rate.to_numpy())
            frames.append(tp.assign(**dict(zip(by, keys)), device=device, cached_share=share, sizes=sizes.name))
    return pd.concat(frames, ignore_index=True)


def memory_saved(throughput: pd.DataFrame, shares, baseline=("lora_control", "lru"),
                 candidate=("cfmoe", "lru")) -> pd.DataFrame:
    """Memory the candidate (run, policy) needs at the tokens/s the baseline reaches with `shares` of its
    routed experts cached, per device; global scope. Same-policy rows when the policies are equal."""
    rows = []
    tp = throughput[throughput.scope == "global"]
    policy = baseline[1] if baseline[1] == candidate[1] else f"{baseline[1]}->{candidate[1]}"
    for device in DEVICES:
        on = tp[tp.device == device]
        base = on[(on.run == baseline[0]) & (on.policy == baseline[1])].sort_values("capacity")
        cand = on[(on.run == candidate[0]) & (on.policy == candidate[1])].sort_values("capacity")
        table = costmodel.saved_at_levels(base, cand, shares)
        table.insert(0, "device", device)
        table.insert(1, "policy", policy)
        rows.append(table)
    return pd.concat(rows, ignore_index=True)


def combinations(throughput: pd.DataFrame, serving: pd.DataFrame, shares, sizes, n_routed: int) -> pd.DataFrame:
    """Mean memory saved (over devices and levels) by each model x policy x prefill-mode combination, against
    the control under plain LRU (unified prefill, one request at a time): which combination reaches the paper's
    saving. One seed's tables (the primary seed); the best row is a maximum over the rows (`best_of`)."""
    single = serving[serving.batch == serving.batch.min()].rename(columns={"decode_hit_rate": "hit_rate"})
    single = single.assign(policy=single.policy + "/" + single["mode"], scope="global")
    served = throughput_curves(single[["run", "policy", "scope", "capacity", "hit_rate", "cached_share"]],
                               sizes, n_routed)
    rows = []
    baselines = {"decode-only curves": (throughput, ("lora_control", "lru")),
                 "served requests": (served, ("lora_control", "lru/unified"))}
    for source, (table, baseline) in baselines.items():
        for run in ("cfmoe", "cfmoe_daft"):
            for policy in table.policy.unique():
                saved = memory_saved(table, shares, baseline, (run, policy))
                rows.append({"source": source, "baseline": f"{baseline[0]} {baseline[1]}", "model": run,
                             "policy": policy, "policy_label": policy_label(policy),
                             "mean_memory_saved": saved.memory_saved.mean(),
                             "max_memory_saved": saved.memory_saved.max(), "levels": int(saved.memory_saved.notna().sum())})
    return pd.DataFrame(rows).sort_values(["source", "mean_memory_saved"], ascending=[True, False], ignore_index=True)


LONG_PROMPTS = (64, 256, 1024, 4096)  # prompt tokens per request (issue 15's sweep)
LONG_BATCHES = (1, 4)  # requests decoding at once
LONG_SHARE = 0.25  # of the routed experts cached


def prompt_stream(cfg: StudyConfig, key: tuple[str, int], lm, tokenizer, force: bool = False) -> np.ndarray:
    """Teacher-forced routing (tokens, layers, k) of the test split's first 4 x max(LONG_PROMPTS) tokens, recorded
    once: the long prompts. The model's context is shorter than the longest prompt, so a long prompt is
    consecutive blocks of the text, each routed with its own block's context."""
    blocks = evaluate.test_blocks(tokenizer, cfg.finetune.block_size, 4 * max(LONG_PROMPTS), "test")
    n_experts = moe.describe(lm).n_experts

    def compute():
        _, experts = evaluate.record_test(lm, blocks, cfg.eval.batch_size)
        tokens = blocks["input_ids"].reshape(-1)
        return [routing.RoutingTrace(experts, None, np.zeros(len(tokens), np.uint8), tokens, n_experts,
                                     {"source": "teacher-forced WikiText-2 test blocks (long prompts)"})]

    trace, = runs.cached_traces(cfg, NOTEBOOK, f"{run_name(*key)}-long-prompts", lm,
                                {"kind": "long_prompts", "input_ids": blocks["input_ids"]}, compute, force)
    return trace.experts


def long_prompt_modes(requests: list[routing.RoutingTrace], stream: np.ndarray, n_experts: int, capacity: int,
                      policy: str = "lru", prompt_lengths=LONG_PROMPTS, batches=LONG_BATCHES) -> pd.DataFrame:
    """Decode hit rate per prefill mode when each request's prompt is `length` tokens of `stream` (request r
    starts at a different offset) before its own decode: where does unified prefill flush the decode cache?"""
    rows = []
    for length in prompt_lengths:
        if length > len(stream):
            raise ValueError(f"prompt length {length} exceeds the {len(stream)} tokens of the prompt stream")
        starts = [(r * 7919) % (len(stream) - length + 1) for r in range(len(requests))]
        pairs = [(np.concatenate([stream[start:start + length], t.decode.experts]),
                  np.r_[np.zeros(length, np.uint8), np.ones(t.decode.n_tokens, np.uint8)])
                 for start, t in zip(starts, requests)]
        for batch in batches:
            plan = serving_sim.serving_plan(pairs, n_experts, int(batch))
            for mode in serving_sim.MODES:
                row = serving_sim.simulate_serving(plan, n_experts, policy, capacity, mode, 1.0)
                rows.append({"prompt_tokens": length, "batch": batch, "mode": mode, "policy": policy,
                             "capacity": capacity, "decode_hit_rate": row["decode_hit_rate"],
                             "decode_misses": row["decode_misses"], "decode_tokens": row["decode_tokens"]})
    table = pd.DataFrame(rows)
    unified = table[table["mode"] == "unified"].set_index(["prompt_tokens", "batch"]).decode_hit_rate
    table["vs_unified"] = table.decode_hit_rate.to_numpy() - unified.reindex(
        pd.MultiIndex.from_frame(table[["prompt_tokens", "batch"]])).to_numpy()
    return table


def _compute(cfg: StudyConfig, force: bool = False) -> dict:
    """Traces of the models of `run_plan` (recorded once, then read from files), hit-rate curves per seed, serving
    modes (primary seed), memory at equal throughput per seed and its summary over seeds."""
    make_deterministic(cfg.seed, cfg.threads)
    out = cfg.results_dir(NOTEBOOK)
    cc = cfg.cache
    seeds = list(cfg.finetune.seeds)
    plan = run_plan(seeds)
    primary = [key for key in plan if key[1] == seeds[0]]
    models = {}
    for seed in seeds:
        loaded, tokenizer = runs.load_runs(cfg, seed)
        models.update({(run, seed): lm for run, lm in loaded.items() if (run, seed) in plan})
        del loaded
    info = moe.describe(models[("base", seeds[0])])
    n_layers, n_experts, top_k = len(info.layers), info.n_experts, info.top_k
    n_routed = n_layers * n_experts
    max_positions = models[("base", seeds[0])].config.max_position_embeddings
    requests = request_inputs(tokenizer, cc.requests, cc.decode_tokens, max_positions)
    settings = {"kind": "requests", "requests": [r["prompt"] + [-1] + r["decode"] for r in requests],
                "batch_size": cfg.eval.batch_size}
    folders = {key: runs.trace_dir(cfg, NOTEBOOK, run_name(*key), models[key], settings) for key in plan}
    traces = {key: runs.traces_in(folders[key], force=force,
                                  compute=lambda lm=models[key]: request_traces(lm, requests, tokenizer.pad_token_id,
                                                                                cfg.eval.batch_size))
              for key in plan}
    long_keys = [key for key in primary if key[0] in ("lora_control", "cfmoe")]
    streams = {key: prompt_stream(cfg, key, models[key], tokenizer, force) for key in long_keys}
    del models

    k_over_e = top_k / n_experts
    summary = pd.DataFrame([{
        "run": run, "seed": seed, "requests": len(ts), "prefill_tokens": sum(int((t.phase == 0).sum()) for t in ts),
        "decode_tokens": sum(int((t.phase == 1).sum()) for t in ts),
        "decode_ecr": float(np.mean([metrics.expert_consistency_rate(t.decode.experts) for t in ts])),
        "prefill_experts_per_layer": float(np.mean([len(serving_sim.prefill_keys(t.prefill.experts, n_experts))
                                                    / n_layers for t in ts])),
    } for (run, seed), ts in traces.items()])
    summary.insert(summary.columns.get_loc("decode_ecr") + 1, "decode_ecr_over_k_e", summary.decode_ecr / k_over_e)

    levels = level_capacities(n_routed, cc.cached_shares) / n_routed  # shares of whole experts
    capacities = capacity_grid(n_routed, cc.capacity_points, cc.cached_shares)
    per_layer_caps = np.unique(np.rint(capacities / n_layers).astype(int).clip(1, n_experts))
    # simulations are memoized per (model's traces, policy, settings, simulator source): see runs.memoized_table
    code = (cache, serving_sim, costmodel)

    def per_run_policy(name, keys, policies, compute, extra):
        frames = [runs.memoized_table(cfg, NOTEBOOK, f"{name}-{run_name(*key)}-{policy}",
                                      {"traces": folders[key].name, "policy": policy, **extra},
                                      lambda key=key, policy=policy: compute(key, policy), code, force)
                  .assign(run=key[0], seed=key[1])
                  for key in keys for policy in policies]
        return pd.concat(frames, ignore_index=True)

    curves = per_run_policy("hit_rate_curves", plan, cc.policies, lambda key, policy: hit_rate_curves(
        {key[0]: traces[key]}, n_experts, n_layers, top_k, capacities, per_layer_caps, [policy]),
        {"capacities": capacities, "per_layer": per_layer_caps})
    order = {"run": list(runs.FINETUNE_RUNS), "seed": seeds}
    curves = _in_order(curves, {**order, "scope": ["global", "per_layer"], "policy": list(cc.policies)})

    own = costmodel.from_describe(info)
    paper = costmodel.deepseek_moe_16b(cc.bits_per_param)
    # the serving grid is coarse, with three extra points at the low end, where a local model needs little
    low = np.rint(n_routed * np.arange(1, 4) / (4 * cc.serving_points)).astype(int).clip(1)
    serving_caps = np.union1d(capacity_grid(n_routed, cc.serving_points, cc.cached_shares), low)
    serving = per_run_policy("serving_modes", primary, cc.serving_policies, lambda key, policy: serving_modes(
        {key[0]: traces[key]}, n_experts, serving_caps, [policy], cc.batch_sizes, own, costmodel.PROFILES["cpu"]),
        {"capacities": serving_caps, "batches": list(cc.batch_sizes), "sizes": vars(own)})
    serving = _in_order(serving, {**order, "batch": list(cc.batch_sizes), "policy": list(cc.serving_policies)})
    throughput = {s.name: throughput_curves(curves, s, n_routed) for s in (paper, own)}

    def saved_per_seed(tp: pd.DataFrame) -> pd.DataFrame:
        frames = [memory_saved(tp[tp.seed == seed], levels, ("lora_control", p), ("cfmoe", p)).assign(seed=seed)
                  for seed in seeds for p in cc.policies]
        table = pd.concat(frames, ignore_index=True)
        table.insert(0, "seed", table.pop("seed"))
        table.insert(3, "policy_label", table.policy.map(policy_label))
        return table

    saved = {name: saved_per_seed(tp) for name, tp in throughput.items()}
    saved_summary = pd.concat([memory_summary(table).assign(sizes=name) for name, table in saved.items()],
                              ignore_index=True)
    first = {name: tp[tp.seed == seeds[0]] for name, tp in throughput.items()}
    combos = combinations(first[paper.name], serving, levels, paper, n_routed)

    extra = {"sizes": {s.name: vars(s) for s in (paper, own)}, "devices": {d: vars(costmodel.PROFILES[d])
                                                                              for d in DEVICES},
             "seeds": seeds, "primary_seed": seeds[0], "oracle_policies": list(ORACLE_POLICIES)}
    save_table(summary, out / "requests", cfg, seeds=seeds)
    save_table(curves, out / "hit_rate_curves", cfg, lookahead=cache.default_lookahead(n_layers, top_k), seeds=seeds)
    save_table(serving, out / "serving_modes", cfg, **extra)
    save_table(pd.concat(throughput.values(), ignore_index=True), out / "throughput_curves", cfg, **extra)
    save_table(saved[paper.name], out / "memory_at_equal_throughput", cfg, **extra)
    save_table(saved[own.name], out / "memory_at_equal_throughput_own_sizes", cfg, **extra)
    save_table(saved_summary, out / "memory_at_equal_throughput_summary", cfg, **extra,
               interval="mean over seeds of each seed's mean over devices and levels, 95% Student-t interval")
    save_table(combos, out / "memory_saved_combinations", cfg, **extra)
    long_capacity = int(level_capacities(n_routed, [LONG_SHARE])[0])
    long_prompts = pd.concat([long_prompt_modes(traces[key], streams[key], n_experts, long_capacity)
                              .assign(run=key[0], seed=key[1]) for key in long_keys], ignore_index=True)
    save_table(long_prompts, out / "long_prompts", cfg, share=LONG_SHARE, seed=seeds[0],
               prompts="consecutive teacher-forced test blocks, a different offset per request")
    return {"summary": summary, "curves": curves, "serving": serving, "throughput": throughput[paper.name],
            "saved": saved[paper.name], "saved_own": saved[own.name], "saved_summary": saved_summary,
            "combinations": combos, "info": info, "paper_sizes": paper, "own_sizes": own, "seeds": seeds,
            "long_prompts": long_prompts}


def policy_gaps(curves: pd.DataFrame) -> dict[str, float]:
    """Our `layer_lru` against LRU (mean, best, worst hit-rate gain; points won and lost over every model, seed and
    capacity of the global pool), and how far LOPT and LRU sit below OPT (the oracle bound) on average."""
    curves = runs.with_seed(curves)
    g = curves[curves.scope == "global"].pivot_table(index=["run", "seed", "capacity"], columns="policy",
                                                     values="hit_rate")
    gain = g["layer_lru"] - g["lru"]
    return {"mean": gain.mean(), "best": gain.max(), "worst": gain.min(), "wins": int((gain > 0).sum()),
            "losses": int((gain < 0).sum()), "points": len(gain), "lopt_below_opt": (g["opt"] - g["lopt"]).mean(),
            "lru_below_opt": (g["opt"] - g["lru"]).mean()}


def mode_means(serving: pd.DataFrame) -> pd.DataFrame:
    """Decode hit rate of each prefill mode averaged over the capacity grid, and each disaggregated mode's
    difference from unified."""
    pivot = serving.pivot_table(index=["run", "policy", "batch"], columns="mode", values="decode_hit_rate",
                                aggfunc="mean")
    pivot["disaggregated - unified"] = pivot["disaggregated"] - pivot["unified"]
    pivot["warm - unified"] = pivot["disaggregated_warm"] - pivot["unified"]
    return pivot


def modes_at_levels(serving: pd.DataFrame, shares) -> pd.DataFrame:
    """At the throughput levels' capacities: each disaggregated mode's decode hit rate against unified's
    (points at least as high, mean/min/max difference) and its prefill bytes relative to unified's."""
    levels = serving[serving.cached_share.round(6).isin(np.round(np.asarray(shares, float), 6))]
    by = levels.set_index(["run", "policy", "batch", "capacity", "mode"])
    unified = by.xs("unified", level="mode")
    rows = []
    for mode in ("disaggregated", "disaggregated_warm"):
        other = by.xs(mode, level="mode")
        diff = other.decode_hit_rate - unified.decode_hit_rate
        rows.append({"mode": mode, "at_least_unified": int((diff >= 0).sum()), "points": len(diff),
                     "mean": diff.mean(), "min": diff.min(), "max": diff.max(),
                     "worst_per_model": diff.groupby("run").min().round(4).to_dict(),
                     "prefill_bytes_vs_unified": (other.prefill_loaded_bytes / unified.prefill_loaded_bytes - 1).mean()})
    return pd.DataFrame(rows).set_index("mode")


def memory_summary(saved: pd.DataFrame) -> pd.DataFrame:
    """One row per policy of `memory_at_equal_throughput` (CFMoE vs the control under the same policy): each
    seed's mean over devices and levels, then the mean over seeds with its 95% Student-t interval, of the share
    saved (`memory_saved`), the gigabytes saved (`saved_gb`) and the control's memory at those levels
    (`memory_control_gb`); oracle policies flagged and labelled, the headline policy marked."""
    saved = runs.with_seed(saved)
    reached = saved.memory_saved.notna()
    per_seed = (saved.assign(saved_gb=saved.memory_base_gb - saved.memory_cfmoe_gb,
                             memory_control_gb=saved.memory_base_gb.where(reached), level=reached)
                .groupby(["policy", "seed"], sort=False)
                .agg(memory_saved=("memory_saved", "mean"), saved_gb=("saved_gb", "mean"),
                     memory_control_gb=("memory_control_gb", "mean"), levels=("level", "sum"), rows=("level", "size"))
                .reset_index())
    table = stats.summarize(per_seed, ["policy"], ["memory_saved", "saved_gb", "memory_control_gb"])
    table = table.rename(columns={"n": "seeds"})
    counts = per_seed.groupby("policy", sort=False)[["levels", "rows"]].sum()
    table.insert(1, "policy_label", table.policy.map(policy_label))
    table.insert(2, "oracle", table.policy.isin(ORACLE_POLICIES))
    table.insert(3, "headline", table.policy == HEADLINE_POLICY)
    table.insert(5, "levels_reached", table.policy.map(counts.levels).astype(int))
    table.insert(6, "levels", table.policy.map(counts.rows).astype(int))
    return table


def memory_headline(saved: pd.DataFrame, requests: pd.DataFrame, policy: str = HEADLINE_POLICY) -> dict:
    """Memory saved at equal throughput, CFMoE vs the LoRA control under the same policy, from the per-seed
    `memory_at_equal_throughput` and `requests` tables: for the headline policy (`headline`, with `saved_gb` and
    the control's `control_gb`) and per policy (`per_policy`), each as (mean, low, high) over seeds (95%
    Student-t); the verdict of the mean against the paper and whether the interval holds the paper's figure; and
    the decode ECR (and ECR/(k/E)) of the control and CFMoE on the requests behind it, paired by seed."""
    table = memory_summary(saved).set_index("policy")
    policy = policy if policy in table.index else table.index[0]  # a preset that does not simulate LRU

    def triple(p, column):
        return tuple(float(table.loc[p, c]) for c in (column, f"{column}_low", f"{column}_high"))

    req = runs.with_seed(requests)
    req = req if "decode_ecr_over_k_e" in req else req.assign(decode_ecr_over_k_e=float("nan"))

    def by_seed(run, column):
        return req[req.run == run].set_index("seed")[column].sort_index()

    head = triple(policy, "memory_saved")
    control, cfmoe = by_seed("lora_control", "decode_ecr"), by_seed("cfmoe", "decode_ecr")
    return {"policy": policy, "label": policy_label(policy), "seeds": int(table.loc[policy, "seeds"]),
            "levels_reached": int(table.loc[policy, "levels_reached"]), "levels": int(table.loc[policy, "levels"]),
            "headline": head, "saved_gb": triple(policy, "saved_gb"), "control_gb": triple(policy, "memory_control_gb"),
            "per_policy": {p: triple(p, "memory_saved") for p in table.index},
            "verdict": claims.memory_verdict(head[0]),
            "paper_in_interval": bool(head[1] <= claims.PAPER_MEMORY_SAVED <= head[2]),
            "control_ecr": stats.mean_interval(control), "cfmoe_ecr": stats.mean_interval(cfmoe),
            "delta_ecr": stats.mean_interval((cfmoe - control).dropna()),
            "ecr_gain": stats.mean_interval((cfmoe / control - 1).dropna()),
            "control_ecr_over_k_e": stats.mean_interval(by_seed("lora_control", "decode_ecr_over_k_e")),
            "cfmoe_ecr_over_k_e": stats.mean_interval(by_seed("cfmoe", "decode_ecr_over_k_e"))}


def best_of(combos: pd.DataFrame, source: str = "served requests", model: str = "cfmoe") -> tuple[pd.Series, int]:
    """The combination of one source and model with the highest mean memory saved, and N, the number of
    combinations it is the best of: a maximum over N (selected after the fact), so not a headline."""
    rows = combos[(combos.source == source) & (combos.model == model)]
    return rows.loc[rows.mean_memory_saved.idxmax()], len(rows)


def reaching_paper(combos: pd.DataFrame) -> pd.DataFrame:
    """The combinations whose mean memory saved reaches the paper's."""
    return combos[combos.mean_memory_saved >= claims.PAPER_MEMORY_SAVED]


def figures(cfg: StudyConfig, results: dict) -> None:
    """Figures of notebook 03, drawn from the stage's tables (the primary seed's models; oracle policies named)."""
    out = cfg.results_dir(NOTEBOOK)
    seed = results["seeds"][0]
    first = {name: results[name][results[name].seed == seed] for name in ("curves", "throughput", "saved")}
    save_figure(plots.hit_rate_curves(first["curves"], POLICY_LABELS), out / "hit_rate_curves", cfg)
    save_figure(plots.serving_modes(results["serving"], POLICY_LABELS), out / "serving_modes", cfg)
    save_figure(plots.memory_throughput(first["throughput"], first["saved"], POLICY_LABELS), out / "memory_throughput",
                cfg)


compute = runs.one_result_set(NOTEBOOK, _compute, figures)
