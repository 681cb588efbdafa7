"""The authors' analytic decode model: tokens/s and memory of an expert-caching MoE from sizes and bandwidths.

    sizes, device = deepseek_moe_16b(bits_per_param=4.5), PROFILES["cpu"]
    print(tokens_per_second(sizes, device, hit_rate=0.6), memory_bytes(sizes, capacity=4 * 64) / 1e9)

Time per decoded token = (W_resident + W_dynamic * h) / B_mem + W_dynamic * (1 - h) / B_io, where W_dynamic
is the bytes of the top_k * n_layers routed experts a token activates and h the expert-cache hit rate: every
resident byte and every cached expert is read from fast memory, every missed expert from slow storage.
Memory = W_resident + capacity * expert_bytes. Bytes are plain bytes; MB and GB mean 10^6 and 10^9 bytes;
bandwidths are in GB/s (10^9 bytes per second, despite the `gbps` spelling).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import claims

_DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


@dataclass(frozen=True)
class DeviceProfile:
    """Fast-memory and slow-storage read bandwidths of a device, in GB/s (10^9 bytes per second)."""

    name: str
    mem_bandwidth_gbps: float
    io_bandwidth_gbps: float
    notes: str = ""

    def __post_init__(self):
        for field in ("mem_bandwidth_gbps", "io_bandwidth_gbps"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{field} must be a positive finite number of GB/s, got {value!r}")


PROFILES = {name: DeviceProfile(name, mem, io, notes=f"the authors' edge {name.upper()}: memory {mem:g} GB/s, "
                                                    f"flash {io:g} GB/s")
            for name, (mem, io) in claims.EDGE_DEVICES.items()}


def custom_profile(name: str, mem_bandwidth_gbps: float, io_bandwidth_gbps: float, notes: str = "") -> DeviceProfile:
    """A device profile from your own bandwidth figures (GB/s)."""
    return DeviceProfile(name, float(mem_bandwidth_gbps), float(io_bandwidth_gbps), notes)


def measure_profile(path: str | os.PathLike | None = None, size_mb: float = 256, repeats: int = 5) -> DeviceProfile:
    """This machine's memory copy and file read bandwidths (medians of `repeats`), as a device profile.

    Memory: bytes copied per second by a numpy copy of `size_mb` MB (a copy also writes as many bytes).
    I/O: reading back a `size_mb` MB file written in `path` (default: the temp dir) after asking the kernel
    to drop its cached pages (posix_fadvise DONTNEED); a kernel may keep them anyway, so the figure can be
    page-cache speed, and the profile's notes say which was attempted.
    """
    if not size_mb > 0 or repeats < 1:
        raise ValueError(f"size_mb must be > 0 and repeats >= 1, got size_mb={size_mb}, repeats={repeats}")
    n_bytes = int(size_mb * 1e6)
    source = np.random.default_rng(0).integers(0, 255, n_bytes, dtype=np.uint8)
    target = np.empty_like(source)
    mem = median_rate(lambda: np.copyto(target, source), n_bytes, repeats)

    can_drop = hasattr(os, "posix_fadvise")
    fd, name = tempfile.mkstemp(prefix="cfmoe-io-", dir=path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(source.tobytes())
            f.flush()
            os.fsync(f.fileno())

        def read():
            with open(name, "rb", buffering=0) as f:
                if can_drop:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                f.readinto(target)

        io = median_rate(read, n_bytes, repeats)
    finally:
        os.unlink(name)
    drop = "after posix_fadvise(DONTNEED), storage speed unless the kernel kept the pages" if can_drop else \
        "page cache (could not ask to drop it)"
    return DeviceProfile("measured", mem, io, notes=f"memory: numpy copy of {size_mb:g} MB; I/O: file read of "
                         f"{size_mb:g} MB in {path or tempfile.gettempdir()} {drop}; medians of {repeats}")


def median_rate(operation, n_bytes: int, repeats: int) -> float:
    """Median GB/s of `operation` moving `n_bytes` bytes."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        operation()
        seconds.append(time.perf_counter() - start)
    return n_bytes / max(float(np.median(seconds)), 1e-9) / 1e9


@dataclass(frozen=True)
class ModelSizes:
    """The byte sizes the cost model needs; n_layers counts MoE layers only."""

    name: str
    n_layers: int
    n_experts: int
    top_k: int
    expert_bytes: float  # one routed expert
    resident_bytes: float  # everything always in fast memory: attention, embeddings, shared experts, ...

    def __post_init__(self):
        for field in ("n_layers", "n_experts", "top_k", "expert_bytes", "resident_bytes"):
            value, bound = getattr(self, field), 0 if field == "resident_bytes" else 1
            if not value >= bound:
                raise ValueError(f"{field} must be >= {bound}, got {value!r}")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k {self.top_k} exceeds n_experts {self.n_experts}")

    @property
    def w_dynamic(self) -> float:
        """Bytes of the routed experts one token activates: top_k * n_layers * expert_bytes."""
        return self.top_k * self.n_layers * self.expert_bytes

    @property
    def w_resident(self) -> float:
        return self.resident_bytes

    @property
    def n_routed(self) -> int:
        """Routed experts in the model, the largest useful cache capacity."""
        return self.n_layers * self.n_experts

    @classmethod
    def from_params(cls, name: str, n_layers: int, n_experts: int, top_k: int, expert_params: float,
                    resident_params: float, bits_per_param: float = 16) -> ModelSizes:
        """Sizes from parameter counts stored at `bits_per_param`."""
        scale = _bits(bits_per_param) / 8
        return cls(name, n_layers, n_experts, top_k, expert_params * scale, resident_params * scale)


def _bits(bits_per_param) -> float:
    if not (isinstance(bits_per_param, (int, float)) and 0 < bits_per_param <= 64):
        raise ValueError(f"bits_per_param must be in (0, 64], e.g. 16, 8 or 4.5; got {bits_per_param!r}")
    return float(bits_per_param)


def deepseek_moe_16b(bits_per_param: float = claims.DEEPSEEK_MOE_16B["bits_per_param"]) -> ModelSizes:
    """The authors' DeepSeek-MoE-16B instance (`claims.DEEPSEEK_MOE_16B`), scaled from their 4.5-bit sizes.

    L layers (attention in all, the first dense: L - 1 MoE layers), routed experts plus shared ones, top-k.
    One expert E = 3 * hidden * expert_width parameters (4.866 MB, 10^6 bytes, at 4.5 bits). The authors'
    attention (each of W_q, W_k, W_v, W_o per layer) and token embedding figures are kept as stated and read in
    the same 10^6-byte MB; from parameter counts they are MiB (2^20 bytes), so this under-counts resident bytes
    by about 18 MB (2%) at 4.5 bits, as the authors' model does.
    W_resident = 4 * W_attention * L + W_embedding + n_routed * E + n_shared * E * (L - 1): the shared experts,
    and one MoE layer's worth of routed experts that the authors' formula counts as always resident (room for
    the layer being computed, i.e. a staging buffer; the dense first layer's FFN is not otherwise counted);
    kept exactly as given. W_dynamic = top_k * E * (L - 1).
    """
    paper = claims.DEEPSEEK_MOE_16B
    scale = _bits(bits_per_param) / paper["bits_per_param"]
    n_layers, n_routed = paper["n_layers"], paper["n_routed"]
    expert = 3 * paper["hidden"] * paper["expert_width"] * bits_per_param / 8
    resident = ((4 * paper["attention_mb"] * n_layers + paper["embedding_mb"]) * 1e6 * scale + n_routed * expert
                + paper["n_shared"] * expert * (n_layers - 1))
    return ModelSizes(f"deepseek-moe-16b@{bits_per_param:g}bit", n_layers - 1, n_routed, paper["top_k"], expert,
                      resident)


def from_describe(info, bits_per_param: float | None = None, source_bytes_per_param: float | str = 4) -> ModelSizes:
    """Sizes from `cfmoe.moe.describe(model)` or a dict/object with n_layers, n_experts, top_k, expert_bytes,
    resident_bytes; with `bits_per_param`, bytes are rescaled from `source_bytes_per_param` (bytes, or a
    dtype name such as "bfloat16"; the default assumes float32 weights)."""
    get = info.get if isinstance(info, dict) else lambda key, default=None: getattr(info, key, default)
    if get("layers") is not None:  # an MoEModelInfo
        n_layers = len(get("layers"))
        expert_bytes = get("routed_expert_bytes") / (n_layers * get("n_experts"))
    else:
        n_layers, expert_bytes = get("n_layers"), get("expert_bytes")
    missing = [key for key, value in {"n_layers": n_layers, "n_experts": get("n_experts"), "top_k": get("top_k"),
                                      "expert_bytes": expert_bytes, "resident_bytes": get("resident_bytes")}.items()
               if value is None]
    if missing:
        raise ValueError(f"{type(info).__name__} lacks {', '.join(missing)}; needs n_layers (or layers), "
                         "n_experts, top_k, expert_bytes (or routed_expert_bytes), resident_bytes")
    scale = 1.0
    if bits_per_param is not None:
        source = source_bytes_per_param
        if isinstance(source, str):
            if source.removeprefix("torch.") not in _DTYPE_BYTES:
                raise ValueError(f"unknown dtype {source!r}; known: {', '.join(_DTYPE_BYTES)}")
            source = _DTYPE_BYTES[source.removeprefix("torch.")]
        scale = _bits(bits_per_param) / 8 / source
    name = get("name") or get("architecture") or "model"
    return ModelSizes(str(name), int(n_layers), int(get("n_experts")), int(get("top_k")),
                      expert_bytes * scale, get("resident_bytes") * scale)


def tokens_per_second(sizes: ModelSizes, profile: DeviceProfile, hit_rate):
    """The authors' decode tokens/s at expert-cache hit rate(s) `hit_rate` (a float or an array)."""
    h = _hit_rates(hit_rate)
    mem, io = profile.mem_bandwidth_gbps * 1e9, profile.io_bandwidth_gbps * 1e9
    seconds = (sizes.w_resident + sizes.w_dynamic * h) / mem + sizes.w_dynamic * (1 - h) / io
    return float(1 / seconds) if h.ndim == 0 else 1 / seconds


def offload_tokens_per_second(sizes: ModelSizes, hit_rate, floor_s: float, load_s_per_expert: float):
    """Decode tokens/s of a real offloading engine: a measured per-token floor (everything a token costs with
    all its experts cached: compute, memory reads, framework) plus, for each of its top_k * n_layers expert
    accesses that misses, the measured time to read one expert and copy it into fast memory.

    The authors' model prices a miss at streaming bandwidth and a token at its bytes over memory bandwidth;
    both constants here are measured at the engine's own granularity instead (notebook 05)."""
    h = _hit_rates(hit_rate)
    for name, value in (("floor_s", floor_s), ("load_s_per_expert", load_s_per_expert)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    seconds = floor_s + sizes.top_k * sizes.n_layers * (1 - h) * load_s_per_expert
    if np.any(seconds <= 0):
        raise ValueError("floor_s and load_s_per_expert are both 0: a token would take no time")
    return float(1 / seconds) if h.ndim == 0 else 1 / seconds


def _hit_rates(hit_rate) -> np.ndarray:
    h = np.asarray(hit_rate, dtype=float)
    if np.any(~((h >= 0) & (h <= 1))):
        raise ValueError(f"hit_rate must lie in [0, 1], got {hit_rate!r}")
    return h


def memory_bytes(sizes: ModelSizes, capacity):
    """Fast-memory bytes with an expert cache of `capacity` experts (an int or an array)."""
    c = np.asarray(capacity)
    if np.any(c < 0) or np.any(c > sizes.n_routed):
        raise ValueError(f"capacity must lie in [0, {sizes.n_routed}] (the model's routed experts), got {capacity!r}")
    memory = sizes.w_resident + c * sizes.expert_bytes
    return float(memory) if c.ndim == 0 else memory


def throughput_curve(sizes: ModelSizes, profile: DeviceProfile, capacities, hit_rates) -> pd.DataFrame:
    """Memory (GB) and decode tokens/s of each (capacity, hit rate) pair measured for one model."""
    capacities, hit_rates = np.asarray(capacities), np.asarray(hit_rates, dtype=float)
    if capacities.shape != hit_rates.shape or capacities.ndim != 1:
        raise ValueError(f"capacities and hit_rates must be 1-D of one length, got shapes "
                         f"{capacities.shape} and {hit_rates.shape}")
    return pd.DataFrame({"capacity": capacities, "memory_gb": memory_bytes(sizes, capacities) / 1e9,
                         "hit_rate": hit_rates, "tokens_per_s": tokens_per_second(sizes, profile, hit_rates)})


def memory_at_equal_throughput(curve_a: pd.DataFrame, curve_b: pd.DataFrame, tokens_per_s_levels) -> pd.DataFrame:
    """Memory each curve needs to reach each tokens/s level, and the fraction b saves over a (1 - b/a).

    Each curve is reduced to its frontier (the least memory reaching at least each tokens/s) and memory is
    linearly interpolated along it; a level outside a curve's measured tokens/s range gives NaN.
    """
    levels = np.asarray(tokens_per_s_levels, dtype=float)
    memory = {label: _memory_at(curve, levels, label) for label, curve in (("a", curve_a), ("b", curve_b))}
    return pd.DataFrame({"tokens_per_s": levels, "memory_a": memory["a"], "memory_b": memory["b"],
                         "saved": 1 - memory["b"] / memory["a"]})


def _memory_at(curve: pd.DataFrame, levels: np.ndarray, label: str) -> np.ndarray:
    if not {"memory_gb", "tokens_per_s"} <= set(curve.columns) or curve.empty:
        raise ValueError(f"curve_{label} must be a non-empty throughput_curve table with memory_gb and "
                         f"tokens_per_s columns, got columns {list(curve.columns)}")
    ordered = curve.sort_values(["memory_gb", "tokens_per_s"], ascending=[True, False])
    memory, speed = ordered.memory_gb.to_numpy(float), ordered.tokens_per_s.to_numpy(float)
    best = np.maximum.accumulate(speed)
    frontier = np.r_[True, best[1:] > best[:-1]]  # points that reach a new best tokens/s
    memory, speed = memory[frontier], speed[frontier]
    return np.where((levels >= speed[0]) & (levels <= speed[-1]), np.interp(levels, speed, memory), np.nan)


def saved_at_levels(base: pd.DataFrame, candidate: pd.DataFrame, shares, column: str = "cached_share") -> pd.DataFrame:
    """Memory `candidate` needs at the tokens/s `base` reaches with `shares` of its routed experts cached, next
    to base's own; both are curves with `column`, `memory_gb` and `tokens_per_s`."""
    shares = np.asarray(shares, float)
    levels = base.set_index(np.round(base[column], 6)).loc[np.round(shares, 6)].tokens_per_s.to_numpy()
    saved = memory_at_equal_throughput(base, candidate, levels)
    return pd.DataFrame({column: shares, "tokens_per_s": saved.tokens_per_s, "memory_base_gb": saved.memory_a,
                         "memory_cfmoe_gb": saved.memory_b, "memory_saved": saved.saved})
