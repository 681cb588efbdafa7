"""Notebook 05's tables from hand-made measurements: memory saved at equal tokens/s and the cost model's errors."""

import numpy as np
import pandas as pd
import pytest

from cfmoe import costmodel, serving_study


def frame():
    rows = []
    for run, speed in (("base", 1.0), ("cfmoe", 2.0)):
        rows.append({"run": run, "tier": "in_memory", "policy": "", "mode": "in_memory", "share": 1.0,
                     "memory_gb": 2.0, "decode_tokens_per_s": 100.0, "decode_hit_rate": 1.0})
        for share in (0.125, 0.25, 0.5, 0.75, 1.0):
            # tokens/s grows linearly with the share; cfmoe twice as fast per share (up to 100)
            rows.append({"run": run, "tier": "direct", "policy": "lru", "mode": "unified", "share": share,
                         "memory_gb": 1.0 + share, "decode_tokens_per_s": min(100.0, 100 * share * speed),
                         "decode_hit_rate": min(1.0, share * speed)})
    return pd.DataFrame(rows)


def test_memory_saved_interpolates_the_candidate_at_the_baseline_levels():
    saved = serving_study.memory_saved(frame(), [0.25, 0.5])
    assert saved.tokens_per_s.tolist() == [25.0, 50.0]
    assert saved.memory_base_gb.tolist() == pytest.approx([1.25, 1.5])
    assert saved.memory_cfmoe_gb.tolist() == pytest.approx([1.125, 1.25])  # half the share
    assert saved.memory_saved.tolist() == pytest.approx([1 - 1.125 / 1.25, 1 - 1.25 / 1.5])


def test_prediction_calibrates_a_compute_floor_from_the_in_memory_run():
    sizes = costmodel.ModelSizes("toy", n_layers=2, n_experts=4, top_k=1, expert_bytes=1e6, resident_bytes=1e6)
    profile = costmodel.custom_profile("toy", mem_bandwidth_gbps=1.0, io_bandwidth_gbps=0.1)
    pred = serving_study.predict(frame(), sizes, profile)
    floor = 1 / 100.0 - (1e6 + 2e6) / 1e9
    assert pred.compute_floor_s.unique() == pytest.approx([floor])
    full = pred[pred.decode_hit_rate == 1.0].iloc[0]
    assert full.calibrated_tokens_per_s == pytest.approx(100.0)  # all cached: the in-memory speed
    row = pred[(pred.run == "base") & (pred.share == 0.25)].iloc[0]
    seconds = floor + (1e6 + 2e6 * 0.25) / 1e9 + 2e6 * 0.75 / 1e8
    assert row.calibrated_tokens_per_s == pytest.approx(1 / seconds)
    assert row.calibrated_error == pytest.approx(row.calibrated_tokens_per_s / 25.0 - 1)
    assert np.isfinite(pred.authors_model_tokens_per_s).all()
