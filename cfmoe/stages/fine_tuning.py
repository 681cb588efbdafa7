"""Notebook 02 (`02_fine_tuning`): does CFMoE (and DAFT) raise ECR over a fine-tuning control at equal perplexity?

    python -m cfmoe.stages fine_tuning --preset cpu
"""

from __future__ import annotations

import copy

import pandas as pd

from .. import daft, evaluate, finetune, moe, stats
from ..config import StudyConfig
from ..determinism import make_deterministic
from ..present import plots
from ..provenance import save_figure, save_table
from . import router_design, runs

NOTEBOOK = "02_fine_tuning"


def _compute(cfg: StudyConfig, force: bool = False) -> dict:
    """Base, LoRA control, CFMoE (all layers) and CFMoE+DAFT, each once per seed with the same steps and data;
    every fine-tuned model scored on validation (for later choices) and once on test (final numbers)."""
    make_deterministic(cfg.seed, cfg.threads)
    out = cfg.results_dir(NOTEBOOK)
    ft = cfg.finetune
    lm, tokenizer = runs.load_base(cfg)
    info = moe.describe(lm)
    choice = router_design.load_choice(cfg)
    blocks = finetune.finetune_blocks(tokenizer, ft.block_size)

    # DAFT's offline profile, a choice, so on the validation text: per-layer ECR of the base model
    calibration = evaluate.test_blocks(tokenizer, ft.block_size, split="validation")
    profile = daft.profile_layer_ecr(lm, calibration["input_ids"], calibration["document_ids"])
    by_threshold = daft.select_daft_layers(profile, threshold=ft.daft_threshold)
    selection = "threshold"
    daft_layers = by_threshold
    if len(by_threshold) in (0, len(profile)):  # a small model's layers may all sit below 0.7
        daft_layers, selection = daft.select_daft_layers(profile, quantile=ft.daft_quantile), "quantile"
    profile["selected"] = profile.layer.isin(daft_layers)
    save_table(profile, out / "ecr_profile", cfg, threshold=ft.daft_threshold, quantile=ft.daft_quantile,
               selection=selection, profiled_on="validation")

    all_layers = list(range(len(info.layers)))
    # run -> (locality kind, weight, MoE layers fine-tuned); the control uses no locality loss
    plans = {"lora_control": ("none", 0.0, all_layers), "cfmoe": (choice["kind"], choice["weight"], all_layers),
             "cfmoe_daft": (choice["kind"], choice["weight"], daft_layers)}
    rows = [{"run": "base", "seed": seed, "locality_kind": "none", "locality_weight": 0.0, "layers_tuned": "",
             "trainable_params": 0, "train_seconds": 0.0, "peak_memory_mb": float("nan"),
             **_scores(cfg, "base", lm, tokenizer, force)} for seed in ft.seeds[:1]]
    per_layer, logs = [], []
    for seed in ft.seeds:
        for run, (kind, weight, layers) in plans.items():
            train = finetune.finetune(copy.deepcopy(lm), blocks, ft, kind="js" if kind == "none" else kind,
                                      weight=weight, top_k=info.top_k, seed=seed, device=cfg.device, layers=layers)
            tuned = runs.save_finetuned(cfg, run, train.model, tokenizer, seed)
            logs += [{**row, "run": run, "seed": seed} for row in train.log if "lm_loss" in row]
            scores = _scores(cfg, f"{run}-seed{seed}", tuned, tokenizer, force)
            per_layer += [{"run": run, "seed": seed, "moe_layer": i, "ecr": e}
                          for i, e in enumerate(scores.pop("per_layer_ecr"))]
            rows.append({"run": run, "seed": seed, "locality_kind": kind, "locality_weight": weight,
                         "layers_tuned": ",".join(map(str, layers)), "trainable_params": train.trainable_params,
                         "train_seconds": train.train_seconds, "peak_memory_mb": train.peak_memory_mb, **scores})
            del train, tuned
    per_layer = [{"run": "base", "seed": ft.seeds[0], "moe_layer": i, "ecr": e}
                 for i, e in enumerate(rows[0].pop("per_layer_ecr"))] + per_layer
    table = with_changes(pd.DataFrame(rows), info.top_k / info.n_experts)
    summary = summarize_runs(table)
    per_layer = pd.DataFrame(per_layer)
    log = pd.DataFrame(logs)
    extra = {"choice": choice, "daft_layers": daft_layers, "steps": ft.steps, "seeds": list(ft.seeds),
             "interval": "mean over seeds and its 95% Student-t interval"}
    save_table(table, out / "runs", cfg, **extra)
    save_table(summary, out / "runs_summary", cfg, **extra)
    save_table(per_layer, out / "per_layer_ecr", cfg, **extra)
    save_table(log, out / "training_log", cfg, **extra)
    return {"runs": table, "summary": summary, "per_layer": per_layer, "log": log, "profile": profile,
            "daft_layers": daft_layers, "choice": choice, "info": info}


def _scores(cfg: StudyConfig, name: str, lm, tokenizer, force: bool) -> dict:
    """A model's validation and test perplexity and ECR (teacher-forced; test read once per final model)."""
    ft = cfg.finetune
    val = runs.test_evaluation(cfg, NOTEBOOK, name, lm, tokenizer, ft.block_size, ft.eval_tokens, force,
                               split="validation")
    test = (runs.base_test_evaluation(cfg, lm, tokenizer, ft.block_size, force) if name == "base" else
            runs.test_evaluation(cfg, NOTEBOOK, name, lm, tokenizer, ft.block_size, cfg.eval.max_test_tokens, force))
    return {"validation_ppl": val["test_ppl"], "validation_ecr": val["test_ecr"], "test_ppl": test["test_ppl"],
            "test_ecr": test["test_ecr"], "per_layer_ecr": test["per_layer_ecr"]}


def with_changes(table: pd.DataFrame, k_over_e: float) -> pd.DataFrame:
    """Per-seed changes against the LoRA control of the same seed (base against the first seed's control):
    relative (`ecr_vs_control`, `ppl_vs_control`) and absolute (`delta_ecr`), and ECR / (k/E)."""
    control = table[table.run == "lora_control"].set_index("seed")
    seed = table.seed.where(table.seed.isin(control.index), control.index[0])
    ctrl_ecr, ctrl_ppl = control.test_ecr.reindex(seed).to_numpy(), control.test_ppl.reindex(seed).to_numpy()
    return table.assign(test_ecr_over_k_e=table.test_ecr / k_over_e, delta_ecr=table.test_ecr - ctrl_ecr,
                        ecr_vs_control=table.test_ecr / ctrl_ecr - 1, ppl_vs_control=table.test_ppl / ctrl_ppl - 1)


SUMMARY_COLUMNS = ["test_ecr", "test_ecr_over_k_e", "delta_ecr", "ecr_vs_control", "test_ppl", "ppl_vs_control",
                   "validation_ecr", "validation_ppl", "trainable_params", "train_seconds"]


def summarize_runs(table: pd.DataFrame) -> pd.DataFrame:
    """One row per run: the number of seeds and each column's mean with its 95% interval over seeds."""
    return stats.summarize(table, ["run"], SUMMARY_COLUMNS)


def headline(table: pd.DataFrame) -> dict[str, tuple[float, float, float]]:
    """CFMoE and DAFT against the LoRA control, from the stage's per-seed `runs` table, each as (mean, low, high)
    over seeds: ECR gain (relative and absolute), perplexity cost, the control's and CFMoE's ECR and ECR/(k/E),
    DAFT's share of CFMoE's trainable parameters, time and ECR gain (paired by seed)."""
    if "seed" not in table:  # a table of one seed from before seeds were recorded: no intervals
        control = table.set_index("run").loc["lora_control"]
        table = table.assign(seed=0, delta_ecr=table.test_ecr - control.test_ecr, test_ecr_over_k_e=float("nan"))

    def by_seed(run, col):
        return table[table.run == run].set_index("seed")[col].sort_index()

    full_gain = by_seed("cfmoe", "delta_ecr")
    daft_gain = by_seed("cfmoe_daft", "delta_ecr")
    ratio = lambda a, b: stats.mean_interval((by_seed("cfmoe_daft", a) / by_seed("cfmoe", b)).dropna())  # noqa: E731
    base = table[table.run == "base"].iloc[0]
    return {"ecr_gain": stats.mean_interval(by_seed("cfmoe", "ecr_vs_control")),
            "delta_ecr": stats.mean_interval(full_gain),
            "ppl_cost": stats.mean_interval(by_seed("cfmoe", "ppl_vs_control")),
            "daft_ppl_cost": stats.mean_interval(by_seed("cfmoe_daft", "ppl_vs_control")),
            "control_ecr": stats.mean_interval(by_seed("lora_control", "test_ecr")),
            "cfmoe_ecr": stats.mean_interval(by_seed("cfmoe", "test_ecr")),
            "control_ecr_over_k_e": stats.mean_interval(by_seed("lora_control", "test_ecr_over_k_e")),
            "cfmoe_ecr_over_k_e": stats.mean_interval(by_seed("cfmoe", "test_ecr_over_k_e")),
            "base_ecr": (base.test_ecr,) * 3, "base_ecr_over_k_e": (base.test_ecr_over_k_e,) * 3,
            "daft_params": ratio("trainable_params", "trainable_params"),
            "daft_time": ratio("train_seconds", "train_seconds"),
            "daft_gain": stats.mean_interval((daft_gain / full_gain).where(full_gain != 0))}


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
