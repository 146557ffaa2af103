"""Class activation map (CAM) overlays: where the model looked, as a PNG. numpy + Pillow only.

The exported network ends in global average pooling and one linear unit, so its last feature
map times the head's weights is a map whose spatial mean *is* the logit (Zhou et al. 2016,
https://arxiv.org/abs/1512.04150). No gradients are needed; the model returns that map as its
``cam`` output. This module only draws it: upsample to the image, colour, blend.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pneumonia.labels import LABELS

#: Overlays are drawn with their longer side at most this many pixels (aspect ratio kept).
MAX_OVERLAY_SIDE = 512
#: Opacity of the colour where the map is strongest; weaker regions fade to the X-ray.
MAX_ALPHA = 0.6

# A hand-made perceptually ordered ramp (dark purple -> red -> orange -> pale yellow), close to
# matplotlib's "inferno", so the serving path needs no plotting library.
_RAMP_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_RAMP_RGB = np.array(
    [
        [0, 0, 4],
        [87, 16, 110],
        [188, 55, 84],
        [249, 142, 9],
        [252, 255, 164],
    ],
    dtype=np.float32,
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB in [0, 255] (float32, shape ``values.shape + (3,)``)."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    return np.stack([np.interp(v, _RAMP_STOPS, _RAMP_RGB[:, c]) for c in range(3)], axis=-1).astype(
        np.float32
    )


def class_map(cam: np.ndarray, label: str) -> np.ndarray:
    """Normalise a raw CAM to [0, 1] for one class: 1 where evidence for ``label`` is strongest.

    The network has one logit (positive = PNEUMONIA), so the map for NORMAL is the negated CAM.
    Min-max scaling is per image, as in the CAM paper: it shows *where*, not *how much*.

    Args:
        cam: The model's ``cam`` output for one image, shape (h, w).
        label: ``"NORMAL"`` or ``"PNEUMONIA"``.

    Raises:
        ValueError: ``cam`` is not 2-D or ``label`` is not a class name.
    """
    if cam.ndim != 2:
        raise ValueError(f"cam must be 2-D (h, w), got shape {cam.shape}")
    if label not in LABELS:
        raise ValueError(f"label must be one of {list(LABELS)}, got {label!r}")
    m = np.asarray(cam, dtype=np.float32) * (1.0 if label == LABELS[1] else -1.0)
    lo, hi = float(m.min()), float(m.max())
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros_like(m)
    return (m - lo) / (hi - lo)


def _resize_float(arr: np.ndarray, width: int, height: int) -> np.ndarray:
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32))
    return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def overlay_size(width: int, height: int, max_side: int = MAX_OVERLAY_SIDE) -> tuple[int, int]:
    """(width, height) of the overlay: the image's, scaled down so the longer side fits."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def overlay(
    gray: np.ndarray, cam: np.ndarray, label: str, max_side: int = MAX_OVERLAY_SIDE
) -> np.ndarray:
    """Blend the class map over the grayscale image.

    Args:
        gray: The decoded image, 2-D float in [0, 1], at its own aspect ratio.
        cam: The model's raw CAM for this image, (h, w), computed on the stretched square input.
        label: Which class's evidence to show (normally the predicted label).
        max_side: Longest side of the result in pixels.

    Returns:
        uint8 RGB array (H, W, 3) with the image's aspect ratio.
    """
    if gray.ndim != 2:
        raise ValueError(f"gray must be 2-D (H, W), got shape {gray.shape}")
    width, height = overlay_size(gray.shape[1], gray.shape[0], max_side)
    base = np.clip(_resize_float(gray, width, height), 0.0, 1.0) * 255.0
    # The CAM covers the stretched square input, so stretching it back onto the image
    # puts every cell over the region it saw.
    heat = np.clip(_resize_float(class_map(cam, label), width, height), 0.0, 1.0)
    alpha = (MAX_ALPHA * heat)[..., None]
    rgb = base[..., None] * (1.0 - alpha) + colormap(heat) * alpha
    out: np.ndarray = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return out


def overlay_png(
    gray: np.ndarray, cam: np.ndarray, label: str, max_side: int = MAX_OVERLAY_SIDE
) -> bytes:
    """:func:`overlay` encoded as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(overlay(gray, cam, label, max_side)).save(buf, format="PNG")
    return buf.getvalue()
