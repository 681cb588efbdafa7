"""The study's stages: each computes its results, writes them under results/, and is what a notebook calls.

    python -m cfmoe.study base_model --preset gpu        # the stage behind notebook 00, without Jupyter
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

import numpy as np
import pandas as pd

from . import cache, daft, evaluate, finetune, metrics, model, moe
from .config import StudyConfig, load_config
from .determinism import make_deterministic
from .provenance import save_figure, save_table, sidecar, write_json_atomic

BASE_MODEL = "00_base_model"


def load_base(cfg: StudyConfig, force: bool = False):
    """The model under study: `cfg.model_path` when given, else the project's pre-trained default."""
    if cfg.model_path:
        return model.load_model(cfg.model_path, device=cfg.device)
    return model.build_or_load(cfg, force=force)


def model_dir(cfg: StudyConfig):
    return cfg.model_path or str(model.base_model_dir(cfg))


def base_model_stage(cfg: StudyConfig, force: bool = False) -> dict[str, pd.DataFrame]:
    """Notebook 00: build or load the base model; its size, test perplexity and expert load."""
    make_deterministic(cfg.seed, cfg.threads)
    out = cfg.results_dir(BASE_MODEL)
    lm, tokenizer = load_base(cfg, force=force)
    info = moe.describe(lm)
    build = model.build_info(model_dir(cfg))

    started = time.perf_counter()
    test = evaluate.test_locality(lm, tokenizer, cfg.pretrain.block_size, cfg.eval.max_test_tokens, cfg.eval.batch_size)
    eval_seconds = time.perf_counter() - started

    load = metrics.expert_load(test["experts"], info.n_experts)
    ratio = load.max(axis=1) / (info.top_k / info.n_experts)
    n_params = sum(p.numel() for p in lm.parameters())
    summary = pd.DataFrame([{
        "preset": cfg.preset, "model": cfg.model_path or f"cfmoe default (artifacts/{cfg.preset}/base_model)", "architecture": info.architecture,
        "parameters": n_params, "moe_layers": len(info.layers), "n_experts": info.n_experts, "top_k": info.top_k,
        "k_over_E": info.top_k / info.n_experts, "routed_expert_share": info.routed_share,
        "expert_mb": info.layers[0].expert_bytes / 1e6, "resident_mb": info.resident_bytes / 1e6,
        "test_perplexity": test["test_ppl"], "test_tokens": test["tokens"], "test_ecr": test["test_ecr"],
        "max_expert_load_ratio": float(ratio.max()),
        "train_steps": build.get("steps"), "train_seconds": build.get("train_seconds"),
        "train_tokens_per_second": build.get("train_tokens_per_second"),
        "epochs": (build["steps"] * cfg.pretrain.batch_size * cfg.pretrain.block_size / build["train_tokens_per_epoch"]
                   if build else None),
        "best_heldout_loss": build.get("best_heldout_loss"),
    }])
    per_layer = pd.DataFrame({
        "moe_layer": np.arange(len(ratio)), "max_load_ratio": ratio,
        "min_load_ratio": load.min(axis=1) / (info.top_k / info.n_experts),
        "load_cv": load.std(axis=1) / load.mean(axis=1),
    })
    loads = pd.DataFrame(load, columns=[f"e{i}" for i in range(info.n_experts)]).assign(moe_layer=range(len(load)))
    log = pd.DataFrame(model.training_log(model_dir(cfg)))
    extra = {"eval_seconds": round(eval_seconds, 1)}
    save_table(summary, out / "base_model", cfg, **extra)
    save_table(per_layer, out / "expert_load_per_layer", cfg)
    save_table(loads, out / "expert_load", cfg)
    if not log.empty:
        save_table(log, out / "training_log", cfg)
    return {"summary": summary, "per_layer": per_layer, "load": load, "training_log": log, "info": info}


def base_model_figures(cfg: StudyConfig, results: dict) -> None:
    """Figures of notebook 00, drawn from the stage's tables."""
    from . import plots

    out = cfg.results_dir(BASE_MODEL)
    if not results["training_log"].empty:
        save_figure(plots.training_curve(results["training_log"], results["info"].top_k), out / "training_curve", cfg)
    save_figure(plots.expert_load(results["load"], results["info"].top_k), out / "expert_load", cfg)


ROUTER_DESIGN = "01_router_design"


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


def router_design_stage(cfg: StudyConfig, force: bool = False) -> dict:
    """Notebook 01: the base model's routing locality, then a sweep of locality losses x weights (Pareto)."""
    make_deterministic(cfg.seed, cfg.threads)
    out = cfg.results_dir(ROUTER_DESIGN)
    ft, design = cfg.finetune, cfg.router_design
    lm, tokenizer = load_base(cfg)
    info = moe.describe(lm)
    k_over_e = info.top_k / info.n_experts

    base = evaluate.test_locality(lm, tokenizer, ft.block_size, cfg.eval.max_test_tokens, cfg.eval.batch_size)
    per_layer = pd.DataFrame({"moe_layer": np.arange(len(info.layers)), "ecr": base["per_layer_ecr"],
                              "iid_ecr": k_over_e,
                              "max_load_ratio": metrics.max_load_ratio(base["experts"], info.n_experts)})
    ceiling = routing_ceiling(base["experts"], info.n_experts)
    save_table(per_layer, out / "base_routing_per_layer", cfg)
    save_table(ceiling["lru"], out / "base_lru_vs_iid", cfg)
    save_table(ceiling["reuse"], out / "base_reuse_distance", cfg)

    blocks = finetune.finetune_blocks(tokenizer, ft.block_size)
    base_eval = evaluate.test_locality(lm, tokenizer, ft.block_size, ft.eval_tokens, cfg.eval.batch_size)
    rows = [{"run": "base", "kind": "none", "weight": 0.0, "test_ppl": base_eval["test_ppl"],
             "test_ecr": base_eval["test_ecr"], "train_seconds": 0.0}]
    runs = [("control", "none", 0.0)] + [(f"{k}@{w:g}", k, w) for k in design.kinds for w in design.weights]
    short = dataclasses.replace(ft, steps=design.steps)
    for name, kind, weight in runs:
        tuned = finetune.finetune(copy.deepcopy(lm), blocks, short, kind="js" if kind == "none" else kind,
                                  weight=weight, top_k=info.top_k, seed=cfg.seed, device=cfg.device)
        ev = evaluate.test_locality(tuned.model, tokenizer, ft.block_size, ft.eval_tokens, cfg.eval.batch_size)
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
    path = cfg.results_dir(ROUTER_DESIGN) / "choice.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {"kind": cfg.finetune.locality_kind, "weight": cfg.finetune.locality_weight, "run": "preset default"}


def router_design_figures(cfg: StudyConfig, results: dict) -> None:
    """Figures of notebook 01, drawn from the stage's tables."""
    from . import plots

    out = cfg.results_dir(ROUTER_DESIGN)
    info = results["info"]
    save_figure(plots.routing_ceiling(results["per_layer"], results["lru"], results["reuse"]), out / "base_locality", cfg)
    save_figure(plots.pareto(results["sweep"], info.top_k / info.n_experts), out / "pareto", cfg)


FINE_TUNING = "02_fine_tuning"
FINETUNE_RUNS = ("base", "lora_control", "cfmoe", "cfmoe_daft")


def finetuned_dir(cfg: StudyConfig, run: str):
    """Where notebook 02 saves a run's adapter (`adapter/`) and merged model (`merged/`)."""
    return cfg.artifacts_dir / "finetune" / run


def save_finetuned(cfg: StudyConfig, run: str, tuned, tokenizer):
    """Save a run's LoRA adapter and its merged model (what notebooks 03 and 04 load); return the merged model."""
    out = finetuned_dir(cfg, run)
    tuned.save_pretrained(out / "adapter")
    merged = tuned.merge_and_unload() if hasattr(tuned, "merge_and_unload") else tuned
    merged.save_pretrained(out / "merged")
    tokenizer.save_pretrained(out / "merged")
    return merged


def fine_tuning_stage(cfg: StudyConfig, force: bool = False) -> dict:
    """Notebook 02: base, LoRA control, CFMoE (all layers) and CFMoE+DAFT with the same steps, seed and data."""
    make_deterministic(cfg.seed, cfg.threads)
    out = cfg.results_dir(FINE_TUNING)
    ft = cfg.finetune
    lm, tokenizer = load_base(cfg)
    info = moe.describe(lm)
    choice = load_choice(cfg)
    blocks = finetune.finetune_blocks(tokenizer, ft.block_size)

    # DAFT's offline profile: per-layer ECR on a calibration sample of the fine-tuning data
    calibration = blocks[: max(1, len(blocks) // 4)]
    profile = daft.profile_layer_ecr(lm, calibration["input_ids"].numpy(), calibration["document_ids"].numpy())
    by_threshold = daft.select_daft_layers(profile, threshold=ft.daft_threshold)
    selection = "threshold"
    daft_layers = by_threshold
    if len(by_threshold) in (0, len(profile)):  # a small model's layers may all sit below 0.7
        daft_layers, selection = daft.select_daft_layers(profile, quantile=ft.daft_quantile), "quantile"
    profile["selected"] = profile.layer.isin(daft_layers)
    save_table(profile, out / "ecr_profile", cfg, threshold=ft.daft_threshold, quantile=ft.daft_quantile,
               selection=selection)

    all_layers = list(range(len(info.layers)))
    # run -> (locality kind, weight, MoE layers fine-tuned); the control uses no locality loss
    plans = {"lora_control": ("none", 0.0, all_layers), "cfmoe": (choice["kind"], choice["weight"], all_layers),
             "cfmoe_daft": (choice["kind"], choice["weight"], daft_layers)}
    rows, per_layer, logs = [{"run": "base", "locality_kind": "none", "locality_weight": 0.0, "layers_tuned": "",
                              "trainable_params": 0, "train_seconds": 0.0, "peak_memory_mb": float("nan")}], [], []
    models = {"base": lm}
    for run, (kind, weight, layers) in plans.items():
        train = finetune.finetune(copy.deepcopy(lm), blocks, ft, kind="js" if kind == "none" else kind,
                                  weight=weight, top_k=info.top_k, seed=cfg.seed, device=cfg.device, layers=layers)
        models[run] = save_finetuned(cfg, run, train.model, tokenizer)
        logs += [{**row, "run": run} for row in train.log if "lm_loss" in row]
        rows.append({"run": run, "locality_kind": kind, "locality_weight": weight,
                     "layers_tuned": ",".join(map(str, layers)), "trainable_params": train.trainable_params,
                     "train_seconds": train.train_seconds, "peak_memory_mb": train.peak_memory_mb})
    for row in rows:
        ev = evaluate.test_locality(models[row["run"]], tokenizer, ft.block_size, cfg.eval.max_test_tokens,
                                    cfg.eval.batch_size)
        row.update(test_ppl=ev["test_ppl"], test_ecr=ev["test_ecr"])
        per_layer += [{"run": row["run"], "moe_layer": i, "ecr": e} for i, e in enumerate(ev["per_layer_ecr"])]
    runs = pd.DataFrame(rows)
    control = runs.set_index("run").loc["lora_control"]
    runs["ecr_vs_control"] = runs.test_ecr / control.test_ecr - 1
    runs["ppl_vs_control"] = runs.test_ppl / control.test_ppl - 1
    per_layer = pd.DataFrame(per_layer)
    log = pd.DataFrame(logs)
    extra = {"choice": choice, "daft_layers": daft_layers, "steps": ft.steps}
    save_table(runs, out / "runs", cfg, **extra)
    save_table(per_layer, out / "per_layer_ecr", cfg, **extra)
    save_table(log, out / "training_log", cfg, **extra)
    return {"runs": runs, "per_layer": per_layer, "log": log, "profile": profile, "daft_layers": daft_layers,
            "choice": choice, "info": info}


def load_runs(cfg: StudyConfig) -> tuple[dict, object]:
    """The base model and notebook 02's merged fine-tuned models, by run name, plus the tokenizer."""
    lm, tokenizer = load_base(cfg)
    models = {"base": lm}
    for run in FINETUNE_RUNS[1:]:
        path = finetuned_dir(cfg, run) / "merged"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is missing: run notebook 02 (fine-tuning) for preset "
                                    f"{cfg.preset!r} first")
        models[run] = model.load_model(path, device=cfg.device)[0]
    return models, tokenizer


def fine_tuning_figures(cfg: StudyConfig, results: dict) -> None:
    """Figures of notebook 02, drawn from the stage's tables."""
    from . import plots

    out = cfg.results_dir(FINE_TUNING)
    info = results["info"]
    save_figure(plots.per_layer_ecr(results["per_layer"], info.top_k / info.n_experts), out / "per_layer_ecr", cfg)
    save_figure(plots.finetune_curves(results["log"]), out / "training_curves", cfg)


def stages() -> dict:
    """Stage name -> (compute, draw), in chain order."""
    from . import cache_study, ecr_study, serving_study

    return {"base_model": (base_model_stage, base_model_figures),
            "router_design": (router_design_stage, router_design_figures),
            "fine_tuning": (fine_tuning_stage, fine_tuning_figures),
            "cache_management": (cache_study.cache_management_stage, cache_study.cache_management_figures),
            "ecr_wikitext": (ecr_study.ecr_wikitext_stage, ecr_study.ecr_wikitext_figures),
            "serving": (serving_study.serving_stage, serving_study.serving_figures)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=list(stages()))
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--model-path", default="")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    cfg = load_config(args.preset, model_path=args.model_path or None, seed=args.seed)
    compute, draw = stages()[args.stage]
    results = compute(cfg, force=args.force)
    draw(cfg, results)
    print(f"stage {args.stage} ({cfg.preset}) written to results/")


if __name__ == "__main__":
    main()
