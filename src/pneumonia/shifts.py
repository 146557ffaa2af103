"""Simulated shifts of site: the films as another hospital might send them. numpy + Pillow.

One implementation for both sides: training's stressed validation
(:mod:`pneumonia.training.stress`, which chooses models, calibration and thresholds) and the
input check's refusal distance (``pneumonia guard fit`` on a run, ``pneumonia adapt`` on a
site's films) replay the same fixed, deterministic changes of the kinds that differ between
sites: the original aspect ratio (the Kermany copies were stretched to a square, so a film
from a wider original looks squeezed), loss of detail, exposure, bright borders, noise,
framing, processing and burned-in annotations.

Each shift works on preprocessed inputs (N, 1, S, S) float32 in [0, 1] and keeps the shape.
Resampling is Pillow's bilinear filter on float images (antialiased when shrinking).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw

#: A shift: (inputs (N, 1, S, S), a seeded generator for the random ones) -> same shape.
Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """One 2-D float image resampled to ``width`` x ``height`` (bilinear)."""
    pil = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F")
    return np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def _per_image(x: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    out = np.empty_like(x, dtype=np.float32)
    for i in range(len(x)):
        for c in range(x.shape[1]):
            out[i, c] = fn(x[i, c])
    return out


def _stretch_crop(x: np.ndarray, width: float, height: float) -> np.ndarray:
    """The centred crop of ``width`` x ``height`` (shares of the side) stretched back to the square."""
    h, w = x.shape[-2:]
    ch, cw = max(1, round(h * height)), max(1, round(w * width))
    top, left = (h - ch) // 2, (w - cw) // 2
    return _per_image(x, lambda im: _resize(im[top : top + ch, left : left + cw], w, h))


def wider(factor: float) -> Shift:
    """As if the original film were ``factor`` times wider: relative horizontal squeeze."""
    return lambda x, g: _stretch_crop(x, 1.0, 1.0 / factor)


def narrower(factor: float) -> Shift:
    """As if the original film were ``factor`` times narrower: relative horizontal stretch."""
    return lambda x, g: _stretch_crop(x, 1.0 / factor, 1.0)


def lowres(factor: float) -> Shift:
    """Detail lost to a ``factor`` smaller original, resampled back up."""

    def f(x: np.ndarray, g: np.random.Generator) -> np.ndarray:
        h, w = x.shape[-2:]
        sh, sw = max(1, math.floor(h * factor)), max(1, math.floor(w * factor))
        return _per_image(x, lambda im: _resize(_resize(im, sw, sh), w, h))

    return f


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D image, edges replicated, radius 3 sigma."""
    radius = max(1, math.ceil(3 * sigma))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum()).astype(np.float32)
    h, w = img.shape
    p = np.pad(img, ((0, 0), (radius, radius)), mode="edge")
    rows = sum(k[j] * p[:, j : j + w] for j in range(len(k)))
    p = np.pad(rows, ((radius, radius), (0, 0)), mode="edge")
    out: np.ndarray = sum(k[j] * p[j : j + h, :] for j in range(len(k)))
    return out.astype(np.float32)


def blur(sigma: float) -> Shift:
    return lambda x, g: _per_image(x, lambda im: gaussian_blur(im, sigma))


def jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    """One 2-D image in [0, 1] through 8-bit JPEG at ``quality`` and back."""
    u8 = np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8, mode="L").save(buf, format="JPEG", quality=int(quality))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"), dtype=np.float32) / 255


def jpeg(quality: int) -> Shift:
    return lambda x, g: _per_image(x, lambda im: jpeg_roundtrip(im, quality))


def gamma(value: float) -> Shift:
    return lambda x, g: np.power(np.clip(x, 1e-4, 1.0), value).astype(np.float32)


def bright_border(frac: float) -> Shift:
    def f(x: np.ndarray, g: np.random.Generator) -> np.ndarray:
        y = np.array(x, dtype=np.float32, copy=True)
        k = max(1, round(frac * x.shape[-1]))
        y[..., :k, :] = 1.0
        y[..., -k:, :] = 1.0
        y[..., :, :k] = 1.0
        y[..., :, -k:] = 1.0
        return y

    return f


def noise(std: float) -> Shift:
    return lambda x, g: np.clip(x + std * g.standard_normal(x.shape), 0.0, 1.0).astype(np.float32)


def zoom_out(scale: float) -> Shift:
    """The film shrunk to ``scale`` of the side, centred on a frame of its darkest tone (a
    site that images more of the body, or pads its films)."""

    def f(x: np.ndarray, g: np.random.Generator) -> np.ndarray:
        h, w = x.shape[-2:]
        sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
        top, left = (h - sh) // 2, (w - sw) // 2

        def one(im: np.ndarray) -> np.ndarray:
            out = np.full_like(im, im.min(), dtype=np.float32)
            out[top : top + sh, left : left + sw] = _resize(im, sw, sh)
            return out

        return _per_image(x, one)

    return f


def zoom_in(scale: float) -> Shift:
    """The centred ``scale`` of the film enlarged to the whole side (a tighter collimation)."""
    return lambda x, g: _stretch_crop(x, scale, scale)


def rotate(degrees: float) -> Shift:
    """Rotated about the centre, corners filled with black (a patient not square to the plate)."""

    def one(im: np.ndarray) -> np.ndarray:
        pil = Image.fromarray(np.ascontiguousarray(im, dtype=np.float32), mode="F")
        return np.asarray(
            pil.rotate(degrees, resample=Image.Resampling.BILINEAR, fillcolor=0.0),
            dtype=np.float32,
        )

    return lambda x, g: _per_image(x, one)


def equalize(x: np.ndarray, g: np.random.Generator) -> np.ndarray:
    """Histogram-equalised, as some sites post-process their films."""

    def one(im: np.ndarray) -> np.ndarray:
        v = np.round(np.clip(im, 0, 1) * 255).astype(np.int64)
        cdf = np.cumsum(np.bincount(v.ravel(), minlength=256)).astype(np.float32)
        out: np.ndarray = (cdf / cdf[-1])[v]
        return out

    return _per_image(x, one)


def burned_in_text(x: np.ndarray, g: np.random.Generator) -> np.ndarray:
    """White annotations burned into the corners and a side marker, as many sites send them."""

    def one(im: np.ndarray) -> np.ndarray:
        img = Image.fromarray(np.round(np.clip(im, 0, 1) * 255).astype(np.uint8), mode="L")
        d = ImageDraw.Draw(img)
        w, h = img.size
        d.text((w // 32, h // 32), "PORTABLE AP  12/03/2019", fill=255)
        d.text((w * 7 // 8, h // 2), "R", fill=255)
        d.text((w // 32, h * 29 // 32), "ID 83920 ACC 1123", fill=255)
        return np.asarray(img, dtype=np.float32) / 255

    return _per_image(x, one)


def contrast(factor: float) -> Shift:
    """Contrast about each film's mean scaled by ``factor``."""

    def f(x: np.ndarray, g: np.random.Generator) -> np.ndarray:
        m = x.mean(axis=(2, 3), keepdims=True)
        out: np.ndarray = np.clip((x - m) * factor + m, 0.0, 1.0).astype(np.float32)
        return out

    return f


#: The fixed perturbations of the stressed validation, by name. "clean" is the films as they are.
PERTURBATIONS: dict[str, Shift] = {
    "clean": lambda x, g: np.asarray(x, dtype=np.float32),
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

#: The films as other sites might send them: the stressed validation's perturbations and
#: stronger changes of framing, processing and annotation. The input check sets its refusal
#: distance so that none of these films would be refused (pneumonia.guard).
SITE_SHIFTS: dict[str, Shift] = {
    **{k: v for k, v in PERTURBATIONS.items() if k != "clean"},
    "zoom_out_0.8": zoom_out(0.8),
    "zoom_in_0.8": zoom_in(0.8),
    "rotate_10": rotate(10.0),
    "equalized": equalize,
    "burned_in_text": burned_in_text,
    "contrast_0.6": contrast(0.6),
    "contrast_1.5": contrast(1.5),
    "inverted": lambda x, g: 1.0 - np.asarray(x, dtype=np.float32),
}


def shifted_batches(
    x: np.ndarray,
    name: str,
    seed: int,
    batch_size: int = 128,
    table: dict[str, Shift] | None = None,
) -> Iterator[np.ndarray]:
    """The inputs ``x`` (N, 1, S, S) under shift ``name`` of ``table`` (by default
    :data:`PERTURBATIONS`), a batch at a time, clipped to [0, 1]; deterministic for ``seed``.

    Raises:
        KeyError: ``name`` is not in the table.
    """
    fn = (PERTURBATIONS if table is None else table)[name]
    g = np.random.default_rng(seed)
    for i in range(0, len(x), batch_size):
        batch = np.asarray(x[i : i + batch_size], dtype=np.float32)
        yield np.ascontiguousarray(np.clip(fn(batch, g), 0.0, 1.0), dtype=np.float32)
