"""Notebook 02 (`02_fine_tuning`): does CFMoE (and DAFT) raise ECR over a fine-tuning control at equal perplexity?

    python -m cfmoe.stages fine_tuning --preset cpu
"""

from __future__ import annotations

import copy

import pandas as pd

from .. import daft, finetune, moe
from ..config import StudyConfig
from ..determinism import make_deterministic
from ..present import plots
from ..provenance import save_figure, save_table
from . import router_design, runs

NOTEBOOK = "02_fine_tuning"


def _compute(cfg: StudyConfig, force: bool = False) -> dict:
    """Base, LoRA control, CFMoE (all layers) and CFMoE+DAFT with the same steps, seed and data."""
    make_deterministic(cfg.seed, cfg.threads)
    out = cfg.results_dir(NOTEBOOK)
    ft = cfg.finetune
    lm, tokenizer = runs.load_base(cfg)
    info = moe.describe(lm)
    choice = router_design.load_choice(cfg)
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
        models[run] = runs.save_finetuned(cfg, run, train.model, tokenizer)
        logs += [{**row, "run": run} for row in train.log if "lm_loss" in row]
        rows.append({"run": run, "locality_kind": kind, "locality_weight": weight,
                     "layers_tuned": ",".join(map(str, layers)), "trainable_params": train.trainable_params,
                     "train_seconds": train.train_seconds, "peak_memory_mb": train.peak_memory_mb})
    for row in rows:
        ev = runs.test_evaluation(cfg, NOTEBOOK, row["run"], models[row["run"]], tokenizer, ft.block_size,
                                  cfg.eval.max_test_tokens, force)
        row.update(test_ppl=ev["test_ppl"], test_ecr=ev["test_ecr"])
        per_layer += [{"run": row["run"], "moe_layer": i, "ecr": e} for i, e in enumerate(ev["per_layer_ecr"])]
    table = pd.DataFrame(rows)
    control = table.set_index("run").loc["lora_control"]
    table["ecr_vs_control"] = table.test_ecr / control.test_ecr - 1
    table["ppl_vs_control"] = table.test_ppl / control.test_ppl - 1
    per_layer = pd.DataFrame(per_layer)
    log = pd.DataFrame(logs)
    extra = {"choice": choice, "daft_layers": daft_layers, "steps": ft.steps}
    save_table(table, out / "runs", cfg, **extra)
    save_table(per_layer, out / "per_layer_ecr", cfg, **extra)
    save_table(log, out / "training_log", cfg, **extra)
    return {"runs": table, "per_layer": per_layer, "log": log, "profile": profile, "daft_layers": daft_layers,
            "choice": choice, "info": info}


def headline(table: pd.DataFrame) -> dict[str, float]:
    """CFMoE and DAFT against the LoRA control, from the stage's `runs` table: ECR gain and perplexity cost
    (relative), DAFT's share of CFMoE's trainable parameters, time and absolute ECR gain."""
    r = table.set_index("run")
    control, full, daft_run = r.loc["lora_control"], r.loc["cfmoe"], r.loc["cfmoe_daft"]
    full_gain = full.test_ecr - control.test_ecr
    return {"ecr_gain": full.ecr_vs_control, "ppl_cost": full.ppl_vs_control, "daft_ppl_cost": daft_run.ppl_vs_control,
            "control_ecr": control.test_ecr, "cfmoe_ecr": full.test_ecr,
            "daft_params": daft_run.trainable_params / full.trainable_params,
            "daft_time": daft_run.train_seconds / full.train_seconds,
            "daft_gain": (daft_run.test_ecr - control.test_ecr) / full_gain if full_gain else float("nan")}


def pareto_figure(cfg: StudyConfig):
    """Notebook 01's Pareto plot, the lever when a target is missed."""
    return cfg.results_dir(router_design.NOTEBOOK) / "pareto.png"


def figures(cfg: StudyConfig, results: dict) -> None:
    """Figures of notebook 02, drawn from the stage's tables."""
    out = cfg.results_dir(NOTEBOOK)
    info = results["info"]
    save_figure(plots.per_layer_ecr(results["per_layer"], info.top_k / info.n_experts), out / "per_layer_ecr", cfg)
    save_figure(plots.finetune_curves(results["log"]), out / "training_curves", cfg)


compute = runs.one_result_set(NOTEBOOK, _compute, figures)
