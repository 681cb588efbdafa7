"""Routing-locality metrics of an MoE routing trace (ECR, GDS, LAL, reuse distance, load) and the i.i.d. baseline.

    from cfmoe.metrics import expert_consistency_rate
    ecr = expert_consistency_rate(experts)   # experts: (n_tokens, n_layers, k) ints in decode order

A trace's `experts[t, l]` is the set of k experts token t selected in MoE layer l; `probs[t, l]`
is that layer's router probability vector. ECR of a consecutive pair in one layer is |S_t ∩ S_t+1| / k;
GDS is (cos(p_t, p_t+1) + 1) / 2; LAL weighs per-layer ECR by (layer index / number of MoE layers).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True)
def _scan(experts, n_experts, with_distances):
    """One pass over a trace: reuse distance of each access, overlap of each consecutive pair, a duplicate's flat index."""
    n_tokens, n_layers, k = experts.shape
    last_use = np.full((n_layers, n_experts), -1, np.int64)  # last token that used expert e in layer l; -1 = none
    # np.empty and unconditional writes: touching each page once is ~2x faster than zeros + sparse writes
    distance = np.empty(experts.shape if with_distances else (0, 0, 0), np.int32)
    overlap = np.empty((n_tokens, n_layers), np.int64)  # row t: |S_{t-1} ∩ S_t|; row 0 is dropped
    duplicate = -1
    for t in range(n_tokens):
        for layer in range(n_layers):
            shared = 0  # a local, branch-free counter runs ~2x faster than overlap[t, layer] += 1
            for j in range(k):
                e = experts[t, layer, j]
                previous = last_use[layer, e]
                last_use[layer, e] = t
                if previous == t:
                    duplicate = (t * n_layers + layer) * k + j
                shared += previous == t - 1
                if with_distances:
                    distance[t, layer, j] = t - previous if previous >= 0 else 0
            overlap[t, layer] = shared
    return distance, overlap[1:], duplicate


def _scan_trace(experts, with_distances: bool = False, n_experts: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate `experts` (ids in 0..n_experts-1 when given); return (reuse distances (T, L, k) if asked, else empty;
    consecutive-pair overlaps (T-1, L))."""
    experts = np.asarray(experts)
    if experts.ndim != 3 or 0 in experts.shape:
        raise ValueError(f"experts must have shape (n_tokens, n_layers, k) with no empty axis, got {experts.shape}")
    if not np.issubdtype(experts.dtype, np.integer):
        raise ValueError(f"experts must hold integer expert ids, got dtype {experts.dtype}")
    ids = np.ascontiguousarray(experts, dtype=np.int64)
    if ids.min() < 0:
        raise ValueError(f"experts holds expert {ids.min()}; expert ids must be >= 0")
    if n_experts is not None:
        _check_range(ids, n_experts)
    top = int(ids.max())
    if top >= ids.shape[0] * ids.shape[2]:  # sparse ids: the kernel's (n_layers, max id + 1) table would outgrow the
        ids = np.unique(ids, return_inverse=True)[1].reshape(ids.shape)  # trace; dense ids give the same sets
        top = int(ids.max())
    distance, overlap, duplicate = _scan(ids, top + 1, with_distances)
    if duplicate >= 0:
        t, layer, j = np.unravel_index(duplicate, experts.shape)
        raise ValueError(f"experts[{t}, {layer}] selects expert {experts[t, layer, j]} twice; "
                         f"a top-k set must hold k distinct experts")
    return distance, overlap


def _check_range(experts: np.ndarray, n_experts: int) -> None:
    """Reject expert ids >= n_experts (`_scan_trace` rejects negative ones before calling it)."""
    if int(n_experts) < 1:
        raise ValueError(f"n_experts must be >= 1, got {n_experts}")
    top = int(np.max(experts))
    if top >= n_experts:
        raise ValueError(f"experts holds expert {top}, out of range for n_experts={n_experts} (valid: 0..{n_experts - 1})")


def _pair_mean(values: np.ndarray, valid_pairs, per_layer: bool) -> np.ndarray | float:
    """Average (n_tokens-1, n_layers) pair values over the valid pairs, per layer or over layers too (float64)."""
    if valid_pairs is not None:
        valid_pairs = np.asarray(valid_pairs)
        if valid_pairs.dtype != bool or valid_pairs.shape != values.shape[:1]:
            raise ValueError(f"valid_pairs must be a bool array of shape ({values.shape[0]},) (n_tokens-1), "
                             f"got {valid_pairs.dtype} {valid_pairs.shape}")
        values = values[valid_pairs]
    if len(values) == 0:
        raise ValueError("no valid consecutive pair: need >= 2 tokens and at least one True in valid_pairs")
    layer_means = values.mean(axis=0)
    # every layer has the same pairs, so the mean of layer means is the mean over all (pair, layer)
    return layer_means if per_layer else float(layer_means.mean())


def expert_consistency_rate(experts, per_layer: bool = False, valid_pairs=None) -> np.ndarray | float:
    """ECR: mean |S_t ∩ S_{t+1}| / k over consecutive token pairs (and layers unless `per_layer`, which gives (n_layers,))."""
    _, overlap = _scan_trace(experts)
    return _pair_mean(overlap, valid_pairs, per_layer) / np.shape(experts)[-1]


def gate_distribution_similarity(probs, per_layer: bool = False, valid_pairs=None) -> np.ndarray | float:
    """GDS: mean (cos(p_t, p_{t+1}) + 1) / 2 of consecutive router probability vectors, averaged like ECR."""
    probs = np.asarray(probs)
    if probs.ndim != 3 or 0 in probs.shape:
        raise ValueError(f"probs must have shape (n_tokens, n_layers, n_experts) with no empty axis, got {probs.shape}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise ValueError(f"probs must be floating point, got dtype {probs.dtype}")
    probs = probs.astype(np.promote_types(probs.dtype, np.float32), copy=False)  # float16 has no fast dot products
    norms = np.sqrt(np.einsum("tle,tle->tl", probs, probs))
    with np.errstate(divide="ignore", invalid="ignore"):  # zero vectors are reported just below
        cosine = np.einsum("tle,tle->tl", probs[:-1], probs[1:]) / (norms[:-1] * norms[1:])
    if not np.isfinite(cosine).all():
        t, layer = np.argwhere(~np.isfinite(cosine))[0]
        raise ValueError(f"probs[{t}:{t + 2}, {layer}] has an all-zero or non-finite vector; cosine is undefined")
    return _pair_mean((cosine.astype(np.float64) + 1) / 2, valid_pairs, per_layer)


def layer_aware_locality(experts, valid_pairs=None) -> float:
    """LAL: Σ_l ECR_l · l / n_layers with l the 1-based MoE layer index, so the last layer weighs 1 and the first 1/L."""
    ecr = expert_consistency_rate(experts, per_layer=True, valid_pairs=valid_pairs)
    return float(ecr @ (np.arange(1, len(ecr) + 1) / len(ecr)))


def reuse_distances(experts) -> np.ndarray:
    """Per access, tokens since the previous token in that layer that used the same expert; (n_tokens, n_layers, k) int32.

    1 means the previous token used it too; 0 marks a first use (no earlier token in that layer used it).
    """
    return _scan_trace(experts, with_distances=True)[0]


def reuse_distance_histogram(experts, max_distance: int | None = None) -> np.ndarray:
    """(n_layers, max_distance+1) access counts: column d >= 1 counts reuses at distance d, column 0 first uses.

    `max_distance` defaults to n_tokens-1 (every possible distance has its column); a smaller value folds all
    longer distances into the last column. Each row sums to n_tokens·k.
    """
    distance = reuse_distances(experts)
    n_tokens, n_layers, _ = distance.shape
    max_distance = max(n_tokens - 1, 1) if max_distance is None else int(max_distance)
    if max_distance < 1:
        raise ValueError(f"max_distance must be >= 1, got {max_distance}")
    bins = np.minimum(distance, max_distance) + np.arange(n_layers)[:, None] * (max_distance + 1)
    return np.bincount(bins.ravel(), minlength=n_layers * (max_distance + 1)).reshape(n_layers, max_distance + 1)


def expert_load(experts, n_experts: int) -> np.ndarray:
    """(n_layers, n_experts) fraction of tokens routed to each expert; each row sums to k."""
    _scan_trace(experts, n_experts=n_experts)  # rejects bad shapes, ids outside 0..n_experts-1 and repeated experts
    experts = np.asarray(experts)
    n_tokens, n_layers, _ = experts.shape
    keys = experts + np.arange(n_layers)[:, None] * n_experts
    return np.bincount(keys.ravel(), minlength=n_layers * n_experts).reshape(n_layers, n_experts) / n_tokens


def max_load_ratio(experts, n_experts: int) -> np.ndarray:
    """(n_layers,) busiest expert's share of tokens over the uniform share k/E; 1 is perfectly balanced."""
    return expert_load(experts, n_experts).max(axis=1) / (np.shape(experts)[-1] / n_experts)


def _check_k(k: int, n_experts: int) -> None:
    if not 1 <= k <= n_experts:
        raise ValueError(f"k must be in 1..n_experts={n_experts}, got k={k}")


def iid_ecr(k: int, n_experts: int) -> float:
    """ECR of i.i.d. uniformly random top-k routing: each of S_{t+1}'s k experts is in S_t with probability k/E."""
    _check_k(k, n_experts)
    return k / n_experts


def iid_lru_hit_curve(k: int, n_experts: int, capacities, sequential: bool = True) -> np.ndarray:
    """Steady-state hit rates of a per-layer LRU cache of each capacity under i.i.d. uniform top-k routing.

    Once warm the cache holds the C most recently used distinct experts. `sequential=True` (as
    `cfmoe.cache.simulate_cache` serves a trace): a token's k experts are looked up one by one, so at
    slot j (0-based) its own j earlier experts fill min(j, C) entries but cannot be drawn again, and
    h = (1/k) Σ_{j<k} max(C−j, 0) / (E−j). `sequential=False`: they are looked up together and none
    evicts another, so the cache is independent of the new draw and h = C/E. Capacities above E count as E.
    """
    _check_k(k, n_experts)
    capacities = np.asarray(capacities)
    if capacities.ndim != 1 or not np.issubdtype(capacities.dtype, np.integer) or (capacities < 0).any():
        raise ValueError(f"capacities must be a 1-D array of integers >= 0, got {capacities!r}")
    capacities = np.minimum(capacities, n_experts)[:, None]
    if not sequential:
        return capacities[:, 0] / n_experts
    slot = np.arange(k)
    return (np.maximum(capacities - slot, 0) / (n_experts - slot)).mean(axis=1)


def iid_lru_hit_rate(k: int, n_experts: int, capacity: int, sequential: bool = True) -> float:
    """Steady-state hit rate of a per-layer LRU cache of `capacity` experts under i.i.d. uniform top-k routing."""
    return float(iid_lru_hit_curve(k, n_experts, [capacity], sequential)[0])
