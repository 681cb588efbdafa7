"""Notebook 05 (`05_serving`): real decode tokens/s and TTFT of the offloading engine against its memory budget.

    python -m cfmoe.stages serving --preset cpu

Each model serves the same requests (the entry prompts of the first `serving.requests` WikiText-2 test
entries, one after another, greedy, `serving.new_tokens` tokens each) in memory and through
`cfmoe.serving.OffloadEngine` at each budget (a share of the routed experts), policy, prefill mode and
slow tier. Every engine run is checked token for token against the in-memory model. Memory is the fast
tier's bytes: the resident weights plus the engine's slot pool (staging slots included).
"""

from __future__ import annotations

import copy
import gc
import time

import numpy as np
import pandas as pd
import torch

from .. import claims, costmodel, data, moe
from ..config import StudyConfig
from ..determinism import make_deterministic
from ..present import plots
from ..provenance import save_figure, save_table
from ..serving import ExpertStore, OffloadEngine, measure_load_seconds, reset_cuda_peak, write_store
from . import runs

NOTEBOOK = "05_serving"


def _generate_kwargs(tokenizer, new_tokens: int, repetition_penalty: float) -> dict:
    # greedy with the authors' repetition penalty (notebook 04); no EOS stop: every run decodes exactly
    # new_tokens, so tokens/s compare like for like
    return {"max_new_tokens": new_tokens, "do_sample": False, "repetition_penalty": repetition_penalty,
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": None}


def paper_io_ratio(bits_per_param: float = claims.DEEPSEEK_MOE_16B["bits_per_param"]) -> float:
    """On the authors' edge CPU, how many times longer a token takes when all its experts miss (read at flash
    speed) than its memory-bound time with everything cached: W_dynamic/B_io / ((W_resident+W_dynamic)/B_mem)."""
    sizes, device = costmodel.deepseek_moe_16b(bits_per_param), costmodel.PROFILES["cpu"]
    return (sizes.w_dynamic / (device.io_bandwidth_gbps * 1e9)) / \
        ((sizes.w_resident + sizes.w_dynamic) / (device.mem_bandwidth_gbps * 1e9))


def scaled_bandwidth(sizes: costmodel.ModelSizes, seconds_per_token: float,
                     bits_per_param: float = claims.DEEPSEEK_MOE_16B["bits_per_param"]) -> float:
    """GB/s at which our model's all-miss token costs `paper_io_ratio` times its measured in-memory token time:
    a slow tier as slow, relative to this machine's compute, as the authors' flash was to their device."""
    return sizes.w_dynamic / (paper_io_ratio(bits_per_param) * seconds_per_token) / 1e9


@torch.no_grad()
def in_memory(lm, requests, kwargs) -> tuple[list[torch.Tensor], dict]:
    """The unmodified model's outputs and decode speed on the requests (the reference)."""
    times, outputs, ttft, decode_s, steps, transient = [], [], [], 0.0, 0, 0
    cuda = next(lm.parameters()).device.type == "cuda"
    hook = lm.register_forward_hook(lambda *a: times.append(time.perf_counter()))
    try:
        for ids in requests:
            times.clear()
            start_bytes = reset_cuda_peak() if cuda else 0
            started = time.perf_counter()
            outputs.append(lm.generate(input_ids=ids, **kwargs))
            ttft.append(times[0] - started)
            decode_s += times[-1] - times[0]
            steps += len(times) - 1
            if cuda:
                transient = max(transient, torch.cuda.max_memory_allocated() - start_bytes)
    finally:
        hook.remove()
    extra = {"cuda_transient_bytes": transient} if cuda else {}
    return outputs, {"ttft_s": float(np.mean(ttft)), "decode_tokens_per_s": steps / decode_s, **extra}


def engine_run(lm, store, requests, reference, kwargs, **engine_kwargs) -> dict:
    """Serve the requests in order through one engine (its cache carries over); summed measurements.

    On CUDA the budget is also checked from the allocator: the engine's model copy may hold only its
    resident weights, buffers and slot pool (each tensor rounded up to the allocator's 512-byte blocks)."""
    cuda = next(lm.parameters()).device.type == "cuda"
    gc.collect()  # an earlier engine's model (a reference cycle through its hooks) must not be freed mid-count
    before = reset_cuda_peak() if cuda else 0
    model = copy.deepcopy(lm)
    engine = OffloadEngine(model, store, write=False, **engine_kwargs)
    memory = {}
    if cuda:
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()
        allowed = sum(-(-t.numel() * t.element_size() // 512) * 512 for t in tensors)
        if held > allowed:
            raise AssertionError(f"the engine's model holds {held} bytes of GPU memory, more than its resident weights,"
                                 f" buffers and slot pool ({allowed} bytes): the fast tier exceeds its budget")
        memory = {"cuda_engine_bytes": held, "cuda_allowed_bytes": allowed}
    rows, identical = [], True
    for ids, expected in zip(requests, reference):
        out, stats = engine.generate(ids, **kwargs)
        identical &= bool(torch.equal(out, expected))
        rows.append(stats)
    frame = pd.DataFrame(rows)
    steps = (frame.new_tokens - 1).sum()
    counts = ("_hits", "_misses", "_bytes_read", "_load_seconds", "prefetched", "prefetch_used", "prefetch_seconds")
    summed = frame[[c for c in frame.columns if c.endswith(counts)]].sum()
    decode_accesses = summed.decode_hits + summed.decode_misses
    if cuda:
        memory["cuda_transient_bytes"] = int((frame.cuda_peak_bytes - frame.cuda_start_bytes).max())
    result = {"slots": engine.n_slots, "pool_bytes": engine.pool_bytes, "identical": identical,
              "ttft_s": frame.ttft_s.mean(), "decode_tokens_per_s": steps / frame.decode_s.sum(),
              "decode_steps": int(steps), **summed.to_dict(), "decode_hit_rate": summed.decode_hits / decode_accesses,
              "decode_misses_per_token": summed.decode_misses / steps,
              "decode_load_share": summed.decode_load_seconds / frame.decode_s.sum(), **memory}
    engine.store.close()
    return result


def _compute(cfg: StudyConfig, force: bool = False) -> dict:
    """Measure the engine on this machine for every run, tier, budget, policy and mode."""
    make_deterministic(cfg.seed, cfg.threads)
    out = cfg.results_dir(NOTEBOOK)
    sc = cfg.serving
    models, tokenizer = runs.load_runs(cfg)
    info = moe.describe(models["base"])
    device = next(models["base"].parameters()).device
    n_routed = len(info.layers) * info.n_experts
    sizes = costmodel.from_describe(info)
    task = data.entry_task("test").select(range(sc.requests))
    requests = [tokenizer(p, return_tensors="pt")["input_ids"].to(device) for p in task["prompt"]]
    kwargs = _generate_kwargs(tokenizer, sc.new_tokens, cfg.ecr.repetition_penalty)
    store_dir = cfg.artifacts_dir / "expert_stores"
    store_dir.mkdir(parents=True, exist_ok=True)
    profile = costmodel.measure_profile(store_dir, size_mb=sc.profile_mb)
    if device.type == "cuda":  # the fast tier is the GPU's memory
        profile = costmodel.custom_profile("measured", _cuda_copy_gbps(device, sc.profile_mb), profile.io_bandwidth_gbps,
                                           notes=f"memory: device-to-device copy on {torch.cuda.get_device_name(device)}; "
                                                 + profile.notes.split("; ", 1)[1])

    combos = [("lru", mode, False) for mode in sc.modes] + [("lru", "disaggregated", True)] * sc.prefetch + \
        [(p, "disaggregated", False) for p in sc.policies if p != "lru"]
    partial = [("lru", "unified", False), ("lru", "disaggregated", False)]  # the other tiers
    rows, bandwidth, load_s = [], {}, {}
    for run in sc.runs:
        lm = models[run]
        in_memory(lm, requests[:1], {**kwargs, "max_new_tokens": 2})  # warm-up
        reference, ref = in_memory(lm, requests, kwargs)
        rows.append({"run": run, "tier": "in_memory", "policy": "", "mode": "in_memory", "prefetch": False,
                     "share": 1.0, "capacity": n_routed, "memory_gb": info.total_bytes / 1e9, "identical": True, **ref,
                     "decode_hit_rate": 1.0, "decode_misses_per_token": 0.0})
        store = write_store(lm, store_dir / f"{run}.safetensors")
        if not bandwidth:  # fixed once, from the first run's in-memory speed and store, for every run
            bandwidth = {tier: (sc.throttle_gbps or scaled_bandwidth(sizes, 1 / ref["decode_tokens_per_s"],
                                                                      cfg.cache.bits_per_param))
                         if tier == "throttled" else None for tier in sc.tiers}
            for tier in sc.tiers:
                reader = ExpertStore(store, tier, bandwidth[tier], device)
                load_s[tier] = measure_load_seconds(reader, device=device)
                reader.close()
        for tier in sc.tiers:
            for share in sc.shares:
                capacity = int(max(info.top_k, round(share * n_routed)))
                for policy, mode, prefetch in (combos if tier == sc.full_tier else partial):
                    result = engine_run(lm, store, requests, reference, kwargs, capacity=capacity, policy=policy,
                                        mode=mode, tier=tier, bandwidth_gbps=bandwidth[tier], prefetch=prefetch)
                    rows.append({"run": run, "tier": tier, "io_gbps": bandwidth[tier], "policy": policy,
                                 "mode": mode + "+prefetch" * prefetch, "prefetch": prefetch, "share": share,
                                 "capacity": capacity, "memory_gb": (info.resident_bytes + result["pool_bytes"]) / 1e9,
                                 **result})
    measured = pd.DataFrame(rows)
    in_mem = measured[measured.tier == "in_memory"].set_index("run").decode_tokens_per_s
    measured["vs_in_memory"] = measured.decode_tokens_per_s / measured.run.map(in_mem)

    prediction = predict(measured, sizes, profile, load_s)
    levels = [s for s in sc.shares if s in cfg.cache.cached_shares] or list(sc.shares)  # notebook 03's levels
    saved = memory_saved(measured, levels)
    keys = ["run", "tier", "policy", "mode", "share"]
    predicted = measured.merge(prediction[keys + ["calibrated_tokens_per_s"]], on=keys, how="inner")
    predicted["decode_tokens_per_s"] = predicted.calibrated_tokens_per_s
    saved = saved.merge(memory_saved(predicted, levels)[["tier", "policy", "mode", "share", "memory_saved"]]
                        .rename(columns={"memory_saved": "predicted_memory_saved"}),
                        on=["tier", "policy", "mode", "share"], how="left")
    extra = {"profile": vars(profile), "load_seconds_per_expert": load_s, "requests": sc.requests,
             "new_tokens": sc.new_tokens, "throttled_gbps": bandwidth.get("throttled"),
             "paper_io_ratio": paper_io_ratio(cfg.cache.bits_per_param), "threads": torch.get_num_threads(),
             "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    save_table(measured, out / "measurements", cfg, **extra)
    save_table(prediction, out / "prediction", cfg, **extra)
    save_table(saved, out / "memory_saved", cfg, **extra)
    return {"measured": measured, "prediction": prediction, "saved": saved, "profile": profile, "load_s": load_s,
            "info": info}


def _cuda_copy_gbps(device, size_mb: float, repeats: int = 5) -> float:
    """Bytes per second a device-to-device copy of `size_mb` MB moves on `device` (median of `repeats`)."""
    n = int(size_mb * 1e6)
    source, target = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    torch.cuda.synchronize(device)
    return costmodel.median_rate(lambda: (target.copy_(source), torch.cuda.synchronize(device)), n, repeats)


def predict(measured: pd.DataFrame, sizes: costmodel.ModelSizes, profile: costmodel.DeviceProfile,
            load_s: dict) -> pd.DataFrame:
    """The cost models' decode tokens/s at each engine run's measured hit rate (prefetch runs left out: their
    background reads are in neither model).

    - the authors' (memory-bound): resident + cached bytes at memory bandwidth, missed experts at the tier's
      bandwidth: the stated one when throttled, the profile's file read for `direct`/`page_cache`, and for
      `host` the rate of one measured expert copy;
    - calibrated (`costmodel.offload_tokens_per_second`): a per-token floor, the decode time outside expert
      loads of the (run, tier)'s largest-budget unified LRU run (the `calibration` row), plus each miss at
      `load_s[tier]`, the measured seconds to read one expert and copy it into fast memory."""
    rows = []
    engine = measured[(measured.tier != "in_memory") & ~measured.prefetch.astype(bool)]
    for (run, tier), group in engine.groupby(["run", "tier"], sort=False):
        anchor = group[(group["mode"] == "unified") & (group.policy == "lru")].sort_values("share").iloc[-1]
        floor = 1 / anchor.decode_tokens_per_s - anchor.decode_load_seconds / anchor.decode_steps
        io = group.io_gbps.iloc[0] if tier == "throttled" else \
            sizes.expert_bytes / load_s[tier] / 1e9 if tier == "host" else profile.io_bandwidth_gbps
        device = costmodel.custom_profile(tier, profile.mem_bandwidth_gbps, io)
        for r in group.itertuples():
            authors = costmodel.tokens_per_second(sizes, device, r.decode_hit_rate)
            calibrated = costmodel.offload_tokens_per_second(sizes, r.decode_hit_rate, floor, load_s[tier])
            rows.append({"run": run, "tier": tier, "policy": r.policy, "mode": r.mode, "share": r.share,
                         "calibration": r.Index == anchor.name, "decode_hit_rate": r.decode_hit_rate,
                         "measured_tokens_per_s": r.decode_tokens_per_s, "authors_model_tokens_per_s": authors,
                         "calibrated_tokens_per_s": calibrated, "authors_model_error": authors / r.decode_tokens_per_s - 1,
                         "calibrated_error": calibrated / r.decode_tokens_per_s - 1, "floor_s": floor,
                         "load_s_per_expert": load_s[tier], "io_gbps": io})
    return pd.DataFrame(rows)


def memory_saved(measured: pd.DataFrame, shares, baseline: str = "base", candidate: str = "cfmoe") -> pd.DataFrame:
    """Measured memory CFMoE needs at the tokens/s the baseline reaches with `shares` of its experts cached."""
    rows = []
    engine = measured[measured.tier != "in_memory"].rename(columns={"decode_tokens_per_s": "tokens_per_s"})
    for (tier, policy, mode), group in engine.groupby(["tier", "policy", "mode"], sort=False):
        base, cand = group[group.run == baseline], group[group.run == candidate]
        if base.empty or cand.empty:
            continue
        table = costmodel.saved_at_levels(base, cand, shares, column="share")
        for i, (name, value) in enumerate((("tier", tier), ("policy", policy), ("mode", mode))):
            table.insert(i, name, value)
        rows.append(table)
    return pd.concat(rows, ignore_index=True)


def mode_ratios(measured: pd.DataFrame) -> pd.DataFrame:
    """Decode tokens/s of each disaggregated mode over unified's, LRU, on the tier(s) where every mode ran;
    rows (run, tier, share)."""
    lru = measured[(measured.tier != "in_memory") & (measured.policy == "lru")]
    lru = lru[lru.tier.isin(lru[lru["mode"] == "disaggregated_warm"].tier.unique())]
    by = lru.pivot_table(index=["run", "tier", "share"], columns="mode", values="decode_tokens_per_s")
    return pd.DataFrame({mode: by[mode] / by.unified for mode in ("disaggregated", "disaggregated_warm")})


def prefetch_speedups(measured: pd.DataFrame) -> pd.Series:
    """Decode tokens/s with next-layer prefetch over plain disaggregated (LRU), per (run, tier, share) it ran at."""
    lru = measured[(measured.tier != "in_memory") & (measured.policy == "lru")]
    by = lru.pivot_table(index=["run", "tier", "share"], columns="mode", values="decode_tokens_per_s")
    if "disaggregated+prefetch" not in by:
        return pd.Series(dtype=float, name="speed-up")
    return (by["disaggregated+prefetch"] / by.disaggregated).dropna().rename("speed-up")


def prefetch_summary(measured: pd.DataFrame) -> pd.DataFrame:
    """Per tier: median prefetch speed-up, points at or above 1, how often a guess was used, extra decode bytes,
    and the verdict."""
    speedup = prefetch_speedups(measured)
    engine = measured[(measured.tier != "in_memory") & (measured.policy == "lru")]
    fetched = engine[engine.prefetch.astype(bool)].groupby("tier")
    plain = engine[engine["mode"] == "disaggregated"].groupby("tier").decode_bytes_read.sum()
    rows = []
    for tier, r in speedup.groupby(level="tier"):
        used, guessed = fetched.prefetch_used.sum()[tier], fetched.prefetched.sum()[tier]
        rows.append({"tier": tier, "median_speedup": r.median(), "points": len(r), "faster": int((r >= 1).sum()),
                     "right": used / guessed, "extra_decode_bytes": fetched.decode_bytes_read.sum()[tier] / plain[tier] - 1,
                     "verdict": claims.pays(r.median())})
    return pd.DataFrame(rows)


def prediction_errors(prediction: pd.DataFrame, tier: str | None = None) -> pd.DataFrame:
    """Each cost model's error against the measurement over the runs not used for calibration (on `tier`, or
    all): median, median |error| and the share within `claims.COST_MODEL_ERROR`."""
    tested = prediction[~prediction.calibration.astype(bool) & ((prediction.tier == tier) if tier else True)]
    rows = [{"model": column.removesuffix("_error"), "runs": len(tested), "median_error": tested[column].median(),
             "median_abs_error": tested[column].abs().median(),
             "within_target": tested[column].abs().map(claims.COST_MODEL_ERROR.met).mean()}
            for column in ("authors_model_error", "calibrated_error")]
    return pd.DataFrame(rows).set_index("model")


def figures(cfg: StudyConfig, results: dict) -> None:
    """Figures of notebook 05, drawn from the stage's tables."""
    out = cfg.results_dir(NOTEBOOK)
    save_figure(plots.measured_throughput(results["measured"]), out / "measured_throughput", cfg)
    save_figure(plots.predicted_vs_measured(results["prediction"]), out / "predicted_vs_measured", cfg)


compute = runs.one_result_set(NOTEBOOK, _compute, figures)
