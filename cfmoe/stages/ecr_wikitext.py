"""Notebook 04 (`04_ecr_wikitext`): the authors' WikiText protocol on generated text, and their evaluation table.

    python -m cfmoe.stages ecr_wikitext --preset cpu

Each model is asked to describe each of the first `ecr.entries` WikiText-2 test entries (the authors' prompt
with the article title) and generates with the authors' sampling (temperature 0.2, top-p 0.9, repetition
penalty 1.5) and greedily (same penalty, no sampling). The routing of prefill and decode is recorded; ECR is
over the generated tokens (decode) and over the whole sequence, GDS over the router probabilities of decode,
LAL over decode. Quality: each model's teacher-forced perplexity of every entry's article given its prompt,
and distinct-n / repeated 4-grams of what it generated.

Every fine-tuned run generates once per fine-tuning seed (`finetune.seeds`; the base model once). The LoRA
control is the baseline of every gain: CFMoE's (and DAFT's) decode ECR against the control's, paired by seed and
entry, with a 95% percentile bootstrap interval over entries (`summary_table`, `headline`); the base model is
shown beside, and every relative gain has its ΔECR and ECR/(k/E) next to it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch

from .. import claims, data, metrics, moe, routing, stats, textquality
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


def cache_name(cfg: StudyConfig, run: str, seed: int | None = None) -> str:
    """A model's name in the trace cache: the run, and for a fine-tuned run its seed (None: the primary seed,
    `finetune.seeds[0]`), so the seeds of a run never share a name."""
    if run == "base":
        return run
    return f"{run}-seed{cfg.finetune.seeds[0] if seed is None else seed}"


def generated_traces(cfg: StudyConfig, run: str, lm, tokenizer, prompts: list[str], decoding: str,
                     force: bool = False, seed: int | None = None) -> list[routing.RoutingTrace]:
    """`generate_entries` of one model (a run of one fine-tuning seed; None: the primary seed) and decoding,
    recorded once (`runs.cached_traces`) and read back after."""
    e, settings = cfg.ecr, decoding_settings(cfg)[decoding]
    key = {"kind": "generate", "prompts": prompts, "decoding": settings, "max_new_tokens": e.max_new_tokens,
           "batch_size": e.batch_size, "seed": cfg.seed}
    return runs.cached_traces(cfg, NOTEBOOK, f"{cache_name(cfg, run, seed)}-{decoding}", lm, key, force=force,
                              compute=lambda: generate_entries(lm, tokenizer, prompts, settings, e.max_new_tokens,
                                                               e.batch_size, cfg.seed))


def sample_rows(traces, tokenizer, titles, prompts, run: str, decoding: str, seed: int = 0):
    """One row per generated sample, and per-layer decode ECR rows, of one run's model of one seed."""
    rows, per_layer = [], []
    for i, (trace, title, prompt) in enumerate(zip(traces, titles, prompts)):
        decode = trace.decode
        tokens = decode.token_ids
        layer_ecr = (metrics.expert_consistency_rate(decode.experts, per_layer=True) if decode.n_tokens > 1
                     else np.full(trace.n_layers, np.nan))
        rows.append({"entry": i, "title": title, "run": run, "seed": seed, "decoding": decoding, "input": prompt,
                     "output": tokenizer.decode(tokens, skip_special_tokens=True),
                     "generated_tokens": int(decode.n_tokens), "decode_ecr": float(np.mean(layer_ecr)),
                     "sequence_ecr": float(metrics.expert_consistency_rate(trace.experts)),
                     "decode_gds": float(metrics.gate_distribution_similarity(decode.probs))
                     if decode.n_tokens > 1 else np.nan,
                     "decode_lal": float(metrics.layer_aware_locality(decode.experts)) if decode.n_tokens > 1
                     else np.nan,
                     "distinct_1": textquality.distinct_n(tokens, 1), "distinct_2": textquality.distinct_n(tokens, 2),
                     "repeated_4gram_rate": textquality.repeated_ngram_rate(tokens, 4)})
        per_layer += [{"entry": i, "run": run, "seed": seed, "decoding": decoding, "moe_layer": layer, "ecr": value}
                      for layer, value in enumerate(layer_ecr)]
    return rows, per_layer


def authors_table(samples: pd.DataFrame, decoding: str = "sampled", seed: int | None = None) -> pd.DataFrame:
    """The authors' released format: Input, Output_Baseline, ECR_Baseline, Output_CFMoE, ECR_CFMoE; the CFMoE
    model of one seed (None: the primary seed, the one the base model's rows carry)."""
    s = samples[samples.decoding == decoding]
    if "seed" in s:
        seed = s[s.run == "base"].seed.iloc[0] if seed is None else seed
        s = s[(s.run == "base") | (s.seed == seed)]
    s = s.set_index(["run", "entry"])
    base, cfmoe = s.loc["base"], s.loc["cfmoe"]
    return pd.DataFrame({"Input": base.input, "Output_Baseline": base.output, "ECR_Baseline": base.decode_ecr,
                         "Output_CFMoE": cfmoe.output, "ECR_CFMoE": cfmoe.decode_ecr}).reset_index(drop=True)


# --- gains over the LoRA control, paired by seed and entry, with bootstrap intervals ---------------------------
BASELINE = "lora_control"  # every gain's baseline; the base model is shown beside
SHORT = {"base": "base", "lora_control": "control", "cfmoe": "cfmoe", "cfmoe_daft": "daft"}  # headline() keys
MEANS = ["generated_tokens", "sequence_ecr", "decode_gds", "decode_lal", "distinct_2"]
INTERVAL = "95% percentile bootstrap over entries, each entry resampled with all its seeds (paired by seed and entry)"


def entry_matrix(table: pd.DataFrame, run: str, column: str, seeds: list, decoding: str | None = None) -> np.ndarray:
    """(entries, seeds) values of one run (and decoding), entries in order; a run measured once (the base model)
    repeated across the seeds, so that it pairs with every seed of another run."""
    rows = table[(table.run == run) & (table.entry >= 0)]
    if decoding is not None:
        rows = rows[rows.decoding == decoding]
    m = rows.set_index(["entry", "seed"])[column].unstack("seed").sort_index()
    if m.shape[1] == 1:
        return np.repeat(m.to_numpy(float), len(seeds), axis=1)
    return m.reindex(columns=seeds).to_numpy(float)


def _paired(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays with a pair left out (NaN) wherever either side has no value (a one-token generation)."""
    both = np.isfinite(a) & np.isfinite(b)
    return np.where(both, a, np.nan), np.where(both, b, np.nan)


def _gain(a, b):
    return np.nanmean(a) / np.nanmean(b) - 1


def _delta(a, b):
    return np.nanmean(a - b)


def _ppl_change(log_a, log_b, tokens):
    """Token-weighted perplexity of a over b, minus 1 (per-entry log perplexities, weighted by article tokens)."""
    return np.exp(np.sum(tokens * (log_a - log_b)) / np.sum(tokens)) - 1


def paired_interval(candidate: np.ndarray, baseline: np.ndarray, statistic=_gain, seed: int = 0):
    """(value, low, high) of `statistic(candidate, baseline)` over (entries, seeds) arrays paired by seed and entry:
    `stats.bootstrap_interval` resampling entries, each with all its seeds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample of only one-token generations has no mean
        return stats.bootstrap_interval(_paired(candidate, baseline), statistic, seed=seed)


def mean_interval(values: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of an (entries, seeds) array: `stats.bootstrap_interval` resampling entries."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return stats.bootstrap_interval(values, np.nanmean, seed=seed)


def summary_table(samples: pd.DataFrame, quality: pd.DataFrame, k_over_e: float, seed: int = 0) -> pd.DataFrame:
    """One row per decoding and run, pooled over seeds and entries: means, decode ECR and ECR/(k/E), ΔECR and the
    relative gain against the LoRA control (the baseline) and against the base model (beside), repetition, and the
    token-weighted article perplexity and its cost against the control; each with a 95% interval (`INTERVAL`)."""
    samples, quality = runs.with_seed(samples), runs.with_seed(quality)
    seeds = list(dict.fromkeys(samples[samples.run != "base"].seed)) or list(dict.fromkeys(samples.seed))
    ppl = {run: (np.log(entry_matrix(quality, run, "article_ppl", seeds)),
                 entry_matrix(quality, run, "article_tokens", seeds)) for run in dict.fromkeys(quality.run)}
    rows = []
    for decoding in dict.fromkeys(samples.decoding):
        for run in dict.fromkeys(samples.run):
            own = samples[(samples.run == run) & (samples.decoding == decoding)]
            row = {"decoding": decoding, "run": run, "seeds": own.seed.nunique(), "samples": len(own),
                   "generated_tokens": own.generated_tokens.mean()}
            ecr = entry_matrix(samples, run, "decode_ecr", seeds, decoding)
            row.update(_interval_columns("decode_ecr", mean_interval(ecr, seed)))
            row.update(_interval_columns("ecr_over_k_over_e", tuple(v / k_over_e for v in
                                                                    (row["decode_ecr"], row["decode_ecr_low"],
                                                                     row["decode_ecr_high"]))))
            for name, ref in (("control", BASELINE), ("base", "base")):
                other = entry_matrix(samples, ref, "decode_ecr", seeds, decoding)
                row.update(_interval_columns(f"delta_ecr_vs_{name}", paired_interval(ecr, other, _delta, seed)))
                row.update(_interval_columns(f"ecr_vs_{name}", paired_interval(ecr, other, _gain, seed)))
            row.update({column: own[column].mean() for column in MEANS[1:]})
            rep = entry_matrix(samples, run, "repeated_4gram_rate", seeds, decoding)
            row.update(_interval_columns("repeated_4gram_rate", mean_interval(rep, seed)))
            if run in ppl and BASELINE in ppl:
                (log_run, tokens), (log_ctrl, _) = ppl[run], ppl[BASELINE]
                row["article_ppl"] = float(np.exp(np.nansum(tokens * log_run) / np.nansum(tokens)))
                row.update(_interval_columns("ppl_vs_control", stats.bootstrap_interval(
                    (log_run, log_ctrl, tokens), _ppl_change, seed=seed)))
            rows.append(row)
    return pd.DataFrame(rows)


def _interval_columns(name: str, value: tuple[float, float, float]) -> dict:
    return dict(zip((name, f"{name}_low", f"{name}_high"), map(float, value)))


def _triple(row, column: str) -> tuple[float, float, float]:
    return tuple(float(row[c]) if c in row else float("nan") for c in (column, f"{column}_low", f"{column}_high"))


def headline(summary: pd.DataFrame, decoding: str = "sampled") -> dict[str, tuple[float, float, float]]:
    """The numbers the report needs from `summary_table`, each as (mean, low, high) with its 95% interval
    (`INTERVAL`), for one decoding: CFMoE's and DAFT's gain (`ecr_gain`, `daft_ecr_gain`) and ΔECR (`delta_ecr`,
    `daft_delta_ecr`) against the LoRA control, CFMoE against the base model (`gain_vs_base`, `delta_vs_base`),
    the article perplexity cost against the control (`ppl_cost`, `daft_ppl_cost`), and per model (`base`,
    `control`, `cfmoe`, `daft`) its decode ECR (`<model>_ecr`), ECR/(k/E) and repeated-4-gram rate."""
    s = summary[summary.decoding == decoding].set_index("run")
    out = {"ecr_gain": _triple(s.loc["cfmoe"], "ecr_vs_control"),
           "delta_ecr": _triple(s.loc["cfmoe"], "delta_ecr_vs_control"),
           "gain_vs_base": _triple(s.loc["cfmoe"], "ecr_vs_base"),
           "delta_vs_base": _triple(s.loc["cfmoe"], "delta_ecr_vs_base"),
           "daft_ecr_gain": _triple(s.loc["cfmoe_daft"], "ecr_vs_control"),
           "daft_delta_ecr": _triple(s.loc["cfmoe_daft"], "delta_ecr_vs_control"),
           "ppl_cost": _triple(s.loc["cfmoe"], "ppl_vs_control"),
           "daft_ppl_cost": _triple(s.loc["cfmoe_daft"], "ppl_vs_control")}
    for run, short in SHORT.items():
        out[f"{short}_ecr"] = _triple(s.loc[run], "decode_ecr")
        out[f"{short}_ecr_over_k_e"] = _triple(s.loc[run], "ecr_over_k_over_e")
        out[f"{short}_repeated_4grams"] = _triple(s.loc[run], "repeated_4gram_rate")
    return out


def comparison_table(summary: pd.DataFrame, k_over_e: float, model: str) -> pd.DataFrame:
    """The authors' released figures beside ours as ECR/(k/E) (ECR depends on k/E) and ΔECR, not as percentages
    alone: the paper's baseline is its base model, so our CFMoE is given against our base model (as the paper)
    and against the LoRA control (our headline), sampled decoding."""
    h = headline(summary)
    sampled = summary[summary.decoding == "sampled"].set_index("run")
    paper = {"model": PAPER["model"], "baseline": "its base model", "samples": claims.PAPER_ECR_SAMPLES, "seeds": 1,
             "k_over_e": PAPER["k_over_e"], "baseline_over_k_over_e": PAPER["ecr_baseline"] / PAPER["k_over_e"],
             "cfmoe_over_k_over_e": PAPER["ecr_cfmoe"] / PAPER["k_over_e"], "ecr_baseline": PAPER["ecr_baseline"],
             "ecr_cfmoe": PAPER["ecr_cfmoe"], "delta_ecr": PAPER["ecr_cfmoe"] - PAPER["ecr_baseline"],
             "gain": claims.PAPER_ECR_GAIN}
    rows = [paper]
    for baseline, label, gain, delta in (("base", "base model (as the paper)", "gain_vs_base", "delta_vs_base"),
                                         (BASELINE, "LoRA control (our headline)", "ecr_gain", "delta_ecr")):
        ecr_base = sampled.loc[baseline, "decode_ecr"]
        rows.append({"model": model, "baseline": label, "samples": int(sampled.loc["base", "samples"]),
                     "seeds": int(sampled.loc["cfmoe", "seeds"]), "k_over_e": k_over_e,
                     "baseline_over_k_over_e": ecr_base / k_over_e, "cfmoe_over_k_over_e": h["cfmoe_ecr"][0] / k_over_e,
                     "ecr_baseline": ecr_base, "ecr_cfmoe": h["cfmoe_ecr"][0],
                     **_interval_columns("delta_ecr", h[delta]), **_interval_columns("gain", h[gain])})
    columns = ["model", "baseline", "samples", "seeds", "k_over_e", "baseline_over_k_over_e", "cfmoe_over_k_over_e",
               "ecr_baseline", "ecr_cfmoe", "delta_ecr", "delta_ecr_low", "delta_ecr_high", "gain", "gain_low",
               "gain_high"]
    return pd.DataFrame(rows, columns=columns)


def _compute(cfg: StudyConfig, force: bool = False) -> dict:
    """Generate (traces recorded once, then read from files) for each entry with the base model and every
    fine-tuned run of every seed, both decodings; ECR, GDS, LAL and quality; gains against the LoRA control."""
    make_deterministic(cfg.seed, cfg.threads)
    out = cfg.results_dir(NOTEBOOK)
    e = cfg.ecr
    seeds = list(cfg.finetune.seeds)
    task = entries(cfg)
    titles, prompts, targets = list(task["title"]), list(task["prompt"]), list(task["target"])

    rows, per_layer, quality, info = [], [], [], None
    for seed in seeds:
        models, tokenizer = runs.load_runs(cfg, seed)
        if info is None:
            info = moe.describe(models["base"])
            max_positions = models["base"].config.max_position_embeddings
        for run, lm in models.items():
            if run == "base" and seed != seeds[0]:  # the base model is not fine-tuned: measured once
                continue
            for decoding in decoding_settings(cfg):
                traces = generated_traces(cfg, run, lm, tokenizer, prompts, decoding, force, seed)
                r, p = sample_rows(traces, tokenizer, titles, prompts, run, decoding, seed)
                rows += r
                per_layer += p
            ppl = textquality.conditional_perplexity(lm, tokenizer, prompts, targets, max_positions)
            quality += [{"entry": i, "run": run, "seed": seed, "article_ppl": value, "article_tokens": n}
                        for i, (value, n) in enumerate(zip(ppl["perplexity"], ppl["tokens"]))]
            quality.append({"entry": -1, "run": run, "seed": seed, "article_ppl": ppl["overall"],
                            "article_tokens": sum(ppl["tokens"])})
        del models
    samples, per_layer, quality = pd.DataFrame(rows), pd.DataFrame(per_layer), pd.DataFrame(quality)

    k_over_e = info.top_k / info.n_experts
    summary = summary_table(samples, quality, k_over_e)
    comparison = comparison_table(summary, k_over_e, f"cfmoe {cfg.preset} default" if not cfg.model_path
                                  else cfg.model_path)

    extra = {"decoding": decoding_settings(cfg), "max_new_tokens": e.max_new_tokens, "seeds": seeds,
             "baseline": BASELINE, "interval": INTERVAL}
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
    """Per decoding: CFMoE's decode ECR against the LoRA control (the paper's gain as the bar, met only when the
    whole 95% interval clears it), with ΔECR and ECR/(k/E) beside; the base model beside; DAFT's gain; the
    repeated-4-gram rate and distinct-2 of CFMoE, DAFT, control and base. Then the article perplexity cost."""
    s = summary.set_index(["decoding", "run"])
    lines = []
    for decoding in ("sampled", "greedy"):
        h = headline(summary, decoding)
        n = s.loc[(decoding, "cfmoe")]
        lines.append(f"{decoding} ({int(s.loc[(decoding, 'base'), 'samples'])} entries, {int(n.seeds)} seeds; "
                     f"[95% bootstrap interval over entries]): decode ECR CFMoE {h['cfmoe_ecr'][0]:.4f} (ECR/(k/E) "
                     f"{h['cfmoe_ecr_over_k_e'][0]:.2f}) vs LoRA control {h['control_ecr'][0]:.4f} "
                     f"({h['control_ecr_over_k_e'][0]:.2f}), Δ {stats.format_interval(h['delta_ecr'], '+.4f')}: "
                     f"{claims.GENERATED_ECR_GAIN.verdict_interval(*h['ecr_gain'])}")
        lines.append(f"    base beside: decode ECR {h['base_ecr'][0]:.4f} (ECR/(k/E) {h['base_ecr_over_k_e'][0]:.2f}); "
                     f"CFMoE vs base {stats.format_interval(h['gain_vs_base'], '+.1%')}, Δ {stats.format_interval(h['delta_vs_base'], '+.4f')}")
        lines.append(f"    DAFT: decode ECR {h['daft_ecr'][0]:.4f} (ECR/(k/E) {h['daft_ecr_over_k_e'][0]:.2f}); vs "
                     f"control {stats.format_interval(h['daft_ecr_gain'], '+.1%')}, Δ {stats.format_interval(h['daft_delta_ecr'], '+.4f')}")
        rep = ", ".join(f"{name} {stats.format_interval(h[f'{short}_repeated_4grams'], '.4f')}" for name, short in
                        (("CFMoE", "cfmoe"), ("DAFT", "daft"), ("control", "control"), ("base", "base")))
        distinct = ", ".join(f"{name} {s.loc[(decoding, run), 'distinct_2']:.3f}" for name, run in
                             (("CFMoE", "cfmoe"), ("DAFT", "cfmoe_daft"), ("control", "lora_control"),
                              ("base", "base")))
        lines.append(f"    repeated 4-grams: {rep}; distinct-2: {distinct}")
    h = headline(summary)
    ppl = {run: s.loc[("sampled", run), "article_ppl"] for run in ("cfmoe", "cfmoe_daft", "lora_control")}
    lines.append(f"article perplexity given the prompt: CFMoE {ppl['cfmoe']:.2f} vs control {ppl['lora_control']:.2f}: "
                 f"{claims.PPL_COST.verdict_interval(*h['ppl_cost'])}; DAFT {ppl['cfmoe_daft']:.2f}, "
                 f"{stats.format_interval(h['daft_ppl_cost'], '+.2%')}")
    return lines


def figures(cfg: StudyConfig, results: dict) -> None:
    """Figures of notebook 04, drawn from the stage's tables."""
    out = cfg.results_dir(NOTEBOOK)
    k_over_e = results["info"].top_k / results["info"].n_experts
    save_figure(plots.ecr_distributions(results["samples"], k_over_e), out / "ecr_distributions", cfg)
    save_figure(plots.per_layer_heatmaps(results["per_layer"]), out / "per_layer_ecr_heatmaps", cfg)


compute = runs.one_result_set(NOTEBOOK, _compute, figures)
