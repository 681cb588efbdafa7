import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_moe

from cfmoe import daft, moe


def test_threshold_selects_exactly_the_layers_below_it():
    profile = pd.DataFrame({"layer": range(5), "ecr": [0.65, 0.72, 0.70, 0.31, 0.9]})
    assert daft.select_daft_layers(profile, threshold=0.7) == [0, 3]
    assert daft.select_daft_layers(profile, quantile=0.5) == [0, 2, 3]  # the least local half
    assert daft.select_daft_layers(profile, quantile=1.0) == [0, 1, 2, 3, 4]


def test_selection_needs_exactly_one_rule():
    profile = pd.DataFrame({"layer": [0], "ecr": [0.5]})
    with pytest.raises(ValueError, match="exactly one of threshold"):
        daft.select_daft_layers(profile)
    with pytest.raises(ValueError, match="quantile must be in"):
        daft.select_daft_layers(profile, quantile=0.0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_trains_only_the_selected_layers(arch):
    lm = tiny_moe(arch)
    info = moe.describe(lm)
    last = len(info.layers) - 1
    wrapped = daft.lora_model(lm, [last], rank=4)
    selected = info.layers[last].name.rsplit(".", 1)[0] + "."
    trainable = [name for name, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(selected in name for name in trainable)
    assert any("experts" in name for name in trainable) and any("attn" in name for name in trainable)
    assert any("modules_to_save" in name for name in trainable)  # the router trains fully
    assert daft.trainable_parameters(wrapped) < sum(p.numel() for p in wrapped.parameters()) / 2


def test_profile_is_per_layer_ecr_with_document_boundaries_masked(tmp_path):
    lm = tiny_moe("qwen2_moe")
    ids = np.random.default_rng(0).integers(3, 128, size=(3, 16))
    docs = np.repeat([[0] * 8 + [1] * 8], 3, axis=0)
    profile = daft.profile_layer_ecr(lm, ids, docs, path=tmp_path / "profile.csv")
    assert list(profile.layer) == list(range(len(moe.describe(lm).layers)))
    assert pd.read_csv(tmp_path / "profile.csv").ecr.tolist() == pytest.approx(profile.ecr.tolist())
    from cfmoe import metrics, routing
    traces = routing.trace_forward(lm, torch.as_tensor(ids))
    experts = np.concatenate([t.experts for t in traces])
    valid = np.ones(len(experts) - 1, bool)
    valid[7::8] = False  # within-block doc boundary (7->8) and block boundaries (15->16)
    expected = metrics.expert_consistency_rate(experts, per_layer=True, valid_pairs=valid)
    np.testing.assert_allclose(profile.ecr, expected)


def test_no_layer_selected_is_an_error():
    with pytest.raises(ValueError, match="no MoE layer selected"):
        daft.lora_model(tiny_moe("mixtral"), [], rank=4)


@pytest.mark.parametrize("layers, match", [
    ([-1], r"^layers \[-1\] out of range: the model has 2 MoE layers \(0-1\)$"),
    ([0, 5], r"^layers \[5\] out of range: the model has 2 MoE layers \(0-1\)$"),
    ([1, 1], r"^layers \[1, 1\] repeat layer\(s\) \[1\]; give each MoE layer once$"),
])
def test_bad_layers_are_one_line_errors(layers, match):
    with pytest.raises(ValueError, match=match):
        daft.lora_model(tiny_moe("qwen2_moe", n_layers=2), layers, rank=4)
