"""The one place that knows how image bytes become model input.

Training, evaluation, batch scoring and the HTTP service all call :func:`preprocess_bytes`
with the :class:`PreprocessSpec` stored inside the exported model, so a 224x224 training copy
and a 2000x1600 original go through exactly the same steps:

1. recognise the format from the bytes (JPEG, PNG or DICOM; nothing else);
2. decode to one grayscale channel scaled to [0, 1] (8-bit / 255, 16-bit / 65535, DICOM
   after modality LUT, VOI LUT / window and MONOCHROME1 inversion, min-max scaled);
3. stretch to ``size x size`` (aspect ratio not kept, as the Kermany copies were made) with
   antialiased bilinear interpolation in float32.

Per-image standardisation (zero mean, unit variance) happens inside the network itself, so
exposure and contrast constants never have to be copied anywhere else.
"""

from __future__ import annotations

import io
import math
import warnings
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

#: Decoded images larger than this are refused as decompression bombs (about 8k x 8k).
MAX_PIXELS = 64_000_000
#: Smaller images carry too little information to classify.
MIN_SIDE = 32
#: Most bytes a Deflated DICOM dataset may inflate to: the largest image accepted at 16 bits
#: per pixel, plus 1 MiB of header.
MAX_INFLATED_BYTES = 2 * MAX_PIXELS + (1 << 20)

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DICOM_MAGIC_OFFSET = 128
DICOM_MAGIC = b"DICM"

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


class ImageError(ValueError):
    """An image that cannot become model input; carries a stable code and an HTTP status."""

    code = "invalid_image"
    status = 422

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EmptyImageError(ImageError):
    code = "empty_file"
    status = 400


class UnsupportedFormatError(ImageError):
    code = "unsupported_format"
    status = 415


class UnsupportedTransferSyntaxError(ImageError):
    code = "unsupported_transfer_syntax"
    status = 415


class UndecodableImageError(ImageError):
    code = "undecodable_image"
    status = 422


class ImageTooSmallError(ImageError):
    code = "image_too_small"
    status = 422


class DecompressionBombError(ImageError):
    code = "decompression_bomb"
    status = 422


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


def _check_dimensions(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise DecompressionBombError(
            f"image is {width}x{height} pixels, over the limit of {MAX_PIXELS:,} pixels; "
            "downscale it before uploading"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageTooSmallError(
            f"image is {width}x{height} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed"
        )


def _pil_to_gray(img: Image.Image) -> np.ndarray:
    """Convert a decoded Pillow image to float32 grayscale in [0, 1]."""
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
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.float32) / 255.0


def _decode_pillow(data: bytes, fmt: str, draft_size: int | None) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data), formats=[fmt.upper()])
            _check_dimensions(*img.size)
            if fmt == "jpeg" and draft_size is not None and img.mode in ("RGB", "L"):
                # Decode large JPEGs at a reduced DCT scale; Pillow keeps both sides >= size.
                img.draft("L", (draft_size, draft_size))
            img.load()
            if fmt == "jpeg":
                img = ImageOps.exif_transpose(img)
            return _pil_to_gray(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DecompressionBombError(
            f"image is over the limit of {MAX_PIXELS:,} pixels; downscale it before uploading"
        ) from None
    except Exception:
        raise UndecodableImageError(
            f"the {fmt.upper()} data could not be decoded (truncated or corrupt); "
            "re-export the image and try again"
        ) from None


# Compressed DICOM transfer syntaxes we attempt to decode. JPEG 2000 is refused up front:
# pydicom 3.0's JP2 box walk loops forever on a zero-length box, so a 100-byte upload could
# pin a worker (found by our hostile-input probing).
_DICOM_COMPRESSED_ALLOWED = frozenset(
    {
        "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
        "1.2.840.10008.1.2.5",  # RLE Lossless
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline (8-bit)
        "1.2.840.10008.1.2.4.51",  # JPEG Extended (12-bit)
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    }
)


def _has_decoder(tsyntax: Any) -> bool:
    """Whether pydicom can decode this compressed transfer syntax with what is installed."""
    from pydicom.pixels import get_decoder

    try:
        return bool(get_decoder(tsyntax).is_available)
    except NotImplementedError:  # no decoder exists for this syntax at all
        return False


def _decodable_syntax(tsyntax: Any) -> bool:
    """Whether pixel data in this transfer syntax can be decoded here.

    A UID that is not a transfer syntax at all (private or corrupt) is not: pydicom's
    ``is_compressed`` raises a bare ValueError on it.
    """
    if not tsyntax.is_transfer_syntax:
        return False
    if not tsyntax.is_compressed:
        return True
    return str(tsyntax) in _DICOM_COMPRESSED_ALLOWED and _has_decoder(tsyntax)


def _check_inflated_size(data: bytes) -> None:
    """Refuse a Deflated DICOM whose dataset inflates past ``MAX_INFLATED_BYTES``.

    pydicom inflates the whole dataset in memory before reading a single element, so a
    300 KB upload of deflated zeros cost 600 MB; this counts the inflated bytes first, in
    chunks, keeping none of them.

    Raises:
        DecompressionBombError: the dataset inflates past the limit.
    """
    from pydicom.filereader import read_dataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    fp = io.BytesIO(data)
    fp.seek(DICOM_MAGIC_OFFSET + len(DICOM_MAGIC))
    # The file meta group (0002) is always Explicit VR Little Endian and never deflated.
    meta = read_dataset(fp, False, True, stop_when=lambda tag, vr, length: tag >> 16 != 2)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = 0
    step = 1 << 16
    for start in range(fp.tell(), len(data), step):
        pending = data[start : start + step]
        while pending and inflated <= MAX_INFLATED_BYTES:
            inflated += len(inflater.decompress(pending, 1 << 20))
            pending = inflater.unconsumed_tail
        if inflated > MAX_INFLATED_BYTES:
            raise DecompressionBombError(
                f"the Deflated DICOM dataset inflates to over {MAX_INFLATED_BYTES:,} bytes; "
                "send it uncompressed (Explicit VR Little Endian) or as JPEG/PNG"
            )


def _decode_dicom(data: bytes) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        _check_inflated_size(data)
        ds = pydicom.dcmread(io.BytesIO(data))
        # pydicom converts elements lazily, so a corrupt header field raises on first access
        # (NotImplementedError for an unknown VR, ValueError, ...), not in dcmread.
        has_pixels = "PixelData" in ds
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    except ImageError:
        raise
    except Exception:
        raise UndecodableImageError(
            "the DICOM file could not be parsed (truncated or corrupt)"
        ) from None
    if not has_pixels:
        raise UndecodableImageError("the DICOM file holds no pixel data (no PixelData element)")
    _check_dimensions(cols, rows)
    if rows * cols * frames > MAX_PIXELS:
        raise DecompressionBombError(
            f"DICOM holds {frames} frames of {cols}x{rows}, over the limit of {MAX_PIXELS:,} pixels"
        )
    if tsyntax is not None and not _decodable_syntax(tsyntax):
        what = (
            f"{tsyntax.name} ({tsyntax})"
            if tsyntax.is_transfer_syntax
            else f"{str(tsyntax)[:64]!r} (not a known transfer syntax UID)"
        )
        raise UnsupportedTransferSyntaxError(
            f"DICOM transfer syntax {what} cannot be decoded here; "
            "send it uncompressed (Explicit VR Little Endian) or as JPEG/PNG"
        )
    try:
        pixels = ds.pixel_array
    except Exception:
        raise UndecodableImageError("the DICOM pixel data could not be decoded") from None
    try:
        if frames > 1:
            pixels = pixels[0]
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        if pixels.ndim == 3:  # colour DICOM: luma, as Pillow's 'L' conversion does
            rgb = pixels.astype(np.float32)
            arr = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        else:
            arr = apply_modality_lut(pixels, ds)
            arr = apply_voi_lut(arr, ds)
    except Exception:
        raise UndecodableImageError("the DICOM pixel data could not be decoded") from None
    # Scaled in float64 (in place: the array is ours): in float32, values after an absurd
    # rescale slope overflow to inf and the min-max scaling gives NaN model input.
    arr = np.asarray(arr, dtype=np.float64)
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if not math.isfinite(hi - lo):  # also NaN or inf at either end
        raise UndecodableImageError(
            "the DICOM pixel values are not finite after its rescale slope/intercept and window; "
            "check those header fields"
        )
    if hi > lo:
        arr -= lo
        arr /= hi - lo
        out = arr.astype(np.float32)
    else:
        out = np.zeros(arr.shape, dtype=np.float32)
    if photometric == "MONOCHROME1":  # 0 is white in MONOCHROME1
        out = 1.0 - out
    return out


def decode_gray(data: bytes, draft_size: int | None = None) -> np.ndarray:
    """Decode image bytes to a 2-D float32 grayscale array in [0, 1] at full resolution.

    Args:
        data: The encoded file.
        draft_size: If given, JPEGs at least twice this size may be decoded at a reduced
            scale (never below ``draft_size`` on either side).

    Raises:
        ImageError: a subclass naming what is wrong (empty, unsupported, undecodable,
            too small, decompression bomb).
    """
    fmt = sniff_format(data)
    gray = _decode_dicom(data) if fmt == "dicom" else _decode_pillow(data, fmt, draft_size)
    if gray.ndim != 2:
        raise UndecodableImageError(f"decoded image has unexpected shape {gray.shape}")
    _check_dimensions(gray.shape[1], gray.shape[0])
    return gray


def resize_gray(gray: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Stretch a [0, 1] grayscale array to the model's input shape (C, H, W), float32."""
    img = Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32), mode="F")
    img = img.resize((spec.size, spec.size), Image.Resampling.BILINEAR)
    out = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    return out[None, :, :]


def preprocess_bytes(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """Turn encoded image bytes into one model input of shape ``spec.input_shape``."""
    return resize_gray(decode_gray(data, draft_size=spec.size), spec)


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
