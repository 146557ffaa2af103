"""Preprocessing: every accepted format and mode, the output contract, and every error."""

from __future__ import annotations

import io
import json
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from benchmarks.common import damage_png, dicom_bytes, png_chunk, png_chunk_span, png_raw
from conftest import encode, jpeg_bytes, synthetic_xray
from pneumonia.preprocess import (
    CorruptImageError,
    DecompressionBombError,
    EmptyImageError,
    ImageError,
    ImageTooSmallError,
    PreprocessSpec,
    UndecodableImageError,
    UnsupportedFormatError,
    UnsupportedTransferSyntaxError,
    check_model_input,
    decode_gray,
    preprocess_bytes,
    preprocess_image,
    resize_gray,
    sniff_format,
)
from pneumonia.serve.errors import image_error_status

SPEC = PreprocessSpec(size=64)


def gray(h: int = 60, w: int = 80, seed: int = 0) -> np.ndarray:
    """A uint8 image with structure in both directions, so transposes and flips show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 40 + 150 * xx / w + 50 * yy / h + rng.normal(0, 3, (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


def save(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def as_float(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) / 255.0


# --- accepted formats and modes --------------------------------------------------------


def _palette_png(g: np.ndarray) -> bytes:
    img = Image.fromarray(g, mode="P")
    img.putpalette([v for i in range(256) for v in (255 - i,) * 3])  # index i -> gray 255-i
    return save(img, "PNG")


FORMATS = {
    "jpeg-gray": lambda g: save(Image.fromarray(g), "JPEG", quality=95),
    "jpeg-rgb": lambda g: save(Image.fromarray(g).convert("RGB"), "JPEG", quality=95),
    "jpeg-progressive": lambda g: save(Image.fromarray(g), "JPEG", quality=95, progressive=True),
    "jpeg-cmyk": lambda g: save(Image.fromarray(g).convert("CMYK"), "JPEG", quality=95),
    "png-L": lambda g: save(Image.fromarray(g), "PNG"),
    "png-16bit": lambda g: save(Image.fromarray(g.astype(np.uint16) * 257), "PNG"),
    "png-RGB": lambda g: save(Image.fromarray(g).convert("RGB"), "PNG"),
    "png-RGBA": lambda g: save(Image.fromarray(g).convert("RGBA"), "PNG"),
    "png-LA": lambda g: save(Image.fromarray(g).convert("LA"), "PNG"),
    "png-palette": lambda g: _palette_png(255 - g),
}


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_every_format_decodes_to_the_same_gray_image(kind: str) -> None:
    g = gray()
    data = FORMATS[kind](g)
    decoded = decode_gray(data)
    assert decoded.dtype == np.float32 and decoded.shape == g.shape
    lossy = kind.startswith("jpeg")
    assert np.abs(decoded - as_float(g)).mean() < (0.02 if lossy else 1e-6)
    x = preprocess_bytes(data, SPEC)
    assert x.shape == SPEC.input_shape == (1, 64, 64)
    assert x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_formats_are_sniffed_from_bytes() -> None:
    g = gray()
    assert sniff_format(FORMATS["jpeg-gray"](g)) == "jpeg"
    assert sniff_format(FORMATS["png-L"](g)) == "png"


def test_16bit_png_keeps_precision_below_8_bits() -> None:
    a = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 13 % 256 * 256).astype(np.uint16)
    b = a + 100  # differs only in the low byte: identical after any 8-bit step
    da = decode_gray(save(Image.fromarray(a), "PNG"))
    db = decode_gray(save(Image.fromarray(b), "PNG"))
    np.testing.assert_allclose(db - da, 100 / 65535, atol=1e-6)
    np.testing.assert_allclose(da, a / 65535, atol=1e-6)
    assert not np.array_equal(
        preprocess_bytes(save(Image.fromarray(a), "PNG"), SPEC),
        preprocess_bytes(save(Image.fromarray(b), "PNG"), SPEC),
    )


def test_rgb_uses_luma() -> None:
    red = np.zeros((40, 40, 3), np.uint8)
    red[..., 0] = 255
    np.testing.assert_allclose(decode_gray(save(Image.fromarray(red), "PNG")), 0.299, atol=0.005)


def test_transparent_pixels_become_black() -> None:
    rgba = np.full((40, 40, 4), 200, np.uint8)
    rgba[..., 3] = 255
    rgba[:, :20, 3] = 0
    out = decode_gray(save(Image.fromarray(rgba, mode="RGBA"), "PNG"))
    np.testing.assert_allclose(out[:, :20], 0.0)
    np.testing.assert_allclose(out[:, 20:], 200 / 255, atol=1e-6)


def test_exif_orientation_is_applied() -> None:
    g = gray(60, 100)
    img = Image.fromarray(g)
    exif = img.getexif()
    exif[0x0112] = 6  # stored sideways: display rotates 90 degrees clockwise
    out = decode_gray(save(img, "JPEG", quality=95, exif=exif.tobytes()))
    expected = np.rot90(g, k=-1)
    assert out.shape == expected.shape == (100, 60)
    assert np.abs(out - as_float(expected)).mean() < 0.02


def _large_original(w: int = 2000, h: int = 1600) -> np.ndarray:
    small = Image.fromarray(synthetic_xray(1, seed=3, size=256))
    return np.asarray(small.resize((w, h), Image.Resampling.BICUBIC))


def test_large_jpeg_draft_decode_matches_full_decode() -> None:
    spec = PreprocessSpec()
    data = encode(_large_original(), "JPEG", quality=90)
    drafted = decode_gray(data, draft_size=spec.size)
    assert drafted.shape == (200, 250)  # the reduced-scale path was taken (1/8)
    full = decode_gray(data)
    assert full.shape == (1600, 2000)
    fast = preprocess_bytes(data, spec)
    slow = resize_gray(full, spec)
    assert fast.shape == slow.shape == spec.input_shape
    assert fast.dtype == np.float32
    assert np.abs(fast - slow).mean() < 0.02


@pytest.mark.parametrize("kind", ["png-RGBA", "png-16bit", "dicom-window"])
def test_large_images_reduced_before_float_match_the_full_computation(kind: str) -> None:
    """Images four times the input size are box-averaged by whole pixels before the resize
    (what keeps decoding memory small); the model input stays that of the full decode."""
    spec = PreprocessSpec()
    g = _large_original()  # 2000x1600: reduced by 4 (1600 // 384) to 500x400
    data = {
        "png-RGBA": lambda: save(Image.fromarray(g).convert("RGBA"), "PNG"),
        "png-16bit": lambda: save(Image.fromarray(g.astype(np.uint16) * 257), "PNG"),
        "dicom-window": lambda: dicom_bytes(
            g.astype(np.uint16) * 16, WindowCenter=2000, WindowWidth=2500
        ),
    }[kind]()
    assert decode_gray(data, draft_size=spec.size).shape == (400, 500)
    fast = preprocess_bytes(data, spec)
    slow = resize_gray(decode_gray(data), spec)
    assert np.abs(fast - slow).mean() < 0.005 and np.abs(fast - slow).max() < 0.05


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_preprocess_image_is_the_one_composition(fmt: str) -> None:
    """Every path (training, Predictor, scoring, the heatmap job) calls preprocess_image: its
    input is preprocess_bytes', and the view a heatmap is drawn on is a JPEG decoded again at
    the overlay's scale, any other format's decode as the model's input came from it."""
    spec = PreprocessSpec()
    data = encode(_large_original(), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    plain = preprocess_image(data, spec)
    assert plain.view is None
    np.testing.assert_array_equal(plain.input, preprocess_bytes(data, spec))
    viewed = preprocess_image(data, spec, view_side=512)
    np.testing.assert_array_equal(viewed.input, plain.input)
    assert viewed.view is not None
    expected = decode_gray(data, draft_size=512 if fmt == "JPEG" else spec.size)
    np.testing.assert_array_equal(viewed.view, expected)
    assert viewed.view.shape == ((800, 1000) if fmt == "JPEG" else (400, 500))


def test_original_and_its_224_copy_give_the_same_input() -> None:
    """A 2000x1600 original and the 224x224 RGB JPEG copy made from it (as the training data
    was) must become nearly the same model input."""
    spec = PreprocessSpec()
    orig = _large_original()
    copy = Image.fromarray(orig).resize((224, 224), Image.Resampling.BILINEAR).convert("RGB")
    a = preprocess_bytes(encode(orig, "JPEG", quality=90), spec)
    b = preprocess_bytes(save(copy, "JPEG", quality=75), spec)
    assert a.shape == b.shape == spec.input_shape
    assert np.abs(a - b).mean() < 0.02


# --- errors ------------------------------------------------------------------------------


def test_empty_file() -> None:
    with pytest.raises(EmptyImageError) as e:
        preprocess_bytes(b"", SPEC)
    assert (e.value.code, image_error_status(e.value)) == ("empty_file", 400)


def test_text_file_is_unsupported() -> None:
    with pytest.raises(UnsupportedFormatError) as e:
        preprocess_bytes(b"hello, this is not an image\n" * 10, SPEC)
    assert (e.value.code, image_error_status(e.value)) == ("unsupported_format", 415)
    assert "JPEG, PNG or DICOM" in e.value.message


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_image_formats_are_named(fmt: str) -> None:
    data = save(Image.fromarray(gray()), fmt)
    with pytest.raises(UnsupportedFormatError, match=fmt):
        preprocess_bytes(data, SPEC)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_corrupt(fmt: str) -> None:
    """Was undecodable_image until issue 13: a cut-off file is now named for what it is."""
    data = save(Image.fromarray(gray(200, 200)), fmt)
    with pytest.raises(CorruptImageError, match="truncated") as e:
        preprocess_bytes(data[: len(data) // 2], SPEC)
    assert (e.value.code, image_error_status(e.value)) == ("corrupt_image", 422)


# --- damaged files (issue 13): every check the format carries ----------------------------


def _png_rows(width: int, height: int, bits: int, interlaced: bool) -> bytes:
    """Filtered PNG image data (filter 0, random samples) for 8-bit-per-sample gray of
    ``bits`` per pixel, as the header asks: per row a filter byte, per Adam7 pass if
    interlaced."""
    rng = np.random.default_rng(1)
    passes = (
        [(-(-(width - x0) // dx), -(-(height - y0) // dy)) for x0, y0, dx, dy in _ADAM7]
        if interlaced
        else [(width, height)]
    )
    out = b""
    for w, h in passes:
        if w > 0 and h > 0:
            for _ in range(h):
                out += b"\x00" + rng.integers(0, 256, (w * bits + 7) // 8, np.uint8).tobytes()
    return out


_ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)


@pytest.mark.parametrize("interlaced", [False, True])
@pytest.mark.parametrize(
    ("depth", "colour", "samples"), [(1, 0, 1), (8, 0, 1), (16, 0, 1), (8, 2, 3), (8, 6, 4)]
)
def test_the_png_image_data_length_check_follows_the_header(
    depth: int, colour: int, samples: int, interlaced: bool
) -> None:
    """Exactly the bytes the header asks for decode (interlaced too: per Adam7 pass); one byte
    more or fewer is corrupt."""
    raw = _png_rows(37, 41, depth * samples, interlaced)
    assert decode_gray(
        png_raw(37, 41, zlib.compress(raw), depth=depth, colour=colour, interlace=int(interlaced))
    ).shape == (41, 37)
    for wrong in (raw[:-1], raw + b"\x00"):
        with pytest.raises(CorruptImageError, match="inflates to"):
            decode_gray(
                png_raw(
                    37,
                    41,
                    zlib.compress(wrong),
                    depth=depth,
                    colour=colour,
                    interlace=int(interlaced),
                )
            )


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: damage_png(d, b"IHDR"), "CRC of its IHDR chunk"),
        (lambda d: damage_png(d, b"IDAT"), "CRC of its IDAT chunk"),
        (lambda d: damage_png(d, b"IDAT", "data"), "CRC of its IDAT chunk"),
        (lambda d: damage_png(d, b"IEND"), "CRC of its IEND chunk"),
        (lambda d: damage_png(d, b"IDAT", "adler"), "Adler-32"),
        (lambda d: d[: png_chunk_span(d, b"IEND")[0] - 8], "before its IEND chunk"),
        (lambda d: d[: len(d) // 2], "truncated: it ends inside its IDAT chunk"),
    ],
    ids=["ihdr-crc", "idat-crc", "idat-data", "iend-crc", "adler32", "no-iend", "cut-in-idat"],
)
def test_damaged_png_is_corrupt_naming_the_check(damage: Any, match: str) -> None:
    """Pillow checks neither the image data's CRC nor its Adler-32: a flipped bit in the
    pixels used to be classified (200, NORMAL 0.73 for a test film)."""
    data = save(Image.fromarray(gray(200, 200)), "PNG")
    decode_gray(data)
    with pytest.raises(CorruptImageError, match=match) as e:
        decode_gray(damage(data))
    assert e.value.code == "corrupt_image"


def test_png_image_data_cut_inside_its_zlib_stream_is_corrupt() -> None:
    raw = _png_rows(64, 64, 8, False)
    idat = zlib.compress(raw)[:-40]  # chunks intact, the stream itself ends early
    data = png_raw(64, 64, idat)
    with pytest.raises(CorruptImageError, match="ends before its zlib stream"):
        decode_gray(data)


@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_without_its_end_marker_is_corrupt(progressive: bool) -> None:
    """libjpeg fills a cut-off scan with gray and Pillow, once it has every row, stops: the
    end-of-image marker is the format's only sign that the scan data is whole."""
    data = save(Image.fromarray(gray(200, 200)), "JPEG", quality=90, progressive=progressive)
    decode_gray(data + b"trailing bytes after the end are allowed")
    for cut in (data[:-2], data[: len(data) * 3 // 4]):
        with pytest.raises(CorruptImageError, match="end-of-image marker"):
            decode_gray(cut)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_tiny_image_is_refused(fmt: str) -> None:
    with pytest.raises(ImageTooSmallError, match="16x16"):
        preprocess_bytes(save(Image.fromarray(gray(16, 16)), fmt), SPEC)


def _png_of_zeros(width: int, height: int, palette: bool, rgba: bool = False) -> bytes:
    """A valid PNG of ``width x height`` zeros (1-bit gray or palette, or 8-bit RGBA) that
    compresses to a few kilobytes, or a few hundred for RGBA."""
    colour, depth = (6, 8) if rgba else (3 if palette else 0, 1)
    row = b"\x00" * (1 + (4 * width if rgba else (width + 7) // 8))
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    plte = png_chunk(b"PLTE", b"\x00\x00\x00\xff\xff\xff") if palette else b""
    return png_raw(width, height, idat, plte, depth=depth, colour=colour)


@pytest.mark.parametrize(
    ("side", "palette"),
    [(20_000, False), (20_000, True), (9_000, False)],  # over Pillow's own limit / over ours
)
def test_decompression_bomb_is_refused_before_decoding(
    side: int, palette: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _png_of_zeros(side, side, palette)
    assert len(data) < 200_000

    def no_load(self: Any) -> None:
        raise AssertionError("the pixels of a decompression bomb were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    with pytest.raises(DecompressionBombError) as e:
        preprocess_bytes(data, SPEC)
    assert (e.value.code, image_error_status(e.value)) == ("decompression_bomb", 422)


def _jpeg_claiming(width: int, height: int, **kw: Any) -> bytes:
    """A small real JPEG whose frame header claims ``width x height`` (its data is too short)."""
    data = bytearray(save(Image.fromarray(gray()).convert("RGB"), "JPEG", **kw))
    sof = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "what"),
    [
        # Legal sizes, but the decoders would hold more than MAX_DECODE_BYTES (64 MiB):
        (lambda: _png_of_zeros(4097, 4097, False, rgba=True), "RGBA PNG"),  # 4 bytes a pixel
        (lambda: _jpeg_claiming(4300, 3500, progressive=True, subsampling=0), "RGB JPEG"),
    ],
    ids=["rgba-png-4097x4097", "progressive-jpeg-4300x3500-4:4:4"],
)
def test_images_whose_decoding_would_hold_too_much_are_refused_before_decoding(
    data: Any, what: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_load(self: Any) -> None:
        raise AssertionError("the pixels were decoded")

    encoded = data()
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    with pytest.raises(DecompressionBombError, match=f"{what} would take .* MiB"):
        preprocess_bytes(encoded, SPEC)


def test_the_same_size_as_baseline_jpeg_is_not_refused() -> None:
    """A baseline JPEG is decoded at 1/8 scale without holding its coefficients (libjpeg
    fills the rows its short data lacks)."""
    assert preprocess_bytes(_jpeg_claiming(4300, 3500, subsampling=0), SPEC).shape == (1, 64, 64)


def test_compressed_dicom_whose_decoding_would_hold_too_much_is_refused() -> None:
    """pydicom holds an RLE frame three times over: 16-bit 4300x3500 would need ~100 MB."""
    from pydicom.uid import RLELossless

    data = dicom_bytes(
        None, transfer_syntax=RLELossless, encapsulated=b"\x00" * 64, Rows=3500, Columns=4300
    )
    with pytest.raises(DecompressionBombError, match="4300x3500 DICOM would take"):
        preprocess_bytes(data, SPEC)


_PEAK_SCRIPT = """
import resource, sys
from pathlib import Path
from pneumonia.preprocess import PreprocessSpec, preprocess_bytes
spec = PreprocessSpec(size=192)
data = Path(sys.argv[1]).read_bytes()
preprocess_bytes(Path(sys.argv[2]).read_bytes(), spec)  # load what decoding loads
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert preprocess_bytes(data, spec).shape == (1, 192, 192)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.parametrize(
    ("width", "height", "rgba"),
    [(8000, 7999, False), (4096, 4096, True)],
    ids=["1-bit-8000x7999", "rgba-4096x4096"],
)
def test_decoding_a_large_legal_image_stays_within_bounded_memory(
    width: int, height: int, rgba: bool, tmp_path: Any
) -> None:
    """Regression: images under the pixel limit cost ~9 bytes a pixel as float copies, so a
    62 KB 8000x7999 PNG of zeros (not a bomb: within the limit) took one decode to +643 MiB
    on a 256 MB box. Now each decoder holds at most MAX_DECODE_BYTES (64 MiB); 150 MB is a
    generous bound. Measured in a fresh process (its peak resident memory)."""
    import subprocess
    import sys

    image, warm = tmp_path / "image.png", tmp_path / "warm.png"
    image.write_bytes(_png_of_zeros(width, height, False, rgba=rgba))
    warm.write_bytes(_png_of_zeros(400, 400, False, rgba=rgba))
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(image), str(warm)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    added_mb = int(out.stdout.split()[-1]) * 1024 / 1e6  # ru_maxrss is in KiB on Linux
    assert added_mb < 150


def test_image_errors_are_value_errors_with_a_message() -> None:
    with pytest.raises(ValueError) as e:
        preprocess_bytes(b"", SPEC)
    assert isinstance(e.value, ImageError) and e.value.message == str(e.value)


# --- DICOM ---------------------------------------------------------------------------------


#: 48x64 horizontal ramp of stored values 0, 64, ..., 4032.
RAMP = np.tile(np.arange(64, dtype=np.uint16) * 64, (48, 1))


def test_dicom_monochrome2_is_scaled_to_unit_range() -> None:
    data = dicom_bytes(RAMP)
    assert sniff_format(data) == "dicom"
    out = decode_gray(data)
    np.testing.assert_allclose(out, RAMP / RAMP.max(), atol=1e-6)
    assert preprocess_bytes(data, SPEC).shape == SPEC.input_shape


def test_dicom_monochrome1_is_inverted() -> None:
    m2 = decode_gray(dicom_bytes(RAMP, "MONOCHROME2"))
    m1 = decode_gray(dicom_bytes(RAMP, "MONOCHROME1"))
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)


def test_dicom_window_is_applied() -> None:
    out = decode_gray(dicom_bytes(RAMP, WindowCenter=1000, WindowWidth=200))[0]
    values = RAMP[0]
    assert (out[values < 900] == 0).all() and (out[values > 1100] == 1).all()
    inside = (values > 900) & (values < 1100)
    assert inside.any() and ((out[inside] > 0) & (out[inside] < 1)).all()


def test_dicom_rescale_comes_before_the_window() -> None:
    # Stored v -> 2v - 1000; the window 0 +- 50 is in rescaled units: stored 475..525.
    out = decode_gray(
        dicom_bytes(RAMP, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=100)
    )[0]
    values = RAMP[0]
    assert (out[values <= 448] == 0).all() and (out[values >= 576] == 1).all()
    assert 0 < out[values == 512][0] < 1


def test_rle_compressed_dicom_decodes_like_uncompressed() -> None:
    from pydicom import dcmread
    from pydicom.uid import RLELossless

    ds = dcmread(io.BytesIO(dicom_bytes(RAMP)))
    ds.compress(RLELossless)
    buf = io.BytesIO()
    ds.save_as(buf)
    np.testing.assert_allclose(decode_gray(buf.getvalue()), decode_gray(dicom_bytes(RAMP)))


def test_dicom_without_pixel_data() -> None:
    with pytest.raises(UndecodableImageError, match="no pixel data"):
        decode_gray(dicom_bytes(None))


def test_tiny_dicom_is_refused() -> None:
    with pytest.raises(ImageTooSmallError):
        decode_gray(dicom_bytes(np.zeros((16, 16), np.uint16)))


def test_dicom_compressed_without_decoder_is_unsupported_transfer_syntax() -> None:
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    data = dicom_bytes(RAMP, transfer_syntax=JPEGLSLossless, encapsulated=b"\x00" * 64)
    with pytest.raises(UnsupportedTransferSyntaxError, match="JPEG-LS") as e:
        decode_gray(data)
    assert (e.value.code, image_error_status(e.value)) == ("unsupported_transfer_syntax", 415)


def test_corrupt_data_in_a_decodable_syntax_is_undecodable() -> None:
    """Regression: corrupt RLE pixel data was reported as an unsupported transfer syntax,
    telling the user to change a format that the service does decode."""
    from pydicom.uid import RLELossless

    data = dicom_bytes(RAMP, transfer_syntax=RLELossless, encapsulated=b"\x00" * 64)
    with pytest.raises(UndecodableImageError):
        decode_gray(data)


def test_truncated_dicom_is_corrupt() -> None:
    """Was undecodable_image until issue 13."""
    data = dicom_bytes(RAMP)
    with pytest.raises(CorruptImageError, match="ends inside its pixel data"):
        decode_gray(data[: len(data) - 2000])


@pytest.mark.parametrize(
    ("attrs", "match"),
    [
        ({"Rows": 60}, "60 rows x 64 columns x 1 frame"),
        ({"NumberOfFrames": 2}, "48 rows x 64 columns x 2 frame"),
    ],
)
def test_dicom_pixel_data_shorter_than_its_header_says_is_corrupt(
    attrs: dict[str, int], match: str
) -> None:
    with pytest.raises(CorruptImageError, match=match):
        decode_gray(dicom_bytes(RAMP, **attrs))


def test_large_truncated_dicom_pixel_data_left_in_the_upload_is_corrupt() -> None:
    """Pixel data over 1 MiB is not read with the header; its length is checked where it lies."""
    data = dicom_bytes(np.tile(RAMP, (16, 16)))  # 768x1024, 1.5 MiB of pixels
    with pytest.raises(CorruptImageError, match="ends inside its pixel data"):
        decode_gray(data[: 1 << 20])


def test_truncated_deflated_dicom_is_corrupt() -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    data = dicom_bytes(RAMP, transfer_syntax=DeflatedExplicitVRLittleEndian)
    decode_gray(data)
    with pytest.raises(CorruptImageError, match="Deflated"):
        decode_gray(data[:-100])


# --- the input contract and the spec ------------------------------------------------------


def test_check_model_input_accepts_preprocessed_batches() -> None:
    batch = np.stack([preprocess_bytes(jpeg_bytes(1, s), SPEC) for s in range(2)])
    check_model_input(batch, SPEC)
    check_model_input(np.zeros((0, *SPEC.input_shape), np.float32), SPEC)


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        (np.zeros((2, 1, 64, 64), np.float64), "float32"),
        (np.zeros((2, 1, 64, 64), np.uint8), "float32"),
        (np.zeros((1, 64, 64), np.float32), "shape|\\(N"),
        (np.zeros((2, 3, 64, 64), np.float32), "\\(N"),
        (np.zeros((2, 1, 32, 32), np.float32), "\\(N"),
        (np.full((2, 1, 64, 64), 1.5, np.float32), "within"),
        (np.full((2, 1, 64, 64), -0.1, np.float32), "within"),
        (np.full((2, 1, 64, 64), np.nan, np.float32), "finite"),
        (np.full((2, 1, 64, 64), np.inf, np.float32), "finite"),
    ],
)
def test_check_model_input_refuses_contract_breaks(batch: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_model_input(batch, SPEC)


def test_one_nan_among_valid_values_is_refused() -> None:
    batch = np.full((2, 1, 64, 64), 0.5, np.float32)
    batch[1, 0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        check_model_input(batch, SPEC)


def test_spec_round_trips_through_json() -> None:
    spec = PreprocessSpec(size=128)
    again = PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert again.input_shape == (1, 128, 128)


def test_spec_refuses_unknown_keys() -> None:
    with pytest.raises(ValueError, match="mean"):
        PreprocessSpec.from_dict({**PreprocessSpec().to_dict(), "mean": 0.5})


@pytest.mark.parametrize(
    "bad",
    [
        {"size": 16},
        {"size": "192"},
        {"size": 192.0},
        {"size": True},
        {"channels": 3},
        {"resize": "crop"},
        {"interpolation": "nearest"},
        {"value_range": [0, 255]},
    ],
)
def test_spec_refuses_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PreprocessSpec.from_dict({**PreprocessSpec().to_dict(), **bad})


def test_spec_missing_key_is_an_error_not_a_default() -> None:
    """Guards against silently filling a model file's missing preprocessing with defaults."""
    d = PreprocessSpec().to_dict()
    del d["size"]
    with pytest.raises(ValueError, match="lacks \\['size'\\]"):
        PreprocessSpec.from_dict(d)


def test_jpeg2000_dicom_is_refused_before_decoding() -> None:
    """Regression: a JPEG 2000 DICOM whose JP2 box has length 0 made pydicom loop forever."""
    import multiprocessing as mp

    from pydicom.uid import JPEG2000Lossless

    zero_length_box = b"\x00\x00\x00\x0cjP  " + b"\0" * 100
    data = dicom_bytes(
        np.zeros((64, 64), np.uint16),
        transfer_syntax=JPEG2000Lossless,
        encapsulated=zero_length_box,
    )
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        res = pool.apply_async(_decode_error_code, (data,))
        assert res.get(timeout=60) == "unsupported_transfer_syntax"


def _decode_error_code(data: bytes) -> str:
    from pneumonia.preprocess import ImageError, decode_gray

    try:
        decode_gray(data)
    except ImageError as exc:
        return exc.code
    return "decoded"
