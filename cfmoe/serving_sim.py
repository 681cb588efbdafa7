"""One request (prompt prefill + generated decode) through an expert cache, unified or prefill/decode-disaggregated.

    result = simulate_request(experts, phase, 64, "lru", capacity=256, mode="disaggregated_warm", expert_bytes=4.866e6)
    print(result.decode_hit_rate, result.decode_loaded_bytes / 1e9)

Prefill runs the whole prompt layer by layer, so each layer needs the union of the experts its prompt tokens
selected, each once; decode needs each token's k experts per layer (`access_keys` order). Modes:

- `unified`: prefill's needs go through the decode cache (same policy and capacity) before decode, evicting its
  working set; prefill loads its misses.
- `disaggregated`: prefill streams each layer's experts through a staging buffer of one layer's experts
  (n_experts slots), reading in place those already in the decode cache; the decode cache is left as it was
  (empty for a first request).
- `disaggregated_warm`: like `disaggregated`, then the decode cache is seeded from the prompt's routing
  (`warm_seed`); seeds are copied from the staging buffer while prefill streams them, so they cost no
  slow-storage bytes. Seeds become the most recent entries, after any earlier contents (all with an access
  count of 1 from then on).

Time (given a device profile) follows the cost model, memory-bound with compute ignored: prefill reads the
resident weights once and each needed expert once, from fast memory if cached, else from slow storage; each
decode token reads the resident weights and its experts likewise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cfmoe.cache import CacheResult, access_keys, default_lookahead, simulate_cache
from cfmoe.costmodel import DeviceProfile

MODES = ("unified", "disaggregated", "disaggregated_warm")


@dataclass(frozen=True, eq=False)
class RequestResult:
    """Decode hits, bytes loaded, fast-memory peak and (with a profile) time of one simulated request."""

    mode: str
    policy: str
    capacity: int
    scope: str
    prefill_tokens: int
    decode_tokens: int
    prefill_accesses: int  # (layer, expert) pairs the prompt needs
    decode_hits: int
    decode_misses: int
    prefill_loaded_bytes: float
    decode_loaded_bytes: float
    peak_memory_bytes: float  # resident + decode cache (+ staging buffer when disaggregated)
    prefill_s: float  # NaN without a device profile
    decode_s: float
    final: CacheResult  # the decode cache at the end, to continue with the next request

    @property
    def decode_hit_rate(self) -> float:
        accesses = self.decode_hits + self.decode_misses
        return self.decode_hits / accesses if accesses else float("nan")

    @property
    def time_s(self) -> float:
        return self.prefill_s + self.decode_s

    def row(self) -> dict:
        """The scalar fields and derived rates, one table row."""
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "final"}
        return fields | {"decode_hit_rate": self.decode_hit_rate, "time_s": self.time_s,
                         "decode_tokens_per_s": self.decode_tokens / self.decode_s if self.decode_s else np.nan}


def prefill_keys(prompt: np.ndarray, n_experts: int) -> np.ndarray:
    """Cache keys prefill needs: per layer in order, each expert any prompt token selected, once, ascending."""
    per_layer = [np.unique(prompt[:, layer]) + layer * n_experts for layer in range(prompt.shape[1])]
    return np.concatenate(per_layer).astype(np.int64)


def warm_seed(prompt: np.ndarray, n_experts: int, capacity: int, scope: str = "global", tokens: int = 8,
              decay: float = 0.5) -> np.ndarray:
    """Decode-cache seeds from the prompt's routing, oldest first.

    Each expert of each layer scores sum(decay ** age) over the last `tokens` prompt tokens that selected it
    (age 0 for the last token). Per layer experts are ranked by score (ties: lower id first). Global scope
    fills `capacity` evenly across layers: every layer's rank-0 expert, then rank 1, ... (within a rank,
    higher score first, then lower layer); per-layer scope takes each layer's top `capacity`. Seeds come
    layer by layer, within a layer lowest score first, as if the prompt's last token had just used them.
    """
    recent = prompt[-tokens:] if tokens > 0 else prompt[:0]
    n_layers = prompt.shape[1]
    weights = decay ** np.arange(len(recent))[::-1]
    score = np.zeros((n_layers, n_experts))
    np.add.at(score, (np.arange(n_layers)[None, :, None], recent), weights[:, None, None])
    rank = np.argsort(np.argsort(-score, axis=1, kind="stable"), axis=1)  # stable: ties rank lower ids first
    layer, expert = np.nonzero(score > 0)
    rank, value = rank[layer, expert], score[layer, expert]
    if scope == "per_layer":
        keep = rank < capacity
    else:
        keep = np.zeros(layer.size, bool)
        keep[np.lexsort((layer, -value, rank))[:capacity]] = True
    layer, expert, rank = layer[keep], expert[keep], rank[keep]
    oldest_first = np.lexsort((-rank, layer))
    return (layer * n_experts + expert)[oldest_first].astype(np.int64)


def _with_seeds(previous: np.ndarray, seeds: np.ndarray, capacity: int, scope: str, n_experts: int) -> np.ndarray:
    """The previous contents then the seeds (most recent), keeping the newest `capacity` entries per pool."""
    merged = np.concatenate([previous[~np.isin(previous, seeds)], seeds])
    pool = merged[::-1] // n_experts if scope == "per_layer" else np.zeros(merged.size, np.int64)
    newer_in_pool = pd.Series(pool).groupby(pool).cumcount().to_numpy()[::-1]
    return merged[newer_in_pool < capacity]


def simulate_request(experts, phase, n_experts: int, policy: str, capacity: int, mode: str, expert_bytes: float, *,
                     scope: str = "global", lookahead: int | None = None, initial=None,
                     profile: DeviceProfile | None = None, resident_bytes: float = 0.0, warm_tokens: int = 8,
                     warm_decay: float = 0.5) -> RequestResult:
    """Simulate one request's prefill and decode through the expert cache in `mode` (see the module docstring).

    `experts` is (n_tokens, n_layers, k) and `phase` per token 0 (prefill) then 1 (decode). `initial` is the
    decode cache at the start (keys, or the previous request's `RequestResult.final`); `lookahead` defaults to
    the authors' 2 * n_layers * k for LOPT.
    """
    experts, phase = np.asarray(experts), np.asarray(phase)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    if experts.ndim != 3 or phase.shape != experts.shape[:1]:
        raise ValueError(f"experts must be (n_tokens, n_layers, k) with one phase per token, got shapes "
                         f"{experts.shape} and {phase.shape}")
    if not np.isin(phase, (0, 1)).all() or (np.diff(phase.astype(np.int64)) < 0).any():
        raise ValueError(f"phase must be prefill tokens (0) then decode tokens (1), got {phase.tolist()[:20]}")
    n_prompt = int(np.count_nonzero(phase == 0))
    prompt, decode = experts[:n_prompt], experts[n_prompt:]
    n_layers, k = experts.shape[1:]
    needed, decode_keys = prefill_keys(prompt, n_experts), access_keys(decode, n_experts)
    options = {"lookahead": default_lookahead(n_layers, k) if lookahead is None else lookahead,
               "scope": scope, "n_experts": n_experts}
    if mode == "unified":
        run = simulate_cache(np.concatenate([needed, decode_keys]), policy, capacity, initial=initial, **options)
        prefill_hits = int(np.count_nonzero(run.hits_mask[:needed.size]))
        decode_mask, staging = run.hits_mask[needed.size:], 0
    else:
        start = initial.final_keys if isinstance(initial, CacheResult) else np.asarray(
            [] if initial is None else initial, np.int64)
        prefill_hits = int(np.count_nonzero(np.isin(needed, start)))
        if mode == "disaggregated_warm":
            seeds = warm_seed(prompt, n_experts, capacity, scope, warm_tokens, warm_decay)
            initial = _with_seeds(start, seeds, capacity, scope, n_experts)
        run = simulate_cache(decode_keys, policy, capacity, initial=initial, **options)
        decode_mask, staging = run.hits_mask, n_experts
    decode_hits = int(np.count_nonzero(decode_mask))
    decode_misses = decode_mask.size - decode_hits
    slots = capacity * (n_layers if scope == "per_layer" else 1) + staging
    prefill_loaded = (needed.size - prefill_hits) * expert_bytes
    prefill_s = decode_s = float("nan")
    if profile is not None:
        mem, io = profile.mem_bandwidth_gbps * 1e9, profile.io_bandwidth_gbps * 1e9
        prefill_s = (resident_bytes + prefill_hits * expert_bytes) / mem + prefill_loaded / io
        decode_s = (len(decode) * resident_bytes + decode_hits * expert_bytes) / mem + \
            decode_misses * expert_bytes / io
    return RequestResult(mode=mode, policy=policy, capacity=capacity, scope=scope, prefill_tokens=n_prompt,
                         decode_tokens=len(decode), prefill_accesses=int(needed.size), decode_hits=decode_hits,
                         decode_misses=decode_misses, prefill_loaded_bytes=prefill_loaded,
                         decode_loaded_bytes=decode_misses * expert_bytes,
                         peak_memory_bytes=resident_bytes + slots * expert_bytes, prefill_s=prefill_s,
                         decode_s=decode_s, final=run)


def simulate_requests(traces, n_experts: int, policy: str, capacity: int, expert_bytes: float,
                      modes=MODES, carry: bool = True, **kwargs) -> pd.DataFrame:
    """Run requests in order under each mode, one row per (mode, request); with `carry` each request starts
    from the decode cache the previous one left, else cold. Traces are (experts, phase) pairs or objects with
    `experts` and `phase`; kwargs go to `simulate_request`."""
    rows = []
    for mode in modes:
        state = None
        for index, trace in enumerate(traces):
            experts, phase = trace if isinstance(trace, tuple) else (trace.experts, trace.phase)
            result = simulate_request(experts, phase, n_experts, policy, capacity, mode, expert_bytes,
                                      initial=state if carry else None, **kwargs)
            state = result.final
            rows.append({"request": index} | result.row())
    return pd.DataFrame(rows)
