"""The default base model: a byte-level BPE tokenizer and a Qwen2-MoE shaped like DeepSeek-MoE-16B.

    from cfmoe import model
    lm, tok = model.load_model("artifacts/cpu/base_model")   # or any HF MoE checkpoint / hub id
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer,
                          PreTrainedTokenizerFast, Qwen2MoeConfig, Qwen2MoeForCausalLM, TrainerCallback,
                          TrainingArguments)

from . import data
from .config import PretrainConfig, StudyConfig
from .determinism import make_deterministic
from .training import BiasBalance, MoETrainer

EOS, PAD, UNK = "<|endoftext|>", "<|pad|>", "<unk>"
HELDOUT_EVAL_BLOCKS = 128
BUILD_FILE = "cfmoe_build.json"


def train_tokenizer(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained with `tokenizers` (single-threaded, so merges are reproducible)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # WikiText's <unk> placeholder becomes one special token, dropped when decoding.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD, UNK], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, model_max_length=1 << 30)


def build_config(cfg: StudyConfig, tokenizer) -> Qwen2MoeConfig:
    """A transformers-native MoE config: softmax top-k router, one shared expert, optional dense first layers."""
    m = cfg.model
    return Qwen2MoeConfig(
        vocab_size=len(tokenizer), hidden_size=m.hidden_size, intermediate_size=m.dense_width,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_heads,
        max_position_embeddings=m.max_positions, tie_word_embeddings=True,
        num_experts=m.n_experts, num_experts_per_tok=m.top_k, moe_intermediate_size=m.expert_width,
        shared_expert_intermediate_size=m.shared_width, norm_topk_prob=False, decoder_sparse_step=1,
        mlp_only_layers=list(range(m.dense_layers)),
        # the trainer adds a per-layer balance loss; the model's own pooled one stays off
        router_aux_loss_coef=0.0, output_router_logits=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


# pre-training options added after models were built: hashed only when set away from their default, so that a
# model built before an option existed (which trained as its default does) stays current
LATER_PRETRAIN_OPTIONS = ("balance_horizon", "bias_balance_rate")


def build_fingerprint(cfg: StudyConfig) -> str:
    """Hash of everything the base model depends on; a saved model with another hash is rebuilt."""
    defaults = PretrainConfig()
    pretrain = {k: v for k, v in asdict(cfg.pretrain).items()
                if k not in LATER_PRETRAIN_OPTIONS or v != getattr(defaults, k)}
    inputs = {"model": asdict(cfg.model), "pretrain": pretrain, "seed": cfg.seed,
              "threads": cfg.threads, "device": cfg.device, "data": data.CHECKSUMS,
              "heldout_articles_every": data.HELDOUT_EVERY, "heldout_eval_blocks": HELDOUT_EVAL_BLOCKS}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def pretraining_data(cfg: StudyConfig):
    """The tokenizer (trained on the training documents only) and the packed training and held-out blocks."""
    p = cfg.pretrain
    corpus = data.pretraining_corpus(p.max_documents, p.heldout_fraction)
    # held-out documents (validation loss, early stopping) are never trained on; the test split is never used
    is_heldout = np.asarray(corpus["heldout"])
    train_docs = corpus.select(np.flatnonzero(~is_heldout))
    heldout_docs = corpus.select(np.flatnonzero(is_heldout))
    tokenizer = train_tokenizer((data.document_text(t, x) for t, x in zip(train_docs["title"], train_docs["text"])),
                                cfg.model.vocab_size)
    counts = {"train": train_docs.num_rows, "heldout": heldout_docs.num_rows}
    return (tokenizer, data.pack_documents(tokenizer, train_docs, p.block_size),
            data.pack_documents(tokenizer, heldout_docs, p.block_size), counts)


def train_base(cfg: StudyConfig, tokenizer, train_blocks, heldout: dict, output_dir: str | Path):
    """Pre-train a fresh base model on `train_blocks` (a torch dataset of packed blocks) with the preset's
    settings, evaluating on the held-out packed blocks `heldout` (loss, routing locality and balance) every
    `eval_every` steps; the best held-out loss's weights are kept. Returns (model, trainer, KeepBestCallback)."""
    p = cfg.pretrain
    torch.manual_seed(cfg.seed)
    lm = Qwen2MoeForCausalLM(build_config(cfg, tokenizer)).to(cfg.device)
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=p.max_steps, per_device_train_batch_size=p.batch_size,
        per_device_eval_batch_size=p.batch_size, learning_rate=p.learning_rate, warmup_steps=p.warmup_steps,
        weight_decay=p.weight_decay, lr_scheduler_type="cosine", adam_beta2=0.95, max_grad_norm=1.0,
        logging_steps=max(1, min(25, p.max_steps // 20)), eval_strategy="steps", eval_steps=p.eval_every,
        save_strategy="no", seed=cfg.seed, data_seed=cfg.seed,
        full_determinism=cfg.device == "cpu", bf16=p.precision == "bf16", use_cpu=cfg.device == "cpu",
        report_to=[], remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
    )
    keep_best = KeepBestCallback(p.early_stopping_patience, p.time_limit_minutes * 60)
    # held-out loss on at most HELDOUT_EVAL_BLOCKS blocks (spread over the held-out documents): an estimate precise
    # enough for early stopping at a fraction of the cost of all of them
    idx = np.linspace(0, len(heldout["input_ids"]) - 1, min(HELDOUT_EVAL_BLOCKS, len(heldout["input_ids"]))).astype(int)
    eval_blocks = {k: v[np.unique(idx)] for k, v in heldout.items()}
    probe = HeldoutRoutingCallback(eval_blocks, cfg.model.n_experts, cfg.model.top_k)
    balance = [BiasBalance(lm, p.bias_balance_rate)] if p.bias_balance_rate else []
    trainer = MoETrainer(model=lm, args=args, train_dataset=train_blocks, eval_dataset=_TorchBlocks(eval_blocks),
                         aux_loss_coef=p.aux_loss_coef, top_k=cfg.model.top_k, callbacks=[*balance, probe, keep_best],
                         balance_horizon=p.balance_horizon)
    return lm, trainer, keep_best


def pretrain(cfg: StudyConfig, out_dir: str | Path) -> Path:
    """Train the tokenizer and the base MoE from scratch on the pre-training corpus; save to `out_dir`."""
    out_dir = Path(out_dir)
    make_deterministic(cfg.seed, cfg.threads)
    p = cfg.pretrain
    started = time.perf_counter()
    tokenizer, train_packed, heldout_packed, counts = pretraining_data(cfg)
    tokenizer_seconds = time.perf_counter() - started
    train_blocks = data.blocks_dataset(train_packed)
    work = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    lm, trainer, keep_best = train_base(cfg, tokenizer, train_blocks, heldout_packed, work / "checkpoints")
    train_output = trainer.train()
    train_seconds = time.perf_counter() - started - tokenizer_seconds

    lm.save_pretrained(work, safe_serialization=True)
    tokenizer.save_pretrained(work)
    n_train_tokens = int(train_blocks.num_rows * p.block_size)
    build = {
        "fingerprint": build_fingerprint(cfg), "config": cfg.to_dict(), "seed": cfg.seed,
        "train_tokens_per_epoch": n_train_tokens, "heldout_tokens": int(heldout_packed["input_ids"].size),
        "documents": counts,
        "steps": trainer.state.global_step, "best_step": keep_best.best_step,
        "best_heldout_loss": keep_best.best_loss,
        "train_seconds": round(train_seconds, 1), "tokenizer_seconds": round(tokenizer_seconds, 1),
        "train_tokens_per_second": round(trainer.state.global_step * p.batch_size * p.block_size / train_seconds, 1),
        "train_loss": train_output.training_loss,
    }
    (work / "training_log.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    (work / BUILD_FILE).write_text(json.dumps(build, indent=2, sort_keys=True))
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    work.rename(out_dir)
    return out_dir


class _TorchBlocks(torch.utils.data.Dataset):
    """Packed blocks (`data.pack_blocks`) as a torch dataset of LM examples; labels are the inputs."""

    def __init__(self, packed: dict):
        self.packed = packed

    def __len__(self):
        return len(self.packed["input_ids"])

    def __getitem__(self, i):
        ids = torch.as_tensor(self.packed["input_ids"][i])
        return {"input_ids": ids, "labels": ids, "document_ids": torch.as_tensor(self.packed["document_ids"][i])}


class HeldoutRoutingCallback(TrainerCallback):
    """At each evaluation, the held-out blocks' routing locality and balance, appended to the training log:
    `heldout_ecr_over_k_e` (ECR / (k/E), pairs inside one document and block) and `heldout_max_load_ratio` (the
    busiest expert of the worst layer over the uniform share). The blocks are capped at `max_blocks`."""

    def __init__(self, heldout: dict, n_experts: int, top_k: int, max_blocks: int = 64):
        self.blocks = {k: v[:max_blocks] for k, v in heldout.items()}
        self.n_experts, self.top_k = n_experts, top_k

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        from . import evaluate, metrics

        was_training = model.training
        ppl, experts = evaluate.record_test(model, self.blocks, args.per_device_eval_batch_size)
        model.train(was_training)
        loc = evaluate.locality(ppl, experts, self.blocks)
        state.log_history.append({
            "step": state.global_step, "heldout_ecr_over_k_e": loc["test_ecr"] / (self.top_k / self.n_experts),
            "heldout_max_load_ratio": float(metrics.max_load_ratio(experts, self.n_experts).max())})


class KeepBestCallback(TrainerCallback):
    """Keep the weights of the best held-out loss in memory; restore them at the end; stop on a plateau
    or when the time budget is spent.

    (The Trainer's own load_best_model_at_end reloads checkpoints without transformers 5's
    fused-expert weight conversion, silently leaving the experts at their last values.)
    """

    def __init__(self, patience: int = 0, time_limit_s: float = 0.0):
        self.patience, self.time_limit_s = patience, time_limit_s
        self.best_loss, self.best_step, self.best_state, self.bad_evals = float("inf"), None, None, 0
        self.started = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.time_limit_s and time.perf_counter() - self.started > self.time_limit_s:
            control.should_training_stop = control.should_evaluate = True

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        loss = metrics["eval_loss"]
        if loss < self.best_loss:
            self.best_loss, self.best_step, self.bad_evals = loss, state.global_step, 0
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            self.bad_evals += 1
            if self.patience and self.bad_evals >= self.patience:
                control.should_training_stop = True

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


def base_model_dir(cfg: StudyConfig) -> Path:
    return cfg.artifacts_dir / "base_model"


def build_or_load(cfg: StudyConfig, force: bool = False):
    """The project's base model for this preset: reused when its fingerprint matches, else pre-trained."""
    out = base_model_dir(cfg)
    build_file = out / BUILD_FILE
    stale = not build_file.is_file() or json.loads(build_file.read_text()).get("fingerprint") != build_fingerprint(cfg)
    if force or stale:
        pretrain(cfg, out)
    return load_model(out, device=cfg.device)


def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """Load any transformers MoE causal LM (a local directory or a hub id) and its tokenizer.

    Raises a one-line ValueError (`check_model_path`) when the path does not exist, is a file, is not a causal
    LM, has no MoE layer or no usable tokenizer, before any weight is loaded.
    """
    name = str(path)
    tokenizer = check_model_path(name)
    lm = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or "auto").to(device).eval()
    return lm, tokenizer


def check_model_path(name: str):
    """Check, without loading weights, that `name` is a directory (or hub id) of an MoE causal LM with a
    usable tokenizer; returns the tokenizer. One-line ValueErrors otherwise."""
    from . import moe

    name = str(name)
    local = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or local.exists() or name.count("/") > 1
    supported = ", ".join(moe.SUPPORTED_ARCHITECTURES)
    if looks_local and local.is_file():
        raise ValueError(f"model_path {name!r} is a file; pass the directory a model was saved to with save_pretrained")
    if looks_local and not local.is_dir():
        raise ValueError(f"model_path {name!r} does not exist; pass a directory saved with save_pretrained "
                         f"or a hub id of one of {supported}")
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ValueError(f"model_path {name!r} is not a transformers model ({str(err).splitlines()[0]})") from None
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise ValueError(f"model_path {name!r} is a {config.model_type!r} model, not a causal LM; supported MoE "
                         f"architectures: {supported}")
    with torch.device("meta"):  # the layer structure without the weights: a dense model is refused before loading
        skeleton = AutoModelForCausalLM.from_config(config)
    try:
        moe.describe(skeleton)
    except ValueError:
        raise ValueError(f"model_path {name!r} ({config.model_type}) has no MoE layer; supported architectures: "
                         f"{supported}") from None
    del skeleton
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"model_path {name!r} has no usable tokenizer ({str(err).splitlines()[0]}); save one "
                         "next to the model with tokenizer.save_pretrained") from None
    if not tokenizer("hello world")["input_ids"]:
        raise ValueError(f"model_path {name!r} has no usable tokenizer (it encodes 'hello world' to no tokens); "
                         "save one next to the model with tokenizer.save_pretrained")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_info(path: str | Path) -> dict:
    """The pre-training record saved next to the project's base model ({} for other checkpoints)."""
    build_file = Path(path) / BUILD_FILE
    return json.loads(build_file.read_text()) if build_file.is_file() else {}


def training_log(path: str | Path) -> list[dict]:
    log = Path(path) / "training_log.json"
    return json.loads(log.read_text()) if log.is_file() else []
