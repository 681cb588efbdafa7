import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cfmoe.present.notebooks import failed_cell

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("args, message", [
    (["--preset", "laptop"], "unknown preset 'laptop'; valid presets are smoke, cpu, gpu or a .yaml file"),
    (["--preset", "missing.yaml"], "preset file 'missing.yaml' does not exist"),
    (["--fast"], "unknown argument '--fast'; valid: --preset NAME, --model PATH, --force"),
])
def test_run_all_rejects_bad_arguments_before_doing_anything(args, message):
    proc = subprocess.run([str(ROOT / "run_all.sh"), *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and message in proc.stderr


def test_failed_cell_names_the_cell_papermill_marked(tmp_path):
    nb = {"cells": [
        {"cell_type": "code", "source": ["x = 1\n"], "metadata": {"papermill": {"status": "completed"}}},
        {"cell_type": "code", "source": ["results = base_model.compute(cfg)\n", "more\n"],
         "metadata": {"papermill": {"exception": True, "status": "failed"}}},
    ]}
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    assert failed_cell(path) == "cell 2: results = base_model.compute(cfg)"
    path.write_text(json.dumps({"cells": []}))
    assert failed_cell(path) == "no failed cell recorded"


@pytest.mark.parametrize("study", [False, True])
def test_gpu_speed_times_every_implementation_and_they_agree(tmp_path, study):
    import pandas as pd

    args = ["python", str(ROOT / "scripts" / "gpu_speed.py"), "--preset", "smoke", "--device", "cpu", "--repeats", "2",
            "--steps", "1", "--decode-rows", "2", "--decode-tokens", "3", "--out", str(tmp_path)] + \
        ["--study", "--determinism", "both"] * study
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = pd.read_csv(tmp_path / ("study_steps.csv" if study else "steps.csv"))
    phases = ["decode_prior", "lora", "pretrain", "router_kl"] if study else ["decode", "lora", "pretrain"]
    counts = steps.groupby(["phase", "implementation"] + ["deterministic"] * study).size()
    assert sorted(steps.phase.unique()) == phases and (counts == 2).all()
    if study:  # every setting with torch's deterministic algorithms on and off
        assert steps.groupby(["phase", "implementation"]).deterministic.nunique().eq(2).all()
    assert set(steps[steps.phase == phases[0]].implementation) == {"eager", "batched_mm", "grouped_mm"}
    assert (steps.seconds_per_step if not study else steps.seconds).gt(0).all()
    assert json.loads((tmp_path / ("study_steps.json" if study else "steps.json")).read_text())["device_name"] == "cpu"
    if not study:  # the same function: every implementation's logits within float rounding of eager's
        agreement = pd.read_csv(tmp_path / "agreement.csv").set_index("implementation").max_abs_diff_vs_eager
        assert agreement["eager"] == 0 and agreement.max() < 1e-4


def test_compare_runs_checks_each_claim_against_the_other_runs_interval(tmp_path):
    """Two results folders: a table written by the same run on both sides is not compared; a re-run's mean is
    checked against the first run's interval, both ways."""
    import shutil

    sys.path.insert(0, str(ROOT / "scripts"))
    import compare_runs

    first, second = tmp_path / "first", tmp_path / "second"
    for root in (first, second):
        for notebook, name in (("02_fine_tuning", "runs"), ("04_ecr_wikitext", "summary"),
                               ("04_ecr_wikitext", "paper_comparison")):
            (root / notebook).mkdir(parents=True, exist_ok=True)
            for suffix in (".csv", ".json"):
                shutil.copy(ROOT / "results" / notebook / f"{name}{suffix}", root / notebook / f"{name}{suffix}")
    runs = pd.read_csv(second / "02_fine_tuning" / "runs.csv")
    runs.loc[runs.run == "cfmoe", "ecr_vs_control"] *= 3  # far outside the first run's interval
    runs.to_csv(second / "02_fine_tuning" / "runs.csv", index=False)
    sidecar = json.loads((second / "02_fine_tuning" / "runs.json").read_text())
    (second / "02_fine_tuning" / "runs.json").write_text(json.dumps({**sidecar, "commit": "another"}))
    table = compare_runs.compare(first, second).set_index("claim")
    assert (table.loc[table.index.str.startswith("04"), "status"] == "same run").all()
    gain = table.loc["02 teacher-forced ecr_gain"]
    assert gain.status == "compared" and not gain.second_mean_in_first_interval
    assert table.loc["02 teacher-forced ppl_cost", "second_mean_in_first_interval"]


def test_pretrain_probe_reads_settings_and_tables_the_last_evaluation(tmp_path, monkeypatch):
    """A setting names vocabulary, balance weight, steps and (optionally) the balance horizon; bad ones fail in one
    line; `table` keeps each setting's last evaluation and every evaluation as curves."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import pretrain_probe

    assert pretrain_probe.parse_setting("v8192,aux0.03,600") == dict(vocab=8192, aux=0.03, steps=600, horizon=0,
                                                                     layers=0, hidden=0, bias_rate=0)
    assert pretrain_probe.parse_setting("v4096,aux0.01,1200,h32") == dict(vocab=4096, aux=0.01, steps=1200, horizon=32,
                                                                          layers=0, hidden=0, bias_rate=0)
    assert pretrain_probe.parse_setting("v8192,aux0.03,300,d96,L12") == dict(vocab=8192, aux=0.03, steps=300,
                                                                             horizon=0, layers=12, hidden=96,
                                                                             bias_rate=0)
    assert pretrain_probe.parse_setting("v8192,aux0,300,b0.003")["bias_rate"] == 0.003
    cfg = pretrain_probe._cfg("cpu", pretrain_probe.parse_setting("v4096,aux0.01,300,L12,d96,b0.01"), "cpu")
    assert cfg.pretrain.bias_balance_rate == 0.01
    shape = (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.vocab_size, cfg.pretrain.max_steps)
    assert shape == (12, 96, 4096, 300)
    assert pretrain_probe._cfg("cpu", pretrain_probe.parse_setting("v8192,aux0.03,600"), "cpu").model.num_layers == 6
    for bad in ("v8192,aux0.03", "x8192,aux0.03,600", "v8192,aux0.03,600,32", "v8192,auxy,600",
                "v8192,aux0.03,600,L12,L8", "v8192,aux0.03,600,q3", "v8192,aux0.03,600,L0",
                "v8192,aux0.03,600,b0", "v8192,aux0.03,600,b-1"):
        with pytest.raises(ValueError, match=f"setting '{bad}' is not valid; use"):
            pretrain_probe.parse_setting(bad)
    probe = tmp_path / "probe.json"
    evals = [{"step": s, "eval_loss": 6 - s / 100, "heldout_ecr_over_k_e": 1 + s / 100,
              "heldout_max_load_ratio": 3.0} for s in (60, 120)]
    probe.write_text(json.dumps([{"setting": "v8192,aux0.03,120,h32", "vocab": 8192, "aux_loss_coef": 0.03,
                                  "steps": 120, "balance_horizon": 32, "seconds": 1.0, "evals": evals}]))
    monkeypatch.setattr(pretrain_probe, "ROOT", tmp_path)
    pretrain_probe.table("cpu", probe, "trial", "")
    folder = tmp_path / "results" / "00_base_model" / "pretrain_probe"
    final, curves = pd.read_csv(folder / "trial.csv"), pd.read_csv(folder / "trial_curves.csv")
    assert final.step.tolist() == [120] and final.heldout_ecr_over_k_e.tolist() == [2.2] and len(curves) == 2
    assert "v8192,aux0.03,120,h32" in json.loads((folder / "trial.json").read_text())["command"]


@pytest.mark.parametrize("args, message", [
    (["--shares", "0.3"], "--shares [0.3] selects no setting of ['host']; their shares: [0.0625, 0.25, 0.5, 0.75]"),
    (["--warm-tokens", "0"], "--warm-tokens 0 is not valid; use 1 or more"),
])
def test_paper_scale_rejects_bad_measure_options_in_one_line(args, message):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "paper_scale.py"), "measure", "--grid", "host",
                           *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"scripts/paper_scale.py: error: {message}"], proc.stderr


def test_device_chain_launches_work_in_its_own_session_that_outlives_its_caller_and_packs_its_results(tmp_path):
    """What the device calls rely on: `launch` returns at once, its command runs in a new process session (the
    device ends the caller's processes when a call returns), and `poll` waits for it and packs log and results."""
    import os
    import signal
    import tarfile
    import time

    repo, work, out = tmp_path / "repo", tmp_path / "work", tmp_path / "out"
    (repo / "scripts").mkdir(parents=True)
    out.mkdir()
    script = repo / "scripts" / "device_chain.sh"
    script.write_bytes((ROOT / "scripts" / "device_chain.sh").read_bytes())
    script.chmod(0o755)
    env = {**os.environ, "CFMOE_DEVICE_WORK": str(work), "OUT": str(out)}
    job = 'sleep 2; mkdir -p "$CFMOE_RESULTS/05_serving"; echo measured > "$CFMOE_RESULTS/05_serving/x.csv"; echo ok'
    caller = subprocess.Popen([str(script), "launch", "bash", "-c", job], env=env, start_new_session=True,
                              stdout=subprocess.PIPE, text=True)
    said, _ = caller.communicate(timeout=30)
    assert caller.returncode == 0 and said.startswith("started bash -c")
    pid = int((work / "pid").read_text())
    for _ in range(100):  # the child may not have called setsid yet when the launcher returns
        if os.getsid(pid) == pid:
            break
        time.sleep(0.01)
    assert os.getsid(pid) != caller.pid and os.getsid(pid) == pid  # a session of its own, led by the work
    try:
        os.killpg(caller.pid, signal.SIGKILL)  # the caller's process group ends, as when a device call returns
    except ProcessLookupError:
        pass
    time.sleep(0.2)
    os.kill(pid, 0)  # still running
    polled = subprocess.run([str(script), "poll", "30"], env=env, capture_output=True, text=True, timeout=60)
    assert polled.returncode == 0 and "[chain] not running (ended)" in polled.stdout and "ok" in polled.stdout
    with tarfile.open(out / "results.tgz") as tar:
        assert {"log", "results/05_serving/x.csv"} <= set(tar.getnames())
    for args, message in [(["launch"], "launch needs a command"), (["start"], "start needs stages"),
                          (["poll", "soon"], "poll needs seconds, got 'soon'"), (["go"], "use 'start STAGES...'")]:
        bad = subprocess.run([str(script), *args], env={**env, "CFMOE_DEVICE_WORK": str(tmp_path / "none")},
                             capture_output=True, text=True, timeout=30)
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
