"""The study's models and their routing traces, as files: what every stage loads, below every stage.

    lm, tokenizer = load_base(cfg)                       # the model under study
    models, tokenizer = load_runs(cfg)                   # base + notebook 02's fine-tuned runs
    traces = cached_traces(cfg, "03_cache_management", "cfmoe", models["cfmoe"], settings, compute)

Routing traces are recorded once per (model, data, settings) and read back from
`artifacts/<preset>/traces/<stage>/<run>-<fingerprint>/`: the fingerprint hashes the model's weights, the
settings (which include the input token ids) and the trace schema, so a change of any of them records anew,
and a change of an analysis alone reads the files. `force=True` records again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from .. import claims, evaluate, model, moe, routing
from ..config import ROOT, STAGING, StudyConfig
from ..provenance import replaced_folder, staged_folder, write_json_atomic

FINETUNE_RUNS = ("base", "lora_control", "cfmoe", "cfmoe_daft")


def real_routing(table: str) -> pd.DataFrame | None:
    """A table of real routing's measurement (`claims.REAL_ROUTING_DIR`: `per_layer`, `lru_vs_iid`, `summary`;
    scripts/real_routing.py on the released routing), read from this repository whatever the results folder; None
    in a checkout without it."""
    path = ROOT / claims.REAL_ROUTING_DIR / f"{table}.csv"
    return pd.read_csv(path) if path.is_file() else None


def one_result_set(notebook: str, compute: Callable, figures: Callable) -> Callable:
    """`compute(cfg, force)` then `figures(cfg, results)`, their files written as one set: into a staging copy
    of the notebook's results folder, moved into place only when both succeed."""
    @functools.wraps(compute)
    def stage(cfg: StudyConfig, force: bool = False) -> dict:
        folder = cfg.results_dir(notebook)
        with staged_folder(folder) as staging:
            token = STAGING.set({**STAGING.get(), folder: staging})
            try:
                results = compute(cfg, force)
                figures(cfg, results)
            finally:
                STAGING.reset(token)
        return results
    return stage


def load_base(cfg: StudyConfig, force: bool = False):
    """The model under study: `cfg.model_path` when given, else the project's pre-trained default."""
    if cfg.model_path:
        return model.load_model(cfg.model_path, device=cfg.device)
    return model.build_or_load(cfg, force=force)


def model_dir(cfg: StudyConfig) -> str:
    return cfg.model_path or str(model.base_model_dir(cfg))


def finetuned_dir(cfg: StudyConfig, run: str, seed: int | None = None) -> Path:
    """Where notebook 02 saves a run's adapter (`adapter/`) and merged model (`merged/`) for one seed (None: the
    primary seed, `finetune.seeds[0]`, whose models notebooks 03-05 serve)."""
    seed = cfg.finetune.seeds[0] if seed is None else seed
    return cfg.artifacts_dir / "finetune" / run / f"seed{seed}"


def save_finetuned(cfg: StudyConfig, run: str, tuned, tokenizer, seed: int | None = None):
    """Save a run's LoRA adapter and its merged model (what notebooks 03-05 load); return the merged model.

    The folder is written whole: into a `.partial` sibling, then renamed into place (the old one renamed aside
    first and removed last), so a killed save leaves the previous complete folder, never a half-written one."""
    with replaced_folder(finetuned_dir(cfg, run, seed)) as partial:
        tuned.save_pretrained(partial / "adapter")
        merged = tuned.merge_and_unload() if hasattr(tuned, "merge_and_unload") else tuned
        merged.save_pretrained(partial / "merged")
        tokenizer.save_pretrained(partial / "merged")
    return merged


def load_runs(cfg: StudyConfig, seed: int | None = None) -> tuple[dict, object]:
    """The base model and notebook 02's merged fine-tuned models of one seed (None: the primary seed), by run
    name, plus the tokenizer."""
    lm, tokenizer = load_base(cfg)
    models = {"base": lm}
    for run in FINETUNE_RUNS[1:]:
        models[run] = load_finetuned(cfg, run, seed)
    return models, tokenizer


WAIT_ENV = "CFMOE_WAIT_FOR_RUNS"  # seconds to wait for a run's model that another process is still training


def load_finetuned(cfg: StudyConfig, run: str, seed: int | None = None):
    """One saved run's merged model (`save_finetuned`) of one seed.

    With $CFMOE_WAIT_FOR_RUNS set to N > 0, a missing model is waited for up to N seconds: a stage can then run
    beside notebook 02 (`scripts/gpu_stages.sh fine_tuning+beyond_cfmoe`) and take each seed's models as they
    are saved (a save appears whole, by rename). Only a missing model is waited for: start from an empty
    `artifacts/<preset>/finetune/`, or an earlier run's models are taken."""
    path = finetuned_dir(cfg, run, seed) / "merged"
    wait = os.environ.get(WAIT_ENV, "0")
    try:
        deadline = time.monotonic() + float(wait)
    except ValueError:
        raise ValueError(f"${WAIT_ENV}={wait!r} is not a number of seconds") from None
    while not (path / "config.json").is_file():
        if time.monotonic() >= deadline:
            waited = f" after waiting {float(wait):g} s" if float(wait) > 0 else ""
            raise FileNotFoundError(f"{path} is missing{waited}: run the notebook that trains {run!r} for preset "
                                    f"{cfg.preset!r}")
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
    return model.load_model(path, device=cfg.device)[0]


def with_seed(table):
    """A results table from before seeds were recorded (no `seed` column) read as one of seed 0."""
    return table if "seed" in table else table.assign(seed=0)


def _settings_digest(settings: dict) -> str:
    def default(value):
        if isinstance(value, np.ndarray):  # the shape too: the same tokens cut into other blocks are other inputs
            return f"{value.shape}|{value.dtype}|{hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()}"
        return str(value)
    return json.dumps(settings, sort_keys=True, default=default)


def trace_dir(cfg: StudyConfig, stage: str, run: str, lm: torch.nn.Module, settings: dict) -> Path:
    """The folder of one model's traces for one stage and settings."""
    key = hashlib.sha256(f"{moe.weights_fingerprint(lm)[:16]}|{routing.SCHEMA_VERSION}|{_settings_digest(settings)}".encode())
    return cfg.artifacts_dir / "traces" / stage / f"{run}-{key.hexdigest()[:16]}"


def cached_traces(cfg: StudyConfig, stage: str, run: str, lm: torch.nn.Module, settings: dict,
                  compute: Callable[[], list[routing.RoutingTrace]], force: bool = False) -> list[routing.RoutingTrace]:
    """`compute()`'s traces, recorded once per (model, settings) and read back from files afterwards."""
    return traces_in(trace_dir(cfg, stage, run, lm, settings), compute, force)


def traces_in(folder: Path, compute: Callable[[], list[routing.RoutingTrace]], force: bool = False):
    """The traces saved in `folder` (a `trace_dir`), else `compute()`'s, saved there whole (`replaced_folder`)."""
    index = folder / "index.json"
    if not force and index.is_file():
        n = json.loads(index.read_text())["traces"]
        return [routing.RoutingTrace.load(folder / f"{i:05d}.npz") for i in range(n)]
    traces = compute()
    with replaced_folder(folder) as partial:
        for i, trace in enumerate(traces):
            trace.save(partial / f"{i:05d}.npz")
        write_json_atomic(partial / "index.json", {"traces": len(traces)})
    return traces


BASE_TEST_STAGE = "00_base_model"  # the base model's test evaluation: recorded by notebook 00, read by the others


def base_test_evaluation(cfg: StudyConfig, lm, tokenizer, block_size: int, force: bool = False) -> dict:
    """The base model's `test_evaluation` on `cfg.eval.max_test_tokens` test tokens, recorded once for every notebook
    (a notebook with other blocks records its own)."""
    return test_evaluation(cfg, BASE_TEST_STAGE, "base", lm, tokenizer, block_size, cfg.eval.max_test_tokens, force)


def test_evaluation(cfg: StudyConfig, stage: str, run: str, lm, tokenizer, block_size: int, max_tokens: int = 0,
                    force: bool = False, split: str = "test") -> dict:
    """`evaluate.test_locality` of one model on a study split (`data.STUDY_SPLITS`: "validation" for choices,
    "test" for final numbers), its routing trace (and perplexity, in the trace's meta) recorded once."""
    blocks = evaluate.test_blocks(tokenizer, block_size, max_tokens, split)
    batch_size = cfg.eval.batch_size

    def compute():
        ppl, experts = evaluate.record_test(lm, blocks, batch_size)
        tokens = blocks["input_ids"].reshape(-1)
        return [routing.RoutingTrace(experts, None, np.zeros(len(tokens), np.uint8), tokens, moe.describe(lm).n_experts,
                                     {"perplexity": ppl, "source": f"teacher-forced WikiText-2 {split} blocks"})]

    settings = {"kind": "test_locality", "split": split, "input_ids": blocks["input_ids"], "batch_size": batch_size}
    trace, = cached_traces(cfg, stage, run, lm, settings, compute, force)
    return evaluate.locality(trace.meta["perplexity"], trace.experts, blocks)


def _source_digest(modules) -> str:
    import inspect

    return hashlib.sha256("".join(inspect.getsource(m) for m in modules).encode()).hexdigest()[:16]


def memoized_table(cfg: StudyConfig, stage: str, name: str, key: dict, compute: Callable[[], "pd.DataFrame"],
                   code=(), force: bool = False):
    """A table derived from traces (a cache simulation's result), computed once per `key` and per the source of
    the modules in `code` that compute it, then read back (parquet, exact): re-running an analysis that did not
    change costs a file read, a new policy only its own simulation. `key` must name the traces it reads
    (`trace_dir(...).name`) and every setting."""
    import pandas as pd

    digest = hashlib.sha256(f"{_settings_digest(key)}|{_source_digest(code)}".encode()).hexdigest()[:16]
    path = cfg.artifacts_dir / "tables" / stage / f"{name}-{digest}.parquet"
    if not force and path.is_file():
        return pd.read_parquet(path)
    table = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    table.to_parquet(partial, index=False)
    partial.replace(path)
    return table
