"""Locality-aware fine-tuning (CFMoE): LM loss + λ·locality loss on the router logits, balance loss weight 0.

    blocks = finetune_blocks(tokenizer, block_size=256)
    tuned = finetune(lm, blocks, cfg.finetune, kind="js", weight=1.0, top_k=6, seed=0).model
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import torch
from transformers import TrainingArguments

from . import data
from .config import FinetuneConfig
from .locality import LOSS_KINDS, LocalityLoss, consecutive_pair_mask
from .training import MoETrainer


def finetune_blocks(tokenizer, block_size: int, split: str = "validation"):
    """WikiText-2 `split` as plain LM blocks with document ids (the locality loss masks article boundaries)."""
    import datasets

    articles = data.load_wikitext(split)
    if split == "test":
        raise ValueError("never fine-tune on the WikiText-2 test split; use 'validation'")
    ids = tokenizer([data.document_text(t, x) for t, x in zip(articles["title"], articles["text"])],
                    add_special_tokens=False)["input_ids"]
    packed = data.pack_blocks(ids, block_size, tokenizer.eos_token_id)
    return datasets.Dataset.from_dict({**packed, "labels": packed["input_ids"]}).with_format("torch")


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


def finetune(lm, blocks, ft: FinetuneConfig, kind: str, weight: float, top_k: int, seed: int = 0,
             device: str = "cpu", layers: list[int] | None = None, output_dir: str | None = None) -> FinetuneResult:
    """Fine-tune `lm` for `ft.steps` steps (LoRA on MoE `layers`, all when None); weight 0 is the control."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown locality loss kind {kind!r}; valid kinds: {', '.join(LOSS_KINDS)}")
    if weight < 0:
        raise ValueError(f"locality weight must be >= 0, got {weight}")
    from .daft import lora_model, trainable_parameters

    torch.manual_seed(seed)  # LoRA's initialisation
    lm = lora_model(lm, layers, ft.lora_rank) if ft.lora_rank else lm
    _reset_peak_memory(device)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=output_dir or scratch, max_steps=ft.steps, per_device_train_batch_size=ft.batch_size,
            learning_rate=ft.learning_rate, warmup_steps=ft.warmup_steps, lr_scheduler_type="cosine",
            weight_decay=0.0, max_grad_norm=1.0, logging_steps=max(1, ft.steps // 10), save_strategy="no",
            seed=seed, data_seed=seed, full_determinism=device == "cpu", use_cpu=device == "cpu",
            bf16=device == "cuda", report_to=[], remove_unused_columns=False, disable_tqdm=True,
        )
        extra = {"locality_loss": (weight, locality_term(kind, top_k))} if weight > 0 else {}
        trainer = MoETrainer(model=lm, args=args, train_dataset=blocks, aux_loss_coef=ft.aux_loss_coef,
                             top_k=top_k, extra_losses=extra)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    lm.eval()
    return FinetuneResult(lm, trainer.state.log_history, seconds, trainable_parameters(lm), _peak_memory_mb(device))
