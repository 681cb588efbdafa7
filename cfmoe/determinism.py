"""Seeds are not enough: pin threads, tokenizer parallelism and torch's deterministic kernels.

    from cfmoe.determinism import make_deterministic
    make_deterministic(seed=0, threads=2)
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def make_deterministic(seed: int, threads: int) -> None:
    """Make a CPU run bit-reproducible: same seed, same thread count, deterministic kernels."""
    # Rust-side parallelism in `tokenizers` changes BPE merge order on ties.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Float reductions split across a different number of threads give different sums.
    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
