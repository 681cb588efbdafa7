"""Notebook 05's paper-scale section, on a GPU: a model of DeepSeek-MoE-16B's size (random weights) replaying the
study's routing, resident and through the offloading engine; writes results/05_serving/paper_scale/.

    python scripts/paper_scale.py export                 # here: the study's streams -> artifacts/cpu/paper_scale/
    python scripts/real_routing.py DIR... --source S --export artifacts/cpu/paper_scale/deepseek_v2_lite.npz
                                                         # here: real routing as a stream (grid `real`)
    python scripts/paper_scale.py measure --grid host    # on the GPU (carry artifacts/cpu/paper_scale)
    python scripts/paper_scale.py summarize              # here: measurements.csv, memory_saved.csv, the figure
    python scripts/paper_scale.py warmth                 # here: how cold the measurement's cache is (simulation)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cfmoe import claims, routing  # noqa: E402
from cfmoe.cli import user_errors  # noqa: E402
from cfmoe.config import load_config  # noqa: E402
from cfmoe.provenance import save_table  # noqa: E402
from cfmoe.stages import serving  # noqa: E402

STREAMS = ROOT / "artifacts" / "cpu" / "paper_scale"
REAL_STREAM = "deepseek_v2_lite"  # scripts/real_routing.py --export artifacts/cpu/paper_scale/deepseek_v2_lite.npz
EMULATED = claims.EDGE_DEVICES["cpu"][1]  # the authors' flash, GB/s: an emulated (sleep-throttled) tier
# Planned for one measuring process of at most two 10-minute device calls (one set-up, ~100 s; ~10 s an engine run
# on an H100 at 32 decode tokens): the grids run in the order given on the command line, most important first.
GRIDS = {
    # the paper's claim: the control's and CFMoE's tokens/s by share (memory saved at equal tokens/s), LRU (40 runs)
    "host": [{"tier": "host", "share": s, "policy": "lru", "sources": ("lora_control", "cfmoe")}
             for s in (0.0625, 0.25, 0.5, 0.75)],
    # base's routing and the other policies (LFU, and LFU with aging, the peers issue's best) at a quarter cached
    "host_policies": [{"tier": "host", "share": 0.25, "policy": "lru", "sources": ("base",)}]
                     + [{"tier": "host", "share": 0.25, "policy": p, "sources": ("lora_control", "cfmoe")}
                        for p in ("lfu", "lfu_aging")],
    # the engine's eager experts loop (its kernel before grouped kernels ran over the slot pool), side by side
    "host_eager": [{"tier": "host", "share": s, "policy": "lru", "experts": "eager",
                    "sources": ("lora_control", "cfmoe")} for s in (0.25, 0.5)],
    # prefetch of each next layer's experts on a side stream, by an oracle predictor (labelled: it knows future
    # routing), beside the host grid: can a layer's compute hide a load at this size?
    "prefetch_oracle": [{"tier": "host", "share": s, "policy": "lru", "prefetch": "oracle",
                         "sources": ("lora_control", "cfmoe")} for s in (0.25, 0.5)],
    # real routing: DeepSeek-V2-Lite-Chat's released prompts (`scripts/real_routing.py --export`, as local as real
    # models, unlike the stand-in), by share, LRU: the first measurement, repeated on this engine (20 runs)
    "real": [{"tier": "host", "share": s, "policy": "lru", "sources": (REAL_STREAM,)} for s in (0.0625, 0.25, 0.5, 0.75)],
    "emulated": [{"tier": "throttled", "gbps": EMULATED, "share": s, "policy": "lru", "sources": ("lora_control", "cfmoe")}
                 for s in (0.25, 0.5)],
    # long prompts beside decode (issue: where does disaggregated prefill pay?): CFMoE's routing, 25% cached, LRU,
    # one request at a time (the engine's limit is for single requests)
    "long_prompts": [{"tier": "host", "share": 0.25, "policy": "lru", "mode": mode, "prompt_tokens": prompt,
                      "concurrent": 1, "sources": ("cfmoe",)}
                     for mode in ("unified", "disaggregated") for prompt in (64, 1024, 4096)],
}
SEPARATE = {"long_prompts"}  # grids kept out of measurements.csv (their own question): long_prompts_<table>.csv


@user_errors("scripts/paper_scale.py")
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["export", "measure", "summarize", "warmth"])
    parser.add_argument("--grid", choices=list(GRIDS), nargs="+", default=["host"],
                        help="grids measured one after another on one set-up, in this order")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=1)
    parser.add_argument("--warm-tokens", type=int, default=64,
                        help="tokens of the stream's last request served before each timed run; 64 comes near the "
                             "steady state of `warmth` (the committed H200 tables used 8: a nearly cold cache)")
    parser.add_argument("--out", help="default: results/05_serving/paper_scale/ (under $CFMOE_RESULTS if set)")
    parser.add_argument("--store", default="/tmp/cfmoe_paper_scale.safetensors")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same structure (CPU tests)")
    parser.add_argument("--budget-s", type=float, default=0.0, help="start no engine run after this many seconds")
    parser.add_argument("--shares", type=float, nargs="+", help="only these shares of each grid (default: all)")
    args = parser.parse_args(argv)
    cfg = load_config("cpu")
    args.out = args.out or str(cfg.results_dir(serving.NOTEBOOK) / serving.PAPER_SCALE)
    if args.action == "export":
        print(serving.export_streams(cfg, STREAMS))
        return
    if args.action == "summarize":
        summarize(cfg, Path(args.out))
        return
    if args.action == "warmth":
        warmth(cfg, Path(args.out), args.new_tokens - 1)
        return
    settings = [{**setting, "grid": grid} for grid in args.grid for setting in GRIDS[grid]
                if not args.shares or setting["share"] in args.shares]
    if args.warm_tokens < 1:
        raise ValueError(f"--warm-tokens {args.warm_tokens} is not valid; use 1 or more")
    if not settings:
        raise ValueError(f"--shares {args.shares} selects no setting of {args.grid}; their shares: "
                         f"{sorted({s['share'] for g in args.grid for s in GRIDS[g]})}")
    streams = _streams()
    missing = sorted({s for setting in settings for s in setting["sources"]} - set(streams))
    if missing:
        raise ValueError(f"--grid {' '.join(args.grid)} replays {missing}, not in {STREAMS}: export them first "
                         f"(`paper_scale.py export`; {REAL_STREAM}: `scripts/real_routing.py ... --export`)")
    shrink = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
              "vocab_size": 1024} if args.tiny else {}
    started = time.perf_counter()
    folder = Path(args.out)
    common = {"repeats": args.repeats, "new_tokens": args.new_tokens, "requests": args.requests, "grids": args.grid,
              "warm_tokens": args.warm_tokens, "warm_up_reads": "host tier (untimed: only fills the cache)",
              "shares": args.shares or "all",
              "layer_map": "trace MoE layer floor(l * L / 27) for paper MoE layer l, L the stream's MoE layers: 6 for "
                           "the stand-in's, 26 for DeepSeek-V2-Lite's (routing.default_layer_map)"}

    def write(grid: str, measured, setup: dict) -> None:
        """One grid's tables as soon as it ends, with the set-up's (resident tokens/s, machine) beside them."""
        name = (lambda table: f"{grid}_{table}") if grid in SEPARATE else (lambda table: f"{table}_{grid}")
        extra = {**common, "grid": grid, "seconds": round(time.perf_counter() - started, 1),
                 "sizes": vars(setup["sizes"])}
        save_table(measured.drop(columns="grid"), folder / name("measurements"), cfg, **extra)
        save_table(setup["resident"], folder / name("resident"), cfg, **extra)
        save_table(setup["meta"], folder / name("machine"), cfg, **extra)
        print(f"{grid}: {len(measured)} runs at {extra['seconds']} s", measured.groupby(serving.LONG_PROMPT_KEYS)[
            ["tokens_per_s", "hit_rate", "ttft_s"]].median().to_string(), flush=True)

    serving.paper_scale_measure(streams, settings, repeats=args.repeats, new_tokens=args.new_tokens,
                                requests=args.requests, warm_tokens=args.warm_tokens, device=args.device,
                                store_path=args.store,
                                dtype_name="float32" if args.tiny else "bfloat16", budget_s=args.budget_s,
                                on_grid=write, **shrink)


def _streams() -> dict:
    """The exported streams (`export`), by run name."""
    streams = {path.stem: routing.read_trace(path) for path in sorted(STREAMS.glob("*.npz"))}
    if not streams:
        raise ValueError(f"no streams in {STREAMS}: run `python scripts/paper_scale.py export` first")
    return streams


def warmth(cfg, folder: Path, timed_tokens: int) -> None:
    """The timed request's decode misses after each warm-up (`serving.paper_scale_warmth`, a simulation on the
    exported streams), beside the engine's measured misses where the committed host grid has the same point."""
    import json

    import pandas as pd

    streams = _streams()
    table = serving.paper_scale_warmth(streams, timed_tokens=timed_tokens)
    measured = folder / "measurements_host.csv"
    if measured.is_file():
        host = pd.read_csv(measured)
        host = host[(host.policy == "lru") & ~host.prefetch.astype(bool)]
        engine = host.groupby(["routing_source", "share"]).misses_per_token.median().rename("engine_misses_per_token")
        table = table.join(engine, on=["routing_source", "share"])
        # the engine's warm-up, from its sidecar (tables from before --warm-tokens warmed 8)
        warmed = json.loads(measured.with_suffix(".json").read_text()).get("warm_tokens", 8)
        table.loc[table.warm != str(warmed), "engine_misses_per_token"] = float("nan")
    save_table(table, folder / "warmth", cfg, timed_tokens=timed_tokens, streams=sorted(streams),
               note="simulation (LRU) of the timed request after each warm-up; engine_misses_per_token: the committed "
                    "host grid's median, measured after its own warm-up (the row with that many tokens)")
    print(table.to_string(index=False))


def summarize(cfg, folder: Path) -> None:
    """Every measured grid of `folder` as one measurements.csv, memory saved (CFMoE vs the control, bootstrap over
    repeats) and the figure, all from the committed per-grid tables."""
    from cfmoe.present import plots
    from cfmoe.provenance import save_figure

    long_prompts = folder / "long_prompts_measurements.csv"
    if long_prompts.is_file():  # its own question: where disaggregated prefill pays
        import pandas as pd

        save_table(serving.long_prompt_summary(pd.read_csv(long_prompts)), folder / "long_prompts_summary", cfg,
                   note="medians and IQR over repeats; *_vs_unified: against unified prefill, same prompt and batch")
    results = serving.paper_scale_results(cfg, folder)
    if results is None:
        raise ValueError(f"no measurements_*.csv in {folder}: run `python scripts/paper_scale.py measure` on a GPU")
    grids = sorted(p.stem.removeprefix("measurements_") for p in folder.glob("measurements_*.csv"))
    extra = {"grids": grids, "verdicts": results["verdicts"]}
    save_table(results["measured"], folder / "measurements", cfg, **extra)
    save_table(results["saved"], folder / "memory_saved", cfg, **extra)
    save_table(results["medians"], folder / "tokens_per_s_summary", cfg, **extra)
    resident = float(results["measured"].resident_tokens_per_s.median())
    save_figure(plots.paper_scale(results["medians"], resident), folder / "tokens_per_s", cfg, **extra)
    print("\n".join(results["verdicts"]))


if __name__ == "__main__":
    main()
