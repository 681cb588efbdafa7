"""The analytic throughput/memory model on hand numbers and the authors' DeepSeek-MoE-16B instance."""

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from cfmoe.costmodel import (PROFILES, DeviceProfile, ModelSizes, custom_profile, deepseek_moe_16b, from_describe,
                             measure_profile, memory_at_equal_throughput, memory_bytes, offload_tokens_per_second,
                             throughput_curve, tokens_per_second)

TOY = ModelSizes("toy", n_layers=2, n_experts=4, top_k=1, expert_bytes=10e9, resident_bytes=20e9)


def test_formula_on_hand_numbers():
    device = custom_profile("toy", mem_bandwidth_gbps=10, io_bandwidth_gbps=1)
    assert TOY.w_dynamic == 20e9
    # h = 0.5: (20 + 20 * 0.5) / 10 + 20 * 0.5 / 1 = 3 + 10 = 13 s per token
    assert tokens_per_second(TOY, device, 0.5) == pytest.approx(1 / 13)
    assert tokens_per_second(TOY, device, np.array([0.0, 1.0])) == pytest.approx([1 / 22, 1 / 4])
    assert memory_bytes(TOY, 3) == 50e9
    assert list(memory_bytes(TOY, np.array([0, 8]))) == [20e9, 100e9]


def test_offload_model_on_hand_numbers():
    # 2 layers x top-1 = 2 accesses per token; h = 0.25: 0.01 + 2 * 0.75 * 0.004 = 0.016 s per token
    assert offload_tokens_per_second(TOY, 0.25, floor_s=0.01, load_s_per_expert=0.004) == pytest.approx(1 / 0.016)
    assert offload_tokens_per_second(TOY, np.array([1.0, 0.0]), 0.01, 0.004) == pytest.approx([100, 1 / 0.018])


def test_deepseek_reproduces_the_authors_sizes():
    sizes = deepseek_moe_16b()
    expert = 4.866e6
    assert abs(sizes.expert_bytes - expert) < 0.0005e6  # 4.866 MB with MB = 10^6 bytes
    assert (sizes.n_layers, sizes.n_experts, sizes.top_k) == (27, 64, 6)
    assert sizes.w_dynamic == pytest.approx(6 * expert * 27, rel=1e-4)
    assert sizes.w_resident == pytest.approx(4 * 2.25e6 * 28 + 112.5e6 + 64 * expert + 2 * expert * 27, rel=1e-4)


def test_bits_scale_every_size():
    base, half = deepseek_moe_16b(4.5), deepseek_moe_16b(9)
    assert half.expert_bytes == pytest.approx(2 * base.expert_bytes)
    assert half.resident_bytes == pytest.approx(2 * base.resident_bytes)
    assert deepseek_moe_16b(16).expert_bytes == 3 * 2048 * 1408 * 2
    eight_bit = ModelSizes.from_params("m", 2, 4, 2, expert_params=100, resident_params=50, bits_per_param=8)
    assert (eight_bit.expert_bytes, eight_bit.resident_bytes) == (100, 50)
    with pytest.raises(ValueError, match="bits_per_param must be in \\(0, 64\\], e.g. 16, 8 or 4.5; got 0"):
        deepseek_moe_16b(0)


def test_from_describe_accepts_dicts_and_moe_info():
    record = {"n_layers": 2, "n_experts": 4, "top_k": 2, "expert_bytes": 400, "resident_bytes": 1000}
    assert from_describe(record) == ModelSizes("model", 2, 4, 2, 400, 1000)
    assert from_describe(record, bits_per_param=16).expert_bytes == 200  # from float32
    assert from_describe(record, bits_per_param=8, source_bytes_per_param="torch.bfloat16").resident_bytes == 500
    info = SimpleNamespace(architecture="olmoe", layers=[SimpleNamespace(expert_bytes=400)] * 3, n_experts=4,
                           top_k=2, routed_expert_bytes=3 * 4 * 400, resident_bytes=900)
    assert from_describe(info, bits_per_param=4) == ModelSizes("olmoe", 3, 4, 2, 50, 112.5)
    with pytest.raises(ValueError, match="lacks top_k, resident_bytes"):
        from_describe({"n_layers": 2, "n_experts": 4, "expert_bytes": 400})
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        from_describe(record, bits_per_param=4, source_bytes_per_param="int3")


def test_throughput_curve_columns_and_authors_profiles():
    curve = throughput_curve(TOY, PROFILES["cpu"], [0, 4, 8], [0.0, 0.5, 1.0])
    assert curve.columns.tolist() == ["capacity", "memory_gb", "hit_rate", "tokens_per_s"]
    assert curve.memory_gb.tolist() == [20, 60, 100] and curve.tokens_per_s.is_monotonic_increasing
    assert (PROFILES["npu"].mem_bandwidth_gbps, PROFILES["npu"].io_bandwidth_gbps) == (75, 4.5)


def curve(memory, speed):
    return pd.DataFrame({"memory_gb": memory, "tokens_per_s": speed})


def test_memory_at_equal_throughput_interpolates_the_frontier():
    a = curve([1, 2, 3], [10, 20, 30])
    b = curve([0.25, 0.5, 1.5, 1.0, 2.0], [5, 10, 20, 7, 30])  # (1.0, 7) is dominated by (0.5, 10): ignored
    table = memory_at_equal_throughput(a, b, [15, 30, 5, 40])
    assert table.memory_a.tolist()[:2] == [1.5, 3.0]
    assert table.memory_b.tolist()[:2] == [1.0, 2.0]
    assert table.saved.tolist()[:2] == pytest.approx([1 / 3, 1 / 3])
    assert math.isnan(table.memory_a[2]) and not math.isnan(table.memory_b[2])  # below a's range only
    assert table.iloc[3][["memory_a", "memory_b", "saved"]].isna().all()


def test_measure_profile_is_positive_and_labelled():
    profile = measure_profile(size_mb=4, repeats=3)
    assert all(math.isfinite(v) and v > 0 for v in (profile.mem_bandwidth_gbps, profile.io_bandwidth_gbps))
    assert "file read" in profile.notes


@pytest.mark.parametrize("call, message", [
    (lambda: DeviceProfile("x", 0, 1), "mem_bandwidth_gbps must be a positive finite number of GB/s, got 0"),
    (lambda: tokens_per_second(TOY, PROFILES["cpu"], 1.5), "hit_rate must lie in \\[0, 1\\], got 1.5"),
    (lambda: offload_tokens_per_second(TOY, 0.5, -1, 0.1), "floor_s must be a finite number of seconds >= 0, got -1"),
    (lambda: offload_tokens_per_second(TOY, 0.5, 0, 0), "a token would take no time"),
    (lambda: memory_bytes(TOY, 9), "capacity must lie in \\[0, 8\\] \\(the model's routed experts\\), got 9"),
    (lambda: throughput_curve(TOY, PROFILES["cpu"], [1, 2], [0.5]), "must be 1-D of one length"),
    (lambda: memory_at_equal_throughput(curve([], []), curve([1], [1]), [1]), "curve_a must be a non-empty"),
    (lambda: ModelSizes("m", 2, 4, 5, 1, 1), "top_k 5 exceeds n_experts 4"),
])
def test_errors_name_the_bad_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()
