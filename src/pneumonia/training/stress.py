"""The stressed validation: the validation films scored again under fixed perturbations.

Validation AUC saturates on this data (0.997-0.998 for every variant), so it cannot rank
models or tell whether a model reads the films' shape. The stressed validation replays the
validation split under fixed, deterministic changes of the kinds that differ between the
training folder and other films: the original aspect ratio (the Kermany copies were stretched
to a square, so a film from a wider original looks squeezed), loss of detail, exposure,
bright borders and noise. Models, calibration and thresholds are chosen on it
(docs/model.md), never on the test set.

The perturbations are :data:`pneumonia.shifts.PERTURBATIONS` (numpy: the same shifts set the
input check's refusal distance, on the torch side here and the lean side in ``pneumonia adapt``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pneumonia.evaluate import roc_auc, threshold_metrics
from pneumonia.shifts import PERTURBATIONS, SITE_SHIFTS, Shift, shifted_batches

__all__ = ["PERTURBATIONS", "SITE_SHIFTS", "StressedScores", "perturbed_batches"]


@dataclass(frozen=True)
class StressedScores:
    """Raw logits of the validation films under each perturbation (same order of films)."""

    y: np.ndarray
    logits: dict[str, np.ndarray]

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """(labels, logits) of every perturbation together, clean included."""
        names = list(self.logits)
        return np.concatenate([self.y] * len(names)), np.concatenate(
            [self.logits[k] for k in names]
        )


def perturbed_batches(
    x: np.ndarray,
    name: str,
    seed: int,
    batch_size: int = 128,
    table: dict[str, Shift] | None = None,
) -> list[torch.Tensor]:
    """The validation inputs under perturbation ``name`` (of ``table``, by default
    :data:`PERTURBATIONS`), in batches; deterministic for ``seed``. The shifts themselves are
    :mod:`pneumonia.shifts` (numpy, shared with the lean side); this only makes tensors."""
    return [torch.from_numpy(b) for b in shifted_batches(x, name, seed, batch_size, table)]


def stressed_logits(
    predict: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray, y: np.ndarray, seed: int = 0
) -> StressedScores:
    """Score the validation inputs ``x`` under every perturbation with ``predict`` (logits)."""
    logits = {}
    with torch.no_grad():
        for name in PERTURBATIONS:
            parts = [
                predict(b).detach().cpu().double().numpy() for b in perturbed_batches(x, name, seed)
            ]
            logits[name] = np.concatenate(parts) if parts else np.zeros(0)
    return StressedScores(np.asarray(y), logits)


def stressed_report(
    y: np.ndarray, probs: dict[str, np.ndarray], threshold: float
) -> dict[str, Any]:
    """AUC, sensitivity, specificity and normals' false-positive rate per perturbation, and the worst case."""
    rows: dict[str, dict[str, Any]] = {}
    for name, p in probs.items():
        m = threshold_metrics(y, p, threshold)
        spec = m["specificity"]
        rows[name] = {
            "auc": roc_auc(y, p),
            "sensitivity": m["sensitivity"],
            "specificity": spec,
            "fpr_normals": None if spec is None else 1.0 - spec,
            "balanced_accuracy": None
            if spec is None or m["sensitivity"] is None
            else (spec + m["sensitivity"]) / 2,
        }

    def worst(key: str, fn: Callable[[list[float]], float]) -> dict[str, Any]:
        vals = {k: r[key] for k, r in rows.items() if r[key] is not None}
        name = min(vals, key=vals.__getitem__) if fn is min else max(vals, key=vals.__getitem__)
        return {"value": vals[name], "perturbation": name}

    return {
        "threshold": threshold,
        "perturbations": rows,
        "worst": {
            "auc": worst("auc", min),
            "sensitivity": worst("sensitivity", min),
            "specificity": worst("specificity", min),
            "fpr_normals": worst("fpr_normals", max),
            "balanced_accuracy": worst("balanced_accuracy", min),
        },
        "mean_auc": float(np.mean([r["auc"] for r in rows.values()])),
    }
