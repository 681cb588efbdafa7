"""Notebook 04's per-sample measures and the authors' table format, on hand-made traces."""

import numpy as np
import pandas as pd
import pytest

from cfmoe import metrics
from cfmoe.stages import ecr_wikitext as ecr_study
from cfmoe.config import load_config
from cfmoe.routing import RoutingTrace
from tiny_models import tiny_moe, tiny_tokenizer


def trace(seed, n_prompt=3, n_decode=6, n_layers=2, n_experts=8, k=2):
    rng = np.random.default_rng(seed)
    n = n_prompt + n_decode
    experts = np.stack([np.stack([rng.choice(n_experts, k, replace=False) for _ in range(n_layers)]) for _ in range(n)])
    probs = rng.dirichlet(np.ones(n_experts), size=(n, n_layers))
    return RoutingTrace(experts, probs, np.repeat([0, 1], [n_prompt, n_decode]), rng.integers(5, 50, n), n_experts)


def test_sample_rows_measure_the_decode_tokens():
    tok = tiny_tokenizer()
    traces = [trace(0), trace(1, n_decode=1)]
    rows, per_layer = ecr_study.sample_rows(traces, tok, ["A", "B"], ["pa", "pb"], "cfmoe", "greedy")
    first = rows[0]
    decode = traces[0].decode
    assert first["decode_ecr"] == pytest.approx(metrics.expert_consistency_rate(decode.experts))
    assert first["sequence_ecr"] == pytest.approx(metrics.expert_consistency_rate(traces[0].experts))
    assert first["decode_gds"] == pytest.approx(metrics.gate_distribution_similarity(decode.probs.astype(np.float32)))
    assert first["decode_lal"] == pytest.approx(metrics.layer_aware_locality(decode.experts))
    assert first["generated_tokens"] == 6 and first["output"] == tok.decode(decode.token_ids, skip_special_tokens=True)
    assert np.isnan(rows[1]["decode_ecr"])  # one generated token has no pair
    assert [(r["entry"], r["moe_layer"]) for r in per_layer] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_authors_table_pairs_base_and_cfmoe_per_entry():
    samples = pd.DataFrame([{"run": run, "entry": i, "decoding": d, "input": f"p{i}", "output": f"{run}{i}{d}",
                             "decode_ecr": 0.1 * i + (run == "cfmoe")}
                            for run in ("base", "cfmoe", "lora_control") for i in range(3) for d in ("sampled", "greedy")])
    table = ecr_study.authors_table(samples)
    assert list(table.columns) == ["Input", "Output_Baseline", "ECR_Baseline", "Output_CFMoE", "ECR_CFMoE"]
    assert table.Input.tolist() == ["p0", "p1", "p2"] and table.Output_CFMoE.tolist() == [f"cfmoe{i}sampled" for i in range(3)]
    assert table.ECR_CFMoE.tolist() == pytest.approx((table.ECR_Baseline + 1).tolist())


def test_generation_is_seeded_and_settings_are_the_authors():
    cfg = load_config("smoke")
    settings = ecr_study.decoding_settings(cfg)
    assert settings["sampled"] == {"do_sample": True, "temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.5}
    assert settings["greedy"] == {"do_sample": False, "repetition_penalty": 1.5}
    lm, tok = tiny_moe("qwen2_moe"), tiny_tokenizer()
    runs = [ecr_study.generate_entries(lm, tok, ["the cat", "a dog"], settings["sampled"], 6, 1, seed=0) for _ in range(2)]
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_array_equal(a.experts, b.experts)
