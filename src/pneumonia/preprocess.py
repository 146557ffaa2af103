"""The one place that knows how image bytes become model input.

Training, evaluation, batch scoring and the HTTP service all call :func:`preprocess_image`
(or :func:`preprocess_bytes`, its model input alone) with the :class:`PreprocessSpec` stored inside the exported model, so a 224x224 training copy
and a 2000x1600 original go through exactly the same steps:

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

Per-image standardisation (zero mean, unit variance) happens inside the network itself, so
exposure and contrast constants never have to be copied anywhere else.
"""

from __future__ import annotations

import io
import math
import mmap
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, cast

import numpy as np
from PIL import Image, ImageOps

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
#: Most bytes a Deflated DICOM dataset may inflate to (pydicom holds it whole while the frame is
#: read from it): the decode budget plus 1 MiB of header.
MAX_INFLATED_BYTES = MAX_DECODE_BYTES + (1 << 20)
#: Images are converted to float a strip of about this many pixels at a time.
_STRIP_PIXELS = 1 << 18
#: Bytes a pixel takes in Pillow's memory, by mode; any other mode takes 4.
_PIL_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
#: DICOM values larger than this (the pixel data) are not copied out of the upload when the
#: file is parsed; every lookup table (at most 65536 entries of 2 bytes) is smaller.
_DICOM_DEFER_BYTES = 1 << 20

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


def _check_decode_bytes(need: int, what: str, advice: str) -> None:
    if need > MAX_DECODE_BYTES:
        raise DecompressionBombError(
            f"decoding this {what} would take {need / 2**20:.0f} MiB, over the limit of "
            f"{MAX_DECODE_BYTES >> 20} MiB; {advice} before uploading"
        )


def _reduction(width: int, height: int, draft_size: int | None) -> tuple[int, int]:
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


def _box_reduce(arr: np.ndarray, fx: int, fy: int) -> np.ndarray:
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


def _strip_rows(width: int, fy: int) -> int:
    """Rows per strip: about ``_STRIP_PIXELS`` pixels, a whole number of reduction boxes."""
    return max(1, _STRIP_PIXELS // (max(width, 1) * fy)) * fy


def _pil_gray_reduced(img: Image.Image, fx: int, fy: int) -> np.ndarray:
    """``_pil_to_gray(img)`` box-reduced by (fx, fy), float32.

    Converted a strip of rows at a time, so no full-size RGBA or float copy of a large image
    exists; every step of ``_pil_to_gray`` is per pixel, so the strips join into exactly the
    whole image's conversion.
    """
    width, height = img.size
    rows = _strip_rows(width, fy)
    if rows >= height:
        return np.asarray(_box_reduce(_pil_to_gray(img), fx, fy), dtype=np.float32)
    out = np.empty((-(-height // fy), -(-width // fx)), dtype=np.float32)
    for top in range(0, height, rows):
        box = (0, top, width, min(height, top + rows))
        strip = _box_reduce(_pil_to_gray(img.crop(box)), fx, fy)
        out[top // fy : top // fy + strip.shape[0]] = strip
    return out


#: Start-of-frame markers of progressive JPEGs (Huffman or arithmetic, plain or differential).
_JPEG_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})


def _jpeg_buffers_coefficients(data: bytes, components: int) -> bool:
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
        elif marker in _JPEG_PROGRESSIVE_SOF:
            return True
        elif marker == 0xDA:  # start of scan: its component count follows the length
            return data[pos + 4] < components
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return True


def _jpeg_coefficient_bytes(width: int, height: int, layers: list[tuple[int, int, int, int]]) -> int:
    """Bytes of libjpeg's whole-image coefficient buffers: 64 2-byte values per 8x8 block of
    every component, at its own sampling."""
    hmax = max((h for _, h, _, _ in layers), default=1) or 1
    vmax = max((v for _, _, v, _ in layers), default=1) or 1
    blocks = sum(
        math.ceil(width * h / hmax / 8) * math.ceil(height * v / vmax / 8)
        for _, h, v, _ in layers
    )
    return 128 * blocks


def _pil_decode_bytes(img: Image.Image, data: bytes, fmt: str, width: int, height: int) -> int:
    """What decoding ``img`` will hold: Pillow's image at its (possibly reduced) decode size,
    plus libjpeg's coefficients of the full-size ``width x height`` image if it buffers them."""
    need = img.size[0] * img.size[1] * _PIL_PIXEL_BYTES.get(img.mode, 4)
    layers = getattr(img, "layer", None)
    if fmt == "jpeg" and layers and _jpeg_buffers_coefficients(data, len(layers)):
        need += _jpeg_coefficient_bytes(width, height, layers)
    return need


def _jpeg_draft(img: Image.Image, draft_size: int) -> None:
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


def _decode_pillow(data: bytes, fmt: str, draft_size: int | None) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data), formats=[fmt.upper()])
            width, height, mode = *img.size, img.mode
            _check_dimensions(width, height)
            if fmt == "jpeg" and draft_size is not None:
                _jpeg_draft(img, draft_size)
            need = _pil_decode_bytes(img, data, fmt, width, height)
            _check_decode_bytes(
                need,
                f"{width}x{height} {mode} {fmt.upper()}",
                "downscale it, or save it as 8-bit grayscale PNG or baseline JPEG,",
            )
            img.load()
            gray = _pil_gray_reduced(img, *_reduction(*img.size, draft_size))
            # Orientation last: the conversion is per pixel, so turning the small gray image
            # gives what turning the decoded one did.
            return _exif_transpose(gray, img) if fmt == "jpeg" else gray
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


def _inflated_chunks(data: bytes, start: int) -> Iterator[bytes]:
    """The raw deflate stream ``data[start:]`` inflated, at most 1 MiB at a time.

    Raises:
        zlib.error: the stream is corrupt or cut short.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    step = 1 << 16
    for pos in range(start, len(data), step):
        pending = data[pos : pos + step]
        while pending:
            yield inflater.decompress(pending, 1 << 20)
            pending = inflater.unconsumed_tail
    yield inflater.flush()
    if not inflater.eof:
        raise zlib.error("incomplete or truncated deflate stream")


def _read_dicom(data: bytes) -> tuple[Any, bytes | mmap.mmap, int]:
    """Parse a DICOM file, leaving its pixel data where it lies.

    Values over ``_DICOM_DEFER_BYTES`` (the pixel data) are not read (``defer_size``); the
    returned source holds them at the offsets the dataset records. That is ``data`` itself,
    except for a Deflated dataset: pydicom inflates those whole in memory before reading a
    single element (a 300 KB upload of deflated zeros cost 600 MB) and holds the output twice
    while joining it, so here the inflated bytes are counted first, in chunks, keeping none of
    them, then inflated again into one buffer of exactly that size.

    Returns:
        The dataset, the bytes its offsets refer to, and the inflated size (0 if not Deflated).

    Raises:
        DecompressionBombError: the dataset inflates past ``MAX_INFLATED_BYTES``.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filereader import read_dataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    fp = io.BytesIO(data)
    fp.seek(DICOM_MAGIC_OFFSET + len(DICOM_MAGIC))
    # The file meta group (0002) is always Explicit VR Little Endian and never deflated.
    meta = read_dataset(fp, False, True, stop_when=lambda tag, vr, length: tag >> 16 != 2)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return pydicom.dcmread(io.BytesIO(data), defer_size=_DICOM_DEFER_BYTES), data, 0
    inflated = 0
    for chunk in _inflated_chunks(data, fp.tell()):
        inflated += len(chunk)
        if inflated > MAX_INFLATED_BYTES:
            raise DecompressionBombError(
                f"the Deflated DICOM dataset inflates to over {MAX_INFLATED_BYTES:,} bytes; "
                "send it uncompressed (Explicit VR Little Endian) or as JPEG/PNG"
            )
    if not inflated:
        ds = Dataset()
        ds.file_meta = FileMetaDataset(meta)
        return ds, b"", 0
    source = mmap.mmap(-1, inflated)  # anonymous memory, readable as a file and as a buffer
    for chunk in _inflated_chunks(data, fp.tell()):
        source.write(chunk)
    source.seek(0)
    ds = read_dataset(cast(BinaryIO, source), False, True, defer_size=_DICOM_DEFER_BYTES)
    ds.file_meta = FileMetaDataset(meta)
    return ds, source, inflated


def _dicom_decode_bytes(ds: Any, tsyntax: Any, rows: int, cols: int, inflated: int) -> int:
    """What reading the first frame will hold besides the upload (see ``MAX_DECODE_BYTES``;
    measured by benchmarks/bench_decode_memory.py)."""
    from pydicom.uid import RLELossless

    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    sample_bytes = max(1, int(ds.get("BitsAllocated", 16) or 16) // 8)
    frame = rows * cols * samples * sample_bytes
    if tsyntax is not None and tsyntax.is_encapsulated:
        # The fragments as read, the array, and what the decoder holds while filling it: RLE
        # decodes into a buffer of the frame's size, a segment (one byte of each sample,
        # growing in 1/8 steps) at a time; the JPEG plugin has Pillow decode the frame (4
        # bytes a pixel if colour) and copies that image out.
        if tsyntax == RLELossless:
            own = frame + (9 * frame) // (8 * sample_bytes)
        else:
            own = rows * cols * (4 if samples > 1 else 1) + frame
        return len(ds.PixelData) + frame + own
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    bits_stored = int(ds.get("BitsStored", 0) or 0)
    view = (
        ds.get("BitsAllocated") in (8, 16, 32)
        and not photometric.startswith("YBR")
        and not (samples > 1 and bits_stored < 8 * sample_bytes)
        and (tsyntax is None or tsyntax.is_little_endian)
    )
    # Else a copy: byte-swapped, unpacked from bits, colour-converted or colour bits cleared.
    return inflated + (0 if view else frame)


def _dicom_frame(ds: Any, source: bytes | mmap.mmap) -> tuple[np.ndarray, int]:
    """The first frame's stored values, and the unused high bits still to clear from them.

    Uncompressed pixel data left in ``source`` by :func:`_read_dicom` is decoded as a
    read-only view into it, not a copy (unless byte-swapped, unpacked or colour-converted).
    The bits above Bits Stored are then cleared by the caller, a strip at a time, as pydicom
    would (``correct_unused_bits``) on a full copy; colour samples are cleared by pydicom,
    which does it before converting them. Pixel data read with the dataset (compressed, or
    small) is decoded by pydicom.
    """
    from pydicom.dataelem import RawDataElement
    from pydicom.pixels import as_pixel_options, get_decoder, pixel_array

    unused_bits = max(0, int(ds.get("BitsAllocated", 0) or 0) - int(ds.get("BitsStored", 0) or 0))
    opts: dict[str, Any] = {"correct_unused_bits": False}
    if unused_bits and int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        opts, unused_bits = {}, 0
    elem = ds.get_item("PixelData", keep_deferred=True)
    if not (isinstance(elem, RawDataElement) and elem.value is None):
        return pixel_array(ds, index=0, **opts), unused_bits
    value = memoryview(source)[elem.value_tell : elem.value_tell + elem.length]
    options = as_pixel_options(ds, pixel_keyword="PixelData", view_only=True, **opts)
    frame, _ = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(value, index=0, **options)
    return frame, unused_bits


def _dicom_gray(
    frame: np.ndarray, unused_bits: int, ds: Any, fx: int, fy: int
) -> tuple[np.ndarray, float, float]:
    """The frame's values after modality LUT and VOI LUT / window, box-reduced by (fx, fy).

    Works a strip of rows at a time, in float64 (values after an absurd rescale slope
    overflow float32), so only strips are ever full-size float. The LUTs and the window are
    applied per pixel at full resolution, before any averaging: the window is not linear,
    so averaging first would blur its edges differently at every image size. With both
    factors 1 the strips join into exactly the whole frame's values.

    Returns:
        The (reduced) values, and the least and greatest full-resolution value (NaN if any
        value was NaN), for the min-max scaling.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    height, width = frame.shape[:2]
    rows = _strip_rows(width, fy)
    out = np.empty((-(-height // fy), -(-width // fx)), dtype=np.float64)
    lo, hi = np.inf, -np.inf
    for top in range(0, height, rows):
        stored = np.array(frame[top : top + rows])  # a copy: the frame may be a read-only view
        if unused_bits:
            np.left_shift(stored, unused_bits, out=stored)
            np.right_shift(stored, unused_bits, out=stored)
        if stored.ndim == 3:  # colour DICOM: luma, as Pillow's 'L' conversion does
            rgb = stored.astype(np.float32)
            values = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        else:
            values = apply_voi_lut(apply_modality_lut(stored, ds), ds)
        values = np.asarray(values, dtype=np.float64)
        lo, hi = np.minimum(lo, values.min()), np.maximum(hi, values.max())  # NaN propagates
        reduced = _box_reduce(values, fx, fy)
        out[top // fy : top // fy + reduced.shape[0]] = reduced
    return out, float(lo), float(hi)


def _decode_dicom(data: bytes, draft_size: int | None) -> np.ndarray:
    try:
        ds, source, inflated = _read_dicom(data)
        # pydicom converts elements lazily, so a corrupt header field raises on first access
        # (NotImplementedError for an unknown VR, ValueError, ...), not in dcmread.
        has_pixels = "PixelData" in ds
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
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
        need = _dicom_decode_bytes(ds, tsyntax, rows, cols, inflated)
    except Exception:
        raise UndecodableImageError("the DICOM pixel data could not be decoded") from None
    _check_decode_bytes(
        need,
        f"{cols}x{rows} DICOM",
        "downscale it, or send it uncompressed (Explicit VR Little Endian),",
    )
    try:
        frame, unused_bits = _dicom_frame(ds, source)
        arr, lo, hi = _dicom_gray(frame, unused_bits, ds, *_reduction(cols, rows, draft_size))
    except Exception:
        raise UndecodableImageError("the DICOM pixel data could not be decoded") from None
    if not math.isfinite(hi - lo):  # also NaN or inf at either end
        raise UndecodableImageError(
            "the DICOM pixel values are not finite after its rescale slope/intercept and window; "
            "check those header fields"
        )
    # Min-max scaling is affine, so it commutes with the box averaging done before it.
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
    fmt = sniff_format(data)
    if fmt == "dicom":
        gray = _decode_dicom(data, draft_size)
    else:
        gray = _decode_pillow(data, fmt, draft_size)
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


@dataclass(frozen=True)
class Preprocessed:
    """One image as the model takes it, and the picture a heatmap is drawn on.

    Attributes:
        input: The model input, float32 of shape ``spec.input_shape``.
        view: The decoded grayscale image in [0, 1] at its own aspect ratio, if asked for
            (``view_side``), else None.
    """

    input: np.ndarray
    view: np.ndarray | None = None


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
    gray = decode_gray(data, draft_size=spec.size)
    x = resize_gray(gray, spec)
    if view_side is None:
        return Preprocessed(x)
    if sniff_format(data) == "jpeg":
        gray = decode_gray(data, draft_size=view_side)
    return Preprocessed(x, gray)


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
