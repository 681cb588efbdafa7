"""The study's stages: each computes its results, writes them under results/, and is what a notebook calls.

    python -m cfmoe.study base_model --preset gpu        # the stage behind notebook 00, without Jupyter
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from . import evaluate, metrics, model, moe, routing
from .config import StudyConfig, load_config
from .determinism import make_deterministic
from .provenance import save_figure, save_table

BASE_MODEL = "00_base_model"


def load_base(cfg: StudyConfig, force: bool = False):
    """The model under study: `cfg.model_path` when given, else the project's pre-trained default."""
    if cfg.model_path:
        return model.load_model(cfg.model_path, device=cfg.device)
    return model.build_or_load(cfg, force=force)


def model_dir(cfg: StudyConfig):
    return cfg.model_path or str(model.base_model_dir(cfg))


def test_routing(cfg: StudyConfig, lm, tokenizer, batch_size: int = 8) -> np.ndarray:
    """Experts used by every WikiText-2 test token (teacher-forced), shape (tokens, moe_layers, k)."""
    blocks = evaluate.test_blocks(tokenizer, cfg.pretrain.block_size, cfg.eval.max_test_tokens)["input_ids"]
    import torch

    traces = []
    for start in range(0, len(blocks), batch_size):
        batch = torch.as_tensor(blocks[start:start + batch_size], device=cfg.device)
        traces += routing.trace_forward(lm, batch)
    return np.concatenate([t.experts for t in traces])


def base_model_stage(cfg: StudyConfig, force: bool = False) -> dict[str, pd.DataFrame]:
    """Notebook 00: build or load the base model; its size, test perplexity and expert load."""
    make_deterministic(cfg.seed, cfg.threads)
    out = cfg.results_dir(BASE_MODEL)
    lm, tokenizer = load_base(cfg, force=force)
    info = moe.describe(lm)
    build = model.build_info(model_dir(cfg))

    started = time.perf_counter()
    blocks = evaluate.test_blocks(tokenizer, cfg.pretrain.block_size, cfg.eval.max_test_tokens)
    ppl = evaluate.perplexity(lm, blocks, cfg.eval.batch_size)
    experts = test_routing(cfg, lm, tokenizer, cfg.eval.batch_size)
    eval_seconds = time.perf_counter() - started

    load = metrics.expert_load(experts, info.n_experts)
    ratio = load.max(axis=1) / (info.top_k / info.n_experts)
    n_params = sum(p.numel() for p in lm.parameters())
    summary = pd.DataFrame([{
        "preset": cfg.preset, "model": model_dir(cfg), "architecture": info.architecture,
        "parameters": n_params, "moe_layers": len(info.layers), "n_experts": info.n_experts, "top_k": info.top_k,
        "k_over_E": info.top_k / info.n_experts, "routed_expert_share": info.routed_share,
        "expert_mb": info.layers[0].expert_bytes / 1e6, "resident_mb": info.resident_bytes / 1e6,
        "test_perplexity": ppl["perplexity"], "test_tokens": ppl["tokens"],
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


STAGES = {"base_model": (base_model_stage, base_model_figures)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--model-path", default="")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    cfg = load_config(args.preset, model_path=args.model_path or None, seed=args.seed)
    compute, draw = STAGES[args.stage]
    results = compute(cfg, force=args.force)
    draw(cfg, results)
    print(results["summary"].T.to_string())


if __name__ == "__main__":
    main()
