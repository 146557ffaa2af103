"""Shared fixtures: synthetic chest-X-ray-like images and a tiny exported model.

Nothing here needs ../shared or the network. Synthetic PNEUMONIA images carry bright,
blurry opacities in the lung fields, which a tiny CNN learns in one short epoch.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "chest_xray"


def synthetic_xray(label: int, seed: int, size: int = 96) -> np.ndarray:
    """A uint8 grayscale image: dark lungs in a bright body, with opacities if ``label``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.75 - 0.25 * np.exp(-(((xx - 0.3) / 0.13) ** 2 + ((yy - 0.5) / 0.25) ** 2))
    img -= 0.25 * np.exp(-(((xx - 0.7) / 0.13) ** 2 + ((yy - 0.5) / 0.25) ** 2))
    if label:
        for _ in range(3):
            cx, cy = rng.choice([0.3, 0.7]) + rng.normal(0, 0.04), rng.uniform(0.35, 0.65)
            img += 0.35 * np.exp(-(((xx - cx) / 0.07) ** 2 + ((yy - cy) / 0.07) ** 2))
    img += rng.normal(0, 0.03, img.shape) + rng.uniform(-0.1, 0.1)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str = "JPEG", **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_split(folder: Path, n_per_class: int, seed: int, size: int = 96) -> Path:
    """Write ``folder/{NORMAL,PNEUMONIA}/*.jpeg`` with Kermany-style patient file names."""
    for label, name in enumerate(("NORMAL", "PNEUMONIA")):
        d = folder / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            patient = seed * 1000 + i // 2  # two films per patient
            fname = (
                f"IM-{patient:04d}-000{i % 2}.jpeg"
                if label == 0
                else f"person{patient}_bacteria_{i}.jpeg"
            )
            (d / fname).write_bytes(
                encode(synthetic_xray(label, seed * 10_000 + label * 1000 + i, size))
            )
    return folder


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Kaggle-layout folder: train/ (40 per class) and test/ (12 per class)."""
    root = tmp_path_factory.mktemp("chest_xray")
    make_split(root / "train", 40, seed=1)
    make_split(root / "test", 12, seed=2)
    return root


@pytest.fixture(scope="session")
def tiny_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished training run of a tiny CNN (64 px, 2 epochs, the default two members) on the synthetic set."""
    from pneumonia.preprocess import PreprocessSpec
    from pneumonia.training.config import TrainConfig
    from pneumonia.training.model import ModelConfig
    from pneumonia.training.train import train

    cfg = TrainConfig(
        preprocess=PreprocessSpec(size=64),
        model=ModelConfig(channels=(4, 8, 16), dropout=0.0),
        seeds=(0, 1),
        epochs=2,
        batch_size=16,
        lr=1e-2,
        val_fraction=0.25,
        threads=1,
    )
    run = tmp_path_factory.mktemp("run")
    train(cfg, synthetic_root, run, progress=False)
    return run


@pytest.fixture(scope="session")
def guarded_run(
    tiny_run: Path, synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A copy of the tiny run with its input check fitted (``guard.json``); tests that change
    the run copy it first, and write their exports elsewhere."""
    from pneumonia.training.guard_fit import fit_run_guard

    run = tmp_path_factory.mktemp("guarded") / "run"
    shutil.copytree(tiny_run, run)
    fit_run_guard(run, synthetic_root, components=8)
    return run


@pytest.fixture(scope="session")
def tiny_model(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run exported to ONNX (with its card JSON and Markdown beside it)."""
    from pneumonia.training.export import export_run

    out = tmp_path_factory.mktemp("model") / "model.onnx"
    export_run(tiny_run, out, name="pneumonia-tiny-test")
    return out


@pytest.fixture()
def tiny_card(tiny_model: Path) -> dict:
    return json.loads(tiny_model.with_suffix(".card.json").read_text())


def jpeg_bytes(label: int = 1, seed: int = 0, size: int = 96) -> bytes:
    return encode(synthetic_xray(label, seed, size))
