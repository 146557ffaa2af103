"""Temperature scaling: recovers a known temperature, lowers NLL, stable for huge logits."""

from __future__ import annotations

import numpy as np
import pytest

from pneumonia.calibration import calibrated_probability, fit_temperature, nll, sigmoid


def synthetic_logits(t0: float, n: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits z and labels y ~ Bernoulli(sigmoid(z / t0)): the true temperature is t0."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 4.0, n)
    y = (rng.random(n) < sigmoid(z / t0)).astype(np.int64)
    return z, y


@pytest.mark.parametrize("t0", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_true_temperature(t0: float) -> None:
    z, y = synthetic_logits(t0)
    t = fit_temperature(z, y)
    assert t == pytest.approx(t0, rel=0.1)


@pytest.mark.parametrize("t0", [0.5, 2.5])
def test_fitted_temperature_lowers_nll(t0: float) -> None:
    z, y = synthetic_logits(t0, seed=1)
    t = fit_temperature(z, y)
    assert nll(z, y, t) < nll(z, y, 1.0)
    # and it is the minimum: nudging it either way does not help
    assert nll(z, y, t) <= min(nll(z, y, t * 1.05), nll(z, y, t / 1.05))


def test_fit_temperature_stays_in_its_bounds() -> None:
    z = np.array([-5.0, -3.0, 3.0, 5.0])
    y = np.array([0, 0, 1, 1])  # separable: NLL keeps falling as T -> 0
    assert fit_temperature(z, y, lo=0.05, hi=20.0) == pytest.approx(0.05, rel=1e-3)


def test_nll_matches_the_textbook_formula() -> None:
    z = np.array([-2.0, -0.5, 0.0, 1.0, 3.0])
    y = np.array([0, 1, 0, 1, 1])
    p = 1 / (1 + np.exp(-z / 1.7))
    expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert nll(z, y, 1.7) == pytest.approx(expected)


def test_calibrated_probability_is_stable_for_huge_logits() -> None:
    big = float(np.finfo(np.float32).max)  # the ONNX model's logits are float32
    z = np.array([-big, -1e4, -745.0, -40.0, 0.0, 40.0, 745.0, 1e4, big, np.inf, -np.inf])
    with np.errstate(over="raise", divide="raise", invalid="raise"):  # underflow to 0 is fine
        p = calibrated_probability(z, 0.05)
        confident = z[np.isfinite(z) & (z != 0)]
        loss = nll(confident, (confident > 0).astype(int), 0.05)
    assert np.isfinite(p).all()
    assert ((p >= 0.0) & (p <= 1.0)).all()
    assert p[0] == 0.0 and p[-3] == 1.0 and p[-2] == 1.0 and p[-1] == 0.0
    assert p[4] == 0.5
    assert np.isfinite(loss) and loss == pytest.approx(0.0, abs=1e-12)


def test_calibrated_probability_is_monotone_and_symmetric() -> None:
    z = np.linspace(-30, 30, 601)
    p = calibrated_probability(z, 1.7)
    assert (np.diff(p) >= 0).all()
    np.testing.assert_allclose(p + p[::-1], 1.0, atol=1e-12)
