"""Text-quality measures against hand counts, and conditional perplexity against a direct computation."""

import math

import numpy as np
import pytest
import torch

from cfmoe.textquality import conditional_perplexity, distinct_n, repeated_ngram_rate
from tiny_models import tiny_moe, tiny_tokenizer


def test_distinct_and_repetition_by_hand():
    tokens = [1, 2, 1, 2, 1, 2]  # bigrams 12 21 12 21 12: 2 distinct of 5
    assert distinct_n(tokens, 1) == pytest.approx(2 / 6)
    assert distinct_n(tokens, 2) == pytest.approx(2 / 5)
    # 4-grams 1212, 2121, 1212: the third repeats the first
    assert repeated_ngram_rate(tokens, 4) == pytest.approx(1 / 3)
    assert repeated_ngram_rate(np.arange(10), 4) == 0.0 and distinct_n(np.arange(10), 3) == 1.0
    assert math.isnan(distinct_n([1, 2], 3)) and math.isnan(repeated_ngram_rate([], 4))
    with pytest.raises(ValueError, match="n must be a positive int, got 0"):
        distinct_n(tokens, 0)


def test_conditional_perplexity_counts_target_tokens_only():
    lm, tok = tiny_moe("qwen2_moe"), tiny_tokenizer()
    prompts, targets = ["the cat", "a dog ran"], [" sat on the mat", " far away"]
    result = conditional_perplexity(lm, tok, prompts, targets, max_positions=64)
    nlls, counts = [], []
    with torch.no_grad():
        for p, t in zip(prompts, targets):
            pi, ti = tok(p)["input_ids"], tok(t, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(lm(input_ids=torch.tensor([pi + ti])).logits[0].float(), -1)
            nll = -sum(float(logp[len(pi) - 1 + j, ti[j]]) for j in range(len(ti)))
            nlls.append(nll)
            counts.append(len(ti))
    assert result["perplexity"] == pytest.approx([math.exp(n / c) for n, c in zip(nlls, counts)], rel=1e-4)
    assert result["overall"] == pytest.approx(math.exp(sum(nlls) / sum(counts)), rel=1e-4)
    assert result["tokens"] == counts


def test_conditional_perplexity_rejects_bad_input():
    lm, tok = tiny_moe("qwen2_moe"), tiny_tokenizer()
    with pytest.raises(ValueError, match="need as many prompts as targets"):
        conditional_perplexity(lm, tok, ["a"], [], max_positions=64)
    with pytest.raises(ValueError, match="leaves no room for its target"):
        conditional_perplexity(lm, tok, ["the cat sat on the mat"], [" x"], max_positions=3)
