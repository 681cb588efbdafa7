"""Notebook 01 (`01_router_design`): how local is routing, and which locality loss and weight win?

    python -m cfmoe.stages router_design --preset cpu
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pandas as pd

from .. import cache, finetune, metrics, moe
from ..config import StudyConfig
from ..determinism import make_deterministic
from ..present import plots
from ..provenance import save_figure, save_table, sidecar, write_json_atomic
from . import runs

NOTEBOOK = "01_router_design"


def routing_ceiling(experts: np.ndarray, n_experts: int) -> dict[str, pd.DataFrame]:
    """The 'theoretical caching ceiling' with data: per-layer ECR, reuse distances and LRU hit rates vs i.i.d."""
    top_k = experts.shape[2]
    capacities = np.arange(top_k, n_experts + 1, max(1, n_experts // 16))
    keys = cache.access_keys(experts, n_experts)
    measured = [cache.simulate_cache(keys, "lru", int(c), scope="per_layer", n_experts=n_experts).hit_rate
                for c in capacities]
    lru = pd.DataFrame({"capacity_per_layer": capacities, "measured_lru_hit_rate": measured,
                        "iid_lru_hit_rate": metrics.iid_lru_hit_curve(top_k, n_experts, capacities)})
    hist = metrics.reuse_distance_histogram(experts, max_distance=64)
    reuses = hist[:, 1:]
    reuse = pd.DataFrame([{"moe_layer": layer, "distance": d + 1, "share_of_reuses": reuses[layer, d] / reuses[layer].sum()}
                          for layer in range(len(hist)) for d in range(reuses.shape[1])])
    return {"lru": lru, "reuse": reuse}


def _compute(cfg: StudyConfig, force: bool = False) -> dict:
    """The base model's routing locality, then a sweep of locality losses x weights (Pareto)."""
    make_deterministic(cfg.seed, cfg.threads)
    out = cfg.results_dir(NOTEBOOK)
    ft, design = cfg.finetune, cfg.router_design
    lm, tokenizer = runs.load_base(cfg)
    info = moe.describe(lm)
    k_over_e = info.top_k / info.n_experts

    base = runs.test_evaluation(cfg, NOTEBOOK, "base", lm, tokenizer, ft.block_size, cfg.eval.max_test_tokens, force)
    per_layer = pd.DataFrame({"moe_layer": np.arange(len(info.layers)), "ecr": base["per_layer_ecr"],
                              "iid_ecr": k_over_e,
                              "max_load_ratio": metrics.max_load_ratio(base["experts"], info.n_experts)})
    ceiling = routing_ceiling(base["experts"], info.n_experts)
    save_table(per_layer, out / "base_routing_per_layer", cfg)
    save_table(ceiling["lru"], out / "base_lru_vs_iid", cfg)
    save_table(ceiling["reuse"], out / "base_reuse_distance", cfg)

    blocks = finetune.finetune_blocks(tokenizer, ft.block_size)
    base_eval = runs.test_evaluation(cfg, NOTEBOOK, "base", lm, tokenizer, ft.block_size, ft.eval_tokens, force)
    rows = [{"run": "base", "kind": "none", "weight": 0.0, "test_ppl": base_eval["test_ppl"],
             "test_ecr": base_eval["test_ecr"], "train_seconds": 0.0}]
    sweep_runs = [("control", "none", 0.0)] + [(f"{k}@{w:g}", k, w) for k in design.kinds for w in design.weights]
    short = dataclasses.replace(ft, steps=design.steps)
    for name, kind, weight in sweep_runs:
        tuned = finetune.finetune(copy.deepcopy(lm), blocks, short, kind="js" if kind == "none" else kind,
                                  weight=weight, top_k=info.top_k, seed=cfg.seed, device=cfg.device)
        ev = runs.test_evaluation(cfg, NOTEBOOK, name, tuned.model, tokenizer, ft.block_size, ft.eval_tokens, force)
        rows.append({"run": name, "kind": kind, "weight": weight, "test_ppl": ev["test_ppl"],
                     "test_ecr": ev["test_ecr"], "train_seconds": tuned.train_seconds})
        del tuned
    sweep = pd.DataFrame(rows)
    control = sweep.set_index("run").loc["control"]
    sweep["ppl_vs_control"] = sweep.test_ppl / control.test_ppl - 1
    sweep["ecr_vs_control"] = sweep.test_ecr / control.test_ecr - 1
    choice = choose_locality_loss(sweep, design.max_ppl_increase)
    sweep["chosen"] = sweep.run == choice["run"]
    save_table(sweep, out / "pareto", cfg, eval_tokens=ft.eval_tokens, steps=ft.steps)
    write_json_atomic(out / "choice.json", {**choice, **sidecar(cfg)})
    return {"per_layer": per_layer, "lru": ceiling["lru"], "reuse": ceiling["reuse"], "sweep": sweep,
            "choice": choice, "info": info}


def choose_locality_loss(sweep: pd.DataFrame, max_ppl_increase: float) -> dict:
    """The highest-ECR locality run within `max_ppl_increase` of the control's perplexity.

    When none qualifies, the run with the smallest perplexity increase is taken, and the choice says so.
    """
    runs = sweep[~sweep.run.isin(["base", "control"])]
    within = runs[runs.ppl_vs_control <= max_ppl_increase]
    best = within.loc[within.test_ecr.idxmax()] if len(within) else runs.loc[runs.ppl_vs_control.idxmin()]
    return {"run": best.run, "kind": best.kind, "weight": float(best.weight), "test_ecr": float(best.test_ecr),
            "ppl_vs_control": float(best.ppl_vs_control), "within_budget": bool(len(within)),
            "max_ppl_increase": max_ppl_increase}


def load_choice(cfg: StudyConfig) -> dict:
    """Notebook 01's chosen locality loss and weight (the preset's defaults when 01 has not run)."""
    path = cfg.results_dir(NOTEBOOK) / "choice.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {"kind": cfg.finetune.locality_kind, "weight": cfg.finetune.locality_weight, "run": "preset default"}


def figures(cfg: StudyConfig, results: dict) -> None:
    """Figures of notebook 01, drawn from the stage's tables."""
    out = cfg.results_dir(NOTEBOOK)
    info = results["info"]
    save_figure(plots.routing_ceiling(results["per_layer"], results["lru"], results["reuse"]), out / "base_locality", cfg)
    save_figure(plots.pareto(results["sweep"], info.top_k / info.n_experts), out / "pareto", cfg)


compute = runs.one_result_set(NOTEBOOK, _compute, figures)
