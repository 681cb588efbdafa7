"""The study's headline numbers next to the paper's claims: `results/summary.md`, generated from the tables.

    python -m cfmoe.present.report    # after run_all.sh; reads results/ (cpu) and results/*/gpu/ when present

Every number is read from a committed table and links to it; a preset whose notebook has not run shows "—".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from .. import claims, stats
from ..cli import user_errors
from ..config import ROOT, results_root, results_subdir
from ..provenance import sidecar, write_json_atomic, write_text_atomic
from . import readme as readme_blocks
from ..stages import cache_management, ecr_wikitext, fine_tuning
from ..stages import serving as engine_stage

PRESETS = ("cpu", "gpu")
PAPER = claims.paper_text()


def _table(root: Path, notebook: str, preset: str, name: str) -> tuple[pd.DataFrame | None, str]:
    """A stage's CSV for a preset and its path relative to the results root (None when it has not run)."""
    relative = results_subdir(notebook, preset) / f"{name}.csv"
    path = root / relative
    return (pd.read_csv(path) if path.is_file() else None), relative.as_posix()


def _link(text: str, path: str) -> str:
    return f"[{text}]({path})"


def _less(saved: float) -> str:
    """A memory saving as a change of memory: 0.41 -> '−41.0%', -0.05 -> '+5.0%'."""
    return f"−{saved:.1%}" if saved >= 0 else f"+{-saved:.1%}"


def _state(target: claims.Target, value: tuple[float, float, float]) -> str:
    """'met' only when the whole interval clears the target; else 'missed' or 'not met (straddles)'."""
    state = target.state(*value[1:])
    return {"no interval": "no interval (one seed)", "straddles": "not met (interval straddles the target)"}.get(state, state)


def _repeats(measurements: pd.DataFrame) -> int:
    """The fewest timed repeats of any setting in notebook 05's measurements (1 for a table of single runs)."""
    if "repeat" not in measurements:
        return 1
    return int(measurements.groupby(engine_stage.SETTING, dropna=False).size().min())


def _engine_saving(row) -> str:
    """A memory_saved_summary row as '−25.2% [−31.0%, −18.1%] (3.10 of 12.40 MB)': the change of memory, its 95%
    bootstrap interval and the megabytes saved of the baseline's."""
    interval = "" if pd.isna(row.memory_saved_low) else \
        f" [{_less(row.memory_saved_high)}, {_less(row.memory_saved_low)}]"
    return f"{_less(row.memory_saved)}{interval} ({row.saved_mb:.2f} of {row.memory_baseline_mb:.2f} MB)"


def _engine_memory(summary: pd.DataFrame, saved: pd.DataFrame | None, repeats: int) -> str:
    """Notebook 05's memory saved: CFMoE vs the LoRA control over all tiers and per tier, vs base beside it, and
    the cost model's saving at the measured hit rates."""
    def scope(baseline):
        rows = summary[summary.baseline == baseline]
        whole = rows[rows.tier == "all"]
        return (whole if len(whole) else rows).iloc[0] if len(rows) else None, rows[rows.tier != "all"]

    control, tiers = scope(engine_stage.BASELINE)
    if control is None or not control.reached:
        levels = 0 if control is None else int(control.levels)
        return f"no level reached by CFMoE and the control at any of {levels} points"
    per_tier = ", ".join(f"{engine_stage.tier_label(r.tier)} {_less(r.memory_saved)} ({r.saved_mb:.2f} MB)"
                         for r in tiers.itertuples() if r.reached)
    text = (f"vs control {_engine_saving(control)}" + (f" ({per_tier})" if len(tiers) > 1 else "")
            + f"; {int(control.reached)} of {int(control.levels)} levels reached, medians of {repeats} repeats")
    base, _ = scope(engine_stage.BESIDE)
    if base is not None:
        text += f"; vs base {_engine_saving(base)}" if base.reached else "; vs base: no level reached"
    if saved is not None and "predicted_memory_saved" in saved:
        rows = saved[saved.baseline == engine_stage.BASELINE].dropna(subset=["memory_saved", "predicted_memory_saved"])
        text += (f"; cost model at the measured hit rates {_less(rows.predicted_memory_saved.mean())} "
                 f"({rows.predicted_saved_mb.mean():.2f} MB)" if len(rows)
                 else "; the cost model reaches none of these levels")
    return text


def _paper_scale_memory(saved: pd.DataFrame, machine: pd.DataFrame | None = None) -> str:
    """The engine's memory saved at the paper's size (host tier, LRU): at each share where CFMoE reaches the
    control's tokens/s, with its bootstrap interval over repeats, against the paper's 35.7%; the card and the
    engine's experts implementation from the host grid's machine table."""
    rows = saved[(saved.tier == "host") & (saved.policy == "lru") & (saved.baseline == engine_stage.BASELINE)]
    if "headline" in rows:  # the engine on its own default experts implementation (`paper_scale_results`)
        rows = rows[rows.headline.astype(bool)]
    reached = rows.dropna(subset=["memory_saved"])
    if reached.empty:
        return f"no share of {len(rows)} at which CFMoE's tokens/s meets the control's"
    def against_paper(r):  # where the interval lies against the paper's figure
        paper = claims.PAPER_MEMORY_SAVED
        return ("below the paper's" if r.memory_saved_high < paper else
                "above the paper's" if r.memory_saved_low > paper else "covers the paper's")

    shares = "; ".join(f"{r.share:.0%} cached: {_less(r.memory_saved)} [{_less(r.memory_saved_high)}, "
                       f"{_less(r.memory_saved_low)}] ({r.saved_mb / 1e3:.2f} of {r.memory_baseline_gb:.2f} GB, "
                       f"{against_paper(r)})" for r in reached.itertuples())
    where = ""
    if machine is not None and len(machine):
        m = machine.iloc[0]
        kernel = m.get("engine_experts_implementation")
        where = f"; measured on {m.device}" + (f", the engine on {kernel}" if isinstance(kernel, str) else "")
    return (f"CFMoE vs control at the control's tokens/s with {shares}; medians of {int(reached.repeats.min())} "
            f"repeats{where}")


README_START, README_END = "<!-- summary:start -->", "<!-- summary:end -->"


def headline(root: Path, preset: str) -> dict[str, str]:
    """The preset's cell of every headline row, as linked markdown."""
    cells = dict.fromkeys(PAPER, "—")
    runs, path = _table(root, "02_fine_tuning", preset, "runs")
    if runs is not None:
        h = fine_tuning.headline(runs)
        n = runs.seed.nunique() if "seed" in runs else 1
        cells["ecr_test"] = _link(
            f"{h['control_ecr'][0]:.3f} → {h['cfmoe_ecr'][0]:.3f}: {stats.format_interval(h['ecr_gain'], '+.1%')}, Δ {stats.format_interval(h['delta_ecr'], '+.3f')}; "
            f"ECR/(k/E) {h['control_ecr_over_k_e'][0]:.2f} → {h['cfmoe_ecr_over_k_e'][0]:.2f} (base "
            f"{h['base_ecr_over_k_e'][0]:.2f}); {n} seeds: {_state(claims.ECR_GAIN, h['ecr_gain'])}", path)
        cells["ppl"] = _link(f"{stats.format_interval(h['ppl_cost'], '+.2%')}: {_state(claims.PPL_COST, h['ppl_cost'])} "
                             f"(DAFT {stats.format_interval(h['daft_ppl_cost'], '+.2%')})", path)
        cells["daft"] = _link(f"{stats.format_interval(h['daft_params'], '.0%')} of the parameters, {stats.format_interval(h['daft_time'], '.0%')} of the "
                              f"time, {stats.format_interval(h['daft_gain'], '.0%')} of the ECR gain", path)
    summary, path = _table(root, "04_ecr_wikitext", preset, "summary")
    comparison, _ = _table(root, "04_ecr_wikitext", preset, "paper_comparison")
    if summary is not None and comparison is not None:
        k_over_e = float(comparison.k_over_e.iloc[-1])
        if "ecr_vs_control_low" not in summary:  # a table from before seeds and intervals: from its samples
            samples, path = _table(root, "04_ecr_wikitext", preset, "samples")
            summary = ecr_wikitext.summary_table(samples, _table(root, "04_ecr_wikitext", preset,
                                                                 "article_perplexity")[0], k_over_e)
        g = ecr_wikitext.headline(summary)
        sampled = summary[summary.decoding == "sampled"].set_index("run")
        paper = ecr_wikitext.PAPER
        repeats = ", ".join(f"{name} {g[f'{key}_repeated_4grams'][0]:.4f}" for name, key in
                            (("CFMoE", "cfmoe"), ("DAFT", "daft"), ("control", "control"), ("base", "base")))
        cells["ecr_generated"] = _link(
            f"control {g['control_ecr'][0]:.3f} → CFMoE {g['cfmoe_ecr'][0]:.3f}: {stats.format_interval(g['ecr_gain'], '+.1%')}, "
            f"Δ {stats.format_interval(g['delta_ecr'], '+.3f')}; ECR/(k/E) {g['control_ecr_over_k_e'][0]:.2f} → "
            f"{g['cfmoe_ecr_over_k_e'][0]:.2f} (the paper's, vs its base model: "
            f"{paper['ecr_baseline'] / paper['k_over_e']:.2f} → {paper['ecr_cfmoe'] / paper['k_over_e']:.2f}); base "
            f"{g['base_ecr'][0]:.3f} (ECR/(k/E) {g['base_ecr_over_k_e'][0]:.2f}) beside: CFMoE vs base "
            f"{stats.format_interval(g['gain_vs_base'], '+.1%')}, Δ {stats.format_interval(g['delta_vs_base'], '+.3f')}; "
            f"{int(sampled.loc['base', 'samples'])} entries × {int(sampled.loc['cfmoe', 'seeds'])} seed(s): "
            f"{_state(claims.GENERATED_ECR_GAIN, g['ecr_gain'])}; repeated 4-grams {repeats}", path)
    saved, path = _table(root, "03_cache_management", preset, "memory_at_equal_throughput")
    requests, _ = _table(root, "03_cache_management", preset, "requests")
    if saved is not None and requests is not None:
        def less(value):  # saving as memory change: (0.3, 0.2, 0.4) -> −30.0% [−40.0%, −20.0%]
            return _less(value[0]) if pd.isna(value[1]) else f"{_less(value[0])} [{_less(value[2])}, {_less(value[1])}]"

        m = cache_management.memory_headline(saved, requests)
        ecr = (f"; ECR/(k/E) control {m['control_ecr_over_k_e'][0]:.2f} → CFMoE {m['cfmoe_ecr_over_k_e'][0]:.2f}"
               if pd.notna(m["cfmoe_ecr_over_k_e"][0]) else "")
        oracles = "; ".join(f"{cache_management.policy_label(p)} {less(v)}" for p, v in m["per_policy"].items()
                            if p in cache_management.ORACLE_POLICIES)
        cells["memory"] = _link(f"{m['label']} vs {m['label']}: {less(m['headline'])}, {m['saved_gb'][0]:.2f} of the "
                                f"control's {m['control_gb'][0]:.2f} GB{ecr}; {m['seeds']} seed(s) (not headlines: "
                                f"{oracles})", path)
    combos, path = _table(root, "03_cache_management", preset, "memory_saved_combinations")
    if combos is not None:
        best, n = cache_management.best_of(combos)
        cells["memory_best"] = _link(f"best of {n}, not a headline: {_less(best.mean_memory_saved)} ({best.model} "
                                     f"{cache_management.policy_label(best.policy)} vs control "
                                     f"{cache_management.policy_label(best.baseline.split()[-1])})", path)
    serving, path = _table(root, "03_cache_management", preset, "serving_modes")
    if serving is not None:
        wide = serving[serving.batch == serving.batch.max()]
        by = wide.pivot_table(index=["run", "policy", "capacity"], columns="mode", values="decode_hit_rate")
        dis, warm = by.disaggregated - by.unified, by.disaggregated_warm - by.unified
        cells["serving"] = _link(f"batch {int(wide.batch.max())}: disaggregated {dis.mean():+.4f}, "
                                 f"warm {warm.mean():+.4f} decode hit rate vs unified (means)", path)
    engine, measurements_path = _table(root, "05_serving", preset, "measurements")
    repeats = _repeats(engine) if engine is not None else 0
    summary, path = _table(root, "05_serving", preset, "memory_saved_summary")
    measured, saved_path = _table(root, "05_serving", preset, "memory_saved")
    if summary is not None:
        cells["engine_memory"] = _link(_engine_memory(summary, measured, repeats), path)
    elif measured is not None:  # a table of single runs, from before repeats: CFMoE vs base
        defined = measured.dropna(subset=["memory_saved"])
        if defined.empty:
            cells["engine_memory"] = _link(f"no level reached by both models at any of {len(measured)} points: "
                                           "tokens/s does not follow the budget on this tier", saved_path)
        else:
            tiers = ", ".join(f"{engine_stage.tier_label(tier)} {_less(value)}"
                              for tier, value in defined.groupby("tier").memory_saved.mean().items())
            predicted = defined.predicted_memory_saved.dropna()
            model = f"cost model at the measured hit rates {_less(predicted.mean())}" if len(predicted) else \
                "the cost model reaches none of these levels"
            cells["engine_memory"] = _link(f"vs base, single runs: {_less(defined.memory_saved.mean())} ({tiers}; "
                                           f"{len(defined)} of {len(measured)} levels reached); {model}", saved_path)
    runs_text = f"medians of {repeats} repeats" if repeats > 1 else "single runs"
    prediction, path = _table(root, "05_serving", preset, "prediction")
    if prediction is not None:
        errors = engine_stage.prediction_errors(prediction)
        ours, authors = errors.loc["calibrated"], errors.loc["authors_model"]
        cells["engine_model"] = _link(f"corrected model: median absolute error {ours.median_abs_error:.1%}, within "
                                      f"±{claims.COST_MODEL_ERROR.bound:.0%} at {ours.within_target:.0%} "
                                      f"({round(ours.within_target * ours.settings)} of {int(ours.settings)} settings, "
                                      f"{runs_text}); the authors' model "
                                      f"{authors.median_error:+.0%} (median)", path)
    ratios = engine_stage.mode_ratios(engine) if engine is not None else None
    if ratios is not None and len(ratios):
        tiers = ", ".join(engine_stage.tier_label(t) for t in ratios.index.get_level_values("tier").unique())
        cells["engine_modes"] = _link(f"{tiers} tier: disaggregated / unified median "
                                      f"{ratios.disaggregated.median():.2f}×, warm {ratios.disaggregated_warm.median():.2f}× "
                                      f"({runs_text}); all runs token-identical: {bool(engine.identical.all())}",
                                      measurements_path)
    if engine is not None:
        speedup = engine_stage.prefetch_speedups(engine)
        if len(speedup):
            fetched = engine[engine["mode"] == "disaggregated+prefetch"]
            used, guessed = fetched.prefetch_used.sum(), fetched.prefetched.sum()
            cells["prefetch"] = _link(f"{speedup.median():.2f}× plain disaggregated (median, {len(speedup)} points, "
                                      f"{runs_text}); next-layer guesses right {used / guessed:.0%} "
                                      f"({int(used):,} of {int(guessed):,} prefetched experts used)", measurements_path)
    scaled, path = _table(root, "05_serving", preset, f"{engine_stage.PAPER_SCALE}/memory_saved")
    if scaled is not None:
        machine, _ = _table(root, "05_serving", preset, f"{engine_stage.PAPER_SCALE}/machine_host")
        cells["engine_paper_scale"] = _link(_paper_scale_memory(scaled, machine), path)
    beyond, path = _table(root, "06_beyond_cfmoe", preset, "methods_summary")
    if beyond is not None:
        at = beyond[(beyond.cache_share == 0.25) & (beyond.policy == "lru")].set_index("method")

        def point(method):
            row = at.loc[method]
            cut, cost = [(row[c], row[f"{c}_low"], row[f"{c}_high"]) for c in ("misses_vs_control", "ppl_vs_control")]
            return (f"{method}: {row.decode_misses_per_token:.2f} vs {at.loc['control', 'decode_misses_per_token']:.2f} "
                    f"misses/token, {stats.format_interval(cut, '+.1%')}; perplexity "
                    f"{stats.format_interval(cost, '+.2%')}"), cut, cost

        best = at.index[at.best_stack].unique()[0] if "best_stack" in at else "cfmoe+cache_prior"
        text, cut, cost = point(best)
        others = [point(m)[0] for m in ("cfmoe+cache_prior", "cfmoe_light+cache_prior", "cache_prior")
                  if m in at.index and m != best]
        cells["stack"] = _link(f"best, {text} (misses {_state(claims.STACK_MISS_CUT, cut)}, perplexity "
                               f"{_state(claims.STACK_PPL_COST, cost)}); " + "; ".join(others)
                               + f"; {int(at.loc['control', 'n'])} seeds", path)
        cells["remoe"] = _link(f"{point('remoe')[0]}; {point('cfmoe')[0]}", path)
    return cells


ROWS = {
    "ecr_test": "ECR gain, WikiText-2 test (teacher-forced), CFMoE vs LoRA control (mean [95% interval] over seeds)",
    "ecr_generated": "ECR of generated text (authors' WikiText protocol), CFMoE vs LoRA control, base beside (mean "
                     "[95% bootstrap interval over entries, paired by seed]; ΔECR; ECR/(k/E))",
    "ppl": "Test perplexity, CFMoE vs LoRA control",
    "memory": "Memory saved at equal decode throughput, CFMoE vs LoRA control under the same policy (paper scale; "
              "mean [95% interval] over seeds; GB saved of the control's; ECR/(k/E) of the requests)",
    "memory_best": "Memory saved, best of N served combinations vs control under LRU (a maximum over N: not a headline)",
    "daft": "DAFT vs CFMoE on all layers",
    "serving": "Decode hit rate, disaggregated prefill vs unified",
    "engine_memory": "Measured memory saved at equal decode tokens/s (offloading engine, CFMoE vs LoRA control, base "
                     "beside; medians of repeats, [95% bootstrap interval])",
    "engine_paper_scale": "Measured memory saved at equal decode tokens/s at the paper's size (a random-weight "
                          "DeepSeek-MoE-16B-sized model replaying the study's routing, experts in pinned host memory, "
                          "LRU, on a GPU; [95% bootstrap interval over repeats])",
    "engine_modes": "Measured decode tokens/s, disaggregated vs unified prefill (engine, LRU)",
    "engine_model": "Cost model vs measured decode tokens/s (engine)",
    "prefetch": "Next-layer expert prefetch, measured decode tokens/s (engine, LRU)",
    "stack": "Best stack, CFMoE + cache prior (stack and λ chosen on validation; light: CFMoE at half the goal's "
             "perplexity budget), vs LoRA control: decode misses per token, 25% of experts cached, LRU (test, mean "
             "[95% interval] over seeds; the other stack and cache prior alone beside)",
    "remoe": "ReMoE's recipe (routers only + Trust-KL anchor) and CFMoE, each vs LoRA control: decode misses per "
             "token, 25% cached, LRU (test, mean [95% interval] over seeds)",
}


def table(root: Path, prefix: str = "") -> list[str]:
    """The headline table's markdown lines; links get `prefix` (e.g. "results/" from the README)."""
    cells = {preset: headline(root, preset) for preset in PRESETS}
    lines = ["| claim | paper (DeepSeek-MoE-16B) | cpu | gpu |", "| --- | --- | --- | --- |"]
    lines += [f"| {label} | {PAPER[key]} | {cells['cpu'][key]} | {cells['gpu'][key]} |" for key, label in ROWS.items()]
    return [line.replace("](", "](" + prefix) for line in lines]


def build(root: Path | None = None) -> str:
    """The summary's markdown."""
    root = root or results_root()
    lines = ["# cfmoe: headline numbers", "",
             "Generated by `python -m cfmoe.present.report` at the end of `run_all.sh`, from the tables each number links to. "
             "`cpu` is the default study (a 15.9M-parameter Qwen2-MoE with DeepSeek-MoE-16B's routing geometry, "
             "trained here); `gpu` is the larger preset run on one H100 (its sidecars name the machine). "
             "Memory figures use the authors' cost model at DeepSeek-MoE-16B's 4.5-bit sizes.", "", *table(root)]
    return "\n".join(lines) + "\n"


def with_readme_table(readme: str, root: Path) -> str:
    """`readme` with the headline table between its summary markers replaced by the current one."""
    if readme.count(README_START) != 1 or readme.count(README_END) != 1:
        raise ValueError(f"README.md must hold {README_START} and {README_END} once each")
    head, rest = readme.split(README_START)
    _, tail = rest.split(README_END)
    return "\n".join([head + README_START, *table(root, "results/"), README_END + tail])


@user_errors("python -m cfmoe.present.report")
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    root = results_root()
    text = build(root)
    summary = root / "summary.md"
    if not summary.is_file() or summary.read_text() != text:  # unchanged tables: leave both files alone
        write_text_atomic(summary, text)
        write_json_atomic(root / "summary.json", sidecar(artifact="summary.md", presets=list(PRESETS)))
    readme = ROOT / "README.md"
    if root == ROOT / "results" and readme.is_file():  # the README shows the committed study's table
        write_text_atomic(readme, readme_blocks.update(with_readme_table(readme.read_text(), root), root))
    print(text)


if __name__ == "__main__":
    main()
