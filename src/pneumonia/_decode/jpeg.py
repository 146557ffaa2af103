"""JPEG: reduced-scale decoding, what libjpeg holds, EXIF orientation, truncated scans refused."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageOps

from pneumonia._decode.base import ColourTally, CorruptImageError, check_decode_bytes, reduction
from pneumonia._decode.pillow import gray_reduced, image_bytes, open_image, pillow_errors

#: Start-of-frame markers of progressive JPEGs (Huffman or arithmetic, plain or differential).
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})


def _first_scan(data: bytes) -> tuple[int, bool] | None:
    """Where the first start-of-scan marker stands, and whether a progressive frame header
    came before it; None if the header's markers cannot be walked to a scan."""
    pos, progressive = 2, False
    while pos + 4 < len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
        elif marker == 0xDA:  # start of scan
            return pos, progressive
        else:
            progressive |= marker in _PROGRESSIVE_SOF
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def _buffers_coefficients(data: bytes, components: int) -> bool:
    """Whether libjpeg holds every DCT coefficient of the image while decoding it.

    It does when the image comes in several scans: progressive, or a first scan that carries
    fewer than all components (its count follows the scan header's length). Anything
    unexpected in the header counts as yes.
    """
    scan = _first_scan(data)
    if scan is None or scan[1]:
        return True
    return data[scan[0] + 4] < components


def check_complete(data: bytes) -> None:
    """Refuse a JPEG whose scan data never reaches its end-of-image marker.

    libjpeg fills the rows a truncated scan lacks with gray and Pillow, once it has every
    row, does not look for the end: a cut-off upload scored as a different image. Inside
    scan data every 0xFF byte is stuffed (followed by 0x00), so the first FF D9 after the
    first scan marker is the end of image (an EXIF thumbnail's own FF D9 stands before it).

    Raises:
        CorruptImageError: no end-of-image marker after the first scan.
    """
    scan = _first_scan(data)
    if scan is not None and data.find(b"\xff\xd9", scan[0]) < 0:
        raise CorruptImageError(
            "the JPEG is truncated: its scan data ends without the end-of-image marker; "
            "send the whole file"
        )


def _coefficient_bytes(width: int, height: int, layers: list[tuple[int, int, int, int]]) -> int:
    """Bytes of libjpeg's whole-image coefficient buffers: 64 2-byte values per 8x8 block of
    every component, at its own sampling."""
    hmax = max((h for _, h, _, _ in layers), default=1) or 1
    vmax = max((v for _, _, v, _ in layers), default=1) or 1
    blocks = sum(
        math.ceil(width * h / hmax / 8) * math.ceil(height * v / vmax / 8) for _, h, v, _ in layers
    )
    return 128 * blocks


def _is_ycbcr(img: Image.Image) -> bool:
    """Whether a 3-component JPEG is coded as YCbCr (as libjpeg assumes unless it is marked RGB)."""
    ids = tuple(layer[0] for layer in getattr(img, "layer", ()))
    return ids != ("R", "G", "B") and img.info.get("adobe_transform", 1) != 0


def _draft(img: Image.Image, draft_size: int) -> bool:
    """Ask libjpeg for a reduced DCT scale (1/2, 1/4, 1/8); Pillow keeps both sides >= draft_size.

    Returns:
        False when the colour is no longer decoded (gray straight from an RGB-coded JPEG).
    """
    if img.mode == "RGB" and _is_ycbcr(img):
        # Luma and chroma as coded: the luma is exactly the gray decode libjpeg gives (Pillow's
        # YCbCr -> L keeps Y), and the chroma tells a photo from a radiograph (pneumonia.guard).
        img.draft("YCbCr", (draft_size, draft_size))
    elif img.mode in ("RGB", "L"):
        img.draft("L", (draft_size, draft_size))  # gray straight from the luma channel
        return img.mode == "L" and len(getattr(img, "layer", ())) <= 1
    elif max(img.size) > 2 * draft_size:
        # CMYK: scale only. Never within twice the size, where it was always decoded in full.
        img.draft(img.mode, (draft_size, draft_size))
    return True


def _exif_transpose(gray: np.ndarray, img: Image.Image) -> np.ndarray:
    """Turn a decoded JPEG's gray image as its EXIF orientation says (as a viewer shows it)."""
    oriented = Image.fromarray(gray)
    oriented.info = dict(img.info)  # where exif_transpose reads the orientation
    return np.asarray(ImageOps.exif_transpose(oriented), dtype=np.float32)


def decode(data: bytes, draft_size: int | None, tally: ColourTally | None = None) -> np.ndarray:
    """A JPEG as float32 gray in [0, 1], reduced as ``pneumonia.preprocess`` describes; its
    colour counted into ``tally``.

    Raises:
        CorruptImageError: the data ends before the image does.
    """
    with pillow_errors("JPEG"):
        img = open_image(data, "JPEG")
        width, height, mode = *img.size, img.mode
        if draft_size is not None and not _draft(img, draft_size) and tally is not None:
            tally.undecoded = True
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
        check_complete(data)
        img.load()
        gray = gray_reduced(img, *reduction(*img.size, draft_size), tally)
        # Orientation last: the conversion is per pixel, so turning the small gray image
        # gives what turning the decoded one did.
        return _exif_transpose(gray, img)
