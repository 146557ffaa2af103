"""PNG."""

from __future__ import annotations

import numpy as np

from pneumonia._decode.base import check_decode_bytes, reduction
from pneumonia._decode.pillow import gray_reduced, image_bytes, open_image, pillow_errors


def decode(data: bytes, draft_size: int | None) -> np.ndarray:
    """A PNG as float32 gray in [0, 1], reduced as ``pneumonia.preprocess`` describes."""
    with pillow_errors("PNG"):
        img = open_image(data, "PNG")
        width, height, mode = *img.size, img.mode
        check_decode_bytes(
            image_bytes(img),
            f"{width}x{height} {mode} PNG",
            "downscale it, or save it as 8-bit grayscale PNG or baseline JPEG,",
        )
        img.load()
        return gray_reduced(img, *reduction(width, height, draft_size))
