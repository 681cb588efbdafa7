"""Notebook 01 (`01_router_design`): how local is routing, and which locality loss and weight win?

    python -m cfmoe.stages router_design --preset cpu
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Callable

import numpy as np
import pandas as pd
import torch

from .. import cache, claims, finetune, locality, metrics, moe, stats, training
from ..config import RouterDesignConfig, StudyConfig
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


def loss_scales(lm, blocks, top_k: int, kinds=locality.LOSS_KINDS, batches: int = 2, batch_size: int = 8,
                seed: int = 0) -> pd.DataFrame:
    """Each locality loss's value and the norm of its gradient on the router weights, at the start of fine-tuning
    (the base model, a few fine-tuning batches), next to the LM loss's: why one weight does not fit every loss."""
    routers = [p for layer in moe.describe(lm).layers for p in layer.router.parameters()]
    device = routers[0].device
    rng = np.random.default_rng(seed)
    sums: dict[str, list[float]] = {}
    for _ in range(batches):
        batch = blocks[rng.choice(len(blocks), min(batch_size, len(blocks)), replace=False).tolist()]
        ids = torch.as_tensor(batch["input_ids"], device=device)
        mask = torch.ones_like(ids)
        out = lm(input_ids=ids, attention_mask=mask, output_router_logits=True)
        layers = [logits for logits in out.router_logits if logits is not None]
        pairs = locality.consecutive_pair_mask(mask, torch.as_tensor(batch["document_ids"], device=device))
        terms = {"lm": training.causal_lm_loss(out.logits, ids, mask)}
        terms |= {kind: locality.LocalityLoss(kind, top_k=top_k if kind == "topk_overlap" else None)(layers, pairs)
                  for kind in kinds}
        for name, value in terms.items():
            grads = torch.autograd.grad(value, routers, retain_graph=True, allow_unused=True)
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)).item()
            sums.setdefault(name, []).extend([value.item(), norm])
    lm_grad = np.mean(sums["lm"][1::2])
    return pd.DataFrame([{"loss": name, "value": np.mean(v[0::2]), "router_grad_norm": np.mean(v[1::2]),
                          "grad_vs_lm_loss": np.mean(v[1::2]) / lm_grad} for name, v in sums.items()])


def run_name(kind: str, weight: float) -> str:
    return "control" if kind == "none" else f"{kind}@{weight:g}"


def grid_weight(start: float, weights_per_decade: int, step: int) -> float:
    """The grid's weight `step` steps above `start` (negative: below), rounded to 4 significant digits so that
    names and comparisons are exact."""
    return float(f"{start * 10 ** (step / weights_per_decade):.4g}")


def run_sweep(design: RouterDesignConfig, train: Callable[[str, float, int], dict], base_seed: int = 0) -> pd.DataFrame:
    """The adaptive sweep, one row per fine-tune: `train(kind, weight, seed)` fine-tunes a fresh copy of the base
    model and returns its `val_ppl`, `val_ecr` (and anything else, e.g. `train_seconds`); kind "none" is the control.

    1. The control with every seed (`design.seeds` + `base_seed`); its seed mean is the reference.
    2. Per kind, `min_weights` log-spaced weights from its start weight, with the first seed; then one more weight at
       a time, above the largest while every weight is within the budget or below the smallest while every weight
       is over it, until a weight within the budget sits next to one over it (`crossing`) or `max_weights` is hit.
    3. The two weights bracketing the crossing run with the other seeds; if the seed means move the crossing,
       the new bracket runs with them too.
    """
    seeds = [base_seed + s for s in design.seeds]
    budget = design.max_ppl_increase
    rows: list[dict] = []

    def run(kind: str, weight: float, seed: int, phase: str) -> None:
        result = train(kind, weight, seed)
        rows.append({"run": run_name(kind, weight), "kind": kind, "weight": weight, "seed": seed, "phase": phase,
                     **result})
        control_ppl = np.mean([r["val_ppl"] for r in rows if r["kind"] == "none"])
        print(f"{rows[-1]['run']:>22} seed {seed}: validation perplexity {result['val_ppl'] / control_ppl - 1:+.2%} "
              f"vs control, ECR {result['val_ecr']:.3f} ({phase})")

    for seed in seeds:
        run("none", 0.0, seed, "control")
    for kind in design.kinds:
        start = getattr(design.start_weights, kind)
        steps = list(range(design.min_weights))
        for step in steps:
            run(kind, grid_weight(start, design.weights_per_decade, step), seeds[0], "grid")
        while len(steps) < design.max_weights:
            means = kind_means(pd.DataFrame(rows), kind)
            if crossing(means, budget) is not None:
                break
            steps.append(min(steps) - 1 if (means.ppl_vs_control > budget).all() else max(steps) + 1)
            run(kind, grid_weight(start, design.weights_per_decade, steps[-1]), seeds[0], "extension")
        while (bracket := crossing(kind_means(pd.DataFrame(rows), kind), budget)) is not None:
            done = {(r["weight"], r["seed"]) for r in rows if r["kind"] == kind}
            missing = [(w, s) for w in bracket for s in seeds if (w, s) not in done]
            if not missing:
                break
            for weight, seed in missing:
                run(kind, weight, seed, "seed")
    return pd.DataFrame(rows)


def relative_to_control(sweep: pd.DataFrame) -> pd.DataFrame:
    """`sweep` with `ppl_vs_control` and `ecr_vs_control`, against the control's mean over its seeds."""
    control = sweep[sweep.run == "control"]
    return sweep.assign(ppl_vs_control=sweep.val_ppl / control.val_ppl.mean() - 1,
                        ecr_vs_control=sweep.val_ecr / control.val_ecr.mean() - 1)


COLUMNS = ["val_ppl", "val_ecr", "ppl_vs_control", "ecr_vs_control"]


def seed_means(sweep: pd.DataFrame) -> pd.DataFrame:
    """One row per run (base, control, kind@weight): `n` seeds, and each of COLUMNS' mean with its Student-t
    interval over the seeds (`<col>_low`, `<col>_high`; NaN for a single seed)."""
    return stats.summarize(relative_to_control(sweep), by=["run", "kind", "weight"], columns=COLUMNS)


def kind_means(sweep: pd.DataFrame, kind: str) -> pd.DataFrame:
    """`seed_means` of one kind's weights, in increasing weight."""
    means = seed_means(sweep)
    return means[means.kind == kind].sort_values("weight").reset_index(drop=True)


def crossing(means: pd.DataFrame, budget: float) -> tuple[float, float] | None:
    """The first two neighbouring weights (of one kind's `kind_means`, in increasing weight) whose mean perplexity
    increase goes from within the budget to over it, or None when no such pair exists."""
    within = (means.ppl_vs_control <= budget).to_numpy()
    for i in range(len(means) - 1):
        if within[i] and not within[i + 1]:
            return float(means.weight.iloc[i]), float(means.weight.iloc[i + 1])
    return None


def match_at_budget(sweep: pd.DataFrame, budget: float, max_weights: int | None = None) -> pd.DataFrame:
    """One row per locality loss kind: where its seed-mean validation perplexity crosses `budget` over the control,
    and its validation ECR there.

    Bracketed kinds are interpolated linearly in log(weight) between the bracketing weights: t = (budget - p_lo) /
    (p_hi - p_lo), weight = exp(log w_lo + t (log w_hi - log w_lo)), ECR = ECR_lo + t (ECR_hi - ECR_lo). The ECR's
    interval is Student-t over the seeds run at both weights, each interpolated at the same t (the crossing's own
    uncertainty is not in it). `status` says "bracketed", "within budget at every weight", "over budget at every
    weight" or "not bracketed"; `cap_hit` whether it ran `max_weights` weights without bracketing; `best_within_*`
    is its highest-ECR weight within the budget (a lower bound on its ECR at the budget when it never crosses)."""
    data = relative_to_control(sweep)
    control = data[data.run == "control"]
    rows = []
    for kind in dict.fromkeys(data.kind[~data.run.isin(["base", "control"])]):
        means = kind_means(sweep, kind)
        within = means[means.ppl_vs_control <= budget]
        best = within.loc[within.val_ecr.idxmax()] if len(within) else None
        bracket = crossing(means, budget)
        row = {"kind": kind, "weights": len(means),
               "status": "bracketed" if bracket else
               "within budget at every weight" if len(within) == len(means) else
               "over budget at every weight" if not len(within) else "not bracketed",
               "cap_hit": bool(max_weights is not None and len(means) >= max_weights and not bracket),
               "best_within_weight": np.nan if best is None else float(best.weight),
               "best_within_val_ecr": np.nan if best is None else float(best.val_ecr),
               "best_within_ppl_vs_control": np.nan if best is None else float(best.ppl_vs_control)}
        if bracket:
            lo, hi = (means[means.weight == w].iloc[0] for w in bracket)
            t = (budget - lo.ppl_vs_control) / (hi.ppl_vs_control - lo.ppl_vs_control)
            weight = float(np.exp(np.log(lo.weight) + t * (np.log(hi.weight) - np.log(lo.weight))))
            per_seed = data[data.kind == kind].pivot_table(index="seed", columns="weight", values="val_ecr")
            both = per_seed[list(bracket)].dropna() if set(bracket) <= set(per_seed.columns) else per_seed.iloc[:0]
            _, low, high = stats.mean_interval(both[bracket[0]] + t * (both[bracket[1]] - both[bracket[0]]))
            ecr = float(lo.val_ecr + t * (hi.val_ecr - lo.val_ecr))  # from the means, also with unequal seed sets
            row |= {"weight_low": lo.weight, "weight_high": hi.weight, "seeds_low": int(lo.n), "seeds_high": int(hi.n),
                    "ppl_vs_control_low": lo.ppl_vs_control, "ppl_vs_control_high": hi.ppl_vs_control,
                    "val_ecr_low": lo.val_ecr, "val_ecr_high": hi.val_ecr, "t": t, "weight_at_budget": weight,
                    "val_ecr_at_budget": ecr, "val_ecr_at_budget_low": low, "val_ecr_at_budget_high": high,
                    "ecr_vs_control_at_budget": ecr / control.val_ecr.mean() - 1}
        rows.append(row)
    columns = ["kind", "weights", "status", "cap_hit", "weight_low", "weight_high", "seeds_low", "seeds_high",
               "ppl_vs_control_low", "ppl_vs_control_high", "val_ecr_low", "val_ecr_high", "t", "weight_at_budget",
               "val_ecr_at_budget", "val_ecr_at_budget_low", "val_ecr_at_budget_high", "ecr_vs_control_at_budget",
               "best_within_weight", "best_within_val_ecr", "best_within_ppl_vs_control"]
    return pd.DataFrame(rows).reindex(columns=columns)


def choose_locality_loss(sweep: pd.DataFrame, max_ppl_increase: float, max_weights: int | None = None) -> dict:
    """The locality loss and weight with the highest validation ECR at the perplexity budget, from seed means.

    A kind whose perplexity crosses the budget competes with its ECR interpolated at the crossing
    (`match_at_budget`), at the interpolated weight; a kind that never crosses it, with its best within-budget ECR
    (a lower bound on its ECR at the budget, which it did not reach). When no kind crosses, this is the old rule,
    the highest ECR within the budget; when every run is over budget, the run with the smallest perplexity
    increase, and `within_budget` is False.
    """
    matched = match_at_budget(sweep, max_ppl_increase, max_weights)
    means = seed_means(sweep)
    control = means[means.run == "control"].iloc[0]
    candidates = [(r.val_ecr_at_budget, r.kind, "interpolated") for r in matched.itertuples() if r.status == "bracketed"]
    candidates += [(r.best_within_val_ecr, r.kind, "within") for r in matched.itertuples()
                   if r.status != "bracketed" and pd.notna(r.best_within_val_ecr)]
    choice = {"selected_on": "validation", "max_ppl_increase": max_ppl_increase,
              "bracketed": bool((matched.status == "bracketed").any()),
              "control": {"val_ppl": float(control.val_ppl), "val_ecr": float(control.val_ecr), "seeds": int(control.n)}}
    if candidates:
        _, kind, how = max(candidates)
        r = matched.set_index("kind").loc[kind]
        if how == "interpolated":
            weight, ecr = float(f"{r.weight_at_budget:.4g}"), float(r.val_ecr_at_budget)
            return {**choice, "kind": kind, "weight": weight, "interpolated": True, "within_budget": True,
                    "run": f"{kind}@{weight:g} (interpolated between {r.weight_low:g} and {r.weight_high:g})",
                    "method": "highest validation ECR at the perplexity budget, interpolated in log(weight)",
                    "val_ecr": ecr, "val_ecr_low": _float(r.val_ecr_at_budget_low),
                    "val_ecr_high": _float(r.val_ecr_at_budget_high), "ecr_vs_control": float(r.ecr_vs_control_at_budget),
                    "ppl_vs_control": max_ppl_increase,
                    "bracket": {"weight_low": float(r.weight_low), "weight_high": float(r.weight_high),
                                "ppl_vs_control_low": float(r.ppl_vs_control_low),
                                "ppl_vs_control_high": float(r.ppl_vs_control_high), "val_ecr_low": float(r.val_ecr_low),
                                "val_ecr_high": float(r.val_ecr_high), "seeds_low": int(r.seeds_low),
                                "seeds_high": int(r.seeds_high), "t": float(r.t)}}
        best = means[(means.kind == kind) & (means.weight == r.best_within_weight)].iloc[0]
        method = ("highest validation ECR within the budget: this kind never crossed it within its grid"
                  if choice["bracketed"] else "no kind crossed the budget: highest validation ECR within it (old rule)")
    else:
        runs = means[~means.run.isin(["base", "control"])]
        best = runs.loc[runs.ppl_vs_control.idxmin()]
        method = "every run is over the budget: the smallest validation perplexity increase"
    return {**choice, "kind": best.kind, "weight": float(best.weight), "interpolated": False,
            "within_budget": bool(best.ppl_vs_control <= max_ppl_increase), "run": best.run, "method": method,
            "val_ecr": float(best.val_ecr), "val_ecr_low": _float(best.val_ecr_low),
            "val_ecr_high": _float(best.val_ecr_high), "ecr_vs_control": float(best.ecr_vs_control),
            "ppl_vs_control": float(best.ppl_vs_control), "seeds": int(best.n)}


def _float(value) -> float | None:
    """A JSON-safe float: None for NaN."""
    return None if pd.isna(value) else float(value)


def _compute(cfg: StudyConfig, force: bool = False) -> dict:
    """The base model's routing locality (test split, descriptive), then the adaptive sweep of locality losses x
    weights on validation text (`run_sweep`) and the choice at matched validation perplexity."""
    make_deterministic(cfg.seed, cfg.threads)
    out = cfg.results_dir(NOTEBOOK)
    ft, design = cfg.finetune, cfg.router_design
    lm, tokenizer = runs.load_base(cfg)
    info = moe.describe(lm)
    k_over_e = info.top_k / info.n_experts

    # (a) descriptive: the final base model's locality on the test split; it chooses nothing
    base = runs.base_test_evaluation(cfg, lm, tokenizer, ft.block_size, force)
    per_layer = pd.DataFrame({"moe_layer": np.arange(len(info.layers)), "ecr": base["per_layer_ecr"],
                              "iid_ecr": k_over_e,
                              "max_load_ratio": metrics.max_load_ratio(base["experts"], info.n_experts)})
    ceiling = routing_ceiling(base["experts"], info.n_experts)
    save_table(per_layer, out / "base_routing_per_layer", cfg)
    save_table(ceiling["lru"], out / "base_lru_vs_iid", cfg)
    save_table(ceiling["reuse"], out / "base_reuse_distance", cfg)

    # (b) the sweep: fine-tuning text to train, validation text to score; the test split is not read below
    blocks = finetune.finetune_blocks(tokenizer, ft.block_size)
    scales = loss_scales(lm, blocks, info.top_k, seed=cfg.seed)
    save_table(scales, out / "loss_scales", cfg)

    def validation(name: str, model) -> dict:
        ev = runs.test_evaluation(cfg, NOTEBOOK, name, model, tokenizer, ft.block_size, design.eval_tokens, force,
                                  split="validation")
        return {"val_ppl": ev["test_ppl"], "val_ecr": ev["test_ecr"], "val_tokens": ev["tokens"]}

    short = dataclasses.replace(ft, steps=design.steps)

    def train(kind: str, weight: float, seed: int) -> dict:
        tuned = finetune.finetune(copy.deepcopy(lm), blocks, short, kind="js" if kind == "none" else kind,
                                  weight=weight, top_k=info.top_k, seed=seed, device=cfg.device)
        return {**validation(f"{run_name(kind, weight)}-seed{seed}", tuned.model), "train_seconds": tuned.train_seconds}

    base_row = {"run": "base", "kind": "none", "weight": 0.0, "seed": pd.NA, "phase": "base",
                **validation("base", lm), "train_seconds": 0.0}
    sweep = pd.concat([pd.DataFrame([base_row]), run_sweep(design, train, cfg.seed)], ignore_index=True)
    sweep["seed"] = sweep.seed.astype("Int64")
    budget = design.max_ppl_increase
    choice = choose_locality_loss(sweep, budget, design.max_weights)
    matched = match_at_budget(sweep, budget, design.max_weights)
    sweep = relative_to_control(sweep)
    bracket = {(r.kind, w) for r in matched.itertuples() if r.status == "bracketed" for w in (r.weight_low, r.weight_high)}
    sweep["bracket"] = [(k, w) in bracket for k, w in zip(sweep.kind, sweep.weight)]
    chosen = ({(choice["kind"], w) for w in (choice["bracket"]["weight_low"], choice["bracket"]["weight_high"])}
              if choice["interpolated"] else {(choice["kind"], choice["weight"])})
    sweep["chosen"] = [(k, w) in chosen for k, w in zip(sweep.kind, sweep.weight)]
    means = seed_means(sweep)
    tables = {"eval_tokens": design.eval_tokens, "steps": design.steps, "split": "validation"}
    save_table(sweep, out / "pareto", cfg, **tables)
    save_table(means, out / "pareto_means", cfg, **tables)
    save_table(matched, out / "matched", cfg, max_ppl_increase=budget, **tables)
    choice["matched"] = [{k: _float(v) if isinstance(v, float) else v for k, v in row.items()}
                         for row in matched.to_dict("records")]
    choice["runs"] = len(sweep) - 1
    write_json_atomic(out / "choice.json", {**choice, **sidecar(cfg)})
    return {"per_layer": per_layer, "lru": ceiling["lru"], "reuse": ceiling["reuse"], "sweep": sweep, "means": means,
            "matched": matched, "scales": scales, "choice": choice, "info": info}


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
    save_figure(plots.routing_ceiling(results["per_layer"], results["lru"], results["reuse"],
                                      runs.real_routing("lru_vs_iid")), out / "base_locality", cfg,
                measured=claims.REAL_ROUTING_DIR)
    save_figure(plots.pareto(results["means"], results["choice"], info.top_k / info.n_experts), out / "pareto", cfg)


compute = runs.one_result_set(NOTEBOOK, _compute, figures)
