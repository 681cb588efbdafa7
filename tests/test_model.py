import json

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2MoeForCausalLM,
                          ViTConfig, ViTModel)

from cfmoe import model, moe
from cfmoe.config import load_config


def test_tokenizer_round_trips_text_and_keeps_unk_as_one_token():
    texts = ["The European lobster, H. gammarus, is blue.", "Café — naïve 1,000.5 <unk> words"] * 20
    tok = model.train_tokenizer(texts, vocab_size=300)
    for text in ["The lobster is blue.", "Café — naïve 1,000.5", "unseen: ünïcødé ✓"]:
        assert tok.decode(tok(text)["input_ids"]) == text
    ids = tok("a <unk> b")["input_ids"]
    assert tok.unk_token_id in ids and tok.decode(ids, skip_special_tokens=True).split() == ["a", "b"]


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_default_shape_mirrors_deepseek_moe_16b(preset):
    cfg = load_config(preset)
    tok = model.train_tokenizer(["tiny corpus"], vocab_size=cfg.model.vocab_size)
    with torch.device("meta"):
        lm = Qwen2MoeForCausalLM(model.build_config(cfg, tok))
    info = moe.describe(lm)
    assert (info.n_experts, info.top_k) == (64, 6)
    assert info.routed_share >= 0.85
    assert all(layer.shared_bytes > 0 for layer in info.layers)
    assert len(info.layers) == cfg.model.num_layers - cfg.model.dense_layers
    if preset == "gpu":
        assert len(info.layers) >= 12 and cfg.model.dense_layers == 1


def test_smoke_model_saves_loads_and_generates(smoke_model_dir):
    lm = AutoModelForCausalLM.from_pretrained(smoke_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(smoke_model_dir)
    prompt = tok("= Robert Boulter =\n\nRobert Boulter is", return_tensors="pt")
    out = lm.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 8
    loaded, loaded_tok = model.load_model(smoke_model_dir)
    torch.testing.assert_close(loaded(**prompt).logits, lm(**prompt).logits)
    build = model.build_info(smoke_model_dir)
    assert build["steps"] == 30 and build["fingerprint"] == model.build_fingerprint(load_config("smoke"))
    log = model.training_log(smoke_model_dir)
    assert any("balance_loss" in row for row in log) and any("eval_loss" in row for row in log)


def test_pretraining_is_bit_reproducible(smoke_cfg, smoke_model_dir, tmp_path):
    again = model.pretrain(smoke_cfg, tmp_path / "again")
    first = AutoModelForCausalLM.from_pretrained(smoke_model_dir).state_dict()
    second = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert (smoke_model_dir / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_build_or_load_reuses_a_matching_model(smoke_cfg, smoke_model_dir):
    before = (smoke_model_dir / "model.safetensors").stat().st_mtime_ns
    model.build_or_load(smoke_cfg)
    assert (smoke_model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_missing_path_names_it_and_the_supported_architectures(tmp_path):
    with pytest.raises(ValueError, match=r"model_path '.*nowhere' does not exist; .*mixtral"):
        model.load_model(tmp_path / "nowhere")


def test_non_causal_lm_is_rejected(tmp_path):
    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                       image_size=8, patch_size=4)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"is a 'vit' model, not a causal LM; supported MoE architectures"):
        model.load_model(tmp_path)


def test_dense_causal_lm_is_rejected(tmp_path):
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"\(llama\) has no MoE layer; supported architectures: .*qwen2_moe"):
        model.load_model(tmp_path)


def test_build_record_is_json(smoke_model_dir):
    record = json.loads((smoke_model_dir / model.BUILD_FILE).read_text())
    assert record["config"]["preset"] == "smoke" and record["train_tokens_per_second"] > 0


def test_the_base_models_fingerprint_names_the_balance_horizon_only_when_set():
    """Per-batch balance (horizon 0) hashes as before the option existed, so models built then stay current (the
    cpu preset's fingerprint at a1cafa4, before the option; a change to the cpu preset's model or pre-training,
    the data or the seed changes it, and this value with it); a horizon is another model."""
    import dataclasses

    cfg = load_config("cpu")
    assert model.build_fingerprint(cfg) == "4a5c304f53c247ff"
    global_balance = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, balance_horizon=32))
    assert model.build_fingerprint(global_balance) != model.build_fingerprint(cfg)
