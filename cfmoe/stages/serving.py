"""Notebook 05 (`05_serving`): real decode tokens/s and TTFT of the offloading engine against its memory budget.

    python -m cfmoe.stages serving --preset cpu

Each model serves the same requests (the entry prompts of the first `serving.requests` WikiText-2 test
entries, one after another, greedy, `serving.new_tokens` tokens each) in memory and through
`cfmoe.serving.OffloadEngine` at each budget (a share of the routed experts), policy, prefill mode and
slow tier: the settings (`grid`). Every setting is timed `serving.repeats` times, and all (setting, repeat)
runs are executed in one seeded random order (`run_order`), interleaving models and settings, so that drift
on a shared machine spreads over every setting instead of biasing some. Before each timed run the same engine
and setting (or the model in memory) generates `serving.warmup_tokens` untimed tokens; the engine's cache is
then emptied, so every timed run starts cold and its hit rate is the same in every repeat. Every run is
checked token for token against the in-memory model. Memory is the fast tier's bytes: the resident weights
plus the engine's slot pool (staging slots included).

Tables: `measurements` (one row per (setting, repeat)), `measurements_summary` (per setting: median and
interquartile range of decode tokens/s and TTFT over the repeats), `memory_saved` (per level, from the medians,
with 95% percentile bootstrap intervals over the repeats), `memory_saved_summary` (the mean over levels, per
baseline and tier) and `prediction` (the cost models at each setting's median). CFMoE is compared with the LoRA
control (the baseline: fine-tuned the same way without the locality loss) and, beside it, with base.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import cache, claims, costmodel, data, moe, routing, stats
from ..config import StudyConfig
from ..determinism import make_deterministic
from ..present import plots
from ..provenance import save_figure, save_table
from ..serving import ExpertStore, OffloadEngine, measure_load_seconds, reset_cuda_peak, write_store
from . import ecr_wikitext, runs

NOTEBOOK = "05_serving"
SETTING = ["run", "tier", "policy", "mode", "prefetch", "share"]  # the columns that name one timed setting
TIMED = ("decode_tokens_per_s", "ttft_s")  # summarized by median and interquartile range over repeats
BASELINE, BESIDE, CANDIDATE = "lora_control", "base", "cfmoe"  # memory saved: CFMoE vs the control, base beside
# what a reader sees for a tier whose key is not self-explanatory (the keys stay in the tables' `tier` column)
TIER_LABELS = {"throttled": "emulated (sleep-throttled)"}


def tier_label(tier: str) -> str:
    """A slow tier as a reader should read it: the sleep-throttled tier is an emulation, not a device."""
    return TIER_LABELS.get(tier, tier)


def readable(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with its `tier` column in readers' labels (`tier_label`), for displayed tables and figures."""
    return frame.assign(tier=frame.tier.map(tier_label)) if "tier" in frame else frame


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


# --- the grid and its order -----------------------------------------------------------------------------------

def grid(sc, n_routed: int, top_k: int) -> list[dict]:
    """Every timed setting of `sc` (a ServingConfig): each model in memory, and each engine run (model x tier x
    share x policy x mode x prefetch). Every policy, mode and prefetch runs on `sc.full_tier` for the runs in
    `sc.mode_runs` (all when empty); the other tiers, and the other runs on every tier, run LRU in
    `sc.partial_modes`."""
    combos = [("lru", mode, False) for mode in sc.modes] + [("lru", "disaggregated", True)] * sc.prefetch + \
        [(p, "disaggregated", False) for p in sc.policies if p != "lru"]
    partial = [("lru", mode, False) for mode in sc.partial_modes]
    settings = []
    for run in sc.runs:
        settings.append({"run": run, "tier": "in_memory", "policy": "", "mode": "in_memory", "prefetch": False,
                         "share": 1.0, "capacity": n_routed})
        for tier in sc.tiers:
            for share in sc.shares:
                capacity = int(max(top_k, round(share * n_routed)))
                full = tier == sc.full_tier and (run in sc.mode_runs or not sc.mode_runs)
                for policy, mode, prefetch in (combos if full else partial):
                    settings.append({"run": run, "tier": tier, "policy": policy, "mode": mode + "+prefetch" * prefetch,
                                     "prefetch": prefetch, "share": share, "capacity": capacity})
    return settings


def run_order(n_settings: int, repeats: int, seed: int) -> list[tuple[int, int]]:
    """(setting index, repeat) of every timed run, in one random order (`np.random.default_rng(seed)`)."""
    pairs = [(setting, repeat) for repeat in range(repeats) for setting in range(n_settings)]
    return [pairs[i] for i in np.random.default_rng(seed).permutation(len(pairs))]


# --- one timed run -------------------------------------------------------------------------------------------

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


class EngineBench:
    """One model's offloading engine for a whole sweep: a copy of the model, offloaded once and reconfigured
    (an empty cache, a fresh slot pool) for every run.

    On CUDA the budget is also checked from the allocator: the engine's model copy may hold only its resident
    weights, buffers, slot pool and the engine's slot table (each tensor rounded up to the allocator's 512-byte
    blocks). What it holds is measured when it is built and then followed through every reconfiguration's change."""

    def __init__(self, lm, store, tier: str, bandwidth_gbps: float | None = None):
        self.cuda = next(lm.parameters()).device.type == "cuda"
        gc.collect()  # an earlier engine's model (a reference cycle through its hooks) must not be freed mid-count
        before = reset_cuda_peak() if self.cuda else 0
        self.model = copy.deepcopy(lm)
        self.engine = OffloadEngine(self.model, store, moe.describe(lm).top_k, tier=tier,
                                    bandwidth_gbps=bandwidth_gbps, write=False)
        self.held = self._allocated() - before if self.cuda else 0
        self.memory = self._check()

    def _allocated(self) -> int:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    def _check(self) -> dict:
        if not self.cuda:
            return {}
        tensors = {id(t): t for t in (*self.model.parameters(), *self.model.buffers(),
                                      *self.engine.bookkeeping)}.values()
        allowed = sum(-(-t.numel() * t.element_size() // 512) * 512 for t in tensors)
        if self.held > allowed:
            raise AssertionError(f"the engine's model holds {self.held} bytes of GPU memory, more than its resident "
                                 f"weights, buffers, slot pool and slot table ({allowed} bytes): the fast tier exceeds "
                                 "its budget")
        return {"cuda_engine_bytes": self.held, "cuda_allowed_bytes": allowed}

    def configure(self, capacity: int, policy: str, mode: str, prefetch: bool, tier: str,
                  bandwidth_gbps: float | None) -> None:
        before = self._allocated() if self.cuda else 0
        self.engine.reconfigure(capacity, policy, mode=mode, prefetch=prefetch, tier=tier,
                                bandwidth_gbps=bandwidth_gbps)
        if self.cuda:
            self.held += self._allocated() - before
            self.memory = self._check()

    @torch.no_grad()
    def run(self, requests, reference, kwargs, warmup=None, *, capacity: int, policy: str = "lru",
            mode: str = "disaggregated", prefetch: bool = False, tier: str = "direct",
            bandwidth_gbps: float | None = None) -> dict:
        """Serve the requests in order (the cache carries over between them) from an empty cache; summed
        measurements. `warmup` = (prompt ids, tokens): generated first with the same settings, untimed, and the
        cache emptied after it."""
        settings = {"capacity": capacity, "policy": policy, "mode": mode, "prefetch": prefetch, "tier": tier,
                    "bandwidth_gbps": bandwidth_gbps}
        if warmup is not None:
            self.configure(**settings)
            ids, tokens = warmup
            self.engine.generate(ids, **{**kwargs, "max_new_tokens": tokens})
        self.configure(**settings)
        rows, identical = [], True
        for ids, expected in zip(requests, reference):
            out, stats_ = self.engine.generate(ids, **kwargs)
            identical &= bool(torch.equal(out, expected))
            rows.append(stats_)
        frame = pd.DataFrame(rows)
        steps = (frame.new_tokens - 1).sum()
        counts = ("_hits", "_misses", "_bytes_read", "_load_seconds", "prefetched", "prefetch_used", "prefetch_seconds")
        summed = frame[[c for c in frame.columns if c.endswith(counts)]].sum()
        decode_accesses = summed.decode_hits + summed.decode_misses
        memory = dict(self.memory)
        if self.cuda:
            memory["cuda_transient_bytes"] = int((frame.cuda_peak_bytes - frame.cuda_start_bytes).max())
        return {"slots": self.engine.n_slots, "pool_bytes": self.engine.pool_bytes, "identical": identical,
                "ttft_s": frame.ttft_s.mean(), "decode_tokens_per_s": steps / frame.decode_s.sum(),
                "decode_steps": int(steps), **summed.to_dict(), "decode_hit_rate": summed.decode_hits / decode_accesses,
                "decode_misses_per_token": summed.decode_misses / steps,
                "decode_load_share": summed.decode_load_seconds / frame.decode_s.sum(), **memory}

    def close(self) -> None:
        self.engine.close()


def engine_run(lm, store, requests, reference, kwargs, warmup=None, **engine_kwargs) -> dict:
    """One run through a fresh engine (`EngineBench.run`): serve the requests in order, summed measurements."""
    bench = EngineBench(lm, store, engine_kwargs.get("tier", "direct"), engine_kwargs.get("bandwidth_gbps"))
    try:
        return bench.run(requests, reference, kwargs, warmup, **engine_kwargs)
    finally:
        bench.close()


# --- the stage -----------------------------------------------------------------------------------------------

def _compute(cfg: StudyConfig, force: bool = False) -> dict:
    """Measure the engine on this machine: every setting of `grid`, `serving.repeats` times, in one random order."""
    make_deterministic(cfg.seed, cfg.threads)
    started = time.perf_counter()
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
    # the warm-up: the first request's first warmup_tokens tokens as the prompt, warmup_tokens new tokens
    warmup = (requests[0][:, :sc.warmup_tokens], sc.warmup_tokens)
    warm_kwargs = {**kwargs, "max_new_tokens": sc.warmup_tokens}
    store_dir = cfg.artifacts_dir / "expert_stores"
    store_dir.mkdir(parents=True, exist_ok=True)
    profile = costmodel.measure_profile(store_dir, size_mb=sc.profile_mb)
    if device.type == "cuda":  # the fast tier is the GPU's memory
        profile = costmodel.custom_profile("measured", _cuda_copy_gbps(device, sc.profile_mb), profile.io_bandwidth_gbps,
                                           notes=f"memory: device-to-device copy on {torch.cuda.get_device_name(device)}; "
                                                 + profile.notes.split("; ", 1)[1])

    # untimed set-up: each model's reference outputs (after a warm-up) and its expert store
    references, stores, setup_speed, load_s = {}, {}, {}, {}
    for run in sc.runs:
        lm = models[run]
        in_memory(lm, [warmup[0]], warm_kwargs)
        references[run], ref = in_memory(lm, requests, kwargs)
        setup_speed[run] = ref["decode_tokens_per_s"]
        stores[run] = write_store(lm, store_dir / f"{run}.safetensors")
    # the emulated tier's bandwidth, fixed once for every run: scaled to the models' median in-memory speed here
    seconds_per_token = 1 / float(np.median(list(setup_speed.values())))
    bandwidth = {tier: (sc.throttle_gbps or scaled_bandwidth(sizes, seconds_per_token, cfg.cache.bits_per_param))
                 if tier == "throttled" else None for tier in sc.tiers}
    for tier in sc.tiers:
        reader = ExpertStore(stores[sc.runs[0]], tier, bandwidth[tier], device)
        load_s[tier] = measure_load_seconds(reader, device=device)
        reader.close()
    benches = {run: EngineBench(models[run], stores[run], sc.tiers[0], bandwidth[sc.tiers[0]]) for run in sc.runs}

    settings = grid(sc, n_routed, info.top_k)
    rows = []
    for position, (index, repeat) in enumerate(run_order(len(settings), sc.repeats, cfg.seed)):
        setting = settings[index]
        run, tier = setting["run"], setting["tier"]
        if tier == "in_memory":
            lm = models[run]
            in_memory(lm, [warmup[0]], warm_kwargs)
            outputs, result = in_memory(lm, requests, kwargs)
            result.update(identical=all(torch.equal(a, b) for a, b in zip(outputs, references[run])),
                          memory_gb=info.total_bytes / 1e9, decode_hit_rate=1.0, decode_misses_per_token=0.0)
        else:
            result = benches[run].run(requests, references[run], kwargs, warmup, capacity=setting["capacity"],
                                      policy=setting["policy"], mode=setting["mode"].removesuffix("+prefetch"),
                                      prefetch=setting["prefetch"], tier=tier, bandwidth_gbps=bandwidth[tier])
            result.update(io_gbps=bandwidth[tier], memory_gb=(info.resident_bytes + result["pool_bytes"]) / 1e9)
        rows.append({**setting, "setting": index, "repeat": repeat, "order": position, **result})
    for bench in benches.values():
        bench.close()
    measured = pd.DataFrame(rows).sort_values(["setting", "repeat"], ignore_index=True)
    in_mem = measured[measured.tier == "in_memory"].groupby("run").decode_tokens_per_s.median()
    measured["vs_in_memory"] = measured.decode_tokens_per_s / measured.run.map(in_mem)
    summary = summarize_repeats(measured)

    prediction = predict(summary, sizes, profile, load_s)
    levels = [s for s in sc.shares if s in cfg.cache.cached_shares] or list(sc.shares)  # notebook 03's levels
    saved = memory_saved(measured, levels, seed=cfg.seed)
    saved_summary = memory_saved_summary(measured, levels, seed=cfg.seed)
    keys = ["run", "tier", "policy", "mode", "share"]
    predicted = summary.merge(prediction[keys + ["calibrated_tokens_per_s"]], on=keys, how="inner")
    predicted["decode_tokens_per_s"] = predicted.calibrated_tokens_per_s
    saved = saved.merge(memory_saved(predicted, levels, resamples=0)
                        [["baseline", "tier", "policy", "mode", "share", "memory_saved", "saved_mb"]]
                        .rename(columns={"memory_saved": "predicted_memory_saved", "saved_mb": "predicted_saved_mb"}),
                        on=["baseline", "tier", "policy", "mode", "share"], how="left")
    extra = {"profile": vars(profile), "load_seconds_per_expert": load_s, "requests": sc.requests,
             "new_tokens": sc.new_tokens, "repeats": sc.repeats, "warmup_tokens": sc.warmup_tokens,
             "throttled_gbps": bandwidth.get("throttled"), "setup_tokens_per_s": setup_speed,
             "paper_io_ratio": paper_io_ratio(cfg.cache.bits_per_param), "threads": torch.get_num_threads(),
             "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
             "measured_seconds": time.perf_counter() - started}
    save_table(measured, out / "measurements", cfg, **extra)
    save_table(summary, out / "measurements_summary", cfg, **extra)
    save_table(prediction, out / "prediction", cfg, **extra)
    save_table(saved, out / "memory_saved", cfg, **extra)
    save_table(saved_summary, out / "memory_saved_summary", cfg, **extra)
    return {"measured": measured, "summary": summary, "prediction": prediction, "saved": saved,
            "saved_summary": saved_summary, "profile": profile, "load_s": load_s, "info": info}


def _cuda_copy_gbps(device, size_mb: float, repeats: int = 5) -> float:
    """Bytes per second a device-to-device copy of `size_mb` MB moves on `device` (median of `repeats`)."""
    n = int(size_mb * 1e6)
    source, target = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    torch.cuda.synchronize(device)
    return costmodel.median_rate(lambda: (target.copy_(source), torch.cuda.synchronize(device)), n, repeats)


# --- summaries over repeats ----------------------------------------------------------------------------------

def summarize_repeats(measured: pd.DataFrame, keys=SETTING, timed=TIMED) -> pd.DataFrame:
    """One row per setting (`keys`): `repeats`, each `timed` column's median with its interquartile range
    (`<column>_q25`, `<column>_q75`), the median of every other numeric column (hit rates and counts are the
    same in every repeat: the routing is deterministic) and `identical` only if every repeat was."""
    keys = [k for k in keys if k in measured]
    timed = [c for c in timed if c in measured]
    skip = set(keys) | {"repeat", "order", "setting"}
    numeric = [c for c in measured.select_dtypes("number").columns if c not in skip]
    groups = measured.groupby(keys, sort=False, dropna=False)
    medians = groups[numeric].median()
    columns = {"repeats": groups.size()}
    for column in timed:
        columns[column] = medians.pop(column)
        columns[f"{column}_q25"] = groups[column].quantile(0.25)
        columns[f"{column}_q75"] = groups[column].quantile(0.75)
    if "identical" in measured:
        columns["identical"] = groups.identical.all()
    return pd.concat([pd.DataFrame(columns), medians], axis=1).reset_index()


def _frontier_memory(memory: np.ndarray, speed: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """`costmodel.memory_at_equal_throughput`'s interpolation on arrays (fast enough to bootstrap): the least
    memory reaching each tokens/s level along the curve's frontier; NaN outside its measured range."""
    order = np.lexsort((-speed, memory))
    memory, speed = memory[order], speed[order]
    best = np.maximum.accumulate(speed)
    frontier = np.r_[True, best[1:] > best[:-1]]
    memory, speed = memory[frontier], speed[frontier]
    return np.where((levels >= speed[0]) & (levels <= speed[-1]), np.interp(levels, speed, memory), np.nan)


def _curves(measured: pd.DataFrame, shares, baseline: str, candidate: str, run: str, value: str, by) -> list[dict]:
    """Per group (`by`) where both models ran: the shares both ran at, each one's memory there, the positions of
    the level `shares`, and a (repeat x (baseline's shares + candidate's shares)) matrix of `value`."""
    engine = measured[measured.tier != "in_memory"]
    engine = engine if "repeat" in engine else engine.assign(repeat=0)
    repeats = sorted(engine.repeat.unique())
    curves = []
    for key, group in engine.groupby(list(by), sort=False, dropna=False):
        pair = group[group[run].isin([baseline, candidate])]
        if pair[run].nunique() < 2:
            continue
        wide = pair.pivot_table(index="repeat", columns=[run, "share"], values=value, aggfunc="first").reindex(repeats)
        common = sorted(set(wide[baseline].columns) & set(wide[candidate].columns))
        levels = [i for i, share in enumerate(common) if np.isclose(share, shares).any()]
        if not levels:
            continue
        memory = pair.groupby([run, "share"]).memory_gb.first()
        samples = np.hstack([wide[baseline][common].to_numpy(float), wide[candidate][common].to_numpy(float)])
        curves.append({"key": key if isinstance(key, tuple) else (key,), "shares": np.array(common),
                       "levels": np.array(levels), "memory": (memory[baseline][common].to_numpy(float),
                                                               memory[candidate][common].to_numpy(float)),
                       "samples": samples, "repeats": int(np.isfinite(samples).sum(axis=0).min())})
    return curves


def _saved(samples: np.ndarray, curve: dict) -> dict:
    """Memory saved at the curve's levels from the medians of `samples` (its matrix or a resample of it)."""
    medians = np.nanmedian(samples, axis=0) if np.isnan(samples).any() else np.median(samples, axis=0)
    n = len(curve["shares"])
    base, cand = medians[:n], medians[n:]
    levels = base[curve["levels"]]
    memory_a = _frontier_memory(curve["memory"][0], base, levels)
    memory_b = _frontier_memory(curve["memory"][1], cand, levels)
    return {"tokens_per_s": levels, "memory_baseline_gb": memory_a, "memory_cfmoe_gb": memory_b,
            "memory_saved": 1 - memory_b / memory_a}


def memory_saved(measured: pd.DataFrame, shares, baselines=(BASELINE, BESIDE), candidate: str = CANDIDATE,
                 run: str = "run", value: str = "decode_tokens_per_s", by=("tier", "policy", "mode"),
                 resamples: int = stats.BOOTSTRAP_SAMPLES, seed: int = 0) -> pd.DataFrame:
    """Memory the candidate needs at the tokens/s each baseline reaches with `shares` of its experts cached (per
    `by` group), from the medians over repeats, with a 95% percentile bootstrap interval over the repeats
    (`stats.bootstrap_interval`, the repeats resampled; `resamples=0`: none). `saved_mb` is the same saving in
    megabytes, next to both models' memory at the level; `repeats`, the fewest repeats of any setting on the curve
    (a grid cut short has fewer for some)."""
    rows = []
    for baseline in baselines:
        for curve in _curves(measured, shares, baseline, candidate, run, value, by):
            point = _saved(curve["samples"], curve)
            for j, share in enumerate(curve["shares"][curve["levels"]]):
                row = {"baseline": baseline, **dict(zip(by, curve["key"])), "share": share,
                       **{name: values[j] for name, values in point.items()}}
                row["saved_mb"] = 1e3 * (row["memory_baseline_gb"] - row["memory_cfmoe_gb"])
                low = high = float("nan")
                if resamples and np.isfinite(row["memory_saved"]):
                    with warnings.catch_warnings():  # resamples where a level is out of reach give NaN
                        warnings.simplefilter("ignore", RuntimeWarning)
                        _, low, high = stats.bootstrap_interval(
                            curve["samples"], lambda x: _saved(x, curve)["memory_saved"][j], n=resamples, seed=seed)
                rows.append({**row, "memory_saved_low": low, "memory_saved_high": high, "repeats": curve["repeats"]})
    return pd.DataFrame(rows, columns=["baseline", *by, "share", "tokens_per_s", "memory_baseline_gb",
                                       "memory_cfmoe_gb", "memory_saved", "saved_mb", "memory_saved_low",
                                       "memory_saved_high", "repeats"])


def memory_saved_summary(measured: pd.DataFrame, shares, baselines=(BASELINE, BESIDE), candidate: str = CANDIDATE,
                         run: str = "run", value: str = "decode_tokens_per_s", by=("tier", "policy", "mode"),
                         resamples: int = stats.BOOTSTRAP_SAMPLES, seed: int = 0) -> pd.DataFrame:
    """Per baseline, over all tiers (`tier` "all") and per tier: the mean memory saved over the levels both
    curves reach, with a 95% percentile bootstrap interval over repeats (all groups resampled together), and the
    mean memory of each model at those levels (MB)."""
    rows = []
    for baseline in baselines:
        curves = _curves(measured, shares, baseline, candidate, run, value, by)
        tiers = list(dict.fromkeys(c["key"][0] for c in curves))
        for scope in ["all", *tiers] if len(tiers) > 1 else tiers:
            chosen = [c for c in curves if scope == "all" or c["key"][0] == scope]
            edges = np.cumsum([0] + [c["samples"].shape[1] for c in chosen])
            samples = np.hstack([c["samples"] for c in chosen])

            def levels(x, name="memory_saved"):
                return np.concatenate([_saved(x[:, a:b], c)[name] for c, a, b in zip(chosen, edges, edges[1:])])

            saved = levels(samples)
            base, cand = levels(samples, "memory_baseline_gb"), levels(samples, "memory_cfmoe_gb")
            reached = np.isfinite(saved)
            mean, low, high = (np.nanmean(saved) if reached.any() else float("nan")), float("nan"), float("nan")
            if resamples and reached.any():
                with warnings.catch_warnings():  # resamples where no level is in reach give NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    _, low, high = stats.bootstrap_interval(samples, lambda x: np.nanmean(levels(x)), n=resamples,
                                                            seed=seed)
            rows.append({"baseline": baseline, "tier": scope, "levels": len(saved), "reached": int(reached.sum()),
                         "memory_saved": mean, "memory_saved_low": low, "memory_saved_high": high,
                         "memory_baseline_mb": 1e3 * base[reached].mean() if reached.any() else float("nan"),
                         "memory_cfmoe_mb": 1e3 * cand[reached].mean() if reached.any() else float("nan"),
                         "saved_mb": 1e3 * (base[reached] - cand[reached]).mean() if reached.any() else float("nan"),
                         "repeats": min(c["repeats"] for c in chosen)})
    return pd.DataFrame(rows)


def median_iqr(summary: pd.DataFrame, column: str, digits: int = 1) -> pd.Series:
    """A summarized column (`summarize_repeats`) as 'median (q25–q75)' strings, for displayed tables."""
    return pd.Series([f"{m:.{digits}f} ({a:.{digits}f}–{b:.{digits}f})" for m, a, b in
                      zip(summary[column], summary[f"{column}_q25"], summary[f"{column}_q75"])], index=summary.index)


def describe_grid(measured: pd.DataFrame) -> str:
    """The grid a measurements table holds, in words: models, per tier its shares and (policy, mode) settings,
    the settings, repeats and timed runs."""
    engine = measured[measured.tier != "in_memory"]
    parts = []
    for tier, rows in engine.groupby("tier", sort=False):
        modes = ", ".join(f"{p.upper()} {m}" for p, m in dict.fromkeys(zip(rows.policy, rows["mode"])))
        parts.append(f"{tier_label(tier)}: shares {', '.join(f'{s:g}' for s in sorted(rows.share.unique()))} x {modes}")
    settings = measured.groupby(SETTING, dropna=False).size()
    return (f"{measured.run.nunique()} models ({', '.join(dict.fromkeys(measured.run))}) x [in memory; "
            + "; ".join(parts) + f"] = {len(settings)} settings, each timed {settings.min()}"
            + (f" to {settings.max()}" if settings.max() != settings.min() else "")
            + f" times: {len(measured)} timed runs in one random order")


# --- analyses --------------------------------------------------------------------------------------------------

def predict(measured: pd.DataFrame, sizes: costmodel.ModelSizes, profile: costmodel.DeviceProfile,
            load_s: dict) -> pd.DataFrame:
    """The cost models' decode tokens/s at each engine setting's measured hit rate (prefetch runs left out: their
    background reads are in neither model); `measured` is one row per setting (`summarize_repeats`: medians).

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


def mode_ratios(measured: pd.DataFrame) -> pd.DataFrame:
    """Median decode tokens/s (over repeats) of each disaggregated mode over unified's, LRU, on the tier(s) where
    every mode ran; rows (run, tier, share)."""
    lru = measured[(measured.tier != "in_memory") & (measured.policy == "lru")]
    lru = lru[lru.tier.isin(lru[lru["mode"] == "disaggregated_warm"].tier.unique())]
    by = lru.pivot_table(index=["run", "tier", "share"], columns="mode", values="decode_tokens_per_s", aggfunc="median")
    modes = ("disaggregated", "disaggregated_warm")
    if not {"unified", *modes} <= set(by.columns):
        return pd.DataFrame(columns=list(modes), index=pd.MultiIndex.from_tuples([], names=["run", "tier", "share"]))
    return pd.DataFrame({mode: by[mode] / by.unified for mode in modes})


def prefetch_speedups(measured: pd.DataFrame) -> pd.Series:
    """Median decode tokens/s (over repeats) with next-layer prefetch over plain disaggregated (LRU), per (run,
    tier, share) it ran at."""
    lru = measured[(measured.tier != "in_memory") & (measured.policy == "lru")]
    by = lru.pivot_table(index=["run", "tier", "share"], columns="mode", values="decode_tokens_per_s", aggfunc="median")
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
                     "right": used / guessed, "used": int(used), "prefetched": int(guessed),
                     "extra_decode_bytes": fetched.decode_bytes_read.sum()[tier] / plain[tier] - 1,
                     "extra_decode_mb": (fetched.decode_bytes_read.sum()[tier] - plain[tier]) / 1e6,
                     "verdict": claims.pays(r.median())})
    return pd.DataFrame(rows)


def prediction_errors(prediction: pd.DataFrame, tier: str | None = None) -> pd.DataFrame:
    """Each cost model's error against the measurement (the setting's median) over the settings not used for
    calibration (on `tier`, or all): median, median |error| and the share within `claims.COST_MODEL_ERROR`."""
    tested = prediction[~prediction.calibration.astype(bool) & ((prediction.tier == tier) if tier else True)]
    rows = [{"model": column.removesuffix("_error"), "settings": len(tested), "median_error": tested[column].median(),
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
              "max_position_embeddings": 8192, "norm_topk_prob": False, **shrink}  # room for 4,096-token prompts
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
    return trace, _prompt_ids(1, prompt, seed + request), n_new


def _batch_inputs(stream: routing.RoutingTrace, request: int, batch: int, prompt: int, new_tokens: int, seed: int):
    """(replayable trace of `batch` concurrent requests with `prompt`-token prompts, their random prompt ids,
    tokens to generate): request `request`'s batch takes the stream's next stretch (`routing.concurrent_requests`)."""
    trace = routing.concurrent_requests(stream, request * batch * (prompt + new_tokens), batch, prompt, new_tokens)
    return trace, _prompt_ids(batch, prompt, seed + request), new_tokens


def _prompt_ids(rows: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(10, 1000, (rows, length), generator=torch.Generator().manual_seed(seed))


def _capacity(share: float, top_k: int, n_routed: int) -> int:
    """The engine's cache slots for a share of the routed experts (at least one token's top-k)."""
    return int(max(top_k, round(share * n_routed)))


@torch.no_grad()
def paper_scale_measure(streams: dict, settings: list[dict], repeats: int = 5, new_tokens: int = 32,
                        requests: int = 2, warm_tokens: int = 8, seed: int = 0, device: str = "cuda",
                        store_path="artifacts/paper_scale/store.safetensors", dtype_name: str = "bfloat16",
                        budget_s: float = 0.0, on_grid=None, **shrink) -> dict[str, pd.DataFrame]:
    """Resident and offloaded decode tokens/s of the paper-scale model replaying each stream.

    `settings`: dicts with `tier` ("host" or "throttled"), `share`, `policy`, `sources` (stream names) and, for
    the throttled tier, `gbps`; optionally `experts` (the engine's experts implementation over its slot pool,
    default the fastest of the resident baseline's that runs over the pool here, `meta`'s
    `engine_experts_implementation`), `mode` (default disaggregated),
    `prefetch` ("oracle": see `replaying`), `prompt_tokens` with `concurrent`
    (batches of that many requests with prompts of that length, instead of the recorded requests), and `grid`
    (a name: grids run one after another in the order given, on one model, store and engine).
    Each grid's (setting, source, repeat) runs in its own seeded random order; each run
    reconfigures the one engine (an empty cache of `share` of the routed experts), warms it with
    `warm_tokens` tokens of the stream's last request (read through the host tier: untimed), then serves
    `requests` requests of `new_tokens` tokens, the cache carried over. Resident runs come first, per source, the
    same way. With `budget_s`, no engine run starts after that many seconds (the random order keeps what ran of a
    grid balanced); the table says how many ran. `on_grid(name, measurements, setup)` is called as each grid ends
    (a long session keeps what it measured; `setup`: the resident runs, the machine and the sizes, as returned)."""
    started = time.perf_counter()
    device = torch.device(device)
    lm = paper_scale_model(device, getattr(torch, dtype_name), **shrink)
    info = moe.describe(lm)
    n_routed = len(info.layers) * info.n_experts
    sizes = costmodel.from_describe(info)
    kwargs = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    rng = np.random.default_rng(seed)

    @contextlib.contextmanager
    def replaying(trace, setting):
        """The trace replayed; a setting with `prefetch: "oracle"` has the engine prefetch each next layer's
        replayed experts (an oracle, it knows future routing: the random-weight router cannot predict a replayed
        stream, so this bounds what overlapping loads with compute could gain at this size)."""
        with routing.replay_routing(lm, trace) as replay:
            if setting and setting.get("prefetch") == "oracle":
                engine.predictor = lambda layer, hidden: replay.peek(layer, hidden.shape[0])
            yield

    def serve(generate, stream, setting=None):
        """Warm-up, then `requests` requests: the recorded ones, or (a setting with `prompt_tokens`) batches of
        `concurrent` requests with prompts of that length (`routing.concurrent_requests`)."""
        warm, ids, _ = _request_inputs(stream, len(stream.meta["requests"]) - 1, warm_tokens, seed)
        # an emulated tier's warm-up reads through the host tier: it only fills the cache, untimed
        fast = engine.reading_from("host") if setting and setting["tier"] != "host" else contextlib.nullcontext()
        with replaying(warm, setting), fast:
            generate(ids, max_new_tokens=warm_tokens)
        seconds, steps, rows = 0.0, 0, []
        for request in range(requests):
            if setting and setting.get("prompt_tokens"):
                trace, ids, n_new = _batch_inputs(stream, request, setting.get("concurrent", 1),
                                                  setting["prompt_tokens"], new_tokens, seed)
            else:
                trace, ids, n_new = _request_inputs(stream, request, new_tokens, seed)
            with replaying(trace, setting):
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

    def engine_generate(ids, max_new_tokens):
        out, stats = engine.generate(ids.to(device), max_new_tokens=max_new_tokens, **kwargs)
        return stats["decode_s"], stats["new_tokens"] - 1, stats

    # the engine runs the fastest implementation that runs over its slot pool here, tried fastest first on the
    # largest pool the settings ask for (a kernel that serves the resident model may still reject the pool's shapes:
    # grouped_mm takes at most 1,024 groups, fewer than three quarters of this model's experts)
    largest = max((_capacity(s["share"], info.top_k, n_routed) for s in settings), default=info.top_k)
    engine_implementation = None
    for name in sorted(speeds, key=speeds.get, reverse=True):
        try:
            engine.reconfigure(largest, "lru", experts_implementation=name)
            serve(engine_generate, streams[next(iter(streams))])
        except (RuntimeError, ValueError, NotImplementedError) as error:
            print(f"the engine's experts implementation {name} failed here, trying the next: {error}", flush=True)
            continue
        engine_implementation = name
        break
    if engine_implementation is None:
        raise RuntimeError(f"no experts implementation of {sorted(speeds)} runs over the engine's slot pool here")
    print(f"set-up done at {time.perf_counter() - started:.0f} s: resident {implementation} "
          f"({resident_tps.round(1).to_dict()} tokens/s), engine {engine_implementation} up to {largest} slots",
          flush=True)
    setup = {"resident": resident, "sizes": sizes,
             "meta": pd.DataFrame([{"experts_implementation": implementation, "implementation_tokens_per_s": speeds,
                                    "engine_experts_implementation": engine_implementation,
                                    "copy_gbps": copy_gbps, "expert_bytes": engine.expert_bytes,
                                    "routed_experts": n_routed, "resident_bytes": info.resident_bytes,
                                    "layers": len(info.layers), "device": torch.cuda.get_device_name(device)
                                    if device.type == "cuda" else "cpu"}])}
    grids = list(dict.fromkeys(s.get("grid", "") for s in settings))
    by_grid = {grid: [(dict(s), source, r) for s in settings if s.get("grid", "") == grid
                      for source in s["sources"] for r in range(repeats)] for grid in grids}
    total, rows = sum(map(len, by_grid.values())), []
    for grid, runs_ in by_grid.items():
        measured_before = len(rows)
        for index in rng.permutation(len(runs_)):
            if budget_s and time.perf_counter() - started > budget_s:
                break
            setting, source, repeat = runs_[index]
            tier, gbps = setting["tier"], setting.get("gbps")
            capacity = _capacity(setting["share"], info.top_k, n_routed)
            mode, batch = setting.get("mode", "disaggregated"), setting.get("concurrent", 1)
            engine.reconfigure(capacity, setting["policy"], mode=mode, tier=tier, bandwidth_gbps=gbps,
                               prefetch=bool(setting.get("prefetch")),
                               experts_implementation=setting.get("experts", engine_implementation))
            seconds, steps, stats = serve(engine_generate, streams[source], setting)
            frame = pd.DataFrame(stats)
            misses = frame.decode_misses.sum() / (steps * batch)
            load_s = 1 / (copy_gbps * 1e9) if tier == "host" else 1 / (gbps * 1e9)
            floor = 1 / resident_tps[source]  # one request's resident decode step: the limit is for single requests
            prompts = np.mean([p for p, _ in streams[source].meta["requests"][:requests]])
            rows.append({"routing_source": source, "tier": tier, "io_gbps": copy_gbps if tier == "host" else gbps,
                         "share": setting["share"], "capacity": capacity, "policy": setting["policy"],
                         "mode": mode, "prefetch": bool(setting.get("prefetch")),
                         "predictor": setting.get("prefetch") or "", "experts_implementation": engine.experts_implementation,
                         "repeat": repeat,
                         "prompt_tokens": setting.get("prompt_tokens") or prompts, "concurrent": batch,
                         "tokens_per_s": steps * batch / seconds, "ttft_s": frame.ttft_s.mean(),
                         "prefill_misses": frame.prefill_misses.sum() / requests,
                         "resident_tokens_per_s": resident_tps[source],
                         "hit_rate": frame.decode_hits.sum() / (frame.decode_hits.sum() + frame.decode_misses.sum()),
                         "misses_per_token": misses,
                         "limit_tokens_per_s": 1 / (floor + misses * engine.expert_bytes * load_s) if batch == 1
                         else float("nan"),
                         "load_share": frame.decode_load_seconds.sum() / frame.decode_s.sum(),
                         "prefetched_per_token": frame.prefetched.sum() / (steps * batch),
                         "prefetch_used": frame.prefetch_used.sum() / max(frame.prefetched.sum(), 1),
                         "load_gbps": frame.decode_bytes_read.sum() / max(frame.decode_load_seconds.sum(), 1e-12) / 1e9,
                         "expert_mb": engine.expert_bytes / 1e6,
                         "memory_gb": (info.resident_bytes + engine.pool_bytes) / 1e9, "decode_steps": steps,
                         "grid": setting.get("grid", "")})
        if on_grid is not None and len(rows) > measured_before:  # a grid cut short by the budget keeps its runs
            on_grid(grid, _with_ratios(pd.DataFrame(rows[measured_before:])), setup)
        if len(rows) - measured_before < len(runs_):
            print(f"budget of {budget_s:.0f} s reached after {len(rows)} of {total} engine runs", flush=True)
            break
    measured = _with_ratios(pd.DataFrame(rows))
    return {"measurements": measured, **setup}


WARMTH = (8, 64, "all")  # warm-up before the timed request: tokens of the last request, or every other request


def paper_scale_warmth(streams: dict, shares=(0.0625, 0.25, 0.5, 0.75), warm=WARMTH, timed_tokens: int = 31,
                       n_layers: int = 27, policy: str = "lru") -> pd.DataFrame:
    """How cold the paper-scale measurement's cache is, in simulation: the decode misses of the timed request
    (the stream's first: `timed_tokens` decode steps, as `paper_scale_measure` times one request of 32 new tokens)
    through a cache of `share` of the paper model's routed experts, after warming it with the decode steps of
    `warm` tokens of the stream's last request (as the measurement does: `paper_scale_measure`'s `warm_tokens`),
    or of every other request ("all": about steady state). Paper layer l replays stand-in layer `routing.default_layer_map`'s, as the
    replayed model does; prefill stays out of the decode cache (disaggregated)."""
    rows = []
    for source, stream in streams.items():
        sizes = stream.meta["requests"]
        starts = np.cumsum([0] + [p + d for p, d in sizes])
        layer_map = routing.default_layer_map(n_layers, stream.experts.shape[1])

        def decode(request, steps=None):
            begin = starts[request] + sizes[request][0]
            return stream.experts[begin:begin + (sizes[request][1] if steps is None else steps)][:, layer_map]

        timed = decode(0, timed_tokens)
        for tokens in warm:
            warmup = (np.concatenate([decode(r) for r in range(1, len(sizes))]) if tokens == "all"
                      else decode(len(sizes) - 1, tokens - 1))  # generate's first new token comes from prefill
            keys = cache.access_keys(np.concatenate([warmup, timed]), stream.n_experts)
            for share in shares:
                capacity = int(round(share * n_layers * stream.n_experts))
                misses = int((~cache.simulate_cache(keys, policy, capacity).hits_mask[-timed.size:]).sum())
                rows.append({"routing_source": source, "share": share, "policy": policy, "warm": str(tokens),
                             "warm_decode_steps": len(warmup), "timed_decode_steps": len(timed),
                             "misses_per_token": misses / len(timed), "hit_rate": 1 - misses / timed.size})
    return pd.DataFrame(rows)


def _with_ratios(measured: pd.DataFrame) -> pd.DataFrame:
    """`of_limit` and `of_resident`: tokens/s against the physical limit and against the resident model."""
    if measured.empty:  # no engine run started within the budget
        return measured
    return measured.assign(of_limit=measured.tokens_per_s / measured.limit_tokens_per_s,
                           of_resident=measured.tokens_per_s / measured.resident_tokens_per_s)


PAPER_SCALE_KEYS = ["routing_source", "tier", "policy", "experts_implementation", "prefetch", "share"]


def paper_scale_saved(measured: pd.DataFrame, baseline: str = "lora_control", candidate: str = "cfmoe",
                      resamples: int = stats.BOOTSTRAP_SAMPLES, seed: int = 0) -> pd.DataFrame:
    """Memory CFMoE needs at the tokens/s the control reaches at each share (medians over repeats), per tier,
    policy and the engine's experts implementation, with a 95% percentile bootstrap interval over repeats
    (`memory_saved`)."""
    return memory_saved(_engine_kernels(measured), sorted(measured.share.unique()), baselines=(baseline,),
                        candidate=candidate, run="routing_source", value="tokens_per_s",
                        by=("tier", "policy", "experts_implementation", "prefetch"), resamples=resamples, seed=seed)


def _engine_kernels(measured: pd.DataFrame) -> pd.DataFrame:
    """Measurements from before the engine could run other experts implementations ran the eager one, and those
    from before it could prefetch did not prefetch (tables of several grids, concatenated, may lack either)."""
    defaults = {"experts_implementation": "eager", "prefetch": False}
    measured = measured.assign(**{c: v for c, v in defaults.items() if c not in measured})
    return measured.fillna(defaults).astype({"prefetch": bool})


LONG_PROMPT_KEYS = ["routing_source", "tier", "policy", "share", "prompt_tokens", "concurrent", "mode"]


def long_prompt_summary(measured: pd.DataFrame) -> pd.DataFrame:
    """The long-prompt grid per setting: decode tokens/s and TTFT (median, IQR over repeats), decode hit rate, and
    each mode's median decode tokens/s and hit rate against unified prefill's at the same prompt length and
    concurrency (`*_vs_unified`: ratio of medians minus 1, and the hit-rate difference)."""
    summary = summarize_repeats(measured, keys=LONG_PROMPT_KEYS, timed=("tokens_per_s", "ttft_s")).sort_values(
        LONG_PROMPT_KEYS, ignore_index=True)
    unified = summary[summary["mode"] == "unified"].set_index(LONG_PROMPT_KEYS[:-1])
    at = summary.set_index(LONG_PROMPT_KEYS[:-1]).index
    summary["tokens_per_s_vs_unified"] = summary.tokens_per_s.to_numpy() / unified.tokens_per_s.reindex(at).to_numpy() - 1
    summary["hit_rate_vs_unified"] = summary.hit_rate.to_numpy() - unified.hit_rate.reindex(at).to_numpy()
    return summary


def _median_interval(values) -> tuple[float, float, float]:
    """The median over repeats and its 95% percentile-bootstrap interval (nan where nothing was measured)."""
    values = np.asarray(values, dtype=float)
    return stats.bootstrap_interval(values, np.median) if len(values) else (float("nan"),) * 3


def _min_median_interval(groups, resamples: int = stats.BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """The smallest of several settings' medians over repeats, and its 95% percentile-bootstrap interval (each
    setting's repeats resampled on their own, the minimum taken per draw); nan where nothing was measured."""
    groups = [g[np.isfinite(g)] for g in (np.asarray(g, dtype=float) for g in groups)]
    groups = [g for g in groups if len(g)]
    if not groups:
        return (float("nan"),) * 3
    value = float(min(np.median(g) for g in groups))
    if min(len(g) for g in groups) < 2:
        return value, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = np.min([np.median(g[rng.integers(0, len(g), size=(resamples, len(g)))], axis=1) for g in groups], axis=0)
    low, high = np.quantile(draws, [(1 - stats.LEVEL) / 2, (1 + stats.LEVEL) / 2])
    return value, float(low), float(high)


def paper_scale_results(cfg: StudyConfig, folder: str | Path | None = None) -> dict | None:
    """The committed paper-scale measurements (`folder`, default results/05_serving/paper_scale/, from
    scripts/paper_scale.py on a GPU), memory saved with intervals and the goals' verdicts; None when they have not
    been measured."""
    folder = Path(folder) if folder is not None else cfg.results_dir(NOTEBOOK) / PAPER_SCALE
    files = sorted(folder.glob("measurements_*.csv"))
    if not files:
        return None
    measured = _engine_kernels(pd.concat([pd.read_csv(f) for f in files], ignore_index=True))
    machine = pd.concat([pd.read_csv(f) for f in sorted(folder.glob("machine_*.csv"))], ignore_index=True)
    cards = sorted(machine.device.dropna().unique()) if "device" in machine else []
    if len(cards) > 1:  # ratios are compared only where they were measured side by side, on one card
        raise ValueError(f"the grids of {folder} were measured on {cards}; keep one card's grids in a folder "
                         f"(move the others to a folder of their own)")
    # the goals and the headline judge the engine on its default experts implementation (the resident baseline's,
    # or the fastest of them that ran over the pool) where it ran on it (else, tables from before it could, on the
    # implementation most runs used)
    column = "engine_experts_implementation"
    kernel = (machine[column] if column in machine else machine.experts_implementation).dropna().mode().iloc[0]
    if not measured.experts_implementation.eq(kernel).any():
        kernel = measured.experts_implementation.mode().iloc[0]
    medians = summarize_repeats(measured, keys=PAPER_SCALE_KEYS, timed=("tokens_per_s",))
    medians["headline"] = (medians.experts_implementation == kernel) & ~medians.prefetch
    # each goal: a median over repeats with its 95% percentile-bootstrap interval, met only when the interval clears
    own = measured[(measured.experts_implementation == kernel) & ~measured.prefetch]
    half = own[(own.tier == "host") & (own.policy == "lru") & (own.routing_source == "cfmoe")
               & (own.share == claims.PAPER_SCALE_HALF_SHARE)].of_resident
    # of the limit at the worst setting: the smallest of the settings' medians, bootstrapped jointly
    worst = _min_median_interval([group.of_limit for _, group in own.groupby(PAPER_SCALE_KEYS)])
    of_copy = _median_interval(own[own.tier == "host"].load_gbps / machine.copy_gbps.median())
    verdicts = [claims.OF_RESIDENT_AT_HALF.verdict_interval(*_median_interval(half), signed=False),
                claims.OF_LIMIT.verdict_interval(*worst, signed=False),
                claims.OF_COPY_BANDWIDTH.verdict_interval(*of_copy, signed=False)]
    saved = paper_scale_saved(measured)
    saved["headline"] = (saved.experts_implementation == kernel) & ~saved.prefetch
    return {"measured": measured, "medians": medians, "saved": saved, "machine": machine, "verdicts": verdicts,
            "experts_implementation": kernel}


def figures(cfg: StudyConfig, results: dict) -> None:
    """Figures of notebook 05, drawn from the stage's tables."""
    out = cfg.results_dir(NOTEBOOK)
    save_figure(plots.measured_throughput(readable(results["measured"])), out / "measured_throughput", cfg)
    save_figure(plots.predicted_vs_measured(readable(results["prediction"])), out / "predicted_vs_measured", cfg)


compute = runs.one_result_set(NOTEBOOK, _compute, figures)
