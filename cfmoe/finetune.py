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
    model: torch.nn.Module
    log: list[dict]
    train_seconds: float


def finetune(lm, blocks, ft: FinetuneConfig, kind: str, weight: float, top_k: int, seed: int = 0,
             device: str = "cpu", output_dir: str | None = None) -> FinetuneResult:
    """Fine-tune `lm` in place for `ft.steps` steps; weight 0 is the plain-LM control."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown locality loss kind {kind!r}; valid kinds: {', '.join(LOSS_KINDS)}")
    if weight < 0:
        raise ValueError(f"locality weight must be >= 0, got {weight}")
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
    return FinetuneResult(lm, trainer.state.log_history, seconds)
