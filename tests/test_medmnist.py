"""MedMNIST .npz input: an npz in MedMNIST's exact layout through train, evaluate and score."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import encode, synthetic_xray
from pneumonia.cli import main
from pneumonia.data import (
    SPLIT_MEDMNIST_VAL,
    DatasetLayoutError,
    list_npz_split,
    load_images,
    split_samples,
    train_val_split,
)
from pneumonia.preprocess import PreprocessSpec, preprocess_bytes

SPLIT_SIZES = {"train": 48, "val": 16, "test": 16}


def medmnist_npz(path: Path, size: int = 64, sizes: dict[str, int] = SPLIT_SIZES) -> Path:
    """An npz laid out exactly as MedMNIST's: uint8 (N, H, W) images, uint8 (N, 1) labels."""
    arrays = {}
    for s, (split, n) in enumerate(sizes.items()):
        labels = np.arange(n) % 2
        arrays[f"{split}_images"] = np.stack(
            [synthetic_xray(int(y), 100 * s + i, size) for i, y in enumerate(labels)]
        ).astype(np.uint8)
        arrays[f"{split}_labels"] = labels.astype(np.uint8)[:, None]
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture(scope="module")
def npz64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return medmnist_npz(tmp_path_factory.mktemp("medmnist") / "pneumoniamnist_64.npz")


def test_npz_samples_follow_medmnist_splits(npz64: Path) -> None:
    for split, n in SPLIT_SIZES.items():
        samples = split_samples(npz64, split)
        assert len(samples) == n
        assert [s.label for s in samples[:4]] == [0, 1, 0, 1]
        assert samples[3].path == npz64 / split / "00003"
    plan = train_val_split(npz64)
    assert plan.method == SPLIT_MEDMNIST_VAL
    assert (len(plan.train), len(plan.val)) == (48, 16)
    assert "MedMNIST's own val split" in plan.description
    small = train_val_split(npz64, max_images=32)
    assert (len(small.train), len(small.val)) == (24, 8)


def test_npz_pixels_preprocess_like_a_png_file(npz64: Path) -> None:
    spec = PreprocessSpec(size=48)
    samples = list_npz_split(npz64, "test")[:3]
    loaded = load_images(samples, spec)
    images = np.load(npz64)["test_images"][:3]
    want = np.stack([preprocess_bytes(encode(im, "PNG"), spec) for im in images])
    np.testing.assert_array_equal(loaded.x, want)
    assert loaded.y.tolist() == [0, 1, 0]


def test_28_pixel_npz_loads(tmp_path: Path) -> None:
    npz = medmnist_npz(
        tmp_path / "pneumoniamnist.npz", size=28, sizes={"train": 4, "val": 2, "test": 2}
    )
    loaded = load_images(split_samples(npz, "train"), PreprocessSpec(size=64))
    assert loaded.x.shape == (4, 1, 64, 64) and not loaded.skipped


def test_npz_layout_errors_name_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, train_images=np.zeros((2, 8, 8), np.float32), train_labels=np.zeros((2, 1)))
    with pytest.raises(DatasetLayoutError, match="uint8"):
        split_samples(bad, "train")
    with pytest.raises(DatasetLayoutError, match="val_images"):
        split_samples(bad, "val")
    labels = tmp_path / "labels.npz"
    np.savez(labels, test_images=np.zeros((2, 8, 8), np.uint8), test_labels=np.array([[0], [2]]))
    with pytest.raises(DatasetLayoutError, match="expected 0"):
        split_samples(labels, "test")
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        split_samples(tmp_path / "missing.npz", "test")


@pytest.mark.slow
def test_npz_train_evaluate_score(
    npz64: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pneumonia.training.config import TrainConfig
    from pneumonia.training.export import export_run
    from pneumonia.training.model import ModelConfig
    from pneumonia.training.train import train

    cfg = TrainConfig(
        preprocess=PreprocessSpec(size=48),
        model=ModelConfig(channels=(4, 8, 16), dropout=0.0),
        seeds=(0,),
        epochs=1,
        batch_size=16,
        lr=1e-2,
        threads=1,
    )
    run = tmp_path / "run"
    train(cfg, npz64, run, progress=False)
    data = json.loads((run / "data.json").read_text())
    assert data["split"] == SPLIT_MEDMNIST_VAL
    assert data["train"] == {"NORMAL": 24, "PNEUMONIA": 24}
    assert data["validation"] == {"NORMAL": 8, "PNEUMONIA": 8}
    model = tmp_path / "model.onnx"
    card = export_run(run, model)
    assert card["training"]["data"]["split"] == SPLIT_MEDMNIST_VAL
    assert "MedMNIST's own val split" in model.with_suffix(".card.md").read_text()

    capsys.readouterr()
    for split, n in (("test", 16), ("val", 16), ("train", 48)):
        args = [
            "evaluate",
            "--data",
            str(npz64),
            "--json",
            str(tmp_path / f"{split}.json"),
            "--model",
            str(model),
            "--no-progress",
        ]
        assert main([*args, "--split", split] if split != "test" else args) == 0
        report = json.loads((tmp_path / f"{split}.json").read_text())
        assert report["n"] == n and report["data"].endswith(f"pneumoniamnist_64.npz/{split}")
    out = tmp_path / "scores.csv"
    capsys.readouterr()
    assert (
        main(
            [
                "score",
                str(npz64),
                "--out",
                str(out),
                "--model",
                str(model),
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 80 and summary["errors"] == {}
    lines = out.read_text().splitlines()
    assert (
        lines[0].startswith("id,")
        and lines[1].startswith("train/00000,")
        and lines[-1].startswith("test/00015,")
    )
