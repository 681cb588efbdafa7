"""Notebook 04's gains against the LoRA control: paired by seed and entry, bootstrap intervals over entries, the
base model beside, the article perplexity cost, DAFT's repetition in the verdicts, the paper's figures beside
ECR/(k/E)."""

import numpy as np
import pandas as pd
import pytest

from cfmoe import claims, stats
from cfmoe.config import load_config
from cfmoe.stages import ecr_wikitext as ecr_study

SEEDS = (0, 1, 2)
ENTRIES = 6
K_OVER_E = 0.125


def frames(cfmoe=lambda control, seed, entry: control + 0.1, daft_repeats=0.05, ppl_factor=1.02):
    """Synthetic samples and article perplexities: a control whose ECR differs a lot per seed and entry, CFMoE and
    DAFT derived from the control of the same seed and entry, base measured once; rows shuffled."""
    rows, quality = [], []
    for run in ("base", "lora_control", "cfmoe", "cfmoe_daft"):
        for seed in (SEEDS[:1] if run == "base" else SEEDS):
            for decoding in ("sampled", "greedy"):
                for entry in range(ENTRIES):
                    control = 0.2 + 0.1 * seed + 0.02 * entry
                    ecr = {"base": 0.15 + 0.01 * entry, "lora_control": control,
                           "cfmoe": cfmoe(control, seed, entry), "cfmoe_daft": control + 0.05}[run]
                    rows.append({"entry": entry, "run": run, "seed": seed, "decoding": decoding, "generated_tokens": 20,
                                 "decode_ecr": ecr, "sequence_ecr": ecr, "decode_gds": 0.9, "decode_lal": 1.0,
                                 "distinct_2": 0.9,
                                 "repeated_4gram_rate": daft_repeats if run == "cfmoe_daft" else 0.01})
            for entry in range(ENTRIES):
                ppl = 100.0 * (1 + 0.1 * seed + 0.05 * entry)
                quality.append({"entry": entry, "run": run, "seed": seed, "article_tokens": 10 + entry,
                                "article_ppl": ppl * (ppl_factor if run == "cfmoe" else 1.0)})
            quality.append({"entry": -1, "run": run, "seed": seed, "article_ppl": np.nan, "article_tokens": 0})
    shuffle = np.random.default_rng(0).permutation
    samples, quality = pd.DataFrame(rows), pd.DataFrame(quality)
    return samples.iloc[shuffle(len(samples))], quality.iloc[shuffle(len(quality))]


def row(summary, run, decoding="sampled"):
    return summary[(summary.decoding == decoding) & (summary.run == run)].iloc[0]


def test_gains_are_paired_by_seed_and_entry():
    samples, quality = frames()
    summary = ecr_study.summary_table(samples, quality, K_OVER_E)
    cf = row(summary, "cfmoe")
    # CFMoE = the same seed's and entry's control + 0.1: every resample gives Δ 0.1 exactly (unpaired, it would not)
    assert (cf.delta_ecr_vs_control, cf.delta_ecr_vs_control_low, cf.delta_ecr_vs_control_high) == \
        pytest.approx((0.1, 0.1, 0.1))
    control = samples[(samples.run == "lora_control") & (samples.decoding == "sampled")].decode_ecr
    assert cf.ecr_vs_control == pytest.approx(0.1 / control.mean())
    assert cf.ecr_vs_control_low < cf.ecr_vs_control < cf.ecr_vs_control_high
    assert cf.decode_ecr == pytest.approx(control.mean() + 0.1)
    assert cf.ecr_over_k_over_e == pytest.approx(cf.decode_ecr / K_OVER_E)
    assert (cf.seeds, cf.samples) == (3, 3 * ENTRIES)
    # the base model (one seed) pairs with every seed, beside the control
    base = samples[(samples.run == "base") & (samples.decoding == "sampled")].decode_ecr
    assert cf.delta_ecr_vs_base == pytest.approx(cf.decode_ecr - base.mean())
    assert row(summary, "base").seeds == 1 and row(summary, "lora_control").ecr_vs_control == 0


def test_gain_interval_is_the_bootstrap_over_entries_with_their_seeds():
    noise = np.random.default_rng(3).normal(0, 0.05, size=(ENTRIES, len(SEEDS)))
    samples, quality = frames(cfmoe=lambda control, seed, entry: 1.5 * control + noise[entry, seed])
    summary = ecr_study.summary_table(samples, quality, K_OVER_E)
    pick = lambda run: ecr_study.entry_matrix(samples, run, "decode_ecr", list(SEEDS), "sampled")  # noqa: E731
    cf, control = pick("cfmoe"), pick("lora_control")
    expected = stats.bootstrap_interval((cf, control), lambda a, b: a.mean() / b.mean() - 1)
    got = row(summary, "cfmoe")
    assert (got.ecr_vs_control, got.ecr_vs_control_low, got.ecr_vs_control_high) == pytest.approx(expected)
    assert got.ecr_vs_control_low < got.ecr_vs_control_high  # noise gives the interval a width
    # a one-token generation has no ECR: that (seed, entry) pair is left out on both sides
    samples.loc[(samples.run == "cfmoe") & (samples.seed == 1) & (samples.entry == 0), "decode_ecr"] = np.nan
    left = row(ecr_study.summary_table(samples, quality, K_OVER_E), "cfmoe")
    a, b = ecr_study._paired(pick("cfmoe"), control)
    assert np.isnan(b[0, 1]) and left.ecr_vs_control == pytest.approx(np.nanmean(a) / np.nanmean(b) - 1)


def test_article_perplexity_cost_is_token_weighted_against_the_control():
    samples, quality = frames(ppl_factor=1.02)
    summary = ecr_study.summary_table(samples, quality, K_OVER_E)
    cf = row(summary, "cfmoe")
    assert (cf.ppl_vs_control, cf.ppl_vs_control_low, cf.ppl_vs_control_high) == pytest.approx((0.02, 0.02, 0.02))
    per = quality[(quality.run == "lora_control") & (quality.entry >= 0)]
    assert row(summary, "lora_control").article_ppl == pytest.approx(
        np.exp((per.article_tokens * np.log(per.article_ppl)).sum() / per.article_tokens.sum()))


def test_headline_verdicts_and_paper_comparison():
    samples, quality = frames(cfmoe=lambda control, seed, entry: 2 * control, ppl_factor=1.05)
    summary = ecr_study.summary_table(samples, quality, K_OVER_E)
    h = ecr_study.headline(summary)
    assert all(isinstance(v, tuple) and len(v) == 3 for v in h.values())
    assert h["ecr_gain"] == pytest.approx((1.0, 1.0, 1.0)) and h["daft_repeated_4grams"][0] == pytest.approx(0.05)
    assert claims.GENERATED_ECR_GAIN.clears(*h["ecr_gain"][1:])
    lines = ecr_study.verdicts(summary)
    text = "\n".join(lines)
    assert "vs LoRA control" in lines[0] and ": met)" in lines[0] and "base beside" in lines[1]
    # DAFT's repetition beside CFMoE's, the control's and the base model's, for both decodings
    assert text.count("repeated 4-grams: CFMoE 0.0100 [0.0100, 0.0100], DAFT 0.0500 [0.0500, 0.0500]") == 2
    assert lines[-1].startswith("article perplexity") and "(target ≤ +2.00%: missed)" in lines[-1]
    table = ecr_study.comparison_table(summary, K_OVER_E, "ours")
    paper, vs_base, vs_control = table.to_dict("records")
    assert paper["baseline"] == "its base model"
    assert paper["baseline_over_k_over_e"] == pytest.approx(claims.PAPER_ECR_BASELINE / paper["k_over_e"])
    assert vs_base["baseline"].startswith("base model") and vs_control["baseline"].startswith("LoRA control")
    assert vs_control["gain"] == pytest.approx(1.0) and vs_control["cfmoe_over_k_over_e"] == pytest.approx(
        h["cfmoe_ecr"][0] / K_OVER_E)


def test_a_table_from_before_seeds_reads_as_one_seed():
    samples, quality = frames()
    old = samples[samples.seed == 0].drop(columns="seed")
    summary = ecr_study.summary_table(old, quality[quality.seed == 0].drop(columns="seed"), K_OVER_E)
    assert set(summary.seeds) == {1} and row(summary, "cfmoe").delta_ecr_vs_control == pytest.approx(0.1)


def test_authors_table_is_the_primary_seed_and_trace_names_carry_the_seed():
    samples, _ = frames()
    samples = samples.assign(input="p", output=samples.run + samples.seed.astype(str))
    table = ecr_study.authors_table(samples)
    assert len(table) == ENTRIES and set(table.Output_CFMoE) == {"cfmoe0"} and set(table.Output_Baseline) == {"base0"}
    assert set(ecr_study.authors_table(samples, seed=2).Output_CFMoE) == {"cfmoe2"}
    cfg = load_config("smoke")
    assert ecr_study.cache_name(cfg, "cfmoe", 2) == "cfmoe-seed2" and ecr_study.cache_name(cfg, "base", 2) == "base"
    assert ecr_study.cache_name(cfg, "cfmoe") == f"cfmoe-seed{cfg.finetune.seeds[0]}"
