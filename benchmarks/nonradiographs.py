"""Build a set of images that are not chest X-rays, to measure the input check against.

Kinds (each image saved in a colour and a gray version, as JPEG and as PNG):

- photo:      every photo scikit-image bundles (``skimage.data``, those that need no download)
              and scikit-learn's two sample images;
- page:       text pages rendered with Pillow (plain, dense, forms with boxes, letters with a
              header, scanned-looking: gray paper, blur, slight rotation, noise);
- screenshot: the service's own web page and API docs in Chromium (Playwright), before and
              after a prediction, at several window sizes; skipped without Chromium;
- uniform:    flat images of several tones;
- gradient:   linear and radial ramps;
- noise:      Gaussian, uniform, salt-and-pepper and smoothed (blob) noise.

A second, separate **development** set (``--set dev``) is what the input check's design was
judged on, so that the set above stays an evaluation set: other files found on this machine
(matplotlib's sample photos, the Adwaita icon theme, images in installed documentation, the
evaluation plots), dead-leaves images (occluding discs, the classic model of natural-image
statistics), 1/f noise, maps, and tables and two-column pages in other layouts. Files that a
machine lacks are skipped, so its counts can differ between machines.

Usage::

    .venv/bin/python benchmarks/nonradiographs.py --out runs/nonradiographs [--model M.onnx]
    .venv/bin/python benchmarks/nonradiographs.py --set dev --out runs/nonradiographs-dev

(``--model`` is the model the screenshot server loads; any exported model will do.) Writes
``OUT/<kind>/<name>_<colour|gray>.<jpg|png>`` and prints how many of each kind it wrote.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
KINDS = ("photo", "page", "screenshot", "uniform", "gradient", "noise")


def log(msg: str) -> None:
    print(f"[nonradiographs] {msg}", file=sys.stderr, flush=True)


def photos() -> Iterator[tuple[str, np.ndarray]]:
    """scikit-image's bundled photos (gray ones too) and scikit-learn's sample images."""
    import skimage.data
    from sklearn.datasets import load_sample_image

    names = (
        "astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins",
        "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry",
        "logo", "microaneurysms", "moon", "page", "retina", "rocket", "text", "checkerboard",
        "binary_blobs", "shepp_logan_phantom",
    )  # fmt: skip
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = np.asarray(getattr(skimage.data, name)())
        except Exception as exc:  # those that need a download are skipped
            log(f"skimage.data.{name}: {type(exc).__name__}, skipped")
            continue
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        elif img.dtype != np.uint8:
            img = (255 * (img - img.min()) / max(1e-9, float(img.max() - img.min()))).astype(
                np.uint8
            )
        yield f"skimage_{name}", img
    for name in ("china.jpg", "flower.jpg"):
        yield f"sklearn_{name.split('.')[0]}", load_sample_image(name)


LOREM = [
    "Patient",
    "name",
    "date",
    "of",
    "birth",
    "referring",
    "physician",
    "clinical",
    "information",
    "request",
    "for",
    "examination",
    "chest",
    "radiograph",
    "please",
    "report",
    "findings",
    "and",
    "impression",
    "signature",
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "0123456789",
    "invoice",
    "total",
    "amount",
    "due",
]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _text_page(
    rng: np.random.Generator, w: int, h: int, size: int, form: bool, header: bool
) -> Image.Image:
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = _font(size)
    y = size * 2
    if header:
        d.rectangle([0, 0, w, size * 4], fill=(30, 80, 160))
        d.text((size, size), "Radiology request form", fill="white", font=_font(size * 2))
        y = size * 6
    while y < h - size * 2:
        if form and rng.random() < 0.3:
            d.rectangle([size, y, w - size, y + size * 2], outline="black", width=2)
            d.text(
                (size * 2, y + size // 3),
                " ".join(rng.choice(LOREM, 3)) + ":",
                fill="black",
                font=font,
            )
            y += size * 3
            continue
        words = " ".join(rng.choice(LOREM, max(3, w // (size * 4))))
        d.text((size, y), words, fill=(0, 0, 0), font=font)
        y += int(size * 1.5)
    return img


def pages() -> Iterator[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    specs = [
        ("plain", 850, 1100, 16, False, False),
        ("dense", 850, 1100, 10, False, False),
        ("large", 600, 800, 28, False, False),
        ("form", 850, 1100, 16, True, False),
        ("letter", 850, 1100, 14, False, True),
        ("form_header", 1240, 1754, 22, True, True),
        ("landscape", 1100, 850, 14, False, False),
        ("small", 400, 300, 12, False, True),
    ]
    for name, w, h, size, form, header in specs:
        page = _text_page(rng, w, h, size, form, header)
        yield f"page_{name}", np.asarray(page)
        if name in ("plain", "form", "letter"):
            # Scanned: gray paper, a slight turn, blur and sensor noise.
            scan = page.rotate(1.5, fillcolor=(235, 230, 220)).filter(ImageFilter.GaussianBlur(1.2))
            arr = np.asarray(scan, dtype=np.float32) * np.array([0.95, 0.93, 0.88])
            arr += rng.normal(0, 6, arr.shape)
            yield f"page_{name}_scanned", np.clip(arr, 0, 255).astype(np.uint8)
    inverted = 255 - np.asarray(_text_page(rng, 850, 1100, 16, False, False))
    yield "page_inverted", inverted


def uniforms() -> Iterator[tuple[str, np.ndarray]]:
    for name, rgb in [("black", (0, 0, 0)), ("white", (255, 255, 255)), ("gray", (128, 128, 128)),
                      ("dark_gray", (40, 40, 40)), ("red", (200, 30, 30)), ("blue", (40, 60, 200)),
                      ("beige", (230, 220, 190))]:  # fmt: skip
        yield f"uniform_{name}", np.full((512, 512, 3), rgb, np.uint8)


def gradients() -> Iterator[tuple[str, np.ndarray]]:
    y, x = np.mgrid[0:512, 0:640].astype(np.float32)
    ramps = {
        "horizontal": x / x.max(),
        "vertical": y / y.max(),
        "diagonal": (x + y) / (x + y).max(),
        "radial": np.hypot(x - 320, y - 256) / np.hypot(320, 256),
        "narrow": 0.4 + 0.2 * x / x.max(),
    }
    for name, r in ramps.items():
        g = (r * 255).astype(np.uint8)
        colour = np.stack([g, 255 - g, (g // 2 + 64)], axis=-1)
        yield f"gradient_{name}", colour
        if name == "horizontal":
            yield (
                "gradient_rainbow",
                (255 * np.stack([r, np.sin(np.pi * r) ** 2, 1 - r], -1)).astype(np.uint8),
            )


def noises() -> Iterator[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    shape = (512, 512, 3)
    yield "noise_gaussian", np.clip(rng.normal(128, 50, shape), 0, 255).astype(np.uint8)
    yield "noise_uniform", rng.integers(0, 256, shape, dtype=np.uint8)
    sp = np.full(shape, 128, np.uint8)
    m = rng.random(shape[:2])
    sp[m < 0.1], sp[m > 0.9] = 0, 255
    yield "noise_salt_pepper", sp
    for sigma in (2, 8, 24):
        blob = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).filter(
            ImageFilter.GaussianBlur(sigma)
        )
        a = np.asarray(blob, dtype=np.float32)
        a = (a - a.min((0, 1))) / np.maximum(1e-6, np.ptp(a, axis=(0, 1))) * 255
        yield f"noise_blobs{sigma}", a.astype(np.uint8)
    yield (
        "noise_gaussian_small",
        np.clip(rng.normal(128, 50, (96, 128, 3)), 0, 255).astype(np.uint8),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def screenshots(model: Path | None, film: Path | None) -> Iterator[tuple[str, np.ndarray]]:
    """The service's pages in Chromium: the upload page (empty and with a result), the docs."""
    if not CHROMIUM.exists():
        log(
            f"no Chromium at {CHROMIUM}; screenshots skipped (apt-get install chromium, or set CHROMIUM)"
        )
        return
    from playwright.sync_api import sync_playwright

    port = _free_port()
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "LOG_LEVEL": "WARNING"}
    if model is not None:
        env["MODEL_PATH"] = str(model)
    server = subprocess.Popen(
        [sys.executable, "-m", "pneumonia.cli", "serve"], env=env, stderr=subprocess.DEVNULL
    )
    try:
        base = f"http://127.0.0.1:{port}"
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=str(CHROMIUM),
                args=[
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                ],
            )
            page = browser.new_page()
            for _ in range(100):
                try:
                    if page.request.get(f"{base}/ready").ok:
                        break
                except Exception:
                    pass
                time.sleep(0.2)
            for w, h in ((1280, 800), (800, 1000), (1920, 1080), (420, 860)):
                page.set_viewport_size({"width": w, "height": h})
                page.goto(f"{base}/")
                yield f"screenshot_page_{w}x{h}", _shot(page)
                if film is not None and page.locator("input[type=file]").count():
                    page.set_input_files("input[type=file]", str(film))
                    page.wait_for_timeout(1500)
                    yield f"screenshot_result_{w}x{h}", _shot(page)
            page.set_viewport_size({"width": 1280, "height": 800})
            for route in ("/docs", "/model", "/metrics"):
                page.goto(f"{base}{route}")
                page.wait_for_timeout(800)
                yield f"screenshot{route.replace('/', '_')}", _shot(page)
            browser.close()
    finally:
        server.terminate()
        server.wait(10)


def _shot(page: object) -> np.ndarray:
    png = page.screenshot(full_page=False)  # type: ignore[attr-defined]
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _versions(img: np.ndarray) -> Iterator[tuple[str, Image.Image]]:
    """A colour and a gray version; a gray source is tinted for its colour version."""
    pil = Image.fromarray(img)
    gray = pil.convert("L")
    if pil.mode == "L" or (img.ndim == 3 and np.ptp(img[..., :3].astype(int), axis=-1).max() < 8):
        g = np.asarray(gray, dtype=np.float32)[..., None]
        tinted = np.clip(g * np.array([1.0, 0.8, 0.55]) + np.array([20, 10, 0]), 0, 255).astype(
            np.uint8
        )
        yield "colour", Image.fromarray(tinted)
    else:
        yield "colour", pil.convert("RGB")
    yield "gray", gray


DEV_GLOBS = {
    "icon": ("/usr/share/icons/Adwaita/512x512/*/*.png",),
    "diagram": (
        "/usr/share/doc/*/*/doc_img/*.png",
        "/usr/share/doc/*/*.png",
        str(REPO / "artifacts/eval/plots/*.png"),
        str(REPO / ".venv/lib/python3*/site-packages/networkx/drawing/tests/baseline/*.png"),
    ),
}


def _flatten(img: Image.Image, background: int) -> np.ndarray:
    rgba = img.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, (background, background, background, 255))
    return np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"))


def dev_files(kind: str, limit: int = 40) -> Iterator[tuple[str, np.ndarray]]:
    """Up to ``limit`` images of ``kind`` found on this machine (every 3rd match, sorted)."""
    import glob

    found = sorted({p for g in DEV_GLOBS[kind] for p in glob.glob(g)})[::3][:limit]
    for i, path in enumerate(found):
        try:
            with Image.open(path) as img:
                yield f"{kind}_{i:02d}_{Path(path).stem}", _flatten(img, 255 if i % 2 else 0)
        except OSError as exc:
            log(f"{path}: {type(exc).__name__}, skipped")


def dev_photos() -> Iterator[tuple[str, np.ndarray]]:
    """matplotlib's sample photos and rasters (not used by the evaluation set)."""
    from matplotlib import cbook

    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        with Image.open(cbook.get_sample_data(name)) as img:
            yield f"mpl_{name.split('.')[0]}", _flatten(img, 255)
    for name in ("jacksboro_fault_dem.npz", "topobathy.npz"):
        d = cbook.get_sample_data(name)  # an NpzFile: matplotlib loads .npz itself
        a = np.asarray(d[d.files[0]], dtype=np.float64)
        a = (255 * (a - a.min()) / max(1e-9, float(np.ptp(a)))).astype(np.uint8)
        yield f"mpl_map_{name.split('.')[0]}", a


def dead_leaves(n: int = 12, size: int = 400) -> Iterator[tuple[str, np.ndarray]]:
    """Occluding discs of random colour with a power-law size distribution."""
    rng = np.random.default_rng(12345)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        img = np.zeros((size, size, 3), np.uint8)
        for _ in range(3000):
            r = size * 0.003 / rng.random() ** 0.5
            cx, cy = rng.random(2) * size
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
        yield f"deadleaves_{i}", img


def pink_noise(n: int = 8, size: int = 256) -> Iterator[tuple[str, np.ndarray]]:
    """Noise with a 1/f^a spectrum, a from 1 to 2.4 (natural images sit near 2)."""
    rng = np.random.default_rng(54321)
    f = np.fft.fftfreq(size)
    radius = np.maximum(np.hypot(*np.meshgrid(f, f)), 1 / size)
    for i in range(n):
        amp = radius ** -(1 + 0.2 * i)
        chans = [
            np.real(np.fft.ifft2(amp * np.exp(2j * np.pi * rng.random((size, size)))))
            for _ in range(3)
        ]
        img = np.stack([255 * (c - c.min()) / np.ptp(c) for c in chans], axis=-1)
        yield f"pinknoise_{i}", img.astype(np.uint8)


def tables(n: int = 8) -> Iterator[tuple[str, np.ndarray]]:
    """Ruled tables of numbers and two-column pages of word-like strings; every 4th in dark mode."""
    rng = np.random.default_rng(777)
    font = ImageFont.load_default()
    for i in range(n):
        dark = i % 4 == 3
        im = Image.new("RGB", (600, 800), (30, 30, 30) if dark else (250, 250, 245))
        d = ImageDraw.Draw(im)
        ink = (220, 220, 220) if dark else (20, 20, 20)
        if i % 2 == 0:
            for r in range(25):
                for c in range(4):
                    box = (20 + c * 140, 20 + r * 30, 20 + (c + 1) * 140, 50 + r * 30)
                    d.rectangle(box, outline=ink)
                    d.text(
                        (box[0] + 5, box[1] + 8), str(rng.integers(0, 9999)), fill=ink, font=font
                    )
        else:
            for r in range(60):
                for col in range(2):
                    words = " ".join("x" * int(rng.integers(2, 8)) for _ in range(5))
                    d.text((20 + col * 300, 15 + r * 13), words, fill=ink, font=font)
        yield f"table_{i}", np.asarray(im)


def build(
    out: Path, model: Path | None = None, film: Path | None = None, which: str = "eval"
) -> Counter[str]:
    """Write every kind's images under ``out``; returns the count per kind."""
    sources: dict[str, Callable[[], Iterator[tuple[str, np.ndarray]]]] = (
        {
            "photo": photos,
            "page": pages,
            "screenshot": lambda: screenshots(model, film),
            "uniform": uniforms,
            "gradient": gradients,
            "noise": noises,
        }
        if which == "eval"
        else {
            "photo": dev_photos,
            "icon": lambda: dev_files("icon"),
            "diagram": lambda: dev_files("diagram"),
            "deadleaves": dead_leaves,
            "pinknoise": pink_noise,
            "table": tables,
        }
    )
    counts: Counter[str] = Counter()
    for kind, source in sources.items():
        folder = out / kind
        folder.mkdir(parents=True, exist_ok=True)
        for name, img in source():
            for version, pil in _versions(img):
                for ext, fmt in (("jpg", "JPEG"), ("png", "PNG")):
                    pil.save(folder / f"{name}_{version}.{ext}", format=fmt)
                    counts[kind] += 1
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--model",
        type=Path,
        help="model the screenshot server loads (default: $MODEL_PATH or shipped)",
    )
    ap.add_argument("--film", type=Path, help="a chest film to upload for the result screenshots")
    ap.add_argument(
        "--set",
        choices=("eval", "dev"),
        default="eval",
        help="the evaluation set (default) or the separate development set",
    )
    a = ap.parse_args()
    counts = build(a.out, a.model, a.film, a.set)
    for kind, n in counts.items():
        print(f"{kind}: {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
