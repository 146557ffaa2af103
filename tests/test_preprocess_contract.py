"""The preprocessing contract: images up to twice the model input per side become exactly the
model input they became when the shipped model was trained.

The model is trained and evaluated on 224x224 copies at size 192. Decoding was later changed
to reduce large images before they become float (the memory of one decode, see
docs/operations.md), which must not move a single bit of those inputs. ``_reference_decode``
is the decoder as it was at that time (commit 904942c), kept here frozen; every accepted
format and mode is compared with it at sizes around and below twice the input size.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps

from benchmarks.common import dicom_bytes
from pneumonia.preprocess import PreprocessSpec, decode_gray, preprocess_bytes, resize_gray

SPEC = PreprocessSpec(size=192)

# --- the decoder as it was (frozen; valid inputs only) -------------------------------------


def _reference_pil_to_gray(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(img, dtype=np.float32) / 65535.0
    if img.mode == "I":
        arr = np.asarray(img, dtype=np.float32)
        return np.clip(arr, 0.0, 65535.0) / 65535.0
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        base = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(base, img.convert("RGBA"))
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.float32) / 255.0


def _reference_decode_dicom(data: bytes) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(io.BytesIO(data))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    pixels = ds.pixel_array
    if frames > 1:
        pixels = pixels[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if pixels.ndim == 3:
        rgb = pixels.astype(np.float32)
        arr = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    else:
        arr = apply_modality_lut(pixels, ds)
        arr = apply_voi_lut(arr, ds)
    arr = np.asarray(arr, dtype=np.float64)
    lo, hi = float(np.min(arr)), float(np.max(arr))
    assert math.isfinite(hi - lo)
    if hi > lo:
        arr -= lo
        arr /= hi - lo
        out = arr.astype(np.float32)
    else:
        out = np.zeros(arr.shape, dtype=np.float32)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out


def _reference_decode(data: bytes, draft_size: int | None) -> np.ndarray:
    if data[128:132] == b"DICM":
        return _reference_decode_dicom(data)
    fmt = "jpeg" if data.startswith(b"\xff\xd8\xff") else "png"
    img: Image.Image = Image.open(io.BytesIO(data), formats=[fmt.upper()])
    if fmt == "jpeg" and draft_size is not None and img.mode in ("RGB", "L"):
        img.draft("L", (draft_size, draft_size))
    img.load()
    if fmt == "jpeg":
        img = ImageOps.exif_transpose(img)
    return _reference_pil_to_gray(img)


# --- inputs of every kind -----------------------------------------------------------------------


def _gray(width: int, height: int, seed: int = 0) -> np.ndarray:
    """uint8 structure in both directions plus noise, so flips, shifts and rounding all show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = 30 + 150 * xx / width + 60 * (yy / height) ** 2 + rng.normal(0, 8, (height, width))
    return np.clip(img, 0, 255).astype(np.uint8)


def _save(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _rgba(g: np.ndarray) -> Image.Image:
    alpha = np.where(np.arange(g.shape[1]) % 7 == 0, 0, 255 - g // 4).astype(np.uint8)
    return Image.fromarray(np.dstack([g, 255 - g, g // 2, np.broadcast_to(alpha, g.shape)]), "RGBA")


def _palette(g: np.ndarray, transparency: bool) -> bytes:
    img = Image.fromarray(g, mode="P")
    img.putpalette([v for i in range(256) for v in (255 - i, i, (3 * i) % 256)])
    return _save(img, "PNG", **({"transparency": 17} if transparency else {}))


def _dicom_edit(g12: np.ndarray, edit: Callable[[Any], None]) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(g12)))
    edit(ds)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _voi_lut(ds: Any) -> None:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = [min(65535, round(65535 * (i / 4095) ** 0.5)) for i in range(4096)]
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = [item]


def _two_frames(ds: Any) -> None:
    g = np.frombuffer(ds.PixelData, "<u2").reshape(ds.Rows, ds.Columns)
    ds.NumberOfFrames = 2
    ds.PixelData = np.stack([g, g[::-1]]).astype("<u2").tobytes()


def _signed(ds: Any) -> None:
    g = np.frombuffer(ds.PixelData, "<u2").reshape(ds.Rows, ds.Columns).astype(np.int16)
    ds.PixelRepresentation = 1
    ds.PixelData = (g - 2048).astype("<i2").tobytes()


def _rgb(ds: Any) -> None:
    g = (np.frombuffer(ds.PixelData, "<u2").reshape(ds.Rows, ds.Columns) >> 4).astype(np.uint8)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = np.dstack([g, 255 - g, g // 2]).tobytes()


def _eight_bit(ds: Any) -> None:
    g = (np.frombuffer(ds.PixelData, "<u2").reshape(ds.Rows, ds.Columns) >> 4).astype(np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = g.tobytes()


def _garbage_high_bits(ds: Any) -> None:
    g = np.frombuffer(ds.PixelData, "<u2").reshape(ds.Rows, ds.Columns)
    noise = np.where(np.arange(g.shape[1]) % 3 == 0, 0xA000, 0x3000).astype(np.uint16)
    ds.PixelData = (g | noise).astype("<u2").tobytes()  # bits above Bits Stored (12) set


def _rle(ds: Any) -> None:
    from pydicom.uid import RLELossless

    ds.compress(RLELossless)


def _deflated(ds: Any) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian


def _set(**attrs: Any) -> Callable[[Any], None]:
    def edit(ds: Any) -> None:
        for key, value in attrs.items():
            setattr(ds, key, value)

    return edit


def _g12(g: np.ndarray) -> np.ndarray:
    return g.astype(np.uint16) * 16 + np.arange(g.shape[1], dtype=np.uint16) % 16


#: name -> builder(uint8 gray) -> file bytes. Every mode decode_gray handles differently.
KINDS: dict[str, Callable[[np.ndarray], bytes]] = {
    "jpeg-L": lambda g: _save(Image.fromarray(g), "JPEG", quality=90),
    "jpeg-RGB": lambda g: _save(_rgba(g).convert("RGB"), "JPEG", quality=90),
    "jpeg-CMYK": lambda g: _save(_rgba(g).convert("RGB").convert("CMYK"), "JPEG", quality=90),
    "jpeg-progressive": lambda g: _save(
        _rgba(g).convert("RGB"), "JPEG", quality=90, progressive=True
    ),
    "jpeg-exif-6": lambda g: _save(Image.fromarray(g), "JPEG", exif=_exif(6)),
    "jpeg-exif-3-RGB": lambda g: _save(_rgba(g).convert("RGB"), "JPEG", exif=_exif(3)),
    "jpeg-exif-5-CMYK": lambda g: _save(
        _rgba(g).convert("RGB").convert("CMYK"), "JPEG", exif=_exif(5)
    ),
    "png-1": lambda g: _save(Image.fromarray(g).convert("1"), "PNG"),
    "png-L": lambda g: _save(Image.fromarray(g), "PNG"),
    "png-LA": lambda g: _save(_rgba(g).convert("LA"), "PNG"),
    "png-P": lambda g: _palette(g, transparency=False),
    "png-P-transparent": lambda g: _palette(g, transparency=True),
    "png-RGB": lambda g: _save(_rgba(g).convert("RGB"), "PNG"),
    "png-RGBA": lambda g: _save(_rgba(g), "PNG"),
    "png-16bit": lambda g: _save(Image.fromarray(_g12(g) * 16 + 5), "PNG"),
    "png-interlaced": lambda g: _save(Image.fromarray(g), "PNG", interlace=1),
    "dicom-MONO2": lambda g: dicom_bytes(_g12(g)),
    "dicom-MONO1": lambda g: dicom_bytes(_g12(g), "MONOCHROME1"),
    "dicom-rescale-window": lambda g: dicom_bytes(
        _g12(g), slope=2.0, intercept=-1024.0, window=(2500.0, 2000.0)
    ),
    "dicom-window-sigmoid": lambda g: _dicom_edit(
        _g12(g), _set(WindowCenter=1800, WindowWidth=1500, VOILUTFunction="SIGMOID")
    ),
    "dicom-VOI-LUT": lambda g: _dicom_edit(_g12(g), _voi_lut),
    "dicom-signed": lambda g: _dicom_edit(_g12(g), _signed),
    "dicom-8-bit": lambda g: _dicom_edit(_g12(g), _eight_bit),
    "dicom-unused-bits-set": lambda g: _dicom_edit(_g12(g), _garbage_high_bits),
    "dicom-two-frames": lambda g: _dicom_edit(_g12(g), _two_frames),
    "dicom-RGB": lambda g: _dicom_edit(_g12(g), _rgb),
    "dicom-RLE": lambda g: _dicom_edit(_g12(g), _rle),
    "dicom-deflated": lambda g: _dicom_edit(_g12(g), _deflated),
}

#: (width, height): the training copies, exactly twice the input, and around and below it.
SIZES = [(224, 224), (384, 384), (384, 250), (193, 380), (150, 120)]


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_images_up_to_twice_the_input_size_preprocess_as_before(
    kind: str, size: tuple[int, int]
) -> None:
    width, height = size
    data = KINDS[kind](_gray(width, height, seed=width + height))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom: VOI LUT on float input, as before
        expected = _reference_decode(data, SPEC.size)
        gray = decode_gray(data, draft_size=SPEC.size)
        x = preprocess_bytes(data, SPEC)
    assert gray.dtype == expected.dtype == np.float32
    np.testing.assert_array_equal(gray, expected)
    np.testing.assert_array_equal(x, resize_gray(expected, SPEC))


def test_the_inputs_are_the_kinds_they_claim() -> None:
    """The builders make the modes named (a silent conversion would test nothing)."""
    g = _gray(64, 48)
    modes = {
        name: Image.open(io.BytesIO(KINDS[name](g))).mode
        for name in KINDS
        if name.startswith(("jpeg", "png"))
    }
    assert modes["jpeg-CMYK"] == "CMYK" and modes["png-1"] == "1"
    assert modes["png-LA"] == "LA" and modes["png-P-transparent"] == "P"
    assert modes["png-RGBA"] == "RGBA" and modes["png-16bit"].startswith("I")
    assert Image.open(io.BytesIO(KINDS["jpeg-progressive"](g))).info.get("progressive")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_full_resolution_decode_converts_in_strips_exactly(kind: str) -> None:
    """Without a draft size nothing is reduced; a 900x700 image is converted in several strips
    of rows, which must join into exactly the whole image's conversion."""
    data = KINDS[kind](_gray(900, 700, seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = _reference_decode(data, None)
        gray = decode_gray(data)
    assert gray.shape == expected.shape and expected.size > 2 * 2**18  # more than two strips
    np.testing.assert_array_equal(gray, expected)
