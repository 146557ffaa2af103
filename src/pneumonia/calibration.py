"""Calibration by a temperature and a bias on the logit (Platt scaling), numpy only.

``p = sigmoid(logit / temperature + bias)``. The temperature corrects over- or
under-confidence (Guo et al. 2017, https://arxiv.org/abs/1706.04599); the bias restores the
class prior that class-weighted training removes (the network is trained as if the classes
were balanced, so its raw logits are shifted by about log(#PNEUMONIA / #NORMAL)). Temperature
alone cannot undo that shift. Both are fitted on the validation split by minimising its NLL.

Shared by training (fitting) and prediction (applying), so the serving path needs no torch.
"""

from __future__ import annotations

import numpy as np

#: Bounds of the fit, so that a (near-)separable validation set cannot drive it to infinity.
TEMPERATURE_BOUNDS = (0.05, 20.0)
BIAS_BOUND = 20.0


def sigmoid(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    out: np.ndarray = np.exp(-np.logaddexp(0.0, -z))
    return out


def _scaled(logits: np.ndarray, temperature: float, bias: float) -> np.ndarray:
    return np.asarray(logits, dtype=np.float64) / temperature + bias


def calibrated_probability(logits: np.ndarray, temperature: float, bias: float = 0.0) -> np.ndarray:
    """P(PNEUMONIA) = sigmoid(logit / temperature + bias)."""
    return sigmoid(_scaled(logits, temperature, bias))


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0, bias: float = 0.0) -> float:
    """Mean binary cross-entropy of the calibrated logits."""
    z = _scaled(logits, temperature, bias)
    y = np.asarray(y, dtype=np.float64)
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def _best_bias(z: np.ndarray, y: np.ndarray, iters: int = 50) -> float:
    """The bias minimising the NLL of ``sigmoid(z + bias)`` (1-D Newton, bounded)."""
    b = 0.0
    for _ in range(iters):
        p = sigmoid(z + b)
        grad, curv = float(np.mean(p - y)), float(np.mean(p * (1 - p)))
        step = grad / max(curv, 1e-12)
        nb = float(np.clip(b - step, -BIAS_BOUND, BIAS_BOUND))
        current = nll(z, y, 1.0, b)
        while nll(z, y, 1.0, nb) > current and abs(nb - b) > 1e-12:
            nb = (nb + b) / 2  # damp an overshooting step
        if abs(nb - b) < 1e-10:
            return nb
        b = nb
    return b


def fit_calibration(logits: np.ndarray, y: np.ndarray, iters: int = 80) -> tuple[float, float]:
    """(temperature, bias) minimising the NLL of ``sigmoid(logit / temperature + bias)``.

    Golden-section search on log(temperature) around a 1-D Newton fit of the bias: the NLL
    is jointly convex in (1 / temperature, bias), so its minimum over the bias is unimodal in
    the temperature, and the search finds the bounded minimum.

    Args:
        logits: Raw validation logits.
        y: Validation labels (1 = PNEUMONIA).
        iters: Golden-section steps.

    Returns:
        The temperature (within ``TEMPERATURE_BOUNDS``) and the bias (within ``BIAS_BOUND``).
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)

    def profile(log_t: float) -> tuple[float, float]:
        scaled = z / np.exp(log_t)
        b = _best_bias(scaled, y)
        return nll(scaled, y, 1.0, b), b

    lo, hi = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])
    phi = (np.sqrt(5) - 1) / 2
    c, d = hi - phi * (hi - lo), lo + phi * (hi - lo)
    for _ in range(iters):
        if profile(c)[0] < profile(d)[0]:
            hi, d = d, c
            c = hi - phi * (hi - lo)
        else:
            lo, c = c, d
            d = lo + phi * (hi - lo)
    log_t = (lo + hi) / 2
    return float(np.exp(log_t)), profile(log_t)[1]
