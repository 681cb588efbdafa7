"""Choose the base model's balance-loss weight and training length on held-out text: pre-train several settings
side by side and record, at each evaluation, held-out loss, routing locality (ECR / (k/E)) and balance (busiest
expert / uniform share). Every number here is on the held-out pre-training documents; none reads the test split.

    python scripts/pretrain_probe.py export --preset cpu --vocab 8192 4096     # here: tokenizer + packed blocks
    python scripts/pretrain_probe.py run --grid 'v8192,aux0.01,600' ... --device cuda --out DIR   # anywhere
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


def _cfg(preset: str, vocab: int, aux: float, steps: int, device: str):
    cfg = load_config(preset)
    return dataclasses.replace(
        cfg, device=device, model=dataclasses.replace(cfg.model, vocab_size=vocab),
        pretrain=dataclasses.replace(cfg.pretrain, aux_loss_coef=aux, max_steps=steps))


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
    vocab, aux, steps = (float(x.lstrip("vaux")) for x in setting.split(","))
    cfg = _cfg(preset, int(vocab), aux, int(steps), device)
    folder = DATA / f"{preset}-v{int(vocab)}"
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
    return {"setting": setting, "vocab": int(vocab), "aux_loss_coef": aux, "steps": int(steps),
            "seconds": round(time.perf_counter() - started, 1), "best_step": best.best_step,
            "best_heldout_loss": best.best_loss, "evals": evals}


@user_errors("scripts/pretrain_probe.py")
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["export", "run"])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--vocab", type=int, nargs="+", default=[8192])
    parser.add_argument("--grid", nargs="+", default=[], help="settings 'v<vocab>,aux<weight>,<steps>'")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per setting (settings run in parallel)")
    parser.add_argument("--out", default=str(DATA / "probe.json"))
    args = parser.parse_args(argv)
    if args.action == "export":
        export(args.preset, args.vocab)
        return
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
