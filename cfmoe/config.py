"""The study's one frozen configuration, loaded from `params/<preset>.yaml` and validated.

    from cfmoe.config import load_config
    cfg = load_config("cpu", seed=0)      # or a path to your own YAML
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import claims

ROOT = Path(__file__).resolve().parent.parent
PARAMS_DIR = ROOT / "params"
PRESETS = ("smoke", "cpu", "gpu")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the default base model (a transformers Qwen2-MoE: softmax top-k router + shared expert)."""

    vocab_size: int = 8192
    hidden_size: int = 128
    num_layers: int = 6
    dense_layers: int = 0  # leading decoder layers with a dense MLP (DeepSeek-MoE-16B has 1)
    num_heads: int = 4
    n_experts: int = 64  # DeepSeek-MoE-16B geometry: 64 routed, top-6, so k/E = 0.094
    top_k: int = 6
    expert_width: int = 96  # routed expert intermediate size
    shared_width: int = 96  # shared expert intermediate size
    dense_width: int = 384  # dense-layer MLP width
    max_positions: int = 512


@dataclass(frozen=True)
class PretrainConfig:
    """Pre-training of the base model with the transformers Trainer."""

    block_size: int = 256
    batch_size: int = 16
    max_steps: int = 700
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    # Load-balancing weight: 0.01 left one expert at 7x the uniform share in a probe of this shape.
    aux_loss_coef: float = 0.1
    eval_every: int = 100
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0 = never stop early
    time_limit_minutes: float = 0.0  # stop after this much training (gpu preset's budget); 0 = no limit
    heldout_fraction: float = 0.02  # share of pre-training documents held out for validation loss
    max_documents: int = 0  # 0 = the whole corpus; >0 caps it (smoke runs)
    precision: str = "fp32"  # fp32 on CPU; bf16 on the GPU


@dataclass(frozen=True)
class EvalConfig:
    """Teacher-forced evaluation on the WikiText-2 test split."""

    max_test_tokens: int = 0  # 0 = the whole test split
    batch_size: int = 8


@dataclass(frozen=True)
class FinetuneConfig:
    """Locality-aware fine-tuning (CFMoE): LM loss + locality_weight·locality loss, balance weight 0."""

    steps: int = 100
    batch_size: int = 8
    block_size: int = 256
    learning_rate: float = 1e-3
    warmup_steps: int = 3
    aux_loss_coef: float = 0.0  # CFMoE sets the load-balancing weight to 0 while fine-tuning
    locality_kind: str = "js"  # used when notebook 01 has not chosen one (a model_path run without it)
    locality_weight: float = 1.0
    lora_rank: int = 8  # LoRA (peft) rank on attention and fused experts; routers train fully; 0 = full fine-tuning
    daft_threshold: float = 0.7  # DAFT: fine-tune the MoE layers whose profiled ECR is below this (the authors' value)
    daft_quantile: float = 0.5  # used instead when the threshold selects every layer (small models sit below 0.7)
    eval_tokens: int = 32768  # WikiText-2 test tokens for each run's perplexity and ECR (0 = all)


@dataclass(frozen=True)
class RouterDesignConfig:
    """Notebook 01's sweep: short fine-tunes per locality loss kind and weight (plus a weight-0 control)."""

    steps: int = 25  # each sweep run is a short version of notebook 02's fine-tuning
    kinds: tuple[str, ...] = ("l2", "skl", "js", "topk_overlap")
    weights: tuple[float, ...] = (0.3, 3.0)
    max_ppl_increase: float = claims.PPL_COST.bound  # the chosen loss: highest ECR within this of the control


@dataclass(frozen=True)
class CacheConfig:
    """Notebook 03: WikiText-2 test entries served as requests through simulated expert caches."""

    requests: int = 60  # test entries (prompt = the authors' entry prompt), in file order; 0 = all
    decode_tokens: int = 256  # article tokens per request, teacher-forced as its decode phase
    capacity_points: int = 48  # hit-rate curves: capacities at i/capacity_points of the routed experts
    serving_points: int = 12  # serving-mode comparison: a coarser grid (runs every request one by one)
    policies: tuple[str, ...] = ("lru", "lfu", "opt", "lopt", "layer_lru")
    serving_policies: tuple[str, ...] = ("lru", "lopt")
    batch_sizes: tuple[int, ...] = (1, 4)  # continuous-batching widths for the serving-mode comparison
    cached_shares: tuple[float, ...] = (0.25, 0.5, 0.75)  # throughput levels: the control at these shares
    bits_per_param: float = claims.DEEPSEEK_MOE_16B["bits_per_param"]  # paper-scale sizes (NF4, as the authors)


@dataclass(frozen=True)
class EcrConfig:
    """Notebook 04: the authors' WikiText protocol, each model generating a description of each test entry."""

    entries: int = 20  # WikiText-2 test entries (article titles), in file order; the authors used 20
    max_new_tokens: int = 128
    temperature: float = 0.2  # the authors' sampling
    top_p: float = 0.9
    repetition_penalty: float = 1.5  # kept for greedy decoding too, so only sampling differs
    batch_size: int = 20


@dataclass(frozen=True)
class ServingConfig:
    """Notebook 05: the offloading engine measured on this machine."""

    requests: int = 3  # entry prompts of the first WikiText-2 test entries, served one after another
    new_tokens: int = 32  # greedy tokens per request (no EOS stop, so runs compare like for like)
    runs: tuple[str, ...] = ("base", "lora_control", "cfmoe")
    shares: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # budgets as shares of the routed experts
    policies: tuple[str, ...] = ("lru", "lfu")  # lfu runs in disaggregated mode; every mode runs lru
    modes: tuple[str, ...] = ("unified", "disaggregated", "disaggregated_warm")
    prefetch: bool = True  # also measure LRU disaggregated with next-layer expert prefetch (on full_tier)
    tiers: tuple[str, ...] = ("direct", "throttled")
    full_tier: str = "throttled"  # every policy, mode and prefetch runs here; other tiers run LRU unified/disaggregated
    throttle_gbps: float = claims.EDGE_DEVICES["cpu"][1]  # the authors' flash; 0 = scaled to this machine
    # (`cfmoe.stages.serving.scaled_bandwidth`)
    profile_mb: float = 64  # size of the memory/file bandwidth probe


@dataclass(frozen=True)
class StudyConfig:
    """Everything a notebook needs; frozen so a run cannot change its own inputs half-way."""

    preset: str
    seed: int = 0
    threads: int = 2  # torch intra-op threads; pinned because CPU results depend on it
    device: str = "cpu"
    model_path: str = ""  # '' = the project's own base model; else a hub id or a local HF MoE checkpoint
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    router_design: RouterDesignConfig = field(default_factory=RouterDesignConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    ecr: EcrConfig = field(default_factory=EcrConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)

    @property
    def artifacts_dir(self) -> Path:
        """Build outputs (weights, traces) of this preset: git-ignored, rebuilt or cached."""
        return Path(os.environ.get("CFMOE_ARTIFACTS", ROOT / "artifacts")) / self.preset

    def results_dir(self, notebook: str) -> Path:
        """results/<notebook>/ for the default cpu preset, results/<notebook>/<preset>/ otherwise."""
        return results_root() / results_subdir(notebook, self.preset)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def results_root() -> Path:
    """Where results are written: `results/`, or $CFMOE_RESULTS."""
    return Path(os.environ.get("CFMOE_RESULTS", ROOT / "results"))


def results_subdir(notebook: str, preset: str) -> Path:
    """A notebook's results folder for a preset, relative to `results_root()`."""
    return Path(notebook) if preset == "cpu" else Path(notebook) / preset


def _check(cls, values: dict, where: str):
    """Build dataclass `cls` from `values`, rejecting unknown keys and wrong types in one line."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(values).__name__} {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        expected = hints[name]
        if dataclasses.is_dataclass(expected):
            kwargs[name] = _check(expected, value, f"{where}.{name}")
            continue
        if typing.get_origin(expected) is tuple:  # tuple[T, ...] from a YAML list
            item = typing.get_args(expected)[0]
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{where}.{name}: expected a list of {item.__name__}, got {type(value).__name__} {value!r}")
            kwargs[name] = tuple(_scalar(v, item, f"{where}.{name}") for v in value)
        else:
            kwargs[name] = _scalar(value, expected, f"{where}.{name}")
    return cls(**kwargs)


def _scalar(value, expected: type, where: str):
    """`value` as `expected` (an int is accepted for a float), else a one-line error."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def preset_path(preset: str) -> Path:
    """The YAML of a named preset, or `preset` itself when it is a path to a YAML file."""
    if preset in PRESETS:
        return PARAMS_DIR / f"{preset}.yaml"
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    raise ValueError(f"unknown preset {preset!r}; valid presets are {list(PRESETS)} or a path to a .yaml file")


def load_config(preset: str = "smoke", **overrides) -> StudyConfig:
    """Load a preset and apply notebook parameters (`seed=`, `model_path=`, ...), validating all."""
    path = preset_path(preset)
    values = yaml.safe_load(path.read_text()) or {}
    values = {**values, **{k: v for k, v in overrides.items() if v is not None}}
    cfg = _check(StudyConfig, values, path.name)
    if cfg.device not in ("cpu", "cuda"):
        raise ValueError(f"{path.name}.device: {cfg.device!r} is not valid; use 'cpu' or 'cuda'")
    return cfg
