"""The study's one frozen configuration, loaded from `params/<preset>.yaml` and validated.

    from cfmoe.config import load_config
    cfg = load_config("cpu", seed=0)      # or a path to your own YAML
"""

from __future__ import annotations

import contextvars
import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import claims

ROOT = Path(__file__).resolve().parent.parent
PARAMS_DIR = ROOT / "params"
PRESETS = ("smoke", "cpu", "gpu")
# results folder -> the staging folder a stage is writing it through (set by cfmoe.stages.runs.one_result_set)
STAGING: contextvars.ContextVar[dict] = contextvars.ContextVar("cfmoe_results_staging", default={})
MAX_LEARNING_RATE = 1.0  # above this a run diverges; a typo such as 1e8 is refused


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
    # 0: balance each batch; N > 0: balance expert loads averaged over about N steps (global-batch balance)
    balance_horizon: int = 0
    # > 0: auxiliary-loss-free balance (a per-expert selection bias moved by this much a step; training.BiasBalance),
    # for pre-training probes: the bias is not saved with the model
    bias_balance_rate: float = 0.0
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
    seeds: tuple[int, ...] = (0, 1, 2)  # every fine-tuning run, once per seed (LoRA initialisation and data order)


@dataclass(frozen=True)
class StartWeights:
    """Notebook 01's smallest weight per locality loss kind (`locality.LOSS_KINDS`). The losses' scales differ: at
    the start of fine-tuning the cpu model's L2 term is ~0.006, JS ~0.03, top-k overlap ~0.1 and symmetric KL ~0.3,
    and their gradients on the routers are 0.07x, 0.19x, 0.34x and 1.8x the LM loss's (notebook 01's
    `loss_scales.csv`). The earlier 20-step sweep crossed the 2% budget near weight x gradient ratio = 1 (JS ~5,
    top-k overlap ~3.5, symmetric KL ~0.6), so each grid starts at weight x ratio = 0.05-0.2 and its five
    weights, half a decade apart, put that crossing mid-grid."""

    l2: float = 3.0
    skl: float = 0.03
    js: float = 0.3
    topk_overlap: float = 0.3


@dataclass(frozen=True)
class RouterDesignConfig:
    """Notebook 01's sweep: short fine-tunes per locality loss kind over log-spaced weights (plus a weight-0
    control), scored on the study's validation text, extended per kind until the perplexity budget is bracketed."""

    steps: int = 20  # each sweep run is a short version of notebook 02's fine-tuning
    kinds: tuple[str, ...] = ("l2", "skl", "js", "topk_overlap")
    start_weights: StartWeights = field(default_factory=StartWeights)
    weights_per_decade: int = 2  # log spacing: 2 gives steps of x10^(1/2) = x3.16
    min_weights: int = 5  # the grid every kind runs first: start x 10^(i/weights_per_decade), i < min_weights
    max_weights: int = 8  # cap per kind, extensions included (up past the largest, or down past the smallest)
    seeds: tuple[int, ...] = (0, 1, 2)  # fine-tuning seeds (LoRA init, data order), added to the study's seed: the
    # control and each kind's two weights bracketing the budget run with all of them, the rest of the grid the first
    eval_tokens: int = 16384  # validation tokens each run is scored on (0 = all the study's validation text)
    max_ppl_increase: float = claims.PPL_COST.bound  # the budget: ECR is compared where perplexity crosses it


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
    full_tier: str = "throttled"  # every policy, mode and prefetch runs here; other tiers run LRU in `partial_modes`
    partial_modes: tuple[str, ...] = ("unified", "disaggregated")  # the tiers other than full_tier (unified needed:
    # the cost model is calibrated on each tier's largest-budget unified run)
    mode_runs: tuple[str, ...] = ()  # the runs measured in every mode, policy and prefetch on full_tier (empty: all
    # of `runs`); the others run `partial_modes` only, on every tier
    throttle_gbps: float = claims.EDGE_DEVICES["cpu"][1]  # the authors' flash; 0 = scaled to this machine
    # (`cfmoe.stages.serving.scaled_bandwidth`)
    profile_mb: float = 64  # size of the memory/file bandwidth probe
    repeats: int = 5  # timed runs of every setting (model in memory, engine run), all in one seeded random order
    warmup_tokens: int = 8  # untimed tokens each timed run's engine (or in-memory model) generates first


@dataclass(frozen=True)
class BeyondConfig:
    """Notebook 06's token-by-token passes (the cache in the loop) and its generated text, sized per preset."""

    decode_window: int = 0  # tokens each request decodes: validation/test blocks cut into windows of this many
    # tokens, each a request with its own cold cache (0 = the whole block, finetune.block_size)
    validation_tokens: int = 0  # validation tokens of the passes (0 = router_design.eval_tokens; gpu: fewer)
    generated_entries: int = 0  # notebook 04's entries each method generates for (0 = ecr.entries)
    generated_tokens: int = 0  # new tokens per generated entry (0 = ecr.max_new_tokens)


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
    beyond: BeyondConfig = field(default_factory=BeyondConfig)

    @property
    def artifacts_dir(self) -> Path:
        """Build outputs (weights, traces) of this preset: git-ignored, rebuilt or cached."""
        return Path(os.environ.get("CFMOE_ARTIFACTS", ROOT / "artifacts")) / self.preset

    def results_dir(self, notebook: str) -> Path:
        """results/<notebook>/ for the default cpu preset, results/<notebook>/<preset>/ otherwise (or, while a
        stage writes its set, that folder's staging copy: see `cfmoe.stages.runs.one_result_set`)."""
        folder = results_root() / results_subdir(notebook, self.preset)
        return STAGING.get().get(folder, folder)

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
    if path.suffix in (".yaml", ".yml"):
        raise ValueError(f"preset file {preset!r} does not exist")
    raise ValueError(f"unknown preset {preset!r}; valid presets are {list(PRESETS)} or a path to a .yaml file")


def _read_yaml(path: Path) -> dict:
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise ValueError(f"{path.name}: not valid YAML{line} ({getattr(e, 'problem', None) or type(e).__name__})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read ({type(e).__name__})") from None
    if values is None:
        raise ValueError(f"{path.name} is empty; copy params/cpu.yaml and edit it")
    if not isinstance(values, dict):
        raise ValueError(f"{path.name}: expected a mapping of settings, got {type(values).__name__}")
    return values


def load_config(preset: str = "smoke", **overrides) -> StudyConfig:
    """Load a preset and apply notebook parameters (`seed=`, `model_path=`, ...), validating all."""
    path = preset_path(preset)
    values = _read_yaml(path)
    builtin = path.resolve().parent == PARAMS_DIR.resolve() and path.stem in PRESETS
    if not builtin:  # a user's preset: its own results and artifacts folders, named after it
        values.setdefault("preset", path.stem)
        if values["preset"] in PRESETS:
            raise ValueError(f"{path.name}: preset {values['preset']!r} is a built-in preset, whose committed results this "
                             f"file would overwrite; set preset: {path.stem} (any name but {', '.join(PRESETS)})")
    values = {**values, **{k: v for k, v in overrides.items() if v is not None}}
    if "preset" not in values:
        raise ValueError(f"{path.name}: missing key 'preset' (the name of the results folder)")
    cfg = _check(StudyConfig, values, path.name)
    validate(cfg, path.name)
    return cfg


def _fail(where: str, name: str, value, valid: str):
    raise ValueError(f"{where}.{name}: {value!r} is not valid; {valid}")


def validate(cfg: StudyConfig, where: str = "config") -> None:
    """Ranges and names, checked before anything runs; one line naming the value and what is valid."""
    from . import cache, locality, serving, serving_sim  # heavy; imported when a config is checked

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", cfg.preset):
        _fail(where, "preset", cfg.preset, "use letters, digits, '_', '-' or '.' (it names folders)")
    if cfg.device not in ("cpu", "cuda"):
        _fail(where, "device", cfg.device, "use 'cpu' or 'cuda'")
    positive = {"threads": cfg.threads, "model.vocab_size": cfg.model.vocab_size, "model.hidden_size": cfg.model.hidden_size,
                "model.num_layers": cfg.model.num_layers, "model.num_heads": cfg.model.num_heads,
                "model.n_experts": cfg.model.n_experts, "model.top_k": cfg.model.top_k,
                "model.expert_width": cfg.model.expert_width, "model.max_positions": cfg.model.max_positions,
                "pretrain.block_size": cfg.pretrain.block_size, "pretrain.batch_size": cfg.pretrain.batch_size,
                "pretrain.max_steps": cfg.pretrain.max_steps, "pretrain.eval_every": cfg.pretrain.eval_every,
                "eval.batch_size": cfg.eval.batch_size, "finetune.steps": cfg.finetune.steps,
                "finetune.batch_size": cfg.finetune.batch_size, "finetune.block_size": cfg.finetune.block_size,
                "router_design.steps": cfg.router_design.steps, "cache.capacity_points": cfg.cache.capacity_points,
                "cache.serving_points": cfg.cache.serving_points, "cache.decode_tokens": cfg.cache.decode_tokens,
                "ecr.entries": cfg.ecr.entries, "ecr.max_new_tokens": cfg.ecr.max_new_tokens,
                "ecr.batch_size": cfg.ecr.batch_size, "serving.requests": cfg.serving.requests,
                "serving.new_tokens": cfg.serving.new_tokens, "serving.repeats": cfg.serving.repeats,
                "serving.warmup_tokens": cfg.serving.warmup_tokens}
    for name, value in positive.items():
        if value < 1:
            _fail(where, name, value, "it must be >= 1")
    at_least_zero = {"seed": cfg.seed, "model.dense_layers": cfg.model.dense_layers, "pretrain.warmup_steps":
                     cfg.pretrain.warmup_steps, "pretrain.early_stopping_patience": cfg.pretrain.early_stopping_patience,
                     "pretrain.max_documents": cfg.pretrain.max_documents,
                     "pretrain.balance_horizon": cfg.pretrain.balance_horizon,
                     "pretrain.bias_balance_rate": cfg.pretrain.bias_balance_rate,
                     "finetune.warmup_steps": cfg.finetune.warmup_steps,
                     "finetune.lora_rank": cfg.finetune.lora_rank, "finetune.eval_tokens": cfg.finetune.eval_tokens,
                     "eval.max_test_tokens": cfg.eval.max_test_tokens, "cache.requests": cfg.cache.requests,
                     "pretrain.weight_decay": cfg.pretrain.weight_decay, "pretrain.aux_loss_coef": cfg.pretrain.aux_loss_coef,
                     "pretrain.time_limit_minutes": cfg.pretrain.time_limit_minutes,
                     "finetune.aux_loss_coef": cfg.finetune.aux_loss_coef, "finetune.locality_weight": cfg.finetune.locality_weight,
                     "router_design.max_ppl_increase": cfg.router_design.max_ppl_increase,
                     "serving.throttle_gbps": cfg.serving.throttle_gbps,
                     "beyond.decode_window": cfg.beyond.decode_window,
                     "beyond.validation_tokens": cfg.beyond.validation_tokens,
                     "beyond.generated_entries": cfg.beyond.generated_entries,
                     "beyond.generated_tokens": cfg.beyond.generated_tokens}
    for name, value in at_least_zero.items():
        if value < 0:
            _fail(where, name, value, "it must be >= 0")
    for name, value in {"pretrain.learning_rate": cfg.pretrain.learning_rate,
                        "finetune.learning_rate": cfg.finetune.learning_rate}.items():
        if not 0 < value <= MAX_LEARNING_RATE:
            _fail(where, name, value, f"a learning rate must lie in (0, {MAX_LEARNING_RATE:g}]")
    m = cfg.model
    if m.top_k > m.n_experts:
        _fail(where, "model.top_k", m.top_k, f"it must be <= model.n_experts ({m.n_experts})")
    if m.dense_layers >= m.num_layers:
        _fail(where, "model.dense_layers", m.dense_layers, f"it must be < model.num_layers ({m.num_layers}): "
                                                            "at least one MoE layer")
    if m.hidden_size % m.num_heads:
        _fail(where, "model.hidden_size", m.hidden_size, f"it must be a multiple of model.num_heads ({m.num_heads})")
    if cfg.finetune.block_size > m.max_positions or cfg.pretrain.block_size > m.max_positions:
        _fail(where, "block_size", max(cfg.finetune.block_size, cfg.pretrain.block_size),
              f"blocks must fit model.max_positions ({m.max_positions})")
    window = cfg.beyond.decode_window
    if window and (window < 2 or cfg.finetune.block_size % window):
        _fail(where, "beyond.decode_window", window, f"use 0 (whole blocks) or a divisor >= 2 of finetune.block_size "
                                                     f"({cfg.finetune.block_size})")
    if cfg.pretrain.precision not in ("fp32", "bf16"):
        _fail(where, "pretrain.precision", cfg.pretrain.precision, "use 'fp32' or 'bf16'")
    for name, value in {"pretrain.heldout_fraction": cfg.pretrain.heldout_fraction,
                        "finetune.daft_quantile": cfg.finetune.daft_quantile, "ecr.top_p": cfg.ecr.top_p}.items():
        if not 0 < value <= 1:
            _fail(where, name, value, "it must lie in (0, 1]")
    if cfg.ecr.temperature <= 0 or cfg.ecr.repetition_penalty <= 0:
        _fail(where, "ecr", (cfg.ecr.temperature, cfg.ecr.repetition_penalty),
              "temperature and repetition_penalty must be > 0")
    for name, shares in {"cache.cached_shares": cfg.cache.cached_shares, "serving.shares": cfg.serving.shares}.items():
        if not shares or any(not 0 < share <= 1 for share in shares):
            _fail(where, name, list(shares), "shares must be a non-empty list of numbers in (0, 1]")
    if cfg.cache.bits_per_param <= 0 or cfg.cache.bits_per_param > 64:
        _fail(where, "cache.bits_per_param", cfg.cache.bits_per_param, "use e.g. 16, 8 or 4.5, in (0, 64]")
    if any(b < 1 for b in cfg.cache.batch_sizes) or not cfg.cache.batch_sizes:
        _fail(where, "cache.batch_sizes", list(cfg.cache.batch_sizes), "a non-empty list of widths >= 1")
    names = {"finetune.locality_kind": ((cfg.finetune.locality_kind,), locality.LOSS_KINDS),
             "router_design.kinds": (cfg.router_design.kinds, locality.LOSS_KINDS),
             "cache.policies": (cfg.cache.policies, cache.POLICIES),
             "cache.serving_policies": (cfg.cache.serving_policies, cache.POLICIES),
             "serving.runs": (cfg.serving.runs, ("base", "lora_control", "cfmoe", "cfmoe_daft")),
             "serving.policies": (cfg.serving.policies, serving.POLICIES),
             "serving.modes": (cfg.serving.modes, serving_sim.MODES),
             "serving.tiers": (cfg.serving.tiers, serving.TIERS),
             "serving.full_tier": ((cfg.serving.full_tier,), cfg.serving.tiers),
             "serving.partial_modes": (cfg.serving.partial_modes, serving_sim.MODES),
             "serving.mode_runs": (cfg.serving.mode_runs, cfg.serving.runs)}
    may_be_empty = {"serving.mode_runs"}  # empty: every run in every mode
    for name, (given, valid) in names.items():
        unknown = [value for value in given if value not in valid]
        if unknown or (not given and name not in may_be_empty):
            _fail(where, name, unknown[0] if unknown else list(given), f"valid: {', '.join(valid)}")
    if "unified" not in cfg.serving.partial_modes:
        _fail(where, "serving.partial_modes", list(cfg.serving.partial_modes),
              "it must include unified (the cost model's calibration run on each tier)")
    if not cfg.finetune.seeds or any(s < 0 for s in cfg.finetune.seeds) or len(set(cfg.finetune.seeds)) < len(cfg.finetune.seeds):
        _fail(where, "finetune.seeds", list(cfg.finetune.seeds), "a non-empty list of distinct seeds >= 0")
    design = cfg.router_design
    for kind in locality.LOSS_KINDS:
        start = getattr(design.start_weights, kind)
        if not 0 < start < float("inf"):
            _fail(where, f"router_design.start_weights.{kind}", start, "a starting weight must be > 0 and finite "
                                                                        "(weights are log-spaced)")
    for name, value, low in (("weights_per_decade", design.weights_per_decade, 1), ("min_weights", design.min_weights, 2),
                             ("max_weights", design.max_weights, design.min_weights)):
        if value < low:
            _fail(where, f"router_design.{name}", value, f"it must be >= {low}" + (
                " (router_design.min_weights)" if name == "max_weights" else
                " (two weights to bracket the budget)" if name == "min_weights" else ""))
    if not design.seeds or any(s < 0 for s in design.seeds) or len(set(design.seeds)) < len(design.seeds):
        _fail(where, "router_design.seeds", list(design.seeds), "a non-empty list of distinct seeds >= 0")
    if design.eval_tokens < 0:
        _fail(where, "router_design.eval_tokens", design.eval_tokens, "it must be >= 0 (0 = all the validation text)")
