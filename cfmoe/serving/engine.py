"""A real expert-offloading engine: `generate()` with only a bounded set of routed experts in fast memory.

    engine = OffloadEngine(model, "artifacts/cpu/store.safetensors", capacity=96, policy="lru",
                           mode="disaggregated", tier="direct")
    out, stats = engine.generate(input_ids, max_new_tokens=64)     # stats: hits, bytes read, TTFT, tokens/s

No modeling code is forked. Every MoE layer of a transformers model calls its fused `experts` module as
`experts(hidden_states, expert_indices, weights)` with per-expert parameters stacked on dim 0 (see
`cfmoe.moe`). The engine moves those parameters into an **expert store** (the slow tier: one safetensors file,
each (layer, expert) contiguous, read one expert at a time) and gives every experts module the same
preallocated **slot pool** (the fast tier) instead: `capacity` cache slots, plus one layer's experts of
staging slots in the disaggregated modes (and runs the experts' eager implementation, which touches only the
slots a call uses). Before each experts call the engine places the experts the call
needs into slots (hits stay, misses are read from the store, evicting by the cache policy) and calls the
original module with the expert indices remapped to slot indices (through a slot table kept on the model's
device, so a call whose experts are all cached needs no host-built map). The math is the module's own.

Slow tiers: `cfmoe.serving.store`.

Prefill (a forward of more than one position) and decode (one position) are handled by `mode`:
`unified` sends prefill through the decode cache; `disaggregated` streams prefill's misses through the
staging slots and leaves the cache as it was (reading cached experts in place); `disaggregated_warm` then
seeds the cache per layer from the prompt's last tokens (copied from the staging slots, no store read).
"""

from __future__ import annotations

import contextlib
import heapq
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import cache, moe
from ..cache import SCOPES
from ..serving_sim import MODES, layer_seeds, seed_quota
from .store import HOST_BACKED, ExpertStore, expert_parameters, write_store

POLICIES = ("lru", "lfu", "lfu_aging")
# transformers' experts implementations the engine can run over its slot pool. `eager` loops over the slots a call
# uses (one host sync per slot); `grouped_mm` and `batched_mm` take every slot's weights and an expert id per
# (token, k) with no host sync, so they scan the whole pool (offsets of empty groups on the GPU kernel)
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def reset_cuda_peak() -> int:
    """Start a CUDA peak-memory window (after the queued work); returns the bytes allocated now."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


class SlotCache:
    """Which (layer, expert) sits in which fast-memory slot, and the policy's victim choice, in O(1) per access.

    `lru` evicts the least recently used; `lfu` the fewest accesses since insertion, ties least recently used;
    `lfu_aging` the lowest count decayed with its half-life (the semantics of `cfmoe.cache`; a heap, O(log n)).
    With `per_layer` scope each layer owns `capacity` slots. Each pool keeps
    its entries in buckets by access count (one bucket for LRU), each bucket in recency order, so the victim is
    the first key, skipping the pinned ones, of the lowest bucket.
    """

    def __init__(self, capacity: int, policy: str, scope: str, n_layers: int, halflife: int | None = None):
        self.capacity, self.policy, self.scope, self.n_layers = capacity, policy, scope, n_layers
        self.halflife, self.clock = halflife, 0  # lfu_aging: its half-life and the accesses so far
        self.heaps: dict[int, list] = {}  # lfu_aging: pool -> heap of (score, last use, key), stale entries skipped
        pools = n_layers if scope == "per_layer" else 1
        self.n_slots = capacity * pools
        self.free = {pool: list(range(pool * capacity, (pool + 1) * capacity))[::-1] for pool in range(pools)}
        self.slot: dict[tuple[int, int], int] = {}
        self.count: dict[tuple[int, int], int] = {}
        self.buckets: dict[int, dict[int, dict]] = {pool: {} for pool in range(pools)}  # pool -> count -> keys

    def _pool(self, key) -> int:
        return key[0] if self.scope == "per_layer" else 0

    def lookup(self, key) -> int | None:
        return self.slot.get(key)

    def touch(self, key) -> None:
        if self.policy == "lfu_aging":
            self._age(key, cache.aged_score(self.count[key][0], self.clock, self.halflife))
            return
        old = self._unfile(key)
        self._file(key, old + 1 if self.policy == "lfu" else 0)
        self.clock += 1

    def _age(self, key, score: float) -> None:
        """lfu_aging: file `key` with `score` at this access (`cfmoe.cache`'s log-domain aged count)."""
        self.count[key] = (score, self.clock)
        heapq.heappush(self.heaps.setdefault(self._pool(key), []), (score, self.clock, key))
        self.clock += 1

    def _aged_victim(self, pool: int, pinned):
        """The lowest (score, last use) entry of `pool` not in `pinned`, taken out; None if all are pinned."""
        heap, skipped, victim = self.heaps.get(pool, []), [], None
        while heap:
            score, last, key = heapq.heappop(heap)
            if self.count.get(key) != (score, last) or key not in self.slot:
                continue  # stale: the key was touched again or evicted since
            if key in pinned:
                skipped.append((score, last, key))
                continue
            victim = key
            break
        for entry in skipped:
            heapq.heappush(heap, entry)
        if victim is not None:
            del self.count[victim]
        return victim

    def _file(self, key, count: int) -> None:
        self.count[key] = count
        self.buckets[self._pool(key)].setdefault(count, {})[key] = None  # insertion order: most recent last

    def _unfile(self, key) -> int:
        """Take `key` out of its bucket; returns its count."""
        buckets, count = self.buckets[self._pool(key)], self.count.pop(key)
        del buckets[count][key]
        if not buckets[count]:
            del buckets[count]
        return count

    def insert(self, key, pinned) -> tuple[int, tuple | None]:
        """A slot for `key` (a free one, or a victim's not in `pinned`); returns (slot, evicted key)."""
        pool = self._pool(key)
        evicted = None
        if self.free[pool]:
            slot = self.free[pool].pop()
        else:
            if self.policy == "lfu_aging":
                evicted = self._aged_victim(pool, pinned)
            else:
                buckets = self.buckets[pool]
                evicted = next((k for count in sorted(buckets) for k in buckets[count] if k not in pinned), None)
                if evicted is not None:
                    self._unfile(evicted)
            if evicted is None:
                raise RuntimeError("no evictable slot: every cached expert is needed by the current call")
            slot = self.slot.pop(evicted)
        self.slot[key] = slot
        if self.policy == "lfu_aging":
            self._age(key, self.clock / self.halflife)  # inserted by an access: a count of 1
        else:
            self._file(key, 1 if self.policy == "lfu" else 0)
            self.clock += 1
        return slot, evicted

    def room(self, key, pinned) -> int:
        """Slots `key`'s pool could give a new entry now without evicting a pinned one."""
        pool = self._pool(key)
        return self.capacity - sum(1 for k in pinned if self._pool(k) == pool and k in self.slot)


@dataclass
class Counters:
    """What the engine did, per phase ('prefill', 'decode')."""

    hits: dict = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    misses: dict = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    bytes_read: dict = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    load_seconds: dict = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})  # waited on, demand + prefetch
    seeded: int = 0
    prefetched: int = 0  # experts loaded ahead of their layer (decode), in the background
    prefetch_used: int = 0  # of those, accessed by their layer (counted as hits there)
    prefetch_seconds: float = 0.0  # background time spent on them

    def row(self) -> dict:
        out = {"seeded": self.seeded, "prefetched": self.prefetched, "prefetch_used": self.prefetch_used,
               "prefetch_seconds": self.prefetch_seconds}
        for name in ("hits", "misses", "bytes_read", "load_seconds"):
            for phase, value in getattr(self, name).items():
                out[f"{phase}_{name}"] = value
        accesses = self.hits["decode"] + self.misses["decode"]
        out["decode_hit_rate"] = self.hits["decode"] / accesses if accesses else float("nan")
        return out


class OffloadEngine:
    """Offload `model`'s routed experts to a store and serve them through a bounded slot pool (in place)."""

    def __init__(self, model: torch.nn.Module, store_path: str | os.PathLike, capacity: int, policy: str = "lru",
                 scope: str = "global", mode: str = "disaggregated", tier: str = "direct",
                 bandwidth_gbps: float | None = None, warm_tokens: int = 8, warm_decay: float = 0.5,
                 prefetch: bool = False, write: bool = True, verify: bool = True,
                 experts_implementation: str = "eager"):
        """`write`: write the store from `model` first (else the store must come from this very model: its
        fingerprint is checked); `verify`: check every expert's checksum when the store is opened;
        `experts_implementation`: transformers' experts kernel run over the slot pool (`EXPERTS_IMPLEMENTATIONS`;
        eager by default, the faster one over a pool on CPU; the paper-scale measurement compares them on the GPU)."""
        info = moe.describe(model)
        self.model, self.info = model, info
        self._check_settings(capacity, policy, scope, mode, experts_implementation)  # before anything is written
        if write:
            write_store(model, store_path)
        self.device = next(model.parameters()).device
        self.store = ExpertStore(store_path, tier, bandwidth_gbps, self.device, verify=verify)
        self._stores = {(tier, bandwidth_gbps): self.store}  # tiers opened on this store, by (tier, GB/s)
        self._check_store(fingerprint=not write)
        self.experts_implementation = None
        self.tier = tier
        self.warm_tokens, self.warm_decay = warm_tokens, warm_decay
        self.expert_bytes = sum(int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
                                for _, dtype, shape, _, _ in self.store.tensors[(0, 0)])
        self.pool = {}
        self.reconfigure(capacity, policy, scope, mode, prefetch, experts_implementation=experts_implementation)
        for index, layer in enumerate(info.layers):
            layer.experts.forward = self._forward(index, layer.experts.forward)
        self._hook = model.register_forward_pre_hook(self._phase_hook, with_kwargs=True)

    def _opened(self, tier: str, bandwidth_gbps: float | None) -> ExpertStore:
        """The store read through `tier`, opened once (unverified: it was checked when first opened)."""
        key = (tier, bandwidth_gbps)
        if key not in self._stores:  # host-backed tiers share one copy of the store in host memory
            shared = next((s.host_copy for s in self._stores.values() if s.host_copy is not None), None)
            self._stores[key] = ExpertStore(self.store.path, tier, bandwidth_gbps, self.device, verify=False,
                                            host_copy=shared if tier in HOST_BACKED else None)
        return self._stores[key]

    @contextlib.contextmanager
    def reading_from(self, tier: str, bandwidth_gbps: float | None = None):
        """Loads read through another tier of the same store for a while, the cache and its counters kept: a
        warm-up that only fills the cache need not wait out an emulated tier's sleeps."""
        self._wait()
        saved = self.store, self.tier
        self.store, self.tier = self._opened(tier, bandwidth_gbps), tier
        try:
            yield self
        finally:
            self._wait()
            self.store, self.tier = saved

    def reconfigure(self, capacity: int, policy: str = "lru", scope: str = "global", mode: str = "disaggregated",
                    prefetch: bool = False, tier: str | None = None, bandwidth_gbps: float | None = None,
                    experts_implementation: str | None = None) -> None:
        """A new budget, policy, scope, mode, prefetch setting, slow tier or experts implementation (None: keep
        it) for the same model and store: an empty cache and a freshly allocated slot pool (the old one is freed
        first), so one engine serves a whole sweep. A tier is opened once on the same store file (unverified: it
        was checked when first opened)."""
        self._check_settings(capacity, policy, scope, mode, experts_implementation)
        if experts_implementation is not None and experts_implementation != self.experts_implementation:
            if hasattr(self.model, "set_experts_implementation"):
                self.model.set_experts_implementation(experts_implementation)
            elif experts_implementation != "eager":
                raise ValueError(f"experts implementation {experts_implementation!r} needs a model with "
                                 "set_experts_implementation; this one runs its own experts code: use 'eager'")
            self.experts_implementation = experts_implementation
        if tier is not None:
            self.store, self.tier = self._opened(tier, bandwidth_gbps), tier
        info = self.info
        n_layers, n_experts = len(info.layers), info.n_experts
        if getattr(self, "_pending", None) is not None:
            self._wait()
        self.mode = mode
        self.cache = SlotCache(int(capacity), policy, scope, n_layers, cache.aging_halflife(n_layers, info.top_k))
        self.staging = n_experts if mode != "unified" else 0
        self.n_slots = self.cache.n_slots + self.staging
        self.counters = Counters()
        # the slot of every cached (layer, expert), -1 if absent, on the device: a cached call maps its routing to
        # slots there (no host tensor, no copy); misses and evictions update it (`_claim`)
        self.slot_table = torch.full((n_layers, n_experts), -1, dtype=torch.long, device=self.device)
        self.phase = "prefill"
        self.prefetch = bool(prefetch)
        self._pending = None  # the background prefetch in flight: a future of its seconds
        # `predictor(layer, hidden_states)`: the experts `layer` will use, for prefetch; None: its router's guess
        self.predictor = None
        self._ahead: set[tuple[int, int]] = set()  # prefetched keys not yet accessed
        if self.prefetch and not hasattr(self, "_executor"):
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="cfmoe-prefetch")
            self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._staged: dict[int, int] = {}  # expert -> staging slot of the layer being prefilled
        for layer in info.layers:  # drop the layers' references to the model's own experts, or to the old pool
            for name in self.pool or expert_parameters(layer.experts, n_experts):
                setattr(layer.experts, name, None)
        self.pool = {}
        for name, dtype, shape, _, _ in sorted(self.store.tensors[(0, 0)], key=lambda item: item[0]):
            self.pool[name] = torch.nn.Parameter(torch.zeros((self.n_slots, *shape), dtype=dtype, device=self.device),
                                                 requires_grad=False)
        for layer in info.layers:
            for name, param in self.pool.items():
                setattr(layer.experts, name, param)
            layer.experts.num_experts = self.n_slots

    def _check_settings(self, capacity, policy: str, scope: str, mode: str, implementation: str | None = None) -> None:
        for value, valid, what in ((policy, POLICIES, "policy"), (scope, SCOPES, "scope"), (mode, MODES, "mode"),
                                   (implementation or "eager", EXPERTS_IMPLEMENTATIONS, "experts implementation")):
            if value not in valid:
                raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
        n_layers, n_experts, top_k = len(self.info.layers), self.info.n_experts, self.info.top_k
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < top_k:
            unit = "per layer" if scope == "per_layer" else "in all"
            raise ValueError(f"capacity {capacity!r} experts ({unit}) is smaller than one layer's top-k of {top_k}; "
                             f"a decode step needs at least {top_k} slots")
        if scope == "global" and capacity > n_layers * n_experts:
            raise ValueError(f"capacity {capacity} exceeds the model's {n_layers * n_experts} routed experts")
        if scope == "per_layer" and capacity > n_experts:
            raise ValueError(f"per-layer capacity {capacity} exceeds the {n_experts} experts of a layer")

    def _check_store(self, fingerprint: bool) -> None:
        """The store must hold every (layer, expert) of the model with the model's expert parameter names, shapes
        and dtypes, and (`fingerprint`: one not just written here) come from this very model."""
        store, info = self.store, self.info
        for index, layer in enumerate(info.layers):
            layout = sorted((name, tuple(p.shape[1:]), p.dtype)
                            for name, p in expert_parameters(layer.experts, layer.n_experts).items())
            for expert in range(layer.n_experts):
                items = store.tensors.get((index, expert))
                if items is None:
                    raise ValueError(f"expert store {store.path} has no layer {index} expert {expert} (it holds "
                                     f"{store.n_layers} layers of {store.n_experts} experts, the model "
                                     f"{len(info.layers)} of {info.n_experts}): rewrite it with write=True")
                if sorted((name, shape, dtype) for name, dtype, shape, _, _ in items) != layout:
                    raise ValueError(f"expert store {store.path} holds layer {index} expert {expert} with other "
                                     "parameter names, shapes or dtypes than the model's: rewrite it with write=True")
        if fingerprint and store.model_fingerprint != moe.weights_fingerprint(self.model):
            raise ValueError(f"expert store {store.path} was written from another model: rewrite it with write=True")

    @property
    def bookkeeping(self) -> tuple[torch.Tensor, ...]:
        """The engine's own tensors on the model's device besides the slot pool (the pool is the experts'
        parameters): what a fast-tier budget must count next to the resident weights."""
        return (self.slot_table,)

    @property
    def pool_bytes(self) -> int:
        """Fast-tier bytes of expert weights: every slot, cache and staging (preallocated once)."""
        return sum(p.numel() * p.element_size() for p in self.pool.values())

    def _phase_hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        self.phase = "prefill" if ids.shape[1] > 1 else "decode"

    def _copy_in(self, layer: int, expert: int, slot: int, non_blocking: bool = False) -> None:
        self.store.load(layer, expert, {name: self.pool[name].data[slot] for name in self.pool}, non_blocking)

    def _load(self, layer: int, expert: int, slot: int) -> None:
        started = time.perf_counter()
        self._copy_in(layer, expert, slot)
        self.counters.misses[self.phase] += 1
        self.counters.bytes_read[self.phase] += self.expert_bytes
        self.counters.load_seconds[self.phase] += time.perf_counter() - started

    def _place(self, layer: int, experts: list[int]):
        """Slots for the experts one call needs, yielded in groups that fit the pool at once (usually one).

        A group is yielded before any of the next group's loads, which may evict its experts: the caller
        computes each group's share of the output before asking for the next."""
        phase, stream = self.phase, self._streaming()
        current, pinned = {}, set()
        for expert in experts:
            key = (layer, expert)
            slot = self.cache.lookup(key)
            if slot is not None:
                self.cache.touch(key)
                self.counters.hits[phase] += 1
                if key in self._ahead:
                    self._ahead.discard(key)
                    self.counters.prefetch_used += 1
            elif stream:
                slot = self.cache.n_slots + expert
                self._load(layer, expert, slot)
                self._staged[expert] = slot
            else:
                if self.cache.room(key, pinned) == 0:  # the group is full: compute it, then start another
                    yield current
                    current, pinned = {}, set()
                slot = self._claim(key, pinned)
                self._load(layer, expert, slot)
            current[expert] = slot
            pinned.add(key)
        yield current

    def _streaming(self) -> bool:
        """Whether this call's misses stream through the staging slots (a prefill outside the decode cache)."""
        return self.phase == "prefill" and self.mode != "unified"

    def _seed(self, layer: int, indices: torch.Tensor) -> None:
        """Warm the decode cache with this layer's experts most used by the prompt's last tokens."""
        quota = seed_quota(self.cache.capacity, self.cache.scope, len(self.info.layers), layer)
        for expert in layer_seeds(indices[-self.warm_tokens:].cpu().numpy(), quota, self.warm_decay).tolist():
            key = (layer, expert)
            if self.cache.lookup(key) is not None:
                self.cache.touch(key)
                continue
            slot = self._claim(key, set())
            for name in self.pool:
                self.pool[name].data[slot].copy_(self.pool[name].data[self._staged[expert]])
            self.counters.seeded += 1

    def _claim(self, key, pinned) -> int:
        """A cache slot for `key` (evicting by the policy); an evicted prefetch is no longer ahead."""
        slot, evicted = self.cache.insert(key, pinned)
        self._ahead.discard(evicted)
        if evicted is not None:
            self.slot_table[evicted] = -1
        self.slot_table[key] = slot
        return slot

    def _wait(self) -> None:
        """Let the prefetch in flight finish (its slots are about to be used); the wait counts as load time."""
        if self._pending is not None:
            started = time.perf_counter()
            self.counters.prefetch_seconds += self._pending.result()
            self.counters.load_seconds[self.phase] += time.perf_counter() - started
            self._pending = None

    def _prefetch(self, layer: int, hidden_states: torch.Tensor, pinned: set) -> None:
        """Start loading the experts `layer`'s router would pick for `hidden_states` (the previous layer's
        input: the residual stream changes little between layers) into cache slots, in the background."""
        if self.predictor is None:
            predicted = self.info.layers[layer].router.forward(hidden_states)[-1]  # no hooks: not the model's routing
            predicted = predicted.reshape(-1).tolist()
        else:
            predicted = np.asarray(self.predictor(layer, hidden_states)).reshape(-1).tolist()
        jobs, pinned = [], set(pinned)
        for expert in dict.fromkeys(predicted):
            key = (layer, expert)
            if self.cache.lookup(key) is not None:
                continue
            if self.cache.room(key, pinned) == 0:
                break
            slot = self._claim(key, pinned)
            self._ahead.add(key)
            pinned.add(key)
            jobs.append((key, slot))
        if jobs:
            self.counters.prefetched += len(jobs)
            self.counters.bytes_read[self.phase] += len(jobs) * self.expert_bytes
            self._pending = self._executor.submit(self._fetch, jobs)

    def _fetch(self, jobs) -> float:
        started = time.perf_counter()
        if self._stream is None:
            for (layer, expert), slot in jobs:
                self._copy_in(layer, expert, slot)
        else:  # a side stream overlaps the copies with the layer's compute; done when this returns
            with torch.cuda.stream(self._stream):
                for (layer, expert), slot in jobs:
                    self._copy_in(layer, expert, slot, non_blocking=True)
            self._stream.synchronize()
        return time.perf_counter() - started

    def _forward(self, layer: int, original):
        def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            self._wait()
            flat = top_k_index.reshape(-1).tolist()
            needed = list(dict.fromkeys(flat))  # first-occurrence order: a token's experts in router order
            self._staged = {}
            stream = self._streaming()
            single = stream or len(needed) <= self.cache.capacity
            out = None
            for group in self._place(layer, needed):
                if single and not stream:  # one group, every expert cached: the device table maps it
                    slots = self.slot_table[layer][top_k_index].to(top_k_index.dtype)
                else:  # staged slots, or one of several groups: this call's own map
                    lookup = torch.full((self.info.n_experts,), -1, dtype=top_k_index.dtype)
                    lookup[list(group)] = torch.tensor(list(group.values()), dtype=top_k_index.dtype)
                    slots = lookup.to(top_k_index.device)[top_k_index]
                if single:
                    index, weights = slots, top_k_weights
                else:  # entries of other groups contribute nothing to this pass
                    inside = slots >= 0
                    index = torch.where(inside, slots, next(iter(group.values())))
                    weights = top_k_weights * inside.to(top_k_weights.dtype)
                if self.prefetch and single and self.phase == "decode" and layer + 1 < len(self.info.layers):
                    self._prefetch(layer + 1, hidden_states, {(layer, e) for e in group})
                y = original(hidden_states, index, weights, *args, **kwargs)
                out = y if out is None else out + y
            if self.mode == "disaggregated_warm" and self.phase == "prefill":
                self._seed(layer, top_k_index)
            return out
        return forward

    def close(self) -> None:
        """Close every tier's store this engine opened and its prefetch thread (after the prefetch in flight)."""
        self._wait()
        for store in self._stores.values():
            store.close()
        if hasattr(self, "_executor"):
            self._executor.shutdown()

    def reset_counters(self) -> None:
        self._wait()
        self.counters = Counters()
        self.store.bytes_read = 0

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask=None, **generate_kwargs) -> tuple[torch.Tensor, dict]:
        """`model.generate` through the engine; returns the sequences and this call's measurements."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.numel() == 0 or \
                input_ids.is_floating_point():
            got = f"shape {tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) \
                else type(input_ids).__name__
            raise ValueError(f"input_ids must be a non-empty 2-D (batch, seq) tensor of token ids, got {got}")
        self.reset_counters()
        cuda = self.pool[next(iter(self.pool))].device.type == "cuda"
        if cuda:  # peak fast-tier bytes during this call, next to what it started with
            memory = {"cuda_start_bytes": reset_cuda_peak()}
        times = []
        hook = self.model.register_forward_hook(lambda *a: times.append(time.perf_counter()))
        started = time.perf_counter()
        try:
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        finally:
            hook.remove()
            self._wait()
        if cuda:
            torch.cuda.synchronize()
            memory["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
        new_tokens = out.shape[1] - input_ids.shape[1]
        ttft = times[0] - started
        decode_s = times[-1] - times[0] if len(times) > 1 else float("nan")
        stats = {"tier": self.tier, "mode": self.mode, "prefetch": self.prefetch, "policy": self.cache.policy,
                 "experts_implementation": self.experts_implementation,
                 "scope": self.cache.scope,
                 "capacity": self.cache.capacity, "slots": self.n_slots, "pool_bytes": self.pool_bytes,
                 "new_tokens": new_tokens, "ttft_s": ttft, "decode_s": decode_s,
                 "decode_tokens_per_s": (len(times) - 1) * input_ids.shape[0] / decode_s if len(times) > 1 else float("nan"),
                 **self.counters.row(), **(memory if cuda else {})}
        return out, stats
