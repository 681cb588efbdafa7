"""The study's one plot style and its figures; every function reads tables and returns a Figure.

    from cfmoe import plots
    fig = plots.training_curve(pd.read_csv("results/00_base_model/training_log.csv"))
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: papermill, CI and the GPU machine have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

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
