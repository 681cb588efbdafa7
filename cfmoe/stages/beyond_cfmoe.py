"""Notebook 06 (`06_beyond_cfmoe`): CFMoE against its peers on one harness, and whether they add up.

    python -m cfmoe.stages beyond_cfmoe --preset cpu

Methods, all from the same base model, data, steps and seeds (`finetune.seeds`):
- `control`: notebook 02's LoRA control; `cfmoe`: notebook 02's CFMoE (notebook 01's chosen loss and weight).
- `remoe`: ReMoE's recipe (`finetune.finetune(method="router_kl")`): routers only, the same locality loss plus a
  Trust-KL anchor (weight `ANCHOR_WEIGHT`) to the original routers. Its locality weight gets notebook 01's
  budget rule: short runs at `REMOE_WEIGHT_FACTORS` x CFMoE's weight, the largest validation ECR within
  `router_design.max_ppl_increase` of a control trained as long (seed 0).
- `cache_prior`: the control with cache-conditional routing (`cache_prior.py`) at bonus λ·Δ; `cfmoe+cache_prior`
  the same on CFMoE. λ is swept on validation at 25% of experts cached under LRU; the chosen λ is the largest
  whose validation perplexity stays within `PRIOR_PPL_BUDGET` of the same model without the prior.
- `cfmoe_light+cache_prior`: the stack built for the goal (misses -50% at no more than +1% perplexity against the
  control), since CFMoE at notebook 01's budget already spends more than the goal's: `cfmoe_light` is CFMoE
  trained here like notebook 02's (same loss, steps, data, seeds) at the weight notebook 01's rule gives at
  `LIGHT_BUDGET_SHARE` of the goal's budget (`light_weight`, validation), and its λ is the largest whose validation
  perplexity stays within the goal's budget of the control's (`PRIOR_BUDGET_OF`). It gets the same 8 values of λ.

With the prior, a model decodes teacher-forced validation and test blocks token by token, each block a request
with its own cold cache of `share` x (layers x experts) entries (global pool), so routing can depend on the cache.
Without it, routing does not depend on the cache: one forward pass per split records it (`own_pass`, equal to the
token-by-token pass up to float rounding; tested), and it is replayed exactly through every share and policy
(`cache.simulate_cache`, equal to the online cache; tested). Decode misses per token and perplexity come from the
same pass. Policies: LRU and `lfu_aging` (half-life `cache.AGING_HALFLIFE_TOKENS` tokens, fixed,
not tuned).
"""

from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np
import pandas as pd
import torch

from .. import cache, claims, costmodel, data, evaluate, finetune, moe, stats, textquality
from ..cache_prior import OnlineCache, cache_prior, decode_teacher_forced, router_spread
from ..config import StudyConfig, results_root, results_subdir
from ..determinism import make_deterministic
from ..present import plots
from ..provenance import save_figure, save_table
from ..routing import record_routing
from . import cache_management, router_design, runs, serving

NOTEBOOK = "06_beyond_cfmoe"
SHARES = (0.125, 0.25, 0.5)
POLICIES = ("lru", "lfu_aging", "opt")  # opt: Belady's oracle (knows future routing), a bound, not a policy
# λ on validation: 8 values, as many as notebook 01 gives a loss's weight at most (`router_design.max_weights`), denser
# where the prior's perplexity crosses its budget (between 0.05 and 0.2 on the committed runs)
LAMBDAS = (0.01, 0.02, 0.05, 0.07, 0.1, 0.14, 0.2, 0.5)
SWEEP = (0.25, "lru")  # where λ is chosen
PRIOR_PPL_BUDGET = 0.01  # the prior may cost at most this much validation perplexity over its reference
LIGHT_BUDGET_SHARE = 0.5  # of the goal's perplexity budget, spent by the light stack's CFMoE (the prior gets the rest)
ANCHOR_WEIGHT = 1.0
REMOE_WEIGHT_FACTORS = (0.3, 1.0, 3.0, 10.0)


def _ids(cfg: StudyConfig, tokenizer, split: str) -> torch.Tensor:
    """The split's teacher-forced requests: its blocks, cut into `beyond.decode_window`-token windows if set."""
    tokens = ((cfg.beyond.validation_tokens or cfg.router_design.eval_tokens) if split == "validation"
              else cfg.finetune.eval_tokens)
    ids = torch.as_tensor(evaluate.test_blocks(tokenizer, cfg.finetune.block_size, tokens, split)["input_ids"])
    window = cfg.beyond.decode_window or ids.shape[1]
    return ids.reshape(-1, window)


# token-by-token passes run transformers' fastest experts implementation for one-token steps on the device
# (results/benchmarks/gpu_speed/: batched_mm 2x grouped_mm on an H100); the CPU keeps the model's own
DECODE_IMPLEMENTATION = {"cuda": "batched_mm"}


def decode(lm, ids: torch.Tensor, share: float, policy: str, lam: float, delta) -> dict:
    """One teacher-forced token-by-token pass with the cache in the loop: perplexity, misses, the routing."""
    return decode_points(lm, [(ids, share, lam)], policy, delta)[0]


MAX_BATCH_ROWS = 4096  # rows of one batched pass (several points side by side); more are split into passes


def decode_points(lm, points: list[tuple[torch.Tensor, float, float]], policy: str, delta) -> list[dict]:
    """`decode` for several points (ids, share, λ) of one model and policy, side by side in batches of at most
    `MAX_BATCH_ROWS` rows: each point's rows get their own caches of its share and its λ. The rows of a batch do
    not interact (each row is a request with its own cache), so each point's misses, routing and perplexity are
    those of its own pass (tested), up to the float rounding of a larger batch."""
    if len({x.shape[1] for x, _, _ in points}) != 1:
        raise ValueError(f"points decoded together need one window length, got {[x.shape[1] for x, _, _ in points]}")
    batches, rows = [[]], 0
    for point in points:
        if batches[-1] and rows + len(point[0]) > MAX_BATCH_ROWS:
            batches.append([])
            rows = 0
        batches[-1].append(point)
        rows += len(point[0])
    return [result for batch in batches for result in _decode_batch(lm, batch, policy, delta)]


def _decode_batch(lm, batch: list[tuple[torch.Tensor, float, float]], policy: str, delta) -> list[dict]:
    info = moe.describe(lm)
    n_layers, n_experts = len(info.layers), info.n_experts
    ids = torch.cat([x for x, _, _ in batch])
    sizes = [len(x) for x, _, _ in batch]
    online = OnlineCache(ids.shape[0], n_layers, n_experts,
                         np.repeat([capacity(share, n_layers, n_experts) for _, share, _ in batch], sizes), policy,
                         halflife=cache.aging_halflife(n_layers, info.top_k))
    with cache_prior(lm, online, np.repeat([lam for _, _, lam in batch], sizes), delta), \
            record_routing(lm) as recorder, \
            moe.experts_implementation(lm, DECODE_IMPLEMENTATION.get(moe.unwrap(lm).device.type)):
        nll, misses = decode_teacher_forced(lm, ids, online)
    experts = np.concatenate([e for e, _ in recorder.calls()]).reshape(ids.shape[1], ids.shape[0], n_layers, -1)
    experts = experts.transpose(1, 0, 2, 3)
    return [{"ppl": float(np.exp(nll[rows].sum() / (len(rows) * (ids.shape[1] - 1)))),
             "misses_per_token": float(misses[rows].sum() / (len(rows) * ids.shape[1])), "experts": experts[rows]}
            for rows in np.split(np.arange(ids.shape[0]), np.cumsum(sizes)[:-1])]


def capacity(share: float, n_layers: int, n_experts: int) -> int:
    """Cache entries for `share` of all layers' experts (notebook 03's rounding)."""
    return int(cache_management.level_capacities(n_layers * n_experts, [share])[0])


def replayed_misses(experts: np.ndarray, n_experts: int, top_k: int) -> list[dict]:
    """Decode misses per token of recorded routing (rows, T, layers, k), each row its own cold cache, for every
    share and policy: exact replays (the routing did not depend on the cache)."""
    return [{"cache_share": share, "policy": policy,
             "decode_misses_per_token": replay(experts, share, policy, n_experts, top_k)}
            for share in SHARES for policy in POLICIES]


def replay(experts: np.ndarray, share: float, policy: str, n_experts: int, top_k: int) -> float:
    """Decode misses per token of recorded routing (rows, T, layers, k) through one share and policy, each row its
    own cold cache."""
    n_layers = experts.shape[2]
    size = capacity(share, n_layers, n_experts)
    misses = sum(cache.simulate_cache(cache.access_keys(row, n_experts), policy, size,
                                      halflife=cache.aging_halflife(n_layers, top_k)).misses for row in experts)
    return misses / (experts.shape[0] * experts.shape[1])


def own_pass(lm, ids: torch.Tensor, batch_size: int) -> dict:
    """A model's own routing (no prior, so routing does not depend on the cache) from one teacher-forced forward
    pass over whole rows: its perplexity and the experts every token used, (rows, T, layers, k). The same as a
    token-by-token pass up to float rounding (tested); its misses for any cache are exact replays."""
    ppl, experts = evaluate.record_test(lm, {"input_ids": ids.numpy()}, batch_size)
    return {"ppl": ppl["perplexity"], "experts": experts.reshape(*ids.shape, *experts.shape[1:])}


def _remoe_weight(cfg: StudyConfig, lm, tokenizer, blocks, choice: dict, top_k: int) -> tuple[float, pd.DataFrame]:
    """ReMoE's locality weight by notebook 01's rule, on validation text, seed 0, `router_design.steps` steps."""
    design = cfg.router_design
    short = dataclasses.replace(cfg.finetune, steps=design.steps)
    rows = []
    for method, weight in [("control", 0.0)] + [("remoe", choice["weight"] * f) for f in REMOE_WEIGHT_FACTORS]:
        train = finetune.finetune(copy.deepcopy(lm), blocks, short, kind=choice["kind"], weight=weight, top_k=top_k,
                                  seed=0, device=cfg.device, method="lora" if method == "control" else "router_kl",
                                  anchor_weight=ANCHOR_WEIGHT)
        rows.append({"method": method, "locality_weight": weight,
                     **_val_scores(cfg, f"{method}-sweep-{weight:g}", train.model, tokenizer)})
    sweep = pd.DataFrame(rows)
    control = sweep[sweep.method == "control"].iloc[0]
    sweep["ppl_vs_control"] = sweep.val_ppl / control.val_ppl - 1
    ok = sweep[(sweep.method == "remoe") & (sweep.ppl_vs_control <= design.max_ppl_increase)]
    chosen = ok.sort_values("val_ecr").iloc[-1] if len(ok) else sweep[sweep.method == "remoe"].iloc[0]
    sweep["chosen"] = (sweep.method == "remoe") & (sweep.locality_weight == chosen.locality_weight)
    return float(chosen.locality_weight), sweep


def _val_scores(cfg: StudyConfig, name: str, lm, tokenizer) -> dict:
    scores = runs.test_evaluation(cfg, NOTEBOOK, name, lm, tokenizer, cfg.finetune.block_size,
                                  cfg.router_design.eval_tokens, split="validation")
    return {"val_ppl": scores["test_ppl"], "val_ecr": scores["test_ecr"]}


def _progress(started: float, what: str) -> None:
    """One line per phase with the seconds since the stage started (the gpu chain's log shows where time goes)."""
    print(f"[{NOTEBOOK}] {what} at {time.perf_counter() - started:.0f} s", flush=True)


def _compute(cfg: StudyConfig, force: bool = False) -> dict:
    started = time.perf_counter()
    make_deterministic(cfg.seed, cfg.threads)
    out = cfg.results_dir(NOTEBOOK)
    ft = cfg.finetune
    base, tokenizer = runs.load_base(cfg)
    info = moe.describe(base)
    choice = router_design.load_choice(cfg)
    blocks = finetune.finetune_blocks(tokenizer, ft.block_size)
    ids = {split: _ids(cfg, tokenizer, split) for split in ("validation", "test")}
    remoe_weight, remoe_sweep = _remoe_weight(cfg, base, tokenizer, blocks, choice, info.top_k)
    light = light_weight(cfg, choice)
    _progress(started, "ReMoE weight chosen")

    rows, sweep_rows, by_seed, deltas = [], [], {}, {}
    for seed in ft.seeds:
        models, _ = runs.load_runs(cfg, seed)
        train = finetune.finetune(copy.deepcopy(base), blocks, ft, kind=choice["kind"], weight=remoe_weight,
                                  top_k=info.top_k, seed=seed, device=cfg.device, method="router_kl",
                                  anchor_weight=ANCHOR_WEIGHT)
        remoe = runs.save_finetuned(cfg, "remoe", train.model, tokenizer, seed)
        train = finetune.finetune(copy.deepcopy(base), blocks, ft, kind=light["kind"], weight=light["weight"],
                                  top_k=info.top_k, seed=seed, device=cfg.device)
        cfmoe_light = runs.save_finetuned(cfg, "cfmoe_light", train.model, tokenizer, seed)
        _progress(started, f"seed {seed}: models ready")
        tuned = by_seed[seed] = {"lora_control": models["lora_control"], "remoe": remoe, "cfmoe": models["cfmoe"],
                                 "cfmoe_light": cfmoe_light}
        # Δ of each model the prior runs on, once per seed
        deltas[seed] = {STACKS[alone][0]: router_spread(tuned[STACKS[alone][0]], ids["validation"][:8])
                        for alone in PRIORS.values()}
        for method in ALONE:  # alone: its own routing, replayed through every cache
            lm = tuned[STACKS[method][0]]
            passes = {split: own_pass(lm, x, cfg.eval.batch_size) for split, x in ids.items()}
            for row in replayed_misses(passes["test"]["experts"], info.n_experts, info.top_k):
                rows.append({"method": method, "seed": seed, "lam": 0.0, **row,
                             "val_ppl": passes["validation"]["ppl"], "test_ppl": passes["test"]["ppl"]})
            start = {"method": method, "seed": seed, "lam": 0.0, "val_ppl": passes["validation"]["ppl"],
                     "val_misses_per_token": replay(passes["validation"]["experts"], *SWEEP, info.n_experts,
                                                    info.top_k)}
            sweep_rows += [start] + [{**start, "method": prior} for prior, alone in PRIORS.items() if alone == method]
        for method, alone in PRIORS.items():
            run = STACKS[alone][0]
            points = decode_points(tuned[run], [(ids["validation"], SWEEP[0], lam) for lam in LAMBDAS], SWEEP[1],
                                   deltas[seed][run])
            sweep_rows += [{"method": method, "seed": seed, "lam": lam, "val_ppl": point["ppl"],
                            "val_misses_per_token": point["misses_per_token"]} for lam, point in zip(LAMBDAS, points)]
        _progress(started, f"seed {seed}: λ swept")
        del models, train
    sweep = pd.DataFrame(sweep_rows)
    alone = pd.DataFrame(rows)
    chosen = choose_lambdas(sweep, alone)

    # the chosen λ, every share, on validation and test (validation at the sweep's share was decoded by the sweep)
    wanted = [(split, share) for share in SHARES for split in ("validation", "test")
              if (split, share) != ("validation", SWEEP[0])]
    for seed in ft.seeds:
        for method, alone in PRIORS.items():
            run = STACKS[alone][0]
            lm, delta = by_seed[seed][run], deltas[seed][run]
            decoded = decode_points(lm, [(ids[split], share, chosen[method]) for split, share in wanted], SWEEP[1],
                                    delta)
            points = dict(zip(wanted, decoded))
            swept = sweep[(sweep.method == method) & (sweep.seed == seed) & np.isclose(sweep.lam, chosen[method])]
            for share in SHARES:
                test = points[("test", share)]
                val_ppl = float(swept.val_ppl.iloc[0]) if share == SWEEP[0] else points[("validation", share)]["ppl"]
                point = {"method": method, "seed": seed, "lam": chosen[method], "cache_share": share,
                         "val_ppl": val_ppl, "test_ppl": test["ppl"]}
                rows.append({**point, "policy": "lru", "decode_misses_per_token": test["misses_per_token"]})
                # the oracle on the routing the prior produced under LRU: how far LRU is from the best cache for it
                rows.append({**point, "policy": "opt",
                             "decode_misses_per_token": replay(test["experts"], share, "opt", info.n_experts,
                                                               info.top_k)})
    _progress(started, "chosen λ decoded")
    quality = pd.DataFrame([row for seed in ft.seeds
                            for row in generated_quality(cfg, by_seed[seed], deltas[seed], seed, chosen, tokenizer)])
    _progress(started, "generated text scored")
    engine = engine_measurements(cfg, by_seed[ft.seeds[0]], chosen, deltas[ft.seeds[0]], tokenizer)
    _progress(started, "engine measured")
    methods = with_changes(pd.DataFrame(rows))
    summary = stats.summarize(methods, ["method", "cache_share", "policy"],
                              ["decode_misses_per_token", "misses_vs_control", "val_ppl", "test_ppl",
                               "ppl_vs_control"])
    best = best_stack(sweep, chosen)
    summary["best_stack"] = summary.method.eq(best)
    extra = {"choice": choice, "remoe_weight": remoe_weight, "light": light, "anchor_weight": ANCHOR_WEIGHT,
             "lambdas": chosen, "prior_budget_of": PRIOR_BUDGET_OF, "best_stack": best,
             "halflife_tokens": cache.AGING_HALFLIFE_TOKENS, "seeds": list(ft.seeds), "selected_on": "validation",
             "interval": "mean over seeds and its 95% Student-t interval"}
    save_table(methods, out / "methods", cfg, **extra)
    save_table(summary, out / "methods_summary", cfg, **extra)
    save_table(sweep, out / "lambda_sweep", cfg, **extra)
    save_table(remoe_sweep, out / "remoe_sweep", cfg, **extra)
    quality_summary = stats.summarize(quality, ["method"],
                                      ["repeated_4gram_rate", "distinct_2", "decode_misses_per_token"])
    save_table(quality, out / "generated", cfg, **extra, decoding="sampled (the authors' settings)",
               cache="25% of experts, LRU, one cold decode cache per entry, prefill disaggregated")
    save_table(quality_summary, out / "generated_summary", cfg, **extra)
    engine_summary = serving.summarize_repeats(engine, keys=ENGINE_SETTING, timed=("decode_tokens_per_s",))
    engine_extra = {**extra, "tier": serving.tier_label("throttled"), "seed": ft.seeds[0],
                    "repeats": cfg.serving.repeats}
    save_table(engine, out / "engine", cfg, **engine_extra)
    save_table(engine_summary, out / "engine_summary", cfg, **engine_extra)
    equal = equal_perplexity(sweep, chosen)
    save_table(equal, out / "equal_perplexity", cfg, **extra,
               note="validation text, 25% of experts cached, LRU; seed means; the stack's λ curve interpolated")
    verdict = verdicts(summary, sweep) + equal_verdicts(equal, summary)
    return {"methods": methods, "summary": summary, "sweep": sweep, "remoe_sweep": remoe_sweep, "chosen": chosen,
            "remoe_weight": remoe_weight, "light": light, "verdicts": verdict, "generated": quality_summary,
            "engine": engine_summary, "equal": equal}


# a prior method -> the model it runs on, and the method whose validation perplexity its λ's budget is relative to
PRIORS = {"cache_prior": "control", "cfmoe+cache_prior": "cfmoe", "cfmoe_light+cache_prior": "cfmoe_light"}
PRIOR_BUDGET_OF = {"cache_prior": "control", "cfmoe+cache_prior": "cfmoe", "cfmoe_light+cache_prior": "control"}
ALONE = ("control", "remoe", "cfmoe", "cfmoe_light")  # methods without the prior
STACK_METHODS = ("cfmoe+cache_prior", "cfmoe_light+cache_prior")  # CFMoE with the prior


def light_weight(cfg: StudyConfig, choice: dict) -> dict:
    """CFMoE's loss weight for the light stack: notebook 01's rule (its chosen loss; validation ECR at matched
    validation perplexity over the control, interpolated in log(weight)) at LIGHT_BUDGET_SHARE of the goal's
    perplexity budget, from notebook 01's sweep; where that loss does not cross the budget, its highest-ECR weight
    within it, else its run of the smallest perplexity increase (`router_design.choose_locality_loss` on that
    loss alone). A preset that runs no sweep of its own (the gpu preset, whose loss and
    weight are the cpu choice's: `finetune.locality_*`) takes the cpu preset's sweep, as its weight did."""
    path = cfg.results_dir(router_design.NOTEBOOK) / "pareto.csv"
    if not path.is_file() and choice.get("run") == "preset default":
        path = results_root() / results_subdir(router_design.NOTEBOOK, "cpu") / "pareto.csv"
    if not path.is_file():
        raise ValueError(f"{path} is missing: run notebook 01 first (python -m cfmoe.stages router_design)")
    budget = LIGHT_BUDGET_SHARE * claims.STACK_PPL_COST.bound
    sweep = pd.read_csv(path)
    kinds = sorted(set(sweep.kind) - {"none"})
    if choice["kind"] not in kinds:
        raise ValueError(f"notebook 01's sweep has no loss {choice['kind']!r}; it has {kinds}")
    # notebook 01's own rule, on the chosen loss alone (with the control its perplexity is measured against)
    light = router_design.choose_locality_loss(sweep[(sweep.kind == choice["kind"]) | (sweep.run == "control")], budget)
    if light["interpolated"]:
        how = f"interpolated between {light['bracket']['weight_low']:g} and {light['bracket']['weight_high']:g}"
    elif light["within_budget"]:
        how = "the highest validation ECR within the budget (no crossing)"
    else:
        how = "every weight over budget: the smallest perplexity increase"
    return {"kind": choice["kind"], "weight": float(f"{light['weight']:.4g}"), "ppl_budget": budget, "how": how,
            "selected_on": "validation (notebook 01's sweep)", "sweep": str(path.relative_to(results_root()))}


def equal_perplexity(sweep: pd.DataFrame, chosen: dict) -> pd.DataFrame:
    """Each method against each stack at equal validation perplexity: the stack's λ curve (its CFMoE at λ = 0 up,
    seed means) interpolated at the method's validation perplexity (its chosen λ for the cache prior alone);
    NaN where that perplexity is outside the curve. Also the prior alone's curve at each stack's chosen point."""
    means = sweep.groupby(["method", "lam"], as_index=False)[["val_ppl", "val_misses_per_token"]].mean()

    def curve(method):
        c = means[means.method == method].sort_values("val_ppl")
        return c.val_ppl.to_numpy(), c.val_misses_per_token.to_numpy()

    def at(method, lam):
        return means[(means.method == method) & (means.lam == lam)].iloc[0]

    def interp(x, xs, ys):
        return float(np.interp(x, xs, ys)) if xs.min() <= x <= xs.max() else float("nan")

    rows = []
    for stack in STACK_METHODS:
        if stack not in chosen:
            continue
        for method in (*ALONE, "cache_prior"):
            if method in set(means.method):
                point = at(method, chosen.get(method, 0.0))
                rows.append({"method": method, "against": stack, "val_ppl": point.val_ppl,
                             "method_misses": point.val_misses_per_token,
                             "against_misses": interp(point.val_ppl, *curve(stack))})
        point = at(stack, chosen[stack])
        rows.append({"method": stack, "against": "cache_prior", "val_ppl": point.val_ppl,
                     "method_misses": point.val_misses_per_token,
                     "against_misses": interp(point.val_ppl, *curve("cache_prior"))})
    return pd.DataFrame(rows)


def equal_verdicts(equal: pd.DataFrame, summary: pd.DataFrame) -> list[str]:
    """Does the stack beat each method alone at equal (validation) perplexity; does CFMoE's LoRA beat router-only
    tuning; how far is each from the OPT oracle (test, 25% cached)."""
    lines = []
    for row in equal.itertuples():
        if np.isnan(row.against_misses):
            lines.append(f"{row.against} vs {row.method} at {row.method}'s validation perplexity {row.val_ppl:.1f}: "
                         f"outside {row.against}'s λ curve, no comparison")
            continue
        stack_first = row.method in STACK_METHODS
        better = row.method_misses < row.against_misses if stack_first else row.against_misses < row.method_misses
        winner = f"the stack ({row.method if stack_first else row.against})" if better else "not the stack"
        lines.append(f"at validation perplexity {row.val_ppl:.1f}: {row.method} {row.method_misses:.2f} vs "
                     f"{row.against} {row.against_misses:.2f} decode misses per token: {winner} wins")
    at = summary[summary.cache_share == SWEEP[0]].set_index(["method", "policy"])
    remoe, cfmoe = at.loc[("remoe", "lru")], at.loc[("cfmoe", "lru")]
    dominates = cfmoe.decode_misses_per_token <= remoe.decode_misses_per_token and cfmoe.test_ppl <= remoe.test_ppl
    lines.append(f"CFMoE (LoRA) vs ReMoE's recipe (routers only), test: {cfmoe.decode_misses_per_token:.2f} vs "
                 f"{remoe.decode_misses_per_token:.2f} misses per token at perplexity {cfmoe.test_ppl:.1f} vs "
                 f"{remoe.test_ppl:.1f}: {'CFMoE dominates' if dominates else 'no dominance'}")
    for method in at.index.get_level_values("method").unique():
        if (method, "opt") in at.index:
            lru, opt = at.loc[(method, "lru")].decode_misses_per_token, at.loc[(method, "opt")].decode_misses_per_token
            lines.append(f"{method}: LRU {lru:.2f} vs OPT (oracle, knows future routing) {opt:.2f} misses per token "
                         f"({lru / opt:.2f}x the oracle's)")
    return lines


# method -> (notebook 02 / this notebook's run name, with the cache prior)
STACKS = {"control": ("lora_control", False), "remoe": ("remoe", False), "cfmoe": ("cfmoe", False),
          "cfmoe_light": ("cfmoe_light", False), "cache_prior": ("lora_control", True),
          "cfmoe+cache_prior": ("cfmoe", True), "cfmoe_light+cache_prior": ("cfmoe_light", True)}
ENGINE_SETTING = ["method", "share"]


def generated_quality(cfg: StudyConfig, models: dict, deltas: dict, seed: int, chosen: dict, tokenizer) -> list[dict]:
    """Every method generates for notebook 04's entries (sampled, the authors' settings, seeded; all entries as one
    left-padded batch), each entry a request with its own cold decode cache (25% of experts, LRU; prefill
    disaggregated, outside it) in the loop: repetition of what it wrote, next to its decode misses per token.
    `models` by run name, `deltas` (the prior's Δ) by run name.

    A row's misses are its kept decode routing (`routing.trace_generate`: up to its first EOS, each kept token run
    through the model) replayed through its cache: the routing the prior chose with that very cache, so the replay
    equals the online cache's count over those tokens, free of the steps the batch runs past the row's end."""
    from ..routing import DECODE, trace_generate
    from .ecr_wikitext import decoding_settings, entries

    prompts = list(entries(cfg)["prompt"])[:cfg.beyond.generated_entries or None]
    settings = decoding_settings(cfg)["sampled"]
    new_tokens = cfg.beyond.generated_tokens or cfg.ecr.max_new_tokens
    share, policy = SWEEP
    rows = []
    for method, (run, prior) in STACKS.items():
        lm = models[run]
        info = moe.describe(lm)
        n_layers = len(info.layers)
        online = OnlineCache(len(prompts), n_layers, info.n_experts, capacity(share, n_layers, info.n_experts), policy)
        torch.manual_seed(seed)
        with cache_prior(lm, online, chosen[method] if prior else 0.0, deltas[run] if prior else None,
                         decode_only=True):
            traces = trace_generate(lm, tokenizer, prompts, max_new_tokens=new_tokens, **settings)
        for entry, trace in enumerate(traces):
            decode = trace.phase == DECODE
            tokens = trace.token_ids[decode]
            rows.append({"method": method, "seed": seed, "entry": entry, "generated_tokens": len(tokens),
                         "repeated_4gram_rate": textquality.repeated_ngram_rate(tokens, 4),
                         "distinct_2": textquality.distinct_n(tokens, 2),
                         "decode_misses_per_token": replay(trace.experts[decode][None], share, policy,
                                                           info.n_experts, info.top_k)})
    return rows


def engine_measurements(cfg: StudyConfig, models: dict, chosen: dict, deltas: dict, tokenizer) -> pd.DataFrame:
    """The offloading engine's decode tokens/s of every method (primary seed) at 25% and 50% of experts, on
    notebook 05's emulated (sleep-throttled) tier, LRU: `serving.repeats` repeats of every setting in one seeded
    random order, each after an untimed warm-up. The prior reads the engine's own cache (`EngineCache`), with the
    same Δ as in simulation (measured on validation text). `models` and `deltas`: the primary seed's, by run name."""
    from ..cache_prior import EngineCache
    from ..serving import write_store

    sc = cfg.serving
    info = moe.describe(models["lora_control"])
    task = data.entry_task("test").select(range(sc.requests))
    requests = [tokenizer(p, return_tensors="pt")["input_ids"] for p in task["prompt"]]
    kwargs = serving._generate_kwargs(tokenizer, sc.new_tokens, cfg.ecr.repetition_penalty)
    warmup = (requests[0][:, :sc.warmup_tokens], sc.warmup_tokens)
    store_dir = cfg.artifacts_dir / "expert_stores" / NOTEBOOK
    store_dir.mkdir(parents=True, exist_ok=True)
    speeds, stores, references = {}, {}, {}
    for run in {run for run, _ in STACKS.values()}:
        references[run], result = serving.in_memory(models[run], requests, kwargs)
        speeds[run] = result["decode_tokens_per_s"]
        stores[run] = write_store(models[run], store_dir / f"{run}.safetensors")
    sizes = costmodel.from_describe(info)
    bandwidth = sc.throttle_gbps or serving.scaled_bandwidth(sizes, 1 / float(np.median(list(speeds.values()))),
                                                            cfg.cache.bits_per_param)
    benches = {run: serving.EngineBench(models[run], stores[run], "throttled", bandwidth) for run in stores}
    settings = [(method, share) for method in STACKS for share in (0.25, 0.5)]
    rows = []
    for position, (index, repeat) in enumerate(serving.run_order(len(settings), sc.repeats, cfg.seed)):
        method, share = settings[index]
        run, prior = STACKS[method]
        bench = benches[run]
        with cache_prior(bench.model, EngineCache(bench.engine), chosen[method] if prior else 0.0,
                         deltas[run] if prior else None):
            result = bench.run(requests, references[run], kwargs, warmup,
                               capacity=capacity(share, len(info.layers), info.n_experts),
                               policy="lru", mode="disaggregated", tier="throttled", bandwidth_gbps=bandwidth)
        rows.append({"method": method, "share": share, "lam": chosen[method] if prior else 0.0, "repeat": repeat,
                     "order": position, "io_gbps": bandwidth, "in_memory_tokens_per_s": speeds[run], **result})
    for bench in benches.values():
        bench.close()
    return pd.DataFrame(rows).sort_values(["method", "share", "repeat"], ignore_index=True)


def choose_lambdas(sweep: pd.DataFrame, alone: pd.DataFrame) -> dict[str, float]:
    """Per prior method, the largest λ whose seed-mean validation perplexity is within PRIOR_PPL_BUDGET of its
    reference's (`PRIOR_BUDGET_OF`: its model alone, or the control for the light stack; seed means; the smallest
    λ when none is)."""
    chosen = {}
    for method, group in sweep[sweep.method.isin(list(PRIORS))].groupby("method"):
        own = alone[(alone.method == PRIOR_BUDGET_OF[method])].groupby("seed").val_ppl.first().mean()
        means = group.groupby("lam").val_ppl.mean()
        ok = means[means <= own * (1 + PRIOR_PPL_BUDGET)]
        chosen[method] = float(ok.index.max() if len(ok) else means.index.min())
    return chosen


def best_stack(sweep: pd.DataFrame, chosen: dict) -> str:
    """The stack the headline reports, chosen on validation: of STACK_METHODS at their chosen λ, the one with the
    fewest validation misses among those whose validation perplexity is within the goal's budget
    (`claims.STACK_PPL_COST`) of the control's (seed means); when none is, the one with the lowest perplexity."""
    means = sweep.groupby(["method", "lam"])[["val_ppl", "val_misses_per_token"]].mean()
    budget = means.loc[("control", 0.0), "val_ppl"] * (1 + claims.STACK_PPL_COST.bound)
    points = pd.DataFrame([means.loc[(m, chosen[m])] for m in STACK_METHODS if m in chosen],
                          index=[m for m in STACK_METHODS if m in chosen])
    within = points[points.val_ppl <= budget]
    return str(within.val_misses_per_token.idxmin() if len(within) else points.val_ppl.idxmin())


def with_changes(methods: pd.DataFrame) -> pd.DataFrame:
    """Misses and perplexity against the control of the same seed, share and policy."""
    control = methods[methods.method == "control"].set_index(["seed", "cache_share", "policy"])
    key = pd.MultiIndex.from_frame(methods[["seed", "cache_share", "policy"]])
    methods = methods.copy()
    methods["misses_vs_control"] = (methods.decode_misses_per_token.to_numpy()
                                    / control.decode_misses_per_token.reindex(key).to_numpy() - 1)
    methods["ppl_vs_control"] = methods.test_ppl.to_numpy() / control.test_ppl.reindex(key).to_numpy() - 1
    return methods


def verdicts(summary: pd.DataFrame, sweep: pd.DataFrame) -> list[str]:
    """The issue's questions, at 25% of experts cached under LRU, on test (means over seeds, 95% intervals)."""
    at = summary[(summary.cache_share == SWEEP[0]) & (summary.policy == SWEEP[1])].set_index("method")

    def show(method, col, spec="+.1%"):
        row = at.loc[method]
        return stats.format_interval((row[col], row[f"{col}_low"], row[f"{col}_high"]), spec)

    lines = []
    for method in at.index.drop("control"):
        row = at.loc[method]
        states = [target.state(row[f"{col}_low"], row[f"{col}_high"]) for target, col in
                  ((claims.STACK_MISS_CUT, "misses_vs_control"), (claims.STACK_PPL_COST, "ppl_vs_control"))]
        lines.append(f"{method}: decode misses per token {show(method, 'misses_vs_control')} vs the control "
                     f"({row.decode_misses_per_token:.2f} vs {at.loc['control', 'decode_misses_per_token']:.2f}), "
                     f"test perplexity {show(method, 'ppl_vs_control')}; the stack goal (misses -50%: {states[0]}, "
                     f"perplexity <= +1%: {states[1]})")
    return lines


def figures(cfg: StudyConfig, results: dict) -> None:
    out = cfg.results_dir(NOTEBOOK)
    save_figure(plots.beyond_pareto(results["methods"], results["sweep"]), out / "pareto", cfg)


compute = runs.one_result_set(NOTEBOOK, _compute, figures)
