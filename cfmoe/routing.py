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


# --- replaying a recorded routing stream ----------------------------------------------------------------------


def default_layer_map(n_model_layers: int, n_trace_layers: int) -> list[int]:
    """Model MoE layer l replays trace layer floor(l * n_trace_layers / n_model_layers): the trace's depth
    stretched (or squeezed) over the model's, first to first, in order. E.g. 6 stand-in layers over 27 paper
    layers: 0,0,0,0,0,1,1,1,1,2,... (each stand-in layer 4-5 times); 26 real layers over 27: 0..25 with one twice."""
    return [layer * n_trace_layers // n_model_layers for layer in range(n_model_layers)]


def concurrent_requests(stream: RoutingTrace, start: int, rows: int, prompt_tokens: int,
                        decode_tokens: int) -> RoutingTrace:
    """`rows` requests served as one batch, each a contiguous segment of `stream` (from token `start` on, one
    after another, wrapping at its end) of `prompt_tokens` prompt and `decode_tokens` decode tokens, in the order
    a batched `generate` consumes them: every row's prompt (row after row), then each decode step's rows. Each
    request keeps its own segment's temporal order; a long prompt is a stretch of the stream across recorded
    request boundaries (the stand-in's prompts are short)."""
    if rows < 1 or prompt_tokens < 1 or decode_tokens < 0:
        raise ValueError(f"rows {rows}, prompt_tokens {prompt_tokens}, decode_tokens {decode_tokens}: rows and "
                         "prompt_tokens must be at least 1 and decode_tokens at least 0")
    length = prompt_tokens + decode_tokens
    segments = (start + np.arange(rows)[:, None] * length + np.arange(length)[None, :]) % stream.n_tokens
    order = np.concatenate([segments[:, :prompt_tokens].reshape(-1), segments[:, prompt_tokens:].T.reshape(-1)])
    trace = stream.select(order)
    trace.phase = np.where(np.arange(len(order)) < rows * prompt_tokens, PREFILL, DECODE).astype(trace.phase.dtype)
    trace.meta.update(rows=rows, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, start=start)
    return trace


class RoutingReplay:
    """The position in the replayed stream (tokens consumed so far) and the layer map in use."""

    def __init__(self, trace: RoutingTrace, layer_map: list[int], cycle: bool):
        self.trace, self.layer_map, self.cycle = trace, layer_map, cycle
        self.position = [0] * len(layer_map)

    def take(self, layer: int, rows: int, like: torch.Tensor) -> torch.Tensor:
        """The next `rows` tokens' experts of the trace layer mapped to model layer `layer`."""
        start, n = self.position[layer], self.trace.n_tokens
        if start + rows > n and not self.cycle:
            raise ValueError(f"the replayed trace has {n} tokens and is exhausted: model MoE layer {layer} asked for "
                             f"tokens {start}..{start + rows - 1}; record a longer trace or pass cycle=True")
        picks = np.arange(start, start + rows) % n
        self.position[layer] = start + rows
        experts = self.trace.experts[picks, self.layer_map[layer]]
        return torch.as_tensor(experts.astype(np.int64)).to(device=like.device, dtype=like.dtype)

    def peek(self, layer: int, rows: int) -> np.ndarray:
        """The experts the next `rows` tokens of model layer `layer` will take, without taking them: an oracle
        (it knows future routing), for bounding what a predictor could do."""
        picks = np.arange(self.position[layer], self.position[layer] + rows) % self.trace.n_tokens
        return self.trace.experts[picks, self.layer_map[layer]]


@contextlib.contextmanager
def replay_routing(model: torch.nn.Module, trace: RoutingTrace, layer_map: list[int] | None = None,
                   cycle: bool = False) -> Iterator[RoutingReplay]:
    """Run `model` with every MoE layer's top-k choice replaced by a recorded stream: the n-th token the model
    computes (prefill tokens first, then one per decode step; batch rows in order) takes the trace's n-th token's
    experts of trace layer `layer_map[l]` (default `default_layer_map`). The router still runs and its weights
    for the slots are kept; only which experts compute changes. For measuring sizes we cannot train: a model of
    the paper's shape with the study's (or a real model's) routing. Hooks are removed on exit."""
    info = describe(model)
    n_layers = len(info.layers)
    layer_map = default_layer_map(n_layers, trace.n_layers) if layer_map is None else [int(x) for x in layer_map]
    if len(layer_map) != n_layers or not all(0 <= x < trace.n_layers for x in layer_map):
        raise ValueError(f"layer_map must give one trace layer in [0, {trace.n_layers}) for each of the model's "
                         f"{n_layers} MoE layers, got {layer_map}")
    if trace.top_k != info.top_k or trace.n_experts > info.n_experts:
        raise ValueError(f"the trace routes top-{trace.top_k} of {trace.n_experts} experts; the model routes "
                         f"top-{info.top_k} of {info.n_experts}: replay needs the same k and no more experts")
    replay = RoutingReplay(trace, layer_map, cycle)
    handles = [layer.experts.register_forward_pre_hook(_replay_hook(replay, i, layer.indices_arg), with_kwargs=True)
               for i, layer in enumerate(info.layers)]
    try:
        yield replay
    finally:
        for handle in handles:
            handle.remove()


def _replay_hook(replay: RoutingReplay, layer: int, name: str):
    def hook(module, args, kwargs):
        indices = args[1] if len(args) > 1 else kwargs[name]
        replayed = replay.take(layer, indices.shape[0], indices).reshape(indices.shape)
        if len(args) > 1:
            return (args[0], replayed, *args[2:]), kwargs
        return args, {**kwargs, name: replayed}
    return hook


# --- reading external traces ----------------------------------------------------------------------------------

CSV_COLUMNS = ("Layer ID", "Batch Number", "Token", "Activated Expert IDs")


def read_trace(path: str | os.PathLike, n_experts: int | None = None) -> RoutingTrace:
    """A `RoutingTrace` from the project's `.npz`, from a routing CSV, or from a directory of CSVs.

    CSV (the format in which the MoE-Beyond project released DeepSeek-V2-Lite routing): columns
    `Layer ID, Batch Number, Token, Activated Expert IDs`, one row per MoE layer per token, the expert ids a
    bracketed list ("[3, 17, 40]"). Layer ids may start anywhere: the sorted distinct ids become 0..L-1. Within a
    batch number, a layer's rows are its tokens in order; a batch of one token per layer is a decode step, a
    longer one a prefill. A `Token` that is an integer is kept as the token id (else 0). A directory reads its
    `prompt_<n>_data.csv` files in numeric order as consecutive requests. `n_experts` defaults to the largest
    id + 1."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("prompt_*_data.csv"), key=lambda p: _prompt_number(p))
        if not files:
            raise ValueError(f"{path}: no prompt_<n>_data.csv files in this directory")
        parts = [_read_csv(f) for f in files]
        return _trace_from_rows(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                                np.concatenate([p[2] for p in parts]), n_experts, path,
                                {"source": str(path), "requests": [len(p[0]) for p in parts]})
    if not path.is_file():
        raise ValueError(f"{path}: no such trace file or directory")
    if path.suffix == ".npz":
        return RoutingTrace.load(path)
    if path.suffix != ".csv":
        raise ValueError(f"{path}: unknown trace format {path.suffix!r}; valid: .npz, .csv or a directory of "
                         "prompt_<n>_data.csv files")
    experts, phase, tokens = _read_csv(path)
    return _trace_from_rows(experts, phase, tokens, n_experts, path, {"source": str(path)})


def _prompt_number(path: Path) -> int:
    middle = path.name[len("prompt_"):-len("_data.csv")]
    if not middle.isdecimal():
        raise ValueError(f"{path}: expected prompt_<n>_data.csv with an integer n")
    return int(middle)


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(experts (tokens, layers, k), phase, token ids) of one routing CSV."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, skipinitialspace=True)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise ValueError(f"{path}: not a readable CSV ({type(e).__name__})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in CSV_COLUMNS if c not in frame.columns]
    if missing or frame.empty:
        raise ValueError(f"{path}: expected columns {', '.join(CSV_COLUMNS)} and at least one row; missing {missing}")
    try:
        experts = [[int(x) for x in str(cell).strip().strip("[]").replace(",", " ").split()]
                   for cell in frame["Activated Expert IDs"]]
        layer_ids = frame["Layer ID"].astype(int).to_numpy()
        batches = frame["Batch Number"].astype(int).to_numpy()
    except ValueError as e:
        raise ValueError(f"{path}: Layer ID and Batch Number must be integers and Activated Expert IDs a bracketed "
                         f"list of integers ({e})") from None
    k = {len(row) for row in experts}
    if len(k) != 1 or 0 in k:
        raise ValueError(f"{path}: every row must activate the same number of experts, got {sorted(k)}")
    layers = np.unique(layer_ids)
    layer = np.searchsorted(layers, layer_ids)
    experts = np.asarray(experts, dtype=np.int64)
    if experts.min() < 0:
        raise ValueError(f"{path}: expert ids must be >= 0, got {experts.min()}")
    token_text = frame["Token"].to_numpy()
    out_experts, out_phase, out_tokens = [], [], []
    for batch in dict.fromkeys(batches):  # batch numbers in file order
        rows = batches == batch
        counts = np.bincount(layer[rows], minlength=len(layers))
        if counts.min() != counts.max():
            raise ValueError(f"{path}: batch {batch} has {counts.min()} to {counts.max()} rows per layer; every MoE "
                             "layer must route every token once")
        n = counts[0]
        block = np.empty((n, len(layers), experts.shape[1]), np.int64)
        ids = np.zeros(n, np.int64)
        for index in range(len(layers)):
            mine = rows & (layer == index)
            block[:, index] = experts[mine]
            if index == 0:
                ids = np.array([int(t) if str(t).strip().isdecimal() else 0
                                for t in token_text[mine]])
        out_experts.append(block)
        out_phase.append(np.full(n, DECODE if n == 1 else PREFILL))
        out_tokens.append(ids)
    return np.concatenate(out_experts), np.concatenate(out_phase), np.concatenate(out_tokens)


def _trace_from_rows(experts, phase, tokens, n_experts, path, meta) -> RoutingTrace:
    largest = int(experts.max()) + 1
    n_experts = largest if n_experts is None else int(n_experts)
    if largest > n_experts:
        raise ValueError(f"{path}: expert id {largest - 1} is out of range for n_experts={n_experts}")
    return RoutingTrace(experts, None, phase, tokens, n_experts, meta)
