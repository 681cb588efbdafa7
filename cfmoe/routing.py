"""Routing traces: the experts each token really used in every MoE layer, recorded from the model's own forward.

    traces = trace_generate(model, tokenizer, ["The cat", "A dog ran"], max_new_tokens=32)
    traces[0].decode.experts  # (n_decode_tokens, n_moe_layers, top_k)

Experts are read where the MoE block hands them to its fused experts module (a forward pre-hook), so a trace is
what the model computed, not a recomputation. Probabilities are the full router vectors: softmax of the router
logits for softmax routers; for sigmoid routers (DeepSeek-V3) the sigmoid scores divided by their sum, without the
selection-only e_score_correction_bias.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from cfmoe.moe import MoEModelInfo, describe, unwrap
from cfmoe.provenance import atomic_path

PREFILL, DECODE = 0, 1
SCHEMA_VERSION = 1
_ARRAYS = ("experts", "phase", "token_ids")
_SCALARS = ("schema_version", "n_experts", "meta")


@dataclass(eq=False)
class RoutingTrace:
    """One sequence's per-token experts of every MoE layer (plus phase, token ids, optional router probabilities)."""

    experts: np.ndarray  # (n_tokens, n_layers, top_k) int16, int32 if n_experts > 32767
    probs: np.ndarray | None  # (n_tokens, n_layers, n_experts) float16
    phase: np.ndarray  # (n_tokens,) uint8, PREFILL or DECODE
    token_ids: np.ndarray  # (n_tokens,) int32
    n_experts: int
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        """Validate, then cast the arrays to their canonical dtypes."""
        self.n_experts = int(self.n_experts)
        self.experts = np.asarray(self.experts)
        self.phase, self.token_ids = np.asarray(self.phase), np.asarray(self.token_ids)
        _check(self)
        self.experts = self.experts.astype(np.int16 if self.n_experts <= 2**15 else np.int32, copy=False)
        self.phase = self.phase.astype(np.uint8, copy=False)
        self.token_ids = self.token_ids.astype(np.int32, copy=False)
        if self.probs is not None:
            self.probs = np.asarray(self.probs).astype(np.float16, copy=False)

    @property
    def n_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def n_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    @property
    def prefill(self) -> RoutingTrace:
        """The sub-trace of prompt tokens."""
        return self.select(self.phase == PREFILL)

    @property
    def decode(self) -> RoutingTrace:
        """The sub-trace of generated tokens."""
        return self.select(self.phase == DECODE)

    def select(self, tokens) -> RoutingTrace:
        """The sub-trace of the tokens picked by a boolean mask, slice or index array."""
        return RoutingTrace(self.experts[tokens], None if self.probs is None else self.probs[tokens],
                            self.phase[tokens], self.token_ids[tokens], self.n_experts, dict(self.meta))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the trace atomically to one .npz file (meta as JSON)."""
        arrays = {name: getattr(self, name) for name in _ARRAYS}
        if self.probs is not None:
            arrays["probs"] = self.probs
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, schema_version=np.int32(SCHEMA_VERSION), n_experts=np.int32(self.n_experts),
                     meta=np.str_(json.dumps(self.meta)), **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RoutingTrace:
        """Read a trace written by `save`, validating schema version, shapes, dtypes and value ranges."""
        try:
            with np.load(path, allow_pickle=False) as npz:
                stored = {name: npz[name] for name in npz.files}
        except (OSError, ValueError, EOFError, KeyError, RuntimeError, zipfile.BadZipFile, zlib.error) as e:
            # what zipfile and numpy raise on damaged archives
            raise ValueError(f"{path}: not a readable routing trace .npz ({type(e).__name__}: {e})") from None
        missing = {*_SCALARS, *_ARRAYS} - set(stored)
        if missing:
            raise ValueError(f"{path}: not a routing trace, missing {sorted(missing)}")
        if any(stored[name].shape != () for name in _SCALARS):
            raise ValueError(f"{path}: {', '.join(_SCALARS)} must be scalars")
        if stored["schema_version"].dtype.kind != "i" or int(stored["schema_version"]) != SCHEMA_VERSION:
            raise ValueError(f"{path}: schema_version {stored['schema_version']}, expected {SCHEMA_VERSION}")
        canonical = {"experts": (np.int16, np.int32), "phase": (np.uint8,), "token_ids": (np.int32,),
                     "probs": (np.float16,)}
        for name, dtypes in canonical.items():
            if name in stored and stored[name].dtype not in dtypes:
                raise ValueError(f"{path}: {name} has dtype {stored[name].dtype}, expected {dtypes[0].__name__}")
        try:
            return cls(stored["experts"], stored.get("probs"), stored["phase"], stored["token_ids"],
                       int(stored["n_experts"]), json.loads(str(stored["meta"])))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _check(trace: RoutingTrace) -> None:
    """Raise ValueError unless the trace's shapes, dtypes and value ranges are consistent."""
    experts, phase, tokens, probs = trace.experts, trace.phase, trace.token_ids, trace.probs
    if experts.ndim != 3 or not np.issubdtype(experts.dtype, np.integer):
        raise ValueError(f"experts must be an integer array (n_tokens, n_layers, top_k), got {experts.dtype} "
                         f"{experts.shape}")
    if trace.n_experts < 1 or (experts.size and not 0 <= experts.min() <= experts.max() < trace.n_experts):
        raise ValueError(f"experts must lie in [0, n_experts={trace.n_experts})")
    for name, array in (("phase", phase), ("token_ids", tokens)):
        if array.shape != experts.shape[:1] or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} must be an integer array of shape {experts.shape[:1]}, got {array.dtype} "
                             f"{array.shape}")
    if not np.isin(phase, (PREFILL, DECODE)).all():
        raise ValueError(f"phase must be {PREFILL} (prefill) or {DECODE} (decode), got {np.unique(phase)}")
    if tokens.size and tokens.min() < 0:
        raise ValueError(f"token_ids must be >= 0, got {tokens.min()}")
    if not isinstance(trace.meta, dict):
        raise ValueError(f"meta must be a dict, got {type(trace.meta).__name__}")
    if probs is not None:
        probs = np.asarray(probs)
        if probs.shape != (*experts.shape[:2], trace.n_experts):
            raise ValueError(f"probs must have shape {(*experts.shape[:2], trace.n_experts)}, got {probs.shape}")
        if probs.size and not (np.isfinite(probs).all() and 0 <= probs.min() and probs.max() <= 1):
            raise ValueError("probs must be finite probabilities in [0, 1]")


class RoutingRecorder:
    """What `record_routing` captured: per MoE layer, the top-k indices (and router logits) of every forward."""

    def __init__(self, info: MoEModelInfo, record_probs: bool):
        self.info = info
        self.indices: list[list[torch.Tensor]] = [[] for _ in info.layers]
        self.logits: list[list[torch.Tensor]] | None = [[] for _ in info.layers] if record_probs else None

    @property
    def n_calls(self) -> int:
        """How many forward passes went through the MoE layers."""
        return len(self.indices[0])

    def calls(self) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Per forward pass: experts (rows, layers, k), probs (rows, layers, experts) or None; rows = batch x seq."""
        if len({len(per_layer) for per_layer in self.indices}) != 1:
            raise RuntimeError("MoE layers saw different numbers of forward passes; was a layer skipped?")
        if not self.n_calls:
            return []
        sizes = np.cumsum([t.shape[0] for t in self.indices[0]])[:-1]
        experts = torch.stack([torch.cat(per_layer) for per_layer in self.indices], dim=1).cpu().numpy()
        if self.logits is None:
            return [(e, None) for e in np.split(experts, sizes)]
        probs = torch.stack([_probs(torch.cat(per_layer), layer.scoring)
                             for per_layer, layer in zip(self.logits, self.info.layers)], dim=1).cpu().numpy()
        return list(zip(np.split(experts, sizes), np.split(probs, sizes)))


def _probs(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Router probability vectors (float16) from logits, per the router's scoring function."""
    logits = logits.float()
    if scoring == "sigmoid":
        scores = logits.sigmoid()
        return (scores / scores.sum(-1, keepdim=True)).half()
    return logits.softmax(-1).half()


@contextlib.contextmanager
def record_routing(model: torch.nn.Module, record_probs: bool = False) -> Iterator[RoutingRecorder]:
    """Hook every MoE layer while the block runs; the hooks are removed on exit, also on an exception."""
    info = describe(model)
    recorder = RoutingRecorder(info, record_probs)
    handles = []
    for layer, indices in zip(info.layers, recorder.indices):
        handles.append(layer.experts.register_forward_pre_hook(_indices_hook(indices, layer.indices_arg),
                                                               with_kwargs=True))
    if record_probs:
        for layer, logits in zip(info.layers, recorder.logits):
            handles.append(layer.router.register_forward_hook(_logits_hook(logits)))
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


def _indices_hook(sink: list, name: str):
    """A pre-hook keeping the top-k indices the block passes to its experts module (on device, no copy)."""
    def hook(module, args, kwargs):
        sink.append(args[1] if len(args) > 1 else kwargs[name])
    return hook


def _logits_hook(sink: list):
    """A forward hook keeping the logits a router returns first (on device, no copy)."""
    def hook(module, args, output):
        sink.append(output[0].detach())
    return hook


def _meta(info: MoEModelInfo, source: str, **extra) -> dict:
    return {"source": source, "architecture": info.architecture, "scoring": info.layers[0].scoring,
            "decoder_layers": [layer.decoder_layer for layer in info.layers], **extra}


def _batch(x) -> torch.Tensor:
    """A (batch, seq) CPU tensor from a tensor, array or list; one sequence becomes a batch of one."""
    x = x.cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return x[None] if x.ndim == 1 else x


def trace_forward(model: torch.nn.Module, input_ids, attention_mask=None,
                  record_probs: bool = False) -> list[RoutingTrace]:
    """Teacher-forced routing of a (padded) batch, one prefill-labelled trace per sequence, padding dropped."""
    input_ids = _batch(input_ids)
    mask = torch.ones_like(input_ids) if attention_mask is None else _batch(attention_mask)
    if input_ids.ndim != 2 or mask.shape != input_ids.shape:
        raise ValueError(f"input_ids must be (batch, seq) with an attention_mask of the same shape, got "
                         f"{tuple(input_ids.shape)} and {tuple(mask.shape)}")
    device = unwrap(model).device
    # positions count real tokens only, as generate() does, so left padding does not shift the sequence
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), record_routing(model, record_probs) as recorder:
        model(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device),
              use_cache=False)
    (experts, probs), = recorder.calls()
    batch, seq = input_ids.shape
    experts = experts.reshape(batch, seq, *experts.shape[1:])
    probs = None if probs is None else probs.reshape(batch, seq, *probs.shape[1:])
    return [RoutingTrace(experts[b, keep], None if probs is None else probs[b, keep], np.full(keep.sum(), PREFILL),
                         input_ids[b].numpy()[keep], recorder.info.n_experts, _meta(recorder.info, "trace_forward"))
            for b, keep in enumerate(mask.bool().numpy())]


class _EosProcessed(StoppingCriteria):
    """Marks a sequence done once its EOS token has itself gone through the model, so its routing is recorded."""

    def __init__(self, prompt_len: int, eos: torch.Tensor):
        self.prompt_len, self.eos = prompt_len, eos

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        # the last position is the token just sampled: not yet run through the model
        return torch.isin(input_ids[:, self.prompt_len:-1], self.eos.to(input_ids.device)).any(-1)


def trace_generate(model: torch.nn.Module, tokenizer, prompts: list[str], record_probs: bool = False,
                   **generate_kwargs) -> list[RoutingTrace]:
    """Routing of `model.generate()` (KV cache, left-padded batch): the prompt as prefill, then decode tokens."""
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")
    # A trace keeps the prompt and up to max_new_tokens generated tokens, cut after the first EOS (eos_token_id, else
    # the generation config's, else the tokenizer's; [] for none). Each kept token must have been run through the
    # model, so generate() runs one step past the last one (its output is discarded) and stops on EOS one step late.
    max_new_tokens = generate_kwargs.pop("max_new_tokens", 20)
    config = copy.deepcopy(generate_kwargs.pop("generation_config", None) or unwrap(model).generation_config)
    user_criteria = generate_kwargs.pop("stopping_criteria", [])
    eos = generate_kwargs.pop("eos_token_id", None)
    eos = config.eos_token_id if eos is None else eos
    eos = tokenizer.eos_token_id if eos is None else eos
    eos = torch.tensor([] if eos is None else eos, dtype=torch.long).reshape(-1)
    model_kwargs = config.update(**generate_kwargs)
    config.update(eos_token_id=None, max_new_tokens=max_new_tokens + 1, pad_token_id=tokenizer.pad_token_id)
    if (config.num_beams or 1) != 1 or (config.num_return_sequences or 1) != 1:
        raise ValueError(f"trace_generate needs one sequence per prompt, got num_beams={config.num_beams}, "
                         f"num_return_sequences={config.num_return_sequences}; both must be 1")
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    mask = enc["attention_mask"]
    if (mask.sum(-1) == 0).any():
        raise ValueError("every prompt must tokenize to at least one token; got an empty prompt")
    batch, prompt_len = enc["input_ids"].shape
    stopping = StoppingCriteriaList([*user_criteria, _EosProcessed(prompt_len, eos)])
    device = unwrap(model).device
    with torch.no_grad(), record_routing(model, record_probs) as recorder:
        out = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=mask.to(device),
                             generation_config=config, stopping_criteria=stopping, **model_kwargs)
    sequences = getattr(out, "sequences", out).cpu()
    calls = recorder.calls()
    rows = [experts.shape[0] for experts, _ in calls]
    if not calls or rows[0] != batch * prompt_len or any(r != batch for r in rows[1:]):
        raise RuntimeError(f"expected one prefill pass of {batch}x{prompt_len} rows then one row per sequence "
                           f"per step, got rows {rows}")
    experts = np.concatenate([e.reshape(batch, -1, *e.shape[1:]) for e, _ in calls], axis=1)
    probs = np.concatenate([p.reshape(batch, -1, *p.shape[1:]) for _, p in calls], axis=1) if record_probs else None
    n_steps = len(calls) - 1  # generated tokens that went through the model
    traces = []
    for b in range(batch):
        eos_at = torch.isin(sequences[b, prompt_len:prompt_len + n_steps], eos).nonzero()
        n_new = int(eos_at[0]) + 1 if len(eos_at) else n_steps
        keep = torch.cat([mask[b].bool(), torch.arange(n_steps) < n_new])
        phase = np.repeat([PREFILL, DECODE], [int(mask[b].sum()), n_new])
        traces.append(RoutingTrace(experts[b, keep.numpy()], None if probs is None else probs[b, keep.numpy()],
                                   phase, sequences[b, :prompt_len + n_steps][keep].numpy(), recorder.info.n_experts,
                                   _meta(recorder.info, "trace_generate", max_new_tokens=max_new_tokens)))
    return traces
