"""Real routing the stand-in is held against: scripts/real_routing.py, its committed tables and their use in notebook 00."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cfmoe import cache, claims, metrics
from cfmoe.routing import DECODE, PREFILL, read_trace

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "routing_csv"  # prompt_2 (5 tokens), prompt_10 (3 tokens)
SCRIPT = ROOT / "scripts" / "real_routing.py"


def _script():
    spec = importlib.util.spec_from_file_location("real_routing", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_pairs_tokens_within_a_request_only():
    script = _script()
    valid = script.within_requests([5, 3])
    assert valid.tolist() == [True] * 4 + [False] + [True] * 2
    trace = read_trace(FIXTURE)
    per_layer, summary = script.profile(trace, [5, 3])
    assert np.allclose(per_layer.ecr, metrics.expert_consistency_rate(trace.experts, per_layer=True, valid_pairs=valid))
    # the pair across the two prompts (token 4 -> 5) would count 1/3 in layer 0 and 1/3 in layer 1
    assert not np.allclose(per_layer.ecr, metrics.expert_consistency_rate(trace.experts, per_layer=True))
    assert np.allclose(per_layer.max_load_ratio, metrics.max_load_ratio(trace.experts, trace.n_experts))
    row = summary.iloc[0]
    assert (row.requests, row.tokens, row.pairs, row.moe_layers) == (2, 8, 6, 2)
    assert row.ecr == pytest.approx(per_layer.ecr.mean()) and row.ecr_over_k_e == pytest.approx(row.ecr / (3 / 12))
    assert row.first_layer_ecr == per_layer.ecr.iloc[0] and row.last_layer_ecr == per_layer.ecr.iloc[-1]
    with pytest.raises(ValueError, match=r"request lengths sum to 7 tokens, the trace has 8"):
        script.profile(trace, [4, 3])
    with pytest.raises(ValueError, match=r"positive token counts, got \[5, 0\]"):
        script.within_requests([5, 0])


def test_any_trace_reads_as_requests(tmp_path):
    """A model's own recorded routing (.npz, one CSV, an exported stream) reads with its request boundaries."""
    script = _script()
    trace = read_trace(FIXTURE)
    trace.save(tmp_path / "dir.npz")
    one = read_trace(FIXTURE / "prompt_2_data.csv")
    one.save(tmp_path / "one.npz")
    joined, lengths = script.read([str(tmp_path / "dir.npz"), str(FIXTURE / "prompt_2_data.csv"), str(tmp_path / "one.npz")])
    assert lengths == [5, 3, 5, 5] and joined.n_tokens == 18
    stream = script.stream(trace, [5, 3], requests=2, min_tokens=3)
    assert script.requests_of(stream) == [5, 3]
    with pytest.raises(ValueError, match=r"the sources differ in MoE layers or top-k"):
        other = read_trace(FIXTURE)
        other.experts = other.experts[:, :1]
        other.save(tmp_path / "narrow.npz")
        script.read([str(FIXTURE), str(tmp_path / "narrow.npz")])


def test_script_writes_the_profile_and_a_replayable_stream(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(FIXTURE), "--source", "fixture", "--out", str(tmp_path),
                           "--export", str(tmp_path / "s.npz"), "--export-requests", "1", "--export-tokens", "4"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(pd.read_csv(tmp_path / "per_layer.csv")) == 2
    assert pd.read_csv(tmp_path / "lru_vs_iid.csv").capacity_per_layer.tolist() == list(range(3, 13))
    table = pd.read_csv(tmp_path / "policies.csv")
    assert len(table) == 3 * 5 and table[table.policy == "opt"].oracle.all() and not table[table.policy == "lru"].oracle.any()
    trace = read_trace(FIXTURE)
    for row in table.itertuples():  # each row a direct replay through the simulator (an exact cache)
        result = cache.simulate_cache(cache.access_keys(trace.experts, 12), row.policy, row.capacity, n_experts=12,
                                      halflife=cache.aging_halflife(2, 3))
        assert row.misses_per_token == pytest.approx(result.misses / 8)
    lru = table[table.policy == "lru"].set_index("cache_share").misses_per_token
    assert np.allclose(table.misses_vs_lru, table.misses_per_token / table.cache_share.map(lru) - 1)
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary.requests.tolist() == [2] and summary.tokens.tolist() == [8]
    stream = read_trace(tmp_path / "s.npz")  # prompt_2, the one prompt of at least 4 tokens
    assert stream.meta["requests"] == [[1, 4]] and stream.phase.tolist() == [PREFILL] + [DECODE] * 4
    assert np.array_equal(stream.experts, read_trace(FIXTURE).experts[:5])
    bad = subprocess.run([sys.executable, str(SCRIPT), str(FIXTURE), "--source", "fixture", "--out", str(tmp_path),
                          "--export", str(tmp_path / "t.npz"), "--export-requests", "2", "--export-tokens", "4"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "scripts/real_routing.py: error: --export-requests 2: 1 prompts have at least 4 tokens; use 1 to 1"]


def test_the_quoted_real_routing_figures_are_the_measured_ones():
    """`claims.REAL_ROUTING` (what notebook 00 and the README quote) against the committed measurement."""
    summary = pd.read_csv(ROOT / claims.REAL_ROUTING_DIR / "summary.csv").iloc[0]
    real = claims.REAL_ROUTING
    assert summary.model == real["model"] and summary.requests == 1999
    assert round(summary.ecr, 3) == real["ecr"] and round(summary.ecr_over_k_e, 2) == real["ecr_over_k_over_e"]
    for name in ("first_layer_ecr", "peak_layer_ecr", "last_layer_ecr"):
        assert round(summary[name], 2) == real[name], name
    profile = pd.read_csv(ROOT / claims.REAL_ROUTING_DIR / "per_layer.csv")
    assert len(profile) == summary.moe_layers and profile.ecr.max() == pytest.approx(summary.peak_layer_ecr)
    lru = pd.read_csv(ROOT / claims.REAL_ROUTING_DIR / "lru_vs_iid.csv")
    assert (lru.measured_lru_hit_rate > lru.iid_lru_hit_rate).all() and lru.capacity_per_layer.iloc[0] == 6
    policies = pd.read_csv(ROOT / claims.REAL_ROUTING_DIR / "policies.csv").set_index(["cache_share", "policy"])
    # Belady's oracle bounds every policy; layer-aware LRU (Least-Stale's reading) is LRU at token granularity
    for share in (0.125, 0.25, 0.5):
        assert policies.misses_per_token[share].min() == policies.misses_per_token[share, "opt"]
        assert policies.misses_per_token[share, "layer_lru"] == policies.misses_per_token[share, "lru"]


def test_notebooks_00_and_01_set_the_stand_in_beside_real_routing():
    from cfmoe.present import plots
    from cfmoe.stages import base_model, runs

    profile = runs.real_routing("per_layer")
    assert profile is not None and list(profile.moe_layer) == list(range(26))
    ours = np.array([0.1, 0.3, 0.2])
    table = base_model.standin_vs_real(ours, 0.2, 0.1, profile).set_index("measure")
    depth = table.loc["peak layer's relative depth"]
    assert depth.iloc[0] == 0.5 and depth.iloc[1] == pytest.approx(profile.ecr.idxmax() / 25)
    assert np.isnan(base_model.standin_vs_real(ours, 0.2, 0.1).set_index("measure").iloc[-1, 1])
    per_layer = pd.DataFrame({"moe_layer": range(3), "ecr_over_k_e": ours / 0.1})
    for real in (profile, None):
        labels = [line.get_label() for line in plots.standin_profile(per_layer, real).axes[0].get_lines()]
        assert any("released routing" in label for label in labels) == (real is not None)
    lru = runs.real_routing("lru_vs_iid")
    reuse = pd.DataFrame({"moe_layer": [0, 0], "distance": [1, 2], "share_of_reuses": [0.6, 0.4]})
    ceiling = pd.DataFrame({"moe_layer": [0], "ecr": [0.2], "iid_ecr": [0.09]})
    for real in (lru, None):
        labels = [line.get_label() for line in plots.routing_ceiling(ceiling, lru, reuse, real).axes[1].get_lines()]
        assert any("released routing" in label for label in labels) == (real is not None)


def test_a_real_routing_stream_replays_on_the_paper_scale_model(tmp_path):
    """A stream of 26 MoE layers (DeepSeek-V2-Lite's), exported as the script exports it, served by the paper-scale
    measurement on a tiny model of that structure (its 2 MoE layers replay trace layers 0 and 13)."""
    from cfmoe.routing import RoutingTrace
    from cfmoe.stages import serving

    from test_serving_study import TINY_PAPER_MODEL

    rng = np.random.default_rng(0)
    lengths = [30, 5, 40]
    experts = np.stack([np.stack([rng.choice(64, 6, replace=False) for _ in range(26)]) for _ in range(sum(lengths))])
    trace = RoutingTrace(experts, None, np.zeros(sum(lengths), int), np.zeros(sum(lengths), int), 64, {})
    stream = _script().stream(trace, lengths, requests=2, min_tokens=20)
    assert stream.meta["requests"] == [[1, 29], [1, 39]] and stream.n_layers == 26
    settings = [{"tier": "host", "share": 0.25, "policy": "lru", "sources": ("deepseek_v2_lite",), "grid": "real"}]
    out = serving.paper_scale_measure({"deepseek_v2_lite": stream}, settings, repeats=1, new_tokens=6, requests=1,
                                      warm_tokens=8, device="cpu", store_path=tmp_path / "store.safetensors",
                                      dtype_name="float32", **TINY_PAPER_MODEL)
    m = out["measurements"]
    assert m.routing_source.tolist() == ["deepseek_v2_lite"] and (m.tokens_per_s > 0).all()
