"""DICOM: pixel data read where it lies, LUTs and windows per pixel, Deflated datasets bounded,
pixel data shorter than its header says refused."""

from __future__ import annotations

import io
import math
import mmap
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO, cast

import numpy as np

from pneumonia._decode.base import (
    MAX_DECODE_BYTES,
    MAX_PIXELS,
    ColourTally,
    CorruptImageError,
    DecompressionBombError,
    HeaderFacts,
    ImageError,
    UndecodableImageError,
    UnsupportedTransferSyntaxError,
    check_decode_bytes,
    check_dimensions,
    reduce_in_strips,
    reduction,
)

#: Where the "DICM" magic stands in a DICOM file (after a 128-byte preamble).
MAGIC_OFFSET = 128
MAGIC = b"DICM"
#: Most bytes a Deflated DICOM dataset may inflate to (pydicom holds it whole while the frame is
#: read from it): the decode budget plus 1 MiB of header.
MAX_INFLATED_BYTES = MAX_DECODE_BYTES + (1 << 20)
#: DICOM values larger than this (the pixel data) are not copied out of the upload when the
#: file is parsed; every lookup table (at most 65536 entries of 2 bytes) is smaller.
_DEFER_BYTES = 1 << 20


# Compressed DICOM transfer syntaxes we attempt to decode. JPEG 2000 is refused up front:
# pydicom 3.0's JP2 box walk loops forever on a zero-length box, so a 100-byte upload could
# pin a worker (found by our hostile-input probing).
_COMPRESSED_ALLOWED = frozenset(
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
    return str(tsyntax) in _COMPRESSED_ALLOWED and _has_decoder(tsyntax)


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


def _read(data: bytes) -> tuple[Any, bytes | mmap.mmap, int]:
    """Parse a DICOM file, leaving its pixel data where it lies.

    Values over ``_DEFER_BYTES`` (the pixel data) are not read (``defer_size``); the
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
    fp.seek(MAGIC_OFFSET + len(MAGIC))
    # The file meta group (0002) is always Explicit VR Little Endian and never deflated.
    meta = read_dataset(fp, False, True, stop_when=lambda tag, vr, length: tag >> 16 != 2)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return pydicom.dcmread(io.BytesIO(data), defer_size=_DEFER_BYTES), data, 0
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
    ds = read_dataset(cast(BinaryIO, source), False, True, defer_size=_DEFER_BYTES)
    ds.file_meta = FileMetaDataset(meta)
    return ds, source, inflated


def _decode_bytes(ds: Any, tsyntax: Any, rows: int, cols: int, inflated: int) -> int:
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


def _first_frame(ds: Any, source: bytes | mmap.mmap) -> tuple[np.ndarray, int]:
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


def _gray(
    frame: np.ndarray, unused_bits: int, ds: Any, fx: int, fy: int, tally: ColourTally | None = None
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
    bounds = [np.inf, -np.inf]

    def strip(top: int, bottom: int) -> np.ndarray:
        stored = np.array(frame[top:bottom])  # a copy: the frame may be a read-only view
        if unused_bits:
            np.left_shift(stored, unused_bits, out=stored)
            np.right_shift(stored, unused_bits, out=stored)
        if stored.ndim == 3:  # colour DICOM: luma, as Pillow's 'L' conversion does
            rgb = stored.astype(np.float32)
            if tally is not None:
                bits = int(ds.get("BitsStored", 8) or 8)
                tally.add_rgb(rgb, full_scale=float((1 << bits) - 1))
            values = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        else:
            values = apply_voi_lut(apply_modality_lut(stored, ds), ds)
        values = np.asarray(values, dtype=np.float64)
        # NaN propagates through minimum/maximum, so a NaN anywhere makes the bounds NaN.
        bounds[0] = np.minimum(bounds[0], values.min())
        bounds[1] = np.maximum(bounds[1], values.max())
        return values

    out = reduce_in_strips(width, height, fx, fy, strip, np.float64)
    lo, hi = bounds
    return out, float(lo), float(hi)


def _check_pixel_length(ds: Any, source: bytes | mmap.mmap) -> None:
    """Refuse native pixel data shorter than its header says, or cut off by the file's end.

    pydicom reads a short value without complaint and decodes a first frame from whatever
    is there; the header (Rows, Columns, frames, samples, Bits Allocated) says how many bytes
    every frame takes, and the element says how many it holds.

    Raises:
        CorruptImageError: naming the two lengths.
    """
    from pydicom.dataelem import RawDataElement
    from pydicom.pixels.utils import get_expected_length

    elem = ds.get_item("PixelData", keep_deferred=True)
    if isinstance(elem, RawDataElement):
        declared = elem.length
        if declared == 0xFFFFFFFF:  # undefined length: encapsulated, whatever the syntax says
            return
        # Deferred (value None): the pixel data is left where it lies in the upload.
        value = elem.value
        present = (
            max(0, min(declared, len(source) - elem.value_tell)) if value is None else len(value)
        )
    else:
        present = declared = len(elem.value or b"")
    if present < declared:
        raise CorruptImageError(
            f"the DICOM file is truncated: it ends inside its pixel data ({present:,} of the "
            f"{declared:,} bytes it declares are there); send the whole file"
        )
    try:
        expected = int(get_expected_length(ds, "bytes"))
    except Exception:  # a header pydicom cannot size: the decoder will refuse it
        return
    if present < expected:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        raise CorruptImageError(
            f"the DICOM pixel data holds {present:,} bytes, fewer than the {expected:,} its "
            f"header says ({ds.Rows} rows x {ds.Columns} columns x {frames} frame(s) x "
            f"{ds.get('SamplesPerPixel', 1)} sample(s) x {ds.BitsAllocated} bits); "
            "send an undamaged copy"
        )


def decode(data: bytes, draft_size: int | None, tally: ColourTally | None = None) -> np.ndarray:
    """A DICOM file's first frame as float32 gray in [0, 1]: modality LUT, VOI LUT / window,
    min-max scaling, MONOCHROME1 inverted; reduced as ``pneumonia.preprocess`` describes."""
    try:
        ds, source, inflated = _read(data)
        # pydicom converts elements lazily, so a corrupt header field raises on first access
        # (NotImplementedError for an unknown VR, ValueError, ...), not in dcmread.
        has_pixels = "PixelData" in ds
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        if tally is not None:
            tally.header = HeaderFacts.read(ds.get)
    except ImageError:
        raise
    except zlib.error:
        raise CorruptImageError(
            "the DICOM file is damaged or truncated: its Deflated dataset is not a complete "
            "deflate stream; send an undamaged copy"
        ) from None
    except Exception:
        raise UndecodableImageError(
            "the DICOM file could not be parsed (truncated or corrupt)"
        ) from None
    if not has_pixels:
        raise UndecodableImageError("the DICOM file holds no pixel data (no PixelData element)")
    check_dimensions(cols, rows)
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
    if tsyntax is None or not tsyntax.is_encapsulated:
        _check_pixel_length(ds, source)
    try:
        need = _decode_bytes(ds, tsyntax, rows, cols, inflated)
    except Exception:
        raise UndecodableImageError("the DICOM pixel data could not be decoded") from None
    check_decode_bytes(
        need,
        f"{cols}x{rows} DICOM",
        "downscale it, or send it uncompressed (Explicit VR Little Endian),",
    )
    try:
        frame, unused_bits = _first_frame(ds, source)
        arr, lo, hi = _gray(frame, unused_bits, ds, *reduction(cols, rows, draft_size), tally)
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


#: Tag of the pixel data; a header is everything before it.
_PIXEL_DATA = 0x7FE00010


def read_header(data: bytes) -> Any:
    """A DICOM file's dataset without its pixel data (for a report about the film), parsed
    within the decoder's bounds: a Deflated dataset is inflated only up to
    ``MAX_INFLATED_BYTES``, and no value over 1 MiB (deferred, never read) is kept.

    Raises:
        ImageError: the file does not parse, or inflates past the bound.
    """
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset

    try:
        ds, _, _ = _read(data)
        header = Dataset()
        header.file_meta = ds.file_meta
        # keys() rather than iterating the dataset, which would read each deferred value.
        for tag in list(ds.keys()):
            if tag >= _PIXEL_DATA:
                break
            raw = ds.get_item(tag)
            if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
                continue  # deferred: over _DEFER_BYTES, left where it lies
            header[tag] = ds[tag]
        return header
    except ImageError:
        raise
    except Exception:
        raise UndecodableImageError("the DICOM header could not be parsed") from None
