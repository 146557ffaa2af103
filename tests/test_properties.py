"""Property-based tests of the one place that knows pixels (``pneumonia.preprocess``).

The contract: whatever bytes arrive, ``preprocess_bytes(data, spec)`` either returns one model
input (float32, ``spec.input_shape``, finite, in [0, 1]) or raises one of the documented
``ImageError`` subclasses. Nothing else may escape: a bare ValueError, OSError, struct.error or
NaN input becomes a 500 in the service. Every valid JPEG, PNG and DICOM decodes, unless a side
is under ``MIN_SIDE`` (``ImageTooSmallError``).

Hypothesis runs derandomized with no example database, so every run tries the same inputs and
CI is reproducible; ``@example`` pins the defects these properties found.
"""

from __future__ import annotations

import contextlib
import io
import math
import signal
import struct
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from benchmarks.common import dicom_bytes, png_chunk
from conftest import encode, synthetic_xray
from pneumonia.preprocess import (
    DICOM_MAGIC,
    DICOM_MAGIC_OFFSET,
    JPEG_MAGIC,
    MAX_INFLATED_BYTES,
    MIN_SIDE,
    PNG_MAGIC,
    CorruptImageError,
    DecompressionBombError,
    EmptyImageError,
    ImageError,
    ImageTooSmallError,
    PreprocessSpec,
    UndecodableImageError,
    UnsupportedFormatError,
    UnsupportedTransferSyntaxError,
    decode_gray,
    preprocess_bytes,
    resize_gray,
)
from pneumonia.serve.errors import image_error_status

#: Not a power of two times MIN_SIDE, so JPEG draft decoding meets awkward ratios.
SPEC = PreprocessSpec(size=48)
DOCUMENTED = (
    EmptyImageError,
    UnsupportedFormatError,
    UnsupportedTransferSyntaxError,
    UndecodableImageError,
    ImageTooSmallError,
    DecompressionBombError,
    CorruptImageError,
)
#: One example may take this long; a decoder stuck in a loop fails the test instead of CI.
EXAMPLE_TIME_LIMIT_S = 20

PROPERTIES = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread if the block runs longer than ``seconds``."""

    def _raise(signum: int, frame: Any) -> None:
        raise TimeoutError(f"decoding took longer than {seconds} s (a decoder loop?)")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def assert_model_input(out: np.ndarray) -> None:
    assert out.dtype == np.float32
    assert out.shape == SPEC.input_shape
    assert np.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0


def outcome(data: bytes) -> np.ndarray | ImageError:
    """``preprocess_bytes`` under the contract: a model input, or a documented ImageError."""
    try:
        with time_limit(EXAMPLE_TIME_LIMIT_S), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom and Pillow warn about what they repair
            out = preprocess_bytes(data, SPEC)
    except ImageError as exc:
        assert type(exc) in DOCUMENTED, f"undocumented {type(exc).__name__}: {exc}"
        assert exc.message and image_error_status(exc) in (400, 415, 422)
        return exc
    assert_model_input(out)
    return out


# --- seeds: small valid files of every kind --------------------------------------------------

_XRAY = synthetic_xray(1, seed=3, size=64)
#: 48x64 ramp of 12-bit stored values.
_RAMP = np.tile(np.arange(64, dtype=np.uint16) * 64, (48, 1))


def _pil_bytes(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rle_dicom() -> bytes:
    from pydicom import dcmread
    from pydicom.uid import RLELossless

    ds = dcmread(io.BytesIO(dicom_bytes(_RAMP)))
    ds.compress(RLELossless)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


SEEDS: dict[str, bytes] = {
    "jpeg": encode(_XRAY),
    "jpeg_progressive_rgb": encode(np.dstack([_XRAY] * 3), progressive=True),
    "jpeg_cmyk": _pil_bytes(Image.fromarray(np.dstack([_XRAY] * 4), mode="CMYK"), "JPEG"),
    "png": encode(_XRAY, "PNG"),
    "png16": encode(_XRAY.astype(np.uint16) * 257, "PNG"),
    "png_palette": _pil_bytes(Image.fromarray(_XRAY).convert("P"), "PNG", transparency=0),
    "png_rgba": encode(np.dstack([_XRAY] * 4), "PNG"),
    "dicom": dicom_bytes(_RAMP),
    "dicom_lut": dicom_bytes(_RAMP, "MONOCHROME1", slope=2.0, intercept=-10, window=(2000, 3000)),
    "dicom_rle": _rle_dicom(),
    "dicom_deflated": dicom_bytes(_RAMP, transfer_syntax="1.2.840.10008.1.2.1.99"),
}

# --- regressions found by these properties ----------------------------------------------------

#: A corrupt transfer syntax UID: pydicom's ``is_compressed`` raised a bare ValueError (500).
BAD_TS_UID = SEEDS["dicom"].replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.q\x00", 1)
#: Rows (0028,0010) with an unknown VR "UU": reading it raised NotImplementedError (500).
BAD_VR_ROWS = SEEDS["dicom"].replace(b"\x28\x00\x10\x00US", b"\x28\x00\x10\x00UU", 1)
#: Rescale slope 1e308: the pixel values overflowed to inf and the model input was NaN (500).
HUGE_SLOPE = dicom_bytes(_RAMP, slope=1e308, intercept=0.0)


def _deflated_dicom_bomb(inflated_bytes: int) -> bytes:
    """A valid Deflated DICOM header followed by ``inflated_bytes`` of deflated zeros.

    Built chunk by chunk: neither this nor the decoder should ever hold the zeros.
    """
    from pydicom.filereader import read_dataset

    valid = SEEDS["dicom_deflated"]
    fp = io.BytesIO(valid)
    fp.seek(DICOM_MAGIC_OFFSET + len(DICOM_MAGIC))
    read_dataset(fp, False, True, stop_when=lambda tag, vr, length: tag >> 16 != 2)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    parts = [deflater.compress(zeros) for _ in range(inflated_bytes >> 20)]
    return valid[: fp.tell()] + b"".join(parts) + deflater.flush()


def test_deflated_dicom_inflating_past_the_limit_is_a_bomb() -> None:
    """Regression: pydicom inflated the whole dataset first; 300 KB of upload cost 600 MB."""
    data = _deflated_dicom_bomb(MAX_INFLATED_BYTES + (4 << 20))
    assert len(data) < 200_000
    assert isinstance(outcome(data), DecompressionBombError)


def test_deflated_dicom_decodes_like_uncompressed() -> None:
    """The inflation check does not get in the way of a real Deflated file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(
            decode_gray(SEEDS["dicom_deflated"]), decode_gray(SEEDS["dicom"])
        )


def test_regression_inputs_are_what_they_claim() -> None:
    """The pinned inputs still carry their defect (a replace() that matched nothing would not)."""
    assert SEEDS["dicom"] not in (BAD_TS_UID, BAD_VR_ROWS)
    for data in (BAD_TS_UID, BAD_VR_ROWS, HUGE_SLOPE):
        assert isinstance(outcome(data), ImageError)


# --- any bytes ---------------------------------------------------------------------------------


@PROPERTIES
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes_give_model_input_or_a_documented_error(data: bytes) -> None:
    result = outcome(data)
    if not data:
        assert isinstance(result, EmptyImageError)


_DICOM_PREAMBLE = b"\x00" * DICOM_MAGIC_OFFSET + DICOM_MAGIC
_PREFIXES = st.sampled_from(
    [
        JPEG_MAGIC,
        JPEG_MAGIC + b"\xe0\x00\x10JFIF\x00",
        PNG_MAGIC,
        PNG_MAGIC + b"\x00\x00\x00\x0dIHDR",
        _DICOM_PREAMBLE,
        # A whole valid file meta group (and more): the fuzz starts inside the dataset.
        SEEDS["dicom"][:300],
        SEEDS["png"][:33],  # signature and a valid IHDR chunk
        SEEDS["jpeg"][:600],  # markers and tables up to the scan
    ]
)


@PROPERTIES
@given(prefix=_PREFIXES, rest=st.binary(max_size=2048))
def test_bytes_behind_real_magic_give_model_input_or_a_documented_error(
    prefix: bytes, rest: bytes
) -> None:
    outcome(prefix + rest)


def _png_with_header(width: int, height: int, depth: int, color: int, tail: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return PNG_MAGIC + png_chunk(b"IHDR", ihdr) + tail


@PROPERTIES
@given(
    width=st.integers(0, 2**31 - 1),
    height=st.integers(0, 2**31 - 1),
    depth=st.sampled_from([1, 2, 4, 8, 16, 3]),
    color=st.sampled_from([0, 2, 3, 4, 6, 1]),
    tail=st.binary(max_size=256),
)
def test_png_header_claims_any_size(
    width: int, height: int, depth: int, color: int, tail: bytes
) -> None:
    """A header claiming any size, up to 2^31 per side, is refused or decoded, never trusted."""
    result = outcome(_png_with_header(width, height, depth, color, tail))
    if width * height > 64_000_000:
        # Since issue 13 a file that ends before its IEND chunk is corrupt_image, whatever
        # size its header claims: every chunk is checked before the header is trusted.
        expected = DecompressionBombError | UndecodableImageError | CorruptImageError
        assert isinstance(result, expected)


# --- mutated valid files ----------------------------------------------------------------------


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid seed file with a few byte-level edits: flips, deletions, insertions, cuts."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["set", "delete", "insert", "cut", "word"]))
        if op == "set":
            data[i] = draw(st.integers(0, 255))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 64))]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "cut":
            del data[max(i, 1) :]
        else:  # a length or size field set to an extreme
            data[i : i + 4] = draw(
                st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff"])
            )
    return bytes(data)


@settings(PROPERTIES, max_examples=300)
@given(data=mutated_images())
@example(data=BAD_TS_UID)
@example(data=BAD_VR_ROWS)
@example(data=HUGE_SLOPE)
def test_mutated_images_give_model_input_or_a_documented_error(data: bytes) -> None:
    outcome(data)


# --- valid images -------------------------------------------------------------------------------

#: Sides: below MIN_SIDE (incl. 1xN), around it, and a few up to 4x the model input.
_SIDES = st.one_of(
    st.integers(1, MIN_SIDE - 1), st.integers(MIN_SIDE, MIN_SIDE + 4), st.integers(33, 200)
)


def _pixels(seed: int, shape: tuple[int, ...], kind: str, top: int) -> np.ndarray:
    """Noise, a constant, or a ramp, with values in [0, top]."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return rng.integers(0, top + 1, size=shape)
    if kind == "constant":
        return np.full(shape, rng.integers(0, top + 1))
    ramp = np.linspace(0, top, shape[1]).round()
    return np.broadcast_to(ramp.reshape((1, -1) + (1,) * (len(shape) - 2)), shape).copy()


_PIL_CASES = [
    ("PNG", "L", 1),
    ("PNG", "1", 1),
    ("PNG", "LA", 2),
    ("PNG", "P", 1),
    ("PNG", "RGB", 3),
    ("PNG", "RGBA", 4),
    ("PNG", "I;16", 1),
    ("JPEG", "L", 1),
    ("JPEG", "RGB", 3),
    ("JPEG", "CMYK", 4),
]


@PROPERTIES
@given(
    case=st.sampled_from(_PIL_CASES),
    width=_SIDES,
    height=_SIDES,
    kind=st.sampled_from(["noise", "constant", "ramp"]),
    seed=st.integers(0, 2**32 - 1),
    orientation=st.integers(1, 8),
    progressive=st.booleans(),
    transparency=st.booleans(),
)
def test_valid_pillow_images_decode(
    case: tuple[str, str, int],
    width: int,
    height: int,
    kind: str,
    seed: int,
    orientation: int,
    progressive: bool,
    transparency: bool,
) -> None:
    fmt, mode, bands = case
    top = 65535 if mode == "I;16" else 255
    shape = (height, width) if bands == 1 else (height, width, bands)
    arr = _pixels(seed, shape, kind, top)
    if mode == "I;16":
        img = Image.fromarray(arr.astype(np.uint16))
    elif mode in ("1", "P"):
        img = Image.fromarray(arr.astype(np.uint8)).convert(mode)
    else:
        img = Image.fromarray(arr.astype(np.uint8), mode=mode)
    kw: dict[str, Any] = {}
    if fmt == "JPEG":
        kw["progressive"] = progressive
        exif = Image.Exif()
        exif[0x0112] = orientation  # rotated or mirrored; the decoder applies it
        kw["exif"] = exif.tobytes()
    elif mode == "P" and transparency:
        kw["transparency"] = int(np.asarray(img)[0, 0])
    result = outcome(_pil_bytes(img, fmt, **kw))
    if min(width, height) < MIN_SIDE:
        assert isinstance(result, ImageTooSmallError), result
        return
    assert isinstance(result, np.ndarray), result
    if kind == "constant" and fmt == "PNG" and mode in ("L", "I;16"):
        # Lossless and one channel: a constant image is that value everywhere.
        np.testing.assert_allclose(result, arr.flat[0] / top, atol=1e-6)


#: Every bit depth each PNG colour type allows (PNG spec, table 11.1).
_PNG_KINDS = [(0, d) for d in (1, 2, 4, 8, 16)] + [(3, d) for d in (1, 2, 4, 8)]
_PNG_KINDS += [(color, d) for color in (2, 4, 6) for d in (8, 16)]
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


@PROPERTIES
@given(
    kind=st.sampled_from(_PNG_KINDS),
    width=_SIDES,
    height=_SIDES,
    seed=st.integers(0, 2**32 - 1),
)
def test_every_png_colour_type_and_bit_depth_decodes(
    kind: tuple[int, int], width: int, height: int, seed: int
) -> None:
    """PNGs Pillow would not write itself (2-bit gray, 16-bit RGBA, ...), built chunk by chunk."""
    color, depth = kind
    rng = np.random.default_rng(seed)
    row_bytes = math.ceil(width * _PNG_SAMPLES[color] * depth / 8)
    raw = b"".join(b"\x00" + rng.bytes(row_bytes) for _ in range(height))
    chunks = [png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0))]
    if color == 3:
        chunks.append(png_chunk(b"PLTE", rng.bytes(3 * 2**depth)))
    chunks += [png_chunk(b"IDAT", zlib.compress(raw)), png_chunk(b"IEND", b"")]
    result = outcome(PNG_MAGIC + b"".join(chunks))
    if min(width, height) < MIN_SIDE:
        assert isinstance(result, ImageTooSmallError), result
    else:
        assert isinstance(result, np.ndarray), result


def _decimal_string(x: float) -> float:
    return float(f"{x:.6g}")  # fits a DICOM DS (16 characters)


#: Rescale and window values: 0 or a magnitude in [1e-3, 1e4]. (A slope of 1e-95 on 12-bit
#: values with an intercept of 1 is a constant image in float64: true, but not this property.)
_DS = st.one_of(st.just(0.0), st.floats(1e-3, 1e4), st.floats(-1e4, -1e-3)).map(_decimal_string)


@PROPERTIES
@given(
    width=_SIDES,
    height=_SIDES,
    kind=st.sampled_from(["noise", "constant", "ramp"]),
    seed=st.integers(0, 2**32 - 1),
    slope=st.one_of(st.none(), _DS),
    intercept=_DS,
    window=st.one_of(
        st.none(),
        st.tuples(_DS, st.floats(1, 1e4).map(_decimal_string)),
    ),
)
def test_valid_dicoms_decode_to_unit_range_and_monochrome1_inverts(
    width: int,
    height: int,
    kind: str,
    seed: int,
    slope: float | None,
    intercept: float,
    window: tuple[float, float] | None,
) -> None:
    pixels = _pixels(seed, (height, width), kind, 4095).astype(np.uint16)
    mono2, mono1 = (
        outcome(dicom_bytes(pixels, pi, slope=slope, intercept=intercept, window=window))
        for pi in ("MONOCHROME2", "MONOCHROME1")
    )
    if min(width, height) < MIN_SIDE:
        assert isinstance(mono2, ImageTooSmallError) and isinstance(mono1, ImageTooSmallError)
        return
    assert isinstance(mono2, np.ndarray) and isinstance(mono1, np.ndarray)
    # 0 is white in MONOCHROME1: the same stored values give the negative image.
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gray = decode_gray(dicom_bytes(pixels, slope=slope, intercept=intercept))
    if kind == "constant" or slope == 0:
        assert (gray == 0).all()  # nothing to stretch: a constant image, not NaN
    else:  # no window: min-max scaling spans [0, 1] exactly
        assert gray.min() == 0.0 and gray.max() == 1.0


# --- resize_gray --------------------------------------------------------------------------------

_GRAYS = arrays(
    np.float32,
    st.tuples(st.integers(1, 120), st.integers(1, 120)),
    elements=st.floats(0, 1, width=32),
)


@PROPERTIES
@given(gray=_GRAYS, size=st.sampled_from([MIN_SIDE, 48, 100]))
def test_resize_gray_shape_range_and_bounds(gray: np.ndarray, size: int) -> None:
    spec = PreprocessSpec(size=size)
    out = resize_gray(gray, spec)
    assert out.dtype == np.float32 and out.shape == spec.input_shape
    assert np.isfinite(out).all()
    # Bilinear weights are non-negative: every output is a blend of inputs, within their range.
    assert out.min() >= gray.min() - 1e-6 and out.max() <= gray.max() + 1e-6


@PROPERTIES
@given(
    value=st.floats(0, 1, width=32),
    height=st.integers(1, 300),
    width=st.integers(1, 300),
    size=st.sampled_from([MIN_SIDE, 48, 192]),
)
def test_resize_gray_keeps_a_constant_image_constant(
    value: float, height: int, width: int, size: int
) -> None:
    out = resize_gray(np.full((height, width), value, dtype=np.float32), PreprocessSpec(size=size))
    np.testing.assert_allclose(out, value, atol=1e-6)


@PROPERTIES
@given(gray=arrays(np.float32, (48, 48), elements=st.floats(0, 1, width=32)))
def test_resize_gray_at_the_input_size_is_the_identity(gray: np.ndarray) -> None:
    np.testing.assert_array_equal(resize_gray(gray, SPEC)[0], gray)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_seed_is_a_valid_image(name: str) -> None:
    """The mutation seeds themselves decode, so mutations start from real files."""
    assert isinstance(outcome(SEEDS[name]), np.ndarray)
