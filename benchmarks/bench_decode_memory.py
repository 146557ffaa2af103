"""Peak memory of decoding one image, for every accepted format and mode, at several sizes.

The service decodes one upload at a time on a box of 256 MB of which ~100 MB is already
resident, so what one decode adds on top decides whether a legal upload can take the box down.
For each case this measures ``preprocess_bytes(data, PreprocessSpec(size=192))`` in a fresh
subprocess: imports done, one small image of the same kind decoded (lazy plugins loaded), the
input file read into memory; then the kernel's peak-RSS counter is reset
(``/proc/self/clear_refs``) and the peak resident memory the decode adds is read from
``VmHWM``. The input bytes themselves are not counted (the service holds them anyway).

Sizes are 224x224 (the training copies), 2000x1600 (a typical original), 4300x3500 (a large
CR plate), 4096x4096 and 5792x5792 (the largest that ``MAX_DECODE_BYTES`` lets through at 4
and 2 bytes a pixel: colour PNGs; 16-bit PNGs and progressive gray JPEGs) and the largest
image ``MAX_PIXELS`` allows; inputs are synthetic films (smooth shapes plus noise), built once
per size in a temporary folder. The figures in docs/operations.md come from::

    .venv/bin/python benchmarks/bench_decode_memory.py

Prints a Markdown table to stdout (MiB added by one decode, and bytes per pixel); progress
goes to stderr. ``--cases`` and ``--sizes`` run a subset. Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common import dicom_bytes, logger, png_of_zeros, self_status_kib
from pneumonia.preprocess import MAX_PIXELS

SPEC_SIZE = 192
WARMUP_SIDE = 256

log = logger("bench_decode_memory")


# --- synthetic films ---------------------------------------------------------------------------


def film16(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A (height, width) uint16 image using the full 16-bit range: lungs, spine, noise."""
    n = 256
    yy, xx = np.mgrid[0:n, 0:n] / n
    base = 0.75 - 0.35 * yy
    for cx in (0.3, 0.7):  # two dark lung fields
        base -= 0.4 * np.exp(-(((xx - cx) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    base += 0.3 * np.exp(-(((xx - 0.5) / 0.05) ** 2))  # the spine
    small = Image.fromarray(np.clip(base, 0.02, 0.98).astype(np.float32), mode="F")
    smooth = np.asarray(small.resize((width, height), Image.Resampling.BILINEAR))
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 2048, size=(height, width), dtype=np.uint16)
    out = (smooth * 63000).astype(np.uint16)
    out += noise
    return out


def _save(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gray8(g16: np.ndarray) -> Image.Image:
    return Image.fromarray((g16 >> 8).astype(np.uint8))


def _palette_png(g16: np.ndarray) -> bytes:
    img = Image.fromarray((g16 >> 8).astype(np.uint8), mode="P")
    img.putpalette([v for i in range(256) for v in (i, i, i)])
    return _save(img, "PNG", compress_level=1)


def _jpeg_dicom(g16: np.ndarray) -> bytes:
    """An 8-bit grayscale DICOM in the JPEG Baseline transfer syntax (one fragment)."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((8, 8), np.uint16))))
    ds.Rows, ds.Columns = g16.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([_save(_gray8(g16), "JPEG", quality=90)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _voi_lut_dicom(g16: np.ndarray) -> bytes:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = [round(65535 * (i / 4095) ** 0.6) for i in range(4096)]  # a gamma curve
    item["LUTData"].VR = "US"
    return dicom_bytes(g16 >> 4, VOILUTSequence=[item])


#: Every accepted format and mode: name -> builder(16-bit film) -> file bytes.
CASES: dict[str, Callable[[np.ndarray], bytes]] = {
    "JPEG L": lambda g: _save(_gray8(g), "JPEG", quality=90),
    "JPEG RGB": lambda g: _save(_gray8(g).convert("RGB"), "JPEG", quality=90),
    "JPEG CMYK": lambda g: _save(_gray8(g).convert("CMYK"), "JPEG", quality=90),
    "JPEG progressive L": lambda g: _save(_gray8(g), "JPEG", quality=90, progressive=True),
    "JPEG progressive RGB 4:2:0": lambda g: _save(
        _gray8(g).convert("RGB"), "JPEG", quality=90, progressive=True
    ),
    "JPEG progressive RGB 4:4:4": lambda g: _save(
        _gray8(g).convert("RGB"), "JPEG", quality=90, progressive=True, subsampling=0
    ),
    "PNG L 8-bit": lambda g: _save(_gray8(g), "PNG", compress_level=1),
    "PNG L 16-bit": lambda g: _save(Image.fromarray(g), "PNG", compress_level=1),
    "PNG RGB": lambda g: _save(_gray8(g).convert("RGB"), "PNG", compress_level=1),
    "PNG RGBA": lambda g: _save(_gray8(g).convert("RGBA"), "PNG", compress_level=1),
    "PNG palette": _palette_png,
    "PNG 1-bit zeros": lambda g: png_of_zeros(g.shape[1], g.shape[0]),
    "DICOM MONO2 16-bit": lambda g: dicom_bytes(g, bits=16),
    "DICOM MONO1 12-bit": lambda g: dicom_bytes(4095 - (g >> 4), "MONOCHROME1"),
    "DICOM rescale+window": lambda g: dicom_bytes(
        g >> 4, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=2500, WindowWidth=3000
    ),
    "DICOM VOI LUT": _voi_lut_dicom,
    "DICOM RGB 8-bit": lambda g: dicom_bytes(np.dstack([g >> 8] * 3), "RGB"),
    "DICOM deflated": lambda g: dicom_bytes(g >> 4, transfer_syntax="1.2.840.10008.1.2.1.99"),
    "DICOM RLE": lambda g: dicom_bytes(g >> 4, transfer_syntax="1.2.840.10008.1.2.5"),
    "DICOM JPEG baseline": _jpeg_dicom,
}


def largest_accepted() -> tuple[int, int]:
    """The most nearly square image of at most MAX_PIXELS pixels."""
    side = math.isqrt(MAX_PIXELS)
    return side, MAX_PIXELS // side


DEFAULT_SIZES = [(224, 224), (2000, 1600), (4300, 3500), (4096, 4096), (5792, 5792)]


# --- one measurement, in a fresh process --------------------------------------------------------


def child(warmup: Path, path: Path) -> dict[str, Any]:
    """Decode ``path`` once after a warm-up decode; the peak resident memory it added."""
    import pydicom  # noqa: F401  (imported before the baseline, as in the service)

    from pneumonia.preprocess import ImageError, PreprocessSpec, preprocess_bytes

    spec = PreprocessSpec(size=SPEC_SIZE)
    preprocess_bytes(warmup.read_bytes(), spec)
    data = path.read_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    base = self_status_kib("VmRSS")
    t0 = time.perf_counter()
    try:
        preprocess_bytes(data, spec)
        outcome = "ok"
    except ImageError as exc:
        outcome = exc.code
    seconds = time.perf_counter() - t0
    peak = self_status_kib("VmHWM")
    return {"added_kib": peak - base, "outcome": outcome, "seconds": seconds}


def measure(warmup: Path, path: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(warmup), str(path)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


# --- the table ----------------------------------------------------------------------------------


def cell(result: dict[str, Any], pixels: int) -> str:
    mib = result["added_kib"] / 1024
    if result["outcome"] == "ok":
        return f"{mib:.1f} ({result['added_kib'] * 1024 / pixels:.1f})"
    # Refused (422 decompression_bomb): before decoding, but maybe after reading the file.
    return f"refused, {mib:.1f}" if mib >= 1 else "refused"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--child", nargs=2, type=Path, metavar=("WARMUP", "INPUT"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=sorted(CASES),
        default=list(CASES),
        metavar="CASE",
        help="cases to run, by name (default: all)",
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        metavar="WxH",
        help=f"image sizes (default: {' '.join(f'{w}x{h}' for w, h in DEFAULT_SIZES)} "
        "and the largest MAX_PIXELS accepts)",
    )
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    sizes = (
        [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
        if args.sizes
        else [*DEFAULT_SIZES, largest_accepted()]
    )
    results: dict[tuple[str, tuple[int, int]], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        folder = Path(tmp)
        warm = film16(WARMUP_SIDE, WARMUP_SIDE)
        for name in args.cases:
            (folder / f"warm-{args.cases.index(name)}").write_bytes(CASES[name](warm))
        for width, height in sizes:
            g = film16(width, height)
            for i, name in enumerate(args.cases):
                path = folder / f"input-{i}"
                path.write_bytes(CASES[name](g))
                res = measure(folder / f"warm-{i}", path)
                res["file_bytes"] = path.stat().st_size
                results[(name, (width, height))] = res
                log(
                    f"{name} {width}x{height} ({res['file_bytes']:,} B): +{res['added_kib'] / 1024:.1f} MiB, "
                    f"{res['outcome']}, {res['seconds']:.2f} s"
                )
                path.unlink()
            del g

    from pneumonia import preprocess

    print(
        f"Peak resident memory added by one `preprocess_bytes(data, PreprocessSpec(size={SPEC_SIZE}))`, "
        f"MiB (bytes per pixel); MAX_PIXELS = {preprocess.MAX_PIXELS:,}, "
        f"MAX_DECODE_BYTES = {getattr(preprocess, 'MAX_DECODE_BYTES', 0) >> 20} MiB.\n"
    )
    print("| Format and mode | " + " | ".join(f"{w}x{h}" for w, h in sizes) + " |")
    print("| --- |" + " ---: |" * len(sizes))
    for name in args.cases:
        cells = [cell(results[(name, s)], s[0] * s[1]) for s in sizes]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
