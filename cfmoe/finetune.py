"""Locality-aware fine-tuning (CFMoE): LM loss + λ·locality loss on the router logits, balance loss weight 0.

    blocks = finetune_blocks(tokenizer, block_size=256)
    tuned = finetune(lm, blocks, cfg.finetune, kind="js", weight=1.0, top_k=6, seed=0).model
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import TrainingArguments

from . import data
from .cli import user_errors
from .config import FinetuneConfig
from .locality import LOSS_KINDS, LocalityLoss, consecutive_pair_mask
from .training import MoETrainer


def finetune_blocks(tokenizer, block_size: int, split: str = "finetune"):
    """A study split (`data.STUDY_SPLITS`) as plain LM blocks with document ids (the locality loss masks article
    boundaries): the fine-tuning articles, never the validation text choices are made on nor the test split."""
    if split != "finetune":
        raise ValueError(f"never fine-tune on the {split!r} split (choices are made on 'validation', final numbers "
                         "on 'test'); use 'finetune'")
    return data.blocks_dataset(data.pack_documents(tokenizer, data.study_articles(split), block_size))


def locality_term(kind: str, top_k: int):
    """The MoETrainer extra-loss function for one locality loss kind: pairs inside one document only."""
    loss_fn = LocalityLoss(kind, top_k=top_k if kind == "topk_overlap" else None)

    def term(router_logits, batch):
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask
        layers = [logits for logits in router_logits if logits is not None]
        return loss_fn(layers, consecutive_pair_mask(mask, batch.get("document_ids")))

    return term


METHODS = ("lora", "router_kl")


def router_only(lm) -> list:
    """Freeze every parameter but the MoE routers' (ReMoE's setting); returns the routers."""
    from .moe import describe

    routers = [layer.router for layer in describe(lm).layers]
    for param in lm.parameters():
        param.requires_grad_(False)
    for router in routers:
        for param in router.parameters():
            param.requires_grad_(True)
    return routers


def _log_probs(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Log of the router's probability vector, float32 (sigmoid scores normalised to sum 1)."""
    logits = logits.float()
    if scoring == "sigmoid":
        return F.logsigmoid(logits) - torch.logsumexp(F.logsigmoid(logits), dim=-1, keepdim=True)
    return logits.log_softmax(-1)


class TrustKL:
    """ReMoE's "Trust-KL" anchor: KL(q || p) from each MoE layer's frozen original router q (applied to the same
    hidden states) to the router being tuned p, mean over tokens and layers. `attach` hooks the routers; the
    term reads the anchors of the latest forward pass."""

    def __init__(self, lm):
        from .moe import describe

        self.layers = describe(lm).layers
        self.frozen = [copy.deepcopy(layer.router).requires_grad_(False) for layer in self.layers]
        self.anchors: list[torch.Tensor | None] = [None] * len(self.layers)
        self.handles = []

    def attach(self) -> "TrustKL":
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.router.register_forward_hook(self._hook(i)))
        return self

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, i: int):
        def hook(module, args, output):
            with torch.no_grad():
                self.anchors[i] = _log_probs(self.frozen[i](*args)[0], self.layers[i].scoring)
        return hook

    def __call__(self, router_logits, batch) -> torch.Tensor:
        layers = [logits for logits in router_logits if logits is not None]
        terms = []
        for layer, logits, anchor in zip(self.layers, layers, self.anchors):
            logp = _log_probs(logits.reshape(-1, logits.shape[-1]), layer.scoring)
            terms.append((anchor.exp() * (anchor - logp)).sum(-1).mean())
        return torch.stack(terms).mean()


@dataclass
class FinetuneResult:
    model: torch.nn.Module  # the peft-wrapped model when ft.lora_rank > 0
    log: list[dict]
    train_seconds: float
    trainable_params: int
    peak_memory_mb: float  # CUDA peak allocated on a GPU; the process's peak RSS on a CPU


def _reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets the process's peak RSS (VmHWM)
        f.write("5")


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# the files of a complete Trainer checkpoint, each under any of its names; trainer_state.json is written last
CHECKPOINT_FILES = (("trainer_state.json",), ("optimizer.pt", "optimizer.bin"), ("scheduler.pt",),
                    ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "pytorch_model.bin",
                     "model.safetensors.index.json", "pytorch_model.bin.index.json"))


def last_complete_checkpoint(folder) -> str | None:
    """The newest `checkpoint-N` in `folder` that holds every file of CHECKPOINT_FILES, or None.

    Prints one line: the checkpoint it resumes from and any newer, incomplete ones it skips (a save that was
    killed), or that it starts from scratch.
    """
    steps = {int(m[1]): name for name in (os.listdir(folder) if os.path.isdir(folder) else [])
             if (m := re.fullmatch(r"checkpoint-(\d+)", name)) and os.path.isdir(os.path.join(folder, name))}
    skipped, last = [], None
    for step in sorted(steps, reverse=True):
        missing = [names[0] for names in CHECKPOINT_FILES
                   if not any(os.path.isfile(os.path.join(folder, steps[step], n)) for n in names)]
        if not missing:
            last = os.path.join(folder, steps[step])
            break
        skipped.append(f"{steps[step]} (no {', '.join(missing)})")
    skip = f"skipping incomplete checkpoint{'s' * (len(skipped) > 1)} {', '.join(skipped)}; " if skipped else ""
    print(f"{skip}resuming from {last}" if last else f"{skip}no complete checkpoint in {folder}; starting from scratch")
    return last


def finetune(lm, blocks, ft: FinetuneConfig, kind: str, weight: float, top_k: int, seed: int = 0,
             device: str = "cpu", layers: list[int] | None = None, output_dir: str | None = None,
             save_every: int = 0, resume: bool = False, method: str = "lora", anchor_weight: float = 0.0
             ) -> FinetuneResult:
    """Fine-tune `lm` for `ft.steps` steps (LoRA on MoE `layers`, all when None); weight 0 is the control.

    `method="router_kl"` is ReMoE's recipe (arXiv 2605.27081) as its abstract describes it: every parameter but
    the routers frozen, the locality loss plus `anchor_weight` x the Trust-KL anchor to the original routing
    (`TrustKL`); `layers` must then be None.

    With `output_dir` and `save_every`, checkpoints go to `output_dir` and `resume=True` continues from the
    newest complete one (`last_complete_checkpoint`). A non-finite loss stops training with a FloatingPointError
    naming the step; the checkpoints written before it are kept. Bad `layers` raise a ValueError.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown locality loss kind {kind!r}; valid kinds: {', '.join(LOSS_KINDS)}")
    if weight < 0:
        raise ValueError(f"locality weight must be >= 0, got {weight}")
    from .daft import check_layers, lora_model, trainable_parameters
    from .moe import describe

    if method not in METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}; valid: {', '.join(METHODS)}")
    if not anchor_weight >= 0:
        raise ValueError(f"anchor_weight must be >= 0, got {anchor_weight}")
    if method == "router_kl" and layers is not None:
        raise ValueError(f"method 'router_kl' tunes every router; layers must be None, got {layers}")
    check_layers(layers, len(describe(lm).layers))
    torch.manual_seed(seed)  # LoRA's initialisation
    anchor = None
    if method == "router_kl":
        router_only(lm)
        anchor = TrustKL(lm).attach() if anchor_weight > 0 else None
    elif ft.lora_rank:
        lm = lora_model(lm, layers, ft.lora_rank)
    _reset_peak_memory(device)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=output_dir or scratch, max_steps=ft.steps, per_device_train_batch_size=ft.batch_size,
            learning_rate=ft.learning_rate, warmup_steps=ft.warmup_steps, lr_scheduler_type="cosine",
            weight_decay=0.0, max_grad_norm=1.0, logging_steps=max(1, ft.steps // 10),
            save_strategy="steps" if save_every and output_dir else "no", save_steps=save_every or ft.steps,
            seed=seed, data_seed=seed, full_determinism=device == "cpu", use_cpu=device == "cpu",
            bf16=device == "cuda", report_to=[], remove_unused_columns=False, disable_tqdm=True,
        )
        extra = {"locality_loss": (weight, locality_term(kind, top_k))} if weight > 0 else {}
        if anchor is not None:
            extra["trust_kl"] = (anchor_weight, anchor)
        trainer = MoETrainer(model=lm, args=args, train_dataset=blocks, aux_loss_coef=ft.aux_loss_coef,
                             top_k=top_k, extra_losses=extra)
        started = time.perf_counter()
        last = last_complete_checkpoint(output_dir) if resume and output_dir else None
        try:
            trainer.train(resume_from_checkpoint=last)
        finally:
            if anchor is not None:
                anchor.detach()
        seconds = time.perf_counter() - started
    lm.eval()
    return FinetuneResult(lm, trainer.state.log_history, seconds, trainable_parameters(lm), _peak_memory_mb(device))


@user_errors("python -m cfmoe.finetune")
def main(argv=None) -> None:
    """Fine-tune any MoE checkpoint on the study's fine-tuning articles (data.study_articles("finetune"));
    runs as is under `torchrun`/`accelerate launch`."""
    import argparse

    from . import model as model_lib
    from .config import load_config
    from .determinism import make_deterministic

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("model", help="a checkpoint directory or hub id")
    parser.add_argument("out", help="output directory: checkpoints/ and adapter/")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--kind", default="js", choices=LOSS_KINDS)
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--layers", default="", help="comma-separated MoE layers to fine-tune (default: all)")
    parser.add_argument("--steps", type=int, help="override the preset's finetune.steps (>= 1)")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)

    for name, value, low in (("--steps", args.steps, 1), ("--weight", args.weight, 0),
                             ("--save-every", args.save_every, 0)):
        if value is not None and not value >= low:  # `not >=` also rejects a NaN weight
            raise ValueError(f"{name} must be >= {low}, got {value}")
    try:
        layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    except ValueError:
        raise ValueError(f"--layers must be comma-separated integers, got {args.layers!r}") from None
    cfg = load_config(args.preset)
    ft = dataclasses.replace(cfg.finetune, steps=args.steps or cfg.finetune.steps)
    make_deterministic(cfg.seed, cfg.threads)
    lm, tokenizer = model_lib.load_model(args.model, device=cfg.device)
    from .daft import check_layers
    from .moe import describe

    check_layers(layers, len(describe(lm).layers))
    result = finetune(lm, finetune_blocks(tokenizer, ft.block_size), ft, args.kind, args.weight,
                      describe(lm).top_k, cfg.seed, cfg.device, layers, f"{args.out}/checkpoints",
                      args.save_every, args.resume)
    distributed = torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        result.model.save_pretrained(f"{args.out}/adapter")
        world = torch.distributed.get_world_size() if distributed else 1
        print(f"step {result.log[-1]['step']}: trained {result.trainable_params:,} parameters on {world} process(es) "
              f"in {result.train_seconds:.1f}s -> {args.out}/adapter")


if __name__ == "__main__":
    main()
