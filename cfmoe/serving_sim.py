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


def seed_quota(capacity: int, scope: str, n_layers: int, layer: int) -> int:
    """How many decode-cache seeds MoE layer `layer` gets: its own pool's `capacity` per layer; in one global pool
    an even share, `capacity // n_layers`, the first `capacity % n_layers` layers one more. The engine seeds each
    layer while its prefill streams, before later layers' routing exists, so the quota cannot look ahead."""
    return capacity if scope == "per_layer" else capacity // n_layers + (layer < capacity % n_layers)


def layer_seeds(recent: np.ndarray, quota: int, decay: float = 0.5) -> np.ndarray:
    """One layer's seeds, lowest score first (the best becomes the most recent entry).

    `recent` is (tokens, k): the experts this layer selected for the prompt's last tokens, oldest first. An
    expert scores sum(decay ** age) over the tokens that selected it (age 0 for the last token); the `quota`
    best are kept, ties ranked by lower id first."""
    recent = np.asarray(recent).reshape(len(recent), -1)
    if quota <= 0 or not recent.size:
        return np.zeros(0, np.int64)
    weights = np.repeat(decay ** np.arange(len(recent))[::-1], recent.shape[1])
    experts, inverse = np.unique(recent.reshape(-1), return_inverse=True)
    score = np.bincount(inverse, weights=weights, minlength=experts.size)
    best = np.lexsort((experts, -score))[:quota]  # highest score first, ties lower id first
    return experts[best[::-1]].astype(np.int64)


def warm_seed(prompt: np.ndarray, n_experts: int, capacity: int, scope: str = "global", tokens: int = 8,
              decay: float = 0.5) -> np.ndarray:
    """Decode-cache seeds (cache keys) from the prompt's routing, oldest first: layer by layer, each layer's
    `layer_seeds` of its last `tokens` prompt tokens within its `seed_quota`. The engine
    (`cfmoe.serving.OffloadEngine`, mode `disaggregated_warm`) seeds by the same two functions."""
    recent = prompt[-tokens:] if tokens > 0 else prompt[:0]
    n_layers = prompt.shape[1]
    return np.concatenate([layer * n_experts + layer_seeds(recent[:, layer], seed_quota(capacity, scope, n_layers, layer),
                                                           decay) for layer in range(n_layers)]).astype(np.int64)


def _with_seeds(previous: np.ndarray, seeds: np.ndarray, capacity: int, scope: str, n_experts: int) -> np.ndarray:
    """The previous contents then the seeds (most recent), keeping the newest `capacity` entries per pool."""
    merged = np.concatenate([previous[~np.isin(previous, seeds)], seeds])
    pool = merged[::-1] // n_experts if scope == "per_layer" else np.zeros(merged.size, np.int64)
    newer_in_pool = pd.Series(pool).groupby(pool).cumcount().to_numpy()[::-1]
    return merged[newer_in_pool < capacity]


def _through_cache(state, needed: list, prompts: list, decode_keys: np.ndarray, mode: str, policy: str,
                   capacity: int, options: dict, warm_tokens: int, warm_decay: float):
    """One stretch of serving: the prefills of `prompts` (their keys `needed`), then `decode_keys`, in `mode`,
    starting from the decode cache `state`. Returns the cache result, prefill hits per prompt and the decode
    accesses' hit mask."""
    if mode == "unified":
        run = simulate_cache(np.concatenate([*needed, decode_keys]), policy, capacity, initial=state, **options)
        ends = np.cumsum([keys.size for keys in needed])
        hits = [int(np.count_nonzero(part)) for part in np.split(run.hits_mask[:ends[-1]], ends[:-1])]
        return run, hits, run.hits_mask[ends[-1]:]
    scope, n_experts = options["scope"], options["n_experts"]
    current = state.final_keys if isinstance(state, CacheResult) else np.asarray([] if state is None else state,
                                                                                 np.int64)
    hits = []
    for prompt, keys in zip(prompts, needed):
        hits.append(int(np.count_nonzero(np.isin(keys, current))))  # read in place from the decode cache
        if mode == "disaggregated_warm":
            seeds = warm_seed(prompt, n_experts, capacity, scope, warm_tokens, warm_decay)
            current = _with_seeds(current, seeds, capacity, scope, n_experts)
    run = simulate_cache(decode_keys, policy, capacity, initial=current if mode == "disaggregated_warm" else state,
                         **options)
    return run, hits, run.hits_mask


def _seconds(profile: DeviceProfile | None, resident_bytes, hits, misses, expert_bytes: float):
    """The cost model's time: resident and cached bytes from fast memory, missed experts from slow storage."""
    if profile is None:
        return float("nan")
    mem, io = profile.mem_bandwidth_gbps * 1e9, profile.io_bandwidth_gbps * 1e9
    return (resident_bytes + hits * expert_bytes) / mem + misses * expert_bytes / io


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
    run, (prefill_hits,), decode_mask = _through_cache(initial, [needed], [prompt], decode_keys, mode, policy,
                                                       capacity, options, warm_tokens, warm_decay)
    staging = 0 if mode == "unified" else n_experts
    decode_hits = int(np.count_nonzero(decode_mask))
    decode_misses = decode_mask.size - decode_hits
    slots = capacity * (n_layers if scope == "per_layer" else 1) + staging
    prefill_loaded = (needed.size - prefill_hits) * expert_bytes
    prefill_s = _seconds(profile, resident_bytes, prefill_hits, needed.size - prefill_hits, expert_bytes)
    decode_s = _seconds(profile, len(decode) * resident_bytes, decode_hits, decode_misses, expert_bytes)
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


def _schedule(lengths: list[int], batch: int) -> list[tuple[list[int], list[list[tuple[int, int]]]]]:
    """Continuous batching: segments of (requests admitted, then decode steps of (request, token) pairs).

    Up to `batch` requests decode together, one token each per step; a finished request's slot goes to the
    next request in order, which is prefilled before the following step. Each segment runs from one
    admission to the next.
    """
    queue, active, segments = list(range(len(lengths))), [], []
    position = [0] * len(lengths)
    while queue or active:
        admitted = []
        while queue and len(active) < batch:
            request = queue.pop(0)
            admitted.append(request)
            if lengths[request]:
                active.append(request)
        steps = []
        while active and (len(active) == batch or not queue):
            steps.append([(r, position[r]) for r in active])
            for r in active:
                position[r] += 1
            active = [r for r in active if position[r] < lengths[r]]
            if len(active) < batch and queue:
                break
        segments.append((admitted, steps))
    return segments


def _step_keys(step, decodes, n_experts: int) -> np.ndarray:
    """Keys one batched decode step needs: per layer in order, the union of its tokens' experts, each once, in
    the order the tokens (then their router slots) first ask for them; one token gives its `access_keys`."""
    experts = np.stack([decodes[r][t] for r, t in step]).astype(np.int64)  # (tokens, layers, k)
    layer_major = experts.transpose(1, 0, 2) + (np.arange(experts.shape[1]) * n_experts)[:, None, None]
    return pd.unique(layer_major.reshape(-1))


@dataclass(frozen=True, eq=False)
class ServingPlan:
    """The cache keys of a continuously batched run, which depend only on the traces, `n_experts` and `batch`:
    per segment (one admission to the next) the admitted requests, each one's prefill keys, and the decode
    keys with the length and token count of each step. Build once, simulate under many caches."""

    batch: int
    n_experts: int
    n_layers: int
    top_k: int
    prompts: list  # (n_prompt, n_layers, k) experts per request
    segments: list  # (admitted, needed keys per admitted, decode keys, keys per step, tokens per step)


def serving_plan(traces, n_experts: int, batch: int = 1) -> ServingPlan:
    """Schedule `traces` (requests in arrival order) with continuous batching of width `batch`."""
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    pairs = [trace if isinstance(trace, tuple) else (trace.experts, trace.phase) for trace in traces]
    if not pairs:
        raise ValueError("traces is empty; pass at least one (experts, phase) request")
    prompts, decodes = [], []
    for experts, phase in pairs:
        experts, phase = np.asarray(experts), np.asarray(phase)
        if experts.ndim != 3 or phase.shape != experts.shape[:1]:
            raise ValueError(f"each request needs experts (n_tokens, n_layers, k) and one phase per token, got "
                             f"shapes {experts.shape} and {phase.shape}")
        n_prompt = int(np.count_nonzero(phase == 0))
        prompts.append(experts[:n_prompt])
        decodes.append(experts[n_prompt:])
    segments = []
    for admitted, steps in _schedule([len(d) for d in decodes], int(batch)):
        step_keys = [_step_keys(step, decodes, n_experts) for step in steps]
        segments.append((admitted, [prefill_keys(prompts[r], n_experts) for r in admitted],
                         np.concatenate(step_keys) if step_keys else np.zeros(0, np.int64),
                         np.array([keys.size for keys in step_keys], np.int64),
                         np.array([len(step) for step in steps], np.int64)))
    n_layers, k = pairs[0][0].shape[1:]
    return ServingPlan(int(batch), n_experts, n_layers, k, prompts, segments)


def simulate_serving(traces, n_experts: int, policy: str, capacity: int, mode: str, expert_bytes: float, *,
                     batch: int = 1, scope: str = "global", lookahead: int | None = None,
                     profile: DeviceProfile | None = None, resident_bytes: float = 0.0, warm_tokens: int = 8,
                     warm_decay: float = 0.5) -> dict:
    """Serve `traces` in order with continuous batching of `batch` requests through one expert cache.

    A batched decode step needs, per layer, the union of its tokens' experts (each read once). When a request
    is admitted its prefill runs before the next step: in `unified` mode through the decode cache, evicting
    the working set of the requests still decoding; in the disaggregated modes through the staging buffer,
    leaving the decode cache as it was (`disaggregated_warm` then seeds it from the prompt, see
    `simulate_request`). With batch 1 this is `simulate_requests(..., carry=True)` summed. Offline policies
    (OPT, LOPT) see the future up to the next admission. `traces` may be a `serving_plan` (then its batch
    width is used). Returns one summary row.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    plan = traces if isinstance(traces, ServingPlan) else serving_plan(traces, n_experts, batch)
    if plan.n_experts != n_experts:
        raise ValueError(f"the plan was built for n_experts={plan.n_experts}, got n_experts={n_experts}")
    n_layers, k, prompts = plan.n_layers, plan.top_k, plan.prompts
    options = {"lookahead": default_lookahead(n_layers, k) if lookahead is None else lookahead,
               "scope": scope, "n_experts": n_experts}
    state = None
    totals = dict(prefill_hits=0, prefill_accesses=0, decode_hits=0, decode_misses=0, decode_steps=0,
                  decode_tokens=0, prefill_s=0.0, decode_s=0.0)
    for admitted, needed, decode_keys, step_sizes, step_tokens in plan.segments:
        state, prefill_hits, decode_mask = _through_cache(state, needed, [prompts[r] for r in admitted], decode_keys,
                                                          mode, policy, capacity, options, warm_tokens, warm_decay)
        for keys, hits in zip(needed, prefill_hits):
            totals["prefill_hits"] += hits
            totals["prefill_accesses"] += keys.size
            totals["prefill_s"] += _seconds(profile, resident_bytes, hits, keys.size - hits, expert_bytes)
        if step_sizes.size:
            step_hits = np.add.reduceat(decode_mask.astype(np.int64), np.r_[0, np.cumsum(step_sizes)[:-1]])
            step_misses = step_sizes - step_hits
            totals["decode_hits"] += int(step_hits.sum())
            totals["decode_misses"] += int(step_misses.sum())
            totals["decode_steps"] += int(step_sizes.size)
            totals["decode_tokens"] += int(step_tokens.sum())
            totals["decode_s"] += float(np.sum(_seconds(profile, resident_bytes, step_hits, step_misses, expert_bytes)))
    slots = capacity * (n_layers if scope == "per_layer" else 1) + (0 if mode == "unified" else n_experts)
    accesses = totals["decode_hits"] + totals["decode_misses"]
    return {"mode": mode, "policy": policy, "capacity": capacity, "scope": scope, "batch": plan.batch,
            "requests": len(prompts), **totals,
            "decode_hit_rate": totals["decode_hits"] / accesses if accesses else float("nan"),
            "prefill_loaded_bytes": (totals["prefill_accesses"] - totals["prefill_hits"]) * expert_bytes,
            "decode_loaded_bytes": totals["decode_misses"] * expert_bytes,
            "peak_memory_bytes": resident_bytes + slots * expert_bytes,
            "decode_tokens_per_s": totals["decode_tokens"] / totals["decode_s"] if totals["decode_s"] else float("nan")}
