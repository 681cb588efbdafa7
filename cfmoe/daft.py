"""Data-aware elastic fine-tuning (DAFT): profile each MoE layer's ECR offline, LoRA only the low-ECR layers.

    profile = profile_layer_ecr(lm, calibration["input_ids"], calibration["document_ids"])  # packed blocks
    tuned = lora_model(lm, select_daft_layers(profile, threshold=0.7), rank=8)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import metrics, moe, routing
from .provenance import atomic_path


@torch.no_grad()
def profile_layer_ecr(model, input_ids: np.ndarray, document_ids: np.ndarray | None = None, path=None,
                      batch_size: int = 8) -> pd.DataFrame:
    """Per-MoE-layer ECR on calibration blocks (teacher-forced, pairs inside one document and block)."""
    model.eval()
    device = next(model.parameters()).device
    with routing.record_routing(model) as recorder:
        for start in range(0, len(input_ids), batch_size):
            model(input_ids=torch.as_tensor(input_ids[start:start + batch_size], device=device))
    experts = np.concatenate([e for e, _ in recorder.calls()])
    docs = np.zeros_like(input_ids) if document_ids is None else np.asarray(document_ids)
    valid = np.concatenate([docs[:, 1:] == docs[:, :-1], np.zeros((len(docs), 1), bool)], axis=1).reshape(-1)[:-1]
    ecr = metrics.expert_consistency_rate(experts, per_layer=True, valid_pairs=valid)
    profile = pd.DataFrame({"layer": np.arange(len(ecr)), "ecr": ecr})
    if path is not None:
        with atomic_path(path) as tmp:
            profile.to_csv(tmp, index=False)
    return profile


def select_daft_layers(profile: pd.DataFrame, threshold: float | None = None,
                       quantile: float | None = None) -> list[int]:
    """MoE layers whose ECR is below `threshold` (the authors: 0.7) or below the profile's `quantile`."""
    if (threshold is None) == (quantile is None):
        raise ValueError("give exactly one of threshold (an ECR, e.g. 0.7) or quantile (in (0, 1])")
    if quantile is not None:
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        # the layers at or below the quantile: quantile 0.5 of 6 layers selects the 3 least local
        threshold = float(np.quantile(profile.ecr, quantile, method="lower"))
        return sorted(int(x) for x in profile.layer[profile.ecr <= threshold])
    return sorted(int(x) for x in profile.layer[profile.ecr < threshold])


def check_layers(layers: list[int] | None, n_layers: int) -> None:
    """Reject MoE layer indices outside 0..n_layers-1 (no negative indexing) and repeated ones; None means all."""
    if layers is None:
        return
    bad = [i for i in layers if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {n_layers} MoE layers (0-{n_layers - 1})")
    repeated = sorted({i for i in layers if list(layers).count(i) > 1})
    if repeated:
        raise ValueError(f"layers {list(layers)} repeat layer(s) {repeated}; give each MoE layer once")


def lora_targets(model, layers: list[int] | None = None) -> dict[str, list[str]]:
    """peft target names for MoE `layers` (None = all): attention projections, fused experts, the router."""
    info = moe.describe(model)
    base = moe.unwrap(model)
    names = {id(module): name for name, module in base.named_modules()}
    check_layers(layers, len(info.layers))
    chosen = info.layers if layers is None else [info.layers[i] for i in layers]
    modules, parameters, routers = [], [], []
    for layer in chosen:
        decoder = layer.name.rsplit(".", 1)[0]  # "model.layers.3.mlp" -> "model.layers.3"
        modules += [name for name, m in base.named_modules()
                    if name.startswith(decoder + ".") and "attn" in name and isinstance(m, nn.Linear)]
        experts = names[id(layer.experts)]
        parameters += [f"{experts}.{p}" for p, value in layer.experts.named_parameters(recurse=False) if value.ndim == 3]
        routers.append(names[id(layer.router)])
    return {"target_modules": modules, "target_parameters": parameters, "modules_to_save": routers}


def lora_model(model, layers: list[int] | None = None, rank: int = 8, alpha: int | None = None):
    """Wrap `model` with peft LoRA on the selected MoE layers only; their routers are fully trainable."""
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, layers)
    if not targets["target_parameters"]:
        raise ValueError(f"no MoE layer selected (layers={layers}); nothing to fine-tune")
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0, **targets)
    return get_peft_model(model, config)


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
