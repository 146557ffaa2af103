"""JPEG: reduced-scale decoding, what libjpeg holds, EXIF orientation."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageOps

from pneumonia._decode.base import check_decode_bytes, reduction
from pneumonia._decode.pillow import gray_reduced, image_bytes, open_image, pillow_errors

#: Start-of-frame markers of progressive JPEGs (Huffman or arithmetic, plain or differential).
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})


def _buffers_coefficients(data: bytes, components: int) -> bool:
    """Whether libjpeg holds every DCT coefficient of the image while decoding it.

    It does when the image comes in several scans: progressive, or a first scan that carries
    fewer than all components. Walks the header's markers up to the first scan; anything
    unexpected counts as yes.
    """
    pos = 2
    while pos + 4 < len(data):
        if data[pos] != 0xFF:
            return True
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
        elif marker in _PROGRESSIVE_SOF:
            return True
        elif marker == 0xDA:  # start of scan: its component count follows the length
            return data[pos + 4] < components
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return True


def _coefficient_bytes(width: int, height: int, layers: list[tuple[int, int, int, int]]) -> int:
    """Bytes of libjpeg's whole-image coefficient buffers: 64 2-byte values per 8x8 block of
    every component, at its own sampling."""
    hmax = max((h for _, h, _, _ in layers), default=1) or 1
    vmax = max((v for _, _, v, _ in layers), default=1) or 1
    blocks = sum(
        math.ceil(width * h / hmax / 8) * math.ceil(height * v / vmax / 8)
        for _, h, v, _ in layers
    )
    return 128 * blocks


def _draft(img: Image.Image, draft_size: int) -> None:
    """Ask libjpeg for a reduced DCT scale (1/2, 1/4, 1/8); Pillow keeps both sides >= draft_size."""
    if img.mode in ("RGB", "L"):
        img.draft("L", (draft_size, draft_size))  # gray straight from the luma channel
    elif max(img.size) > 2 * draft_size:
        # CMYK: scale only. Never within twice the size, where it was always decoded in full.
        img.draft(img.mode, (draft_size, draft_size))


def _exif_transpose(gray: np.ndarray, img: Image.Image) -> np.ndarray:
    """Turn a decoded JPEG's gray image as its EXIF orientation says (as a viewer shows it)."""
    oriented = Image.fromarray(gray)
    oriented.info = dict(img.info)  # where exif_transpose reads the orientation
    return np.asarray(ImageOps.exif_transpose(oriented), dtype=np.float32)


def decode(data: bytes, draft_size: int | None) -> np.ndarray:
    """A JPEG as float32 gray in [0, 1], reduced as ``pneumonia.preprocess`` describes."""
    with pillow_errors("JPEG"):
        img = open_image(data, "JPEG")
        width, height, mode = *img.size, img.mode
        if draft_size is not None:
            _draft(img, draft_size)
        # Pillow's image at its (possibly reduced) decode size, plus libjpeg's coefficients
        # of the full-size image if it buffers them.
        need = image_bytes(img)
        layers = getattr(img, "layer", None)
        if layers and _buffers_coefficients(data, len(layers)):
            need += _coefficient_bytes(width, height, layers)
        check_decode_bytes(
            need,
            f"{width}x{height} {mode} JPEG",
            "downscale it, or save it as 8-bit grayscale PNG or baseline JPEG,",
        )
        img.load()
        gray = gray_reduced(img, *reduction(*img.size, draft_size))
        # Orientation last: the conversion is per pixel, so turning the small gray image
        # gives what turning the decoded one did.
        return _exif_transpose(gray, img)
