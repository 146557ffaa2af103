"""The stressed validation: fixed, deterministic for a seed, and each perturbation does what
its name says."""

from __future__ import annotations

import numpy as np
import torch

from pneumonia.training.stress import (
    PERTURBATIONS,
    SITE_SHIFTS,
    perturbed_batches,
    stressed_logits,
    stressed_report,
)


def _films(n: int = 6, size: int = 48) -> np.ndarray:
    return np.random.default_rng(0).random((n, 1, size, size), dtype=np.float32)


def _ratio(x: torch.Tensor) -> float:
    """Mean |dx| / mean |dy|: the aspect shortcut statistic."""
    return float(
        (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
        / (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    )


def test_every_perturbation_keeps_shape_and_range_and_is_deterministic_for_a_seed() -> None:
    x = _films()
    for name in PERTURBATIONS:
        a = torch.cat(perturbed_batches(x, name, seed=3, batch_size=4))
        b = torch.cat(perturbed_batches(x, name, seed=3, batch_size=4))
        assert a.shape == x.shape and a.dtype == torch.float32, name
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0, name
        assert torch.equal(a, b), name
        if name != "clean":
            assert not torch.equal(a, torch.from_numpy(x)), name
    noisy = [torch.cat(perturbed_batches(x, "noise_0.03", seed=s)) for s in (1, 2)]
    assert not torch.equal(*noisy)


def test_every_site_shift_keeps_shape_and_range_changes_the_film_and_is_deterministic() -> None:
    x = _films(size=64)
    assert set(PERTURBATIONS) - {"clean"} <= set(SITE_SHIFTS) and "clean" not in SITE_SHIFTS
    for name in SITE_SHIFTS:
        a = torch.cat(perturbed_batches(x, name, seed=3, batch_size=4, table=SITE_SHIFTS))
        b = torch.cat(perturbed_batches(x, name, seed=3, batch_size=4, table=SITE_SHIFTS))
        assert a.shape == x.shape and a.dtype == torch.float32, name
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0, name
        assert torch.equal(a, b) and not torch.equal(a, torch.from_numpy(x)), name
    g = np.random.default_rng(0)
    out = SITE_SHIFTS["zoom_out_0.8"](x, g)
    # The frame around the shrunk film is each film's darkest tone.
    assert np.array_equal(
        out[:, :, 0, :], np.broadcast_to(x.min(axis=(2, 3))[:, :, None], (6, 1, 64))
    )
    assert np.allclose(SITE_SHIFTS["inverted"](x, g), 1 - x)
    ramp = (np.full((1, 1, 8, 8), 0.2) * np.arange(64.0).reshape(1, 1, 8, 8) / 12.6).clip(0, 1)
    assert float(SITE_SHIFTS["equalized"](ramp.astype(np.float32), g).max()) == 1.0


def test_shifts_are_one_numpy_implementation_shared_with_training() -> None:
    """Regression (issue 20): the site shifts had a torch copy on the training side only; the
    lean side (``pneumonia adapt``) needs them too, so training now wraps the numpy ones."""
    from pneumonia import shifts
    from pneumonia.training import stress

    assert stress.SITE_SHIFTS is shifts.SITE_SHIFTS and stress.PERTURBATIONS is shifts.PERTURBATIONS
    x = _films(n=3, size=32)
    a = torch.cat(perturbed_batches(x, "blur_1.5", 0, table=SITE_SHIFTS)).numpy()
    b = np.concatenate(list(shifts.shifted_batches(x, "blur_1.5", 0, table=SITE_SHIFTS)))
    assert np.array_equal(a, b)


def test_wider_raises_and_narrower_lowers_the_shape_statistic() -> None:
    # A smooth image with equal horizontal and vertical structure.
    t = torch.linspace(0, 6.28, 96)
    img = (torch.sin(t)[None, :] + torch.sin(t)[:, None]) / 4 + 0.5
    x = img[None, None].numpy().astype(np.float32)
    base = _ratio(torch.from_numpy(x))
    assert (
        _ratio(torch.cat(perturbed_batches(x, "wider_20", 0)))
        > _ratio(torch.cat(perturbed_batches(x, "wider_10", 0)))
        > base
    )
    assert (
        _ratio(torch.cat(perturbed_batches(x, "narrower_20", 0)))
        < _ratio(torch.cat(perturbed_batches(x, "narrower_10", 0)))
        < base
    )


def test_report_has_every_perturbation_and_the_worst_case() -> None:
    x = _films(8)
    y = np.array([0, 1] * 4)

    def predict(b: torch.Tensor) -> torch.Tensor:
        return b.mean((1, 2, 3)) * 10 - 5

    scores = stressed_logits(predict, x, y, seed=0)
    assert set(scores.logits) == set(PERTURBATIONS)
    py, pz = scores.pooled()
    assert len(py) == len(pz) == len(y) * len(PERTURBATIONS)
    probs = {k: 1 / (1 + np.exp(-z)) for k, z in scores.logits.items()}
    rep = stressed_report(y, probs, 0.5)
    assert set(rep["perturbations"]) == set(PERTURBATIONS)
    rows = rep["perturbations"]
    worst_spec = rep["worst"]["specificity"]
    assert worst_spec["value"] == min(r["specificity"] for r in rows.values())
    assert rows[worst_spec["perturbation"]]["specificity"] == worst_spec["value"]
    assert rep["worst"]["fpr_normals"]["value"] == max(r["fpr_normals"] for r in rows.values())
