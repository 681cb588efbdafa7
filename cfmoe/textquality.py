"""Quality of generated text, so that locality is not bought with degenerate output.

    distinct_n(tokens, 2); repeated_ngram_rate(tokens, 4)
    conditional_perplexity(lm, tokenizer, prompts, targets, max_positions=512)

Token-level measures over one output's token ids: `distinct_n` is the share of its n-grams that are distinct
(1 = no n-gram repeats); `repeated_ngram_rate` is the share of its n-grams that already occurred earlier in the
same output (the "rep-n" of Welleck et al., 2019; 0 = no repetition, a loop tends to 1).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .training import causal_lm_loss


def _ngrams(tokens, n: int) -> list[tuple]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    tokens = list(np.asarray(tokens).reshape(-1).tolist())
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(tokens, n: int) -> float:
    """Distinct n-grams / n-grams in one output; NaN when it is shorter than n."""
    grams = _ngrams(tokens, n)
    return len(set(grams)) / len(grams) if grams else float("nan")


def repeated_ngram_rate(tokens, n: int = 4) -> float:
    """Share of one output's n-grams that repeat an earlier n-gram of it; NaN when it is shorter than n."""
    grams = _ngrams(tokens, n)
    if not grams:
        return float("nan")
    seen, repeats = set(), 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams)


@torch.no_grad()
def conditional_perplexity(lm, tokenizer, prompts: list[str], targets: list[str], max_positions: int) -> dict:
    """Teacher-forced perplexity of each target given its prompt: the loss counts target tokens only.

    A target is cut to fit `max_positions` with its prompt. Returns per-item perplexities, token counts and the
    token-weighted perplexity over all items.
    """
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(f"need as many prompts as targets (at least one), got {len(prompts)} and {len(targets)}")
    lm.eval()
    device = next(lm.parameters()).device
    per_item, counts, total = [], [], 0.0
    for prompt, target in zip(prompts, targets):
        p = tokenizer(prompt)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"][:max_positions - len(p)]
        if not t:
            raise ValueError(f"prompt {prompt[:60]!r} leaves no room for its target in {max_positions} positions")
        ids = torch.tensor([p + t], device=device)
        labels = ids.clone()
        labels[:, :len(p)] = -100
        nll = float(causal_lm_loss(lm(input_ids=ids).logits, labels))
        per_item.append(math.exp(nll))
        counts.append(len(t))
        total += nll * len(t)
    return {"perplexity": per_item, "tokens": counts, "overall": math.exp(total / sum(counts))}
