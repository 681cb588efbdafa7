"""Notebook 01's sweep without training: the adaptive weight grid (a fake `train`), the interpolation at the
perplexity budget, the choice from seed means, the loss scales and the Pareto figure."""

import dataclasses
import json
import math

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import tiny_moe

from cfmoe import locality
from cfmoe.config import RouterDesignConfig, StartWeights, load_config
from cfmoe.present import plots
from cfmoe.stages import router_design as rd

BUDGET = 0.02
CONTROL_PPL, CONTROL_ECR = 100.0, 0.2


def frame(points, control_seeds=(0, 1, 2), control_ppl=CONTROL_PPL, control_ecr=CONTROL_ECR):
    """A sweep frame: the base model, the control per seed, and (kind, weight, seed, ppl increase, ECR) points."""
    rows = [{"run": "base", "kind": "none", "weight": 0.0, "seed": pd.NA, "val_ppl": control_ppl * 1.01,
             "val_ecr": 0.15}]
    rows += [{"run": "control", "kind": "none", "weight": 0.0, "seed": s, "val_ppl": control_ppl, "val_ecr": control_ecr}
             for s in control_seeds]
    rows += [{"run": rd.run_name(kind, weight), "kind": kind, "weight": weight, "seed": seed,
              "val_ppl": control_ppl * (1 + increase), "val_ecr": ecr} for kind, weight, seed, increase, ecr in points]
    return pd.DataFrame(rows)


def test_a_bracketed_kind_is_interpolated_in_log_weight_at_the_budget():
    sweep = frame([("js", 1.0, 0, 0.005, 0.25), ("js", 10.0, 0, 0.01, 0.30), ("js", 100.0, 0, 0.05, 0.40),
                   ("js", 1000.0, 0, 0.20, 0.50)])
    matched = rd.match_at_budget(sweep, BUDGET).set_index("kind").loc["js"]
    t = (0.02 - 0.01) / (0.05 - 0.01)  # a quarter of the way from 10 to 100 in perplexity
    assert matched.status == "bracketed" and (matched.weight_low, matched.weight_high) == (10.0, 100.0)
    assert matched.t == pytest.approx(t)
    assert matched.weight_at_budget == pytest.approx(10 ** (1 + t))  # log-linear: 10^1.25
    assert matched.val_ecr_at_budget == pytest.approx(0.30 + t * 0.10)
    assert matched.ecr_vs_control_at_budget == pytest.approx((0.30 + t * 0.10) / CONTROL_ECR - 1)
    assert math.isnan(matched.val_ecr_at_budget_low)  # one seed: no interval
    choice = rd.choose_locality_loss(sweep, BUDGET)
    assert choice["selected_on"] == "validation" and choice["interpolated"] and choice["within_budget"]
    assert (choice["kind"], choice["weight"]) == ("js", pytest.approx(10 ** 1.25, rel=1e-3))
    assert choice["ppl_vs_control"] == BUDGET and choice["bracket"]["weight_low"] == 10.0


def test_the_kind_with_the_highest_ecr_at_the_budget_wins_not_the_highest_ecr_anywhere():
    sweep = frame([("l2", 10.0, 0, 0.0, 0.21), ("l2", 100.0, 0, 0.01, 0.26), ("l2", 1000.0, 0, 0.03, 0.30),
                   ("skl", 0.1, 0, 0.015, 0.25), ("skl", 1.0, 0, 0.30, 0.60)])
    matched = rd.match_at_budget(sweep, BUDGET).set_index("kind")
    assert matched.val_ecr_at_budget["l2"] == pytest.approx(0.28)  # halfway from 0.01 to 0.03
    assert matched.val_ecr_at_budget["skl"] == pytest.approx(0.25 + 0.35 * 0.005 / 0.285)
    assert rd.choose_locality_loss(sweep, BUDGET)["kind"] == "l2"  # skl's 0.60 is far over the budget


def test_seed_means_decide_and_the_interval_comes_from_the_seeds():
    # seed 0 alone would put js@10 over the budget; the mean of three seeds is within it
    points = [("js", 1.0, 0, 0.0, 0.22), ("js", 10.0, 0, 0.025, 0.30), ("js", 10.0, 1, 0.010, 0.28),
              ("js", 10.0, 2, 0.010, 0.26), ("js", 100.0, 0, 0.05, 0.40), ("js", 100.0, 1, 0.06, 0.42),
              ("js", 100.0, 2, 0.04, 0.38)]
    sweep = frame(points)
    means = rd.kind_means(sweep, "js")
    assert list(means.n) == [1, 3, 3] and means.ppl_vs_control[1] == pytest.approx(0.015)
    assert rd.crossing(means, BUDGET) == (10.0, 100.0)
    matched = rd.match_at_budget(sweep, BUDGET).set_index("kind").loc["js"]
    t = (0.02 - 0.015) / (0.05 - 0.015)
    assert (matched.seeds_low, matched.seeds_high) == (3, 3)
    assert matched.val_ecr_at_budget == pytest.approx(0.28 + t * (0.40 - 0.28))
    per_seed = np.array([0.30 + t * 0.10, 0.28 + t * 0.14, 0.26 + t * 0.12])
    half = 4.302653 * per_seed.std(ddof=1) / math.sqrt(3)  # Student-t, 2 degrees of freedom
    assert matched.val_ecr_at_budget_low == pytest.approx(per_seed.mean() - half, rel=1e-4)
    assert matched.val_ecr_at_budget_high == pytest.approx(per_seed.mean() + half, rel=1e-4)
    # the control's reference is its seed mean
    shifted = frame(points, control_seeds=(0, 1)).assign(
        val_ppl=lambda f: f.val_ppl.where(~((f.run == "control") & (f.seed == 1)), CONTROL_PPL * 1.02))
    assert rd.seed_means(shifted).set_index("run").ppl_vs_control["control"] == pytest.approx(0)


def test_without_a_crossing_the_old_rule_decides_and_says_so():
    within = frame([("js", 1.0, 0, 0.001, 0.30), ("js", 3.0, 0, 0.015, 0.40), ("l2", 1.0, 0, 0.0, 0.35)])
    matched = rd.match_at_budget(within, BUDGET, max_weights=2).set_index("kind")
    assert list(matched.status) == ["within budget at every weight"] * 2
    assert matched.cap_hit.to_dict() == {"js": True, "l2": False}
    choice = rd.choose_locality_loss(within, BUDGET)
    assert (choice["kind"], choice["weight"], choice["interpolated"], choice["within_budget"]) == ("js", 3.0, False, True)
    assert not choice["bracketed"] and "old rule" in choice["method"]
    over = frame([("js", 1.0, 0, 0.03, 0.30), ("js", 3.0, 0, 0.05, 0.40), ("l2", 1.0, 0, 0.025, 0.35)])
    assert rd.match_at_budget(over, BUDGET).status.eq("over budget at every weight").all()
    fallback = rd.choose_locality_loss(over, BUDGET)
    assert (fallback["kind"], fallback["weight"], fallback["within_budget"]) == ("l2", 1.0, False)
    assert "smallest" in fallback["method"]


def test_a_kind_that_never_reaches_the_budget_competes_with_its_best_ecr_within_it():
    sweep = frame([("js", 1.0, 0, 0.01, 0.25), ("js", 10.0, 0, 0.03, 0.35), ("l2", 1.0, 0, 0.0, 0.28),
                   ("l2", 10.0, 0, 0.005, 0.33)])
    choice = rd.choose_locality_loss(sweep, BUDGET)
    assert choice["bracketed"] and (choice["kind"], choice["weight"], choice["interpolated"]) == ("l2", 10.0, False)
    assert "never crossed" in choice["method"]


def design(**changes) -> RouterDesignConfig:
    base = RouterDesignConfig(kinds=("js",), start_weights=StartWeights(js=1.0), weights_per_decade=1, min_weights=3,
                              max_weights=6, seeds=(0, 1, 2), max_ppl_increase=BUDGET)
    return dataclasses.replace(base, **changes)


def fake_train(crossing_weight: float, calls: list, seed_noise=None):
    """A perplexity increase of BUDGET x weight / crossing_weight, ECR growing with log(weight)."""
    def train(kind, weight, seed):
        calls.append((kind, weight, seed))
        if kind == "none":
            return {"val_ppl": CONTROL_PPL, "val_ecr": CONTROL_ECR}
        increase = BUDGET * weight / crossing_weight + (seed_noise(weight, seed) if seed_noise else 0)
        return {"val_ppl": CONTROL_PPL * (1 + increase), "val_ecr": CONTROL_ECR + 0.01 * math.log10(1 + weight)}
    return train


def test_the_grid_runs_min_weights_then_seeds_the_bracket():
    calls = []
    sweep = rd.run_sweep(design(), fake_train(30.0, calls))  # grid 1, 10, 100: crossing between 10 and 100
    assert calls[:3] == [("none", 0.0, s) for s in (0, 1, 2)]
    assert [c for c in calls if c[2] == 0 and c[0] == "js"] == [("js", 1.0, 0), ("js", 10.0, 0), ("js", 100.0, 0)]
    assert set(calls[6:]) == {("js", w, s) for w in (10.0, 100.0) for s in (1, 2)} and len(calls) == 10
    assert list(sweep.phase.unique()) == ["control", "grid", "seed"] and list(sweep.seed[:3]) == [0, 1, 2]


@pytest.mark.parametrize("crossing_weight, added", [(3000.0, [1000.0, 10000.0]), (0.05, [0.1, 0.01])])
def test_the_grid_extends_up_or_down_until_it_brackets_the_budget(crossing_weight, added):
    calls = []
    sweep = rd.run_sweep(design(), fake_train(crossing_weight, calls))
    extended = list(sweep[sweep.phase == "extension"].weight)
    assert extended == added
    low, high = rd.crossing(rd.kind_means(sweep, "js"), BUDGET)
    assert low < crossing_weight < high and {low, high} <= set(added) | {1.0, 100.0}
    assert set(sweep[sweep.phase == "seed"].weight) == {low, high}


def test_the_grid_stops_at_max_weights_and_says_the_cap_was_hit():
    calls = []
    sweep = rd.run_sweep(design(max_weights=4), fake_train(1e6, calls))
    assert list(rd.kind_means(sweep, "js").weight) == [1.0, 10.0, 100.0, 1000.0] and "seed" not in set(sweep.phase)
    matched = rd.match_at_budget(sweep, BUDGET, max_weights=4).iloc[0]
    assert (matched.status, matched.cap_hit) == ("within budget at every weight", True)
    assert rd.choose_locality_loss(sweep, BUDGET, 4)["weight"] == 1000.0


def test_when_the_seeds_move_the_crossing_the_new_bracket_gets_the_seeds_too():
    # seed 0 puts the crossing between 10 and 100; seeds 1 and 2 push 10 over the budget (mean 0.027)
    noise = lambda weight, seed: 0.03 if (weight == 10.0 and seed > 0) else 0.0  # noqa: E731
    calls = []
    sweep = rd.run_sweep(design(), fake_train(30.0, calls, noise), base_seed=0)
    assert rd.crossing(rd.kind_means(sweep, "js"), BUDGET) == (1.0, 10.0)
    seeded = sweep[sweep.kind == "js"].groupby("weight").seed.nunique()
    assert seeded.to_dict() == {1.0: 3, 10.0: 3, 100.0: 3}


def test_seeds_are_offset_by_the_study_seed_and_names_are_exact():
    calls = []
    rd.run_sweep(design(seeds=(0, 1)), fake_train(30.0, calls), base_seed=5)
    assert {c[2] for c in calls} == {5, 6}
    assert [rd.grid_weight(0.3, 2, i) for i in range(-1, 4)] == [0.09487, 0.3, 0.9487, 3.0, 9.487]
    assert rd.run_name("js", 0.9487) == "js@0.9487" and rd.run_name("none", 0.0) == "control"


def test_start_weights_name_every_locality_loss():
    assert tuple(f.name for f in dataclasses.fields(StartWeights)) == locality.LOSS_KINDS


def test_loss_scales_measure_each_loss_and_its_router_gradient():
    lm = tiny_moe("qwen2_moe")
    ids = np.random.default_rng(0).integers(3, 128, size=(4, 16))
    blocks = datasets.Dataset.from_dict({"input_ids": ids, "document_ids": np.zeros_like(ids)}).with_format("torch")
    before = [p.detach().clone() for p in lm.parameters()]
    scales = rd.loss_scales(lm, blocks, top_k=2, batches=1, batch_size=4).set_index("loss")
    assert list(scales.index) == ["lm", *locality.LOSS_KINDS]
    assert scales.grad_vs_lm_loss["lm"] == 1 and (scales.value > 0).all() and (scales.router_grad_norm > 0).all()
    assert all(torch.equal(a, b) for a, b in zip(before, lm.parameters())) and all(p.grad is None for p in lm.parameters())


def test_the_pareto_figure_draws_seed_means_with_intervals_and_the_budget():
    sweep = frame([("js", 1.0, 0, 0.01, 0.25), ("js", 10.0, 0, 0.015, 0.30), ("js", 10.0, 1, 0.012, 0.31),
                   ("js", 100.0, 0, 0.05, 0.40), ("js", 100.0, 1, 0.06, 0.41), ("l2", 1.0, 0, 0.0, 0.22)])
    choice = rd.choose_locality_loss(sweep, BUDGET)
    choice["matched"] = rd.match_at_budget(sweep, BUDGET).to_dict("records")
    fig = plots.pareto(rd.seed_means(sweep), choice, k_over_e=0.1)
    ax = fig.axes[0]
    assert any(line.get_xdata()[0] == pytest.approx(100 * BUDGET) and line.get_linestyle() == "--"
               for line in ax.get_lines())
    labels = ax.get_legend_handles_labels()[1]
    assert {"js", "l2", "control", "base"} <= set(labels) and any(label.startswith("chosen: js") for label in labels)


def test_load_choice_gives_notebook_02_the_kind_and_weight(tmp_path, monkeypatch):
    monkeypatch.setenv("CFMOE_RESULTS", str(tmp_path))
    cfg = load_config("smoke")
    assert (rd.load_choice(cfg)["kind"], rd.load_choice(cfg)["weight"]) == (cfg.finetune.locality_kind,
                                                                          cfg.finetune.locality_weight)
    sweep = frame([("js", 1.0, 0, 0.01, 0.25), ("js", 10.0, 0, 0.03, 0.35)])
    folder = cfg.results_dir(rd.NOTEBOOK)
    folder.mkdir(parents=True)
    (folder / "choice.json").write_text(json.dumps(rd.choose_locality_loss(sweep, BUDGET)))
    choice = rd.load_choice(cfg)
    assert (choice["kind"], choice["weight"], choice["selected_on"]) == ("js", pytest.approx(10 ** 0.5, rel=1e-3),
                                                                         "validation")
