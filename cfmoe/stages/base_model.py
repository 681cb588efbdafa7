"""Notebook 00 (`00_base_model`): is the default model a fair stand-in (geometry, bytes, balance)?

    python -m cfmoe.stages base_model --preset cpu
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from .. import claims, metrics, model, moe
from ..config import StudyConfig
from ..determinism import make_deterministic
from ..present import plots
from ..provenance import save_figure, save_table
from . import runs

NOTEBOOK = "00_base_model"


def _compute(cfg: StudyConfig, force: bool = False) -> dict[str, pd.DataFrame]:
    """Build or load the base model; its size, test perplexity and expert load."""
    make_deterministic(cfg.seed, cfg.threads)
    out = cfg.results_dir(NOTEBOOK)
    lm, tokenizer = runs.load_base(cfg, force=force)
    info = moe.describe(lm)
    build = model.build_info(runs.model_dir(cfg))

    started = time.perf_counter()
    test = runs.base_test_evaluation(cfg, lm, tokenizer, cfg.pretrain.block_size, force)
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
    log = pd.DataFrame(model.training_log(runs.model_dir(cfg)))
    summary["test_ecr_over_k_e"] = summary.test_ecr / summary.k_over_E
    summary["last_tenth_gain"] = last_tenth_gain(log)
    per_layer = pd.DataFrame({
        "moe_layer": np.arange(len(ratio)), "ecr": test["per_layer_ecr"],
        "ecr_over_k_e": test["per_layer_ecr"] / (info.top_k / info.n_experts), "max_load_ratio": ratio,
        "min_load_ratio": load.min(axis=1) / (info.top_k / info.n_experts),
        "load_cv": load.std(axis=1) / load.mean(axis=1),
    })
    loads = pd.DataFrame(load, columns=[f"e{i}" for i in range(info.n_experts)]).assign(moe_layer=range(len(load)))
    extra = {"eval_seconds": round(eval_seconds, 1)}
    real_profile = runs.real_routing("per_layer")
    real = standin_vs_real(per_layer.ecr.to_numpy(), float(summary.test_ecr.iloc[0]), info.top_k / info.n_experts,
                           real_profile)
    save_table(real, out / "standin_vs_real", cfg, reference=claims.REAL_ROUTING, measured=claims.REAL_ROUTING_DIR)
    save_table(summary, out / "base_model", cfg, **extra)
    save_table(per_layer, out / "expert_load_per_layer", cfg)
    save_table(loads, out / "expert_load", cfg)
    if not log.empty:
        save_table(log, out / "training_log", cfg)
    return {"summary": summary, "per_layer": per_layer, "load": load, "training_log": log, "info": info,
            "standin_vs_real": real, "real_profile": real_profile}


def last_tenth_gain(log: pd.DataFrame) -> float:
    """Relative held-out loss gained over the last tenth of pre-training: from the last evaluation at or before
    90% of the steps to the best at the end (nan without evaluations there)."""
    if log.empty or "eval_loss" not in log:
        return float("nan")
    evals = log.dropna(subset=["eval_loss"])
    steps = log.step.max()
    before = evals[evals.step <= 0.9 * steps]
    if before.empty:
        return float("nan")
    start = before.eval_loss.iloc[-1]
    return float((start - evals.eval_loss.min()) / start)


def standin_vs_real(per_layer_ecr: np.ndarray, pooled_ecr: float, k_over_e: float,
                    profile: pd.DataFrame | None = None) -> pd.DataFrame:
    """Our base model's routing locality beside real DeepSeek-V2-Lite routing (`claims.REAL_ROUTING`): pooled
    ECR / (k/E), and the per-layer profile's first, peak and last layer; with real routing's whole `profile`
    (`runs.real_routing("per_layer")`), where along the depth each peaks too."""
    real = claims.REAL_ROUTING
    real_peak = (float(profile.ecr.to_numpy().argmax()) / max(1, len(profile) - 1) if profile is not None
                 else float("nan"))
    real_k_over_e = real["ecr"] / real["ecr_over_k_over_e"]
    rows = [("pooled ECR / (k/E)", pooled_ecr / k_over_e, real["ecr_over_k_over_e"]),
            ("first MoE layer ECR / (k/E)", per_layer_ecr[0] / k_over_e, real["first_layer_ecr"] / real_k_over_e),
            ("peak layer ECR / (k/E)", per_layer_ecr.max() / k_over_e, real["peak_layer_ecr"] / real_k_over_e),
            ("last MoE layer ECR / (k/E)", per_layer_ecr[-1] / k_over_e, real["last_layer_ecr"] / real_k_over_e),
            ("peak layer's relative depth", float(np.argmax(per_layer_ecr)) / max(1, len(per_layer_ecr) - 1),
             real_peak)]
    return pd.DataFrame(rows, columns=["measure", "ours", real["model"]])


def figures(cfg: StudyConfig, results: dict) -> None:
    """Figures of notebook 00, drawn from the stage's tables."""
    out = cfg.results_dir(NOTEBOOK)
    if not results["training_log"].empty:
        save_figure(plots.training_curve(results["training_log"], results["info"].top_k), out / "training_curve", cfg)
    save_figure(plots.expert_load(results["load"], results["info"].top_k), out / "expert_load", cfg)
    save_figure(plots.standin_profile(results["per_layer"], results["real_profile"]), out / "standin_profile", cfg,
                measured=claims.REAL_ROUTING_DIR)


compute = runs.one_result_set(NOTEBOOK, _compute, figures)
