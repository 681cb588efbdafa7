"""Choose the base model's balance-loss weight and training length on held-out text: pre-train several settings
side by side and record, at each evaluation, held-out loss, routing locality (ECR / (k/E)) and balance (busiest
expert / uniform share). Every number here is on the held-out pre-training documents; none reads the test split.

    python scripts/pretrain_probe.py export --preset cpu --vocab 8192 4096     # here: tokenizer + packed blocks
    python scripts/pretrain_probe.py run --grid 'v8192,aux0.01,600' ... --device cuda --out DIR   # anywhere
    python scripts/pretrain_probe.py table --out DIR/probe.json --name final   # results/00_base_model/pretrain_probe/

A setting may end in `,h<N>`: the balance loss over expert loads averaged across about N steps
(`pretrain.balance_horizon`, global-batch balance) instead of each batch's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cfmoe import model  # noqa: E402
from cfmoe.cli import user_errors  # noqa: E402
from cfmoe.config import load_config  # noqa: E402

DATA = ROOT / "artifacts" / "probe"


def _cfg(preset: str, vocab: int, aux: float, steps: int, device: str, horizon: int = 0):
    cfg = load_config(preset)
    return dataclasses.replace(
        cfg, device=device, model=dataclasses.replace(cfg.model, vocab_size=vocab),
        pretrain=dataclasses.replace(cfg.pretrain, aux_loss_coef=aux, max_steps=steps, balance_horizon=horizon))


def parse_setting(setting: str) -> tuple[int, float, int, int]:
    """'v<vocab>,aux<weight>,<steps>[,h<horizon>]' -> (vocab, weight, steps, horizon)."""
    parts = setting.split(",")
    try:
        if len(parts) not in (3, 4) or not (parts[0][0] == "v" and parts[1][:3] == "aux"
                                             and (len(parts) == 3 or parts[3][0] == "h")):
            raise ValueError
        return (int(parts[0][1:]), float(parts[1][3:]), int(parts[2]), int(parts[3][1:]) if len(parts) == 4 else 0)
    except (ValueError, IndexError):
        raise ValueError(f"setting {setting!r} is not valid; use 'v<vocab>,aux<weight>,<steps>[,h<horizon>]', "
                         "e.g. 'v8192,aux0.03,600,h32'") from None


def export(preset: str, vocabs: list[int]) -> None:
    for vocab in vocabs:
        cfg = _cfg(preset, vocab, 0.0, 1, "cpu")
        tokenizer, train, heldout, counts = model.pretraining_data(cfg)
        folder = DATA / f"{preset}-v{vocab}"
        folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(folder / "blocks.npz", **{f"train_{k}": v.astype(np.int32) for k, v in train.items()},
                            **{f"heldout_{k}": v.astype(np.int32) for k, v in heldout.items()})
        tokenizer.save_pretrained(folder / "tokenizer")
        print(folder, counts, train["input_ids"].shape, heldout["input_ids"].shape)


def _one(args: tuple) -> dict:
    preset, setting, device, threads = args
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    vocab, aux, steps, horizon = parse_setting(setting)
    cfg = _cfg(preset, vocab, aux, steps, device, horizon)
    folder = DATA / f"{preset}-v{vocab}"
    blocks = np.load(folder / "blocks.npz")
    train = {k[6:]: blocks[k].astype(np.int64) for k in blocks if k.startswith("train_")}
    heldout = {k[8:]: blocks[k].astype(np.int64) for k in blocks if k.startswith("heldout_")}
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    started = time.perf_counter()
    _, trainer, best = model.train_base(cfg, tokenizer, model._TorchBlocks(train), heldout, f"/tmp/probe-{setting}")
    trainer.train()
    log = trainer.state.log_history
    evals = [{"step": r["step"], "eval_loss": r["eval_loss"]} for r in log if "eval_loss" in r]
    routing = {r["step"]: r for r in log if "heldout_ecr_over_k_e" in r}
    for row in evals:
        row.update({k: routing[row["step"]][k] for k in ("heldout_ecr_over_k_e", "heldout_max_load_ratio")})
    return {"setting": setting, "vocab": vocab, "aux_loss_coef": aux, "steps": steps, "balance_horizon": horizon,
            "seconds": round(time.perf_counter() - started, 1), "best_step": best.best_step,
            "best_heldout_loss": best.best_loss, "evals": evals}


def table(preset: str, probe: Path, name: str, note: str) -> None:
    """Each setting's last evaluation (held-out loss, locality, balance) and every evaluation, from a run's
    probe.json, into results/00_base_model/pretrain_probe/<name>.csv and <name>_curves.csv."""
    import pandas as pd

    from cfmoe.provenance import save_table

    if not probe.is_file():
        raise ValueError(f"--out {str(probe)!r} is not a file; pass the probe.json a `run` wrote")
    runs = json.loads(probe.read_text())
    keys = ("setting", "vocab", "aux_loss_coef", "steps", "balance_horizon", "seconds")
    curves = pd.DataFrame([{**{k: r.get(k, 0) for k in keys}, **e} for r in runs for e in r["evals"]])
    final = curves.sort_values("step").groupby("setting", sort=False).tail(1).sort_values("setting")
    folder = ROOT / "results" / "00_base_model" / "pretrain_probe"
    command = f"python scripts/pretrain_probe.py run --preset {preset} --grid " + " ".join(r["setting"] for r in runs)
    for frame, suffix in ((final, ""), (curves, "_curves")):
        save_table(frame.reset_index(drop=True), folder / f"{name}{suffix}", load_config(preset), command=command,
                   note=note or "held-out pre-training text only")


@user_errors("scripts/pretrain_probe.py")
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["export", "run", "table"])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--vocab", type=int, nargs="+", default=[8192])
    parser.add_argument("--grid", nargs="+", default=[], help="settings 'v<vocab>,aux<weight>,<steps>[,h<horizon>]'")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per setting (settings run in parallel)")
    parser.add_argument("--out", default=str(DATA / "probe.json"))
    parser.add_argument("--name", default="final", help="table: results/00_base_model/pretrain_probe/<name>.csv")
    parser.add_argument("--note", default="", help="table: a note for the sidecar (where it ran, what was cut off)")
    args = parser.parse_args(argv)
    if args.action == "export":
        export(args.preset, args.vocab)
        return
    if args.action == "table":
        table(args.preset, Path(args.out), args.name, args.note)
        return
    for setting in args.grid:
        parse_setting(setting)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    results = []
    with mp.get_context("spawn").Pool(len(args.grid)) as pool:
        # rewritten as each setting finishes, so that a run cut off by a time limit keeps the settings it finished
        for result in pool.imap_unordered(_one, [(args.preset, s, args.device, args.threads) for s in args.grid]):
            results.append(result)
            Path(args.out).write_text(json.dumps(results, indent=1))
    for r in results:
        last = r["evals"][-1] if r["evals"] else {}
        print(r["setting"], r["seconds"], "s; best", r["best_step"], round(r["best_heldout_loss"], 4),
              "; last", {k: round(v, 3) for k, v in last.items()})


if __name__ == "__main__":
    main()
