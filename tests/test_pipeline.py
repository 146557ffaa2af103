"""End to end on synthetic data: train, export, ONNX/torch parity, evaluate, predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.common import damage_png
from conftest import encode, jpeg_bytes, synthetic_xray
from pneumonia.cli import main


def test_run_folder_holds_config_history_checkpoint(tiny_run: Path) -> None:
    assert (tiny_run / "config.json").is_file()
    hist = json.loads((tiny_run / "member-0" / "history.json").read_text())
    assert [r["epoch"] for r in hist] == [1, 2]
    assert (tiny_run / "member-0" / "best.pt").is_file()
    calib = json.loads((tiny_run / "calibration.json").read_text())
    assert calib["temperature"] > 0 and 0 <= calib["threshold"] <= 1
    data = json.loads((tiny_run / "data.json").read_text())
    assert data["train"]["NORMAL"] + data["validation"]["NORMAL"] == 40


def test_onnx_matches_torch(tiny_run: Path, tiny_model: Path, synthetic_root: Path) -> None:
    import torch

    from pneumonia.data import list_split, load_images
    from pneumonia.predictor import Predictor
    from pneumonia.training.model import EnsembleForExport
    from pneumonia.training.run import RunFolder
    from pneumonia.training.train import load_member

    pred = Predictor(tiny_model)
    x = load_images(list_split(synthetic_root / "test"), pred.spec).x
    members = [load_member(p) for p in RunFolder(tiny_run).checkpoints()]
    assert len(members) == 2  # the default config is an ensemble of two
    net = EnsembleForExport(members).eval()
    with torch.no_grad():
        ref_logit, ref_cam, _ = net(torch.from_numpy(x))
    got = pred.scores(x, cams=True)
    logit, cam = got.logits, got.cams
    np.testing.assert_allclose(logit, ref_logit.numpy(), atol=1e-4)
    np.testing.assert_allclose(cam, ref_cam.numpy(), atol=1e-4)
    # The CAM's spatial mean is the logit: explanations are exact, not approximate.
    np.testing.assert_allclose(cam.mean(axis=(1, 2)), logit, atol=1e-4)


def test_card_carries_what_serving_needs(tiny_model: Path, tiny_card: dict) -> None:
    from pneumonia.predictor import Predictor, sha256_file

    for key in (
        "labels",
        "threshold",
        "calibration",
        "preprocess",
        "validation_metrics",
        "versions",
        "training",
        "intended_use",
        "weights_sha256",
        "schema_version",
    ):
        assert key in tiny_card
    assert {"temperature", "bias", "fitted_on"} <= set(tiny_card["calibration"])
    assert tiny_card["sha256"] == sha256_file(tiny_model)
    assert Predictor(tiny_model).card.preprocess == tiny_card["preprocess"]
    md = tiny_model.with_suffix(".card.md").read_text()
    assert "Not a diagnostic device" in md or "not a diagnostic device" in md


@pytest.mark.slow  # draws every plot
def test_evaluate_cli_writes_report_and_plots(
    tiny_model: Path,
    tiny_run: Path,
    synthetic_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "report.json"
    plots = tmp_path / "plots"
    rc = main(
        [
            "evaluate",
            "--data",
            str(synthetic_root / "test"),
            "--json",
            str(out),
            "--model",
            str(tiny_model),
            "--plots",
            str(plots),
            "--run-dir",
            str(tiny_run),
            "--no-progress",
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    for key in (
        "n",
        "auc",
        "accuracy",
        "sensitivity",
        "specificity",
        "ppv",
        "npv",
        "f1",
        "brier",
        "ece",
        "confusion_matrix",
        "threshold",
        "auc_ci95",
    ):
        assert key in report
    assert report["n"] == 24
    assert report["auc"] > 0.9  # the synthetic opacities are easy
    for name in (
        "roc",
        "precision_recall",
        "confusion_matrix",
        "reliability",
        "threshold_sweep",
        "training_curves",
    ):
        assert (plots / f"{name}.png").stat().st_size > 1000
    assert json.loads(capsys.readouterr().out.strip())["n"] == 24


def test_evaluate_accepts_kaggle_root(
    tiny_model: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "evaluate",
                "--data",
                str(synthetic_root),
                "--json",
                str(out),
                "--model",
                str(tiny_model),
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["data"].endswith("test")


def test_predict_cli_one_json_line_per_image(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = tmp_path / "a.jpeg", tmp_path / "b.jpeg"
    a.write_bytes(jpeg_bytes(1, 1))
    b.write_bytes(b"not an image")
    rc = main(["predict", str(a), str(b), "--model", str(tiny_model)])
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert rc == 1  # one image failed
    assert lines[0]["filename"] == str(a)
    assert lines[0]["prediction"] in ("NORMAL", "PNEUMONIA")
    first = lines[0]
    # probability is that of the returned label; the label follows the shipped threshold.
    assert first["probability"] == first["probabilities"]["PNEUMONIA"]  # issue 19
    assert (first["probabilities"]["PNEUMONIA"] >= first["threshold"]) == (
        first["prediction"] == "PNEUMONIA"
    )
    assert lines[1]["error"]["code"] == "unsupported_format"


def test_predict_cli_refuses_a_damaged_png(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 13: a PNG with a bad CRC is an error line naming the check, never a score."""
    good = encode(synthetic_xray(1, 2), "PNG")
    path = tmp_path / "damaged.png"
    path.write_bytes(damage_png(good, b"IDAT"))
    assert main(["predict", str(path), "--model", str(tiny_model)]) == 1
    line = json.loads(capsys.readouterr().out)
    assert "prediction" not in line
    assert line["error"]["code"] == "corrupt_image"
    assert "CRC of its IDAT chunk" in line["error"]["message"]


def test_export_then_training_data_path_equals_prediction_path(
    tiny_model: Path, synthetic_root: Path
) -> None:
    """Regression guard for the original system's channel mismatch: the training loader and the
    predictor must produce identical arrays and scores for the same file."""
    from pneumonia.data import list_split, load_images
    from pneumonia.predictor import Predictor

    pred = Predictor(tiny_model)
    sample = list_split(synthetic_root / "test")[0]
    train_arr = load_images([sample], pred.spec).x
    serve_arr = pred.prepare(sample.path.read_bytes()).input[None]
    np.testing.assert_array_equal(train_arr, serve_arr)
    assert (
        pred.scores(train_arr).probabilities[0]
        == pred.predict_bytes(sample.path.read_bytes()).p_pneumonia
    )


def test_missing_model_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "x.jpeg"
    img.write_bytes(jpeg_bytes())
    assert main(["predict", str(img), "--model", str(tmp_path / "nope.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_calibrate_refits_threshold_without_training(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = json.loads((run / "calibration.json").read_text())
    assert main(["calibrate", str(run), "--threshold-rule", "youden"]) == 0
    after = json.loads((run / "calibration.json").read_text())
    assert after["threshold_rule"] == "youden"
    assert after["temperature"] == pytest.approx(
        before["temperature"]
    )  # same checkpoints, same split
    assert after["bias"] == pytest.approx(before["bias"])
    assert after["validation"]["n"] == before["validation"]["n"]
