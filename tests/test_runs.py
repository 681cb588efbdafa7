"""Routing traces recorded once per (model, settings) and read back: same traces, new key on any change."""

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cfmoe import evaluate, moe
from cfmoe.config import load_config
from cfmoe.routing import trace_forward
from cfmoe.stages import runs
from tiny_models import tiny_moe, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def test_cached_traces_are_recorded_once_and_keyed_by_weights_and_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("CFMOE_ARTIFACTS", str(tmp_path))
    cfg = load_config("smoke")
    lm = tiny_moe("qwen2_moe", n_experts=8, top_k=2, n_layers=2)
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
    calls = []

    def compute(model=lm):
        calls.append(1)
        return trace_forward(model, ids, record_probs=True)

    settings = {"ids": ids.numpy()}
    first = runs.cached_traces(cfg, "stage", "base", lm, settings, compute)
    again = runs.cached_traces(cfg, "stage", "base", lm, settings, compute)
    assert len(calls) == 1 and len(again) == 2
    for a, b in zip(first, again):
        assert np.array_equal(a.experts, b.experts) and np.array_equal(a.probs, b.probs)
        assert np.array_equal(a.token_ids, b.token_ids) and a.meta == b.meta
    runs.cached_traces(cfg, "stage", "base", lm, settings, compute, force=True)
    assert len(calls) == 2  # force records again
    runs.cached_traces(cfg, "stage", "base", lm, {"ids": ids.numpy()[:1]}, compute)
    assert len(calls) == 3  # other inputs, other key
    other = copy.deepcopy(lm)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    assert moe.weights_fingerprint(other) != moe.weights_fingerprint(lm)
    runs.cached_traces(cfg, "stage", "base", other, settings, lambda: compute(other))
    assert len(calls) == 4  # other weights, other key
    folders = sorted(p.name for p in (tmp_path / "smoke" / "traces" / "stage").iterdir())
    assert len(folders) == 3 and not any(name.endswith(".partial") for name in folders)


def test_a_failed_recording_leaves_no_trace_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CFMOE_ARTIFACTS", str(tmp_path))
    cfg = load_config("smoke")
    lm = tiny_moe("qwen2_moe", n_experts=8, top_k=2, n_layers=2)

    def broken():
        raise RuntimeError("killed")

    try:
        runs.cached_traces(cfg, "stage", "base", lm, {}, broken)
    except RuntimeError:
        pass
    assert not (tmp_path / "smoke" / "traces" / "stage").exists() or \
        not any((tmp_path / "smoke" / "traces" / "stage").iterdir())


def test_cached_test_evaluation_equals_the_direct_one(tmp_path, monkeypatch):
    monkeypatch.setenv("CFMOE_ARTIFACTS", str(tmp_path))
    cfg = load_config("smoke")
    lm, tok = tiny_moe("qwen2_moe", n_experts=8, top_k=2, n_layers=2), tiny_tokenizer()
    direct = evaluate.test_locality(lm, tok, 32, 512, cfg.eval.batch_size)
    for _ in range(2):  # recorded, then read from the file
        cached = runs.test_evaluation(cfg, "00_base_model", "base", lm, tok, 32, 512)
        assert cached["test_ppl"] == direct["test_ppl"] and cached["tokens"] == direct["tokens"]
        np.testing.assert_array_equal(cached["per_layer_ecr"], direct["per_layer_ecr"])
        np.testing.assert_array_equal(cached["experts"], direct["experts"])


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_killed_stage_leaves_its_results_folder_as_it_was(tmp_path):
    """Run notebook 00's stage (smoke), then kill a forced re-run as soon as it has written part of its new
    set: the results folder is byte-identical to before, and the next writer sweeps the leftovers."""
    from cfmoe.provenance import staged_folder

    env = {**os.environ, "CFMOE_RESULTS": str(tmp_path / "results"), "CFMOE_ARTIFACTS": str(tmp_path / "artifacts"),
           "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "cfmoe.stages", "base_model", "--preset", "smoke"]
    subprocess.run(command, env=env, cwd=ROOT, check=True, capture_output=True)
    folder = tmp_path / "results" / "00_base_model" / "smoke"
    before = _snapshot(folder)
    assert {"base_model.csv", "expert_load.png"} <= {p.name for p in before}
    process = subprocess.Popen(command + ["--force"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        staged = [p for p in folder.parent.glob(".smoke.*.tmp") if any(p.rglob("*.csv"))]
        if staged:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait()
    assert staged and process.returncode == -signal.SIGKILL, "the stage finished before it could be killed"
    assert _snapshot(folder) == before
    with staged_folder(folder):
        pass
    assert not list(folder.parent.glob(".smoke.*.tmp")), "the next writer sweeps a killed writer's leftovers"


def test_memoized_tables_are_exact_and_keyed_by_inputs_and_code(tmp_path, monkeypatch):
    import pandas as pd

    from cfmoe import cache, metrics

    monkeypatch.setenv("CFMOE_ARTIFACTS", str(tmp_path))
    cfg = load_config("smoke")
    calls = []

    def compute():
        calls.append(1)
        return pd.DataFrame({"policy": ["lru", "lfu"], "hit_rate": [1 / 3, 2 / 7], "capacity": [4, 8]})

    first = runs.memoized_table(cfg, "s", "curves", {"traces": "base-abc"}, compute, code=(cache,))
    again = runs.memoized_table(cfg, "s", "curves", {"traces": "base-abc"}, compute, code=(cache,))
    assert len(calls) == 1
    pd.testing.assert_frame_equal(first, again, check_dtype=False)
    assert again.hit_rate.tolist() == [1 / 3, 2 / 7]  # exact floats
    runs.memoized_table(cfg, "s", "curves", {"traces": "base-def"}, compute, code=(cache,))
    runs.memoized_table(cfg, "s", "curves", {"traces": "base-abc"}, compute, code=(cache, metrics))
    runs.memoized_table(cfg, "s", "curves", {"traces": "base-abc"}, compute, code=(cache,), force=True)
    assert len(calls) == 4  # other traces, other simulator source, force


def test_a_stage_beside_fine_tuning_waits_for_each_model(tmp_path, monkeypatch):
    """With $CFMOE_WAIT_FOR_RUNS a missing run's model is waited for and loaded once its save lands (whole, by
    rename); without it, or past the wait, a missing model is one clear error."""
    import threading

    monkeypatch.setenv("CFMOE_ARTIFACTS", str(tmp_path))
    cfg = load_config("smoke")
    lm, tok = tiny_moe("qwen2_moe"), tiny_tokenizer()
    with pytest.raises(FileNotFoundError, match=r"merged is missing: run the notebook that trains 'cfmoe'"):
        runs.load_finetuned(cfg, "cfmoe", 1)
    monkeypatch.setenv(runs.WAIT_ENV, "0.2")
    with pytest.raises(FileNotFoundError, match=r"missing after waiting 0.2 s"):
        runs.load_finetuned(cfg, "cfmoe", 1)
    monkeypatch.setenv(runs.WAIT_ENV, "60")
    saver = threading.Timer(1.0, runs.save_finetuned, args=(cfg, "cfmoe", lm, tok, 1))
    saver.start()
    started = time.monotonic()
    loaded = runs.load_finetuned(cfg, "cfmoe", 1)
    saver.join()
    assert 0.9 <= time.monotonic() - started < 30
    assert moe.weights_fingerprint(loaded) == moe.weights_fingerprint(lm)
    monkeypatch.setenv(runs.WAIT_ENV, "soon")
    with pytest.raises(ValueError, match=r"CFMOE_WAIT_FOR_RUNS='soon' is not a number of seconds"):
        runs.load_finetuned(cfg, "lora_control", 1)


def test_the_base_test_evaluation_is_recorded_once_for_every_notebook(tmp_path, monkeypatch):
    """Notebooks 00, 01 and 02 report the base model on the same test blocks: one recording, read back by the
    others; other blocks (another block size) are recorded on their own."""
    monkeypatch.setenv("CFMOE_ARTIFACTS", str(tmp_path))
    cfg = load_config("smoke")
    lm, tok = tiny_moe("qwen2_moe", n_experts=8, top_k=2, n_layers=2), tiny_tokenizer()
    calls = []
    record = evaluate.record_test
    monkeypatch.setattr(evaluate, "record_test", lambda *a, **k: calls.append(1) or record(*a, **k))
    first = runs.base_test_evaluation(cfg, lm, tok, 32)
    again = runs.base_test_evaluation(cfg, lm, tok, 32)
    assert len(calls) == 1 and first["test_ppl"] == again["test_ppl"]
    assert np.array_equal(first["experts"], again["experts"])
    runs.base_test_evaluation(cfg, lm, tok, 16)
    assert len(calls) == 2
