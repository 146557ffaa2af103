"""The stressed validation: the validation films scored again under fixed perturbations.

Validation AUC saturates on this data (0.997-0.998 for every variant), so it cannot rank
models or tell whether a model reads the films' shape. The stressed validation replays the
validation split under fixed, deterministic changes of the kinds that differ between the
training folder and other films: the original aspect ratio (the Kermany copies were stretched
to a square, so a film from a wider original looks squeezed), loss of detail, exposure,
bright borders and noise. Models, calibration and thresholds are chosen on it
(docs/model.md), never on the test set.

Each perturbation works on preprocessed inputs (N, 1, S, S) in [0, 1] and keeps the shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pneumonia.evaluate import roc_auc, threshold_metrics
from pneumonia.training.augment import _gaussian_blur, jpeg_recompress

Perturb = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _stretch_crop(x: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """The centred crop of ``width`` x ``height`` (shares of the side) stretched back to the square."""
    _n, _c, h, w = x.shape
    ch, cw = max(1, round(h * height)), max(1, round(w * width))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[:, :, top : top + ch, left : left + cw]
    return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True)


def wider(factor: float) -> Perturb:
    """As if the original film were ``factor`` times wider: relative horizontal squeeze."""
    return lambda x, g: _stretch_crop(x, 1.0, 1.0 / factor)


def narrower(factor: float) -> Perturb:
    """As if the original film were ``factor`` times narrower: relative horizontal stretch."""
    return lambda x, g: _stretch_crop(x, 1.0 / factor, 1.0)


def lowres(factor: float) -> Perturb:
    def f(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        small = F.interpolate(x, scale_factor=factor, mode="bilinear", antialias=True)
        return F.interpolate(small, size=x.shape[-2:], mode="bilinear")

    return f


def blur(sigma: float) -> Perturb:
    return lambda x, g: _gaussian_blur(x, torch.full((len(x),), sigma))


def jpeg(quality: int) -> Perturb:
    return lambda x, g: torch.stack([jpeg_recompress(im, quality) for im in x]) if len(x) else x


def gamma(value: float) -> Perturb:
    return lambda x, g: x.clamp(1e-4, 1.0).pow(value)


def bright_border(frac: float) -> Perturb:
    def f(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        y = x.clone()
        k = max(1, round(frac * x.shape[-1]))
        y[..., :k, :] = 1.0
        y[..., -k:, :] = 1.0
        y[..., :, :k] = 1.0
        y[..., :, -k:] = 1.0
        return y

    return f


def noise(std: float) -> Perturb:
    return lambda x, g: (x + std * torch.randn(x.shape, generator=g)).clamp(0.0, 1.0)


#: The fixed perturbations, by name. "clean" is the validation split as it is.
PERTURBATIONS: dict[str, Perturb] = {
    "clean": lambda x, g: x,
    "wider_10": wider(1.1),
    "wider_20": wider(1.2),
    "narrower_10": narrower(1.1),
    "narrower_20": narrower(1.2),
    "lowres_0.4": lowres(0.4),
    "blur_1.5": blur(1.5),
    "jpeg_q20": jpeg(20),
    "gamma_0.74": gamma(0.74),
    "gamma_1.35": gamma(1.35),
    "bright_border_6pct": bright_border(0.06),
    "noise_0.03": noise(0.03),
}


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


def zoom_out(scale: float) -> Perturb:
    """The film shrunk to ``scale`` of the side, centred on a frame of its darkest tone (a
    site that images more of the body, or pads its films)."""

    def f(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        h, w = x.shape[-2:]
        sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
        small = F.interpolate(x, size=(sh, sw), mode="bilinear", antialias=True)
        out = x.amin(dim=(2, 3), keepdim=True).expand_as(x).clone()
        top, left = (h - sh) // 2, (w - sw) // 2
        out[..., top : top + sh, left : left + sw] = small
        return out

    return f


def zoom_in(scale: float) -> Perturb:
    """The centred ``scale`` of the film enlarged to the whole side (a tighter collimation)."""
    return lambda x, g: _stretch_crop(x, scale, scale)


def rotate(degrees: float) -> Perturb:
    """Rotated about the centre, corners filled with black (a patient not square to the plate)."""

    def f(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        a = math.radians(degrees)
        theta = torch.tensor(
            [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], dtype=x.dtype
        )
        grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")

    return f


def equalize(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Histogram-equalised, as some sites post-process their films."""
    out = torch.empty_like(x)
    for i, im in enumerate(x):
        v = (im.clamp(0, 1) * 255).round().long()
        cdf = torch.bincount(v.flatten(), minlength=256).cumsum(0).to(x.dtype)
        out[i] = (cdf / cdf[-1])[v]
    return out


def burned_in_text(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """White annotations burned into the corners and a side marker, as many sites send them."""
    from PIL import Image, ImageDraw

    out = torch.empty_like(x)
    for i, im in enumerate(x):
        img = Image.fromarray((im[0].clamp(0, 1) * 255).round().byte().numpy())
        d = ImageDraw.Draw(img)
        w, h = img.size
        d.text((w // 32, h // 32), "PORTABLE AP  12/03/2019", fill=255)
        d.text((w * 7 // 8, h // 2), "R", fill=255)
        d.text((w // 32, h * 29 // 32), "ID 83920 ACC 1123", fill=255)
        out[i, 0] = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255)
    return out


def contrast(factor: float) -> Perturb:
    """Contrast about each film's mean scaled by ``factor``."""

    def f(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        m = x.mean(dim=(2, 3), keepdim=True)
        return ((x - m) * factor + m).clamp(0.0, 1.0)

    return f


#: The validation films as other sites might send them: the stressed validation's
#: perturbations and stronger changes of framing, processing and annotation. The input check
#: sets its refusal distance so that none of these films would be refused (pneumonia.guard).
SITE_SHIFTS: dict[str, Perturb] = {
    **{k: v for k, v in PERTURBATIONS.items() if k != "clean"},
    "zoom_out_0.8": zoom_out(0.8),
    "zoom_in_0.8": zoom_in(0.8),
    "rotate_10": rotate(10.0),
    "equalized": equalize,
    "burned_in_text": burned_in_text,
    "contrast_0.6": contrast(0.6),
    "contrast_1.5": contrast(1.5),
    "inverted": lambda x, g: 1.0 - x,
}


def perturbed_batches(
    x: np.ndarray,
    name: str,
    seed: int,
    batch_size: int = 128,
    table: dict[str, Perturb] | None = None,
) -> list[torch.Tensor]:
    """The validation inputs under perturbation ``name`` (of ``table``, by default
    :data:`PERTURBATIONS`), in batches; deterministic for ``seed``."""
    g = torch.Generator().manual_seed(seed)
    fn = (PERTURBATIONS if table is None else table)[name]
    out = []
    for i in range(0, len(x), batch_size):
        out.append(
            fn(torch.from_numpy(x[i : i + batch_size]).float(), g).clamp(0.0, 1.0).contiguous()
        )
    return out


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
