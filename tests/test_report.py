"""results/summary.md: numbers read from the tables they link to; presets that have not run show a dash."""

from pathlib import Path

import pandas as pd

from cfmoe.present import readme as readme_blocks
from cfmoe.present import report
from cfmoe.stages import fine_tuning

ROOT = Path(__file__).resolve().parent.parent


def write(root, notebook, name, rows):
    path = root / notebook / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)


def test_summary_cells_come_from_the_linked_tables(tmp_path):
    rows = [{"run": "base", "seed": 0, "test_ecr": 0.1, "test_ppl": 99.0, "trainable_params": 0, "train_seconds": 0.0}]
    for seed, (c, f, d) in enumerate([(0.2, 0.3, 0.25), (0.22, 0.3, 0.26), (0.18, 0.3, 0.24)]):
        rows += [{"run": "lora_control", "seed": seed, "test_ecr": c, "test_ppl": 100.0, "trainable_params": 100,
                  "train_seconds": 10.0},
                 {"run": "cfmoe", "seed": seed, "test_ecr": f, "test_ppl": 101.0, "trainable_params": 100,
                  "train_seconds": 10.0},
                 {"run": "cfmoe_daft", "seed": seed, "test_ecr": d, "test_ppl": 100.5, "trainable_params": 40,
                  "train_seconds": 6.0}]
    write(tmp_path, "02_fine_tuning", "runs", fine_tuning.with_changes(pd.DataFrame(rows), 0.1).to_dict("records"))
    text = report.build(tmp_path)
    row = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    fine = row[report.ROWS["ecr_test"]]
    # per-seed gains +50%, +36.4%, +66.7%: mean and Student-t interval over 3 seeds; the interval clears +35%?
    assert "[0.200 → 0.300: +51.0% [+13.3%, +88.7%], Δ +0.100 [+0.050, +0.150]; ECR/(k/E) 2.00 → 3.00 (base 1.00); " \
           "3 seeds: not met (interval straddles the target)](02_fine_tuning/runs.csv)" in fine, fine
    assert fine.endswith("| — |")
    assert "[40% [40%, 40%] of the parameters, 60% [60%, 60%] of the time, 50% [50%, 50%] of the ECR gain](02_fine_tuning/runs.csv)" in text
    assert "ECR of generated text" in text and text.count("| — |") >= 6  # 04 and the gpu preset have not run


def test_memory_and_generated_ecr_rows_show_the_control_baseline_interval_and_n(tmp_path):
    from test_ecr_gains import frames

    from cfmoe.stages import ecr_wikitext

    write(tmp_path, "03_cache_management", "memory_at_equal_throughput", [
        {"seed": seed, "device": device, "policy": policy, "cached_share": share, "memory_base_gb": 10.0,
         "memory_cfmoe_gb": 10.0 * (1 - saved), "memory_saved": saved}
        for seed, lru in enumerate([0.3, 0.35, 0.4]) for policy, saved in (("lru", lru), ("lopt", 0.5))
        for device in ("cpu", "npu") for share in (0.25, 0.5)])
    write(tmp_path, "03_cache_management", "requests", [
        {"run": run, "seed": seed, "decode_ecr": ecr, "decode_ecr_over_k_e": ecr / 0.1}
        for seed in range(3) for run, ecr in (("lora_control", 0.2), ("cfmoe", 0.4))])
    write(tmp_path, "03_cache_management", "memory_saved_combinations", [
        {"source": "served requests", "baseline": "lora_control lru/unified", "model": "cfmoe", "policy": policy,
         "mean_memory_saved": saved} for policy, saved in (("lru/unified", 0.3), ("lopt/unified", 0.45))])
    samples, quality = frames(cfmoe=lambda control, seed, entry: 2 * control)
    summary = ecr_wikitext.summary_table(samples, quality, 0.125)
    write(tmp_path, "04_ecr_wikitext", "summary", summary.to_dict("records"))
    write(tmp_path, "04_ecr_wikitext", "paper_comparison",
          ecr_wikitext.comparison_table(summary, 0.125, "ours").to_dict("records"))
    text = report.build(tmp_path)
    row = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    # seeds save 30%, 35%, 40% under LRU: mean and Student-t interval over 3 seeds; the oracle beside, not a headline
    assert "[LRU vs LRU: −35.0% [−47.4%, −22.6%], 3.50 of the control's 10.00 GB; ECR/(k/E) control 2.00 → CFMoE " \
           "4.00; 3 seed(s) (not headlines: LOPT, oracle (knows future routing) −50.0% [−50.0%, −50.0%])]" \
           "(03_cache_management/memory_at_equal_throughput.csv)" in row[report.ROWS["memory"]]
    assert "not a headline" in report.ROWS["memory_best"] and "best of N" in report.ROWS["memory_best"]
    assert "[best of 2, not a headline: −45.0% (cfmoe LOPT, oracle (knows future routing) / unified vs control " \
           "LRU / unified)](03_cache_management/memory_saved_combinations.csv)" in row[report.ROWS["memory_best"]]
    generated = row[report.ROWS["ecr_generated"]]
    h = ecr_wikitext.headline(summary)
    assert f"[control {h['control_ecr'][0]:.3f} → CFMoE {h['cfmoe_ecr'][0]:.3f}: +100.0% [+100.0%, +100.0%], Δ " \
           f"+{h['delta_ecr'][0]:.3f}" in generated
    assert f"ECR/(k/E) {h['control_ecr_over_k_e'][0]:.2f} → {h['cfmoe_ecr_over_k_e'][0]:.2f} (the paper's, vs its " \
           f"base model: " in generated
    assert "6 entries × 3 seed(s): met; repeated 4-grams CFMoE 0.0100, DAFT 0.0500, control 0.0100, base 0.0100]" \
           "(04_ecr_wikitext/summary.csv)" in generated


def test_paper_scale_row_gives_each_reached_share_with_its_interval_against_the_papers(tmp_path):
    base = {"baseline": "lora_control", "tier": "host", "policy": "lru", "repeats": 5, "tokens_per_s": 9.0}
    write(tmp_path, "05_serving", "paper_scale/memory_saved", [
        {**base, "share": 0.0625, "memory_baseline_gb": 6.0},  # CFMoE never as slow: no level
        {**base, "share": 0.25, "memory_baseline_gb": 12.0, "memory_saved": 0.2, "saved_mb": 2400.0,
         "memory_saved_low": 0.1, "memory_saved_high": 0.3},
        {**base, "share": 0.5, "memory_baseline_gb": 20.0, "memory_saved": 0.4, "saved_mb": 8000.0,
         "memory_saved_low": 0.3, "memory_saved_high": 0.45},
        {**base, "policy": "lfu", "share": 0.25, "memory_baseline_gb": 12.0, "memory_saved": 0.9, "saved_mb": 1.0,
         "memory_saved_low": 0.9, "memory_saved_high": 0.9}])  # another policy: not this row
    text = report.build(tmp_path)
    row = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    cell = row[report.ROWS["engine_paper_scale"]]
    assert "[CFMoE vs control at the control's tokens/s with 25% cached: −20.0% [−30.0%, −10.0%] (2.40 of 12.00 GB, " \
           "below the paper's); 50% cached: −40.0% [−45.0%, −30.0%] (8.00 of 20.00 GB, covers the paper's); medians " \
           "of 5 repeats](05_serving/paper_scale/memory_saved.csv)" in cell, cell
    assert "6%" not in cell and "−90.0%" not in cell and cell.endswith("| — |")
    write(tmp_path, "05_serving", "paper_scale/machine_host",
          [{"device": "NVIDIA H100 80GB HBM3", "engine_experts_implementation": "batched_mm"}])
    text = report.build(tmp_path)
    cell = [line for line in text.splitlines() if line.startswith(f"| {report.ROWS['engine_paper_scale']}")][0]
    assert "medians of 5 repeats; measured on NVIDIA H100 80GB HBM3, the engine on batched_mm](05_serving/paper_scale/" in cell


def test_committed_summary_matches_the_committed_tables():
    assert (ROOT / "results" / "summary.md").read_text() == report.build(ROOT / "results")


def test_readme_shows_the_current_table():
    readme = (ROOT / "README.md").read_text()
    assert readme == report.with_readme_table(readme, ROOT / "results")
    assert readme == readme_blocks.update(readme, ROOT / "results")  # the models table and the chain's times
    assert "[0.2" in readme.split(report.README_START)[1] and "](results/02_fine_tuning/runs.csv)" in readme


def test_readme_prose_quotes_no_measured_percentage_or_ratio():
    """Measured numbers live in the generated blocks; hand-written text may not carry a % or × figure."""
    import re

    prose = readme_blocks.outside_blocks((ROOT / "README.md").read_text())
    assert not re.findall(r"\d(?:[.,]\d+)?\s?[%×]", prose)


def test_chain_times_keep_one_row_per_notebook(tmp_path, monkeypatch):
    from cfmoe.present import notebooks

    monkeypatch.setenv("CFMOE_RESULTS", str(tmp_path))
    notebooks.record_time("cpu", "01_b", 5)
    notebooks.record_time("cpu", "00_a", 7)
    path = notebooks.record_time("cpu", "01_b", 9)
    table = pd.read_csv(path)
    assert list(table.notebook) == ["00_a", "01_b"] and list(table.seconds) == [7.0, 9.0]
    assert path == tmp_path / "chain" / "cpu.csv"


def test_published_notebooks_keep_outputs_and_drop_this_machines_paths(tmp_path):
    import json

    from cfmoe.config import ROOT as REPO
    from cfmoe.present import notebooks

    nb = {"cells": [{"cell_type": "code", "metadata": {"papermill": {"duration": 1.0}}, "source": ["x"],
                     "outputs": [{"output_type": "stream", "name": "stdout", "text": [f"saved to {REPO}/results/a.csv"]}]}],
          "metadata": {"papermill": {"input_path": f"{REPO}/notebooks/00_a.ipynb"}}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "00_a.ipynb").write_text(json.dumps(nb))
    out, = notebooks.publish(tmp_path / "in", tmp_path / "out")
    text = out.read_text()
    assert str(REPO) not in text and "saved to ./results/a.csv" in text and "papermill" not in text
