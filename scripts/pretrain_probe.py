"""Choose the base model's balance-loss weight and training length on held-out text: pre-train several settings
side by side and record, at each evaluation, held-out loss, routing locality (ECR / (k/E)) and balance (busiest
expert / uniform share). Every number here is on the held-out pre-training documents; none reads the test split.

    python scripts/pretrain_probe.py export --preset cpu --vocab 8192 4096     # here: tokenizer + packed blocks
    python scripts/pretrain_probe.py run --grid 'v8192,aux0.01,600' ... --device cuda --out DIR   # anywhere
    python scripts/pretrain_probe.py table --out DIR/probe.json --name final   # results/00_base_model/pretrain_probe/

A setting may add `,h<N>`: the balance loss over expert loads averaged across about N steps
(`pretrain.balance_horizon`, global-batch balance) instead of each batch's; `,L<N>` and `,d<N>`: N decoder layers and
hidden size N instead of the preset's (the depth and width probe); `,b<R>`: auxiliary-loss-free balance, a
per-expert selection bias moved by R a step (`pretrain.bias_balance_rate`, `cfmoe.training.BiasBalance`).
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


def _cfg(preset: str, setting: dict, device: str):
    cfg = load_config(preset)
    shape = {"vocab_size": setting["vocab"]}
    shape.update({"num_layers": setting["layers"]} if setting["layers"] else {})
    shape.update({"hidden_size": setting["hidden"]} if setting["hidden"] else {})
    return dataclasses.replace(
        cfg, device=device, model=dataclasses.replace(cfg.model, **shape),
        pretrain=dataclasses.replace(cfg.pretrain, aux_loss_coef=setting["aux"], max_steps=setting["steps"],
                                     balance_horizon=setting["horizon"], bias_balance_rate=setting["bias_rate"]))


# optional parts of a setting after 'v<vocab>,aux<weight>,<steps>': prefix -> key (0 = the preset's value)
_OPTIONAL = {"h": "horizon", "L": "layers", "d": "hidden", "b": "bias_rate"}


def parse_setting(setting: str) -> dict:
    """'v<vocab>,aux<weight>,<steps>[,h<horizon>][,L<layers>][,d<hidden>][,b<rate>]' -> {vocab, aux, steps, horizon,
    layers, hidden, bias_rate}; an optional part left out is 0, the preset's value (horizon 0: balance each batch;
    rate 0: no auxiliary-loss-free bias)."""
    parts = setting.split(",")
    try:
        if len(parts) < 3 or parts[0][0] != "v" or parts[1][:3] != "aux":
            raise ValueError
        out = {"vocab": int(parts[0][1:]), "aux": float(parts[1][3:]), "steps": int(parts[2]),
               **{key: 0 for key in _OPTIONAL.values()}}
        for part in parts[3:]:
            key = _OPTIONAL[part[0]]
            value = float(part[1:]) if key == "bias_rate" else int(part[1:])
            if out[key] or not value > 0:
                raise ValueError
            out[key] = value
        return out
    except (ValueError, IndexError, KeyError):
        raise ValueError(f"setting {setting!r} is not valid; use 'v<vocab>,aux<weight>,<steps>[,h<horizon>]"
                         "[,L<layers>][,d<hidden>][,b<rate>]', e.g. 'v8192,aux0.03,600,h32' or "
                         "'v8192,aux0.03,300,L12,d96'"
                         ) from None


def export(preset: str, vocabs: list[int]) -> None:
    for vocab in vocabs:
        cfg = _cfg(preset, parse_setting(f"v{vocab},aux0,1"), "cpu")
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
    parsed = parse_setting(setting)
    cfg = _cfg(preset, parsed, device)
    folder = DATA / f"{preset}-v{parsed['vocab']}"
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
    return {"setting": setting, "vocab": cfg.model.vocab_size, "aux_loss_coef": cfg.pretrain.aux_loss_coef,
            "steps": cfg.pretrain.max_steps, "balance_horizon": cfg.pretrain.balance_horizon,
            "num_layers": cfg.model.num_layers, "hidden_size": cfg.model.hidden_size,
            "bias_balance_rate": cfg.pretrain.bias_balance_rate,
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
    shape = load_config(preset).model  # probes written before depth and width were settings used the preset's
    curves = pd.DataFrame([{**{k: r.get(k, 0) for k in keys}, "num_layers": r.get("num_layers", shape.num_layers),
                            "hidden_size": r.get("hidden_size", shape.hidden_size),
                            "bias_balance_rate": r.get("bias_balance_rate", 0.0), **e}
                           for r in runs for e in r["evals"]])
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
    parser.add_argument("--grid", nargs="+", default=[],
                        help="settings 'v<vocab>,aux<weight>,<steps>[,h<horizon>][,L<layers>][,d<hidden>][,b<rate>]'")
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
