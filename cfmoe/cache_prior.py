"""Cache-conditional routing at inference (the "Cache-Prior" of Skliar et al., arXiv 2412.00099), with an expert
cache in the loop: before top-k, every MoE layer's router scores of the experts already cached get a bonus
λ·Δ_l, so a token takes a cached expert whenever it is nearly as good as an uncached one.

    cache = OnlineCache(rows=64, n_layers=6, n_experts=64, capacity=96, policy="lru")
    with cache_prior(model, cache, lam=0.5, delta=router_spread(model, calib_ids)):
        nll, tokens = decode_teacher_forced(model, blocks, cache)     # routing now depends on the cache
    print(cache.misses.sum() / tokens)

Routing depends on the cache, so a recorded trace cannot be replayed: the model runs token by token and the
cache is updated by every token's choice, in the simulator's access order (token, layer, slot). `OnlineCache` is
one independent demand cache per batch row (each row a request), exact: its hits equal `cache.simulate_cache`'s on
the routing it produced (tested). λ = 0 changes nothing (token-identical; tested on every architecture).

The bonus's scale Δ_l is layer l's mean range (max − min) of the router's selection key (logits for softmax
routers), as the paper scales its prior; it is measured once on calibration text (`router_spread`) rather than
kept as a running average, so a sweep's points share it. λ is swept. Only the choice of experts changes: the selected experts' weights are
the router's own scores for them, normalised and scaled as the router does (`norm_topk_prob`, a routed scaling
factor), so a row whose chosen set is unchanged keeps its weights bit for bit. DeepSeek-V3's correction bias
and group-limited choice are applied to the biased key as its router applies them to its own.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from numba import njit, prange

from .cache import SCOPES, aged_score
from .moe import MoELayerInfo, describe, unwrap

POLICIES = ("lru", "lfu", "lfu_aging")


class OnlineCache:
    """`rows` independent demand caches of (layer, expert) keys, updated one access group at a time. `capacity` is
    one size for every row, or one per row (several settings decoded as one batch).

    Victims exactly as `cache.simulate_cache` picks them (tested): `lru` the least recently used; `lfu` the
    fewest accesses since insertion; `lfu_aging` the lowest count decayed with `halflife`; ties to the least
    recently used. Positions count every access of a row, all layers together."""

    def __init__(self, rows: int, n_layers: int, n_experts: int, capacity: "int | np.ndarray", policy: str = "lru",
                 scope: str = "global", halflife: int | None = None):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; valid: {', '.join(POLICIES)}")
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}; valid: {', '.join(SCOPES)}")
        pool = n_experts if scope == "per_layer" else n_layers * n_experts
        sizes = np.asarray(capacity)
        if sizes.ndim > 1 or (sizes.ndim == 1 and len(sizes) != rows):
            raise ValueError(f"capacity must be one size or one per row ({rows}), got shape {sizes.shape}")
        if not np.issubdtype(sizes.dtype, np.integer) or not ((1 <= sizes) & (sizes <= pool)).all():
            raise ValueError(f"capacity must be in 1..{pool} ({scope} pool of {n_layers} x {n_experts} experts), "
                             f"got {capacity}")
        if policy == "lfu_aging" and not (isinstance(halflife, (int, np.integer)) and halflife > 0):
            raise ValueError(f"lfu_aging needs a positive integer halflife (in accesses), got {halflife!r}")
        self.rows, self.n_layers, self.n_experts = rows, n_layers, n_experts
        self.capacity = np.broadcast_to(sizes.astype(np.int64), (rows,)).copy()  # entries per row (and pool)
        self.policy, self.scope, self.halflife = policy, scope, halflife
        # each row's held entries as compact lists, one per pool (one pool, or one per layer), so that a miss scans
        # only the entries held: `where` maps a key to its place in its pool's list (-1: not cached)
        pools, width = (n_layers if scope == "per_layer" else 1), int(self.capacity.max())
        self.where = np.full((rows, n_layers * n_experts), -1, np.int64)
        self.keys = np.full((rows, pools, width), -1, np.int64)
        self.score = np.zeros((rows, pools, width), np.float64)  # the policy's priority, lowest evicted
        self.used = np.zeros((rows, pools, width), np.int64)  # position of the last use (ties: oldest evicted)
        self.held = np.zeros((rows, pools), np.int64)
        self.clock = 0  # accesses so far, per row (rows advance in lockstep)
        self.hits = np.zeros(rows, np.int64)
        self.misses = np.zeros(rows, np.int64)

    def cached(self, layer: int) -> np.ndarray:
        """(rows, n_experts) bool: which of `layer`'s experts each row holds."""
        return self.where[:, layer * self.n_experts:(layer + 1) * self.n_experts] >= 0

    def access(self, layer: int, experts: np.ndarray) -> None:
        """One token's experts at `layer` for every row, (rows, k), accessed in slot order."""
        keys = layer * self.n_experts + np.asarray(experts, np.int64).reshape(self.rows, -1)
        pool = layer if self.scope == "per_layer" else 0
        self.clock = _access(self.where, self.keys, self.score, self.used, self.held, self.hits, self.misses, keys,
                             self.clock, self.capacity, pool, POLICIES.index(self.policy), self.halflife or 1)


@njit(cache=True, parallel=True)
def _access(where, held_keys, score, used, held, hits, misses, keys, clock, capacity, pool, policy, halflife):
    """`OnlineCache.access`, compiled: for each slot, every row's key; a miss in a full pool (`capacity` entries
    for each row) evicts the held entry of lowest score, ties least recently used. policy: 0 lru, 1 lfu,
    2 lfu_aging. Rows are independent caches, so they run in parallel (integer bookkeeping and per-row floats: the
    same result on any number of threads). Returns the clock."""
    rows, k = keys.shape
    for row in prange(rows):
        for slot in range(k):
            now = clock + slot  # every row's position: rows advance in lockstep, one position per slot
            key = keys[row, slot]
            place = where[row, key]
            hit = place >= 0
            if hit:
                hits[row] += 1
            else:
                misses[row] += 1
                if held[row, pool] < capacity[row]:
                    place = held[row, pool]
                    held[row, pool] += 1
                else:  # positions are unique within a row, so the victim is too
                    place, low, oldest = 0, score[row, pool, 0], used[row, pool, 0]
                    for entry in range(1, capacity[row]):
                        value, last = score[row, pool, entry], used[row, pool, entry]
                        if value < low or (value == low and last < oldest):
                            place, low, oldest = entry, value, last
                    where[row, held_keys[row, pool, place]] = -1
                held_keys[row, pool, place] = key
                where[row, key] = place
            if policy == 0:
                score[row, pool, place] = float(now)
            elif policy == 1:
                score[row, pool, place] = score[row, pool, place] + 1.0 if hit else 1.0
            else:
                score[row, pool, place] = aged_score(score[row, pool, place], now, halflife) if hit \
                    else now / halflife
            used[row, pool, place] = now
    return clock + k


class EngineCache:
    """The offloading engine's own cache (`cfmoe.serving.OffloadEngine`) as the prior's view: every row of a
    batch sees the engine's one cache, and the engine records each access itself when the experts run."""

    def __init__(self, engine, rows: int = 1):
        self.engine, self.rows = engine, rows
        self.n_layers, self.n_experts = len(engine.info.layers), engine.info.n_experts

    def cached(self, layer: int) -> np.ndarray:
        held = np.zeros((self.rows, self.n_experts), bool)
        held[:, [expert for (at, expert) in self.engine.cache.slot if at == layer]] = True
        return held

    def access(self, layer: int, experts: np.ndarray) -> None:
        """Nothing: the engine counts and caches the access when the experts are computed."""


def selection_key(layer: MoELayerInfo, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(key the router ranks experts by, the scores its weights are taken from), float32."""
    logits = logits.float()
    if layer.scoring == "sigmoid":
        scores = logits.sigmoid()
        bias = getattr(layer.router, "e_score_correction_bias", None)
        return (scores if bias is None else scores + bias.float()), scores
    return logits, logits.softmax(-1)


def group_limited(router: torch.nn.Module, key: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's group-limited choice, as its router applies it: only the `topk_group` groups with the
    highest top-2 sums stay eligible (the others' keys set to -inf). Other routers: the key unchanged."""
    groups = getattr(router, "num_group", None) or getattr(router, "n_group", None) or 1
    keep = getattr(router, "topk_group", None) or groups
    if groups <= 1:
        return key
    grouped = key.reshape(key.shape[0], groups, -1)
    best = grouped.topk(2, dim=-1).values.sum(-1).topk(keep, dim=-1).indices
    eligible = torch.zeros(key.shape[0], groups, dtype=torch.bool, device=key.device).scatter_(1, best, True)
    return grouped.masked_fill(~eligible[..., None], float("-inf")).reshape(key.shape)


def router_spread(model: torch.nn.Module, input_ids: torch.Tensor) -> list[float]:
    """Δ_l per MoE layer: the mean over calibration tokens of the range (max − min) of the router's selection key."""
    from .routing import record_routing

    info = describe(model)
    with torch.no_grad(), record_routing(model, record_probs=True) as recorder:
        model(input_ids=input_ids.to(unwrap(model).device), use_cache=False)
    spreads = []
    for layer, calls in zip(info.layers, recorder.logits):
        key, _ = selection_key(layer, torch.cat(calls))
        spreads.append(float((key.max(-1).values - key.min(-1).values).mean()))
    return spreads


def _biased_choice(layer: MoELayerInfo, index: int, cache: OnlineCache, bonus: "torch.Tensor | None",
                   decode_only: bool, output):
    """The router's output with each row's cached experts' keys raised by its `bonus` ((rows, 1) float32 on the
    router's device, one per cache row; None: no bonus)."""
    logits, weights, indices = output
    rows, k = indices.shape
    if decode_only and rows > cache.rows:  # a prefill call, served outside the decode cache (disaggregated)
        return output
    if rows % cache.rows:
        raise ValueError(f"MoE layer {index} routed {rows} tokens, not a multiple of the cache's {cache.rows} rows")
    steps = rows // cache.rows  # tokens per row in this call (1 in decode), batch-major
    key, scores = selection_key(layer, logits)
    key = key.reshape(cache.rows, steps, -1)
    original = indices.reshape(cache.rows, steps, k)
    chosen = original.clone()
    for step in range(steps):
        if bonus is not None:
            cached = torch.from_numpy(cache.cached(index)).to(key.device)
            biased = group_limited(layer.router, key[:, step] + bonus * cached)
            pick = biased.topk(k, dim=-1).indices
            same = (pick.sort(-1).values == original[:, step].sort(-1).values).all(-1, keepdim=True)
            chosen[:, step] = torch.where(same, original[:, step], pick)
        cache.access(index, chosen[:, step].cpu().numpy())
    return reselect(layer, output, chosen.reshape(rows, k), scores)


def reselect(layer: MoELayerInfo, output, chosen: torch.Tensor, scores: torch.Tensor):
    """The router's `output` (logits, weights, indices) with `chosen` (rows, k) experts instead of its own: their
    weights are the router's `scores` (`selection_key`'s) for them, normalised and scaled as the router does, so a
    row whose choice is unchanged keeps its weights bit for bit."""
    logits, weights, indices = output
    changed = (chosen != indices).any(-1, keepdim=True)
    if not bool(changed.any()):
        return output
    total = weights.float().sum(-1, keepdim=True)
    picked = scores.gather(-1, chosen)
    if getattr(layer.router, "norm_topk_prob", True):  # Mixtral and GPT-OSS always normalise
        new = picked / picked.sum(-1, keepdim=True) * total
    else:  # the router's scaling factor (1 for softmax routers) kept: weights / scores of its own choice
        new = picked * (total / scores.gather(-1, indices).sum(-1, keepdim=True))
    return logits, torch.where(changed, new.to(weights.dtype), weights), chosen.to(indices.dtype)


@contextlib.contextmanager
def cache_prior(model: torch.nn.Module, cache: "OnlineCache | EngineCache", lam: "float | np.ndarray",
                delta: list[float] | None = None, decode_only: bool = False) -> Iterator["OnlineCache | EngineCache"]:
    """Route every MoE layer with `cache` in the loop and a bonus λ·Δ_l on its cached experts (module docstring).
    `lam` is one λ, or one per cache row (several settings decoded as one batch, each row its own λ).
    Every routed token updates an `OnlineCache` (an `EngineCache` is updated by the engine itself). With
    `decode_only`, calls of more than one token per row (prefill) route as the model does and leave the cache
    alone: disaggregated prefill. The hooks are removed on exit, also on an exception."""
    info = describe(model)
    lams = np.asarray(lam, np.float64)
    if lams.ndim > 1 or (lams.ndim == 1 and len(lams) != cache.rows):
        raise ValueError(f"lam must be one value or one per cache row ({cache.rows}), got shape {lams.shape}")
    if not (lams >= 0).all():
        raise ValueError(f"lam must be >= 0, got {lam}")
    if (cache.n_layers, cache.n_experts) != (len(info.layers), info.n_experts):
        raise ValueError(f"the cache has {cache.n_layers} layers x {cache.n_experts} experts; the model has "
                         f"{len(info.layers)} MoE layers x {info.n_experts} experts")
    delta = [1.0] * len(info.layers) if delta is None else list(delta)
    if len(delta) != len(info.layers):
        raise ValueError(f"delta needs one value per MoE layer ({len(info.layers)}), got {len(delta)}")
    # each layer's per-row bonus λ·Δ_l, made once on the routers' device (float32, as the selection key)
    device = unwrap(model).device
    bonuses = [torch.tensor(np.broadcast_to(lams * d, (cache.rows,)), dtype=torch.float32, device=device)[:, None]
               if (lams * d).any() else None for d in delta]
    handles = [layer.router.register_forward_hook(
        lambda module, args, output, layer=layer, i=i: _biased_choice(layer, i, cache, bonuses[i], decode_only,
                                                                      output))
        for i, layer in enumerate(info.layers)]
    try:
        yield cache
    finally:
        for handle in handles:
            handle.remove()


def decode_teacher_forced(model: torch.nn.Module, input_ids: torch.Tensor, cache: OnlineCache
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Run (rows, T) blocks one token at a time (each row a request decoding its block, KV cache kept), so the
    cache sees every token before the next is routed. Returns per row the summed next-token NLL (T−1 targets)
    and the decode misses; call inside `cache_prior`."""
    if input_ids.ndim != 2 or input_ids.shape[0] != cache.rows:
        raise ValueError(f"input_ids must be (rows={cache.rows}, T), got {tuple(input_ids.shape)}")
    device = unwrap(model).device
    input_ids = input_ids.to(device)
    nll = torch.zeros(input_ids.shape[0], dtype=torch.float64)
    past = None
    misses_before = cache.misses.copy()
    with torch.no_grad():
        for t in range(input_ids.shape[1]):
            out = model(input_ids=input_ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            if t + 1 < input_ids.shape[1]:
                logp = out.logits[:, -1].float().log_softmax(-1)
                nll -= logp.gather(-1, input_ids[:, t + 1:t + 2]).squeeze(-1).double().cpu()
    return nll.numpy(), cache.misses - misses_before
