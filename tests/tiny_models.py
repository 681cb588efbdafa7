"""Tiny random-weight MoE causal LMs of every supported architecture, built from configs (no downloads).

    from tiny_models import ARCHITECTURES, tiny_moe, tiny_tokenizer  # tests/ is on sys.path under pytest
    model, tokenizer = tiny_moe("deepseek_v3", seed=1), tiny_tokenizer()
"""

from __future__ import annotations

import string

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")

VOCAB_SIZE = 128
HIDDEN = 32
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def tiny_config(arch: str, n_experts: int = 8, top_k: int = 2, n_layers: int = 2,
                **overrides) -> transformers.PretrainedConfig:
    """The config of a tiny `arch` model with `n_layers` MoE layers; `overrides` set any config field."""
    common = dict(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, pad_token_id=PAD_ID, bos_token_id=None, eos_token_id=EOS_ID,
                  tie_word_embeddings=False, num_hidden_layers=n_layers, num_experts_per_tok=top_k)
    if arch == "mixtral":
        cls, fields = transformers.MixtralConfig, dict(intermediate_size=48, num_local_experts=n_experts)
    elif arch == "qwen2_moe":
        cls, fields = transformers.Qwen2MoeConfig, dict(intermediate_size=64, moe_intermediate_size=24,
                                                        shared_expert_intermediate_size=40, num_experts=n_experts)
    elif arch == "qwen3_moe":
        cls, fields = transformers.Qwen3MoeConfig, dict(intermediate_size=64, head_dim=8, moe_intermediate_size=24,
                                                        num_experts=n_experts, norm_topk_prob=True)
    elif arch == "olmoe":
        cls, fields = transformers.OlmoeConfig, dict(intermediate_size=24, num_experts=n_experts)
    elif arch == "deepseek_v3":
        # a dense first layer, then MoE layers with a shared expert and group-limited routing (4 groups, keep 2)
        cls, fields = transformers.DeepseekV3Config, dict(
            num_hidden_layers=n_layers + 1, first_k_dense_replace=1, num_key_value_heads=4, intermediate_size=64,
            moe_intermediate_size=24, n_routed_experts=n_experts, n_shared_experts=1, n_group=4, topk_group=2,
            kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8)
    elif arch == "gpt_oss":
        # GPT-OSS's default YaRN rope expects a 32 x 4096 context
        cls, fields = transformers.GptOssConfig, dict(intermediate_size=24, head_dim=8, num_local_experts=n_experts,
                                                      sliding_window=8, max_position_embeddings=131072)
    else:
        raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")
    return cls(**(common | fields | overrides))


def tiny_moe(arch: str, seed: int = 0, n_experts: int = 8, top_k: int = 2, n_layers: int = 2,
             router_std: float = 0.5, **overrides) -> transformers.PreTrainedModel:
    """A float32, eval-mode, eager-attention random MoE CausalLM of `arch`; `overrides` set config fields."""
    config = tiny_config(arch, n_experts, top_k, n_layers, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        # wide router logits: routing varies across tokens and top-k margins dwarf float32 noise
        for name, param in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight", "mlp.router.bias")):
                param.normal_(0.0, router_std)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.05)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    return model.eval()


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII (ids < 128) with <pad>=0, <eos>=1, <unk>=2, left padding."""
    chars = sorted(set(string.printable) - set(string.whitespace) | {" "})
    vocab = {"<pad>": PAD_ID, "<eos>": EOS_ID, "<unk>": UNK_ID} | {c: i + 3 for i, c in enumerate(chars)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>", padding_side="left")
