"""The offloading engine: a model served with only a bounded set of routed experts in fast memory.

    from cfmoe.serving import OffloadEngine, write_store
    engine = OffloadEngine(model, "artifacts/cpu/expert_stores/base.safetensors", capacity=96)
    out, stats = engine.generate(input_ids, max_new_tokens=64)

- `store`: the slow tier, the expert store format and its readers (direct, page cache, throttled, host);
- `engine`: the slot pool, its O(1) cache bookkeeping (`SlotCache`) and `OffloadEngine`.
"""

from .engine import POLICIES, Counters, OffloadEngine, SlotCache, reset_cuda_peak
from .store import TIERS, ExpertStore, expert_parameters, measure_load_seconds, write_store

__all__ = ["POLICIES", "TIERS", "Counters", "ExpertStore", "OffloadEngine", "SlotCache", "expert_parameters",
           "measure_load_seconds", "reset_cuda_peak", "write_store"]
