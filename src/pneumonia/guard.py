"""The input check: is this a chest X-ray at all, and is it like the films the model learnt from?

A classifier knows only its two labels, so without this every photo, scanned form or
screenshot would come back NORMAL or PNEUMONIA with confidence. Every path (the service,
``pneumonia predict``, ``score`` and ``evaluate``) runs two stages on what the model already
computes:

1. Image checks, fixed rules on the decoded image and the model input (about 0.1 ms): colour
   (radiographs have none; counted by the decoder before the gray conversion, see
   :class:`pneumonia.preprocess.DecodeStats`), almost no contrast (blank or uniform), pixel
   noise, and a flat background covering most of the image (pages, drawings, screenshots).
   Each rule's bound sits well outside what any training or validation film reaches
   (docs/input_check.md gives the measured ranges).
2. A distance in the network's own pooled penultimate features (the ``embedding`` output of
   the exported graph): a Mahalanobis distance under probabilistic PCA (Tipping & Bishop
   1999), i.e. a Gaussian fitted to the training-split films whose covariance keeps the
   ``k`` leading directions and shrinks the rest to their mean variance. It needs ``k x D``
   floats (about 330 KB for k = 64, D = 1280) and one small matrix product. Fitted on the
   training split only; the flag threshold is the validation films' 99.5th percentile, the
   refusal threshold a fixed multiple of it (:data:`REFUSE_FACTOR`).

Outcomes: ``typical``; ``unlike_training`` (a radiograph unlike the training films: the
answer is given, with a warning); ``not_a_chest_xray`` (refused with 422, or only flagged when
the operator asks). It is a screen, not a guarantee: an unusual film can be refused and an odd
image can pass.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pneumonia.preprocess import DecodeStats, ImageError

#: Key of the fitted feature statistics inside the ONNX file's metadata_props.
GUARD_METADATA_KEY = "input_guard"
#: Name of the exported graph's pooled-feature output.
EMBEDDING_OUTPUT = "embedding"

TYPICAL = "typical"
UNLIKE_TRAINING = "unlike_training"
NOT_A_CHEST_XRAY = "not_a_chest_xray"
OUTCOMES = (TYPICAL, UNLIKE_TRAINING, NOT_A_CHEST_XRAY)

#: More than this share of coloured pixels (see preprocess.COLOUR_SPREAD) is not a radiograph;
#: a coloured marker or annotation on a film covers far less.
MAX_COLOUR_FRACTION = 0.05
#: Standard deviation of the model input (values in [0, 1]) below which an image is blank.
MIN_CONTRAST = 0.03
#: Mean absolute difference of neighbouring input pixels, relative to the image's standard
#: deviation, above which it is noise (independent pixels give about 1.1; films about 0.05).
MAX_NOISE = 0.45
#: Fewest distinct grey levels (of 256) in the model input; every training film has over 130.
MIN_GREY_LEVELS = 32
#: Least fine detail: mean absolute Laplacian of a 64x64 box-averaged copy of the input,
#: relative to its standard deviation. Gradients and smooth drawings have almost none
#: (under 0.06); every training film has over 0.13 (ribs, vessels, edges).
MIN_DETAIL = 0.07
#: Largest share of the input in one of 64 grey levels: a page, drawing or screenshot is a flat
#: background; a film's darkest or brightest tone rarely covers over a third of it.
MAX_FLAT_SHARE = 0.6
#: The refusal threshold is this many times the flag threshold (the validation 99.5th
#: percentile of the feature distance).
REFUSE_FACTOR = 2.0
#: Share of validation films the flag threshold leaves unflagged.
FLAG_QUANTILE = 0.995
#: Leading principal directions of the training features kept with their own variance.
DEFAULT_COMPONENTS = 64

FORMAT_VERSION = 1


class NotAChestXrayError(ImageError):
    """The image was refused by the input check: it does not look like a chest radiograph."""

    code = NOT_A_CHEST_XRAY


@dataclass(frozen=True)
class InputCheck:
    """One image's verdict.

    Attributes:
        outcome: One of ``OUTCOMES``.
        score: Feature distance in units of the flag threshold (1.0: as unusual as the most
            unusual 0.5% of validation films; ``REFUSE_FACTOR``: refused). None when the model
            carries no fitted feature statistics.
        reasons: Why the outcome is not ``typical``, for people.
    """

    outcome: str
    score: float | None
    reasons: tuple[str, ...] = ()

    @property
    def message(self) -> str:
        if self.outcome == TYPICAL:
            return "the image is like the films the model was trained and validated on"
        if self.outcome == UNLIKE_TRAINING:
            return (
                "this radiograph is unlike the films the model was trained and validated on "
                f"({'; '.join(self.reasons)}); its answer has not been validated for such films"
            )
        return (
            f"this does not look like a chest X-ray ({'; '.join(self.reasons)}); "
            "send a frontal chest radiograph as JPEG, PNG or DICOM"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "score": self.score, "message": self.message}

    def error(self) -> NotAChestXrayError:
        return NotAChestXrayError(self.message)


def image_reasons(x: np.ndarray, stats: DecodeStats | None = None) -> list[str]:
    """The image checks' reasons to refuse ``x``, one model input (C, H, W) in [0, 1].

    Args:
        x: The preprocessed image.
        stats: What the decoder saw (colour); None skips the colour rule.
    """
    reasons = []
    if (
        stats is not None
        and stats.colour_fraction is not None
        and stats.colour_fraction > MAX_COLOUR_FRACTION
    ):
        reasons.append(
            f"{stats.colour_fraction:.0%} of its pixels are coloured; radiographs are gray"
        )
    img = np.asarray(x[0], dtype=np.float32)
    std = float(img.std())
    if std < MIN_CONTRAST:
        reasons.append(f"it is blank or almost uniform (contrast {std:.3f})")
        return reasons
    diff = (
        float(np.abs(np.diff(img, axis=0)).mean()) + float(np.abs(np.diff(img, axis=1)).mean())
    ) / 2
    if diff / std > MAX_NOISE:
        reasons.append(
            f"it looks like noise (pixel-to-pixel variation {diff / std:.2f} of its contrast)"
        )
    levels = int(np.count_nonzero(np.bincount((img * 255).astype(np.uint8).ravel(), minlength=256)))
    if levels < MIN_GREY_LEVELS:
        reasons.append(f"it has only {levels} grey levels")
    detail = _detail(img) / std
    if detail < MIN_DETAIL:
        reasons.append(
            f"it is too smooth for a radiograph, as a gradient or drawing is (detail {detail:.3f})"
        )
    flat = (
        float(np.bincount(np.minimum((img * 64).astype(np.int64), 63).ravel(), minlength=64).max())
        / img.size
    )
    if flat > MAX_FLAT_SHARE:
        reasons.append(f"{flat:.0%} of it is one flat tone, as in a page, drawing or screenshot")
    return reasons


def _detail(img: np.ndarray) -> float:
    """Mean absolute Laplacian of a 64x64 box-averaged copy of ``img`` (2-D, values in [0, 1])."""
    h, w = img.shape
    ys = np.linspace(0, h, 65).astype(int)
    xs = np.linspace(0, w, 65).astype(int)
    small = np.add.reduceat(np.add.reduceat(img, ys[:-1], axis=0), xs[:-1], axis=1)
    small /= np.outer(np.diff(ys), np.diff(xs))
    lap = (
        4 * small[1:-1, 1:-1]
        - small[:-2, 1:-1]
        - small[2:, 1:-1]
        - small[1:-1, :-2]
        - small[1:-1, 2:]
    )
    return float(np.abs(lap).mean())


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def _unb64(s: str, shape: tuple[int, ...]) -> np.ndarray:
    a = np.frombuffer(base64.b64decode(s), dtype="<f4")
    if a.size != math.prod(shape):
        raise ValueError(f"stored array has {a.size} values, expected shape {shape}")
    return a.reshape(shape).astype(np.float32)


@dataclass(frozen=True)
class FeatureGuard:
    """Fitted statistics of the training films' features and the two thresholds.

    Attributes:
        mean: Mean training feature (D,).
        components: Leading principal directions (k, D), orthonormal rows.
        variances: Their variances (k,).
        residual_variance: Mean variance of the other D - k directions.
        flag_distance: Distance above which a film is ``unlike_training``.
        refuse_distance: Distance above which an image is ``not_a_chest_xray``.
        fitted: How it was fitted (data, split, counts, quantiles), for the model card.
    """

    mean: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    residual_variance: float
    flag_distance: float
    refuse_distance: float
    fitted: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Root mean squared whitened deviation (about 1 for a typical training film), (N,)."""
        z = np.asarray(features, dtype=np.float32).reshape(len(features), -1) - self.mean
        proj = z @ self.components.T
        inside = (proj**2 / self.variances).sum(axis=1)
        residual = (
            np.maximum((z**2).sum(axis=1) - (proj**2).sum(axis=1), 0.0) / self.residual_variance
        )
        out: np.ndarray = np.sqrt((inside + residual) / self.dim).astype(np.float64)
        return out

    def check(self, features: np.ndarray, reasons: list[list[str]]) -> list[InputCheck]:
        """Verdicts for a batch of features, given each image's image-check reasons."""
        out = []
        for d, why in zip(self.distance(features), reasons, strict=True):
            score = float(d / self.flag_distance)
            why = list(why)
            if d > self.refuse_distance:
                why.append(
                    f"its features are {score:.1f}x the flag distance from the training films'"
                )
            if why:
                out.append(InputCheck(NOT_A_CHEST_XRAY, score, tuple(why)))
            elif d > self.flag_distance:
                out.append(
                    InputCheck(
                        UNLIKE_TRAINING,
                        score,
                        (f"feature distance {score:.2f}x the flag threshold",),
                    )
                )
            else:
                out.append(InputCheck(TYPICAL, score))
        return out

    def summary(self) -> dict[str, Any]:
        """What the model card says about the check (no arrays)."""
        return {
            "method": "Mahalanobis distance under probabilistic PCA of the pooled penultimate features",
            "dim": self.dim,
            "components": int(self.components.shape[0]),
            "flag_distance": self.flag_distance,
            "refuse_distance": self.refuse_distance,
            "image_checks": image_check_limits(),
            **self.fitted,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "dim": self.dim,
            "components_k": int(self.components.shape[0]),
            "mean": _b64(self.mean),
            "components": _b64(self.components),
            "variances": _b64(self.variances),
            "residual_variance": self.residual_variance,
            "flag_distance": self.flag_distance,
            "refuse_distance": self.refuse_distance,
            "fitted": self.fitted,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureGuard:
        """Rebuild from :meth:`to_dict`; raises ValueError naming what is wrong."""
        try:
            if d["format"] != FORMAT_VERSION:
                raise ValueError(f"input check format {d['format']!r}, expected {FORMAT_VERSION}")
            dim, k = int(d["dim"]), int(d["components_k"])
            guard = cls(
                mean=_unb64(d["mean"], (dim,)),
                components=_unb64(d["components"], (k, dim)),
                variances=_unb64(d["variances"], (k,)),
                residual_variance=float(d["residual_variance"]),
                flag_distance=float(d["flag_distance"]),
                refuse_distance=float(d["refuse_distance"]),
                fitted=dict(d.get("fitted", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid input check statistics: {exc!r}") from None
        if (
            not (0 < guard.flag_distance <= guard.refuse_distance)
            or guard.residual_variance <= 0
            or (guard.variances <= 0).any()
        ):
            raise ValueError("invalid input check statistics: thresholds or variances out of range")
        return guard


def image_check_limits() -> dict[str, float]:
    return {
        "max_colour_fraction": MAX_COLOUR_FRACTION,
        "min_contrast": MIN_CONTRAST,
        "max_noise": MAX_NOISE,
        "min_grey_levels": MIN_GREY_LEVELS,
        "min_detail": MIN_DETAIL,
        "max_flat_share": MAX_FLAT_SHARE,
    }


def fit_feature_guard(
    train: np.ndarray,
    validation: np.ndarray,
    components: int = DEFAULT_COMPONENTS,
    flag_quantile: float = FLAG_QUANTILE,
    refuse_factor: float = REFUSE_FACTOR,
    fitted: dict[str, Any] | None = None,
) -> FeatureGuard:
    """Fit the feature statistics on training features, the thresholds on validation features.

    Args:
        train: Features of the training-split films (N, D).
        validation: Features of the validation-split films (M, D); only their distances are
            used, to set the thresholds.
        components: Principal directions kept (capped at N - 1 and D - 1).
        flag_quantile: Share of validation films below the flag threshold.
        refuse_factor: Refusal threshold as a multiple of the flag threshold.
        fitted: Provenance to store (data, split, ...).
    """
    train = np.asarray(train, dtype=np.float64)
    n, dim = train.shape
    if n < 3 or len(validation) < 1:
        raise ValueError(
            f"need at least 3 training and 1 validation features, got {n} and {len(validation)}"
        )
    mean = train.mean(axis=0)
    _, s, vt = np.linalg.svd(train - mean, full_matrices=False)
    var = s**2 / (n - 1)
    k = max(1, min(components, n - 1, dim - 1))
    total = float(var.sum()) if var.size else 0.0
    floor = max(total / dim, 1e-12) * 1e-3
    residual = max((total - float(var[:k].sum())) / (dim - k), floor)
    guard = FeatureGuard(
        mean=mean.astype(np.float32),
        components=vt[:k].astype(np.float32),
        variances=np.maximum(var[:k], residual).astype(np.float32),
        residual_variance=residual,
        flag_distance=1.0,
        refuse_distance=1.0,
    )
    val_d = guard.distance(validation)
    train_d = guard.distance(train)
    flag = float(np.quantile(val_d, flag_quantile))
    info = {
        **(fitted or {}),
        "n_train": n,
        "n_validation": len(validation),
        "flag_rule": f"{flag_quantile:.1%} quantile of the validation films' distances",
        "refuse_rule": f"{refuse_factor:g} x the flag distance",
        "validation_distance_quantiles": {
            q: float(np.quantile(val_d, float(q))) for q in ("0.5", "0.9", "0.99", "0.995", "1.0")
        },
        "train_distance_quantiles": {
            q: float(np.quantile(train_d, float(q))) for q in ("0.5", "0.99", "1.0")
        },
        "validation_flagged": float((val_d > flag).mean()),
        "validation_refused": float((val_d > flag * refuse_factor).mean()),
    }
    return FeatureGuard(
        mean=guard.mean,
        components=guard.components,
        variances=guard.variances,
        residual_variance=guard.residual_variance,
        flag_distance=flag,
        refuse_distance=flag * refuse_factor,
        fitted=info,
    )


def image_only_check(reasons: list[str]) -> InputCheck:
    """The verdict for a model without fitted feature statistics: the image checks alone."""
    return InputCheck(NOT_A_CHEST_XRAY if reasons else TYPICAL, None, tuple(reasons))
