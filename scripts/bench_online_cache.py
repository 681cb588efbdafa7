"""Time notebook 06's online cache (`cache_prior.OnlineCache`, compiled, rows in parallel) against its slow numpy
reference (`ReferenceCache`, which the tests also hold it to), on synthetic routing with locality.

    python scripts/bench_online_cache.py            # writes results/benchmarks/online_cache_speed.{csv,md,json}

Geometries: the cpu preset's model (6 MoE layers) with 256 requests, where the reference runs too, and the gpu
preset's (12 MoE layers) with 4,096 requests, notebook 06's largest batch (`beyond_cfmoe.MAX_BATCH_ROWS`). Each
request decodes 64 tokens (`beyond.decode_window`) with its own cold cache of a quarter of the experts, LRU. Every
setting runs once to compile and warm up, then `--repeats` times in one seeded random order; the table gives the
median and interquartile range, and the reference's hit counts must equal the compiled cache's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cfmoe import cache  # noqa: E402
from cfmoe.cache_prior import OnlineCache  # noqa: E402
from cfmoe.provenance import save_table  # noqa: E402

N_EXPERTS, TOP_K, TOKENS, SHARE, KEEP = 64, 6, 64, 0.25, 0.4
GEOMETRIES = {"cpu": (6, 256), "gpu": (12, 4096)}  # MoE layers, requests


class ReferenceCache:
    """The slow reference of `OnlineCache` (plain numpy, one slot at a time over all rows): every key of the whole
    pool with the position of its last use (-1: not cached) and its score; a miss in a full pool evicts the held
    key of lowest score, ties least recently used."""

    def __init__(self, like: OnlineCache):
        self.like, self.clock = like, 0
        self.last = np.full((like.rows, like.n_layers * like.n_experts), -1, np.int64)
        self.score = np.zeros(self.last.shape)
        self.hits, self.misses = np.zeros(like.rows, np.int64), np.zeros(like.rows, np.int64)

    def cached(self, layer: int) -> np.ndarray:
        e = self.like.n_experts
        return self.last[:, layer * e:(layer + 1) * e] >= 0

    def access(self, layer: int, experts: np.ndarray) -> None:
        like, rows = self.like, np.arange(self.like.rows)
        lo, hi = ((layer * like.n_experts, (layer + 1) * like.n_experts) if like.scope == "per_layer"
                  else (0, self.last.shape[1]))
        for slot in range(experts.shape[1]):
            keys = layer * like.n_experts + experts[:, slot].astype(np.int64)
            hit = self.last[rows, keys] >= 0
            self.hits += hit
            self.misses += ~hit
            for row in np.flatnonzero(~hit):
                held = self.last[row, lo:hi] >= 0
                if held.sum() >= like.capacity[row]:
                    score = np.where(held, self.score[row, lo:hi], np.inf)
                    lowest = (score == score.min()) & held
                    self.last[row, lo + np.where(lowest, self.last[row, lo:hi], np.iinfo(np.int64).max).argmin()] = -1
            old = self.score[rows, keys]
            if like.policy == "lru":
                new = np.full(like.rows, float(self.clock))
            elif like.policy == "lfu":
                new = np.where(hit, old + 1, 1.0)
            else:
                new = np.array([cache.aged_score(s, self.clock, like.halflife) if h else self.clock / like.halflife
                                for s, h in zip(old, hit)])
            self.score[rows, keys] = new
            self.last[rows, keys] = self.clock
            self.clock += 1


def routing(n_layers: int, rows: int, seed: int) -> np.ndarray:
    """(TOKENS, n_layers, rows, TOP_K): each request keeps each of its previous token's experts at a layer with
    probability KEEP and draws the rest uniformly (distinct within a token)."""
    rng = np.random.default_rng(seed)
    out = np.empty((TOKENS, n_layers, rows, TOP_K), np.int64)
    current = np.argsort(rng.random((n_layers, rows, N_EXPERTS)), axis=-1)[..., :TOP_K]
    for t in range(TOKENS):
        priority = rng.random((n_layers, rows, N_EXPERTS)) + 1
        kept = rng.random(current.shape) < KEEP
        np.put_along_axis(priority, current, np.where(kept, 0.0, np.take_along_axis(priority, current, -1)), -1)
        current = out[t] = np.argpartition(priority, TOP_K, axis=-1)[..., :TOP_K]
    return out


def run(kind: str, experts: np.ndarray):
    n_layers, rows = experts.shape[1], experts.shape[2]
    capacity = int(round(SHARE * n_layers * N_EXPERTS))
    cache_ = OnlineCache(rows, n_layers, N_EXPERTS, capacity, "lru")
    if kind == "reference":
        cache_ = ReferenceCache(cache_)
    started = time.perf_counter()
    for t in range(TOKENS):
        for layer in range(n_layers):
            cache_.access(layer, experts[t, layer])
    return time.perf_counter() - started, cache_


def main(argv=None) -> None:
    import numba

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "online_cache_speed"))
    args = parser.parse_args(argv)
    traces = {name: routing(*geometry, seed=args.seed) for name, geometry in GEOMETRIES.items()}
    most = numba.config.NUMBA_NUM_THREADS
    settings = [("cpu", "reference", 1)] + [(g, "compiled", n) for g in GEOMETRIES for n in sorted({1, most})]
    hits = {}
    for geometry, kind, threads in settings:  # compile and warm up; the reference's hits against the compiled's
        numba.set_num_threads(threads)
        hits[(geometry, kind)] = run(kind, traces[geometry])[1].hits.sum()
    if hits[("cpu", "reference")] != hits[("cpu", "compiled")]:
        raise RuntimeError(f"the reference hit {hits[('cpu', 'reference')]} times, the compiled cache "
                           f"{hits[('cpu', 'compiled')]}")
    order = np.random.default_rng(args.seed).permutation([(i, r) for i in range(len(settings))
                                                         for r in range(args.repeats)])
    rows = []
    for index, repeat in order.tolist():
        geometry, kind, threads = settings[index]
        numba.set_num_threads(threads)
        seconds, cache_ = run(kind, traces[geometry])
        rows.append({"geometry": geometry, "moe_layers": GEOMETRIES[geometry][0], "requests": GEOMETRIES[geometry][1],
                     "implementation": kind, "threads": threads, "repeat": repeat, "seconds": seconds,
                     "hit_rate": cache_.hits.sum() / (cache_.hits.sum() + cache_.misses.sum())})
    measured = pd.DataFrame(rows)
    keys = ["geometry", "moe_layers", "requests", "implementation", "threads"]
    summary = measured.groupby(keys, as_index=False).agg(
        repeats=("seconds", "size"), seconds=("seconds", "median"),
        seconds_q25=("seconds", lambda s: s.quantile(0.25)), seconds_q75=("seconds", lambda s: s.quantile(0.75)),
        hit_rate=("hit_rate", "median"))
    reference = summary[summary.implementation == "reference"].seconds.iloc[0]
    summary["reference_over_this"] = np.where(summary.geometry == "cpu", reference / summary.seconds, np.nan)
    save_table(summary, args.out, None, args.seed, repeats=args.repeats, tokens=TOKENS, share=SHARE, keep=KEEP,
               note="median and interquartile range of repeats, settings interleaved in one seeded random order; "
                    "a shared machine: read the ratios, not the absolute times")
    print(summary.to_string(index=False))


if __name__ == "__main__":
    main()
