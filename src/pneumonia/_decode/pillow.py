"""What the JPEG and PNG decoders share: Pillow, its errors, its memory, its gray conversion."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image

from pneumonia._decode.base import (
    MAX_PIXELS,
    ColourTally,
    CorruptImageError,
    DecompressionBombError,
    ImageError,
    UndecodableImageError,
    UnsupportedFormatError,
    check_dimensions,
    reduce_in_strips,
)

#: Bytes a pixel takes in Pillow's memory, by mode; any other mode takes 4.
_PIL_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


@contextmanager
def pillow_errors(fmt: str) -> Iterator[None]:
    """Turn whatever Pillow raises while opening or decoding a ``fmt`` image into an
    ``ImageError`` (its own ``DecompressionBombWarning`` included; data that ends before the
    image does is ``CorruptImageError``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DecompressionBombError(
            f"image is over the limit of {MAX_PIXELS:,} pixels; downscale it before uploading"
        ) from None
    except OSError as exc:
        if "truncated" not in str(exc):  # Pillow's "image file is truncated (...)"
            raise UndecodableImageError(_undecodable(fmt)) from None
        raise CorruptImageError(
            f"the {fmt} is truncated: its data ends before the image does; send the whole file"
        ) from None
    except Exception:
        raise UndecodableImageError(_undecodable(fmt)) from None


def _undecodable(fmt: str) -> str:
    return (
        f"the {fmt} data could not be decoded (truncated or corrupt); "
        "re-export the image and try again"
    )


def open_image(data: bytes, fmt: str) -> Image.Image:
    """Open (parse the header of, not decode) ``data`` as ``fmt``; refuse bad dimensions.

    Call inside :func:`pillow_errors`.
    """
    img: Image.Image = Image.open(io.BytesIO(data), formats=[fmt])
    check_dimensions(*img.size)
    return img


def image_bytes(img: Image.Image) -> int:
    """Bytes of Pillow's decoded image at its (possibly reduced) decode size."""
    return img.size[0] * img.size[1] * _PIL_PIXEL_BYTES.get(img.mode, 4)


def pil_to_gray(img: Image.Image, tally: ColourTally | None = None) -> np.ndarray:
    """Convert a decoded Pillow image to float32 grayscale in [0, 1], counting its colour
    into ``tally`` before the conversion."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(img, dtype=np.float32) / 65535.0
    if img.mode == "I":  # 16-bit PNGs decode to 32-bit 'I' holding 0..65535
        arr = np.asarray(img, dtype=np.float32)
        return np.clip(arr, 0.0, 65535.0) / 65535.0
    if img.mode == "F":
        raise UnsupportedFormatError("floating-point images are not supported")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        # Transparent areas become black, as a viewer on a dark background shows them.
        base = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(base, img.convert("RGBA"))
    if tally is not None:
        if img.mode == "YCbCr":
            tally.add_ycbcr(np.asarray(img))
        elif img.mode in ("RGB", "RGBA"):
            tally.add_rgb(np.asarray(img))
        elif img.mode not in ("L", "1"):  # CMYK, LAB, ...
            tally.add_rgb(np.asarray(img.convert("RGB")))
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.float32) / 255.0


def gray_reduced(
    img: Image.Image, fx: int, fy: int, tally: ColourTally | None = None
) -> np.ndarray:
    """``pil_to_gray(img)`` box-reduced by (fx, fy), float32.

    Converted a strip of rows at a time, so no full-size RGBA or float copy of a large image
    exists; every step of ``pil_to_gray`` is per pixel, so the strips join into exactly the
    whole image's conversion.
    """
    width, height = img.size

    def strip(top: int, bottom: int) -> np.ndarray:
        whole = top == 0 and bottom == height  # a small image: no cropped copy
        return pil_to_gray(img if whole else img.crop((0, top, width, bottom)), tally)

    return reduce_in_strips(width, height, fx, fy, strip, np.float32)
