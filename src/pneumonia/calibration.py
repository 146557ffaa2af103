"""Temperature scaling (Guo et al. 2017, https://arxiv.org/abs/1706.04599), numpy only.

Shared by training (fitting on the validation split) and prediction (applying), so the
serving path needs no torch.
"""

from __future__ import annotations

import numpy as np


def sigmoid(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def calibrated_probability(logits: np.ndarray, temperature: float) -> np.ndarray:
    """P(PNEUMONIA) from raw logits and a fitted temperature."""
    return sigmoid(np.asarray(logits, dtype=np.float64) / temperature)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean binary cross-entropy of temperature-scaled logits."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    y = np.asarray(y, dtype=np.float64)
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(logits: np.ndarray, y: np.ndarray, lo: float = 0.05, hi: float = 20.0) -> float:
    """Temperature minimising validation NLL (golden-section search on log T; NLL is convex)."""
    a, b = np.log(lo), np.log(hi)
    phi = (np.sqrt(5) - 1) / 2
    c, d = b - phi * (b - a), a + phi * (b - a)
    for _ in range(80):
        if nll(logits, y, np.exp(c)) < nll(logits, y, np.exp(d)):
            b, d = d, c
            c = b - phi * (b - a)
        else:
            a, c = c, d
            d = a + phi * (b - a)
    return float(np.exp((a + b) / 2))
