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
2. Two distances in the network's own features (the ``embedding`` output of the exported
   graph), each a Mahalanobis distance under probabilistic PCA (Tipping & Bishop 1999): a
   Gaussian fitted to the training-split films whose covariance keeps the ``k`` leading
   directions and shrinks the rest to their mean variance.

   - In the pooled **penultimate** features (what the head reads): far from the training
     films means a film the model was not validated on. Flag threshold: the validation films'
     99.5th percentile.
   - In **mid-level** feature statistics (for EfficientNet-Lite0, the channel means and
     standard deviations of its 5th and 6th stages): what a radiograph looks like to the
     network before it reads findings; photos, pages and screenshots are far from it while
     films from other sites stay near. Flag threshold as above; the refusal threshold is the
     largest distance any validation film reaches, as it is or under any of the simulated
     shifts of site (:data:`pneumonia.shifts.SITE_SHIFTS`: other aspect ratios,
     exposure, blur, noise, borders, zoom, rotation, burned-in text, inversion).

   Both are fitted on the training split only, thresholds on the validation split only; the
   statistics take about 0.4 MiB for the shipped model and one small matrix product each.
   Models exported before the mid-level features (format 1) refuse at :data:`REFUSE_FACTOR`
   times the penultimate flag distance.

Outcomes: ``typical``; ``unlike_training`` (a radiograph unlike the training films: the
answer is given, with a warning); ``not_a_chest_xray`` (refused with 422, or only flagged when
the operator asks); ``not_a_frontal_chest_xray`` (the same, decided by :mod:`pneumonia.frontal`
for a radiograph of another body part, another modality or a lateral view). It is a screen,
not a guarantee: an unusual film can be refused and an odd image can pass.
"""

from __future__ import annotations

import base64
import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pneumonia.preprocess import DecodeStats, ImageError

#: Name of the exported graph's pooled-feature output.
EMBEDDING_OUTPUT = "embedding"

TYPICAL = "typical"
UNLIKE_TRAINING = "unlike_training"
NOT_A_CHEST_XRAY = "not_a_chest_xray"
#: A radiograph (or image) that is not a frontal chest film: another body part, another
#: modality, a lateral view (pneumonia.frontal decides it).
NOT_A_FRONTAL_CHEST_XRAY = "not_a_frontal_chest_xray"
OUTCOMES = (TYPICAL, UNLIKE_TRAINING, NOT_A_CHEST_XRAY, NOT_A_FRONTAL_CHEST_XRAY)
#: The outcomes that are refused (422) unless the operator asks for flags only.
REFUSED_OUTCOMES = (NOT_A_CHEST_XRAY, NOT_A_FRONTAL_CHEST_XRAY)

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
#: Without mid-level features (models exported in format 1, or fitted with no shifted
#: validation films), the refusal threshold is this many times the flag threshold.
REFUSE_FACTOR = 2.0
#: Share of validation films the flag threshold leaves unflagged.
FLAG_QUANTILE = 0.995
#: Leading principal directions of the training features kept with their own variance.
DEFAULT_COMPONENTS = 64
#: The same for the mid-level feature statistics.
DEFAULT_MID_COMPONENTS = 32

FORMAT_VERSION = 2


class NotAChestXrayError(ImageError):
    """The image was refused by the input check: it does not look like a chest radiograph."""

    code = NOT_A_CHEST_XRAY


class NotAFrontalChestXrayError(NotAChestXrayError):
    """Refused by the frontal-chest check: another body part, modality or view.

    A subclass, so that every path that handles the input check's refusals handles this one
    the same way, with its own code.
    """

    code = NOT_A_FRONTAL_CHEST_XRAY


@dataclass(frozen=True)
class InputCheck:
    """One image's verdict.

    Attributes:
        outcome: One of ``OUTCOMES``.
        score: Penultimate feature distance in units of the flag threshold (1.0: as unusual
            as the most unusual 0.5% of validation films). None when the model carries no
            fitted feature statistics.
        reasons: Why the outcome is not ``typical``, for people.
        refusal_score: The distance the refusal reads (mid-level features; the penultimate
            ones in format-1 models) in units of the refusal threshold: above 1, refused as
            not a chest X-ray. None without fitted feature statistics.
    """

    outcome: str
    score: float | None
    reasons: tuple[str, ...] = ()
    refusal_score: float | None = None

    @property
    def message(self) -> str:
        if self.outcome == TYPICAL:
            return "the image is like the films the model was trained and validated on"
        if self.outcome == UNLIKE_TRAINING:
            return (
                "this radiograph is unlike the films the model was trained and validated on "
                f"({'; '.join(self.reasons)}); its answer has not been validated for such films"
            )
        if self.outcome == NOT_A_FRONTAL_CHEST_XRAY:
            return (
                f"this does not look like a frontal chest X-ray ({'; '.join(self.reasons)}); "
                "send a frontal (PA or AP) chest radiograph"
            )
        return (
            f"this does not look like a chest X-ray ({'; '.join(self.reasons)}); "
            "send a frontal chest radiograph as JPEG, PNG or DICOM"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "score": self.score,
            "refusal_score": self.refusal_score,
            "message": self.message,
        }

    @property
    def refused(self) -> bool:
        """Whether this outcome is refused when the operator has not asked for flags only."""
        return self.outcome in REFUSED_OUTCOMES

    def error(self) -> NotAChestXrayError:
        if self.outcome == NOT_A_FRONTAL_CHEST_XRAY:
            return NotAFrontalChestXrayError(self.message)
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
    small = _box_matrix(h) @ img @ _box_matrix(w).T
    lap = (
        4 * small[1:-1, 1:-1]
        - small[:-2, 1:-1]
        - small[2:, 1:-1]
        - small[1:-1, :-2]
        - small[1:-1, 2:]
    )
    return float(np.abs(lap).mean())


@functools.lru_cache(maxsize=8)
def _box_matrix(n: int, out: int = 64) -> np.ndarray:
    """(out, n) matrix averaging ``n`` samples into ``out`` nearly equal boxes (a matrix
    product is several times faster than ``np.add.reduceat`` over uneven boxes)."""
    edges = np.linspace(0, n, out + 1).astype(int)
    m = np.zeros((out, n), np.float32)
    for i, (a, b) in enumerate(itertools.pairwise(edges)):
        m[i, a:b] = 1.0 / max(1, b - a)
    return m


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def _unb64(s: str, shape: tuple[int, ...]) -> np.ndarray:
    a = np.frombuffer(base64.b64decode(s), dtype="<f4")
    if a.size != math.prod(shape):
        raise ValueError(f"stored array has {a.size} values, expected shape {shape}")
    return a.reshape(shape).astype(np.float32)


@dataclass(frozen=True)
class Ppca:
    """A Gaussian under probabilistic PCA: the ``k`` leading principal directions keep their
    own variances, the other D - k share their mean variance.

    Attributes:
        mean: Mean training feature (D,).
        components: Leading principal directions (k, D), orthonormal rows.
        variances: Their variances (k,).
        residual_variance: Mean variance of the other D - k directions.
    """

    mean: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    residual_variance: float

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

    @classmethod
    def fit(cls, train: np.ndarray, components: int) -> Ppca:
        """Fit on training features (N, D); ``components`` is capped at N - 1 and D - 1."""
        train = np.asarray(train, dtype=np.float64)
        n, dim = train.shape
        mean = train.mean(axis=0)
        _, s, vt = np.linalg.svd(train - mean, full_matrices=False)
        var = s**2 / (n - 1)
        k = max(1, min(components, n - 1, dim - 1))
        total = float(var.sum()) if var.size else 0.0
        floor = max(total / dim, 1e-12) * 1e-3
        residual = max((total - float(var[:k].sum())) / (dim - k), floor)
        return cls(
            mean=mean.astype(np.float32),
            components=vt[:k].astype(np.float32),
            variances=np.maximum(var[:k], residual).astype(np.float32),
            residual_variance=residual,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "components_k": int(self.components.shape[0]),
            "mean": _b64(self.mean),
            "components": _b64(self.components),
            "variances": _b64(self.variances),
            "residual_variance": self.residual_variance,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Ppca:
        dim, k = int(d["dim"]), int(d["components_k"])
        ppca = cls(
            mean=_unb64(d["mean"], (dim,)),
            components=_unb64(d["components"], (k, dim)),
            variances=_unb64(d["variances"], (k,)),
            residual_variance=float(d["residual_variance"]),
        )
        if ppca.residual_variance <= 0 or (ppca.variances <= 0).any():
            raise ValueError("variances out of range")
        return ppca


@dataclass(frozen=True)
class FeatureGuard:
    """Fitted statistics of the training films' features and the thresholds.

    The model's ``embedding`` output is the pooled penultimate features (``head``, the first
    ``head.dim`` values) followed, in models exported since format 2, by the mid-level feature
    statistics (``mid``).

    Attributes:
        head: Gaussian of the training films' penultimate features: what the model has learnt
            to read. Far from it: a film unlike the training films.
        flag_distance: Head distance above which a film is ``unlike_training``.
        mid: Gaussian of the training films' mid-level feature statistics: what a radiograph
            looks like to the network before it reads findings. None in format-1 files.
        mid_flag_distance: Mid distance above which a film is ``unlike_training``.
        refuse_distance: Distance above which an image is ``not_a_chest_xray``: in the mid
            features when there are any, else (format 1) in the head features.
        fitted: How it was fitted (data, split, counts, quantiles), for the model card.
        base_mid: A site-adapted model's (``pneumonia adapt``) inherited refusal: the base
            model's mid-level Gaussian of its training films. An image is refused when either
            this or ``mid`` (the site's) finds it past its refusal distance, so a site refit
            never lets through what the base check refused. None otherwise.
        base_refuse_distance: Its refusal distance (the base model's).
    """

    head: Ppca
    flag_distance: float
    refuse_distance: float
    mid: Ppca | None = None
    mid_flag_distance: float | None = None
    fitted: dict[str, Any] = field(default_factory=dict)
    base_mid: Ppca | None = None
    base_refuse_distance: float | None = None

    @property
    def dim(self) -> int:
        """Width of the ``embedding`` output these statistics read."""
        return self.head.dim + (self.mid.dim if self.mid is not None else 0)

    def distances(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(head distances (N,), mid distances (N,) or None) of ``embedding`` rows (N, dim)."""
        f = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
        if f.shape[1] != self.dim:
            raise ValueError(f"features have {f.shape[1]} values, the input check reads {self.dim}")
        head = self.head.distance(f[:, : self.head.dim])
        mid = self.mid.distance(f[:, self.head.dim :]) if self.mid is not None else None
        return head, mid

    def check(self, features: np.ndarray, reasons: list[list[str]]) -> list[InputCheck]:
        """Verdicts for a batch of features, given each image's image-check reasons."""
        head, mid = self.distances(features)
        refusing = (mid if mid is not None else head) / self.refuse_distance
        if self.base_mid is not None and self.base_refuse_distance and self.mid is not None:
            f = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
            inherited = self.base_mid.distance(f[:, self.head.dim :]) / self.base_refuse_distance
            refusing = np.maximum(refusing, inherited)
        out = []
        for i, why in enumerate(reasons):
            score = float(head[i] / self.flag_distance)
            refusal = float(refusing[i])
            why = list(why)
            if refusal > 1:
                part = "mid-level features" if mid is not None else "features"
                why.append(
                    f"its {part} are {refusal:.2f}x the refusal distance from the training films'"
                )
            if why:
                out.append(InputCheck(NOT_A_CHEST_XRAY, score, tuple(why), refusal))
                continue
            flags = []
            if score > 1:
                flags.append(f"feature distance {score:.2f}x the flag threshold")
            if mid is not None and self.mid_flag_distance and mid[i] > self.mid_flag_distance:
                flags.append(
                    f"mid-level feature distance {mid[i] / self.mid_flag_distance:.2f}x its flag threshold"
                )
            outcome = UNLIKE_TRAINING if flags else TYPICAL
            out.append(InputCheck(outcome, score, tuple(flags), refusal))
        return out

    def summary(self) -> dict[str, Any]:
        """What the model card says about the check (no arrays)."""
        mid = (
            {
                "mid_method": "the same distance in the mid-level feature statistics",
                "mid_dim": self.mid.dim,
                "mid_components": int(self.mid.components.shape[0]),
                "mid_flag_distance": self.mid_flag_distance,
            }
            if self.mid is not None
            else {}
        )
        return {
            "method": "Mahalanobis distance under probabilistic PCA of the pooled penultimate features",
            "dim": self.head.dim,
            "components": int(self.head.components.shape[0]),
            "flag_distance": self.flag_distance,
            "refuse_distance": self.refuse_distance,
            **mid,
            "image_checks": image_check_limits(),
            **self.fitted,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "head": self.head.to_dict(),
            "flag_distance": self.flag_distance,
            "refuse_distance": self.refuse_distance,
            "mid": self.mid.to_dict() if self.mid is not None else None,
            "mid_flag_distance": self.mid_flag_distance,
            "fitted": self.fitted,
            **(
                {
                    "base_mid": self.base_mid.to_dict(),
                    "base_refuse_distance": self.base_refuse_distance,
                }
                if self.base_mid is not None
                else {}
            ),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureGuard:
        """Rebuild from :meth:`to_dict` (or a format-1 file: head statistics only); raises
        ValueError naming what is wrong."""
        try:
            if d["format"] not in (1, FORMAT_VERSION):
                raise ValueError(f"input check format {d['format']!r}, expected {FORMAT_VERSION}")
            mid = None
            if d["format"] == 1:  # the head statistics at the top level, refusal in the head
                head = Ppca.from_dict(d)
            else:
                head = Ppca.from_dict(d["head"])
                mid = Ppca.from_dict(d["mid"]) if d.get("mid") is not None else None
            mid_flag = d.get("mid_flag_distance")
            base_mid = Ppca.from_dict(d["base_mid"]) if d.get("base_mid") is not None else None
            guard = cls(
                head=head,
                flag_distance=float(d["flag_distance"]),
                refuse_distance=float(d["refuse_distance"]),
                mid=mid,
                mid_flag_distance=float(mid_flag) if mid_flag is not None else None,
                fitted=dict(d.get("fitted", {})),
                base_mid=base_mid,
                base_refuse_distance=float(d["base_refuse_distance"]) if base_mid else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid input check statistics: {exc!r}") from None
        bad_mid = guard.mid is not None and not (
            guard.mid_flag_distance is not None and guard.mid_flag_distance > 0
        )
        bad_head = guard.mid is None and guard.refuse_distance < guard.flag_distance
        bad_mid = bad_mid or (
            guard.base_mid is not None
            and (
                guard.mid is None
                or guard.base_mid.dim != guard.mid.dim
                or not (guard.base_refuse_distance or 0) > 0
            )
        )
        if not (guard.flag_distance > 0 and guard.refuse_distance > 0) or bad_mid or bad_head:
            raise ValueError("invalid input check statistics: thresholds out of range")
        return guard


def rates_table(kinds: dict[str, Any], films: dict[str, Any]) -> list[str]:
    """Markdown table of measured rates (``benchmarks/bench_guard.py``'s ``kinds`` and
    ``films``): refused per kind of non-radiograph, refused and flagged chest films."""
    lines = [
        "| set | images | refused (not a chest X-ray or not a frontal chest film) | flagged unlike training |",
        "|---|---|---|---|",
    ]
    for kind, r in kinds.items():
        lines.append(
            f"| non-radiographs: {kind} | {r['n']} | {r['refused']} ({r['refused_rate']:.1%}) | {r['flagged']} |"
        )
    for name, r in films.items():
        lines.append(
            f"| {name} films | {r['n']} | {r['refused']} ({r['refused_rate']:.2%}) "
            f"| {r['flagged']} ({r['flagged_rate']:.2%}) |"
        )
    return lines


def image_check_limits() -> dict[str, float]:
    return {
        "max_colour_fraction": MAX_COLOUR_FRACTION,
        "min_contrast": MIN_CONTRAST,
        "max_noise": MAX_NOISE,
        "min_grey_levels": MIN_GREY_LEVELS,
        "min_detail": MIN_DETAIL,
        "max_flat_share": MAX_FLAT_SHARE,
    }


def _quantiles(d: np.ndarray, qs: tuple[str, ...]) -> dict[str, float]:
    return {q: float(np.quantile(d, float(q))) for q in qs}


def fit_feature_guard(
    train: np.ndarray,
    validation: np.ndarray,
    components: int = DEFAULT_COMPONENTS,
    flag_quantile: float = FLAG_QUANTILE,
    refuse_factor: float = REFUSE_FACTOR,
    fitted: dict[str, Any] | None = None,
    *,
    head_dim: int | None = None,
    shifted: dict[str, np.ndarray] | None = None,
    mid_components: int = DEFAULT_MID_COMPONENTS,
) -> FeatureGuard:
    """Fit the feature statistics on training features, the thresholds on validation features.

    Args:
        train: ``embedding`` rows of the training-split films (N, D).
        validation: Those of the validation-split films (M, D); only their distances are used,
            to set the thresholds.
        components: Principal directions kept in the head features (capped at N - 1, D - 1).
        flag_quantile: Share of validation films below each flag threshold.
        refuse_factor: Without mid-level features (``head_dim`` None): the refusal threshold as
            a multiple of the flag threshold (format 1's rule).
        fitted: Provenance to store (data, split, ...).
        head_dim: How many of the D values are head features; the rest are mid-level
            statistics, whose refusal threshold is the largest distance any validation film
            reaches, clean or under any of the ``shifted`` versions.
        shifted: ``embedding`` rows of the validation films under each simulated shift of
            site (name -> (M', D)); required with ``head_dim``.
        mid_components: Principal directions kept in the mid-level features.
    """
    train = np.asarray(train, dtype=np.float64)
    validation = np.asarray(validation, dtype=np.float64)
    n, dim = train.shape
    if n < 3 or len(validation) < 1:
        raise ValueError(
            f"need at least 3 training and 1 validation features, got {n} and {len(validation)}"
        )
    hd = dim if head_dim is None else head_dim
    if not 0 < hd <= dim or (hd < dim and not shifted):
        raise ValueError(f"head_dim {head_dim} of {dim} features needs shifted validation features")
    head = Ppca.fit(train[:, :hd], components)
    val_d = head.distance(validation[:, :hd])
    train_d = head.distance(train[:, :hd])
    flag = float(np.quantile(val_d, flag_quantile))
    info: dict[str, Any] = {
        **(fitted or {}),
        "n_train": n,
        "n_validation": len(validation),
        "flag_rule": f"{flag_quantile:.1%} quantile of the validation films' distances",
        "validation_distance_quantiles": _quantiles(val_d, ("0.5", "0.9", "0.99", "0.995", "1.0")),
        "train_distance_quantiles": _quantiles(train_d, ("0.5", "0.99", "1.0")),
        "validation_flagged": float((val_d > flag).mean()),
    }
    if hd == dim:
        info["refuse_rule"] = f"{refuse_factor:g} x the flag distance"
        info["validation_refused"] = float((val_d > flag * refuse_factor).mean())
        return FeatureGuard(head, flag, flag * refuse_factor, fitted=info)
    assert shifted is not None
    mid = Ppca.fit(train[:, hd:], mid_components)
    mid_val = mid.distance(validation[:, hd:])
    mid_flag = float(np.quantile(mid_val, flag_quantile))
    by_shift = {k: float(mid.distance(np.asarray(v)[:, hd:]).max()) for k, v in shifted.items()}
    worst = max(by_shift, key=lambda k: by_shift[k])
    refuse = max(float(mid_val.max()), by_shift[worst])
    info.update(
        {
            "refuse_rule": (
                "largest mid-level distance of any validation film, as it is or under any of "
                f"{len(shifted)} simulated shifts of site"
            ),
            "refuse_set_by": worst if by_shift[worst] >= mid_val.max() else "clean",
            "mid_validation_distance_quantiles": _quantiles(
                mid_val, ("0.5", "0.99", "0.995", "1.0")
            ),
            "mid_shifted_max_distance": by_shift,
            "validation_flagged": float(((val_d > flag) | (mid_val > mid_flag)).mean()),
            "validation_refused": float((mid_val > refuse).mean()),
        }
    )
    return FeatureGuard(head, flag, refuse, mid, mid_flag, info)


def image_only_check(reasons: list[str]) -> InputCheck:
    """The verdict for a model without fitted feature statistics: the image checks alone."""
    return InputCheck(NOT_A_CHEST_XRAY if reasons else TYPICAL, None, tuple(reasons))


def fit_site_guard(
    features: np.ndarray,
    fold: np.ndarray,
    head_dim: int,
    shifted: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    components: int = DEFAULT_COMPONENTS,
    mid_components: int = DEFAULT_MID_COMPONENTS,
    flag_quantile: float = FLAG_QUANTILE,
    fitted: dict[str, Any] | None = None,
    base: FeatureGuard | None = None,
) -> FeatureGuard:
    """The input check refitted on one site's films (``pneumonia adapt``), thresholds cross-fitted.

    A site has no separate validation split, so each film's distances are measured by
    statistics fitted on the other folds (patient-grouped); the flag thresholds are the
    ``flag_quantile`` of those held-out distances, the refusal threshold the largest held-out
    mid-level distance of any film, as it is or under any simulated shift of site. The
    statistics the file carries are then fitted on all the films.

    Args:
        features: ``embedding`` rows of the site films (N, D + M).
        fold: Fold index per film (whole patients per fold).
        head_dim: D, the penultimate width; the rest are mid-level statistics.
        shifted: Shift name -> (row indices into ``features`` of the films it was applied to,
            their ``embedding`` rows under the shift).
        components / mid_components / flag_quantile: As :func:`fit_feature_guard`.
        fitted: Provenance to store.
        base: The base model's input check: its refusal is inherited (``base_mid``), so that
            the refit refuses at least what the base check refused.

    Raises:
        ValueError: fewer than 2 folds, or a fold leaves fewer than 3 films to fit on.
    """
    f = np.asarray(features, dtype=np.float64)
    fold = np.asarray(fold)
    folds = sorted(set(fold.tolist()))
    if len(folds) < 2 or not 0 < head_dim < f.shape[1] or not shifted:
        raise ValueError(
            f"need at least 2 folds, 0 < head_dim < {f.shape[1]} and shifted films; "
            f"got {len(folds)} folds, head_dim {head_dim}, {len(shifted)} shifts"
        )
    head_d, mid_d = np.zeros(len(f)), np.zeros(len(f))
    shift_d = {k: np.zeros(len(ix)) for k, (ix, _) in shifted.items()}
    for k in folds:
        held = fold == k
        if int((~held).sum()) < 3:
            raise ValueError(
                f"fold {k} leaves {int((~held).sum())} films to fit the input check on"
            )
        head = Ppca.fit(f[~held, :head_dim], components)
        mid = Ppca.fit(f[~held, head_dim:], mid_components)
        head_d[held] = head.distance(f[held, :head_dim])
        mid_d[held] = mid.distance(f[held, head_dim:])
        for name, (ix, rows) in shifted.items():
            here = held[ix]
            if here.any():
                shift_d[name][here] = mid.distance(np.asarray(rows)[here, head_dim:])
    flag = float(np.quantile(head_d, flag_quantile))
    mid_flag = float(np.quantile(mid_d, flag_quantile))
    by_shift = {k: float(v.max()) for k, v in shift_d.items() if len(v)}
    worst = max(by_shift, key=lambda k: by_shift[k])
    refuse = max(float(mid_d.max()), by_shift[worst])
    info: dict[str, Any] = {
        **(fitted or {}),
        "n_train": len(f),
        "n_validation": len(f),
        "flag_rule": (
            f"{flag_quantile:.1%} quantile of the site films' held-out distances "
            f"({len(folds)} patient-grouped folds)"
        ),
        "validation_distance_quantiles": _quantiles(head_d, ("0.5", "0.9", "0.99", "0.995", "1.0")),
        "refuse_rule": (
            "largest held-out mid-level distance of any site film, as it is or under any of "
            f"{len(shifted)} simulated shifts of site"
        ),
        "refuse_set_by": worst if by_shift[worst] >= mid_d.max() else "clean",
        "mid_validation_distance_quantiles": _quantiles(mid_d, ("0.5", "0.99", "0.995", "1.0")),
        "mid_shifted_max_distance": by_shift,
        "shifted_films": {k: len(ix) for k, (ix, _) in shifted.items()},
        "validation_flagged": float(((head_d > flag) | (mid_d > mid_flag)).mean()),
        "validation_refused": float((mid_d > refuse).mean()),
    }
    inherit = base is not None and base.mid is not None and base.mid.dim == f.shape[1] - head_dim
    if inherit:
        assert base is not None and base.mid is not None
        inherited = base.mid.distance(f[:, head_dim:]) / base.refuse_distance
        info["inherited_refusal"] = (
            "also refused: mid-level distance past the base model's refusal distance from its "
            "own training films (its refusal, unchanged)"
        )
        info["site_refused_by_base"] = float((inherited > 1).mean())
    return FeatureGuard(
        Ppca.fit(f[:, :head_dim], components),
        flag,
        refuse,
        Ppca.fit(f[:, head_dim:], mid_components),
        mid_flag,
        info,
        base_mid=base.mid if inherit and base is not None else None,
        base_refuse_distance=base.refuse_distance if inherit and base is not None else None,
    )
