"""Do the headline claims survive a second run of the chain? Two results folders (e.g. the committed `results/` and
a fresh clone's after its own `./run_all.sh`), each claim's mean and 95% interval side by side.

    python scripts/compare_runs.py /path/to/fresh/results --label "fresh clone, same machine type"

Writes `results/chain/second_run.{csv,md}` (+ sidecar; `results/chain/<preset>/` for another preset). A claim's
row says whether each run's mean lies inside the other's interval. A table whose sidecar names the same commit on both sides is the same
run (a notebook the second chain did not reach): its rows are marked `same run` and not compared.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cfmoe import stats  # noqa: E402
from cfmoe.config import load_config, results_root, results_subdir  # noqa: E402
from cfmoe.provenance import save_table  # noqa: E402
from cfmoe.stages import cache_management, ecr_wikitext, fine_tuning  # noqa: E402

SHARE, POLICY = 0.25, "lru"  # notebook 06's headline point


def _read(root: Path, notebook: str, name: str, preset: str) -> tuple[pd.DataFrame | None, str]:
    """A table and the identity of the run that wrote it (the commit its sidecar names)."""
    path = root / results_subdir(notebook, preset) / f"{name}.csv"
    if not path.is_file():
        return None, ""
    side = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").is_file() else {}
    return pd.read_csv(path), side.get("commit", "?")


def claims(root: Path, preset: str = "cpu") -> dict[str, tuple[tuple[float, float, float], str]]:
    """(mean, low, high) of each headline quantity, with the identity of the run that measured it."""
    out = {}
    runs, run_id = _read(root, "02_fine_tuning", "runs", preset)
    if runs is not None:
        h = fine_tuning.headline(runs)
        for key in ("ecr_gain", "delta_ecr", "ppl_cost", "daft_ppl_cost"):
            out[f"02 teacher-forced {key}"] = (h[key], run_id)
    summary, gen_id = _read(root, "04_ecr_wikitext", "summary", preset)
    if summary is not None:
        g = ecr_wikitext.headline(summary)
        for key in ("ecr_gain", "delta_ecr"):
            out[f"04 generated {key}"] = (g[key], gen_id)
    saved, sim_id = _read(root, "03_cache_management", "memory_at_equal_throughput", preset)
    requests, _ = _read(root, "03_cache_management", "requests", preset)
    if saved is not None and requests is not None:
        out["03 simulated memory saved, LRU vs LRU"] = (cache_management.memory_headline(saved, requests)["headline"], sim_id)
    engine, engine_id = _read(root, "05_serving", "memory_saved_summary", preset)
    if engine is not None:
        row = engine[(engine.baseline == "lora_control") & (engine.tier == "all")]
        if len(row) and row.iloc[0].reached:
            r = row.iloc[0]
            out["05 measured memory saved vs control"] = ((r.memory_saved, r.memory_saved_low, r.memory_saved_high),
                                                          engine_id)
    beyond, beyond_id = _read(root, "06_beyond_cfmoe", "methods_summary", preset)
    if beyond is not None:
        at = beyond[(beyond.cache_share == SHARE) & (beyond.policy == POLICY)].set_index("method")
        for method in ("cfmoe+cache_prior", "cfmoe_light+cache_prior", "cache_prior", "remoe", "cfmoe"):
            if method not in at.index:  # a method added after the older run
                continue
            row = at.loc[method]
            for col in ("misses_vs_control", "ppl_vs_control"):
                out[f"06 {method} {col}"] = ((row[col], row[f"{col}_low"], row[f"{col}_high"]), beyond_id)
    return out


def compare(first: Path, second: Path, preset: str = "cpu") -> pd.DataFrame:
    a, b = claims(first, preset), claims(second, preset)
    rows = []
    for key in a.keys() & b.keys():
        (ma, la, ha), ida = a[key]
        (mb, lb, hb), idb = b[key]
        same = ida == idb
        rows.append({"claim": key, "first_mean": ma, "first_low": la, "first_high": ha,
                     "second_mean": mb, "second_low": lb, "second_high": hb,
                     "status": "same run" if same else "compared",
                     "second_mean_in_first_interval": None if same else bool(la <= mb <= ha),
                     "first_mean_in_second_interval": None if same else bool(lb <= ma <= hb),
                     "first_run": ida, "second_run": idb})
    return pd.DataFrame(rows).sort_values("claim", ignore_index=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("second", help="the second run's results folder")
    parser.add_argument("--first", default=None, help="the first run's results folder (default: results/)")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--label", default="", help="what the second run was (machine, clone)")
    args = parser.parse_args(argv)
    first = Path(args.first) if args.first else results_root()
    table = compare(first, Path(args.second), args.preset)
    save_table(table, results_root() / results_subdir("chain", args.preset) / "second_run", load_config(args.preset),
               label=args.label, first=str(first), second=str(args.second),
               note="mean [95% interval] of each headline quantity in two runs of the chain")
    shown = table.assign(first=[stats.format_interval((r.first_mean, r.first_low, r.first_high), "+.4f")
                                for r in table.itertuples()],
                         second=[stats.format_interval((r.second_mean, r.second_low, r.second_high), "+.4f")
                                 for r in table.itertuples()])
    print(shown[["claim", "first", "second", "status", "second_mean_in_first_interval",
                 "first_mean_in_second_interval"]].to_string(index=False))


if __name__ == "__main__":
    main()
