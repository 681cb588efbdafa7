"""Notebook 03's building blocks: request traces, capacity grids and memory saved at equal throughput."""

import numpy as np
import pandas as pd
import pytest

from cfmoe import costmodel, data
from cfmoe.stages import cache_management as cache_study
from cfmoe.routing import DECODE, PREFILL, trace_forward
from tiny_models import PAD_ID, tiny_moe, tiny_tokenizer


def test_requests_are_prompt_then_article_and_traces_label_them():
    tok, lm = tiny_tokenizer(), tiny_moe("olmoe")
    requests = cache_study.request_inputs(tok, 3, decode_tokens=20, max_positions=200)
    task = data.entry_task("test")
    assert [r["title"] for r in requests] == task["title"][:3]
    for r, row in zip(requests, task.select(range(3))):
        assert r["prompt"] == tok(row["prompt"])["input_ids"]
        assert r["decode"] == tok(row["target"], add_special_tokens=False)["input_ids"][:20]
    traces = cache_study.request_traces(lm, requests, PAD_ID, batch_size=2)  # padded batches
    for r, trace in zip(requests, traces):
        alone, = trace_forward(lm, [r["prompt"] + r["decode"]])
        np.testing.assert_array_equal(trace.experts, alone.experts)
        assert trace.phase.tolist() == [PREFILL] * len(r["prompt"]) + [DECODE] * len(r["decode"])
        assert trace.meta["title"] == r["title"]
    n_prompt = len(requests[0]["prompt"])
    with pytest.raises(ValueError, match=f"has {n_prompt} tokens, leaving 1 of the model's {n_prompt + 1} positions"):
        cache_study.request_inputs(tok, 1, decode_tokens=20, max_positions=n_prompt + 1)


def test_capacity_grid_holds_the_levels():
    grid = cache_study.capacity_grid(384, 24, (0.25, 0.5, 0.75))
    assert {96, 192, 288} <= set(grid.tolist()) and grid.min() == 16 and grid.max() == 384
    assert cache_study.capacity_grid(10, 3, (0.25,)).tolist() == [2, 3, 7, 10]  # thirds, plus rint(2.5) = 2


def test_memory_saved_reads_the_candidate_curve_at_the_baseline_levels():
    # hit rate: control 0.8 x share, cfmoe 1.6 x share (capped at 1), on shares i/48
    shares = np.arange(1, 49) / 48
    curves = pd.concat([pd.DataFrame({"run": run, "policy": "lru", "scope": "global", "capacity": shares * 384,
                                      "cached_share": shares, "hit_rate": np.minimum(1, slope * shares)})
                        for run, slope in (("lora_control", 0.8), ("cfmoe", 1.6))])
    sizes = costmodel.deepseek_moe_16b(4.5)
    throughput = cache_study.throughput_curves(curves, sizes, 384)
    saved = cache_study.memory_saved(throughput, [0.25, 0.5])
    assert list(saved.columns) == ["device", "policy", "cached_share", "tokens_per_s", "memory_base_gb",
                                   "memory_cfmoe_gb", "memory_saved"]
    memory = lambda share: (sizes.w_resident + share * sizes.n_routed * sizes.expert_bytes) / 1e9  # noqa: E731
    for device in ("cpu", "npu"):
        rows = saved[saved.device == device]
        assert rows.memory_base_gb.tolist() == pytest.approx([memory(0.25), memory(0.5)])
        assert rows.memory_cfmoe_gb.tolist() == pytest.approx([memory(0.125), memory(0.25)])  # half the share
        assert rows.tokens_per_s.tolist() == pytest.approx(
            costmodel.tokens_per_second(sizes, costmodel.PROFILES[device], np.array([0.2, 0.4])).tolist())
    assert (saved.memory_saved == 1 - saved.memory_cfmoe_gb / saved.memory_base_gb).all()
