"""The offloading engine: token-identical generation under any budget, policy, mode and tier; the budget holds."""

import copy
import time

import numpy as np
import pytest
import torch

from cfmoe import cache, moe
from cfmoe.serving import ExpertStore, OffloadEngine, write_store
from tiny_models import ARCHITECTURES, tiny_moe, tiny_tokenizer

PROMPTS = ["the cat sat on the mat and", "routing is local"]


def encode(tok):
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    return enc["input_ids"], enc["attention_mask"]


def reference(lm, ids, mask, n=12):
    return lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                       pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_generation_is_token_identical_across_budgets_and_modes(arch, tmp_path):
    lm, tok = tiny_moe(arch, n_experts=8, top_k=2, n_layers=2), tiny_tokenizer()
    ids, mask = encode(tok)
    with torch.no_grad():
        expected = reference(lm, ids, mask)
        logits = lm(input_ids=ids, attention_mask=mask).logits
    for capacity, mode, policy, prefetch in [(2, "unified", "lru", False), (3, "disaggregated", "lfu", False),
                                             (5, "disaggregated_warm", "lru", False), (16, "unified", "lfu", False),
                                             (4, "disaggregated", "lru", True), (6, "unified", "lfu", True)]:
        model = copy.deepcopy(lm)
        engine = OffloadEngine(model, tmp_path / f"{arch}.safetensors", capacity, policy=policy, mode=mode,
                               tier="page_cache", prefetch=prefetch)
        out, stats = engine.generate(ids, mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(out, expected), (capacity, mode, policy)
        # the device slot table is the cache's map, after every load and eviction
        table = engine.slot_table.cpu().numpy()
        assert {(l, e): int(s) for (l, e), s in np.ndenumerate(table) if s >= 0} == engine.cache.slot
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, logits, rtol=1e-4, atol=1e-5)
        # the budget: the model now holds its resident weights and the slot pool, nothing more
        info = moe.describe(lm)
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        assert held == info.total_bytes - info.routed_expert_bytes + engine.pool_bytes
        assert engine.n_slots == capacity + (0 if mode == "unified" else 8)
        # every tensor the engine keeps on the device besides the pool is bookkeeping the CUDA budget counts
        kept = {id(t) for t in vars(engine).values() if isinstance(t, torch.Tensor)}
        assert kept == {id(t) for t in engine.bookkeeping} and engine.bookkeeping
        assert stats["new_tokens"] == 12 and stats["decode_misses"] >= 0
        assert (stats["prefetched"] > 0) == prefetch and stats["prefetch_used"] <= stats["prefetched"]


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_pool_kernels_are_token_identical_to_the_resident_model(arch, implementation, tmp_path):
    """transformers' grouped and batched experts kernels run over the whole slot pool (slot ids for expert ids),
    in one group and, with too few slots for a prompt, in several; the output is the resident model's."""
    lm, tok = tiny_moe(arch, n_experts=8, top_k=2, n_layers=2), tiny_tokenizer()
    if not hasattr(lm, "set_experts_implementation"):
        pytest.skip(f"{arch} runs its own experts code")
    ids, mask = encode(tok)
    lm.set_experts_implementation(implementation)
    with torch.no_grad():
        expected = reference(lm, ids, mask)
    engine = OffloadEngine(copy.deepcopy(lm), tmp_path / "s.safetensors", 2, mode="unified",
                           experts_implementation=implementation)
    for capacity, mode in [(2, "unified"), (3, "disaggregated"), (16, "disaggregated_warm")]:
        engine.reconfigure(capacity, mode=mode)
        out, stats = engine.generate(ids, mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(out, expected), (capacity, mode)
        assert stats["experts_implementation"] == implementation
    engine.reconfigure(4, experts_implementation="eager")
    assert engine.model.config._experts_implementation == "eager"
    with pytest.raises(ValueError, match="unknown experts implementation 'flash'; valid: eager, grouped_mm"):
        engine.reconfigure(4, experts_implementation="flash")


@pytest.mark.parametrize("policy", ["lru", "lfu", "lfu_aging"])
def test_engine_hits_follow_the_cache_semantics(policy, tmp_path):
    """Decode through the engine = the simulator, under the same policy, on the accesses the engine saw."""
    lm, tok = tiny_moe("qwen2_moe", n_experts=8, top_k=2, n_layers=3), tiny_tokenizer()
    ids = tok(["the cat sat"], return_tensors="pt")["input_ids"]
    accesses = []
    model = copy.deepcopy(lm)
    engine = OffloadEngine(model, tmp_path / "s.safetensors", 4, policy=policy, mode="disaggregated", tier="direct")
    place = engine._place

    def spy(layer, experts):
        if engine.phase == "decode":
            accesses.extend(layer * 8 + e for e in experts)
        return place(layer, experts)

    engine._place = spy
    _, stats = engine.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    sim = cache.simulate_cache(np.array(accesses), policy, 4, n_experts=8, halflife=cache.aging_halflife(3, 2))
    assert (stats["decode_hits"], stats["decode_misses"]) == (sim.hits, sim.misses)
    assert stats["decode_bytes_read"] == sim.misses * engine.expert_bytes


@pytest.mark.parametrize("tier", ["direct", "page_cache", "throttled", "host"])
def test_every_tier_reads_the_same_weights(tier, tmp_path):
    lm = tiny_moe("mixtral", n_experts=4, top_k=2, n_layers=2)
    path = write_store(lm, tmp_path / "s.safetensors")
    store = ExpertStore(path, tier, bandwidth_gbps=1.0 if tier == "throttled" else None)
    experts = moe.describe(lm).layers[1].experts
    got = store.read(1, 3)
    for name in ("gate_up_proj", "down_proj"):
        torch.testing.assert_close(got[name], getattr(experts, name).detach()[3], rtol=0, atol=0)
    assert store.bytes_read == sum(v.numel() * v.element_size() for v in got.values())


class _SlowSlot:
    """A destination whose copy takes `seconds` (a slow copy into fast memory)."""

    def __init__(self, seconds: float):
        self.seconds, self.copied = seconds, None

    def copy_(self, value, non_blocking=False):
        time.sleep(self.seconds)
        self.copied = value.clone()


def test_the_emulated_tier_holds_the_whole_load_read_and_copy_to_its_bandwidth(tmp_path):
    """An expert takes bytes / bandwidth to reach fast memory, whether the copy is quick or slow: the copy runs
    inside the emulated time, not on top of it (as it did when only the read was held)."""
    lm = tiny_moe("mixtral", n_experts=4, top_k=2, n_layers=2)
    path = write_store(lm, tmp_path / "s.safetensors")
    nbytes = ExpertStore(path, "host").spans[(1, 2)]
    due = 0.3  # seconds one expert takes at the emulated bandwidth
    store = ExpertStore(path, "throttled", bandwidth_gbps=(nbytes[1] - nbytes[0]) / due / 1e9)
    started = time.perf_counter()
    store.read(1, 2)
    assert time.perf_counter() - started >= due  # a read alone is held too
    for copy_seconds, longest in ((0.25 / 2, due + 0.12), (0.5 / 2, 0.5 + 0.12)):
        slots = {"gate_up_proj": _SlowSlot(copy_seconds), "down_proj": _SlowSlot(copy_seconds)}
        started = time.perf_counter()
        store.load(1, 2, slots)
        elapsed = time.perf_counter() - started
        assert max(due, 2 * copy_seconds) <= elapsed < longest, (copy_seconds, elapsed)
    experts = moe.describe(lm).layers[1].experts
    for name, slot in slots.items():
        torch.testing.assert_close(slot.copied, getattr(experts, name).detach()[2], rtol=0, atol=0)


def test_bad_budgets_stores_and_policies_get_one_line_errors(tmp_path):
    lm = tiny_moe("olmoe", n_experts=8, top_k=2, n_layers=2)
    with pytest.raises(ValueError, match="capacity 1 experts .in all. is smaller than one layer's top-k of 2"):
        OffloadEngine(copy.deepcopy(lm), tmp_path / "a.safetensors", 1)
    with pytest.raises(ValueError, match="unknown policy 'mru'; valid: lru, lfu"):
        OffloadEngine(copy.deepcopy(lm), tmp_path / "a.safetensors", 4, policy="mru")
    with pytest.raises(FileNotFoundError, match="expert store .*missing.safetensors does not exist"):
        OffloadEngine(copy.deepcopy(lm), tmp_path / "missing.safetensors", 4, write=False)
    path = write_store(lm, tmp_path / "t.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="is truncated"):
        ExpertStore(path)
    path.write_bytes(b"not a store")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        ExpertStore(path)
    with pytest.raises(ValueError, match="unknown tier 'ssd'"):
        ExpertStore(tmp_path / "a.safetensors", "ssd")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tier", ["host", "throttled"])
def test_cuda_engine_is_token_identical_and_the_allocator_holds_the_budget(tier, tmp_path):
    from cfmoe.stages.serving import engine_run

    lm, tok = tiny_moe("qwen2_moe", n_experts=8, top_k=2, n_layers=3), tiny_tokenizer()
    lm = lm.cuda()
    ids = tok(["the cat sat on the mat and"], return_tensors="pt")["input_ids"].cuda()
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.no_grad():
        expected = lm.generate(input_ids=ids, **kwargs)
    store = write_store(lm, tmp_path / "s.safetensors")
    for capacity, mode, prefetch in [(2, "unified", False), (4, "disaggregated", True), (24, "disaggregated_warm", False)]:
        result = engine_run(lm, store, [ids], [expected], kwargs, capacity=capacity, mode=mode, tier=tier,
                            bandwidth_gbps=4.5 if tier == "throttled" else None, prefetch=prefetch)
        assert result["identical"], (capacity, mode, prefetch)
        assert 0 < result["cuda_engine_bytes"] <= result["cuda_allowed_bytes"]
        assert result["cuda_transient_bytes"] > 0 and (result["prefetched"] > 0) == prefetch


@pytest.mark.parametrize("capacity, scope", [(5, "global"), (2, "per_layer"), (24, "global")])
def test_engine_warm_seeds_are_the_simulators(capacity, scope, tmp_path):
    """Warm disaggregation seeds the same experts, in the same recency order, in the engine and in
    `serving_sim.warm_seed`, for the same prompt and an empty cache."""
    from cfmoe.routing import trace_forward
    from cfmoe.serving_sim import warm_seed

    lm, tok = tiny_moe("qwen2_moe", n_experts=8, top_k=2, n_layers=3), tiny_tokenizer()
    ids = tok(["the cat sat on the mat and the dog"], return_tensors="pt")["input_ids"]
    trace, = trace_forward(lm, ids)
    engine = OffloadEngine(copy.deepcopy(lm), tmp_path / "s.safetensors", capacity, policy="lru", scope=scope,
                           mode="disaggregated_warm", tier="page_cache")
    engine.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0, eos_token_id=None)  # prefill only
    expected = warm_seed(trace.experts, 8, capacity, scope, tokens=engine.warm_tokens, decay=engine.warm_decay)
    seeded = [layer * 8 + expert for pool in engine.cache.buckets.values() for bucket in pool.values()
              for layer, expert in bucket]
    assert engine.counters.seeded == len(expected) > 0
    assert seeded == expected.tolist()


def refuses(call, pattern: str) -> None:
    """`call()` raises a one-line ValueError matching `pattern`."""
    with pytest.raises(ValueError, match=pattern) as err:
        call()
    assert "\n" not in str(err.value)


def test_a_corrupt_expert_is_refused_and_a_clean_store_serves_identically(tmp_path):
    lm, tok = tiny_moe("qwen2_moe", n_experts=8, top_k=2, n_layers=2), tiny_tokenizer()
    ids, mask = encode(tok)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.no_grad():
        expected = lm.generate(input_ids=ids, attention_mask=mask, **kwargs)
    path = write_store(lm, tmp_path / "s.safetensors")
    out, stats = OffloadEngine(copy.deepcopy(lm), path, 2, mode="unified", tier="page_cache", write=False).generate(
        ids, mask, **kwargs)
    assert torch.equal(out, expected) and stats["decode_misses"] > 0
    begin, end = ExpertStore(path).spans[(1, 3)]
    data = bytearray(path.read_bytes())
    data[(begin + end) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    corrupt = "is corrupt: layer 1 expert 3 fails its checksum"
    refuses(lambda: ExpertStore(path, "page_cache"), corrupt)
    refuses(lambda: OffloadEngine(copy.deepcopy(lm), path, 2, mode="unified", write=False), corrupt)
    assert ExpertStore(path, "page_cache", verify=False).read(1, 2)  # unchecked on request


def test_stores_from_another_model_or_format_get_one_line_errors(tmp_path):
    from safetensors.torch import save_file

    lm = tiny_moe("qwen2_moe", n_experts=8, top_k=2, n_layers=2)
    other = write_store(tiny_moe("qwen2_moe", seed=1, n_experts=8, top_k=2, n_layers=2), tmp_path / "other.safetensors")
    refuses(lambda: OffloadEngine(copy.deepcopy(lm), other, 4, write=False), "other.safetensors was written from "
            "another model: rewrite it with write=True")
    OffloadEngine(copy.deepcopy(lm), other, 4, write=True)  # rewritten from this model
    fewer = write_store(tiny_moe("qwen2_moe", n_experts=4, top_k=2, n_layers=2), tmp_path / "fewer.safetensors")
    refuses(lambda: OffloadEngine(copy.deepcopy(lm), fewer, 4, write=False),
            "has no layer 0 expert 4 .it holds 2 layers of 4 experts, the model 2 of 8.")
    shallow = write_store(tiny_moe("qwen2_moe", n_experts=8, top_k=2, n_layers=1), tmp_path / "shallow.safetensors")
    refuses(lambda: OffloadEngine(copy.deepcopy(lm), shallow, 4, write=False), "has no layer 1 expert 0")
    narrow = write_store(tiny_moe("qwen2_moe", n_experts=8, top_k=2, n_layers=2, moe_intermediate_size=16),
                         tmp_path / "narrow.safetensors")
    refuses(lambda: OffloadEngine(copy.deepcopy(lm), narrow, 4, write=False),
            "holds layer 0 expert 0 with other parameter names, shapes or dtypes than the model's")

    marker = {"format": "cfmoe-expert-store", "n_layers": "1", "n_experts": "1"}
    crafted = tmp_path / "crafted.safetensors"
    save_file({"L0000.E00000.w": torch.zeros(4, dtype=torch.int8)}, str(crafted),
              metadata={**marker, "model_fingerprint": "0", "checksums": '{"0.0": "00000000"}'})
    refuses(lambda: ExpertStore(crafted), "holds L0000.E00000.w as dtype 'I8'; valid: F32, F16, BF16, F64")
    save_file({"L0000.E00000.w": torch.zeros(4)}, str(crafted))
    refuses(lambda: ExpertStore(crafted), "has no 'cfmoe-expert-store' format marker")
    save_file({"L0000.E00000.w": torch.zeros(4)}, str(crafted), metadata=marker)
    refuses(lambda: OffloadEngine(copy.deepcopy(lm), crafted, 4, write=False),
            "has no model fingerprint or checksums .an older format.: rewrite it")


def test_generate_refuses_empty_or_1d_prompts_before_touching_the_model(tmp_path):
    lm, tok = tiny_moe("qwen2_moe", n_experts=8, top_k=2, n_layers=2), tiny_tokenizer()
    model = copy.deepcopy(lm)
    engine = OffloadEngine(model, tmp_path / "s.safetensors", 4)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    ids = tok(["the cat"], return_tensors="pt")["input_ids"]
    for bad in (ids[:, :0], ids[0], ids.float()):
        refuses(lambda: engine.generate(bad, max_new_tokens=2),
                "input_ids must be a non-empty 2-D .batch, seq. tensor of token ids, got shape")
    assert not calls


def test_reconfigure_serves_a_sweep_with_one_engine(tmp_path):
    """A reconfigured engine (new budget, policy, mode) equals a fresh one built with those settings."""
    lm, tok = tiny_moe("qwen2_moe", n_experts=8, top_k=2, n_layers=3), tiny_tokenizer()
    ids, mask = encode(tok)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.no_grad():
        expected = reference(lm, ids, mask, n=8)
    engine = OffloadEngine(copy.deepcopy(lm), tmp_path / "s.safetensors", 16, tier="page_cache")
    for capacity, policy, mode in [(3, "lru", "unified"), (5, "lfu", "disaggregated_warm"), (2, "lru", "disaggregated")]:
        engine.reconfigure(capacity, policy, mode=mode)
        out, stats = engine.generate(ids, mask, **kwargs)
        fresh = OffloadEngine(copy.deepcopy(lm), tmp_path / "s.safetensors", capacity, policy=policy, mode=mode,
                              tier="page_cache", write=False)
        _, fresh_stats = fresh.generate(ids, mask, **kwargs)
        assert torch.equal(out, expected)
        assert engine.pool_bytes == fresh.pool_bytes and engine.n_slots == capacity + (0 if mode == "unified" else 8)
        assert (stats["decode_hits"], stats["decode_misses"]) == (fresh_stats["decode_hits"], fresh_stats["decode_misses"])
    with pytest.raises(ValueError, match=r"capacity 1 experts \(in all\) is smaller than one layer's top-k of 2"):
        engine.reconfigure(1)


def test_an_engine_reads_through_another_tier_for_a_while_and_keeps_its_cache(tmp_path):
    """`reading_from`: loads go through the given tier (no emulated sleeps), the cache and its counters carry on,
    and the engine's own tier is back afterwards (the paper-scale warm-up of an emulated tier)."""
    lm, tok = tiny_moe("qwen2_moe", n_experts=8, top_k=2, n_layers=3), tiny_tokenizer()
    ids = tok(["the cat sat on the mat and"], return_tensors="pt")["input_ids"]
    kwargs = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    engine = OffloadEngine(lm, tmp_path / "s.safetensors", 6, tier="page_cache", verify=False)
    slow = 1e-4  # GB/s: an expert of this model (a few kB) sleeps tens of milliseconds
    engine.reconfigure(6, "lru", tier="throttled", bandwidth_gbps=slow)
    throttled = engine.store
    with engine.reading_from("page_cache") as same:
        assert same is engine and engine.tier == "page_cache" and engine.store is not throttled
        engine.generate(ids, max_new_tokens=3, **kwargs)
    misses = sum(engine.counters.misses.values())
    seconds = sum(engine.counters.load_seconds.values())
    assert misses > 0 and seconds / misses < 0.2 * engine.expert_bytes / (slow * 1e9)
    cached = {layer: dict(pool) for layer, pool in engine.cache.buckets.items()}
    assert engine.tier == "throttled" and engine.store is throttled and cached  # back, the cache kept
    engine.generate(ids, max_new_tokens=3, **kwargs)  # each call counts afresh: a miss now sleeps again
    misses, seconds = sum(engine.counters.misses.values()), sum(engine.counters.load_seconds.values())
    assert misses > 0 and seconds / misses >= 0.5 * engine.expert_bytes / (slow * 1e9)
    # the emulated tier holds the store in host memory, one copy shared with the host tier's
    with engine.reading_from("host"):
        assert engine.store.host_copy is throttled.host_copy is not None
    assert engine.store.host_copy.numel() == (tmp_path / "s.safetensors").stat().st_size
    with pytest.raises(ValueError, match="host_copy of 3 bytes does not fit tier 'host'"):
        ExpertStore(tmp_path / "s.safetensors", "host", host_copy=torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="does not fit tier 'direct'"):
        ExpertStore(tmp_path / "s.safetensors", "direct", host_copy=throttled.host_copy)
