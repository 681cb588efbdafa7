"""Where a GPU step of the study's own model spends its time: pre-training, LoRA fine-tuning and token-by-token
decoding steps of a preset's model (random weights) under each experts implementation transformers offers.

    python3 scripts/gpu_speed.py --preset gpu --out results/benchmarks/gpu_speed     # on the GPU

With `--study`, the study's own paths instead: `model.train_base` (pre-training through the MoETrainer, with its
balance loss and held-out probes), `finetune.finetune` (LoRA with the locality loss, and ReMoE's router-only recipe)
and notebook 06's teacher-forced decode with the cache and the prior in the loop. `--determinism both` times each of
them with torch's deterministic algorithms on (as the stages run, `determinism.make_deterministic`) and off.

Each (phase, implementation) is timed `--repeats` times in one seeded random order, after a warm-up run of each;
medians and interquartile ranges (`serving.summarize_repeats`). The implementations' logits on the same weights are
compared too (max |Δ| against eager), so a faster one is also shown to compute the same function.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cfmoe import finetune  # noqa: E402
from cfmoe import model as study_model  # noqa: E402
from cfmoe.config import load_config  # noqa: E402
from cfmoe.daft import lora_model  # noqa: E402
from cfmoe.provenance import save_table  # noqa: E402

IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
TRAINED = ("eager", "grouped_mm")  # batched_mm gathers every token's expert weights: 12 GiB a layer at batch 32x512


class _Vocabulary:
    """What `model.build_config` reads of a tokenizer: its size and special ids."""
    bos_token_id = eos_token_id = 0
    pad_token_id = 1

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def build(cfg, implementation: str, device: str):
    from transformers import Qwen2MoeForCausalLM

    torch.manual_seed(0)
    lm = Qwen2MoeForCausalLM(study_model.build_config(cfg, _Vocabulary(cfg.model.vocab_size))).to(device)
    lm.set_experts_implementation(implementation)
    return lm


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(lm, optimizer, ids: torch.Tensor) -> None:
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=ids.device.type == "cuda"):
        out = lm(input_ids=ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def decode_steps(lm, ids: torch.Tensor, tokens: int) -> None:
    past = None
    with torch.no_grad(), torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=ids.device.type == "cuda"):
        for t in range(tokens):
            out = lm(input_ids=ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            out.logits[:, -1].float().log_softmax(-1).sum().item()  # the teacher-forced scorer reads every step


class _Blocks(torch.utils.data.Dataset):
    """Random packed blocks as the trainer reads them (one document per block)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i], "document_ids": torch.zeros_like(self.ids[i])}


def interleaved(settings: list, repeats: int, run, device: str) -> list[tuple[int, tuple, float]]:
    """Each setting run once untimed (warm-up: kernels, allocator, autotuning), then `repeats` timed runs of every
    setting in one seeded random order: (order, setting, seconds) per timed run."""
    for setting in settings:
        run(*setting, warmup=True)
    order = [s for s in settings for _ in range(repeats)]
    random.Random(0).shuffle(order)
    timed = []
    for n, setting in enumerate(order):
        _sync(device)
        started = time.perf_counter()
        run(*setting, warmup=False)
        _sync(device)
        timed.append((n, setting, time.perf_counter() - started))
    return timed


def save(table, timed: str, name: str, cfg, args, keys=("phase", "implementation"), **tables) -> "pd.DataFrame":
    """The per-run `table` as `<name>steps`, its medians and IQRs (`serving.summarize_repeats`) as `<name>summary`,
    and any further `tables`, each with the run's settings and device in its sidecar."""
    from cfmoe.stages.serving import summarize_repeats

    summary = summarize_repeats(table, keys=list(keys), timed=(timed, "tokens_per_s"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = {**vars(args), "device_name": _device_name(args.device), "torch": torch.__version__}
    for stem, frame in {f"{name}steps": table, f"{name}summary": summary, **tables}.items():
        save_table(frame, out / stem, cfg, **extra)
    print(summary.to_string(), *[t.to_string() for t in tables.values()], extra["device_name"], torch.__version__,
          sep="\n")
    return summary


def study_paths(cfg, args) -> "pd.DataFrame":
    """Seconds of the study's own fine-tuning (MoETrainer) and notebook 06 decode passes per implementation."""
    import copy
    import dataclasses

    import pandas as pd

    from cfmoe import moe
    from cfmoe import model as study_model
    from cfmoe.cache_prior import OnlineCache, cache_prior, decode_teacher_forced, router_spread
    from cfmoe.stages.beyond_cfmoe import capacity

    ft = dataclasses.replace(cfg.finetune, steps=args.steps)
    gen = torch.Generator().manual_seed(1)
    blocks = _Blocks(torch.randint(2, cfg.model.vocab_size, (ft.batch_size * args.steps, ft.block_size), generator=gen))
    ids = torch.randint(2, cfg.model.vocab_size, (args.decode_rows, args.decode_tokens), generator=gen)
    base = {impl: build(cfg, impl, args.device) for impl in IMPLEMENTATIONS}
    info = moe.describe(base["eager"])
    delta = router_spread(base["eager"], ids[:8].to(args.device))
    pre = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, max_steps=args.steps,
                                                                eval_every=10 * args.steps, time_limit_minutes=0.0))
    pretrain_blocks = _Blocks(torch.randint(2, cfg.model.vocab_size, (pre.pretrain.batch_size * args.steps,
                                                                      pre.pretrain.block_size), generator=gen))
    heldout = {"input_ids": pretrain_blocks.ids[:8].numpy(), "document_ids": torch.zeros(8, pre.pretrain.block_size,
                                                                                         dtype=torch.long).numpy()}
    flags = {"on": (True,), "off": (False,), "both": (True, False)}[args.determinism]
    settings = [(m, i, d) for m in ("pretrain", "lora", "router_kl") for i in TRAINED for d in flags] + \
               [("decode_prior", i, d) for i in IMPLEMENTATIONS for d in flags]

    def run(phase, impl, deterministic, warmup):
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        if phase == "pretrain":
            lm, trainer, _ = study_model.train_base(pre, _Vocabulary(cfg.model.vocab_size), pretrain_blocks, heldout,
                                                    tempfile.mkdtemp(prefix="gpu_speed_"))
            lm.set_experts_implementation(impl)
            trainer.train()
        elif phase == "decode_prior":
            lm = base[impl].eval()
            online = OnlineCache(ids.shape[0], len(info.layers), info.n_experts,
                                 capacity(0.25, len(info.layers), info.n_experts))  # notebook 06's 25%
            with cache_prior(lm, online, 0.1, delta):
                decode_teacher_forced(lm, ids, online)
        else:
            finetune.finetune(copy.deepcopy(base[impl]), blocks, ft, kind="topk_overlap", weight=3.0,
                              top_k=info.top_k, seed=0, device=args.device, method=phase, anchor_weight=1.0)

    tokens = {"decode_prior": ids.numel(), "lora": args.steps * ft.batch_size * ft.block_size,
              "pretrain": args.steps * pre.pretrain.batch_size * pre.pretrain.block_size}
    tokens["router_kl"] = tokens["lora"]
    rows = [{"phase": phase, "implementation": impl, "deterministic": deterministic, "order": n, "seconds": seconds,
             "tokens_per_s": tokens[phase] / seconds}
            for n, (phase, impl, deterministic), seconds in interleaved(settings, args.repeats, run, args.device)]
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpu")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    parser.add_argument("--decode-rows", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--study", action="store_true", help="time the study's own training and decode paths")
    parser.add_argument("--determinism", choices=("on", "off", "both"), default="on",
                        help="--study: torch's deterministic algorithms during each run (on: as the stages run)")
    parser.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "gpu_speed"))
    args = parser.parse_args(argv)
    import pandas as pd

    cfg = load_config(args.preset)
    if args.study:
        save(study_paths(cfg, args), "seconds", "study_", cfg, args, keys=("phase", "implementation", "deterministic"))
        return
    vocab, block = cfg.model.vocab_size, cfg.pretrain.block_size
    gen = torch.Generator().manual_seed(0)
    batches = {"pretrain": torch.randint(2, vocab, (cfg.pretrain.batch_size, block), generator=gen),
               "lora": torch.randint(2, vocab, (cfg.finetune.batch_size, cfg.finetune.block_size), generator=gen),
               "decode": torch.randint(2, vocab, (args.decode_rows, args.decode_tokens), generator=gen)}
    batches = {k: v.to(args.device) for k, v in batches.items()}
    models, optimizers = {}, {}
    for impl in IMPLEMENTATIONS:
        try:
            models[("decode", impl)] = build(cfg, impl, args.device)
            if impl in TRAINED:
                models[("pretrain", impl)] = models[("decode", impl)]
                models[("lora", impl)] = lora_model(build(cfg, impl, args.device), None, cfg.finetune.lora_rank)
        except Exception as error:  # an implementation this transformers lacks
            print(f"{impl}: unavailable ({type(error).__name__}: {error})")
            continue
        for phase in ("pretrain", "lora") if impl in TRAINED else ():
            params = [p for p in models[(phase, impl)].parameters() if p.requires_grad]
            optimizers[(phase, impl)] = torch.optim.AdamW(params, lr=1e-4)

    def run(phase, impl, warmup):
        lm = models[(phase, impl)]
        if phase == "decode":
            lm.eval()
            decode_steps(lm, batches["decode"], args.decode_tokens)
        else:
            lm.train()
            for _ in range(2 if warmup else args.steps):
                train_step(lm, optimizers[(phase, impl)], batches[phase])

    agreement = []
    with torch.no_grad():
        probe = batches["decode"][:8]
        reference = models[("decode", "eager")](input_ids=probe).logits.float()
        for impl in [i for i in IMPLEMENTATIONS if ("decode", i) in models]:
            logits = models[("decode", impl)](input_ids=probe).logits.float()
            agreement.append({"implementation": impl, "max_abs_diff_vs_eager": (logits - reference).abs().max().item()})
    rows = []
    for n, (phase, impl), seconds in interleaved(list(models), args.repeats, run, args.device):
        per = args.decode_tokens if phase == "decode" else args.steps
        tokens = batches[phase].numel() * (1 if phase == "decode" else args.steps)
        rows.append({"phase": phase, "implementation": impl, "order": n, "seconds_per_step": seconds / per,
                     "tokens_per_s": tokens / seconds})
    save(pd.DataFrame(rows), "seconds_per_step", "", cfg, args, agreement=pd.DataFrame(agreement))


if __name__ == "__main__":
    main()
