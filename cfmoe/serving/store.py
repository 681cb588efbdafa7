"""The slow tier of the offloading engine: the expert store format and its readers.

    write_store(model, "artifacts/cpu/expert_stores/base.safetensors")
    store = ExpertStore("artifacts/cpu/expert_stores/base.safetensors", tier="throttled", bandwidth_gbps=4.5)
    tensors = store.read(layer=0, expert=3)          # {parameter name: tensor}

A store is one safetensors file holding every routed expert of a model, each (layer, expert) contiguous
(`L0000.E00003.gate_up_proj`), so one expert is one read. Its metadata carry a format marker, the layer and expert
counts, the fingerprint of the model it was written from (`model_fingerprint`) and a crc32 per expert, which the
reader checks when it opens the store. Tiers (every result is labelled with the one used):
- `direct`: `O_DIRECT` reads, bypassing the page cache (storage speed);
- `page_cache`: plain reads, which the kernel may serve from memory;
- `throttled`: an emulated device that delivers an expert into fast memory at `bandwidth_gbps` (e.g. the authors'
  4.5 GB/s flash), labelled "emulated (sleep-throttled)" in results: the store is held in host memory like the
  `host` tier's (one copy shared between the two, `host_copy`) and each load, the copy into fast memory, is held to
  that rate. Reading the file on each load made this machine's own read and pageable copy the limit instead: 4.5
  GB/s emulated gave loads of 2.5 to 2.9 GB/s on an H100 (2026-12-08);
- `host`: the store read once into (pinned, with CUDA) host memory, copied to the device per expert.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from .. import moe

TIERS = ("direct", "page_cache", "throttled", "host")
HOST_BACKED = ("host", "throttled")  # tiers that hold the store in host memory
FORMAT = "cfmoe-expert-store"
_ALIGN = 4096
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def expert_parameters(experts: torch.nn.Module, n_experts: int) -> dict[str, torch.nn.Parameter]:
    """The experts module's per-expert parameters (first dimension = n_experts), by name."""
    params = {name: p for name, p in experts.named_parameters(recurse=False) if p.ndim >= 1 and p.shape[0] == n_experts}
    if not params:
        raise ValueError(f"{type(experts).__name__} has no parameter stacked over its {n_experts} experts")
    return params


def _key(layer: int, expert: int, name: str) -> str:
    return f"L{layer:04d}.E{expert:05d}.{name}"


def _bytes(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's bytes (on the CPU, row-major)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _checksum(parts: dict) -> int:
    """crc32 of one expert's tensors' bytes (by parameter name), chained in name order."""
    crc = 0
    for name in sorted(parts):
        crc = zlib.crc32(parts[name], crc)
    return crc


def write_store(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write every routed expert of `model` to one safetensors file, each (layer, expert) contiguous, with the
    model's fingerprint and a crc32 per expert. Streams one layer at a time through host memory, so a model of
    any size needs about one layer's experts of it; the file appears complete or not at all."""
    info = moe.describe(model)
    layers = [expert_parameters(layer.experts, layer.n_experts) for layer in info.layers]
    header, offset = {}, 0
    for index, params in enumerate(layers):
        for expert in range(info.n_experts):
            for name in sorted(params):
                param = params[name]
                size = param[0].numel() * param.element_size()
                header[_key(index, expert, name)] = {"dtype": _NAMES[param.dtype], "shape": list(param.shape[1:]),
                                                     "data_offsets": [offset, offset + size]}
                offset += size
    checksums = {f"{index}.{expert}": "0" * 8 for index in range(len(layers)) for expert in range(info.n_experts)}
    fingerprint = moe.weights_fingerprint(model)

    def encoded() -> bytes:  # fixed width: the checksums are filled in after the data, in place
        metadata = {"format": FORMAT, "n_layers": str(len(layers)), "n_experts": str(info.n_experts),
                    "model_fingerprint": fingerprint, "checksums": json.dumps(checksums)}
        text = json.dumps({"__metadata__": metadata, **header}, separators=(",", ":")).encode()
        return text + b" " * (-len(text) % 8)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            head = encoded()
            f.write(struct.pack("<Q", len(head)) + head)
            for index, params in enumerate(layers):
                host = {name: param.detach().to("cpu", copy=True).contiguous() for name, param in params.items()}
                for expert in range(info.n_experts):
                    parts = {name: _bytes(host[name][expert]) for name in sorted(host)}
                    for name in sorted(parts):
                        f.write(parts[name])
                    checksums[f"{index}.{expert}"] = f"{_checksum(parts):08x}"
                del host
            f.seek(8)
            f.write(encoded())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class ExpertStore:
    """The slow tier: reads one (layer, expert)'s tensors from a store file written by `write_store`.

    `verify` checks every expert's checksum once, at open: checked on first read instead, the crc32 would add
    to the load times measured (x2.5 on a fresh reader of 147 kB experts from the page cache)."""

    def __init__(self, path: str | os.PathLike, tier: str = "direct", bandwidth_gbps: float | None = None,
                 device: str | torch.device = "cpu", verify: bool = True, host_copy: torch.Tensor | None = None):
        """`host_copy`: another host-backed store's `host_copy` of this file, shared instead of read again."""
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}; valid: {', '.join(TIERS)}")
        if tier == "throttled" and not (bandwidth_gbps and bandwidth_gbps > 0):
            raise ValueError(f"tier 'throttled' needs bandwidth_gbps > 0 (e.g. 4.5), got {bandwidth_gbps!r}")
        self.path, self.tier, self.bandwidth_gbps = Path(path), tier, bandwidth_gbps
        if not self.path.is_file():
            raise FileNotFoundError(f"expert store {self.path} does not exist; write it with cfmoe.serving.write_store")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            header = f.read(n) if 0 < n < size else b""
        try:
            meta = json.loads(header)
        except ValueError:
            raise ValueError(f"expert store {self.path} is not a safetensors file (or its header is cut)") from None
        metadata = meta.pop("__metadata__", None) or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"expert store {self.path} has no {FORMAT!r} format marker: it was not written by "
                             "cfmoe.serving.write_store")
        if "model_fingerprint" not in metadata or "checksums" not in metadata:
            raise ValueError(f"expert store {self.path} has no model fingerprint or checksums (an older format): "
                             "rewrite it with cfmoe.serving.write_store (OffloadEngine write=True)")
        self.n_layers, self.n_experts = int(metadata["n_layers"]), int(metadata["n_experts"])
        self.model_fingerprint = metadata["model_fingerprint"]
        try:
            self.checksums = {tuple(map(int, k.split("."))): int(crc, 16)
                              for k, crc in json.loads(metadata["checksums"]).items()}
        except (ValueError, TypeError, AttributeError):
            raise ValueError(f"expert store {self.path} has malformed checksums: rewrite it with "
                             "cfmoe.serving.write_store") from None
        self.data_start = 8 + n
        self.spans: dict[tuple[int, int], tuple[int, int]] = {}
        self.tensors: dict[tuple[int, int], list[tuple[str, torch.dtype, tuple, int, int]]] = {}
        end_of_data = 0
        for key, entry in meta.items():
            if entry["dtype"] not in _DTYPES:
                raise ValueError(f"expert store {self.path} holds {key} as dtype {entry['dtype']!r}; "
                                 f"valid: {', '.join(_DTYPES)}")
            layer, expert, name = key.split(".", 2)
            lk = (int(layer[1:]), int(expert[1:]))
            begin, end = entry["data_offsets"]
            end_of_data = max(end_of_data, end)
            self.tensors.setdefault(lk, []).append((name, _DTYPES[entry["dtype"]], tuple(entry["shape"]), begin, end))
        if self.tensors.keys() != self.checksums.keys():
            raise ValueError(f"expert store {self.path} has checksums for other experts than it holds: rewrite it "
                             "with cfmoe.serving.write_store")
        if self.data_start + end_of_data > size:
            raise ValueError(f"expert store {self.path} is truncated: {size} bytes, its header describes "
                             f"{self.data_start + end_of_data}")
        for lk, items in self.tensors.items():
            begin, end = min(i[3] for i in items), max(i[4] for i in items)
            self.spans[lk] = (self.data_start + begin, self.data_start + end)
        self.max_span = max(end - begin for begin, end in self.spans.values())
        if verify:
            self.verify()
        self.bytes_read = 0
        self._host = None
        if host_copy is not None and (tier not in HOST_BACKED or host_copy.numel() != size):
            raise ValueError(f"host_copy of {host_copy.numel()} bytes does not fit tier {tier!r} of the {size}-byte "
                             f"store {self.path}; share it between the tiers {', '.join(HOST_BACKED)} of one store")
        flags = os.O_RDONLY
        if tier == "direct":
            flags |= os.O_DIRECT
        self._fd = os.open(self.path, flags)
        self._buffer = mmap.mmap(-1, self.max_span + 2 * _ALIGN)  # page-aligned, as O_DIRECT needs
        if tier in HOST_BACKED and host_copy is not None:
            self._host = host_copy
        elif tier in HOST_BACKED:
            # read straight into (pinned) host memory, in chunks: one copy of the store, not two
            self._host = torch.empty(size, dtype=torch.uint8, pin_memory=torch.device(device).type == "cuda")
            view, chunk = memoryview(self._host.numpy()), 1 << 28
            with open(self.path, "rb", buffering=0) as f:
                for start in range(0, size, chunk):
                    f.readinto(view[start:start + chunk])

    @property
    def host_copy(self) -> torch.Tensor | None:
        """The store's bytes in host memory (host-backed tiers), to share with another tier of the same store."""
        return self._host

    def verify(self) -> None:
        """Check every expert's bytes against its checksum; a corrupt one raises a one-line ValueError."""
        with open(self.path, "rb") as f:
            for (layer, expert), (begin, end) in sorted(self.spans.items()):
                f.seek(begin)
                span = memoryview(f.read(end - begin))
                parts = {name: span[self.data_start + b - begin:self.data_start + e - begin]
                         for name, _, _, b, e in self.tensors[(layer, expert)]}
                if _checksum(parts) != self.checksums[(layer, expert)]:
                    raise ValueError(f"expert store {self.path} is corrupt: layer {layer} expert {expert} fails its "
                                     "checksum; rewrite it with cfmoe.serving.write_store")

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()

    def read(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """The expert's tensors by parameter name (views into a reused buffer: copy them before the next read).
        On the `throttled` tier the read is held to `bandwidth_gbps`."""
        started = time.perf_counter()
        out = self._read(layer, expert)
        self._hold(layer, expert, started)
        return out

    def load(self, layer: int, expert: int, into: dict[str, torch.Tensor], non_blocking: bool = False) -> None:
        """Read the expert and copy each tensor into `into[name]` (a slot in fast memory). On the `throttled`
        tier the whole load is held to `bandwidth_gbps`: the emulated device delivers an expert into fast memory at
        that rate (holding the read alone let the copy from its pageable buffer come on top: 4.5 GB/s emulated gave
        2.6-3.1 GB/s loads on an H100)."""
        started = time.perf_counter()
        for name, value in self._read(layer, expert).items():
            into[name].copy_(value, non_blocking=non_blocking)
        self._hold(layer, expert, started)

    def _hold(self, layer: int, expert: int, started: float) -> None:
        """On the `throttled` tier, sleep until one expert's bytes / `bandwidth_gbps` after `started`."""
        if self.tier == "throttled":
            begin, end = self.spans[(layer, expert)]
            due = (end - begin) / (self.bandwidth_gbps * 1e9) - (time.perf_counter() - started)
            if due > 0:
                time.sleep(due)

    def _read(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """The expert's tensors as views into the host copy or the reused read buffer (unthrottled)."""
        if (layer, expert) not in self.spans:
            raise KeyError(f"expert store {self.path} has no layer {layer} expert {expert}")
        begin, end = self.spans[(layer, expert)]
        if self._host is not None:
            raw, base = self._host[begin:end], begin
        else:
            start = begin - begin % _ALIGN if self.tier == "direct" else begin
            length = end - start
            if self.tier == "direct":
                length += -length % _ALIGN
            view = memoryview(self._buffer)[:length]
            got = os.preadv(self._fd, [view], start)
            if got < end - start:
                raise ValueError(f"expert store {self.path} is truncated at layer {layer} expert {expert}")
            raw, base = torch.frombuffer(self._buffer, dtype=torch.uint8, count=end - begin, offset=begin - start), begin
            del view
        out = {}
        for name, dtype, shape, b, e in self.tensors[(layer, expert)]:
            lo = self.data_start + b - base
            out[name] = raw[lo:lo + (e - b)].view(dtype).view(shape)
        self.bytes_read += end - begin
        return out


def measure_load_seconds(store: ExpertStore, n: int = 64, seed: int = 0,
                         device: str | torch.device = "cpu") -> float:
    """Median seconds to read one expert from `store` and copy it into fast memory (a scratch slot on
    `device`), over `n` random (layer, expert): what one miss costs the engine, at expert granularity."""
    if n < 1:
        raise ValueError(f"n must be >= 1 reads, got {n!r}")
    keys = sorted(store.spans)
    picks = np.random.default_rng(seed).choice(len(keys), size=n)
    scratch = {name: torch.empty(shape, dtype=dtype, device=device) for name, dtype, shape, _, _ in store.tensors[keys[0]]}
    cuda = torch.device(device).type == "cuda"
    seconds = []
    for i in picks:
        started = time.perf_counter()
        store.load(*keys[i], scratch)
        if cuda:
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    return float(np.median(seconds))
