"""The run folder's one owner (pneumonia.training.run), issue 21: a tiny run rebuilt twice is
the same run; the split is drawn once at the start of training, recorded, and read (never
drawn again) by calibrate, guard fit and export, which refuse an edited record; versions and
threads are recorded and reach the card; a manifest with text labels and patient ids, and a
folder of DICOM files, train as a folder of JPEGs does."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks.common import dicom_bytes
from conftest import encode, make_split, synthetic_xray
from pneumonia.labels import LABELS
from pneumonia.preprocess import PreprocessSpec
from pneumonia.training.config import TrainConfig
from pneumonia.training.model import ModelConfig
from pneumonia.training.run import (
    CHECKPOINT,
    RunFolder,
    SplitRecordError,
    load_split,
    read_environment,
)

# 60 training films of the synthetic set in batches of 16; seconds on one thread.
CONFIG = TrainConfig(
    preprocess=PreprocessSpec(size=48),
    model=ModelConfig(channels=(4, 8, 16), dropout=0.2),  # dropout draws on torch's RNG
    seeds=(0,),
    epochs=2,
    batch_size=16,
    lr=1e-2,
    val_fraction=0.25,
    threads=1,
)


def _train(data: Path, out: Path, cfg: TrainConfig = CONFIG) -> RunFolder:
    from pneumonia.training.train import train

    train(cfg, data, out, progress=False)
    return RunFolder(out)


@pytest.fixture(scope="module")
def run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> RunFolder:
    return _train(synthetic_root, tmp_path_factory.mktemp("run-a"))


def _copy(run: RunFolder, tmp_path: Path) -> RunFolder:
    out = tmp_path / "run"
    shutil.copytree(run.path, out)
    return RunFolder(out)


def test_a_run_rebuilt_gives_the_same_weights_and_calibration(
    run: RunFolder, synthetic_root: Path, tmp_path: Path
) -> None:
    again = _train(synthetic_root, tmp_path / "run-b")
    for a, b in zip(run.checkpoints(), again.checkpoints(), strict=True):
        got = torch.load(a, map_location="cpu", weights_only=True)["state_dict"]
        want = torch.load(b, map_location="cpu", weights_only=True)["state_dict"]
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got), "weights differ bit for bit"
    assert json.loads(run.calibration.read_text()) == json.loads(again.calibration.read_text())
    assert run.split.read_text() == again.split.read_text()
    assert run.val_predictions.read_text() == again.val_predictions.read_text()


def test_the_split_is_recorded_and_the_validation_patients_are_its_own(run: RunFolder) -> None:
    record = json.loads(run.split.read_text())
    assert record["drawn_with"] == {"val_fraction": 0.25, "split_seed": 0, "max_images": None}
    train_patients = {row[2] for row in record["train"]}
    val_patients = {row[2] for row in record["validation"]}
    assert val_patients and not train_patients & val_patients
    data = run.read_data()
    assert data["split_sha256"] == record["sha256"]
    assert sorted(val_patients) == data["validation_patients"]
    assert json.loads(run.calibration.read_text())["data"]["split_sha256"] == record["sha256"]
    # Names relative to the data root: the run moves with its data.
    assert not any(Path(row[0]).is_absolute() for row in record["train"])


def test_the_split_is_drawn_once_and_later_stages_read_the_record(
    run: RunFolder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: train.py drew the split again in calibrate and guard_fit drew it a third
    time, only the last checked against the recorded patients."""
    from pneumonia import data
    from pneumonia.training import run as run_module
    from pneumonia.training import train as train_module
    from pneumonia.training.export import export_run
    from pneumonia.training.guard_fit import fit_run_guard
    from pneumonia.training.train import calibrate_run

    copy = _copy(run, tmp_path)

    def no_draw(*args: Any, **kw: Any) -> Any:
        raise AssertionError("the split was drawn again")

    for module in (data, run_module, train_module):
        monkeypatch.setattr(module, "train_val_split", no_draw)
    calibrate_run(copy.path)
    guard = fit_run_guard(copy.path)
    assert guard.fitted["split_sha256"] == json.loads(copy.split.read_text())["sha256"]
    sidecar = export_run(copy.path, tmp_path / "model.onnx")
    assert sidecar["versions"]["train.threads"] == "1"


def _edit_split(run: RunFolder, rehash: bool) -> None:
    from pneumonia.training.run import _digest

    record = json.loads(run.split.read_text())
    moved = record["validation"].pop()
    record["train"].append(moved)  # one validation film moved into training
    if rehash:
        record["sha256"] = _digest(record["method"], record["train"], record["validation"])
    run.split.write_text(json.dumps(record))


@pytest.mark.parametrize("rehash", [False, True], ids=["edited", "edited-and-rehashed"])
@pytest.mark.parametrize("stage", ["calibrate", "guard fit", "export"])
def test_an_edited_split_record_is_refused(
    run: RunFolder, tmp_path: Path, stage: str, rehash: bool
) -> None:
    from pneumonia.training.export import export_run
    from pneumonia.training.guard_fit import fit_run_guard
    from pneumonia.training.train import calibrate_run

    copy = _copy(run, tmp_path)
    _edit_split(copy, rehash)
    # Rehashed, the record agrees with itself but not with data.json's digest of it.
    message = "is not the split" if rehash else "was changed after training"
    act = {
        "calibrate": lambda: calibrate_run(copy.path),
        "guard fit": lambda: fit_run_guard(copy.path),
        "export": lambda: export_run(copy.path, tmp_path / "model.onnx"),
    }[stage]
    with pytest.raises(SplitRecordError, match=message):
        act()


def test_a_config_edited_after_training_is_refused(run: RunFolder, tmp_path: Path) -> None:
    from pneumonia.training.train import calibrate_run

    copy = _copy(run, tmp_path)
    cfg = json.loads(copy.config.read_text())
    cfg["split_seed"] = 7
    copy.config.write_text(json.dumps(cfg))
    with pytest.raises(SplitRecordError, match=r"was drawn with .* the run's config says"):
        calibrate_run(copy.path)


def test_a_split_record_naming_films_not_under_the_data_is_refused(
    run: RunFolder, tmp_path: Path
) -> None:
    with pytest.raises(SplitRecordError, match=r"not under .*pass the run's training data"):
        load_split(run, tmp_path / "elsewhere")


def test_an_input_check_fitted_on_another_split_is_refused_at_export(
    run: RunFolder, tmp_path: Path
) -> None:
    from pneumonia.training.export import export_run
    from pneumonia.training.guard_fit import fit_run_guard

    copy = _copy(run, tmp_path)
    fit_run_guard(copy.path)
    guard = json.loads(copy.guard.read_text())
    guard["fitted"]["split_sha256"] = "0" * 64
    copy.guard.write_text(json.dumps(guard))
    with pytest.raises(SplitRecordError, match=r"guard\.json was made on split 000000000000"):
        export_run(copy.path, tmp_path / "model.onnx")


def test_versions_and_threads_are_recorded_per_stage(run: RunFolder) -> None:
    env = read_environment(run)["train"]
    assert env["torch"] == torch.__version__
    assert env["threads"] == "1"
    assert {"python", "numpy", "onnxruntime", "onnx"} <= env.keys()


def test_the_card_names_the_training_versions(tiny_card: dict) -> None:
    versions = tiny_card["versions"]
    assert versions["train.torch"] == torch.__version__
    assert versions["train.threads"] == "1"
    assert "onnxruntime" in versions and "train.onnxruntime" in versions


def test_a_manifest_with_text_labels_and_patient_ids_trains_split_by_patient(
    tmp_path: Path,
) -> None:
    """A research group's CSV (paths, NORMAL/pneumonia labels, several films per patient, a
    site column) trains as a folder does; no patient is on both sides of the split."""
    lines = ["path,label,patient_id,site"]
    for p in range(24):
        label = p % 2
        for k in range(3):
            name = f"films/{p}-{k}.png"
            (tmp_path / "films").mkdir(exist_ok=True)
            (tmp_path / name).write_bytes(encode(synthetic_xray(label, p * 3 + k, 64), "PNG"))
            text = LABELS[label] if k else LABELS[label].lower()
            lines.append(f"{name},{text},patient-{p:02d},site-{p % 3}")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    run = _train(tmp_path / "manifest.csv", tmp_path / "run")
    record = json.loads(run.split.read_text())
    train_patients = {row[2] for row in record["train"]}
    val_patients = {row[2] for row in record["validation"]}
    assert train_patients | val_patients == {f"patient-{p:02d}" for p in range(24)}
    assert not train_patients & val_patients
    assert len(record["train"]) + len(record["validation"]) == 72
    for rows in (record["train"], record["validation"]):
        for name, label, patient, _ in rows:  # the text labels read as the folder's 0/1
            assert label == int(patient.split("-")[1]) % 2 and name.startswith("films/")
    split = load_split(run)
    assert {s.patient for s in split.val} == val_patients


def test_dicom_films_train_through_the_serving_decoders(tmp_path: Path) -> None:
    """Training reads .dcm films through the same decoder as serving (pneumonia.preprocess)."""
    folder = make_split(tmp_path / "data" / "train", 16, seed=3, size=64)
    for i, film in enumerate(sorted(folder.glob("*/*.jpeg"))):
        label = LABELS.index(film.parent.name)
        pixels = synthetic_xray(label, 100 + i, 64).astype(np.uint16) * 16  # 12-bit values
        film.with_suffix(".dcm").write_bytes(dicom_bytes(pixels))
        film.unlink()
    run = _train(tmp_path / "data", tmp_path / "run")
    data = run.read_data()
    assert data["skipped"] == []
    assert sum(data["train"].values()) + sum(data["validation"].values()) == 32
    rows = list(csv.reader(run.val_predictions.open(newline="")))[1:]
    assert rows and all(r[0].endswith(".dcm") for r in rows)
    assert (run.checkpoints()[0].name) == CHECKPOINT


def test_guard_fit_features_on_onnxruntime_are_the_torch_networks(run: RunFolder) -> None:
    """The input check is fitted on onnxruntime's features (issue 21: 6x faster per film than
    torch's eager kernels); they must be the network's, as export's parity check demands."""
    from pneumonia.training.export import PARITY_ATOL
    from pneumonia.training.guard_fit import embed_inputs, onnx_features
    from pneumonia.training.model import EnsembleForExport
    from pneumonia.training.train import load_member

    net = EnsembleForExport([load_member(p) for p in run.checkpoints()]).eval()
    x = np.random.default_rng(0).random((5, *CONFIG.preprocess.input_shape), dtype=np.float32)
    want = embed_inputs(net, x)
    got = onnx_features(net, CONFIG.preprocess.input_shape, 1)(x)
    assert got.shape == want.shape
    assert float(np.abs(got - want).max()) <= PARITY_ATOL * max(1.0, float(np.abs(want).max()))


def test_a_run_from_before_split_records_is_drawn_again_and_checked(
    run: RunFolder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Run folders written before split.json (the shipped v2's among them) still calibrate,
    fit and export: their split is drawn again from the config and checked against the
    validation patients their data.json recorded."""
    from pneumonia.training.export import export_run
    from pneumonia.training.guard_fit import fit_run_guard
    from pneumonia.training.train import calibrate_run

    copy = _copy(run, tmp_path)
    copy.split.unlink()
    data = copy.read_data()
    del data["split_sha256"]
    copy.data.write_text(json.dumps(data))
    calibrate_run(copy.path)
    fit_run_guard(copy.path)
    export_run(copy.path, tmp_path / "model.onnx")
    assert "predates split records" in caplog.text
    data["validation_patients"] = ["someone-else"]
    copy.data.write_text(json.dumps(data))
    with pytest.raises(SplitRecordError, match="is not the one"):
        fit_run_guard(copy.path)
