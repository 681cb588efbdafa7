"""The study's one plot style and its figures; every function reads tables and returns a Figure.

    from cfmoe.present import plots
    fig = plots.training_curve(pd.read_csv("results/00_base_model/training_log.csv"))
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: papermill, CI and the GPU machine have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .. import claims  # noqa: E402

STYLE = {"context": "notebook", "style": "whitegrid", "palette": "colorblind"}
plt.rcParams["svg.hashsalt"] = "cfmoe"  # stable SVG ids, so re-runs give identical files
sns.set_theme(**STYLE)


def training_curve(log: pd.DataFrame, top_k: int) -> plt.Figure:
    """LM loss, load-balancing loss and held-out loss against the training step; held-out routing locality
    (ECR / (k/E)) and balance (busiest expert / uniform) when the log has them."""
    routing = "heldout_ecr_over_k_e" in log
    fig, axes = plt.subplots(1, 3 if routing else 2, figsize=(15 if routing else 10, 3.6))
    ax_lm, ax_bal = axes[:2]
    train = log.dropna(subset=["lm_loss"])
    sns.lineplot(data=train, x="step", y="lm_loss", ax=ax_lm, label="train LM loss")
    if "eval_loss" in log:
        held = log.dropna(subset=["eval_loss"])
        sns.lineplot(data=held, x="step", y="eval_loss", ax=ax_lm, marker="o", label="held-out loss")
    ax_lm.set(ylabel="cross-entropy (nats/token)", title="language modelling")
    if "balance_loss" in train:
        sns.lineplot(data=train, x="step", y="balance_loss", ax=ax_bal, color="C2")
        # Switch-style loss: E * sum_i f_i P_i with f summing to k, so perfect balance gives k
        ax_bal.axhline(top_k, ls="--", color="grey", lw=1, label=f"perfect balance ({top_k})")
        ax_bal.legend()
    ax_bal.set(ylabel="per-layer balance loss", title="load balancing")
    if routing:
        held = log.dropna(subset=["heldout_ecr_over_k_e"])
        sns.lineplot(data=held, x="step", y="heldout_ecr_over_k_e", ax=axes[2], marker="o", label="ECR / (k/E)")
        sns.lineplot(data=held, x="step", y="heldout_max_load_ratio", ax=axes[2], marker="s",
                     label="busiest expert / uniform")
        axes[2].set(ylabel="ratio", title="held-out routing: locality and balance")
    fig.tight_layout()
    return fig


def standin_profile(per_layer: pd.DataFrame, real_profile: pd.DataFrame | None = None) -> plt.Figure:
    """Per-layer ECR / (k/E) of our base model against relative depth, beside real DeepSeek-V2-Lite routing's
    whole profile (`real_profile`: `moe_layer`, `ecr_over_k_e`, measured from its released routing) or, without
    it, its first, peak and last layer (`claims.REAL_ROUTING`: points, not a curve)."""
    from .. import claims

    real = claims.REAL_ROUTING
    real_k_over_e = real["ecr"] / real["ecr_over_k_over_e"]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    depth = per_layer.moe_layer / max(1, per_layer.moe_layer.max())
    ax.plot(depth, per_layer.ecr_over_k_e, marker="o", label="ours (teacher-forced test)")
    if real_profile is not None:
        ax.plot(real_profile.moe_layer / max(1, real_profile.moe_layer.max()), real_profile.ecr_over_k_e,
                color="C3", marker="D", ms=3, label=f"{real['model']} (released routing, chat prompts)")
    else:
        ax.scatter([0, 0.5, 1], [real["first_layer_ecr"] / real_k_over_e, real["peak_layer_ecr"] / real_k_over_e,
                                 real["last_layer_ecr"] / real_k_over_e], color="C3", marker="D", zorder=3,
                   label=f"{real['model']} (first, peak, last; reported)")
    ax.axhline(real["ecr_over_k_over_e"], ls=":", color="C3", lw=1, label=f"{real['model']} pooled")
    ax.axhline(1.0, ls="--", color="grey", lw=1, label="i.i.d. routing")
    ax.set(xlabel="relative depth of the MoE layer", ylabel="ECR / (k/E)", title="routing locality per layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def expert_load(load: np.ndarray, top_k: int) -> plt.Figure:
    """Per-layer share of tokens per expert (experts sorted by load), against the uniform share k/E."""
    n_layers, n_experts = load.shape
    uniform = top_k / n_experts
    fig, (ax_heat, ax_max) = plt.subplots(1, 2, figsize=(11, 0.5 * n_layers + 2.2),
                                          gridspec_kw={"width_ratios": [3, 1]})
    sns.heatmap(np.sort(load, axis=1)[:, ::-1] / uniform, ax=ax_heat, cmap="viridis", vmin=0,
                cbar_kws={"label": "load / uniform share"})
    ax_heat.set(xlabel="experts, busiest first", ylabel="MoE layer", title="expert load per layer", xticks=[])
    ratio = load.max(axis=1) / uniform
    sns.barplot(x=ratio, y=[str(i) for i in range(n_layers)], ax=ax_max, color="C0", orient="h")
    ax_max.axvline(3.0, ls="--", color="C3", lw=1, label="3x uniform")
    ax_max.set(xlabel="busiest expert / uniform", ylabel="", title="max load")
    ax_max.legend(loc="lower right")
    fig.tight_layout()
    return fig


def routing_ceiling(per_layer: pd.DataFrame, lru: pd.DataFrame, reuse: pd.DataFrame,
                    real_lru: pd.DataFrame | None = None) -> plt.Figure:
    """Per-layer ECR against k/E, measured LRU hit rate against the i.i.d. curve (and, given `real_lru`, real
    DeepSeek-V2-Lite routing's, measured the same way from its released routing), and reuse distances."""
    fig, (ax_ecr, ax_lru, ax_reuse) = plt.subplots(1, 3, figsize=(14, 3.8))
    sns.barplot(data=per_layer, x="moe_layer", y="ecr", ax=ax_ecr, color="C0")
    ax_ecr.axhline(per_layer.iid_ecr.iloc[0], ls="--", color="C3", label="i.i.d. balanced (k/E)")
    ax_ecr.set(xlabel="MoE layer", ylabel="ECR", title="expert consistency rate")
    ax_ecr.legend(loc="lower right")
    sns.lineplot(data=lru, x="capacity_per_layer", y="measured_lru_hit_rate", ax=ax_lru, marker="o", label="measured")
    sns.lineplot(data=lru, x="capacity_per_layer", y="iid_lru_hit_rate", ax=ax_lru, ls="--", label="i.i.d. routing")
    if real_lru is not None:
        sns.lineplot(data=real_lru, x="capacity_per_layer", y="measured_lru_hit_rate", ax=ax_lru, marker="D", ms=4,
                     color="C3", label="DeepSeek-V2-Lite (released routing)")
    ax_lru.set(xlabel="LRU capacity (experts per layer)", ylabel="hit rate", title="per-layer LRU cache")
    sns.lineplot(data=reuse, x="distance", y="share_of_reuses", hue="moe_layer", ax=ax_reuse, palette="viridis")
    ax_reuse.set(xscale="log", xlabel="reuse distance (tokens)", ylabel="share of reuses", title="reuse distance")
    fig.tight_layout()
    return fig


def pareto(means: pd.DataFrame, choice: dict, k_over_e: float) -> plt.Figure:
    """Validation ECR against the validation perplexity change over the control, per locality loss: seed means
    (Student-t bars where several seeds ran; labels are weights), the budget line, each loss's ECR interpolated at
    the budget (open circles), the control, the base model and the choice (star)."""
    fig, ax = plt.subplots(figsize=(8.5, 5))
    budget = 100 * choice["max_ppl_increase"]
    runs = means[~means.run.isin(["base", "control"])]
    colors = dict(zip(dict.fromkeys(runs.kind), sns.color_palette(n_colors=max(1, runs.kind.nunique()))))

    def bars(rows, color, marker, label, size=5, zorder=2):
        x, y = 100 * rows.ppl_vs_control, rows.val_ecr
        ax.plot(x, y, marker=marker, ls="-" if len(rows) > 1 else "none", color=color, ms=size, label=label,
                zorder=zorder)
        several = rows[rows.n > 1]
        if len(several):
            ax.errorbar(100 * several.ppl_vs_control, several.val_ecr, fmt="none", ecolor=color, capsize=2, lw=1,
                        xerr=[100 * (several.ppl_vs_control - several.ppl_vs_control_low),
                              100 * (several.ppl_vs_control_high - several.ppl_vs_control)],
                        yerr=[several.val_ecr - several.val_ecr_low, several.val_ecr_high - several.val_ecr],
                        zorder=zorder)

    for kind, color in colors.items():
        rows = runs[runs.kind == kind].sort_values("weight")
        bars(rows, color, "o", kind)
        for r in rows.itertuples():
            ax.annotate(f"{r.weight:g}", (100 * r.ppl_vs_control, r.val_ecr), xytext=(3, 3), textcoords="offset points",
                        fontsize=6, color=color)
    for row in choice.get("matched", []):
        if pd.notna(row.get("val_ecr_at_budget")) and row["kind"] in colors:
            ax.scatter(budget, row["val_ecr_at_budget"], s=90, facecolor="none", edgecolor=colors[row["kind"]], lw=1.5,
                       zorder=3)
    for name, marker in (("control", "D"), ("base", "s")):
        bars(means[means.run == name], "black", marker, name, size=6, zorder=3)
    ax.scatter(100 * choice["ppl_vs_control"], choice["val_ecr"], marker="*", s=400, facecolor="none", edgecolor="C3",
               lw=1.5, label=f"chosen: {choice['kind']} @ {choice['weight']:.3g}", zorder=4)
    ax.axvline(budget, ls="--", color="C3", lw=1, label=f"budget (+{budget:g}% vs control)")
    ax.axhline(k_over_e, ls=":", color="grey", label="k/E")
    ax.set_xscale("symlog", linthresh=budget or 1)  # linear up to the budget, logarithmic beyond
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:+g}" if v else "0"))
    points = pd.concat([means.val_ecr, pd.Series([choice["val_ecr"], k_over_e])])
    pad = 0.1 * (points.max() - points.min()) or 0.05
    ax.set_ylim(points.min() - pad, points.max() + pad)  # t-interval bars of 2 seeds can be far wider: clipped
    ax.set(xlabel="validation perplexity vs control (%; linear to the budget, log beyond)",
           ylabel="validation ECR (higher is better)",
           title="router design: locality loss x weight\n(seed means, 95% t-intervals; open circles: ECR at the budget)")
    ax.legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize="small")
    fig.tight_layout()
    return fig


def per_layer_ecr(per_layer: pd.DataFrame, k_over_e: float) -> plt.Figure:
    """Test ECR per MoE layer for every fine-tuning run, against k/E."""
    fig, ax = plt.subplots(figsize=(9, 3.8))
    sns.barplot(data=per_layer, x="moe_layer", y="ecr", hue="run", ax=ax)
    ax.axhline(k_over_e, ls="--", color="grey", label="k/E")
    ax.set(xlabel="MoE layer", ylabel="test ECR", title="expert consistency rate per layer")
    ax.legend(bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return fig


def finetune_curves(log: pd.DataFrame) -> plt.Figure:
    """LM loss and locality loss against the fine-tuning step, per run."""
    fig, (ax_lm, ax_loc) = plt.subplots(1, 2, figsize=(11, 3.6))
    sns.lineplot(data=log, x="step", y="lm_loss", hue="run", ax=ax_lm)
    ax_lm.set(ylabel="LM loss (nats/token)", title="language modelling")
    if "locality_loss" in log:
        sns.lineplot(data=log.dropna(subset=["locality_loss"]), x="step", y="locality_loss", hue="run", ax=ax_loc)
    ax_loc.set(ylabel="locality loss", title="locality loss (runs that use it)")
    fig.tight_layout()
    return fig


def _named(table: pd.DataFrame, policy_names: dict | None) -> pd.DataFrame:
    """`table` with its policies as readers see them (`policy_names`, e.g. OPT and LOPT named as oracles)."""
    if not policy_names:
        return table
    return table.assign(policy=table.policy.map(lambda p: policy_names.get(p, p)))


def hit_rate_curves(curves: pd.DataFrame, policy_names: dict | None = None) -> plt.Figure:
    """Decode hit rate against the share of routed experts cached, per policy (hue) and model (column)."""
    grid = sns.relplot(data=_named(curves, policy_names), x="cached_share", y="hit_rate", hue="policy", col="run",
                       row="scope", kind="line", marker="o", markersize=3, height=3, aspect=1.05,
                       facet_kws={"margin_titles": True})
    grid.set_axis_labels("share of routed experts cached", "decode hit rate")
    grid.figure.suptitle("expert-cache hit rate by policy (rows: one global pool / per-layer pools)", y=1.03)
    return grid.figure


def serving_modes(serving: pd.DataFrame, policy_names: dict | None = None) -> plt.Figure:
    """Decode hit rate under unified, disaggregated and warm prefill, per model, policy and batch width."""
    serving = _named(serving, policy_names)
    data = serving.assign(setting=serving.policy + ", batch " + serving.batch.astype(str))
    grid = sns.relplot(data=data, x="cached_share", y="decode_hit_rate", hue="mode", style="mode", col="run",
                       row="setting", kind="line", marker="o", height=2.6, aspect=1.15,
                       facet_kws={"margin_titles": True})
    grid.set_axis_labels("share of routed experts cached", "decode hit rate")
    grid.figure.suptitle("prefill through the decode cache (unified) or a staging buffer (disaggregated)", y=1.02)
    return grid.figure


def memory_throughput(throughput: pd.DataFrame, saved: pd.DataFrame,
                      policy_names: dict | None = None) -> plt.Figure:
    """The paper's figure: decode tokens/s against fast memory, control vs CFMoE, per device and policy; the
    arrows are LRU against LRU (the same policy on both sides)."""
    data = throughput[(throughput.scope == "global") & throughput.run.isin(["lora_control", "cfmoe"])]
    data = _named(data[data.policy.isin(["lru", "lopt", "opt"])], policy_names)
    grid = sns.relplot(data=data, x="memory_gb", y="tokens_per_s", hue="run", style="policy", col="device",
                       kind="line", height=3.6, aspect=1.2, facet_kws={"sharey": False})
    for ax, device in zip(grid.axes.flat, grid.col_names):
        for _, row in saved[(saved.device == device) & (saved.policy == "lru")].iterrows():
            ax.annotate("", xy=(row.memory_cfmoe_gb, row.tokens_per_s), xytext=(row.memory_base_gb, row.tokens_per_s),
                        arrowprops={"arrowstyle": "->", "color": "C3"})
    grid.set_axis_labels("fast memory (GB)", "decode tokens/s (cost model)")
    grid.figure.suptitle(f"memory at equal throughput, {data.sizes.iloc[0]} (arrows: memory saved, CFMoE vs control, "
                         "both LRU)", y=1.03)
    return grid.figure


def ecr_distributions(samples: pd.DataFrame, k_over_e: float) -> plt.Figure:
    """Per-sample decode ECR, GDS and LAL of generated text, per model and decoding (every seed's samples)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, column, label in zip(axes, ("decode_ecr", "decode_gds", "decode_lal"), ("ECR", "GDS", "LAL")):
        sns.boxplot(data=samples, x="run", y=column, hue="decoding", ax=ax, fliersize=2)
        sns.stripplot(data=samples, x="run", y=column, hue="decoding", dodge=True, ax=ax, size=2.5,
                      palette=dict.fromkeys(samples.decoding.unique(), "black"), legend=False)
        ax.set(xlabel="", ylabel=f"{label} of generated tokens", title=f"{label} per sample (all seeds)")
        ax.tick_params(axis="x", rotation=20)
    axes[0].axhline(k_over_e, ls="--", color="grey", label="k/E")
    axes[0].legend(fontsize="small")
    for ax in axes[1:]:
        ax.get_legend().remove()
    fig.tight_layout()
    return fig


def per_layer_heatmaps(per_layer: pd.DataFrame) -> plt.Figure:
    """Decode ECR per entry (rows) and MoE layer (columns), one heatmap per model, averaged over the model's
    seeds; sampled decoding."""
    data = per_layer[per_layer.decoding == "sampled"]
    runs = list(dict.fromkeys(data.run))
    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs) + 1, 4.5), sharey=True)
    vmax = float(np.nanmax(data.ecr))
    for i, (ax, run) in enumerate(zip(np.atleast_1d(axes), runs)):
        grid = data[data.run == run].pivot_table(index="entry", columns="moe_layer", values="ecr", aggfunc="mean",
                                                 dropna=False)
        sns.heatmap(grid, ax=ax, vmin=0, vmax=vmax, cmap="viridis", cbar=i == len(runs) - 1,
                    cbar_kws={"label": "decode ECR"})
        ax.set(title=run, xlabel="MoE layer", ylabel="entry" if i == 0 else "")
    fig.suptitle("per-layer ECR of generated text (sampled decoding; mean over each model's seeds)")
    fig.tight_layout()
    return fig


def measured_throughput(measured: pd.DataFrame) -> plt.Figure:
    """Measured decode tokens/s against fast memory per model, slow tier (rows) and prefill mode (columns): the
    median over repeats, its interquartile range as a band (one row per (setting, repeat) in `measured`)."""
    engine = measured[(measured.tier != "in_memory") & (measured.policy == "lru")]
    resident = measured[measured.tier == "in_memory"].groupby("run", sort=False).decode_tokens_per_s.median()
    runs = list(dict.fromkeys([*resident.index, *engine.run]))
    grid = sns.relplot(data=engine, x="memory_gb", y="decode_tokens_per_s", hue="run", hue_order=runs, row="tier",
                       col="mode", kind="line", marker="o", estimator="median", errorbar=("pi", 50), height=2.8,
                       aspect=1.2, facet_kws={"sharey": "row", "margin_titles": True})
    for ax in grid.axes.flat:
        for i, run in enumerate(runs):
            if run in resident:
                ax.axhline(resident[run], ls=":", lw=1, color=f"C{i}")
    grid.set_axis_labels("fast memory (GB): resident + slot pool", "decode tokens/s (measured)")
    grid.figure.suptitle("offloading engine, LRU: median over repeats, band: interquartile range "
                         "(dotted: the model fully in memory)", y=1.02)
    return grid.figure


def predicted_vs_measured(prediction: pd.DataFrame) -> plt.Figure:
    """Cost-model tokens/s against measured (each setting's median), the authors' memory-bound model and the
    calibrated one."""
    long = prediction.melt(id_vars=["run", "tier", "measured_tokens_per_s"],
                           value_vars=["authors_model_tokens_per_s", "calibrated_tokens_per_s"],
                           var_name="model", value_name="predicted")
    grid = sns.relplot(data=long, x="measured_tokens_per_s", y="predicted", hue="run", style="tier", col="model",
                       height=3.6, facet_kws={"sharey": False})
    for ax in grid.axes.flat:
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], ls="--", color="grey")
        band = claims.COST_MODEL_ERROR.bound
        ax.fill_between([lo, hi], [(1 - band) * lo, (1 - band) * hi], [(1 + band) * lo, (1 + band) * hi],
                        color="grey", alpha=0.15)
        ax.set_yscale("log")
        ax.set_xscale("log")
    grid.set_axis_labels("measured decode tokens/s (median over repeats)",
                         f"predicted decode tokens/s (band: ±{claims.COST_MODEL_ERROR.bound:.0%})")
    return grid.figure


def beyond_pareto(methods: pd.DataFrame, sweep: pd.DataFrame) -> plt.Figure:
    """Notebook 06: decode misses per token against test perplexity per share of experts cached (seed means;
    LRU filled, LFU with aging hollow), and the validation λ sweep of the cache prior at 25% under LRU."""
    means = methods.groupby(["method", "cache_share", "policy"], as_index=False)[
        ["decode_misses_per_token", "test_ppl"]].mean()
    shares = sorted(means.cache_share.unique())
    fig, axes = plt.subplots(1, len(shares) + 1, figsize=(4.2 * (len(shares) + 1), 3.8))
    palette = dict(zip(sorted(means.method.unique()), sns.color_palette("colorblind")))
    for ax, share in zip(axes, shares):
        for (method, policy), row in means[means.cache_share == share].groupby(["method", "policy"]):
            ax.scatter(row.decode_misses_per_token, row.test_ppl, s=50, color=palette[method],
                       facecolors=palette[method] if policy == "lru" else "none",
                       label=method if policy == "lru" else None)
        ax.set(title=f"{share:.1%} of experts cached (test)", xlabel="decode misses per token",
               ylabel="test perplexity")
    axes[0].legend(fontsize=7)
    curve = sweep.groupby(["method", "lam"], as_index=False)[["val_misses_per_token", "val_ppl"]].mean()
    for method, group in curve.groupby("method"):
        axes[-1].plot(group.val_misses_per_token, group.val_ppl, "o-", color=palette.get(method), label=method)
        for _, row in group.iterrows():
            axes[-1].annotate(f"λ={row.lam:g}", (row.val_misses_per_token, row.val_ppl), fontsize=6)
    axes[-1].set(title="cache prior: λ sweep, 25%, LRU (validation)", xlabel="decode misses per token",
                 ylabel="validation perplexity")
    axes[-1].legend(fontsize=7)
    for ax in axes:
        ax.ticklabel_format(useOffset=False, style="plain", axis="y")
    fig.tight_layout()
    return fig


def paper_scale(medians: pd.DataFrame, resident: float) -> plt.Figure:
    """Notebook 05's paper-scale model, host tier under LRU: decode tokens/s by share of experts in fast memory
    per routing source (median, interquartile range as error bars; solid: the engine on the headline's experts
    implementation, `serving.paper_scale_results`, its physical limit dashed; dotted: the engine on another
    implementation (crosses) or with oracle prefetch (triangles)) and the resident model (dotted)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = medians[(medians.tier == "host") & (medians.policy == "lru")]
    colors = {source: f"C{i}" for i, source in enumerate(sorted(rows.routing_source.unique()))}
    for (source, kernel, ahead), group in rows.sort_values("share").groupby(
            ["routing_source", "experts_implementation", "prefetch"]):
        own = bool(group.headline.iloc[0]) if "headline" in group else True
        ax.errorbar(group.share, group.tokens_per_s, yerr=[group.tokens_per_s - group.tokens_per_s_q25,
                                                           group.tokens_per_s_q75 - group.tokens_per_s],
                    marker="o" if own else "^" if ahead else "x", ls="-" if own else ":", capsize=3,
                    color=colors[source],
                    label=f"{source} (engine: {kernel}{', oracle prefetch' if ahead else ''})")
        if own:
            ax.plot(group.share, group.limit_tokens_per_s, ls="--", color=colors[source], lw=1)
    ax.axhline(resident, ls=":", color="k", lw=1, label="all experts resident")
    ax.set(xlabel="share of routed experts in GPU memory", ylabel="decode tokens/s (median, IQR)",
           title="DeepSeek-MoE-16B-sized model, replayed routing, LRU (dashed: physical limit)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
