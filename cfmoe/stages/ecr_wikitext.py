"""Notebook 04 (`04_ecr_wikitext`): the authors' WikiText protocol on generated text, and their evaluation table.

    python -m cfmoe.stages ecr_wikitext --preset cpu

Each model is asked to describe each of the first `ecr.entries` WikiText-2 test entries (the authors' prompt
with the article title) and generates with the authors' sampling (temperature 0.2, top-p 0.9, repetition
penalty 1.5) and greedily (same penalty, no sampling). The routing of prefill and decode is recorded; ECR is
over the generated tokens (decode) and over the whole sequence, GDS over the router probabilities of decode,
LAL over decode. Quality: each model's teacher-forced perplexity of every entry's article given its prompt,
and distinct-n / repeated 4-grams of what it generated.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .. import claims, data, metrics, moe, routing, textquality
from ..config import StudyConfig
from ..determinism import make_deterministic
from ..present import plots
from ..provenance import save_figure, save_table
from . import runs

NOTEBOOK = "04_ecr_wikitext"
# the authors' released WikiText table, as a row beside ours
PAPER = {"model": f"{claims.PAPER_MODEL} (authors)",
         "k_over_e": claims.DEEPSEEK_MOE_16B["top_k"] / claims.DEEPSEEK_MOE_16B["n_routed"],
         "ecr_baseline": claims.PAPER_ECR_BASELINE, "ecr_cfmoe": claims.PAPER_ECR_CFMOE}


def decoding_settings(cfg: StudyConfig) -> dict[str, dict]:
    """generate() arguments of the two decoding settings."""
    e = cfg.ecr
    return {"sampled": {"do_sample": True, "temperature": e.temperature, "top_p": e.top_p,
                        "repetition_penalty": e.repetition_penalty},
            "greedy": {"do_sample": False, "repetition_penalty": e.repetition_penalty}}


def generate_entries(lm, tokenizer, prompts: list[str], settings: dict, max_new_tokens: int, batch_size: int,
                     seed: int) -> list[routing.RoutingTrace]:
    """Routing traces of generating from each prompt (seeded, so sampling repeats exactly)."""
    torch.manual_seed(seed)
    traces = []
    for start in range(0, len(prompts), batch_size):
        traces += routing.trace_generate(lm, tokenizer, prompts[start:start + batch_size], record_probs=True,
                                         max_new_tokens=max_new_tokens, **settings)
    return traces


def entries(cfg: StudyConfig):
    """The first `ecr.entries` WikiText-2 test entries (title, prompt, target)."""
    task = data.entry_task("test")
    return task.select(range(min(cfg.ecr.entries, len(task))))


def generated_traces(cfg: StudyConfig, run: str, lm, tokenizer, prompts: list[str], decoding: str,
                     force: bool = False) -> list[routing.RoutingTrace]:
    """`generate_entries` of one model and decoding, recorded once (`runs.cached_traces`) and read back after."""
    e, settings = cfg.ecr, decoding_settings(cfg)[decoding]
    key = {"kind": "generate", "prompts": prompts, "decoding": settings, "max_new_tokens": e.max_new_tokens,
           "batch_size": e.batch_size, "seed": cfg.seed}
    return runs.cached_traces(cfg, NOTEBOOK, f"{run}-{decoding}", lm, key, force=force,
                              compute=lambda: generate_entries(lm, tokenizer, prompts, settings, e.max_new_tokens,
                                                               e.batch_size, cfg.seed))


def sample_rows(traces, tokenizer, titles, prompts, run: str, decoding: str):
    """One row per generated sample, and per-layer decode ECR rows."""
    rows, per_layer = [], []
    for i, (trace, title, prompt) in enumerate(zip(traces, titles, prompts)):
        decode = trace.decode
        tokens = decode.token_ids
        layer_ecr = (metrics.expert_consistency_rate(decode.experts, per_layer=True) if decode.n_tokens > 1
                     else np.full(trace.n_layers, np.nan))
        rows.append({"entry": i, "title": title, "run": run, "decoding": decoding, "input": prompt,
                     "output": tokenizer.decode(tokens, skip_special_tokens=True),
                     "generated_tokens": int(decode.n_tokens), "decode_ecr": float(np.mean(layer_ecr)),
                     "sequence_ecr": float(metrics.expert_consistency_rate(trace.experts)),
                     "decode_gds": float(metrics.gate_distribution_similarity(decode.probs))
                     if decode.n_tokens > 1 else np.nan,
                     "decode_lal": float(metrics.layer_aware_locality(decode.experts)) if decode.n_tokens > 1
                     else np.nan,
                     "distinct_1": textquality.distinct_n(tokens, 1), "distinct_2": textquality.distinct_n(tokens, 2),
                     "repeated_4gram_rate": textquality.repeated_ngram_rate(tokens, 4)})
        per_layer += [{"entry": i, "run": run, "decoding": decoding, "moe_layer": layer, "ecr": value}
                      for layer, value in enumerate(layer_ecr)]
    return rows, per_layer


def authors_table(samples: pd.DataFrame, decoding: str = "sampled") -> pd.DataFrame:
    """The authors' released format: Input, Output_Baseline, ECR_Baseline, Output_CFMoE, ECR_CFMoE."""
    s = samples[samples.decoding == decoding].set_index(["run", "entry"])
    base, cfmoe = s.loc["base"], s.loc["cfmoe"]
    return pd.DataFrame({"Input": base.input, "Output_Baseline": base.output, "ECR_Baseline": base.decode_ecr,
                         "Output_CFMoE": cfmoe.output, "ECR_CFMoE": cfmoe.decode_ecr}).reset_index(drop=True)


def _compute(cfg: StudyConfig, force: bool = False) -> dict:
    """Generate (traces recorded once, then read from files) for each entry with each model and decoding; ECR, GDS, LAL and quality."""
    make_deterministic(cfg.seed, cfg.threads)
    out = cfg.results_dir(NOTEBOOK)
    e = cfg.ecr
    models, tokenizer = runs.load_runs(cfg)
    info = moe.describe(models["base"])
    task = entries(cfg)
    titles, prompts, targets = list(task["title"]), list(task["prompt"]), list(task["target"])
    max_positions = models["base"].config.max_position_embeddings

    rows, per_layer, quality = [], [], []
    for run, lm in models.items():
        for decoding in decoding_settings(cfg):
            traces = generated_traces(cfg, run, lm, tokenizer, prompts, decoding, force)
            r, p = sample_rows(traces, tokenizer, titles, prompts, run, decoding)
            rows += r
            per_layer += p
        ppl = textquality.conditional_perplexity(lm, tokenizer, prompts, targets, max_positions)
        quality += [{"entry": i, "run": run, "article_ppl": value, "article_tokens": n}
                    for i, (value, n) in enumerate(zip(ppl["perplexity"], ppl["tokens"]))]
        quality.append({"entry": -1, "run": run, "article_ppl": ppl["overall"], "article_tokens": sum(ppl["tokens"])})
    samples, per_layer, quality = pd.DataFrame(rows), pd.DataFrame(per_layer), pd.DataFrame(quality)

    overall = quality[quality.entry == -1].set_index("run").article_ppl
    k_over_e = info.top_k / info.n_experts
    summary = (samples.groupby(["decoding", "run"], sort=False)
               .agg(samples=("entry", "size"), generated_tokens=("generated_tokens", "mean"),
                    decode_ecr=("decode_ecr", "mean"), sequence_ecr=("sequence_ecr", "mean"),
                    decode_gds=("decode_gds", "mean"), decode_lal=("decode_lal", "mean"),
                    distinct_2=("distinct_2", "mean"), repeated_4gram_rate=("repeated_4gram_rate", "mean"))
               .reset_index())
    summary["ecr_over_k_over_e"] = summary.decode_ecr / k_over_e
    summary["article_ppl"] = summary.run.map(overall)
    for decoding, group in summary.groupby("decoding"):
        ref = group.set_index("run")
        summary.loc[group.index, "ecr_vs_base"] = group.decode_ecr.to_numpy() / ref.loc["base", "decode_ecr"] - 1
        summary.loc[group.index, "ppl_vs_control"] = (group.article_ppl.to_numpy()
                                                     / ref.loc["lora_control", "article_ppl"] - 1)
    sampled = summary[summary.decoding == "sampled"].set_index("run")
    comparison = pd.DataFrame([
        {**PAPER, "gain": claims.PAPER_ECR_GAIN, "samples": claims.PAPER_ECR_SAMPLES},
        {"model": f"cfmoe {cfg.preset} default" if not cfg.model_path else cfg.model_path, "k_over_e": k_over_e,
         "ecr_baseline": sampled.loc["base", "decode_ecr"], "ecr_cfmoe": sampled.loc["cfmoe", "decode_ecr"],
         "gain": sampled.loc["cfmoe", "ecr_vs_base"], "samples": int(sampled.loc["base", "samples"])}])
    comparison["baseline_over_k_over_e"] = comparison.ecr_baseline / comparison.k_over_e
    comparison["cfmoe_over_k_over_e"] = comparison.ecr_cfmoe / comparison.k_over_e

    extra = {"decoding": decoding_settings(cfg), "max_new_tokens": e.max_new_tokens}
    table = authors_table(samples)
    save_table(table, out / "wikitext_evaluation", cfg, **extra)
    save_table(samples.drop(columns="input"), out / "samples", cfg, **extra)
    save_table(per_layer, out / "per_layer_ecr", cfg, **extra)
    save_table(quality, out / "article_perplexity", cfg, **extra)
    save_table(summary, out / "summary", cfg, **extra)
    save_table(comparison, out / "paper_comparison", cfg, **extra)
    return {"samples": samples, "table": table, "per_layer": per_layer, "quality": quality, "summary": summary,
            "comparison": comparison, "info": info}


def verdicts(summary: pd.DataFrame) -> list[str]:
    """Per decoding: CFMoE's decode ECR against base (the paper's gain as the bar) and the control, repetition and
    diversity next to base's and the control's; then the article perplexity against the control."""
    s = summary.set_index(["decoding", "run"])
    lines = []
    for decoding in ("sampled", "greedy"):
        base, control, cf = (s.loc[(decoding, run)] for run in ("base", "lora_control", "cfmoe"))
        lines.append(f"{decoding}: decode ECR {cf.decode_ecr:.4f} vs base {base.decode_ecr:.4f}: "
                     f"{claims.GENERATED_ECR_GAIN.verdict(cf.ecr_vs_base)}; vs control "
                     f"{cf.decode_ecr / control.decode_ecr - 1:+.1%}")
        lines.append(f"    repeated 4-grams: CFMoE {cf.repeated_4gram_rate:.4f}, base {base.repeated_4gram_rate:.4f}, "
                     f"control {control.repeated_4gram_rate:.4f}; distinct-2: CFMoE {cf.distinct_2:.3f}, base "
                     f"{base.distinct_2:.3f}, control {control.distinct_2:.3f}")
    cf, control = s.loc[("sampled", "cfmoe")], s.loc[("sampled", "lora_control")]
    lines.append(f"article perplexity given the prompt: CFMoE {cf.article_ppl:.2f} vs control {control.article_ppl:.2f}: "
                 f"{claims.PPL_COST.verdict(cf.ppl_vs_control)}")
    return lines


def figures(cfg: StudyConfig, results: dict) -> None:
    """Figures of notebook 04, drawn from the stage's tables."""
    out = cfg.results_dir(NOTEBOOK)
    k_over_e = results["info"].top_k / results["info"].n_experts
    save_figure(plots.ecr_distributions(results["samples"], k_over_e), out / "ecr_distributions", cfg)
    save_figure(plots.per_layer_heatmaps(results["per_layer"]), out / "per_layer_ecr_heatmaps", cfg)


compute = runs.one_result_set(NOTEBOOK, _compute, figures)
