"""Cache-conditional routing: λ = 0 is token-identical on every architecture, λ > 0 cuts misses, and the online
cache's hits equal the exact simulator's on the routing it produced."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cfmoe import cache
from cfmoe.cache_prior import OnlineCache, cache_prior, decode_teacher_forced, router_spread
from cfmoe.moe import describe
from cfmoe.routing import record_routing
from tiny_models import ARCHITECTURES, tiny_moe, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from bench_online_cache import ReferenceCache  # noqa: E402  the slow reference (the benchmark times it too)

IDS = torch.randint(3, 100, (3, 24), generator=torch.Generator().manual_seed(0))


def run(lm, lam, capacity, policy="lru", scope="global", delta=None, halflife=None):
    info = describe(lm)
    online = OnlineCache(IDS.shape[0], len(info.layers), info.n_experts, capacity, policy, scope, halflife)
    with cache_prior(lm, online, lam, delta), record_routing(lm) as recorder:
        nll, misses = decode_teacher_forced(lm, IDS, online)
    experts = np.concatenate([e for e, _ in recorder.calls()]).reshape(IDS.shape[1], IDS.shape[0], len(info.layers), -1)
    return nll, misses, experts.transpose(1, 0, 2, 3), online


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lambda_zero_is_token_identical(arch):
    lm, tok = tiny_moe(arch, n_experts=8, top_k=2, n_layers=2), tiny_tokenizer()
    prompt = tok(["the cat sat"], return_tensors="pt")
    plain = lm.generate(**prompt, max_new_tokens=12, do_sample=False)
    reference = lm(input_ids=plain).logits
    for lam, capacity in ((0.0, 3), (5.0, 16)):  # λ = 0, and a bonus on every expert (all cached): no change
        online = OnlineCache(1, 2, 8, capacity)
        if capacity == 16:
            online.access(0, np.arange(8)[None]), online.access(1, np.arange(8)[None])
        with cache_prior(lm, online, lam):
            assert torch.equal(lm.generate(**prompt, max_new_tokens=12, do_sample=False), plain)
            assert torch.equal(lm(input_ids=plain).logits, reference)
        assert online.hits.sum() + online.misses.sum() > 2 * 2 * 12


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_a_bonus_cuts_misses_and_keeps_the_router_weights_rule(arch):
    lm = tiny_moe(arch, n_experts=8, top_k=2, n_layers=2)
    delta = router_spread(lm, IDS)
    assert len(delta) == 2 and all(d > 0 for d in delta)
    nll0, misses0, _, _ = run(lm, 0.0, 4, delta=delta)
    nll1, misses1, experts, _ = run(lm, 1.0, 4, delta=delta)
    assert misses1.sum() < misses0.sum()
    assert np.isfinite(nll1).all() and not np.array_equal(nll0, nll1)
    assert (np.sort(experts, -1)[..., 1:] != np.sort(experts, -1)[..., :-1]).all()  # k distinct experts


@pytest.mark.parametrize("policy,scope,halflife", [("lru", "global", None), ("lru", "per_layer", None),
                                                   ("lfu", "global", None), ("lfu_aging", "global", 7),
                                                   ("lfu_aging", "per_layer", 3)])
def test_online_hits_equal_the_exact_simulator(policy, scope, halflife):
    lm = tiny_moe("olmoe", n_experts=8, top_k=2, n_layers=3)
    capacity = 3 if scope == "per_layer" else 7
    _, misses, experts, online = run(lm, 2.0, capacity, policy, scope, router_spread(lm, IDS), halflife)
    for row in range(IDS.shape[0]):
        keys = cache.access_keys(experts[row], 8)
        result = cache.simulate_cache(keys, policy, capacity, scope=scope, n_experts=8, halflife=halflife)
        assert result.misses == misses[row] == online.misses[row]


def test_bad_settings_name_the_value():
    lm = tiny_moe("qwen2_moe", n_experts=8, top_k=2, n_layers=2)
    with pytest.raises(ValueError, match="capacity must be in 1..16"):
        OnlineCache(1, 2, 8, 17)
    with pytest.raises(ValueError, match="unknown policy 'mru'"):
        OnlineCache(1, 2, 8, 4, "mru")
    with pytest.raises(ValueError, match="lam must be >= 0, got -1"):
        with cache_prior(lm, OnlineCache(1, 2, 8, 4), -1.0):
            pass
    with pytest.raises(ValueError, match=r"capacity must be one size or one per row \(2\), got shape \(3,\)"):
        OnlineCache(2, 2, 8, np.array([4, 4, 4]))
    with pytest.raises(ValueError, match="capacity must be in 1..16"):
        OnlineCache(2, 2, 8, np.array([4, 0]))
    with pytest.raises(ValueError, match=r"lam must be one value or one per cache row \(1\), got shape \(2,\)"):
        with cache_prior(lm, OnlineCache(1, 2, 8, 4), np.array([1.0, 2.0])):
            pass
    with pytest.raises(ValueError, match="the cache has 3 layers"):
        with cache_prior(lm, OnlineCache(1, 3, 8, 4), 1.0):
            pass


def test_replayed_misses_equal_the_online_cache_without_the_prior():
    from cfmoe.stages import beyond_cfmoe

    lm = tiny_moe("qwen3_moe", n_experts=8, top_k=2, n_layers=2)
    point = beyond_cfmoe.decode(lm, IDS, 0.25, "lru", 0.0, None)
    replayed = beyond_cfmoe.replayed_misses(point["experts"], 8, 2)
    lru = next(r for r in replayed if r["cache_share"] == 0.25 and r["policy"] == "lru")
    assert lru["decode_misses_per_token"] == point["misses_per_token"]
    for row in [r for r in replayed if r["policy"] != "opt"]:  # the oracle has no online form
        online = beyond_cfmoe.decode(lm, IDS, row["cache_share"], row["policy"], 0.0, None)
        assert online["misses_per_token"] == row["decode_misses_per_token"]
        assert online["ppl"] == point["ppl"]


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_own_pass_equals_the_token_by_token_pass_without_the_prior(arch):
    """Without the prior, one forward pass gives the token-by-token pass's routing and perplexity (up to rounding),
    so its replayed misses are the online cache's."""
    from cfmoe.stages import beyond_cfmoe

    lm = tiny_moe(arch, n_experts=8, top_k=2, n_layers=2)
    stepwise = beyond_cfmoe.decode(lm, IDS, 0.25, "lru", 0.0, None)
    whole = beyond_cfmoe.own_pass(lm, IDS, batch_size=2)
    assert np.array_equal(np.sort(whole["experts"], -1), np.sort(stepwise["experts"], -1))
    assert whole["ppl"] == pytest.approx(stepwise["ppl"], rel=1e-5)
    assert beyond_cfmoe.replay(whole["experts"], 0.25, "lru", 8, 2) == stepwise["misses_per_token"]


def test_points_decoded_side_by_side_equal_their_own_passes(monkeypatch):
    """Several (ids, share, λ) points in one batch, each row its own cache and bonus: each point's misses and
    routing are exactly its own pass's, its perplexity equal up to a larger batch's rounding; batches split at
    MAX_BATCH_ROWS."""
    from cfmoe.stages import beyond_cfmoe

    lm = tiny_moe("qwen2_moe", n_experts=8, top_k=2, n_layers=2)
    delta = router_spread(lm, IDS)
    other = torch.randint(3, 100, (2, IDS.shape[1]), generator=torch.Generator().manual_seed(1))
    points = [(IDS, 0.25, 0.0), (other, 0.5, 1.0), (IDS, 0.25, 2.0), (IDS, 0.5, 1.0)]
    alone = [beyond_cfmoe.decode(lm, ids, share, "lru", lam, delta) for ids, share, lam in points]
    assert len({round(a["misses_per_token"], 9) for a in alone}) > 1  # the points differ
    for limit in (4096, 5):  # one batch; then batches of at most 5 rows (3 + 2, 3, 3)
        monkeypatch.setattr(beyond_cfmoe, "MAX_BATCH_ROWS", limit)
        together = beyond_cfmoe.decode_points(lm, points, "lru", delta)
        for one, other_ in zip(alone, together):
            assert one["misses_per_token"] == other_["misses_per_token"]
            assert np.array_equal(one["experts"], other_["experts"])
            assert one["ppl"] == pytest.approx(other_["ppl"], rel=1e-6)
    with pytest.raises(ValueError, match=r"one window length, got \[24, 5\]"):
        beyond_cfmoe.decode_points(lm, [(IDS, 0.25, 0.0), (IDS[:, :5], 0.25, 0.0)], "lru", delta)


def test_generation_with_the_prior_replays_to_the_online_caches_count():
    """Notebook 06's generated text: a left-padded batch generates with each row's own cache in the loop; each row's
    kept decode routing, replayed, gives exactly the misses its online cache counted; the prior cuts them."""
    from cfmoe.routing import DECODE, trace_generate

    lm, tok = tiny_moe("qwen2_moe", n_experts=8, top_k=2, n_layers=2), tiny_tokenizer()
    delta = router_spread(lm, IDS)
    prompts = ["the cat sat", "a dog", "on the mat it sat today"]
    totals = []
    for lam in (0.0, 2.0):
        online = OnlineCache(len(prompts), 2, 8, 4)
        with cache_prior(lm, online, lam, delta, decode_only=True):
            traces = trace_generate(lm, tok, prompts, max_new_tokens=10, do_sample=False, eos_token_id=[])
        for row, trace in enumerate(traces):
            decode = trace.experts[trace.phase == DECODE]
            assert len(decode) == 10
            assert cache.simulate_cache(cache.access_keys(decode, 8), "lru", 4).misses == online.misses[row]
        totals.append(online.misses.sum())
    assert totals[1] < totals[0]


def test_lambda_choice_and_changes_against_the_control():
    import pandas as pd

    from cfmoe.stages import beyond_cfmoe

    alone = pd.DataFrame({"method": ["control", "control", "cfmoe", "cfmoe"], "seed": [0, 1, 0, 1],
                          "val_ppl": [100.0, 102.0, 103.0, 103.0]})
    sweep = pd.DataFrame({"method": ["cache_prior"] * 4 + ["cfmoe+cache_prior"] * 2, "seed": [0, 1, 0, 1, 0, 0],
                          "lam": [0.1, 0.1, 0.2, 0.2, 0.1, 0.2], "val_ppl": [101.5, 102.5, 103.0, 103.5, 109, 110]})
    # control alone 101 (mean), budget 102.01: λ 0.1 (102.0) fits, 0.2 (103.25) does not; nothing fits CFMoE's
    assert beyond_cfmoe.choose_lambdas(sweep, alone) == {"cache_prior": 0.1, "cfmoe+cache_prior": 0.1}
    # the light stack's budget is the control's (the goal's), not its own model's: 103 alone would let 0.2 in
    light = pd.concat([alone, pd.DataFrame({"method": ["cfmoe_light"] * 2, "seed": [0, 1], "val_ppl": [101.5] * 2})])
    light_sweep = pd.DataFrame({"method": ["cfmoe_light+cache_prior"] * 2, "seed": [0, 0], "lam": [0.1, 0.2],
                                "val_ppl": [101.9, 102.5]})
    assert beyond_cfmoe.choose_lambdas(light_sweep, light) == {"cfmoe_light+cache_prior": 0.1}
    methods = pd.DataFrame({"method": ["control", "cfmoe"], "seed": [0, 0], "cache_share": [0.25, 0.25],
                            "policy": ["lru", "lru"], "decode_misses_per_token": [20.0, 15.0],
                            "test_ppl": [100.0, 102.0], "val_ppl": [1.0, 1.0]})
    changed = beyond_cfmoe.with_changes(methods)
    assert changed.misses_vs_control.tolist() == [0.0, -0.25]
    assert changed.ppl_vs_control.round(6).tolist() == [0.0, 0.02]


def test_the_prior_reads_the_engines_cache(tmp_path):
    import copy

    from cfmoe.cache_prior import EngineCache
    from cfmoe.serving import OffloadEngine

    lm, tok = tiny_moe("qwen2_moe", n_experts=8, top_k=2, n_layers=3), tiny_tokenizer()
    ids = tok(["the cat sat"], return_tensors="pt")["input_ids"]
    engine = OffloadEngine(copy.deepcopy(lm), tmp_path / "s.safetensors", 9, mode="disaggregated", tier="direct")
    settings = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
    plain, stats = engine.generate(ids, **settings)
    misses = {}
    for lam in (0.0, 2.0):
        engine.reconfigure(9, mode="disaggregated")
        view = EngineCache(engine)
        with cache_prior(engine.model, view, lam, router_spread(lm, ids)):
            tokens, biased = engine.generate(ids, **settings)
        misses[lam] = biased["decode_misses"]
        if lam == 0:
            assert torch.equal(tokens, plain) and biased["decode_misses"] == stats["decode_misses"]
    assert misses[2.0] < misses[0.0]


def test_equal_perplexity_interpolates_the_stacks_curve():
    import pandas as pd

    from cfmoe.stages import beyond_cfmoe

    rows = [("control", 0.0, 100.0, 20.0), ("remoe", 0.0, 103.0, 18.0), ("cfmoe", 0.0, 102.0, 10.0),
            ("cache_prior", 0.0, 100.0, 20.0), ("cache_prior", 0.1, 101.0, 14.0), ("cache_prior", 0.5, 104.0, 6.0),
            ("cfmoe+cache_prior", 0.0, 102.0, 10.0), ("cfmoe+cache_prior", 0.1, 104.0, 4.0)]
    sweep = pd.DataFrame(rows, columns=["method", "lam", "val_ppl", "val_misses_per_token"]).assign(seed=0)
    equal = beyond_cfmoe.equal_perplexity(sweep, {"cache_prior": 0.1, "cfmoe+cache_prior": 0.1}).set_index("method")
    assert equal.loc["remoe", "against_misses"] == 7.0  # halfway along the stack's curve, 102 -> 104
    assert np.isnan(equal.loc["control", "against_misses"])  # 100 is below the stack's curve
    assert equal.loc["cfmoe+cache_prior", "against_misses"] == 6.0  # the prior alone at 104
    # a second stack gets its own rows; the best stack is the fewest misses within the goal's budget (101)
    rows += [("cfmoe_light", 0.0, 100.5, 15.0), ("cfmoe_light+cache_prior", 0.0, 100.5, 15.0),
             ("cfmoe_light+cache_prior", 0.1, 101.0, 9.0)]
    sweep = pd.DataFrame(rows, columns=["method", "lam", "val_ppl", "val_misses_per_token"]).assign(seed=0)
    chosen = {"cache_prior": 0.1, "cfmoe+cache_prior": 0.1, "cfmoe_light+cache_prior": 0.1}
    equal = beyond_cfmoe.equal_perplexity(sweep, chosen)
    light = equal[equal.against == "cfmoe_light+cache_prior"].set_index("method")
    assert light.loc["cache_prior", "against_misses"] == 9.0 and light.loc["cfmoe_light", "against_misses"] == 15.0
    assert np.isnan(light.loc["remoe", "against_misses"])  # 103 is beyond the light stack's curve
    assert equal[equal.method == "cfmoe_light+cache_prior"].against_misses.tolist() == [14.0]  # prior alone at 101
    assert beyond_cfmoe.best_stack(sweep, chosen) == "cfmoe_light+cache_prior"
    # no stack within the budget: the one with the lowest perplexity
    assert beyond_cfmoe.best_stack(sweep, {**chosen, "cfmoe_light+cache_prior": 0.0}) == "cfmoe_light+cache_prior"
    assert beyond_cfmoe.best_stack(sweep.assign(val_ppl=sweep.val_ppl.where(sweep.method == "control", 150.0)),
                                   chosen) == "cfmoe+cache_prior"


def test_the_light_stacks_weight_is_notebook_01s_rule_at_its_share_of_the_goals_budget(tmp_path, monkeypatch):
    import pandas as pd
    import pytest

    from cfmoe.config import load_config
    from cfmoe.stages import beyond_cfmoe, router_design

    monkeypatch.setenv("CFMOE_RESULTS", str(tmp_path))
    cfg = load_config("smoke")
    with pytest.raises(ValueError, match="pareto.csv is missing"):
        beyond_cfmoe.light_weight(cfg, {"kind": "js"})
    rows = [("control", "none", 0.0, s, 100.0, 0.20) for s in (0, 1)]
    rows += [("js@1", "js", 1.0, 0, 100.2, 0.22), ("js@10", "js", 10.0, 0, 101.0, 0.30),
             ("l2@3", "l2", 3.0, 0, 100.9, 0.25)]
    folder = cfg.results_dir(router_design.NOTEBOOK)
    folder.mkdir(parents=True)
    pd.DataFrame(rows, columns=["run", "kind", "weight", "seed", "val_ppl", "val_ecr"]).to_csv(folder / "pareto.csv")
    light = beyond_cfmoe.light_weight(cfg, {"kind": "js"})
    # budget 0.5%: js crosses it between 1 (+0.2%) and 10 (+1%), 3/8 of the way in log(weight)
    assert light["ppl_budget"] == 0.005 and light["weight"] == float(f"{10 ** 0.375:.4g}")
    assert beyond_cfmoe.light_weight(cfg, {"kind": "l2"})["weight"] == 3.0  # over budget at every weight
    with pytest.raises(ValueError, match="no loss 'skl'"):
        beyond_cfmoe.light_weight(cfg, {"kind": "skl"})
    # a preset without a sweep of its own takes the cpu preset's, as its weight did; only then
    (folder / "pareto.csv").rename(tmp_path / router_design.NOTEBOOK / "pareto.csv")
    gpu = beyond_cfmoe.light_weight(load_config("gpu"), {"kind": "js", "run": "preset default"})
    assert gpu["weight"] == light["weight"] and gpu["sweep"] == f"{router_design.NOTEBOOK}/pareto.csv"
    with pytest.raises(ValueError, match="pareto.csv is missing"):
        beyond_cfmoe.light_weight(cfg, {"kind": "js", "run": "js@4.139"})


def test_decode_windows_cut_blocks_in_order(monkeypatch):
    """Notebook 06's requests: each block cut into `beyond.decode_window`-token windows, in order; 0 keeps blocks."""
    import dataclasses

    from cfmoe import evaluate
    from cfmoe.config import load_config
    from cfmoe.stages import beyond_cfmoe

    blocks = np.arange(3 * 8).reshape(3, 8)
    monkeypatch.setattr(evaluate, "test_blocks", lambda *args, **kwargs: {"input_ids": blocks})
    cfg = load_config("smoke")
    assert beyond_cfmoe._ids(cfg, None, "test").tolist() == blocks.tolist()
    cfg = dataclasses.replace(cfg, beyond=dataclasses.replace(cfg.beyond, decode_window=4))
    windows = beyond_cfmoe._ids(cfg, None, "validation")
    assert windows.shape == (6, 4) and windows.reshape(-1).tolist() == blocks.reshape(-1).tolist()


def test_validation_passes_read_beyond_validation_tokens_else_the_router_designs(monkeypatch):
    """How many tokens notebook 06 asks of each split: validation from `beyond.validation_tokens` when set (the gpu
    preset), else `router_design.eval_tokens`; test always `finetune.eval_tokens`."""
    import dataclasses

    from cfmoe import evaluate
    from cfmoe.config import load_config
    from cfmoe.stages import beyond_cfmoe

    asked = []
    monkeypatch.setattr(evaluate, "test_blocks", lambda tok, block, tokens, split: asked.append((split, tokens))
                        or {"input_ids": np.zeros((2, block), dtype=np.int64)})
    cfg = load_config("smoke")
    for split in ("validation", "test"):
        beyond_cfmoe._ids(cfg, None, split)
    cfg = dataclasses.replace(cfg, beyond=dataclasses.replace(cfg.beyond, validation_tokens=4096))
    for split in ("validation", "test"):
        beyond_cfmoe._ids(cfg, None, split)
    assert asked == [("validation", cfg.router_design.eval_tokens), ("test", cfg.finetune.eval_tokens),
                     ("validation", 4096), ("test", cfg.finetune.eval_tokens)]
    assert load_config("gpu").beyond.validation_tokens == 32768


@pytest.mark.parametrize("policy, scope", [("lru", "global"), ("lfu", "global"), ("lfu_aging", "global"),
                                           ("lru", "per_layer"), ("lfu_aging", "per_layer")])
def test_compiled_online_cache_equals_the_slow_reference(policy, scope):
    rng = np.random.default_rng(1)
    sizes = np.array([6, 4, 9, 6, 2]) if scope == "per_layer" else np.array([12, 5, 20, 12, 8])  # one per row
    fast = OnlineCache(5, 3, 16, sizes, policy, scope, halflife=7)
    slow = ReferenceCache(fast)
    for t in range(60):
        for layer in range(3):
            # skewed choices (a few hot experts) so that hits, ties and evictions all occur
            experts = np.stack([rng.choice(16, 3, replace=False, p=np.r_[[0.2] * 3, [0.4 / 13] * 13])
                                for _ in range(5)])
            fast.access(layer, experts)
            slow.access(layer, experts)
            for name in ("hits", "misses", "clock"):
                assert np.array_equal(getattr(fast, name), getattr(slow, name)), (name, t, layer)
            for held in range(3):
                assert np.array_equal(fast.cached(held), slow.cached(held)), (t, layer, held)
    assert fast.hits.sum() > 0 and fast.misses.sum() > 0
