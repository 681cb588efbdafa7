import pytest
import yaml

from cfmoe.config import PRESETS, load_config


def test_every_preset_loads_and_is_frozen():
    for name in PRESETS:
        cfg = load_config(name)
        assert cfg.preset == name
        with pytest.raises(AttributeError):
            cfg.seed = 1


def test_overrides_apply_and_none_is_ignored():
    cfg = load_config("smoke", seed=7, model_path=None)
    assert cfg.seed == 7 and cfg.model_path == ""


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown preset 'laptop'; valid presets are \['smoke', 'cpu', 'gpu'\]"):
        load_config("laptop")


def _write(tmp_path, values):
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_unknown_key_is_rejected_with_the_valid_keys(tmp_path):
    with pytest.raises(ValueError, match=r"custom.yaml.pretrain: unknown key\(s\) \['lr'\]; valid keys are"):
        load_config(_write(tmp_path, {"preset": "mine", "pretrain": {"lr": 0.1}}))


def test_wrong_type_is_rejected_in_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"custom.yaml.model.n_experts: expected int, got str 'many'"):
        load_config(_write(tmp_path, {"preset": "mine", "model": {"n_experts": "many"}}))
    with pytest.raises(ValueError, match=r"expected int, got bool True"):
        load_config(_write(tmp_path, {"preset": "mine", "seed": True}))


def test_custom_yaml_results_go_to_their_own_folder(tmp_path):
    cfg = load_config(_write(tmp_path, {"preset": "mine", "pretrain": {"learning_rate": 1}}))
    assert cfg.pretrain.learning_rate == 1.0 and cfg.results_dir("00_base_model").name == "mine"
    assert load_config("cpu").results_dir("00_base_model").name == "00_base_model"
