"""NumPy reference of next-token sampling (the book's chapter 5): the distribution that temperature,
top-k and top-p leave over the vocabulary, computed by sorting, in float64.

`jaxgpt.inference.sampling` finds the same thresholds by bisection and draws by inverse CDF; the
tests compare its kept sets with `kept` and its draw frequencies with `distribution`.
"""

from __future__ import annotations

import numpy as np


def kept(logits_v, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Which tokens may be drawn: those ≥ the k-th largest logit (ties stay), then, in order of
    probability, those whose strictly more probable tokens hold less than `top_p` (their ties
    stay too)."""
    scaled_v = np.asarray(logits_v, np.float64) / max(temperature, 1e-6)
    keep_v = np.ones(scaled_v.shape, bool)
    if 0 < top_k < len(scaled_v):
        keep_v &= scaled_v >= np.sort(scaled_v)[::-1][top_k - 1]
    if top_p < 1.0:
        probs_v = np.where(keep_v, np.exp(scaled_v - scaled_v[keep_v].max()), 0.0)
        probs_v /= probs_v.sum()
        above_v = np.array([probs_v[scaled_v > x].sum() for x in scaled_v])  # mass strictly above each token
        keep_v &= above_v < top_p
    return keep_v


def distribution(logits_v, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The probabilities a draw follows: softmax(logits / temperature) over the kept tokens
    (temperature 0: all mass on the first largest logit, as argmax picks)."""
    logits_v = np.asarray(logits_v, np.float64)
    if temperature == 0:
        return np.eye(len(logits_v))[np.argmax(logits_v)]
    scaled_v = logits_v / temperature
    keep_v = kept(logits_v, temperature, top_k, top_p)
    probs_v = np.where(keep_v, np.exp(scaled_v - scaled_v[keep_v].max()), 0.0)
    return probs_v / probs_v.sum()
