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
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import claims, costmodel, data, moe, routing
from ..config import StudyConfig
from ..determinism import make_deterministic
from ..present import plots
from ..provenance import save_figure, save_table
from ..serving import ExpertStore, OffloadEngine, measure_load_seconds, reset_cuda_peak, write_store
from . import ecr_wikitext, runs

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


# --- paper scale: DeepSeek-MoE-16B-sized experts on a GPU, routing replayed from the study's models -------------

PAPER_SCALE = "paper_scale"  # results/05_serving/paper_scale/ (written by scripts/paper_scale.py on a GPU)
STREAM_RUNS = ("base", "lora_control", "cfmoe")


def export_streams(cfg: StudyConfig, out_dir) -> dict[str, Path]:
    """Notebook 04's generated WikiText (sampled decoding) of base, control and CFMoE, each run's requests in
    one replayable `RoutingTrace` (`meta['requests']`: [prompt tokens, decode tokens] per request), written to
    `out_dir/<run>.npz`: the routing the paper-scale model replays."""
    models, tokenizer = runs.load_runs(cfg)
    prompts = list(ecr_wikitext.entries(cfg)["prompt"])
    paths = {}
    for run in STREAM_RUNS:
        traces = ecr_wikitext.generated_traces(cfg, run, models[run], tokenizer, prompts, "sampled")
        joined = routing.RoutingTrace(np.concatenate([t.experts for t in traces]), None,
                                      np.concatenate([t.phase for t in traces]),
                                      np.concatenate([t.token_ids for t in traces]), traces[0].n_experts,
                                      {"run": run, "source": "04_ecr_wikitext, sampled decoding",
                                       "requests": [[int((t.phase == routing.PREFILL).sum()),
                                                     int((t.phase == routing.DECODE).sum())] for t in traces]})
        paths[run] = joined.save(Path(out_dir) / f"{run}.npz")
    return paths


def paper_scale_model(device, dtype=torch.bfloat16, **shrink):
    """A Qwen2-MoE of DeepSeek-MoE-16B's shape (`claims.DEEPSEEK_MOE_16B`: hidden 2048, 28 layers with the first
    dense, 64 routed experts of width 1408 plus the 2 shared ones as one of twice the width, top-6), random
    weights, built on `device`. `shrink` overrides config fields (tests build a tiny one)."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    d = claims.DEEPSEEK_MOE_16B
    fields = {"vocab_size": d["vocab_size"], "hidden_size": d["hidden"], "intermediate_size": d["dense_width"],
              "num_hidden_layers": d["n_layers"], "num_attention_heads": d["heads"], "num_key_value_heads": d["heads"],
              "num_experts": d["n_routed"], "num_experts_per_tok": d["top_k"], "moe_intermediate_size": d["expert_width"],
              "shared_expert_intermediate_size": d["n_shared"] * d["expert_width"], "mlp_only_layers": [0],
              "max_position_embeddings": 4096, "norm_topk_prob": False, **shrink}
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(Qwen2MoeConfig(**fields), dtype=dtype).eval()


def _request_inputs(stream: routing.RoutingTrace, request: int, new_tokens: int, seed: int):
    """(replayable sub-trace, random prompt ids of the recorded prompt's length, tokens to generate)."""
    sizes = stream.meta["requests"]
    start = sum(p + d for p, d in sizes[:request])
    prompt, decode = sizes[request]
    n_new = min(new_tokens, decode)  # generate runs n_new - 1 decode forwards after the prefill
    trace = stream.select(slice(start, start + prompt + decode))
    ids = torch.randint(10, 1000, (1, prompt), generator=torch.Generator().manual_seed(seed + request))
    return trace, ids, n_new


@torch.no_grad()
def paper_scale_measure(streams: dict, settings: list[dict], repeats: int = 5, new_tokens: int = 32,
                        requests: int = 2, warm_tokens: int = 8, seed: int = 0, device: str = "cuda",
                        store_path="artifacts/paper_scale/store.safetensors", dtype_name: str = "bfloat16",
                        budget_s: float = 0.0, **shrink) -> dict[str, pd.DataFrame]:
    """Resident and offloaded decode tokens/s of the paper-scale model replaying each stream.

    `settings`: dicts with `tier` ("host" or "throttled"), `share`, `policy`, `sources` (stream names) and, for
    the throttled tier, `gbps`. Every (setting, source, repeat) runs in one seeded random order; each run
    reconfigures the one engine (an empty cache of `share` of the routed experts), warms it with
    `warm_tokens` tokens of the stream's last request, then serves `requests` requests of `new_tokens` tokens,
    the cache carried over. Resident runs come first, per source, the same way. With `budget_s`, no engine run
    starts after that many seconds (the random order keeps what ran balanced); the table says how many ran."""
    started = time.perf_counter()
    device = torch.device(device)
    lm = paper_scale_model(device, getattr(torch, dtype_name), **shrink)
    info = moe.describe(lm)
    n_routed = len(info.layers) * info.n_experts
    sizes = costmodel.from_describe(info)
    kwargs = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    rng = np.random.default_rng(seed)

    def serve(generate, stream):
        warm, ids, _ = _request_inputs(stream, len(stream.meta["requests"]) - 1, warm_tokens, seed)
        with routing.replay_routing(lm, warm):
            generate(ids, max_new_tokens=warm_tokens)
        seconds, steps, rows = 0.0, 0, []
        for request in range(requests):
            trace, ids, n_new = _request_inputs(stream, request, new_tokens, seed)
            with routing.replay_routing(lm, trace):
                s, n, stats = generate(ids, max_new_tokens=n_new)
            seconds, steps = seconds + s, steps + n
            rows.append(stats)
        return seconds, steps, rows

    def resident_generate(ids, max_new_tokens):
        times = []
        hook = lm.register_forward_hook(lambda *a: times.append(time.perf_counter()))
        try:
            lm.generate(input_ids=ids.to(device), max_new_tokens=max_new_tokens, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        finally:
            hook.remove()
        return times[-1] - times[0], len(times) - 1, {}

    # the resident baseline runs the fastest experts implementation transformers offers here, measured
    speeds = {}
    for name in ("eager", "batched_mm", "grouped_mm"):
        try:
            lm.set_experts_implementation(name)
            serve(resident_generate, streams[next(iter(streams))])  # warm-up (compiles, allocates)
            seconds, steps, _ = serve(resident_generate, streams[next(iter(streams))])
            speeds[name] = steps / seconds
        except (ValueError, KeyError, ImportError, RuntimeError, NotImplementedError):
            continue
    implementation = max(speeds, key=speeds.get)
    lm.set_experts_implementation(implementation)
    resident = []
    for repeat, source in rng.permutation([(r, s) for r in range(repeats) for s in streams]).tolist():
        seconds, steps, _ = serve(resident_generate, streams[source])
        resident.append({"routing_source": source, "repeat": int(repeat), "tokens_per_s": steps / seconds,
                         "experts_implementation": implementation})
    resident = pd.DataFrame(resident)
    resident_tps = resident.groupby("routing_source").tokens_per_s.median()

    engine = OffloadEngine(lm, store_path, info.top_k, tier="host", verify=False)  # writes the store: just made
    copy_gbps = engine.expert_bytes / measure_load_seconds(engine.store, device=device) / 1e9
    runs_, rows = [(dict(s), source, r) for s in settings for source in s["sources"] for r in range(repeats)], []
    for index in rng.permutation(len(runs_)):
        if budget_s and time.perf_counter() - started > budget_s:
            print(f"budget of {budget_s:.0f} s reached after {len(rows)} of {len(runs_)} engine runs", flush=True)
            break
        setting, source, repeat = runs_[index]
        tier, gbps = setting["tier"], setting.get("gbps")
        capacity = int(max(info.top_k, round(setting["share"] * n_routed)))
        engine.reconfigure(capacity, setting["policy"], mode="disaggregated", tier=tier, bandwidth_gbps=gbps)

        def engine_generate(ids, max_new_tokens):
            out, stats = engine.generate(ids.to(device), max_new_tokens=max_new_tokens, **kwargs)
            return stats["decode_s"], stats["new_tokens"] - 1, stats

        seconds, steps, stats = serve(engine_generate, streams[source])
        frame = pd.DataFrame(stats)
        misses = frame.decode_misses.sum() / steps
        load_s = 1 / (copy_gbps * 1e9) if tier == "host" else 1 / (gbps * 1e9)
        floor = 1 / resident_tps[source]
        rows.append({"routing_source": source, "tier": tier, "io_gbps": copy_gbps if tier == "host" else gbps,
                     "share": setting["share"], "capacity": capacity, "policy": setting["policy"],
                     "mode": "disaggregated", "prefetch": False, "repeat": repeat, "tokens_per_s": steps / seconds,
                     "resident_tokens_per_s": resident_tps[source],
                     "hit_rate": frame.decode_hits.sum() / (frame.decode_hits.sum() + frame.decode_misses.sum()),
                     "misses_per_token": misses,
                     "limit_tokens_per_s": 1 / (floor + misses * engine.expert_bytes * load_s),
                     "load_share": frame.decode_load_seconds.sum() / frame.decode_s.sum(),
                     "load_gbps": frame.decode_bytes_read.sum() / max(frame.decode_load_seconds.sum(), 1e-12) / 1e9,
                     "expert_mb": engine.expert_bytes / 1e6,
                     "memory_gb": (info.resident_bytes + engine.pool_bytes) / 1e9, "decode_steps": steps})
    measured = pd.DataFrame(rows)
    measured["of_limit"] = measured.tokens_per_s / measured.limit_tokens_per_s
    measured["of_resident"] = measured.tokens_per_s / measured.resident_tokens_per_s
    return {"measurements": measured, "resident": resident,
            "meta": pd.DataFrame([{"experts_implementation": implementation, "implementation_tokens_per_s": speeds,
                                   "copy_gbps": copy_gbps,
                                   "expert_bytes": engine.expert_bytes, "routed_experts": n_routed,
                                   "resident_bytes": info.resident_bytes, "layers": len(info.layers),
                                   "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}]),
            "sizes": sizes}


def paper_scale_saved(measured: pd.DataFrame, baseline: str = "lora_control", candidate: str = "cfmoe",
                      resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Memory CFMoE needs at the tokens/s the control reaches at each share (medians over repeats), per tier
    and policy, with a bootstrap 95% interval over repeats."""
    rng = np.random.default_rng(seed)
    out = []
    for (tier, policy), group in measured.groupby(["tier", "policy"], sort=False):
        pair = group[group.routing_source.isin([baseline, candidate])]
        if pair.routing_source.nunique() < 2:
            continue
        shares = sorted(set(pair[pair.routing_source == baseline].share) & set(pair[pair.routing_source == candidate].share))

        samples = {key: g.tokens_per_s.to_numpy() for key, g in pair.groupby(["routing_source", "share"])}
        memory = pair.groupby(["routing_source", "share"]).memory_gb.first()

        def saved(medians: dict) -> pd.DataFrame:
            curves = {run: pd.DataFrame([{"share": share, "tokens_per_s": medians[(run, share)],
                                          "memory_gb": memory[(run, share)]} for share in shares])
                      for run in (baseline, candidate)}
            return costmodel.saved_at_levels(curves[baseline], curves[candidate], shares, column="share")

        point = saved({key: np.median(v) for key, v in samples.items()})
        boots = np.array([saved({key: np.median(rng.choice(v, len(v))) for key, v in samples.items()})
                          .memory_saved.to_numpy() for _ in range(resamples)], dtype=float)
        point["saved_low"] = np.nanpercentile(boots, 2.5, axis=0)
        point["saved_high"] = np.nanpercentile(boots, 97.5, axis=0)
        point.insert(0, "tier", tier)
        point.insert(1, "policy", policy)
        out.append(point)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def paper_scale_results(cfg: StudyConfig) -> dict | None:
    """The committed paper-scale measurements (results/05_serving/paper_scale/, from scripts/paper_scale.py on
    a GPU), memory saved with intervals and the goals' verdicts; None when they have not been measured."""
    folder = cfg.results_dir(NOTEBOOK) / PAPER_SCALE
    files = sorted(folder.glob("measurements_*.csv"))
    if not files:
        return None
    measured = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    machine = pd.concat([pd.read_csv(f) for f in sorted(folder.glob("machine_*.csv"))], ignore_index=True)
    medians = measured.groupby(["routing_source", "tier", "policy", "share"]).agg(
        tokens_per_s=("tokens_per_s", "median"), q1=("tokens_per_s", lambda v: v.quantile(0.25)),
        q3=("tokens_per_s", lambda v: v.quantile(0.75)), resident_tokens_per_s=("resident_tokens_per_s", "first"),
        hit_rate=("hit_rate", "median"), misses_per_token=("misses_per_token", "median"),
        limit_tokens_per_s=("limit_tokens_per_s", "median"), of_limit=("of_limit", "median"),
        of_resident=("of_resident", "median"), load_share=("load_share", "median"), repeats=("repeat", "nunique"),
        expert_mb=("expert_mb", "first")).reset_index()
    host = medians[(medians.tier == "host") & (medians.policy == "lru")]
    half = host[(host.routing_source == "cfmoe") & (host.share == claims.PAPER_SCALE_HALF_SHARE)].of_resident
    of_copy = measured[measured.tier == "host"].load_gbps.median() / machine.copy_gbps.median()
    verdicts = [claims.OF_RESIDENT_AT_HALF.verdict(float(half.iloc[0]) if len(half) else float("nan"), signed=False),
                claims.OF_LIMIT.verdict(float(medians.of_limit.min()), signed=False),
                claims.OF_COPY_BANDWIDTH.verdict(float(of_copy), signed=False)]
    return {"measured": measured, "medians": medians, "saved": paper_scale_saved(measured), "machine": machine,
            "verdicts": verdicts}


def figures(cfg: StudyConfig, results: dict) -> None:
    """Figures of notebook 05, drawn from the stage's tables."""
    out = cfg.results_dir(NOTEBOOK)
    save_figure(plots.measured_throughput(results["measured"]), out / "measured_throughput", cfg)
    save_figure(plots.predicted_vs_measured(results["prediction"]), out / "predicted_vs_measured", cfg)


compute = runs.one_result_set(NOTEBOOK, _compute, figures)
