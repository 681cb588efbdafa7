"""results/summary.md: numbers read from the tables they link to; presets that have not run show a dash."""

from pathlib import Path

import pandas as pd

from cfmoe.present import report

ROOT = Path(__file__).resolve().parent.parent


def write(root, notebook, name, rows):
    path = root / notebook / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)


def test_summary_cells_come_from_the_linked_tables(tmp_path):
    write(tmp_path, "02_fine_tuning", "runs", [
        {"run": "lora_control", "test_ecr": 0.2, "test_ppl": 100.0, "trainable_params": 100, "train_seconds": 10.0,
         "ecr_vs_control": 0.0, "ppl_vs_control": 0.0},
        {"run": "cfmoe", "test_ecr": 0.3, "test_ppl": 101.0, "trainable_params": 100, "train_seconds": 10.0,
         "ecr_vs_control": 0.5, "ppl_vs_control": 0.01},
        {"run": "cfmoe_daft", "test_ecr": 0.25, "test_ppl": 100.5, "trainable_params": 40, "train_seconds": 6.0,
         "ecr_vs_control": 0.25, "ppl_vs_control": 0.005}])
    write(tmp_path, "03_cache_management", "memory_at_equal_throughput", [
        {"device": "cpu", "policy": "lru", "memory_saved": 0.2}, {"device": "cpu", "policy": "lopt", "memory_saved": 0.4}])
    text = report.build(tmp_path)
    row = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    fine = row["ECR gain, WikiText-2 test (teacher-forced), CFMoE vs LoRA control"]
    assert "[0.200 → 0.300 (+50.0%)](02_fine_tuning/runs.csv)" in fine and fine.endswith("| — |")
    assert "[40% of the parameters, 60% of the time, 50% of the ECR gain](02_fine_tuning/runs.csv)" in text
    assert "[−30.0% (LRU −20.0%, LOPT −40.0%)](03_cache_management/memory_at_equal_throughput.csv)" in text
    assert "ECR of generated text" in text and text.count("| — |") >= 6  # 04 and the gpu preset have not run


def test_committed_summary_matches_the_committed_tables():
    assert (ROOT / "results" / "summary.md").read_text() == report.build(ROOT / "results")


def test_readme_shows_the_current_table():
    readme = (ROOT / "README.md").read_text()
    assert readme == report.with_readme_table(readme, ROOT / "results")
    assert "[0.2" in readme.split(report.README_START)[1] and "](results/02_fine_tuning/runs.csv)" in readme
