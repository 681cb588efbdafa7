"""describe(): MoE layers, router shapes and the byte split, per architecture, peft-wrapped and not."""

import peft
import pytest
import torch
import transformers

from cfmoe.moe import SUPPORTED_ARCHITECTURES, describe, experts_implementation, unwrap
from tiny_models import ARCHITECTURES, tiny_moe

F32 = 4


def expected_expert_bytes(config) -> int:
    """One routed expert's bytes from the config, written out per architecture."""
    h = config.hidden_size
    if config.model_type in ("mixtral", "olmoe"):  # their experts use intermediate_size
        return 3 * h * config.intermediate_size * F32
    if config.model_type == "gpt_oss":
        i = config.intermediate_size  # gate_up (h, 2i) + bias 2i, down (i, h) + bias h
        return (h * 2 * i + 2 * i + i * h + h) * F32
    return 3 * h * config.moe_intermediate_size * F32


def expected_shared_bytes(config) -> int:
    h = config.hidden_size
    if config.model_type == "qwen2_moe":  # shared expert MLP + its sigmoid gate (h -> 1)
        return (3 * h * config.shared_expert_intermediate_size + h) * F32
    if config.model_type == "deepseek_v3":
        return 3 * h * config.moe_intermediate_size * config.n_shared_experts * F32
    return 0


def unique_param_bytes(model) -> int:
    """Parameter bytes with tied weights counted once, keyed by storage rather than by module."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for _, p in model.named_parameters(remove_duplicate=False)}
    return sum(seen.values())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_describe_counts_from_config(arch):
    model = tiny_moe(arch, n_experts=8, top_k=2)
    info, config = describe(model), model.config
    dense = 1 if arch == "deepseek_v3" else 0
    assert info.architecture == arch
    assert [layer.decoder_layer for layer in info.layers] == list(range(dense, config.num_hidden_layers))
    assert [layer.index for layer in info.layers] == list(range(len(info.layers)))
    assert [layer.name for layer in info.layers] == [f"model.layers.{i}.mlp" for i in range(dense, dense + 2)]
    assert (info.n_experts, info.top_k) == (8, 2)
    for layer in info.layers:
        assert (layer.n_experts, layer.top_k) == (8, 2)
        assert layer.expert_bytes == expected_expert_bytes(config)
        assert layer.shared_bytes == expected_shared_bytes(config)
        assert layer.scoring == ("sigmoid" if arch == "deepseek_v3" else "softmax")
    assert info.routed_expert_bytes == 2 * 8 * expected_expert_bytes(config)
    assert info.routed_expert_bytes + info.resident_bytes == info.total_bytes == unique_param_bytes(model)
    assert info.routed_share == pytest.approx(info.routed_expert_bytes / info.total_bytes)
    assert info.adapter_bytes == 0


def test_describe_reads_router_shape_not_defaults():
    info = describe(tiny_moe("qwen3_moe", n_experts=16, top_k=4, n_layers=3))
    assert (info.n_experts, info.top_k, len(info.layers)) == (16, 4, 3)


def test_tied_embeddings_counted_once():
    model = tiny_moe("olmoe", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    info = describe(model)
    assert info.total_bytes == unique_param_bytes(model) == sum(p.numel() * F32 for p in model.parameters())


def test_bytes_follow_dtype():
    model = tiny_moe("mixtral")
    info32, info16 = describe(model), describe(model.to(torch.bfloat16))
    assert info16.layers[0].expert_bytes * 2 == info32.layers[0].expert_bytes
    assert info16.total_bytes * 2 == info32.total_bytes


PEFT_NOISE = ("ignore:The following (rank|alpha)_pattern keys did not match", "ignore:`is_gradient_checkpointing`")


@pytest.mark.filterwarnings(*PEFT_NOISE)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_peft_wrapped_gives_same_layers(arch):
    model = tiny_moe(arch)
    base = describe(model)
    config = peft.LoraConfig(r=2, target_modules="all-linear",
                             target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    wrapped = peft.get_peft_model(model, config)
    info = describe(wrapped)
    assert unwrap(wrapped) is model
    assert info.layers == base.layers  # names, shapes and sizes; adapter params never count as expert bytes
    assert info.routed_expert_bytes == base.routed_expert_bytes
    lora = sum(p.numel() * F32 for name, p in wrapped.named_parameters() if "lora_" in name)
    assert info.adapter_bytes == lora > 0
    assert info.resident_bytes == base.resident_bytes + lora
    assert info.total_bytes == info.routed_expert_bytes + info.resident_bytes == unique_param_bytes(wrapped)
    assert all(layer.experts is layer.block.experts.get_base_layer() for layer in info.layers)


def test_dense_model_raises_one_line_listing_supported():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError) as err:
        describe(transformers.LlamaForCausalLM(config))
    message = str(err.value)
    assert "\n" not in message and "LlamaForCausalLM" in message
    assert all(arch in message for arch in SUPPORTED_ARCHITECTURES)


def test_non_uniform_top_k_raises():
    model = tiny_moe("mixtral")
    model.model.layers[1].mlp.gate.top_k = 3
    with pytest.raises(ValueError, match=r"different top_k \[2, 3\]"):
        describe(model)


def test_to_dict_is_json_ready():
    import json

    summary = describe(tiny_moe("qwen2_moe")).to_dict()
    assert json.loads(json.dumps(summary))["layers"][0]["name"] == "model.layers.0.mlp"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_experts_implementation_switches_and_restores(arch):
    """Inside the block the fused experts run the named implementation (same logits up to rounding); the model's
    own is back after it, also through a peft wrapper."""
    lm = tiny_moe(arch).eval()
    own = lm.config._experts_implementation
    ids = torch.randint(0, lm.config.vocab_size, (2, 6))
    with torch.no_grad():
        before = lm(ids).logits
        wrapped = peft.get_peft_model(lm, peft.LoraConfig(r=2, target_modules="all-linear"))
        other = "batched_mm" if own != "batched_mm" else "grouped_mm"
        with experts_implementation(wrapped, other):
            assert lm.config._experts_implementation == other
            during = lm(ids).logits
        with experts_implementation(wrapped, None):
            assert lm.config._experts_implementation == own
    assert lm.config._experts_implementation == own
    torch.testing.assert_close(during, before, rtol=1e-4, atol=1e-5)
