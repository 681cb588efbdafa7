"""Expert-cache policies (LRU, LFU, OPT, LOPT, layer-aware LRU) and a fast exact simulator of their hits.

    keys = access_keys(experts, n_experts=64)             # experts: (n_tokens, n_layers, k) routing trace
    result = simulate_cache(keys, "lru", capacity=4 * 64, n_experts=64); print(result.hit_rate)

Demand caching: every access to a key not in the cache is a miss that inserts it, evicting one entry when
the cache is full. A key names one (layer, expert) pair: layer * n_experts + expert. Victims:

- `lru`: the least recently used entry.
- `lfu`: the entry with the fewest accesses since it was inserted; ties go to the least recently used.
- `opt`: Belady's optimum, the entry whose next use is farthest in the future (never again counts as
  infinitely far); ties among never-used-again entries go to the least recently used.
- `lopt`: Belady restricted to a look-ahead window W. At position i the entries whose next use is after
  i + W (or never) are "outside"; if any, the least recently used of them is evicted, else the entry with the
  farthest next use. The authors use W = 2 * n_layers * k (`default_lookahead`); it must be passed.
- `lfu_aging`: LFU with aging, for shifting working sets (arXiv 2511.05814 proposes an LFU expert cache; SpecMD's
  Least-Stale, arXiv 2602.03921, reduces to LRU at token granularity without speculative prefetch): an entry's
  count since insertion decays by half every `halflife` accesses (all layers' accesses count), i.e. at position
  i an access makes it c * 2^(-(i - i_last)/halflife) + 1; the victim has the lowest decayed count, ties to the
  least recently used. `halflife` -> 0 approaches LRU, -> infinity LFU. Kept exactly as log2(count) + i_last /
  halflife (`aged_score`), which never changes for untouched entries.
- `layer_lru`: LRU that protects the cyclic working set. A layer's *visit* is a maximal run of consecutive
  accesses to that layer (a token's k experts in decode). An entry is *stale* once a whole later visit of its
  layer has passed without using it. The victim is the least recently used entry if it is stale, else the
  most recently used entry not used in the current visit (else the most recently used): decode walks the
  layers in a cycle, so a fresh entry's layer comes round soonest when it was used longest ago, and plain
  LRU evicts exactly the experts about to be needed when the cycle's working set does not fit; the current
  visit's entries are spared as the likeliest to be reused at their layer's next visit. Needs the layer of
  each access (`n_experts` or `layers`).

Positions are indices into the whole trace, also with `scope="per_layer"` (one pool of `capacity` entries
per layer), so a look-ahead window means the same number of accesses in both scopes. A warm start
(`initial`) inserts its keys in the given order before the trace as if accessed at positions -m..-1, each
with an access count of 1 and, for `layer_lru`, as used in the visit just before the trace's first visit of
its layer; passing a previous `CacheResult` continues from its final contents and access counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numba import njit

POLICIES = ("lru", "lfu", "opt", "lopt", "layer_lru", "lfu_aging")
SCOPES = ("global", "per_layer")
_NEVER = np.iinfo(np.int64).max // 4  # next use of a key never used again; far past any position + window
_DIRECT_IDS = 1 << 22  # keys below this index state arrays directly; larger ones are renumbered densely


@dataclass(frozen=True, eq=False)
class CacheResult:
    """Hits of one simulation, per access and per layer, and the cache's final state (to continue from)."""

    policy: str
    capacity: int
    scope: str
    hits_mask: np.ndarray  # bool per access
    layer_hit_rate: np.ndarray | None  # per layer (NaN where a layer has no access); None without layer info
    final_keys: np.ndarray  # cache contents at the end, least recently used first
    final_counts: np.ndarray  # their access counts since insertion (LFU's priority)

    @property
    def accesses(self) -> int:
        return int(self.hits_mask.size)

    @property
    def hits(self) -> int:
        return int(np.count_nonzero(self.hits_mask))

    @property
    def misses(self) -> int:
        return self.accesses - self.hits

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else float("nan")


def access_keys(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """Flatten a (n_tokens, n_layers, k) routing trace into cache keys in decode order (token, layer, slot)."""
    experts = np.asarray(experts)
    if experts.ndim != 3 or not np.issubdtype(experts.dtype, np.integer):
        raise ValueError(f"experts must be an integer array (n_tokens, n_layers, k), got {experts.dtype} "
                         f"of shape {experts.shape}")
    if experts.size and (experts.min() < 0 or experts.max() >= n_experts):
        raise ValueError(f"expert ids span [{experts.min()}, {experts.max()}], outside [0, {n_experts}) "
                         f"for n_experts={n_experts}")
    layer_base = np.arange(experts.shape[1], dtype=np.int64)[None, :, None] * n_experts
    return (layer_base + experts).reshape(-1)


def default_lookahead(n_layers: int, top_k: int) -> int:
    """The authors' LOPT window: two tokens' worth of accesses, 2 * n_layers * k."""
    return 2 * n_layers * top_k


def simulate_cache(keys, policy: str, capacity: int, lookahead: int | None = None,
                   layers: np.ndarray | None = None, scope: str = "global", initial=None,
                   n_experts: int | None = None, halflife: int | None = None) -> CacheResult:
    """Replay an access trace through a demand cache and report exact hits (see the module docstring).

    The layer of each access comes from `layers` (one int per access) or from `n_experts` (key // n_experts);
    it gives `layer_hit_rate` and is required by `scope="per_layer"` and `policy="layer_lru"`.
    """
    keys = _int_array(keys, "keys")
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; valid: {', '.join(POLICIES)}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; valid: {', '.join(SCOPES)}")
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity <= 0:
        raise ValueError(f"capacity must be a positive int, got {capacity!r}")
    window = -1  # no look-ahead: OPT
    if policy == "lfu_aging":
        if isinstance(halflife, bool) or not isinstance(halflife, (int, np.integer)) or halflife <= 0:
            raise ValueError(f"lfu_aging needs a positive integer halflife (in accesses), got {halflife!r}")
        window = int(halflife)
    if policy == "lopt":
        if isinstance(lookahead, bool) or not isinstance(lookahead, (int, np.integer)) or lookahead < 0:
            raise ValueError(f"lopt needs an integer lookahead >= 0 (the authors' is 2*n_layers*k), got {lookahead!r}")
        window = int(lookahead)
    if isinstance(initial, CacheResult):
        init_keys, init_counts = initial.final_keys, initial.final_counts
    else:
        init_keys = _int_array(np.zeros(0, np.int64) if initial is None else initial, "initial")
        init_counts = np.ones(init_keys.size, np.int64)
    if np.unique(init_keys).size != init_keys.size:
        raise ValueError(f"initial keys must be distinct, got {init_keys.tolist()}")

    ids, n_ids, all_keys = _dense_ids(np.concatenate([init_keys, keys]) if init_keys.size else keys)
    init_ids, ids = ids[:init_keys.size], ids[init_keys.size:]
    layer_of_id = _layer_of_id(ids, n_ids, all_keys, keys, layers, n_experts)
    if layer_of_id is None and (scope == "per_layer" or policy == "layer_lru"):
        raise ValueError(f"scope={scope!r} with policy={policy!r} needs the layer of each access: "
                         "pass n_experts or layers")
    if layer_of_id is None:
        layer_of_id, access_layer = np.full(n_ids, -1, np.int64), None
    else:
        access_layer = layer_of_id[ids]
    visits = _visits(access_layer) if policy == "layer_lru" else np.zeros(ids.size, np.int64)
    positions = np.arange(ids.size, dtype=np.int64)
    init_times = np.arange(-init_ids.size, 0, dtype=np.int64)

    if scope == "global":
        pools = [(slice(None), slice(None))]
        if init_ids.size > capacity:
            raise ValueError(f"initial holds {init_ids.size} keys, more than capacity {capacity}")
    else:
        init_layer = layer_of_id[init_ids]
        if (init_layer < 0).any():
            raise ValueError(f"initial keys {all_keys[init_ids[init_layer < 0]].tolist()} never occur in the "
                             "trace, so their layer is unknown: pass n_experts instead of layers")
        pools = []
        for layer in np.union1d(access_layer, init_layer):
            in_pool = np.flatnonzero(init_layer == layer)
            if in_pool.size > capacity:
                raise ValueError(f"initial holds {in_pool.size} keys of layer {layer}, more than the "
                                 f"per-layer capacity {capacity}")
            pools.append((np.flatnonzero(access_layer == layer), in_pool))

    kernel = _KERNELS[policy]
    hits = np.zeros(ids.size, np.bool_)
    cached = np.zeros(n_ids, np.bool_)
    last = np.zeros(n_ids, np.int64)
    count = np.zeros(n_ids, np.int64)
    for where, init in pools:
        pool_hits, pool_cached, pool_last, pool_count = kernel(
            ids[where], positions[where], visits[where], layer_of_id, n_ids, capacity, window, init_ids[init],
            init_times[init], init_counts[init])
        hits[where] = pool_hits
        last[pool_cached], count[pool_cached] = pool_last[pool_cached], pool_count[pool_cached]
        cached |= pool_cached

    final = np.flatnonzero(cached)
    final = final[np.argsort(last[final], kind="stable")]
    layer_hit_rate = None
    if access_layer is not None:
        n_layers = int(layer_of_id.max(initial=-1)) + 1
        per_layer = np.bincount(access_layer, minlength=n_layers)
        with np.errstate(invalid="ignore", divide="ignore"):
            layer_hit_rate = np.bincount(access_layer, weights=hits, minlength=n_layers) / per_layer
    return CacheResult(policy=policy, capacity=int(capacity), scope=scope, hits_mask=hits,
                       layer_hit_rate=layer_hit_rate, final_keys=all_keys[final], final_counts=count[final])


def hit_rate_curve(keys, policy: str | list[str], capacities, **kwargs) -> pd.DataFrame:
    """Hit rate of one or more policies at each capacity, as a table (kwargs go to `simulate_cache`)."""
    rows = []
    for name in [policy] if isinstance(policy, str) else policy:
        for capacity in capacities:
            if isinstance(capacity, (float, np.floating)) and float(capacity).is_integer():
                capacity = int(capacity)  # a whole float from a grid; 2.7 is refused by simulate_cache
            result = simulate_cache(keys, name, capacity, **kwargs)
            rows.append({"policy": name, "capacity": int(capacity), "hits": result.hits,
                         "accesses": result.accesses, "hit_rate": result.hit_rate})
    return pd.DataFrame(rows, columns=["policy", "capacity", "hits", "accesses", "hit_rate"])


def _int_array(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise ValueError(f"{name} must be a 1-D integer array, got {array.dtype} of shape {array.shape}")
    return array.astype(np.int64, copy=False)


def _dense_ids(keys: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """Ids indexing the state arrays, their count, and the key of each id."""
    if keys.size == 0 or (keys.min() >= 0 and keys.max() < _DIRECT_IDS):
        n_ids = int(keys.max(initial=-1)) + 1
        return keys, n_ids, np.arange(n_ids, dtype=np.int64)
    uniq, ids = np.unique(keys, return_inverse=True)
    return ids.astype(np.int64), int(uniq.size), uniq


def _layer_of_id(ids, n_ids, all_keys, keys, layers, n_experts) -> np.ndarray | None:
    """The layer of each id (-1 for an initial key whose layer the trace does not show), or None."""
    if n_experts is not None:
        if n_experts <= 0:
            raise ValueError(f"n_experts must be positive, got {n_experts}")
        if all_keys.size and all_keys.min() < 0:
            raise ValueError(f"keys must be non-negative to derive layers from n_experts, got {all_keys.min()}")
        return all_keys // n_experts
    if layers is None:
        return None
    layers = _int_array(layers, "layers")
    if layers.size != keys.size or (layers < 0).any():
        raise ValueError(f"layers must hold one non-negative layer per access ({keys.size}), got "
                         f"{layers.size} values with minimum {layers.min(initial=0)}")
    layer_of_id = np.full(n_ids, -1, np.int64)
    layer_of_id[ids] = layers
    clash = layer_of_id[ids] != layers
    if clash.any():
        raise ValueError(f"layers gives key {all_keys[ids[clash][0]]} two different layers; a key has one layer")
    return layer_of_id


@njit(cache=True)
def _visits(access_layer):
    """For each access, how many earlier visits (maximal same-layer runs) its layer had."""
    n_layers = access_layer.max() + 1 if access_layer.size else 0
    runs = np.zeros(n_layers, np.int64)
    visits = np.empty(access_layer.size, np.int64)
    for j in range(access_layer.size):
        layer = access_layer[j]
        if j == 0 or access_layer[j - 1] != layer:
            runs[layer] += 1
        visits[j] = runs[layer] - 1
    return visits


# Doubly linked recency list over ids (prev/after arrays) from head (least recent) to tail (most recent);
# inlined because head and tail must stay scalars for the loop to be fast.
@njit(cache=True, inline="always")
def _unlink(e, prev, after, head, tail):
    p, n = prev[e], after[e]
    if p >= 0:
        after[p] = n
    else:
        head = n
    if n >= 0:
        prev[n] = p
    else:
        tail = p
    return head, tail


@njit(cache=True, inline="always")
def _append(e, prev, after, head, tail):
    prev[e], after[e] = tail, -1
    if tail >= 0:
        after[tail] = e
    else:
        head = e
    return head, e


# Indexed binary heap of ids ordered by (k1[id], k2[id]); the root is evicted first; where[id] = slot or -1.
@njit(cache=True, inline="always")
def _before(a, b, k1, k2):
    return k1[a] < k1[b] or (k1[a] == k1[b] and k2[a] < k2[b])


@njit(cache=True, inline="always")
def _sift(heap, where, size, i, k1, k2):
    e = heap[i]
    while i > 0:
        parent = (i - 1) >> 1
        if not _before(e, heap[parent], k1, k2):
            break
        heap[i] = heap[parent]
        where[heap[i]] = i
        i = parent
    while True:
        child = 2 * i + 1
        if child >= size:
            break
        if child + 1 < size and _before(heap[child + 1], heap[child], k1, k2):
            child += 1
        if not _before(heap[child], e, k1, k2):
            break
        heap[i] = heap[child]
        where[heap[i]] = i
        i = child
    heap[i] = e
    where[e] = i


@njit(cache=True, inline="always")
def _push(heap, where, size, e, k1, k2):
    heap[size] = e
    _sift(heap, where, size + 1, size, k1, k2)
    return size + 1


@njit(cache=True, inline="always")
def _remove(heap, where, size, e, k1, k2):
    i = where[e]
    where[e] = -1
    size -= 1
    if i < size:
        heap[i] = heap[size]
        _sift(heap, where, size, i, k1, k2)
    return size


@njit(cache=True)
def _state(n_ids):
    return (np.zeros(n_ids, np.bool_), np.zeros(n_ids, np.int64), np.zeros(n_ids, np.int64))


@njit(cache=True)
def _lru(ids, times, visits, layer_of_id, n_ids, capacity, window, init_ids, init_times, init_counts):
    cached, last, count = _state(n_ids)
    hits = np.zeros(ids.size, np.bool_)
    prev, after, head, tail = np.full(n_ids, -1), np.full(n_ids, -1), -1, -1
    for i in range(init_ids.size):
        e = init_ids[i]
        cached[e], last[e], count[e] = True, init_times[i], init_counts[i]
        head, tail = _append(e, prev, after, head, tail)
    size = init_ids.size
    for j in range(ids.size):
        e = ids[j]
        if cached[e]:
            hits[j] = True
            head, tail = _unlink(e, prev, after, head, tail)
        else:
            if size == capacity:
                victim = head
                head, tail = _unlink(victim, prev, after, head, tail)
                cached[victim] = False
            else:
                size += 1
            cached[e], count[e] = True, 0
        head, tail = _append(e, prev, after, head, tail)
        last[e] = times[j]
        count[e] += 1
    return hits, cached, last, count


@njit(cache=True)
def _layer_lru(ids, times, visits, layer_of_id, n_ids, capacity, window, init_ids, init_times, init_counts):
    cached, last, count = _state(n_ids)
    hits = np.zeros(ids.size, np.bool_)
    prev, after, head, tail = np.full(n_ids, -1), np.full(n_ids, -1), -1, -1
    used_in = np.full(n_ids, -1)  # visit index of each entry's last use (-1: before the trace)
    current_visit = np.full(layer_of_id.max() + 1 if n_ids else 0, -1)  # latest visit index of each layer
    for i in range(init_ids.size):
        e = init_ids[i]
        cached[e], last[e], count[e] = True, init_times[i], init_counts[i]
        head, tail = _append(e, prev, after, head, tail)
    size = init_ids.size
    for j in range(ids.size):
        e = ids[j]
        layer = layer_of_id[e]
        current_visit[layer] = visits[j]
        if cached[e]:
            hits[j] = True
            head, tail = _unlink(e, prev, after, head, tail)
        else:
            if size == capacity:
                victim = head
                victim_layer = layer_of_id[victim]
                # an entry of unknown layer is stale; else count the completed visits of its layer since
                # its last use (the current visit is not complete)
                if victim_layer >= 0 and current_visit[victim_layer] - used_in[victim] - (
                        1 if victim_layer == layer else 0) < 1:
                    # the current visit's entries are the most recent ones (a visit is a run): skip them
                    victim = tail
                    while victim >= 0 and layer_of_id[victim] == layer and used_in[victim] == visits[j]:
                        victim = prev[victim]
                    if victim < 0:
                        victim = tail
                head, tail = _unlink(victim, prev, after, head, tail)
                cached[victim] = False
            else:
                size += 1
            cached[e], count[e] = True, 0
        head, tail = _append(e, prev, after, head, tail)
        last[e], used_in[e] = times[j], visits[j]
        count[e] += 1
    return hits, cached, last, count


AGING_HALFLIFE_TOKENS = 8  # lfu_aging's default half-life: 8 tokens' accesses of every layer (not tuned)


def aging_halflife(n_layers: int, top_k: int, tokens: int = AGING_HALFLIFE_TOKENS) -> int:
    """lfu_aging's half-life in accesses for `tokens` decode tokens of a model with `n_layers` MoE layers, top-k."""
    return int(tokens * n_layers * top_k)


@njit(cache=True, inline="always")
def aged_score(score: float, position: int, halflife: int) -> float:
    """An entry's `lfu_aging` score after one more access at `position`: log2 of its aged count, plus
    position / halflife (so untouched entries never need updating)."""
    now = position / halflife
    return now + math.log2(1.0 + 2.0 ** (score - now))


@njit(cache=True)
def _lfu(ids, times, visits, layer_of_id, n_ids, capacity, window, init_ids, init_times, init_counts):
    """LFU, and with `window` > 0 LFU with aging (`window` the half-life): a heap by (score, last use), the score
    the access count since insertion, or its aged form (`aged_score`)."""
    cached, last, count = _state(n_ids)
    aging = window > 0
    score = np.zeros(n_ids, np.float64)
    hits = np.zeros(ids.size, np.bool_)
    heap, where = np.empty(capacity, np.int64), np.full(n_ids, -1)
    size = 0
    for i in range(init_ids.size):
        e = init_ids[i]
        cached[e], last[e], count[e] = True, init_times[i], init_counts[i]
        score[e] = init_times[i] / window + math.log2(init_counts[i]) if aging else init_counts[i]
        size = _push(heap, where, size, e, score, last)
    for j in range(ids.size):
        e = ids[j]
        if cached[e]:
            hits[j] = True
            count[e] += 1
            score[e] = aged_score(score[e], times[j], window) if aging else count[e]
            last[e] = times[j]
            _sift(heap, where, size, where[e], score, last)
        else:
            cached[e], count[e], last[e] = True, 1, times[j]
            score[e] = times[j] / window if aging else 1.0
            if size == capacity:  # the newcomer takes the victim's root slot
                victim = heap[0]
                cached[victim], where[victim], heap[0] = False, -1, e
                _sift(heap, where, size, 0, score, last)
            else:
                size = _push(heap, where, size, e, score, last)
    return hits, cached, last, count


@njit(cache=True)
def _belady(ids, times, visits, layer_of_id, n_ids, capacity, window, init_ids, init_times, init_counts):
    """OPT (window < 0) or LOPT: a heap by farthest next use, plus for LOPT a heap by last use of the
    entries that may be outside the window (those found inside are dropped lazily: they stay inside until
    their next access)."""
    cached, last, count = _state(n_ids)
    hits = np.zeros(ids.size, np.bool_)
    next_use = np.empty(ids.size, np.int64)
    upcoming = np.full(n_ids, _NEVER)
    for j in range(ids.size - 1, -1, -1):
        next_use[j] = upcoming[ids[j]]
        upcoming[ids[j]] = times[j]
    far = np.zeros(n_ids, np.int64)  # -(next use of each cached entry): the min-heap's root is the farthest
    heap, where = np.empty(capacity, np.int64), np.full(n_ids, -1)
    out, out_where = np.empty(capacity, np.int64), np.full(n_ids, -1)
    size = out_size = 0
    for i in range(init_ids.size):
        e = init_ids[i]
        cached[e], last[e], count[e], far[e] = True, init_times[i], init_counts[i], -upcoming[e]
        size = _push(heap, where, size, e, far, last)
        if window >= 0:
            out_size = _push(out, out_where, out_size, e, last, last)
    for j in range(ids.size):
        e = ids[j]
        if cached[e]:
            hits[j] = True
            count[e] += 1
        else:
            if size == capacity:
                victim = -1
                if window >= 0:
                    while out_size > 0 and -far[out[0]] <= times[j] + window:
                        out_size = _remove(out, out_where, out_size, out[0], last, last)
                    if out_size > 0:
                        victim = out[0]
                if victim < 0:
                    victim = heap[0]
                size = _remove(heap, where, size, victim, far, last)
                if out_where[victim] >= 0:
                    out_size = _remove(out, out_where, out_size, victim, last, last)
                cached[victim] = False
            cached[e], count[e] = True, 1
        last[e], far[e] = times[j], -next_use[j]
        if where[e] >= 0:
            _sift(heap, where, size, where[e], far, last)
        else:
            size = _push(heap, where, size, e, far, last)
        if window >= 0:
            if out_where[e] >= 0:
                _sift(out, out_where, out_size, out_where[e], last, last)
            else:
                out_size = _push(out, out_where, out_size, e, last, last)
    return hits, cached, last, count


_KERNELS = {"lru": _lru, "lfu": _lfu, "opt": _belady, "lopt": _belady, "layer_lru": _layer_lru,
            "lfu_aging": _lfu}
