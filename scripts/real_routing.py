"""Real routing the stand-in is held against, measured with the study's own reader and metrics: per-layer locality
(ECR over consecutive tokens of one request) and balance of released DeepSeek-V2-Lite-Chat routing.

    # the MoE-Beyond project's routing CSVs (github.com/ngavhane/moe-beyond: training_data_eamc/ and
    # expert_activation_scripts/training_data_eamc/, one prompt_<n>_data.csv per chat prompt), read as given:
    python scripts/real_routing.py DIR [DIR ...] --source "github:ngavhane/moe-beyond@4dca2ea"
    #   -> results/00_base_model/real_routing/ (`claims.REAL_ROUTING_DIR`): per_layer.csv, summary.csv,
    #      lru_vs_iid.csv (a per-layer LRU cache's hit rate by capacity, as notebook 01 measures the base model's)
    #      and policies.csv (eviction policies on one global cache at notebook 06's shares)
    python scripts/real_routing.py DIR ... --source ... --export artifacts/cpu/paper_scale/deepseek_v2_lite.npz
    #   also a replayable stream for the paper-scale model (scripts/paper_scale.py, grid `real`)

Nothing is downloaded: the CSVs are read from where they lie. Notebook 00 draws the stand-in's per-layer profile
beside the committed one, notebook 01 its LRU curve beside real routing's, and the tests hold `claims.REAL_ROUTING`
(the figures the study quotes) to the summary.
The released routing holds prompt tokens only, so the exported stream replays each prompt as one request whose
first token is its prompt and whose other tokens are decode steps: token-to-token routing, as in decoding.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cfmoe import claims, metrics, routing  # noqa: E402
from cfmoe.cli import user_errors  # noqa: E402
from cfmoe.config import load_config  # noqa: E402
from cfmoe.provenance import save_table  # noqa: E402
from cfmoe import cache  # noqa: E402
from cfmoe.stages import beyond_cfmoe, router_design  # noqa: E402

POLICIES = ("lru", "lfu", "lfu_aging", "layer_lru", "opt")  # opt: Belady's oracle (knows future routing), a bound


def within_requests(lengths) -> np.ndarray:
    """(n_tokens-1,) True for consecutive pairs inside one request, False across a request boundary."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1 or len(lengths) == 0 or (lengths < 1).any():
        raise ValueError(f"request lengths must be one or more positive token counts, got {lengths.tolist()}")
    request = np.repeat(np.arange(len(lengths)), lengths)  # each token's request, as document ids mark articles
    return request[1:] == request[:-1]


def profile(trace: routing.RoutingTrace, lengths) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per MoE layer: ECR, ECR over k/E and the busiest expert over the uniform share; and the summary (pooled
    ECR, its ratio, first, peak and last layer, busiest expert in the median and the worst layer)."""
    valid = within_requests(lengths)
    if len(valid) != trace.n_tokens - 1:
        raise ValueError(f"request lengths sum to {len(valid) + 1} tokens, the trace has {trace.n_tokens}")
    k_over_e = trace.top_k / trace.n_experts
    ecr = metrics.expert_consistency_rate(trace.experts, per_layer=True, valid_pairs=valid)
    busiest = metrics.max_load_ratio(trace.experts, trace.n_experts)
    per_layer = pd.DataFrame({"moe_layer": np.arange(trace.n_layers), "ecr": ecr, "ecr_over_k_e": ecr / k_over_e,
                              "max_load_ratio": busiest})
    summary = pd.DataFrame([{
        "requests": len(lengths), "tokens": trace.n_tokens, "pairs": int(valid.sum()), "moe_layers": trace.n_layers,
        "n_experts": trace.n_experts, "top_k": trace.top_k, "k_over_E": k_over_e,
        "ecr": float(ecr.mean()), "ecr_over_k_e": float(ecr.mean()) / k_over_e,
        "first_layer_ecr": float(ecr[0]), "peak_layer_ecr": float(ecr.max()), "peak_layer": int(ecr.argmax()),
        "last_layer_ecr": float(ecr[-1]), "median_layer_max_load_ratio": float(np.median(busiest)),
        "worst_layer_max_load_ratio": float(busiest.max()),
    }])
    return per_layer, summary


def policies(trace: routing.RoutingTrace) -> pd.DataFrame:
    """Misses per token and hit rate of each eviction policy (`POLICIES`) on one global cache of notebook 06's shares
    of all layers' experts (its capacity rule, and its half-life for LFU with aging), the prompts served in order as one
    stream, the cache carried across them."""
    keys = cache.access_keys(trace.experts, trace.n_experts)
    rows = []
    for share in beyond_cfmoe.SHARES:
        size = beyond_cfmoe.capacity(share, trace.n_layers, trace.n_experts)
        for policy in POLICIES:
            result = cache.simulate_cache(keys, policy, size, n_experts=trace.n_experts,
                                          halflife=cache.aging_halflife(trace.n_layers, trace.top_k))
            rows.append({"cache_share": share, "capacity": size, "policy": policy,
                         "oracle": policy in ("opt", "lopt"), "misses_per_token": result.misses / trace.n_tokens,
                         "hit_rate": result.hit_rate})
    table = pd.DataFrame(rows)
    lru = table[table.policy == "lru"].set_index("cache_share").misses_per_token
    return table.assign(misses_vs_lru=table.misses_per_token / table.cache_share.map(lru) - 1)


def requests_of(trace: routing.RoutingTrace) -> list[int]:
    """Each request's token count: a directory's prompts, an exported stream's [prompt, decode] pairs, or the
    whole trace as one request (a single CSV, a recorded `.npz` without requests)."""
    requests = trace.meta.get("requests") or [trace.n_tokens]
    return [int(sum(r)) if isinstance(r, (list, tuple)) else int(r) for r in requests]


def read(folders: list[str]) -> tuple[routing.RoutingTrace, list[int]]:
    """The sources' requests as one trace (source by source, each in its own order) and each request's length. A
    source is anything `routing.read_trace` reads: a directory of prompt CSVs, one CSV, or a `.npz` trace (so a
    model's own recorded routing can be set beside released routing the same way)."""
    traces = [routing.read_trace(folder) for folder in folders]
    n_experts = max(t.n_experts for t in traces)
    if len({(t.n_layers, t.top_k) for t in traces}) != 1:
        raise ValueError(f"{folders}: the sources differ in MoE layers or top-k: "
                         f"{[(t.n_layers, t.top_k) for t in traces]}")
    trace = routing.RoutingTrace(np.concatenate([t.experts for t in traces]), None,
                                 np.concatenate([t.phase for t in traces]),
                                 np.concatenate([t.token_ids for t in traces]), n_experts,
                                 {"source": [str(f) for f in folders]})
    return trace, [n for t in traces for n in requests_of(t)]


def stream(trace: routing.RoutingTrace, lengths, requests: int, min_tokens: int) -> routing.RoutingTrace:
    """The first `requests` prompts of at least `min_tokens` tokens as one replayable stream: each a request of a
    one-token prompt and decode steps (`meta['requests']`: [1, tokens - 1] each, as `serving.export_streams`)."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    chosen = [(s, n) for s, n in zip(starts, lengths) if n >= min_tokens][:requests]
    if len(chosen) < requests or requests < 1:
        raise ValueError(f"--export-requests {requests}: {len(chosen)} prompts have at least {min_tokens} tokens; "
                         f"use 1 to {len(chosen)}")
    rows = np.concatenate([np.arange(s, s + n) for s, n in chosen])
    out = trace.select(rows)
    out.phase[:] = routing.DECODE
    out.phase[np.concatenate([[0], np.cumsum([n for _, n in chosen])[:-1]])] = routing.PREFILL
    out.meta = {"model": trace.meta.get("model"), "source": trace.meta.get("source"),
                "requests": [[1, int(n) - 1] for _, n in chosen],
                "note": "prompt tokens of released routing, each prompt replayed as a one-token prompt and decode steps"}
    return out


@user_errors("scripts/real_routing.py")
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="routing sources: directories of prompt_<n>_data.csv files, "
                                                   "routing CSVs or .npz traces (routing.read_trace)")
    parser.add_argument("--source", required=True, help="where the files come from, recorded in the sidecars")
    parser.add_argument("--model", default="DeepSeek-V2-Lite-Chat")
    parser.add_argument("--out", help="default: claims.REAL_ROUTING_DIR (in this repository)")
    parser.add_argument("--export", help="also write a replayable .npz stream here (for scripts/paper_scale.py)")
    parser.add_argument("--export-requests", type=int, default=16,
                        help="the stream's requests: the first this many prompts of at least --export-tokens tokens")
    parser.add_argument("--export-tokens", type=int, default=97,
                        help="default 97: one prompt token, 64 warm-up and 32 timed decode steps")
    args = parser.parse_args(argv)
    cfg = load_config("cpu")
    out = Path(args.out) if args.out else ROOT / claims.REAL_ROUTING_DIR
    trace, lengths = read(args.folders)
    trace.meta.update({"model": args.model, "source": args.source})
    per_layer, summary = profile(trace, lengths)
    summary.insert(0, "model", args.model)
    extra = {"source": args.source, "model": args.model,
             "note": "prompt tokens of chat prompts; ECR over consecutive tokens within one prompt"}
    save_table(per_layer, out / "per_layer", cfg, **extra)
    save_table(summary, out / "summary", cfg, **extra)
    # one stream, the cache carried from prompt to prompt, as notebook 01 runs the base model's test blocks
    save_table(router_design.routing_ceiling(trace.experts, trace.n_experts)["lru"], out / "lru_vs_iid", cfg,
               **extra, cache="per-layer LRU over the prompts in order, carried across prompts")
    save_table(policies(trace), out / "policies", cfg, **extra,
               cache="one global cache over the prompts in order, carried across prompts; opt is an oracle "
                     "(knows future routing)")
    if args.export:
        print(f"stream: {stream(trace, lengths, args.export_requests, args.export_tokens).save(args.export)}")
    print(summary.T.to_string(header=False))


if __name__ == "__main__":
    main()
