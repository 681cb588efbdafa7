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
    """LM loss, load-balancing loss and held-out loss against the training step."""
    fig, (ax_lm, ax_bal) = plt.subplots(1, 2, figsize=(10, 3.6))
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


def routing_ceiling(per_layer: pd.DataFrame, lru: pd.DataFrame, reuse: pd.DataFrame) -> plt.Figure:
    """Per-layer ECR against k/E, measured LRU hit rate against the i.i.d. curve, and reuse distances."""
    fig, (ax_ecr, ax_lru, ax_reuse) = plt.subplots(1, 3, figsize=(14, 3.8))
    sns.barplot(data=per_layer, x="moe_layer", y="ecr", ax=ax_ecr, color="C0")
    ax_ecr.axhline(per_layer.iid_ecr.iloc[0], ls="--", color="C3", label="i.i.d. balanced (k/E)")
    ax_ecr.set(xlabel="MoE layer", ylabel="ECR", title="expert consistency rate")
    ax_ecr.legend(loc="lower right")
    sns.lineplot(data=lru, x="capacity_per_layer", y="measured_lru_hit_rate", ax=ax_lru, marker="o", label="measured")
    sns.lineplot(data=lru, x="capacity_per_layer", y="iid_lru_hit_rate", ax=ax_lru, ls="--", label="i.i.d. routing")
    ax_lru.set(xlabel="LRU capacity (experts per layer)", ylabel="hit rate", title="per-layer LRU cache")
    sns.lineplot(data=reuse, x="distance", y="share_of_reuses", hue="moe_layer", ax=ax_reuse, palette="viridis")
    ax_reuse.set(xscale="log", xlabel="reuse distance (tokens)", ylabel="share of reuses", title="reuse distance")
    fig.tight_layout()
    return fig


def pareto(sweep: pd.DataFrame, k_over_e: float) -> plt.Figure:
    """Test ECR against test perplexity for every locality loss and weight; the control and choice marked."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    runs = sweep[~sweep.run.isin(["base", "control"])]
    sns.scatterplot(data=runs, x="test_ppl", y="test_ecr", hue="kind", size="weight", sizes=(40, 200), ax=ax)
    for name, marker in (("base", "s"), ("control", "D")):
        row = sweep[sweep.run == name]
        ax.scatter(row.test_ppl, row.test_ecr, marker=marker, color="black", s=60, label=name, zorder=3)
    chosen = sweep[sweep.chosen]
    ax.scatter(chosen.test_ppl, chosen.test_ecr, marker="*", s=400, facecolor="none", edgecolor="C3", lw=1.5,
               label="chosen", zorder=4)
    ax.axhline(k_over_e, ls=":", color="grey", label="k/E")
    ax.set(xlabel="test perplexity (lower is better)", ylabel="test ECR (higher is better)",
           title="router design: locality loss x weight")
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


def hit_rate_curves(curves: pd.DataFrame) -> plt.Figure:
    """Decode hit rate against the share of routed experts cached, per policy (hue) and model (column)."""
    grid = sns.relplot(data=curves, x="cached_share", y="hit_rate", hue="policy", col="run", row="scope",
                       kind="line", marker="o", markersize=3, height=3, aspect=1.05,
                       facet_kws={"margin_titles": True})
    grid.set_axis_labels("share of routed experts cached", "decode hit rate")
    grid.figure.suptitle("expert-cache hit rate by policy (rows: one global pool / per-layer pools)", y=1.03)
    return grid.figure


def serving_modes(serving: pd.DataFrame) -> plt.Figure:
    """Decode hit rate under unified, disaggregated and warm prefill, per model, policy and batch width."""
    data = serving.assign(setting=serving.policy + ", batch " + serving.batch.astype(str))
    grid = sns.relplot(data=data, x="cached_share", y="decode_hit_rate", hue="mode", style="mode", col="run",
                       row="setting", kind="line", marker="o", height=2.6, aspect=1.15,
                       facet_kws={"margin_titles": True})
    grid.set_axis_labels("share of routed experts cached", "decode hit rate")
    grid.figure.suptitle("prefill through the decode cache (unified) or a staging buffer (disaggregated)", y=1.02)
    return grid.figure


def memory_throughput(throughput: pd.DataFrame, saved: pd.DataFrame) -> plt.Figure:
    """The paper's figure: decode tokens/s against fast memory, control vs CFMoE, per device and policy."""
    data = throughput[(throughput.scope == "global") & throughput.run.isin(["lora_control", "cfmoe"])]
    data = data[data.policy.isin(["lru", "lopt", "opt"])]
    grid = sns.relplot(data=data, x="memory_gb", y="tokens_per_s", hue="run", style="policy", col="device",
                       kind="line", height=3.6, aspect=1.2, facet_kws={"sharey": False})
    for ax, device in zip(grid.axes.flat, grid.col_names):
        for _, row in saved[(saved.device == device) & (saved.policy == "lru")].iterrows():
            ax.annotate("", xy=(row.memory_cfmoe_gb, row.tokens_per_s), xytext=(row.memory_base_gb, row.tokens_per_s),
                        arrowprops={"arrowstyle": "->", "color": "C3"})
    grid.set_axis_labels("fast memory (GB)", "decode tokens/s (cost model)")
    grid.figure.suptitle(f"memory at equal throughput, {data.sizes.iloc[0]} (arrows: LRU, memory saved)", y=1.03)
    return grid.figure


def ecr_distributions(samples: pd.DataFrame, k_over_e: float) -> plt.Figure:
    """Per-sample decode ECR, GDS and LAL of generated text, per model and decoding."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, column, label in zip(axes, ("decode_ecr", "decode_gds", "decode_lal"), ("ECR", "GDS", "LAL")):
        sns.boxplot(data=samples, x="run", y=column, hue="decoding", ax=ax, fliersize=2)
        sns.stripplot(data=samples, x="run", y=column, hue="decoding", dodge=True, ax=ax, size=2.5,
                      palette=dict.fromkeys(samples.decoding.unique(), "black"), legend=False)
        ax.set(xlabel="", ylabel=f"{label} of generated tokens", title=f"{label} per sample")
        ax.tick_params(axis="x", rotation=20)
    axes[0].axhline(k_over_e, ls="--", color="grey", label="k/E")
    axes[0].legend(fontsize="small")
    for ax in axes[1:]:
        ax.get_legend().remove()
    fig.tight_layout()
    return fig


def per_layer_heatmaps(per_layer: pd.DataFrame) -> plt.Figure:
    """Decode ECR per sample (rows) and MoE layer (columns), one heatmap per model; sampled decoding."""
    data = per_layer[per_layer.decoding == "sampled"]
    runs = list(dict.fromkeys(data.run))
    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs) + 1, 4.5), sharey=True)
    vmax = float(np.nanmax(data.ecr))
    for i, (ax, run) in enumerate(zip(np.atleast_1d(axes), runs)):
        grid = data[data.run == run].pivot(index="entry", columns="moe_layer", values="ecr")
        sns.heatmap(grid, ax=ax, vmin=0, vmax=vmax, cmap="viridis", cbar=i == len(runs) - 1,
                    cbar_kws={"label": "decode ECR"})
        ax.set(title=run, xlabel="MoE layer", ylabel="entry" if i == 0 else "")
    fig.suptitle("per-layer ECR of generated text (sampled decoding)")
    fig.tight_layout()
    return fig


def measured_throughput(measured: pd.DataFrame) -> plt.Figure:
    """Measured decode tokens/s against fast memory per model, slow tier (rows) and prefill mode (columns)."""
    engine = measured[(measured.tier != "in_memory") & (measured.policy == "lru")]
    grid = sns.relplot(data=engine, x="memory_gb", y="decode_tokens_per_s", hue="run", row="tier", col="mode",
                       kind="line", marker="o", height=2.8, aspect=1.2, facet_kws={"sharey": "row", "margin_titles": True})
    for (tier, _), ax in grid.axes_dict.items():
        for i, r in enumerate(measured[measured.tier == "in_memory"].itertuples()):
            ax.axhline(r.decode_tokens_per_s, ls=":", lw=1, color=f"C{i}")
    grid.set_axis_labels("fast memory (GB): resident + slot pool", "decode tokens/s (measured)")
    grid.figure.suptitle("offloading engine, LRU (dotted: the model fully in memory)", y=1.02)
    return grid.figure


def predicted_vs_measured(prediction: pd.DataFrame) -> plt.Figure:
    """Cost-model tokens/s against measured, the authors' memory-bound model and the calibrated one."""
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
    grid.set_axis_labels("measured decode tokens/s",
                         f"predicted decode tokens/s (band: ±{claims.COST_MODEL_ERROR.bound:.0%})")
    return grid.figure
