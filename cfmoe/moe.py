"""The one adapter layer between cfmoe and any transformers MoE with a top-k router (peft-wrapped or not).

    info = describe(model)
    print(info.architecture, info.n_experts, info.top_k, info.layers[0].expert_bytes, info.routed_share)

An MoE block is found generically, without per-architecture code paths: a module with an `experts` child that
holds 3-D parameters of leading dimension n_experts (transformers 5.x fused experts) and a router child named
`gate` or `router`. The block calls `experts(hidden_states, top_k_indices, top_k_weights)` with the routing it
really used; the router returns `(logits, top_k_weights, top_k_indices)`.

Bytes are parameter bytes (buffers excluded) at the model's current dtypes, each shared parameter counted once.
peft adapter parameters (LoRA A/B, also on fused experts via `target_parameters`) are never part of an expert's or
a shared expert's bytes, so routed experts keep equal sizes; they are counted in `resident_bytes` and reported
on their own as `adapter_bytes` (0 once merged and unloaded).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from dataclasses import dataclass, field, fields

import torch
from torch import nn

SUPPORTED_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")
ROUTER_NAMES = ("gate", "router")


@dataclass(frozen=True)
class MoELayerInfo:
    """One MoE block: where it sits, its modules, and the sizes the cache cost model needs."""

    index: int
    decoder_layer: int
    name: str
    n_experts: int
    top_k: int
    scoring: str  # "softmax" or "sigmoid": how router logits become the probability vector
    expert_bytes: int
    shared_bytes: int
    indices_arg: str  # the experts forward's keyword for the top-k indices (positionally the second argument)
    block: nn.Module = field(repr=False, compare=False)
    router: nn.Module = field(repr=False, compare=False)
    experts: nn.Module = field(repr=False, compare=False)


@dataclass(frozen=True)
class MoEModelInfo:
    """Every MoE block of a model plus its byte split into routed experts and everything resident."""

    architecture: str
    layers: tuple[MoELayerInfo, ...]
    n_experts: int
    top_k: int
    routed_expert_bytes: int
    resident_bytes: int
    adapter_bytes: int
    total_bytes: int
    routed_share: float  # routed / total: the ceiling on memory saved by caching experts

    def to_dict(self) -> dict:
        """A JSON-ready summary (modules left out), e.g. for provenance sidecars."""
        summary = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "layers"}
        summary["layers"] = [{f.name: getattr(layer, f.name) for f in fields(layer) if f.compare}
                             for layer in self.layers]
        return summary


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def experts_implementation(model: nn.Module, name: str | None):
    """Within the block the fused experts run transformers' implementation `name` ("eager", "grouped_mm",
    "batched_mm"; None leaves it as it is), and the model's own is restored after. The implementations compute the
    same function (float rounding aside); their speed differs by device and batch shape
    (`scripts/gpu_speed.py`). A model without the switch runs as it is."""
    base = unwrap(model)
    before = getattr(getattr(base, "config", None), "_experts_implementation", None)
    if name is None or before is None or not hasattr(base, "set_experts_implementation"):
        yield
        return
    base.set_experts_implementation(name)
    try:
        yield
    finally:
        base.set_experts_implementation(before)


def _base(module: nn.Module) -> nn.Module:
    """The module inside any chain of peft wrappers (ParamWrapper nests one per targeted parameter)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _adapter_params(model: nn.Module) -> dict[int, nn.Parameter]:
    """peft adapter parameters by id: those held in a tuner layer's adapter dicts (lora_A, lora_B, ...)."""
    found = {}
    for module in model.modules():
        for attr in getattr(module, "adapter_layer_names", ()):
            for param in getattr(module, attr).parameters():
                found[id(param)] = param
    return found


def _indices_arg(experts: nn.Module) -> str:
    """Name of the experts forward's second parameter (`top_k_index`; `router_indices` in GPT-OSS)."""
    params = list(inspect.signature(type(experts).forward).parameters)
    return params[2]  # self, hidden_states, indices


def _layer(index: int, name: str, block: nn.Module, config, adapters: dict[int, nn.Parameter]) -> MoELayerInfo:
    router = _base(next(getattr(block, n) for n in ROUTER_NAMES if hasattr(block, n)))
    experts = _base(block.experts)
    n_experts = (getattr(router, "num_experts", None) or getattr(experts, "num_experts", None)
                 or next(p.shape[0] for p in experts.parameters() if p.dim() == 3))
    top_k = getattr(router, "top_k", None) or getattr(block, "top_k", None) or config.num_experts_per_tok
    routed = [p for p in experts.parameters() if p.shape[:1] == (n_experts,)]
    inner = {id(p) for p in (*routed, *router.parameters())} | set(adapters)
    shared = [p for p in block.parameters() if id(p) not in inner]
    sigmoid = hasattr(router, "e_score_correction_bias") or getattr(config, "scoring_func", None) == "sigmoid"
    decoder_layer = next((int(part) for part in reversed(name.split(".")) if part.isdigit()), index)
    return MoELayerInfo(index=index, decoder_layer=decoder_layer, name=name, n_experts=int(n_experts),
                        top_k=int(top_k), scoring="sigmoid" if sigmoid else "softmax",
                        expert_bytes=_nbytes(routed) // n_experts, shared_bytes=_nbytes(shared),
                        indices_arg=_indices_arg(experts), block=block, router=router, experts=experts)


def _is_moe_block(module: nn.Module) -> bool:
    experts = getattr(module, "experts", None)
    return (isinstance(experts, nn.Module) and any(hasattr(module, n) for n in ROUTER_NAMES)
            and any(p.dim() == 3 for p in _base(experts).parameters(recurse=False)))


def describe(model: nn.Module) -> MoEModelInfo:
    """Find every MoE block of a (possibly peft-wrapped) transformers model and split its bytes."""
    base = unwrap(model)
    adapters = _adapter_params(base)
    blocks = [(name, module) for name, module in base.named_modules() if _is_moe_block(module)]
    if not blocks:
        raise ValueError(f"{type(base).__name__} has no MoE layer with a top-k router; "
                         f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")
    layers = tuple(_layer(i, name, block, base.config, adapters) for i, (name, block) in enumerate(blocks))
    for attr in ("n_experts", "top_k"):
        values = sorted({getattr(layer, attr) for layer in layers})
        if len(values) > 1:
            raise ValueError(f"{type(base).__name__} has MoE layers with different {attr} {values}; "
                             "only a uniform value is supported")
    total = _nbytes(base.parameters())
    routed = sum(layer.n_experts * layer.expert_bytes for layer in layers)
    return MoEModelInfo(architecture=base.config.model_type, layers=layers, n_experts=layers[0].n_experts,
                        top_k=layers[0].top_k, routed_expert_bytes=routed, resident_bytes=total - routed,
                        adapter_bytes=_nbytes(adapters.values()), total_bytes=total, routed_share=routed / total)


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the name, dtype, shape and bytes of every tensor of the model's state dict (experts included):
    what keys its routing traces and vouches for its expert store."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no extra copy
    return digest.hexdigest()
