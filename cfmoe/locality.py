"""Locality-aware routing losses: penalise how far consecutive tokens' router distributions move, per MoE layer.

    loss_fn = LocalityLoss("js")
    loss = out.loss + lam * loss_fn(out.router_logits, consecutive_pair_mask(batch["attention_mask"]))

`router_logits` is what a transformers MoE returns with `output_router_logits=True`: one tensor per
MoE layer, `(batch*seq, n_experts)` flattened batch-major, or `(batch, seq, n_experts)`. The loss is
the mean over valid consecutive pairs, averaged over layers, computed in float32 (bf16 logits are fine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

LOSS_KINDS = ("l2", "skl", "js", "topk_overlap")


def consecutive_pair_mask(attention_mask: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, seq-1) bool: True where tokens t and t+1 are both real (not padding) and in the same document."""
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must have shape (batch, seq), got {tuple(attention_mask.shape)}")
    real = attention_mask.bool()
    mask = real[:, :-1] & real[:, 1:]
    if document_ids is not None:
        if document_ids.shape != attention_mask.shape:
            raise ValueError(f"document_ids must have attention_mask's shape {tuple(attention_mask.shape)}, "
                             f"got {tuple(document_ids.shape)}")
        mask &= document_ids[:, :-1] == document_ids[:, 1:]
    return mask


def _check_config(kind: str, top_k: int | None, temperature: float) -> None:
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown locality loss kind {kind!r}; valid kinds: {', '.join(LOSS_KINDS)}")
    if kind == "topk_overlap" and top_k is None:
        raise ValueError("kind='topk_overlap' needs top_k, the router's number of selected experts per token")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _soft_topk(logp: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """Soft top-k membership normalised to sum 1: sigmoid((logp − θ)/τ)/Σ with θ midway between the k-th and (k+1)-th.

    As τ → 0 it becomes uniform over the top-k set, so 1 − Σ min(u_t, u_{t+1}) tends to 1 − |S_t ∩ S_{t+1}|/k.
    """
    n_experts = logp.shape[-1]
    if not 1 <= top_k < n_experts:
        raise ValueError(f"top_k must be in 1..n_experts-1={n_experts - 1}, got {top_k}")
    top = logp.detach().topk(top_k + 1, dim=-1).values
    threshold = top[..., -2:].mean(dim=-1, keepdim=True)  # detached: the set boundary is not itself trained
    membership = torch.sigmoid((logp - threshold) / temperature)
    return membership / membership.sum(dim=-1, keepdim=True)


def _pair_divergence(logp: torch.Tensor, logq: torch.Tensor, kind: str, top_k: int | None,
                     temperature: float) -> torch.Tensor:
    """Per-pair distance (N,) between rows of log-probabilities `logp` and `logq` (N, n_experts)."""
    if kind == "topk_overlap":
        u, v = _soft_topk(logp, top_k, temperature), _soft_topk(logq, top_k, temperature)
        return 1 - torch.minimum(u, v).sum(dim=-1)
    p, q = logp.exp(), logq.exp()
    if kind == "l2":
        return (p - q).square().sum(dim=-1)
    if kind == "skl":
        return ((p - q) * (logp - logq)).sum(dim=-1)  # KL(p||q) + KL(q||p), finite for any finite logits
    logm = torch.logaddexp(logp, logq) - math.log(2)  # js
    return 0.5 * (p * (logp - logm)).sum(dim=-1) + 0.5 * (q * (logq - logm)).sum(dim=-1)


def locality_loss(router_logits: Sequence[torch.Tensor], pair_mask: torch.Tensor, kind: str = "js",
                  top_k: int | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Scalar loss: distance between consecutive tokens' router distributions, mean over valid pairs and MoE layers.

    kinds, with p, q = softmax of two consecutive tokens' router logits:
      "l2"           squared L2 distance ||p − q||² (as the authors use);
      "skl"          symmetric KL, KL(p||q) + KL(q||p);
      "js"           the true Jensen–Shannon divergence ½KL(p||m) + ½KL(q||m), m = (p+q)/2 (the authors'
                     code adds top-k indices to the probabilities before normalising, which is not one);
      "topk_overlap" ours, aimed at ECR: 1 − Σ_e min(u_t(e), u_{t+1}(e)) (the total-variation distance of
                     u_t and u_{t+1}), u = soft top-k membership sigmoid((logit − θ)/temperature) normalised
                     to sum 1, θ midway between the k-th and (k+1)-th logits (detached); it tends to
                     1 − |S_t ∩ S_{t+1}|/k as temperature → 0. Needs `top_k`; other kinds ignore it.
    A layer with no valid pair contributes 0 (and zero gradients), never NaN. Layers on several devices
    are gathered on the first one's.
    """
    _check_config(kind, top_k, temperature)
    if isinstance(router_logits, torch.Tensor) or len(router_logits) == 0:
        raise ValueError("router_logits must be a non-empty tuple with one tensor per MoE layer")
    if pair_mask.ndim != 2 or pair_mask.dtype != torch.bool:
        raise ValueError(f"pair_mask must be a bool tensor of shape (batch, seq-1), got {pair_mask.dtype} "
                         f"{tuple(pair_mask.shape)}; build it with consecutive_pair_mask")
    batch, seq = pair_mask.shape[0], pair_mask.shape[1] + 1
    device = router_logits[0].device
    mask = pair_mask.to(device)
    per_layer = []
    for layer, logits in enumerate(router_logits):
        if logits.shape[:-1] not in ((batch * seq,), (batch, seq)):
            raise ValueError(f"router_logits[{layer}] has shape {tuple(logits.shape)}; with pair_mask "
                             f"{tuple(pair_mask.shape)} expected ({batch * seq}, n_experts) or ({batch}, {seq}, n_experts)")
        logp = F.log_softmax(logits.to(device, torch.float32).reshape(batch, seq, -1), dim=-1)
        # select valid pairs before computing anything, so padding can inject neither values nor gradients
        distance = _pair_divergence(logp[:, :-1][mask], logp[:, 1:][mask], kind, top_k, temperature)
        per_layer.append(distance.sum() / max(distance.numel(), 1))
    return torch.stack(per_layer).mean()


@dataclass(frozen=True)
class LocalityLoss:
    """A configured `locality_loss`, checked once at construction; a plain callable since it has no parameters."""

    kind: str = "js"
    top_k: int | None = None
    temperature: float = 1.0  # width of the soft top-k boundary, in logit units (topk_overlap only)

    def __post_init__(self) -> None:
        _check_config(self.kind, self.top_k, self.temperature)

    def __call__(self, router_logits: Sequence[torch.Tensor], pair_mask: torch.Tensor) -> torch.Tensor:
        return locality_loss(router_logits, pair_mask, self.kind, self.top_k, self.temperature)
