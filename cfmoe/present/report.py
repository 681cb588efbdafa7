"""The study's headline numbers next to the paper's claims: `results/summary.md`, generated from the tables.

    python -m cfmoe.present.report    # after run_all.sh; reads results/ (cpu) and results/*/gpu/ when present

Every number is read from a committed table and links to it; a preset whose notebook has not run shows "—".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from .. import claims
from ..cli import user_errors
from ..config import ROOT, results_root, results_subdir
from ..provenance import sidecar, write_json_atomic, write_text_atomic
from ..stages import fine_tuning
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


README_START, README_END = "<!-- summary:start -->", "<!-- summary:end -->"


def headline(root: Path, preset: str) -> dict[str, str]:
    """The preset's cell of every headline row, as linked markdown."""
    cells = dict.fromkeys(PAPER, "—")
    runs, path = _table(root, "02_fine_tuning", preset, "runs")
    if runs is not None:
        h = fine_tuning.headline(runs)
        cells["ecr_test"] = _link(f"{h['control_ecr']:.3f} → {h['cfmoe_ecr']:.3f} ({h['ecr_gain']:+.1%})", path)
        cells["ppl"] = _link(f"{h['ppl_cost']:+.2%} (DAFT {h['daft_ppl_cost']:+.2%})", path)
        cells["daft"] = _link(f"{h['daft_params']:.0%} of the parameters, {h['daft_time']:.0%} of the time, "
                              f"{h['daft_gain']:.0%} of the ECR gain", path)
    comparison, path = _table(root, "04_ecr_wikitext", preset, "paper_comparison")
    if comparison is not None:
        ours = comparison.iloc[-1]
        cells["ecr_generated"] = _link(f"{ours.ecr_baseline:.3f} → {ours.ecr_cfmoe:.3f} ({ours.gain:+.1%}), "
                                       f"{int(ours.samples)} samples, k/E {ours.k_over_e:.3f}", path)
    saved, path = _table(root, "03_cache_management", preset, "memory_at_equal_throughput")
    if saved is not None:
        per_policy = saved.groupby("policy", sort=False).memory_saved.mean()
        cells["memory"] = _link(f"{_less(saved.memory_saved.mean())} (LRU {_less(per_policy.get('lru', float('nan')))}, "
                                f"LOPT {_less(per_policy.get('lopt', float('nan')))})", path)
    combos, path = _table(root, "03_cache_management", preset, "memory_saved_combinations")
    if combos is not None:
        served = combos[(combos.source == "served requests") & (combos.model == "cfmoe")]
        best = served.loc[served.mean_memory_saved.idxmax()]
        cells["memory_best"] = _link(f"{_less(best.mean_memory_saved)} ({best.model} {best.policy} vs control "
                                     f"{best.baseline.split()[-1]})", path)
    serving, path = _table(root, "03_cache_management", preset, "serving_modes")
    if serving is not None:
        wide = serving[serving.batch == serving.batch.max()]
        by = wide.pivot_table(index=["run", "policy", "capacity"], columns="mode", values="decode_hit_rate")
        dis, warm = by.disaggregated - by.unified, by.disaggregated_warm - by.unified
        cells["serving"] = _link(f"batch {int(wide.batch.max())}: disaggregated {dis.mean():+.4f}, "
                                 f"warm {warm.mean():+.4f} decode hit rate vs unified (means)", path)
    measured, path = _table(root, "05_serving", preset, "memory_saved")
    if measured is not None:
        defined = measured.dropna(subset=["memory_saved"])
        if defined.empty:
            cells["engine_memory"] = _link(f"no level reached by both models at any of {len(measured)} points: "
                                           "tokens/s does not follow the budget on this tier", path)
        else:
            tiers = ", ".join(f"{tier} {_less(value)}" for tier, value in defined.groupby("tier").memory_saved.mean().items())
            predicted = defined.predicted_memory_saved.dropna()
            model = f"cost model at the measured hit rates {_less(predicted.mean())}" if len(predicted) else \
                "the cost model reaches none of these levels"
            cells["engine_memory"] = _link(f"{_less(defined.memory_saved.mean())} ({tiers}; {len(defined)} of {len(measured)} "
                                           f"levels reached); {model}", path)
    prediction, path = _table(root, "05_serving", preset, "prediction")
    if prediction is not None:
        errors = engine_stage.prediction_errors(prediction)
        ours, authors = errors.loc["calibrated"], errors.loc["authors_model"]
        cells["engine_model"] = _link(f"corrected model: median absolute error {ours.median_abs_error:.1%}, within "
                                      f"±{claims.COST_MODEL_ERROR.bound:.0%} at {ours.within_target:.0%} of "
                                      f"{int(ours.runs)} runs; the authors' model {authors.median_error:+.0%} (median)", path)
    engine, path = _table(root, "05_serving", preset, "measurements")
    if engine is not None:
        ratios = engine_stage.mode_ratios(engine)
        tiers = ", ".join(ratios.index.get_level_values("tier").unique())
        cells["engine_modes"] = _link(f"{tiers} tier: disaggregated / unified median "
                                      f"{ratios.disaggregated.median():.2f}×, warm {ratios.disaggregated_warm.median():.2f}×; "
                                      f"all runs token-identical: {bool(engine.identical.all())}", path)
        speedup = engine_stage.prefetch_speedups(engine)
        if len(speedup):
            fetched = engine[engine["mode"] == "disaggregated+prefetch"]
            cells["prefetch"] = _link(f"{speedup.median():.2f}× plain disaggregated (median, {len(speedup)} points); "
                                      f"next-layer guesses right {fetched.prefetch_used.sum() / fetched.prefetched.sum():.0%}", path)
    return cells


ROWS = {
    "ecr_test": "ECR gain, WikiText-2 test (teacher-forced), CFMoE vs LoRA control",
    "ecr_generated": "ECR of generated text (authors' WikiText protocol), base → CFMoE",
    "ppl": "Test perplexity, CFMoE vs LoRA control",
    "memory": "Memory saved at equal decode throughput (same policy, paper scale)",
    "memory_best": "Memory saved, best served combination vs control under LRU",
    "daft": "DAFT vs CFMoE on all layers",
    "serving": "Decode hit rate, disaggregated prefill vs unified",
    "engine_memory": "Measured memory saved at equal decode tokens/s (offloading engine, CFMoE vs base)",
    "engine_modes": "Measured decode tokens/s, disaggregated vs unified prefill (engine, LRU)",
    "engine_model": "Cost model vs measured decode tokens/s (engine)",
    "prefetch": "Next-layer expert prefetch, measured decode tokens/s (engine, LRU)",
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
             "trained here); `gpu` is the larger preset run on one H200. "
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
        write_text_atomic(readme, with_readme_table(readme.read_text(), root))
    print(text)


if __name__ == "__main__":
    main()
