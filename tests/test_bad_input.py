"""Bad input never passes silently: each case below gives one line naming the value and what is valid, before
anything is written under results/ or artifacts/."""

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cfmoe import cache, costmodel, metrics, model
from cfmoe.config import PARAMS_DIR, load_config

ROOT = Path(__file__).resolve().parent.parent
SMOKE = yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())


def merged(changes: dict) -> dict:
    values = copy.deepcopy(SMOKE) | {"preset": "mine"}
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (values.setdefault(section, {}) if section else values)[name] = value
    return values


# (yaml changes to a copy of the smoke preset, the one-line message expected)
CONFIGS = [
    ({"pretrain.max_steps": -5}, r"pretrain.max_steps: -5 is not valid; it must be >= 1"),
    ({"pretrain.max_steps": 0}, r"pretrain.max_steps: 0 is not valid"),
    ({"finetune.steps": 0}, r"finetune.steps: 0 is not valid; it must be >= 1"),
    ({"router_design.steps": -1}, r"router_design.steps: -1 is not valid"),
    ({"pretrain.learning_rate": -1}, r"pretrain.learning_rate: -1.0 is not valid; a learning rate must lie in \(0, 1\]"),
    ({"pretrain.learning_rate": 1e8}, r"pretrain.learning_rate: 100000000.0 is not valid"),
    ({"finetune.learning_rate": 0}, r"finetune.learning_rate: 0.0 is not valid"),
    ({"model.top_k": 40}, r"model.top_k: 40 is not valid; it must be <= model.n_experts \(16\)"),
    ({"model.top_k": 0}, r"model.top_k: 0 is not valid; it must be >= 1"),
    ({"model.n_experts": 0}, r"model.n_experts: 0 is not valid"),
    ({"threads": 0}, r"threads: 0 is not valid; it must be >= 1"),
    ({"seed": -1}, r"seed: -1 is not valid; it must be >= 0"),
    ({"device": "tpu"}, r"device: 'tpu' is not valid; use 'cpu' or 'cuda'"),
    ({"model.hidden_size": 33}, r"model.hidden_size: 33 is not valid; it must be a multiple of model.num_heads"),
    ({"model.dense_layers": 2}, r"model.dense_layers: 2 is not valid; it must be < model.num_layers"),
    ({"pretrain.block_size": 4096}, r"block_size: 4096 is not valid; blocks must fit model.max_positions"),
    ({"pretrain.precision": "fp8"}, r"pretrain.precision: 'fp8' is not valid"),
    ({"pretrain.heldout_fraction": 0.0}, r"pretrain.heldout_fraction: 0.0 is not valid; it must lie in \(0, 1\]"),
    ({"pretrain.aux_loss_coef": -0.1}, r"pretrain.aux_loss_coef: -0.1 is not valid; it must be >= 0"),
    ({"pretrain.balance_horizon": -2}, r"pretrain.balance_horizon: -2 is not valid; it must be >= 0"),
    ({"finetune.locality_kind": "cosine"}, r"finetune.locality_kind: 'cosine' is not valid; valid: l2, skl, js, topk_overlap"),
    ({"finetune.lora_rank": -4}, r"finetune.lora_rank: -4 is not valid"),
    ({"finetune.daft_quantile": 1.5}, r"finetune.daft_quantile: 1.5 is not valid"),
    ({"router_design.kinds": ["nosuch", "js"]}, r"router_design.kinds: 'nosuch' is not valid; valid: l2"),
    ({"router_design.kinds": []}, r"router_design.kinds: \[\] is not valid"),
    ({"router_design.weights": [1.0]}, r"mine.yaml.router_design: unknown key\(s\) \['weights'\]; valid keys are"),
    ({"router_design.start_weights": {"js": 0.0}},
     r"router_design.start_weights.js: 0.0 is not valid; a starting weight must be > 0 and finite"),
    ({"router_design.start_weights": {"l2": -3.0}}, r"router_design.start_weights.l2: -3.0 is not valid"),
    ({"router_design.start_weights": {"kl": 1.0}},
     r"mine.yaml.router_design.start_weights: unknown key\(s\) \['kl'\]; valid keys are \['js', 'l2', 'skl'"),
    ({"router_design.start_weights": 1.0}, r"mine.yaml.router_design.start_weights: expected a mapping, got float"),
    ({"router_design.weights_per_decade": 0}, r"router_design.weights_per_decade: 0 is not valid; it must be >= 1"),
    ({"router_design.min_weights": 1},
     r"router_design.min_weights: 1 is not valid; it must be >= 2 \(two weights to bracket the budget\)"),
    ({"router_design.min_weights": 5, "router_design.max_weights": 4},
     r"router_design.max_weights: 4 is not valid; it must be >= 5 \(router_design.min_weights\)"),
    ({"router_design.seeds": []}, r"router_design.seeds: \[\] is not valid; a non-empty list of distinct seeds >= 0"),
    ({"router_design.seeds": [0, 0]}, r"router_design.seeds: \[0, 0\] is not valid"),
    ({"router_design.seeds": [-1]}, r"router_design.seeds: \[-1\] is not valid"),
    ({"router_design.eval_tokens": -1}, r"router_design.eval_tokens: -1 is not valid; it must be >= 0"),
    ({"cache.policies": ["lru", "fifo"]}, r"cache.policies: 'fifo' is not valid; valid: lru, lfu, opt, lopt, layer_lru"),
    ({"cache.serving_policies": ["mru"]}, r"cache.serving_policies: 'mru' is not valid"),
    ({"cache.cached_shares": [0.0, 0.5]}, r"cache.cached_shares: \[0.0, 0.5\] is not valid; shares must be"),
    ({"cache.cached_shares": [1.5]}, r"cache.cached_shares: \[1.5\] is not valid"),
    ({"cache.batch_sizes": [0]}, r"cache.batch_sizes: \[0\] is not valid"),
    ({"cache.bits_per_param": 0.0}, r"cache.bits_per_param: 0.0 is not valid"),
    ({"cache.capacity_points": 0}, r"cache.capacity_points: 0 is not valid"),
    ({"ecr.entries": 0}, r"ecr.entries: 0 is not valid"),
    ({"ecr.top_p": 0.0}, r"ecr.top_p: 0.0 is not valid"),
    ({"ecr.temperature": 0.0}, r"ecr: \(0.0, 1.5\) is not valid; temperature and repetition_penalty must be > 0"),
    ({"serving.shares": [0.5, 2.0]}, r"serving.shares: \[0.5, 2.0\] is not valid"),
    ({"serving.shares": []}, r"serving.shares: \[\] is not valid"),
    ({"serving.policies": ["lru", "opt"]}, r"serving.policies: 'opt' is not valid; valid: lru, lfu"),
    ({"serving.modes": ["batched"]}, r"serving.modes: 'batched' is not valid; valid: unified, disaggregated"),
    ({"serving.tiers": ["nvme"]}, r"serving.tiers: 'nvme' is not valid; valid: direct, page_cache, throttled, host"),
    ({"serving.full_tier": "host"}, r"serving.full_tier: 'host' is not valid; valid: direct, throttled"),
    ({"serving.runs": ["base", "mine"]}, r"serving.runs: 'mine' is not valid"),
    ({"serving.throttle_gbps": -1.0}, r"serving.throttle_gbps: -1.0 is not valid"),
    ({"beyond.decode_window": 100}, r"beyond.decode_window: 100 is not valid; use 0 \(whole blocks\) or a divisor"),
    ({"beyond.decode_window": 1}, r"beyond.decode_window: 1 is not valid"),
    ({"beyond.generated_tokens": -1}, r"beyond.generated_tokens: -1 is not valid; it must be >= 0"),
    ({"beyond.validation_tokens": -1}, r"beyond.validation_tokens: -1 is not valid; it must be >= 0"),
    ({"preset": "smoke"}, r"mine.yaml: preset 'smoke' is a built-in preset, whose committed results this file"),
    ({"preset": "cpu"}, r"mine.yaml: preset 'cpu' is a built-in preset"),
    ({"preset": "a/b"}, r"preset: 'a/b' is not valid; use letters, digits"),
    ({"model.n_experts": "many"}, r"mine.yaml.model.n_experts: expected int, got str 'many'"),
    ({"pretrain.lr": 0.1}, r"mine.yaml.pretrain: unknown key\(s\) \['lr'\]; valid keys are"),
    ({"seed": True}, r"mine.yaml.seed: expected int, got bool True"),
]


def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    return str(path)


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """Results and artifacts in empty folders; the test checks they stay empty."""
    results, artifacts = tmp_path / "results", tmp_path / "artifacts"
    monkeypatch.setenv("CFMOE_RESULTS", str(results))
    monkeypatch.setenv("CFMOE_ARTIFACTS", str(artifacts))
    yield tmp_path
    written = [p for folder in (results, artifacts) if folder.exists() for p in folder.rglob("*")]
    assert not written, f"bad input wrote {written}"


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


@pytest.mark.parametrize("changes, expected", CONFIGS, ids=[str(c) for c, _ in CONFIGS])
def test_bad_config_values_are_refused_in_one_line(changes, expected, sandbox):
    with pytest.raises(ValueError, match=expected) as e:
        load_config(_yaml(sandbox, yaml.safe_dump(merged(changes))))
    one_line(e)


YAML_FILES = [
    ("", r"mine.yaml is empty; copy params/cpu.yaml and edit it"),
    ("preset: [unclosed", r"mine.yaml: not valid YAML at line 1"),
    ("- a\n- b\n", r"mine.yaml: expected a mapping of settings, got list"),
    ("seed: 1\n", None),  # no preset key: named after the file
]


@pytest.mark.parametrize("text, expected", YAML_FILES)
def test_yaml_files(text, expected, sandbox):
    path = _yaml(sandbox, text)
    if expected is None:
        assert load_config(path).preset == "mine"
        return
    with pytest.raises(ValueError, match=expected) as e:
        load_config(path)
    one_line(e)


def test_missing_preset_file_and_unknown_preset(sandbox):
    with pytest.raises(ValueError, match=r"preset file '.*nope.yaml' does not exist"):
        load_config(str(sandbox / "nope.yaml"))
    with pytest.raises(ValueError, match=r"unknown preset 'laptop'; valid presets are"):
        load_config("laptop")


def _save_tiny(path, with_tokenizer=True, arch="qwen2_moe"):
    from tiny_models import tiny_moe, tiny_tokenizer

    tiny_moe(arch, n_experts=8, top_k=2, n_layers=2).save_pretrained(path)
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(path)
    return path


def test_bad_model_paths(sandbox):
    with pytest.raises(ValueError, match=r"model_path '.*missing' does not exist") as e:
        model.check_model_path(str(sandbox / "missing"))
    one_line(e)
    file = sandbox / "weights.bin"
    file.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"model_path '.*weights.bin' is a file; pass the directory"):
        model.check_model_path(str(file))
    empty = sandbox / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"model_path '.*empty' is not a transformers model"):
        model.check_model_path(str(empty))
    bare = _save_tiny(sandbox / "no_tokenizer", with_tokenizer=False)
    with pytest.raises(ValueError, match=r"model_path '.*no_tokenizer' has no usable tokenizer") as e:
        model.check_model_path(str(bare))
    one_line(e)
    assert model.check_model_path(str(_save_tiny(sandbox / "ok")))("hello world")["input_ids"]


def test_a_dense_model_is_refused_before_its_weights_load(sandbox, monkeypatch):
    import transformers

    config = transformers.Qwen2Config(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=32)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(sandbox / "dense")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ValueError, match=r"\(qwen2\) has no MoE layer; supported architectures"):
        model.load_model(sandbox / "dense")


LIBRARY = [
    (lambda: cache.simulate_cache([1, 2, 3], "lru", 2.7), r"capacity must be a positive int, got 2.7"),
    (lambda: cache.simulate_cache([1, 2, 3], "lru", 0), r"capacity must be a positive int, got 0"),
    (lambda: cache.simulate_cache([1, 2, 3], "lopt", 2, lookahead=2.5), r"lopt needs an integer lookahead >= 0"),
    (lambda: cache.simulate_cache([1, 2, 3], "lopt", 2, lookahead=-1), r"lopt needs an integer lookahead >= 0"),
    (lambda: cache.simulate_cache([1, 2, 3], "mru", 2), r"unknown policy 'mru'; valid: lru"),
    (lambda: cache.hit_rate_curve([1, 2, 3], "lru", [2.7]), r"capacity must be a positive int, got 2.7"),
    (lambda: costmodel.deepseek_moe_16b(0), r"bits_per_param must be in \(0, 64\]"),
    (lambda: costmodel.tokens_per_second(costmodel.deepseek_moe_16b(), costmodel.PROFILES["cpu"], 1.5),
     r"hit_rate must lie in \[0, 1\]"),
    (lambda: costmodel.custom_profile("x", -1, 4.5), r"mem_bandwidth_gbps must be a positive finite number"),
    (lambda: metrics.gate_distribution_similarity(np.zeros((2, 2))), r"probs must have shape"),
]


@pytest.mark.parametrize("call, expected", LIBRARY, ids=[m for _, m in LIBRARY])
def test_library_calls(call, expected, sandbox):
    with pytest.raises(ValueError, match=expected) as e:
        call()
    one_line(e)


CLI = [
    (["-m", "cfmoe.stages", "base_model", "--preset", "laptop"], "python -m cfmoe.stages: error: unknown preset 'laptop'"),
    (["-m", "cfmoe.stages", "check", "--preset", "{yaml}"], "python -m cfmoe.stages: error: mine.yaml.threads: 0 is not valid"),
    (["-m", "cfmoe.stages", "check", "--preset", "smoke", "--model-path", "/nonexistent/model"],
     "python -m cfmoe.stages: error: model_path '/nonexistent/model' does not exist"),
    (["-m", "cfmoe.present.notebooks", "failed-cell", "/nonexistent.ipynb"],
     "python -m cfmoe.present.notebooks: error: [Errno 2] No such file or directory"),
]


@pytest.mark.parametrize("argv, expected", CLI, ids=[" ".join(a[1:4]) for a, _ in CLI])
def test_entry_points_print_one_line_and_exit_2(argv, expected, sandbox):
    path = _yaml(sandbox, yaml.safe_dump(merged({"threads": 0})))
    out = subprocess.run([sys.executable, *[a.format(yaml=path) for a in argv]], capture_output=True, text=True,
                         cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().startswith(expected) and len(out.stderr.strip().splitlines()) == 1, out.stderr


RUN_ALL = [
    (["--preset"], "run_all.sh: --preset needs a value; e.g. --preset cpu"),
    (["--model"], "run_all.sh: --model needs a value"),
    (["--preset", "laptop"], "run_all.sh: unknown preset 'laptop'"),
    (["--preset", "nope.yaml"], "run_all.sh: preset file 'nope.yaml' does not exist"),
    (["--bogus"], "run_all.sh: unknown argument '--bogus'"),
]


@pytest.mark.parametrize("argv, expected", RUN_ALL, ids=[" ".join(a) for a, _ in RUN_ALL])
def test_run_all_arguments(argv, expected, sandbox):
    out = subprocess.run(["bash", str(ROOT / "run_all.sh"), *argv], capture_output=True, text=True, cwd=sandbox)
    assert out.returncode == 2 and out.stderr.strip() == out.stderr.strip().splitlines()[0]
    assert out.stderr.startswith(expected), out.stderr
