"""Calibration (temperature and bias): recovers known values, lowers NLL, stable for huge logits."""

from __future__ import annotations

import numpy as np
import pytest

from pneumonia.calibration import (
    TEMPERATURE_BOUNDS,
    calibrated_probability,
    fit_calibration,
    nll,
    sigmoid,
)


def synthetic_logits(
    t0: float, b0: float = 0.0, n: int = 8_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Logits z and labels y ~ Bernoulli(sigmoid(z / t0 + b0)): the true calibration is (t0, b0)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 4.0, n)
    y = (rng.random(n) < sigmoid(z / t0 + b0)).astype(np.int64)
    return z, y


@pytest.mark.parametrize(("t0", "b0"), [(0.5, 0.0), (1.0, 1.2), (2.5, -0.8)])
def test_fit_recovers_the_true_temperature_and_bias(t0: float, b0: float) -> None:
    z, y = synthetic_logits(t0, b0)
    t, b = fit_calibration(z, y)
    assert t == pytest.approx(t0, rel=0.1)
    assert b == pytest.approx(b0, abs=0.15)


@pytest.mark.parametrize(("t0", "b0"), [(0.5, 0.0), (2.5, 1.0)])
def test_fit_is_the_nll_minimum(t0: float, b0: float) -> None:
    z, y = synthetic_logits(t0, b0, seed=1)
    t, b = fit_calibration(z, y)
    best = nll(z, y, t, b)
    assert best < nll(z, y, 1.0, 0.0)
    # nudging either parameter either way does not help
    for tt, bb in [(t * 1.02, b), (t / 1.02, b), (t, b + 0.02), (t, b - 0.02)]:
        assert best <= nll(z, y, tt, bb)


def test_bias_undoes_a_prior_shift_that_temperature_cannot() -> None:
    """Class-weighted training shifts logits by a constant; a temperature alone cannot fix it."""
    z, y = synthetic_logits(1.0, 1.5, seed=2)
    t, b = fit_calibration(z, y)
    assert nll(z, y, t, b) < min(nll(z, y, s, 0.0) for s in np.geomspace(0.2, 5, 200))


def test_fit_stays_in_its_bounds_on_separable_data() -> None:
    z = np.array([-5.0, -3.0, 3.0, 5.0])
    y = np.array([0, 0, 1, 1])  # separable: NLL keeps falling as T -> 0
    t, b = fit_calibration(z, y)
    assert t == pytest.approx(TEMPERATURE_BOUNDS[0], rel=1e-3)
    assert np.isfinite(b)


def test_nll_matches_the_textbook_formula() -> None:
    z = np.array([-2.0, -0.5, 0.0, 1.0, 3.0])
    y = np.array([0, 1, 0, 1, 1])
    p = 1 / (1 + np.exp(-(z / 1.7 + 0.3)))
    expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert nll(z, y, 1.7, 0.3) == pytest.approx(expected)


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


def test_calibrated_probability_is_monotone_and_symmetric_without_bias() -> None:
    z = np.linspace(-30, 30, 601)
    p = calibrated_probability(z, 1.7)
    assert (np.diff(p) >= 0).all()
    np.testing.assert_allclose(p + p[::-1], 1.0, atol=1e-12)


def test_bias_moves_the_midpoint() -> None:
    assert calibrated_probability(np.array([-1.7 * 0.8]), 1.7, 0.8)[0] == pytest.approx(0.5)
