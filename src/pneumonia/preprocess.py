"""The one place that knows how image bytes become model input.

Training, evaluation, batch scoring and the HTTP service all call :func:`preprocess_image`
(or :func:`preprocess_bytes`, its model input alone) with the :class:`PreprocessSpec` stored
inside the exported model, so a 224x224 training copy and a 2000x1600 original go through
exactly the same steps:

1. recognise the format from the bytes (JPEG, PNG or DICOM; nothing else);
2. decode to one grayscale channel scaled to [0, 1] (8-bit / 255, 16-bit / 65535, DICOM
   after modality LUT, VOI LUT / window and MONOCHROME1 inversion, min-max scaled);
3. stretch to ``size x size`` (aspect ratio not kept, as the Kermany copies were made) with
   antialiased bilinear interpolation in float32.

Large images are reduced on the way, so that one decode never holds a full-size float copy:
JPEGs at least twice ``size`` per side are decoded at a reduced DCT scale (1/2, 1/4 or 1/8,
never below ``size`` per side), and step 2 runs a strip of rows at a time and averages images
at least four times ``size`` per side over boxes of whole pixels, keeping each side at least
``2 * size``. Both are size-dependent approximations of the averaging in step 3 (LUTs and
windows are still applied per full-resolution pixel, before it). Images up to twice ``size``
per side (the 224x224 training copies at size 192) are never reduced: their input is
bit-identical to the full computation's, as tests/test_preprocess_contract.py pins. What the
decoders themselves hold is checked from the header first (``MAX_DECODE_BYTES``);
benchmarks/bench_decode_memory.py measures what one decode costs.

The decoders, one private module per format, live in ``pneumonia/_decode/``; the errors and
ceilings they share are re-exported here, where the rest of the package imports them from.

Per-image standardisation (zero mean, unit variance) happens inside the network itself, so
exposure and contrast constants never have to be copied anywhere else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from pneumonia._decode import dicom, jpeg, png
from pneumonia._decode.base import (
    COLOUR_SPREAD,
    MAX_DECODE_BYTES,
    MAX_PIXELS,
    MIN_SIDE,
    ColourTally,
    CorruptImageError,
    DecodeStats,
    DecompressionBombError,
    EmptyImageError,
    HeaderFacts,
    ImageError,
    ImageTooSmallError,
    UndecodableImageError,
    UnsupportedFormatError,
    UnsupportedTransferSyntaxError,
    check_dimensions,
)
from pneumonia._decode.dicom import MAGIC as DICOM_MAGIC
from pneumonia._decode.dicom import MAGIC_OFFSET as DICOM_MAGIC_OFFSET
from pneumonia._decode.dicom import MAX_INFLATED_BYTES

__all__ = [
    "COLOUR_SPREAD",
    "DICOM_MAGIC",
    "DICOM_MAGIC_OFFSET",
    "JPEG_MAGIC",
    "MAX_DECODE_BYTES",
    "MAX_INFLATED_BYTES",
    "MAX_PIXELS",
    "MIN_SIDE",
    "PNG_MAGIC",
    "SUPPORTED_FORMATS",
    "CorruptImageError",
    "DecodeStats",
    "DecompressionBombError",
    "EmptyImageError",
    "HeaderFacts",
    "ImageError",
    "ImageTooSmallError",
    "PreprocessSpec",
    "Preprocessed",
    "UndecodableImageError",
    "UnsupportedFormatError",
    "UnsupportedTransferSyntaxError",
    "check_model_input",
    "decode_gray",
    "preprocess_bytes",
    "preprocess_image",
    "preprocess_uint8",
    "resize_gray",
    "sniff_format",
]

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SUPPORTED_FORMATS = ("jpeg", "png", "dicom")

# Magic numbers of formats we recognise but do not accept, so the message can name them.
_OTHER_FORMATS: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"RIFF", "RIFF/WebP"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
)

#: The decoder of each supported format: (bytes, draft_size) -> float32 gray in [0, 1].
_DECODERS = {"jpeg": jpeg.decode, "png": png.decode, "dicom": dicom.decode}


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything needed to turn bytes into model input; stored inside every exported model.

    Attributes:
        size: Output height and width in pixels.
        channels: Number of channels the network takes (grayscale: 1).
        resize: How the aspect ratio is handled ("stretch": not kept).
        interpolation: Resampling filter ("bilinear", antialiased when downscaling).
        value_range: Range of the float32 input values.
        normalization: What the network does to its input before the first convolution.
    """

    size: int = 192
    channels: int = 1
    resize: str = "stretch"
    interpolation: str = "bilinear"
    value_range: tuple[float, float] = (0.0, 1.0)
    normalization: str = "per-image standardization inside the network"

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < MIN_SIDE:
            raise ValueError(f"preprocess size must be an integer >= {MIN_SIDE}, got {self.size!r}")
        if self.channels != 1:
            raise ValueError(f"only 1-channel (grayscale) input is supported, got {self.channels}")
        if self.resize != "stretch" or self.interpolation != "bilinear":
            raise ValueError(
                f"unsupported resize/interpolation {self.resize!r}/{self.interpolation!r}; "
                "expected 'stretch'/'bilinear'"
            )
        if tuple(self.value_range) != (0.0, 1.0):
            # decode_gray always scales to [0, 1]; another range would be a second contract.
            raise ValueError(f"value_range must be (0.0, 1.0), got {self.value_range!r}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one preprocessed image: (channels, size, size)."""
        return (self.channels, self.size, self.size)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["value_range"] = list(self.value_range)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        """Rebuild a spec saved by :meth:`to_dict`; unknown or missing keys are an error.

        A model file must state its whole preprocessing: no silent defaults.
        """
        known = set(cls.__dataclass_fields__)
        unknown, missing = set(d) - known, known - set(d)
        if unknown or missing:
            raise ValueError(
                f"preprocessing spec has unknown keys {sorted(unknown)} and lacks {sorted(missing)}; "
                f"expected exactly {sorted(known)}"
            )
        kw = dict(d)
        if "value_range" in kw:
            kw["value_range"] = tuple(kw["value_range"])
        return cls(**kw)


def sniff_format(data: bytes) -> str:
    """Recognise the image format from its first bytes.

    Returns:
        One of ``SUPPORTED_FORMATS``.

    Raises:
        EmptyImageError: ``data`` is empty.
        UnsupportedFormatError: anything that is not JPEG, PNG or DICOM.
    """
    if not data:
        raise EmptyImageError("the uploaded file is empty; send a JPEG, PNG or DICOM image")
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data.startswith(PNG_MAGIC):
        return "png"
    if data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == DICOM_MAGIC:
        return "dicom"
    for magic, name in _OTHER_FORMATS:
        if data.startswith(magic):
            raise UnsupportedFormatError(
                f"{name} images are not supported; send a JPEG, PNG or DICOM image"
            )
    raise UnsupportedFormatError(
        "the file is not a recognised image (checked its first bytes); "
        "send a JPEG, PNG or DICOM image"
    )


def decode_gray(data: bytes, draft_size: int | None = None) -> np.ndarray:
    """Decode image bytes to a 2-D float32 grayscale array in [0, 1].

    Args:
        data: The encoded file.
        draft_size: If given, the image may come out reduced (see the module docstring):
            JPEGs at least twice this size decoded at a reduced scale (never below
            ``draft_size`` on either side), and images at least four times this size
            box-averaged by whole pixels (never below ``2 * draft_size``). If None, the
            full-resolution image (which, as float32, takes 4 bytes a pixel).

    Raises:
        ImageError: a subclass naming what is wrong (empty, unsupported, undecodable,
            too small, decompression bomb: over ``MAX_PIXELS``, or the decoders would hold
            over ``MAX_DECODE_BYTES``, which for a JPEG depends on ``draft_size``).
    """
    return decode_image(data, draft_size)[0]


def decode_image(data: bytes, draft_size: int | None = None) -> tuple[np.ndarray, DecodeStats]:
    """:func:`decode_gray`, and what the decoder saw before the gray conversion (its colour,
    for the input check in pneumonia.guard)."""
    tally = ColourTally()
    gray = _DECODERS[sniff_format(data)](data, draft_size, tally)
    if gray.ndim != 2:
        raise UndecodableImageError(f"decoded image has unexpected shape {gray.shape}")
    check_dimensions(gray.shape[1], gray.shape[0])
    return gray, tally.stats()


def resize_gray(gray: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Stretch a [0, 1] grayscale array to the model's input shape (C, H, W), float32."""
    img = Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32), mode="F")
    img = img.resize((spec.size, spec.size), Image.Resampling.BILINEAR)
    out = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    return out[None, :, :]


@dataclass(frozen=True)
class Preprocessed:
    """One image as the model takes it, and the picture a heatmap is drawn on.

    Attributes:
        input: The model input, float32 of shape ``spec.input_shape``.
        view: The decoded grayscale image in [0, 1] at its own aspect ratio, if asked for
            (``view_side``), else None.
        stats: What the decoder saw before the gray conversion (for the input check); None
            for arrays that were never encoded (MedMNIST).
    """

    input: np.ndarray
    view: np.ndarray | None = None
    stats: DecodeStats | None = None


def preprocess_image(
    data: bytes, spec: PreprocessSpec, *, view_side: int | None = None
) -> Preprocessed:
    """Turn encoded image bytes into one model input: the one composition every path calls.

    Training and evaluation (``data.load_images``), ``Predictor``, batch scoring and the
    service all come here, so an image gets the same input whichever path it takes.

    Args:
        data: The encoded file.
        spec: The model's preprocessing, as its card states it.
        view_side: If given, also keep the decoded image to draw a heatmap on, sharp enough
            for an overlay whose longer side is at most this many pixels: a JPEG is decoded
            again at that scale (the model's copy may be a reduced-scale decode), any other
            format's decode is kept as it is.

    Raises:
        ImageError: a subclass naming what is wrong with the image.
    """
    gray, stats = decode_image(data, draft_size=spec.size)
    x = resize_gray(gray, spec)
    if view_side is None:
        return Preprocessed(x, stats=stats)
    if sniff_format(data) == "jpeg":
        gray = decode_gray(data, draft_size=view_side)
    return Preprocessed(x, gray, stats)


def preprocess_bytes(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """Turn encoded image bytes into one model input of shape ``spec.input_shape``
    (:func:`preprocess_image`'s ``input``)."""
    return preprocess_image(data, spec).input


def preprocess_uint8(gray: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """One model input from a uint8 grayscale array (H, W), e.g. a MedMNIST image.

    The same scaling as an 8-bit grayscale file through :func:`decode_gray` (value / 255),
    without its decoder limits: MedMNIST's 28-pixel images are data, not a bad upload.
    """
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError(f"expected a uint8 (H, W) array, got {gray.dtype} {gray.shape}")
    return resize_gray(gray.astype(np.float32) / 255.0, spec)


def check_model_input(batch: np.ndarray, spec: PreprocessSpec) -> None:
    """Refuse arrays that break the input contract (shape, dtype, finite values in range)."""
    if batch.dtype != np.float32:
        raise ValueError(f"model input must be float32, got {batch.dtype}")
    if batch.ndim != 4 or batch.shape[1:] != spec.input_shape:
        expected = ", ".join(map(str, spec.input_shape))
        raise ValueError(f"model input must be (N, {expected}), got {batch.shape}")
    lo, hi = spec.value_range
    if batch.size and (not np.isfinite(batch).all() or batch.min() < lo or batch.max() > hi):
        raise ValueError(f"model input values must be finite and within [{lo}, {hi}]")
