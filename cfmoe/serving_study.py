"""Notebook 05's stage: real decode tokens/s and TTFT of the offloading engine against its memory budget.

    python -m cfmoe.study serving --preset cpu

Each model serves the same requests (the entry prompts of the first `serving.requests` WikiText-2 test
entries, one after another, greedy, `serving.new_tokens` tokens each) in memory and through
`cfmoe.serving.OffloadEngine` at each budget (a share of the routed experts), policy, prefill mode and
slow tier. Every engine run is checked token for token against the in-memory model. Memory is the fast
tier's bytes: the resident weights plus the engine's slot pool (staging slots included).
"""

from __future__ import annotations

import copy
import time

import numpy as np
import pandas as pd
import torch

from . import costmodel, data, moe, study
from .cache_study import saved_at_levels
from .config import StudyConfig
from .determinism import make_deterministic
from .provenance import save_figure, save_table
from .serving import OffloadEngine, write_store

SERVING = "05_serving"


def _generate_kwargs(tokenizer, new_tokens: int, repetition_penalty: float) -> dict:
    # greedy with the authors' repetition penalty (notebook 04); no EOS stop: every run decodes exactly
    # new_tokens, so tokens/s compare like for like
    return {"max_new_tokens": new_tokens, "do_sample": False, "repetition_penalty": repetition_penalty,
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": None}


def paper_io_ratio(bits_per_param: float = 4.5) -> float:
    """On the authors' edge CPU, how many times longer a token takes when all its experts miss (read at flash
    speed) than its memory-bound time with everything cached: W_dynamic/B_io / ((W_resident+W_dynamic)/B_mem)."""
    sizes, device = costmodel.deepseek_moe_16b(bits_per_param), costmodel.PROFILES["cpu"]
    return (sizes.w_dynamic / (device.io_bandwidth_gbps * 1e9)) / \
        ((sizes.w_resident + sizes.w_dynamic) / (device.mem_bandwidth_gbps * 1e9))


def scaled_bandwidth(sizes: costmodel.ModelSizes, seconds_per_token: float, bits_per_param: float = 4.5) -> float:
    """GB/s at which our model's all-miss token costs `paper_io_ratio` times its measured in-memory token time:
    a slow tier as slow, relative to this machine's compute, as the authors' flash was to their device."""
    return sizes.w_dynamic / (paper_io_ratio(bits_per_param) * seconds_per_token) / 1e9


@torch.no_grad()
def in_memory(lm, requests, kwargs) -> tuple[list[torch.Tensor], dict]:
    """The unmodified model's outputs and decode speed on the requests (the reference)."""
    times, outputs, ttft, decode_s, steps = [], [], [], 0.0, 0
    hook = lm.register_forward_hook(lambda *a: times.append(time.perf_counter()))
    try:
        for ids in requests:
            times.clear()
            started = time.perf_counter()
            outputs.append(lm.generate(input_ids=ids, **kwargs))
            ttft.append(times[0] - started)
            decode_s += times[-1] - times[0]
            steps += len(times) - 1
    finally:
        hook.remove()
    return outputs, {"ttft_s": float(np.mean(ttft)), "decode_tokens_per_s": steps / decode_s}


def engine_run(lm, store, requests, reference, kwargs, **engine_kwargs) -> dict:
    """Serve the requests in order through one engine (its cache carries over); summed measurements."""
    model = copy.deepcopy(lm)
    engine = OffloadEngine(model, store, write=False, **engine_kwargs)
    rows, identical = [], True
    for ids, expected in zip(requests, reference):
        out, stats = engine.generate(ids, **kwargs)
        identical &= bool(torch.equal(out, expected))
        rows.append(stats)
    frame = pd.DataFrame(rows)
    steps = (frame.new_tokens - 1).sum()
    summed = frame[[c for c in frame.columns if c.endswith(("_hits", "_misses", "_bytes_read", "_load_seconds"))]].sum()
    decode_accesses = summed.decode_hits + summed.decode_misses
    result = {"slots": engine.n_slots, "pool_bytes": engine.pool_bytes, "identical": identical,
              "ttft_s": frame.ttft_s.mean(), "decode_tokens_per_s": steps / frame.decode_s.sum(),
              **summed.to_dict(), "decode_hit_rate": summed.decode_hits / decode_accesses,
              "decode_misses_per_token": summed.decode_misses / steps,
              "decode_load_share": summed.decode_load_seconds / frame.decode_s.sum()}
    engine.store.close()
    return result


def serving_stage(cfg: StudyConfig, force: bool = False) -> dict:
    """Notebook 05: measure the engine on this machine for every run, tier, budget, policy and mode."""
    make_deterministic(cfg.seed, cfg.threads)
    out = cfg.results_dir(SERVING)
    sc = cfg.serving
    models, tokenizer = study.load_runs(cfg)
    info = moe.describe(models["base"])
    n_routed = len(info.layers) * info.n_experts
    sizes = costmodel.from_describe(info)
    task = data.entry_task("test").select(range(sc.requests))
    requests = [tokenizer(p, return_tensors="pt")["input_ids"] for p in task["prompt"]]
    kwargs = _generate_kwargs(tokenizer, sc.new_tokens, cfg.ecr.repetition_penalty)
    store_dir = cfg.artifacts_dir / "expert_stores"
    store_dir.mkdir(parents=True, exist_ok=True)
    profile = costmodel.measure_profile(store_dir, size_mb=sc.profile_mb)

    rows, bandwidth = [], {}
    combos = [("lru", mode) for mode in sc.modes] + [(p, "disaggregated") for p in sc.policies if p != "lru"]
    for run in sc.runs:
        lm = models[run]
        in_memory(lm, requests[:1], {**kwargs, "max_new_tokens": 2})  # warm-up
        reference, ref = in_memory(lm, requests, kwargs)
        if not bandwidth:  # fixed once, from the first run's in-memory speed, for every run
            bandwidth = {tier: (sc.throttle_gbps or scaled_bandwidth(sizes, 1 / ref["decode_tokens_per_s"],
                                                                      cfg.cache.bits_per_param))
                         if tier == "throttled" else None for tier in sc.tiers}
        rows.append({"run": run, "tier": "in_memory", "policy": "", "mode": "in_memory", "share": 1.0,
                     "capacity": n_routed, "memory_gb": info.total_bytes / 1e9, "identical": True, **ref,
                     "decode_hit_rate": 1.0, "decode_misses_per_token": 0.0})
        store = write_store(lm, store_dir / f"{run}.safetensors")
        for tier in sc.tiers:
            for share in sc.shares:
                capacity = int(max(info.top_k, round(share * n_routed)))
                for policy, mode in (combos if tier == sc.full_tier else combos[:2]):
                    result = engine_run(lm, store, requests, reference, kwargs, capacity=capacity, policy=policy,
                                        mode=mode, tier=tier, bandwidth_gbps=bandwidth[tier])
                    rows.append({"run": run, "tier": tier, "io_gbps": bandwidth[tier], "policy": policy, "mode": mode,
                                 "share": share,
                                 "capacity": capacity,
                                 "memory_gb": (info.resident_bytes + result["pool_bytes"]) / 1e9, **result})
    measured = pd.DataFrame(rows)
    in_mem = measured[measured.tier == "in_memory"].set_index("run").decode_tokens_per_s
    measured["vs_in_memory"] = measured.decode_tokens_per_s / measured.run.map(in_mem)

    prediction = predict(measured, sizes, profile)
    levels = [s for s in sc.shares if s in (0.25, 0.5, 0.75)] or list(sc.shares)
    saved = memory_saved(measured, levels)
    keys = ["run", "tier", "policy", "mode", "share"]
    predicted = measured.merge(prediction[keys + ["calibrated_tokens_per_s"]], on=keys, how="left")
    predicted["decode_tokens_per_s"] = predicted.calibrated_tokens_per_s
    saved = saved.merge(memory_saved(predicted, levels)[["tier", "policy", "mode", "share", "memory_saved"]]
                        .rename(columns={"memory_saved": "predicted_memory_saved"}),
                        on=["tier", "policy", "mode", "share"], how="left")
    extra = {"profile": vars(profile), "requests": sc.requests, "new_tokens": sc.new_tokens,
             "throttled_gbps": bandwidth.get("throttled"), "paper_io_ratio": paper_io_ratio(cfg.cache.bits_per_param),
             "threads": torch.get_num_threads()}
    save_table(measured, out / "measurements", cfg, **extra)
    save_table(prediction, out / "prediction", cfg, **extra)
    save_table(saved, out / "memory_saved", cfg, **extra)
    return {"measured": measured, "prediction": prediction, "saved": saved, "profile": profile, "info": info}


def predict(measured: pd.DataFrame, sizes: costmodel.ModelSizes, profile: costmodel.DeviceProfile) -> pd.DataFrame:
    """The cost model's decode tokens/s at each run's measured hit rate: the authors' (memory-bound) and a
    calibrated one with a compute floor from the same model's in-memory run and the tier's read bandwidth."""
    rows = []
    for run, group in measured.groupby("run", sort=False):
        ref = group[group.tier == "in_memory"].iloc[0]
        memory_s = (sizes.w_resident + sizes.w_dynamic) / (profile.mem_bandwidth_gbps * 1e9)
        floor = max(0.0, 1 / ref.decode_tokens_per_s - memory_s)
        for r in group[group.tier != "in_memory"].itertuples():
            io = r.io_gbps if r.tier == "throttled" else profile.io_bandwidth_gbps
            device = costmodel.custom_profile(r.tier, profile.mem_bandwidth_gbps, io)
            authors = costmodel.tokens_per_second(sizes, device, r.decode_hit_rate)
            calibrated = costmodel.tokens_per_second(sizes, device, r.decode_hit_rate, compute_s_per_token=floor)
            rows.append({"run": run, "tier": r.tier, "policy": r.policy, "mode": r.mode, "share": r.share,
                         "decode_hit_rate": r.decode_hit_rate, "measured_tokens_per_s": r.decode_tokens_per_s,
                         "authors_model_tokens_per_s": authors, "calibrated_tokens_per_s": calibrated,
                         "authors_model_error": authors / r.decode_tokens_per_s - 1,
                         "calibrated_error": calibrated / r.decode_tokens_per_s - 1, "compute_floor_s": floor,
                         "io_gbps": io})
    return pd.DataFrame(rows)


def memory_saved(measured: pd.DataFrame, shares, baseline: str = "base", candidate: str = "cfmoe") -> pd.DataFrame:
    """Measured memory CFMoE needs at the tokens/s the baseline reaches with `shares` of its experts cached."""
    rows = []
    engine = measured[measured.tier != "in_memory"].rename(columns={"decode_tokens_per_s": "tokens_per_s"})
    for (tier, policy, mode), group in engine.groupby(["tier", "policy", "mode"], sort=False):
        base, cand = group[group.run == baseline], group[group.run == candidate]
        if base.empty or cand.empty:
            continue
        table = saved_at_levels(base, cand, shares, column="share")
        for i, (name, value) in enumerate((("tier", tier), ("policy", policy), ("mode", mode))):
            table.insert(i, name, value)
        rows.append(table)
    return pd.concat(rows, ignore_index=True)


def serving_figures(cfg: StudyConfig, results: dict) -> None:
    """Figures of notebook 05, drawn from the stage's tables."""
    from . import plots

    out = cfg.results_dir(SERVING)
    save_figure(plots.measured_throughput(results["measured"]), out / "measured_throughput", cfg)
    save_figure(plots.predicted_vs_measured(results["prediction"]), out / "predicted_vs_measured", cfg)
