"""Teacher-forced evaluation: perplexity on WikiText-2 test articles, packed into blocks.

    from cfmoe.evaluate import test_blocks, perplexity
    ppl = perplexity(lm, test_blocks(tok, block_size=256))["perplexity"]
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import data, metrics, routing
from .training import causal_lm_loss


def test_blocks(tokenizer, block_size: int, max_tokens: int = 0, split: str = "test") -> dict[str, np.ndarray]:
    """A study split's articles (`data.STUDY_SPLITS`: heading + body, EOS-separated) packed into blocks with
    document ids; the first `max_tokens` tokens' worth of blocks when > 0."""
    packed = data.pack_documents(tokenizer, data.study_articles(split), block_size)
    if max_tokens > 0:
        n = max(1, max_tokens // block_size)
        packed = {k: v[:n] for k, v in packed.items()}
    return packed


@torch.no_grad()
def perplexity(model, blocks: dict[str, np.ndarray], batch_size: int = 8) -> dict[str, float]:
    """Token-level perplexity (under the model's own tokenizer) over all next-token predictions."""
    model.eval()
    device = next(model.parameters()).device
    input_ids = torch.as_tensor(blocks["input_ids"])
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(input_ids), batch_size):
        batch = input_ids[start:start + batch_size].to(device)
        logits = model(input_ids=batch).logits
        n = batch[:, 1:].numel()
        total_nll += float(causal_lm_loss(logits, batch)) * n
        total_tokens += n
    nll = total_nll / total_tokens
    return {"nll": nll, "perplexity": math.exp(nll), "tokens": total_tokens}


@torch.no_grad()
def record_test(lm, blocks: dict[str, np.ndarray], batch_size: int = 8) -> tuple[dict, np.ndarray]:
    """Perplexity over `blocks` and the experts every token used, (tokens, layers, k), in one pass."""
    with routing.record_routing(lm) as recorder:  # no padding: recorded rows are the blocks' tokens
        ppl = perplexity(lm, blocks, batch_size)
    return ppl, np.concatenate([experts for experts, _ in recorder.calls()])


def locality(ppl: dict, experts: np.ndarray, blocks: dict[str, np.ndarray]) -> dict:
    """Test perplexity and ECR from `record_test`'s output (pairs inside one article and one block only)."""
    docs = blocks["document_ids"]
    valid = (docs[:, 1:] == docs[:, :-1])
    # a pair that straddles two blocks was never seen together by the model
    valid = np.concatenate([valid, np.zeros((len(docs), 1), bool)], axis=1).reshape(-1)[:-1]
    per_layer = metrics.expert_consistency_rate(experts, per_layer=True, valid_pairs=valid)
    return {"test_ppl": ppl["perplexity"], "tokens": ppl["tokens"], "test_ecr": float(per_layer.mean()),
            "per_layer_ecr": per_layer, "experts": experts, "valid_pairs": valid}


def test_locality(lm, tokenizer, block_size: int, max_tokens: int = 0, batch_size: int = 8) -> dict:
    """Teacher-forced WikiText-2 test perplexity and ECR in one pass."""
    blocks = test_blocks(tokenizer, block_size, max_tokens)
    return locality(*record_test(lm, blocks, batch_size), blocks)
