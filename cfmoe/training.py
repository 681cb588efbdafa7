"""A transformers Trainer for MoE language models: LM loss + per-layer load balancing (+ extra terms).

    trainer = MoETrainer(model=model, args=args, train_dataset=blocks, aux_loss_coef=0.1)
    trainer.train()
"""

from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from .cache_prior import group_limited, reselect, selection_key
from .moe import describe


def _layer_logits(router_logits) -> list[torch.Tensor]:
    """Router logits per MoE layer as (tokens, n_experts), dropping dense layers' None entries."""
    return [logits.reshape(-1, logits.shape[-1]) for logits in router_logits if logits is not None]


def balance_loss(router_logits, top_k: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style load-balancing loss computed per MoE layer, then averaged over layers.

    transformers' models pool counts over all layers before the product, which lets one layer stay
    unbalanced while another compensates; balancing each layer is what the paper's premise needs.
    """
    layers = _layer_logits(router_logits)
    n_experts = layers[0].shape[-1]
    losses = [load_balancing_loss_func((logits,), n_experts, top_k, attention_mask) for logits in layers]
    return torch.stack(losses).mean()


class GlobalLoads:
    """Each MoE layer's share of top-k selections per expert, averaged over training steps (an exponential moving
    average with a horizon of `horizon` steps, bias-corrected): the "global-batch" balance of Qiu et al. (arXiv
    2501.11873), which balances experts over many batches instead of inside each one, so that a batch of a few
    documents may route most of its tokens to the experts of their topic."""

    def __init__(self, horizon: int):
        if horizon < 1:
            raise ValueError(f"balance horizon must be >= 1 step, got {horizon}")
        self.decay = 1.0 - 1.0 / horizon
        self.mean: torch.Tensor | None = None  # (layers, experts), uncorrected
        self.steps = 0

    def update(self, shares: torch.Tensor) -> torch.Tensor:
        """Add one step's (layers, experts) selection shares; returns the corrected average."""
        shares = shares.detach().float()
        self.mean = (1 - self.decay) * shares if self.mean is None else self.decay * self.mean + (1 - self.decay) * shares
        self.steps += 1
        return self.average()

    def average(self) -> torch.Tensor | None:
        """The bias-corrected average of the steps added so far (None before the first)."""
        return None if self.mean is None else self.mean / (1 - self.decay ** self.steps)


def global_balance_loss(router_logits, top_k: int, loads: GlobalLoads, update: bool) -> torch.Tensor:
    """The Switch balance loss of each layer with its selection shares taken from `loads` (this step's shares
    added when `update`) instead of from this batch alone; mean over layers. Uniform routing gives `top_k`, the
    same scale as `balance_loss`."""
    layers = torch.stack(_layer_logits(router_logits)).float()  # (layers, tokens, experts)
    n_experts = layers.shape[-1]
    probs = layers.softmax(-1)
    selected = torch.nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, n_experts).sum(-2).float()
    shares = selected.mean(1)  # (layers, experts): selections per token, summing to top_k
    if update:
        shares = loads.update(shares)
    elif loads.mean is not None:
        shares = loads.average()
    return n_experts * (shares * probs.mean(1)).sum(-1).mean()


class BiasBalance(TrainerCallback):
    """Auxiliary-loss-free load balancing (Wang et al., arXiv 2408.15664; DeepSeek-V3): every MoE layer picks its
    top-k experts by the router's key plus a per-expert bias that no gradient reaches, and after each optimiser step
    an expert's bias rises by `rate` if it took fewer than the mean number of that step's training selections in its
    layer and falls by `rate` if it took more. The gate weights stay the router's own scores of the chosen experts
    (`cache_prior.reselect`); a group-limited router (DeepSeek-V3) limits the biased choice as it limits its own.
    The bias lives in router hooks, not in the weights (Qwen2-MoE has no slot for it): held-out routing measured
    during training includes it, a saved model does not, so this serves pre-training probes."""

    def __init__(self, model: torch.nn.Module, rate: float):
        if not rate > 0:
            raise ValueError(f"bias balance rate must be > 0, got {rate!r}")
        info = describe(model)
        self.rate = rate
        device = next(model.parameters()).device
        self.bias = torch.zeros(len(info.layers), info.n_experts, device=device)
        self.counts = torch.zeros_like(self.bias)
        self.handles = [layer.router.register_forward_hook(
            lambda module, args, output, i=i, layer=layer: self._choose(i, layer, module, output))
            for i, layer in enumerate(info.layers)]

    def _choose(self, i: int, layer, module: torch.nn.Module, output):
        key, scores = selection_key(layer, output[0])
        chosen = group_limited(layer.router, key.detach() + self.bias[i]).topk(output[2].shape[-1], dim=-1).indices
        if module.training:
            self.counts[i] += torch.bincount(chosen.reshape(-1), minlength=self.bias.shape[1])
        return reselect(layer, output, chosen, scores)

    def on_step_end(self, args, state, control, **kwargs):
        self.bias += self.rate * torch.sign(self.counts.mean(-1, keepdim=True) - self.counts)
        self.counts.zero_()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """Mean next-token cross-entropy, ignoring padded positions and -100 labels."""
    labels = labels.clone()
    if attention_mask is not None:
        labels[attention_mask == 0] = -100
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )


class MoETrainer(Trainer):
    """Trainer whose loss is LM loss + aux_loss_coef·balance (+ the `extra_losses` terms), each logged."""

    def __init__(self, *args, aux_loss_coef: float = 0.0, top_k: int, extra_losses=None, balance_horizon: int = 0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.aux_loss_coef = aux_loss_coef
        # 0: balance each batch (`balance_loss`); > 0: balance over about this many steps (`global_balance_loss`)
        self.loads = GlobalLoads(balance_horizon) if balance_horizon else None
        self.top_k = top_k
        # name -> (weight, fn(router_logits, batch) -> scalar tensor)
        self.extra_losses = dict(extra_losses or {})
        self._term_sums: dict[str, float] = {}
        self._term_count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = dict(inputs)
        document_ids = batch.pop("document_ids", None)
        labels = batch.pop("labels", batch["input_ids"])
        # no labels to the model: its own loss would add the pooled aux loss; we add the per-layer one
        outputs = model(**batch, output_router_logits=True)
        lm_loss = causal_lm_loss(outputs.logits, labels, batch.get("attention_mask"))
        terms = {"lm_loss": lm_loss}
        loss = lm_loss
        if self.aux_loss_coef:
            terms["balance_loss"] = (
                balance_loss(outputs.router_logits, self.top_k, batch.get("attention_mask")) if self.loads is None
                else global_balance_loss(outputs.router_logits, self.top_k, self.loads, update=model.training))
            loss = loss + self.aux_loss_coef * terms["balance_loss"]
        for name, (weight, fn) in self.extra_losses.items():
            terms[name] = fn(outputs.router_logits, {**batch, "document_ids": document_ids})
            loss = loss + weight * terms[name]
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss at step {self.state.global_step}: "
                + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
            )
        if model.training:
            for name, value in terms.items():
                self._term_sums[name] = self._term_sums.get(name, 0.0) + float(value.detach())
            self._term_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self._term_count and "loss" in logs:
            logs.update({k: round(v / self._term_count, 6) for k, v in self._term_sums.items()})
            self._term_sums, self._term_count = {}, 0
        super().log(logs, *args, **kwargs)
