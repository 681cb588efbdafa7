"""cfmoe — a reproducible study and toolkit for cache-friendly Mixture-of-Experts inference.

    from cfmoe import data, model
    corpus = data.pretraining_corpus()
"""

__version__ = "0.1.0"
