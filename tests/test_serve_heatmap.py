"""CAM overlays: the colormap, the class map's sign and scaling, the blend, the PNG."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import jpeg_bytes
from pneumonia.heatmap import MAX_ALPHA, class_map, colormap, overlay, overlay_png, overlay_size


def test_colormap_runs_dark_to_bright_and_is_monotonic_in_luminance() -> None:
    rgb = colormap(np.linspace(0, 1, 101))
    assert rgb.shape == (101, 3)
    np.testing.assert_allclose(rgb[0], [0, 0, 4])
    np.testing.assert_allclose(rgb[-1], [252, 255, 164])
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(luma) > 0)
    np.testing.assert_array_equal(colormap(np.array([-1.0, 2.0])), colormap(np.array([0.0, 1.0])))


def test_class_map_shows_evidence_for_the_label() -> None:
    cam = np.array([[-2.0, 0.0], [1.0, 3.0]], dtype=np.float32)
    pneu = class_map(cam, "PNEUMONIA")
    normal = class_map(cam, "NORMAL")
    assert pneu[1, 1] == 1.0 and pneu[0, 0] == 0.0  # strongest positive logit contribution
    assert normal[0, 0] == 1.0 and normal[1, 1] == 0.0  # NORMAL's map is the negated CAM
    np.testing.assert_allclose(pneu + normal, 1.0)
    assert not class_map(np.ones((3, 3)), "PNEUMONIA").any()  # flat map: nothing highlighted
    with pytest.raises(ValueError, match="label"):
        class_map(cam, "COVID")
    with pytest.raises(ValueError, match="2-D"):
        class_map(cam[None], "NORMAL")


def test_overlay_keeps_aspect_and_leaves_cold_regions_gray() -> None:
    gray = np.tile(np.linspace(0, 1, 300, dtype=np.float32), (200, 1))
    cam = np.zeros((4, 4), np.float32)
    cam[0, 0] = 5.0  # evidence only in the top-left cell
    out = overlay(gray, cam, "PNEUMONIA")
    assert out.shape == (200, 300, 3) and out.dtype == np.uint8
    bottom_right = out[150:, 250:].astype(int)
    assert (bottom_right[..., 0] == bottom_right[..., 1]).all()  # untouched grayscale
    top_left = out[5, 5].astype(int)
    assert top_left[0] != top_left[2]  # coloured
    hot = colormap(np.array(1.0)) * MAX_ALPHA + gray[5, 5] * 255 * (1 - MAX_ALPHA)
    np.testing.assert_allclose(top_left, hot, atol=2)


def test_overlay_size_caps_the_longer_side() -> None:
    assert overlay_size(2000, 1000) == (512, 256)
    assert overlay_size(300, 200) == (300, 200)
    assert overlay(np.zeros((1600, 800), np.float32), np.zeros((4, 4)), "NORMAL").shape == (
        512,
        256,
        3,
    )


def test_overlay_png_round_trips(tiny_model: Path) -> None:
    from pneumonia.predictor import Predictor
    from pneumonia.preprocess import decode_gray

    pred = Predictor(tiny_model)
    data = jpeg_bytes(1, 3, size=160)
    result = pred.predict_bytes(data, with_cam=True)
    assert result.cam is not None
    png = overlay_png(decode_gray(data), result.cam, result.label)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (160, 160) and img.mode == "RGB"
