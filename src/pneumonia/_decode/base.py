"""What every decoder shares: the errors, the memory ceilings and the one strip-reduce helper.

Re-exported by :mod:`pneumonia.preprocess`, which is where the rest of the package imports
them from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: Decoded images larger than this are refused as decompression bombs (about 8k x 8k).
MAX_PIXELS = 64_000_000
#: Most memory the decoders may hold for one image, estimated from its header before decoding;
#: more is refused as a decompression bomb. It counts Pillow's decoded image (1 byte a pixel for
#: 1- and 8-bit gray and palette PNGs and for the reduced-scale decode of a JPEG, 2 for 16-bit
#: gray, 4 for colour or alpha), libjpeg's coefficients of a progressive JPEG (2 bytes a pixel
#: per full-resolution channel, however small the reduced decode), and pydicom's copies of a
#: compressed, deflated or colour DICOM frame (an uncompressed grayscale frame is read where it
#: lies in the upload). 64 MiB takes a 4300x3500 RGB PNG (60 MB): colour PNGs up to 4096x4096.
MAX_DECODE_BYTES = 64 << 20
#: Smaller images carry too little information to classify.
MIN_SIDE = 32
#: Images are converted to float a strip of about this many pixels at a time.
_STRIP_PIXELS = 1 << 18


#: A pixel counts as coloured when its red, green and blue values (of 255) spread over more
#: than this; radiographs have none, photos and most screenshots have many (pneumonia.guard).
COLOUR_SPREAD = 32
#: About this many pixels of each decoded strip are sampled for its colour statistics.
_COLOUR_SAMPLES = 1 << 14


@dataclass(frozen=True)
class DecodeStats:
    """What the decoder saw before turning the image gray, for the input check (pneumonia.guard).

    Attributes:
        colour_fraction: Share of sampled pixels whose R, G, B spread over more than
            ``COLOUR_SPREAD`` of 255; 0.0 for a gray image. None when the colour was not
            decoded (a JPEG coded as RGB rather than YCbCr, which libjpeg gives as gray).
        header: What a DICOM header says about the exam; None for other formats.
    """

    colour_fraction: float | None
    header: HeaderFacts | None = None


@dataclass(frozen=True)
class HeaderFacts:
    """What a DICOM header says about the exam, for the frontal-chest check
    (pneumonia.frontal): each value upper-cased and stripped, None when absent or empty.

    Attributes:
        body_part: ``BodyPartExamined`` (0018,0015), e.g. ``CHEST``, ``KNEE``.
        view_position: ``ViewPosition`` (0018,5101), e.g. ``PA``, ``AP``, ``LL``.
        modality: ``Modality`` (0008,0060), e.g. ``CR``, ``DX``, ``CT``.
    """

    body_part: str | None = None
    view_position: str | None = None
    modality: str | None = None

    @classmethod
    def read(cls, get: Callable[[str], object]) -> HeaderFacts:
        """From a lookup of a dataset's keywords (``ds.get``); a value that is not text,
        or that fails to convert, counts as absent."""

        def one(keyword: str) -> str | None:
            try:
                value = get(keyword)
                text = str(value).strip().upper() if isinstance(value, str) else None
            except Exception:  # a corrupt element raises on first access
                return None
            return (text[:64] or None) if text is not None else None

        return cls(one("BodyPartExamined"), one("ViewPosition"), one("Modality"))


def _sample_step(arr: np.ndarray) -> int:
    return max(1, math.isqrt(arr.shape[0] * arr.shape[1] // _COLOUR_SAMPLES))


class ColourTally:
    """Counts coloured pixels over the strips of one decode (a sample of each strip)."""

    def __init__(self) -> None:
        self.coloured = 0
        self.seen = 0
        self.undecoded = False
        #: Set by the DICOM decoder: the header's word on the exam.
        self.header: HeaderFacts | None = None

    def add_rgb(self, rgb: np.ndarray, full_scale: float = 255.0) -> None:
        """Sample an (h, w, >=3) array of R, G, B values in [0, full_scale]."""
        step = _sample_step(rgb)
        sample = np.asarray(rgb[::step, ::step, :3], dtype=np.float32)
        spread = sample.max(axis=-1) - sample.min(axis=-1)
        self._count(spread * (255.0 / full_scale))

    def add_ycbcr(self, ycc: np.ndarray) -> None:
        """Sample an (h, w, 3) uint8 YCbCr array: the R, G, B spread depends on Cb, Cr only."""
        step = _sample_step(ycc)
        sample = np.asarray(ycc[::step, ::step, 1:3], dtype=np.float32) - 128.0
        cb, cr = sample[..., 0], sample[..., 1]
        r, g, b = 1.402 * cr, -0.344136 * cb - 0.714136 * cr, 1.772 * cb
        self._count(np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b))

    def _count(self, spread: np.ndarray) -> None:
        self.coloured += int(np.count_nonzero(spread > COLOUR_SPREAD))
        self.seen += spread.size

    def stats(self) -> DecodeStats:
        if self.undecoded:
            return DecodeStats(colour_fraction=None, header=self.header)
        colour = self.coloured / self.seen if self.seen else 0.0
        return DecodeStats(colour_fraction=colour, header=self.header)


class ImageError(ValueError):
    """An image that cannot become model input; carries a stable ``code`` clients may branch on.

    The HTTP status each code answers with is the service's business: pneumonia.serve.errors.
    """

    code = "invalid_image"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EmptyImageError(ImageError):
    code = "empty_file"


class UnsupportedFormatError(ImageError):
    code = "unsupported_format"


class UnsupportedTransferSyntaxError(ImageError):
    code = "unsupported_transfer_syntax"


class UndecodableImageError(ImageError):
    code = "undecodable_image"


class ImageTooSmallError(ImageError):
    code = "image_too_small"


class DecompressionBombError(ImageError):
    code = "decompression_bomb"


class CorruptImageError(ImageError):
    """The file fails a check its own format carries (a checksum, a length, an end marker):
    it was damaged in transfer or on disk, so whatever it decodes to is not the image."""

    code = "corrupt_image"


def check_dimensions(width: int, height: int) -> None:
    """Refuse images over ``MAX_PIXELS`` or with a side under ``MIN_SIDE``."""
    if width * height > MAX_PIXELS:
        raise DecompressionBombError(
            f"image is {width}x{height} pixels, over the limit of {MAX_PIXELS:,} pixels; "
            "downscale it before uploading"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageTooSmallError(
            f"image is {width}x{height} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed"
        )


def check_decode_bytes(need: int, what: str, advice: str) -> None:
    """Refuse a decode that would hold more than ``MAX_DECODE_BYTES``."""
    if need > MAX_DECODE_BYTES:
        raise DecompressionBombError(
            f"decoding this {what} would take {need / 2**20:.0f} MiB, over the limit of "
            f"{MAX_DECODE_BYTES >> 20} MiB; {advice} before uploading"
        )


def reduction(width: int, height: int, draft_size: int | None) -> tuple[int, int]:
    """Integer factors (x, y) by which a decoded image is box-averaged before the resize.

    The shorter side stays at least ``2 * draft_size``: images under four times that per side
    are not reduced, and the final resize still averages over two or more pixels. Both axes
    share the factor (the aspect ratio is kept, as heatmap overlays need) unless the image is
    over 4:1; then the longer side is reduced further, to under ``16 * draft_size``. So the
    reduced image has fewer than ``64 * draft_size**2`` pixels, whatever was uploaded.
    """
    if draft_size is None:
        return 1, 1
    short, long = min(width, height), max(width, height)
    factor = max(1, short // (2 * draft_size))
    long_factor = max(factor, long // (8 * draft_size))
    return (long_factor, factor) if width >= height else (factor, long_factor)


def box_reduce(arr: np.ndarray, fx: int, fy: int) -> np.ndarray:
    """Mean of every ``fy x fx`` box of a 2-D array (boxes at the far edges may be partial).

    Returns ``arr`` itself when both factors are 1, else a new float64 array.
    """
    out = arr
    for axis, factor in ((0, fy), (1, fx)):
        if factor > 1:
            starts = np.arange(0, arr.shape[axis], factor)
            counts = np.diff(np.append(starts, arr.shape[axis]))
            out = np.add.reduceat(out, starts, axis=axis, dtype=np.float64)
            out /= counts[:, None] if axis == 0 else counts[None, :]
    return out


def reduce_in_strips(
    width: int,
    height: int,
    fx: int,
    fy: int,
    strip: Callable[[int, int], np.ndarray],
    dtype: type[np.floating],
) -> np.ndarray:
    """Box-reduce by (fx, fy) an image that is made a strip of rows at a time.

    ``strip(top, bottom)`` gives rows ``top:bottom`` as a 2-D float array; each strip holds
    about ``_STRIP_PIXELS`` pixels and a whole number of reduction boxes, so only strips are
    ever full-size float. When every step that makes a strip is per pixel, the strips join
    into exactly the whole image's result.
    """
    rows = max(1, _STRIP_PIXELS // (max(width, 1) * fy)) * fy
    out = np.empty((-(-height // fy), -(-width // fx)), dtype=dtype)
    for top in range(0, height, rows):
        reduced = box_reduce(strip(top, min(height, top + rows)), fx, fy)
        out[top // fy : top // fy + reduced.shape[0]] = reduced
    return out
