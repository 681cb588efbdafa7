"""Notebook 05's timing protocol: every setting timed `serving.repeats` times in one seeded random order that
interleaves models and settings, a warm-up before each run, medians with interquartile ranges, and memory saved
from the medians with a bootstrap interval over repeats, against the LoRA control (base beside it)."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from cfmoe import costmodel, stats
from cfmoe.config import load_config
from cfmoe.present import report
from cfmoe.serving import write_store
from cfmoe.stages import serving
from tiny_models import tiny_moe, tiny_tokenizer


def test_presets_repeat_every_setting_after_a_warm_up():
    for preset, repeats in (("smoke", 2), ("cpu", 5), ("gpu", 5)):
        sc = load_config(preset).serving
        assert sc.repeats == repeats and sc.warmup_tokens >= 1
        assert "lora_control" in sc.runs and "cfmoe" in sc.runs  # the baseline and the candidate
    assert load_config("cpu").serving.warmup_tokens == 8


@pytest.mark.parametrize("field, value", [("repeats", 0), ("warmup_tokens", 0)])
def test_repeats_and_warm_up_must_be_positive(tmp_path, field, value):
    path = tmp_path / "mine.yaml"
    path.write_text(f"preset: mine\nserving:\n  {field}: {value}\n")
    with pytest.raises(ValueError, match=rf"serving.{field}: {value} is not valid; it must be >= 1"):
        load_config(str(path))


def test_the_other_tiers_must_run_unified(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("preset: mine\nserving:\n  partial_modes: [disaggregated]\n")
    with pytest.raises(ValueError, match=r"serving.partial_modes: \['disaggregated'\] is not valid; it must include unified"):
        load_config(str(path))


def test_the_run_order_is_one_seeded_permutation_interleaving_models_and_settings():
    sc = load_config("cpu").serving
    settings = serving.grid(sc, n_routed=384, top_k=6)
    order = serving.run_order(len(settings), sc.repeats, seed=0)
    # every (setting, repeat) exactly once
    assert sorted(order) == [(s, r) for s in range(len(settings)) for r in range(sc.repeats)]
    assert order == serving.run_order(len(settings), sc.repeats, seed=0)  # seeded
    assert order != serving.run_order(len(settings), sc.repeats, seed=1)
    expected = np.random.default_rng(0).permutation(len(settings) * sc.repeats)
    pairs = [(s, r) for r in range(sc.repeats) for s in range(len(settings))]
    assert order == [pairs[i] for i in expected]  # np.random.default_rng(seed).permutation
    models = [settings[s]["run"] for s, _ in order]
    # interleaved: every model within the first tenth of the runs, and the model changes at most runs
    assert set(models[:len(order) // 10]) == set(sc.runs)
    switches = sum(a != b for a, b in zip(models, models[1:]))
    assert switches > len(order) / 2
    # repeats of one setting are spread out, not back to back
    first, last = {}, {}
    for position, (s, _) in enumerate(order):
        first.setdefault(s, position)
        last[s] = position
    assert np.median([last[s] - first[s] for s in first]) > len(order) / 2


def test_the_cpu_grid_keeps_what_the_headline_needs():
    sc = load_config("cpu").serving
    settings = pd.DataFrame(serving.grid(sc, n_routed=384, top_k=6))
    engine = settings[settings.tier != "in_memory"]
    assert (settings.tier == "in_memory").sum() == len(sc.runs)
    full = engine[engine.tier == sc.full_tier]
    assert set(full["mode"]) == {"unified", "disaggregated", "disaggregated_warm", "disaggregated+prefetch"}
    for run in sc.runs:  # the control and CFMoE in every mode; base, beside them, unified only
        modes = set(full[full.run == run]["mode"])
        assert modes == (set(full["mode"]) if run in sc.mode_runs else set(sc.partial_modes)), run
    assert set(sc.mode_runs) == {"lora_control", "cfmoe"}
    assert set(engine[engine.tier != sc.full_tier]["mode"]) == set(sc.partial_modes) == {"unified"}
    levels = [s for s in sc.shares if s in load_config("cpu").cache.cached_shares]
    assert levels and min(sc.shares) < min(levels)  # a budget below the lowest level, to interpolate CFMoE at it
    assert len(settings) == len(settings.drop(columns="capacity").drop_duplicates())  # one row per setting


def synthetic(repeats=5, noise=0.0, seed=0):
    """Measurements of three models on one tier and mode: tokens/s grows with the share, CFMoE fastest; each
    (setting, repeat) one row, with multiplicative noise."""
    rng = np.random.default_rng(seed)
    speed = {"base": 0.9, "lora_control": 1.0, "cfmoe": 2.0}
    rows = []
    for run, factor in speed.items():
        for repeat in range(repeats):
            rows.append({"run": run, "tier": "in_memory", "policy": "", "mode": "in_memory", "prefetch": False,
                         "share": 1.0, "repeat": repeat, "memory_gb": 2.0, "decode_tokens_per_s": 100.0,
                         "ttft_s": 0.01, "identical": True, "decode_hit_rate": 1.0})
            for share in (0.0625, 0.125, 0.25, 0.5, 0.75, 1.0):
                rows.append({"run": run, "tier": "throttled", "policy": "lru", "mode": "unified", "prefetch": False,
                             "share": share, "repeat": repeat, "memory_gb": 1.0 + share,
                             "decode_tokens_per_s": min(100.0, 100 * share * factor) * (1 + noise * rng.standard_normal()),
                             "ttft_s": 0.1 * (1 + repeat), "identical": True, "decode_hit_rate": min(1.0, share * factor)})
    return pd.DataFrame(rows)


def test_summary_has_the_median_and_interquartile_range_of_each_setting():
    measured = synthetic(noise=0.1)
    measured.loc[3, "identical"] = False  # one repeat of one setting differed
    summary = serving.summarize_repeats(measured)
    assert len(summary) == measured.groupby(serving.SETTING).ngroups and (summary.repeats == 5).all()
    row = summary[(summary.run == "cfmoe") & (summary.share == 0.25)].iloc[0]
    values = measured[(measured.run == "cfmoe") & (measured.share == 0.25)].decode_tokens_per_s
    assert row.decode_tokens_per_s == pytest.approx(np.median(values))
    assert (row.decode_tokens_per_s_q25, row.decode_tokens_per_s_q75) == pytest.approx(np.quantile(values, [0.25, 0.75]))
    assert row.ttft_s == pytest.approx(0.3) and row.ttft_s_q25 == pytest.approx(0.2) and row.ttft_s_q75 == pytest.approx(0.4)
    assert row.decode_hit_rate == pytest.approx(0.5) and row.memory_gb == pytest.approx(1.25)
    assert summary.identical.sum() == len(summary) - 1
    assert "repeat" not in summary and "in_memory" in set(summary.tier)


def test_the_frontier_interpolation_is_the_cost_models():
    rng = np.random.default_rng(1)
    for _ in range(20):
        memory, speed = rng.uniform(1, 2, 6), rng.uniform(10, 100, 6)
        levels = rng.uniform(0, 110, 4)
        curve = pd.DataFrame({"memory_gb": memory, "tokens_per_s": speed})
        expected = costmodel.memory_at_equal_throughput(curve, curve, levels).memory_a.to_numpy()
        np.testing.assert_allclose(serving._frontier_memory(memory, speed, levels), expected)


def test_memory_saved_uses_the_medians_and_the_control_as_baseline():
    measured = synthetic(noise=0.1)
    saved = serving.memory_saved(measured, [0.25, 0.5], resamples=200)
    assert list(dict.fromkeys(saved.baseline)) == ["lora_control", "base"]  # the control first, base beside it
    medians = serving.summarize_repeats(measured)
    medians = medians[medians.tier != "in_memory"].rename(columns={"decode_tokens_per_s": "tokens_per_s"})
    for baseline in ("lora_control", "base"):
        expected = costmodel.saved_at_levels(medians[medians.run == baseline], medians[medians.run == "cfmoe"],
                                             [0.25, 0.5], column="share")
        rows = saved[saved.baseline == baseline]
        np.testing.assert_allclose(rows.memory_saved, expected.memory_saved)
        np.testing.assert_allclose(rows.memory_baseline_gb, expected.memory_base_gb)
        np.testing.assert_allclose(rows.saved_mb, 1e3 * (expected.memory_base_gb - expected.memory_cfmoe_gb))
        assert ((rows.memory_saved_low <= rows.memory_saved) & (rows.memory_saved <= rows.memory_saved_high)).all()
        assert (rows.repeats == 5).all()
    # CFMoE runs twice the control's tokens/s per share, so it needs about half the share: (1 + s/2) / (1 + s)
    control = saved[saved.baseline == "lora_control"]
    assert control.memory_saved.to_numpy() == pytest.approx([1 - 1.125 / 1.25, 1 - 1.25 / 1.5], abs=0.05)
    # a grid cut short: `repeats` is the fewest any setting on the curve ran, not the most
    cut = measured[~((measured.run == "cfmoe") & (measured.share == 0.5) & (measured.repeat >= 2))]
    assert (serving.memory_saved(cut, [0.25, 0.5], resamples=0).repeats == 2).all()


def test_the_interval_is_stats_bootstrap_over_repeats():
    measured = synthetic(noise=0.2, seed=3)
    saved = serving.memory_saved(measured, [0.5], baselines=("lora_control",), resamples=300, seed=7)
    engine = measured[measured.tier != "in_memory"]
    wide = engine.pivot_table(index="repeat", columns=["run", "share"], values="decode_tokens_per_s")
    shares = [0.0625, 0.125, 0.25, 0.5, 0.75, 1.0]
    samples = np.hstack([wide["lora_control"][shares].to_numpy(), wide["cfmoe"][shares].to_numpy()])
    memory = np.array([1.0 + s for s in shares])

    def statistic(x):  # memory saved at the control's median tokens/s at share 0.5, from resampled medians
        med = np.median(x, axis=0)
        level = med[3:4]
        a = serving._frontier_memory(memory, med[:6], level)
        b = serving._frontier_memory(memory, med[6:], level)
        return float((1 - b / a)[0])

    value, low, high = stats.bootstrap_interval(samples, statistic, n=300, seed=7)
    row = saved.iloc[0]
    assert (row.memory_saved, row.memory_saved_low, row.memory_saved_high) == pytest.approx((value, low, high))
    assert low < value < high
    # no noise between repeats: the interval closes on the point
    flat = serving.memory_saved(synthetic(noise=0.0), [0.5], baselines=("lora_control",), resamples=100).iloc[0]
    assert flat.memory_saved_low == pytest.approx(flat.memory_saved) == pytest.approx(flat.memory_saved_high)


def test_single_runs_give_no_interval_and_the_summary_averages_the_levels():
    one = serving.memory_saved(synthetic(repeats=1), [0.25, 0.5], resamples=50)
    assert one.memory_saved.notna().all() and one.memory_saved_low.isna().all()
    measured = synthetic(noise=0.1)
    saved = serving.memory_saved(measured, [0.25, 0.5], resamples=100)
    summary = serving.memory_saved_summary(measured, [0.25, 0.5], resamples=100)
    assert list(summary.baseline) == ["lora_control", "base"] and set(summary.tier) == {"throttled"}
    for r in summary.itertuples():
        rows = saved[saved.baseline == r.baseline]
        assert r.memory_saved == pytest.approx(rows.memory_saved.mean())
        assert r.saved_mb == pytest.approx(rows.saved_mb.mean())
        assert r.memory_saved_low <= r.memory_saved <= r.memory_saved_high
        assert (r.levels, r.reached, r.repeats) == (2, 2, 5)
    two_tiers = pd.concat([measured, measured[measured.tier != "in_memory"].assign(tier="direct")])
    assert list(serving.memory_saved_summary(two_tiers, [0.5], resamples=20).tier) == \
        ["all", "throttled", "direct"] * 2


def test_mode_ratios_and_prefetch_use_medians_over_repeats():
    rows = []
    for repeat, noise in enumerate((1.0, 1.0, 10.0)):  # one outlying repeat
        for mode, speed in (("unified", 10.0), ("disaggregated", 12.0), ("disaggregated_warm", 11.0),
                            ("disaggregated+prefetch", 6.0)):
            rows.append({"run": "cfmoe", "tier": "throttled", "policy": "lru", "mode": mode, "share": 0.5,
                         "prefetch": mode.endswith("prefetch"), "repeat": repeat,
                         "decode_tokens_per_s": speed * (noise if mode == "unified" else 1.0)})
    measured = pd.DataFrame(rows)
    ratios = serving.mode_ratios(measured)
    assert ratios.disaggregated.iloc[0] == pytest.approx(1.2) and ratios.disaggregated_warm.iloc[0] == pytest.approx(1.1)
    assert serving.prefetch_speedups(measured).iloc[0] == pytest.approx(0.5)


def test_tiers_read_as_what_they_are():
    assert serving.tier_label("throttled") == "emulated (sleep-throttled)"
    assert serving.tier_label("direct") == "direct"
    frame = pd.DataFrame({"tier": ["throttled", "in_memory"], "x": [1, 2]})
    assert list(serving.readable(frame).tier) == ["emulated (sleep-throttled)", "in_memory"]
    assert list(frame.tier) == ["throttled", "in_memory"]  # the table keeps its keys
    measured = synthetic(noise=0.05)
    text = serving.describe_grid(measured)
    assert "emulated (sleep-throttled): shares 0.0625, 0.125, 0.25, 0.5, 0.75, 1 x LRU unified" in text
    assert text.startswith("3 models (base, lora_control, cfmoe) x [in memory; ")
    assert "21 settings, each timed 5 times: 105 timed runs" in text


def test_the_report_rows_name_the_control_the_interval_and_the_emulated_tier(tmp_path):
    measured = synthetic(noise=0.1)
    folder = tmp_path / "05_serving"
    folder.mkdir()
    measured.to_csv(folder / "measurements.csv", index=False)
    saved = serving.memory_saved(measured, [0.25, 0.5], resamples=100)
    saved.assign(predicted_memory_saved=0.3, predicted_saved_mb=0.4).to_csv(folder / "memory_saved.csv", index=False)
    serving.memory_saved_summary(measured, [0.25, 0.5], resamples=100).to_csv(folder / "memory_saved_summary.csv",
                                                                            index=False)
    cells = report.headline(tmp_path, "cpu")
    control = saved[saved.baseline == "lora_control"]
    expected = f"vs control {report._less(control.memory_saved.mean())} ["
    assert expected in cells["engine_memory"], cells["engine_memory"]
    assert f"({control.saved_mb.mean():.2f} of {1e3 * control.memory_baseline_gb.mean():.2f} MB)" in cells["engine_memory"]
    assert "; vs base −" in cells["engine_memory"] and "medians of 5 repeats" in cells["engine_memory"]
    assert "(memory_saved_summary.csv)" not in cells["engine_memory"] or "05_serving/memory_saved_summary.csv" in \
        cells["engine_memory"]
    assert "throttled" not in cells["engine_memory"]


@torch.no_grad()
def test_a_warmed_run_starts_cold_and_matches_a_fresh_engine(tmp_path):
    """The warm-up runs with the run's own settings and is not counted: the timed run then starts from an empty
    cache, so its hits and misses are a fresh engine's, and its tokens the model's."""
    lm, tok = tiny_moe("qwen2_moe", n_experts=8, top_k=2, n_layers=3), tiny_tokenizer()
    ids = [tok([p], return_tensors="pt")["input_ids"] for p in ("the cat sat on the mat and", "routing is local")]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    reference, _ = serving.in_memory(lm, ids, kwargs)
    store = write_store(lm, tmp_path / "s.safetensors")
    bench = serving.EngineBench(lm, store, "page_cache")
    settings = {"capacity": 4, "policy": "lru", "mode": "unified", "tier": "page_cache"}
    warmed = bench.run(ids, reference, kwargs, (ids[1][:, :3], 5), **settings)
    fresh = serving.engine_run(copy.deepcopy(lm), store, ids, reference, kwargs, **settings)
    assert warmed["identical"] and fresh["identical"]
    for key in ("decode_hits", "decode_misses", "prefill_hits", "prefill_misses", "decode_steps"):
        assert warmed[key] == fresh[key], key
    again = bench.run(ids, reference, kwargs, (ids[0], 2), capacity=6, policy="lru", mode="disaggregated_warm",
                      prefetch=True, tier="page_cache")
    assert again["identical"] and again["slots"] == 6 + 8
    bench.close()
