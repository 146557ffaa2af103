"""`pneumonia recalibrate`: refits on synthetic scores whose right answer is known; the site
model file keeps the weights and provenance, records the site, and serves."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from pneumonia.calibration import sigmoid
from pneumonia.card import read_metadata, with_metadata
from pneumonia.cli import main
from pneumonia.predictor import Predictor
from pneumonia.recalibrate import (
    RANKING_NOTE,
    grouped_folds,
    recalibrate_scores,
    refit,
    size_warnings,
)


def known_site(n: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Balanced films whose true log-odds are 2s with s ~ N(+-1, 1), seen through a model
    whose logit is 3 (2s - 2): the right calibration is temperature 3, bias 2."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    s = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)
    logits = 3.0 * (2.0 * s - 2.0)
    groups = [f"p{i // 2}" for i in range(n)]  # two films per patient
    return logits, y, groups


def test_refit_finds_the_known_calibration_and_thresholds() -> None:
    z, y, g = known_site(4_000)
    temperature, bias, youden = refit(z, y, "youden", 0.9)
    assert temperature == pytest.approx(3.0, abs=0.2) and bias == pytest.approx(2.0, abs=0.2)
    assert youden == pytest.approx(0.5, abs=0.05)  # Youden: s = 0, log-odds 0
    # min_sensitivity 0.9: s = 1 - 1.2816, so p = sigmoid(2 (1 - 1.2816)) = 0.3628.
    r = recalibrate_scores(
        z, y, g, original=(1.0, 0.0, 0.5), rule="min_sensitivity", min_sensitivity=0.9, n_boot=0
    )
    assert r["fitted"]["threshold"] == pytest.approx(float(sigmoid(2 * (1 - 1.2816))), abs=0.03)
    assert r["after"]["sensitivity"] == pytest.approx(0.9, abs=0.02)  # cross-fitted, held out
    # The original calibration is badly off (p = sigmoid(3 (2s - 2))); the refit is not.
    assert r["before"]["ece"] > 0.1 and r["after"]["ece"] < 0.03
    assert r["after"]["log_loss"] < r["before"]["log_loss"]
    assert r["warnings"] == []


def test_ranking_is_unchanged_and_intervals_cover() -> None:
    z, y, g = known_site(600, seed=1)
    r = recalibrate_scores(
        z, y, g, original=(1.0, 0.0, 0.5), rule="youden", min_sensitivity=0.9, n_boot=100
    )
    assert r["before"]["ci95"]["auc"] == r["after"]["ci95"]["auc"] == r["auc_ci95"]
    assert r["ranking"] == RANKING_NOTE
    for side in ("before", "after"):
        for m in (
            "sensitivity",
            "specificity",
            "accuracy",
        ):  # not ECE: its bootstrap is biased upward
            lo, hi = r[side]["ci95"][m]
            assert lo <= r[side][m] <= hi


def test_size_warnings_follow_the_rule() -> None:
    def y(n_pos: int, n_neg: int) -> np.ndarray:
        return np.r_[np.ones(n_pos), np.zeros(n_neg)]

    too_small = size_warnings(y(30, 30), 30, "min_sensitivity", 0.98, 5)
    assert any(
        w.startswith("too small for the rule") and "one missed PNEUMONIA film in 50" in w
        for w in too_small
    )
    small = size_warnings(y(120, 120), 120, "min_sensitivity", 0.98, 5)
    assert any(w.startswith("small for the rule") and "fewer than 250" in w for w in small)
    assert size_warnings(y(300, 300), 300, "min_sensitivity", 0.98, 5) == []
    assert size_warnings(y(300, 300), 300, "youden", 0.98, 5) == []
    assert any("Youden" in w for w in size_warnings(y(40, 300), 300, "youden", 0.98, 5))
    assert any("calibration" in w for w in size_warnings(y(10, 60), 70, "youden", 0.98, 5))


def test_folds_keep_patients_together_and_stratify() -> None:
    y = np.array([1] * 60 + [0] * 40)
    groups = [f"p{i // 3}" for i in range(100)]
    fold = grouped_folds(y, groups, 5)
    for g in set(groups):
        assert len({int(fold[i]) for i, h in enumerate(groups) if h == g}) == 1
    for f in range(5):
        assert (
            9 <= int(((fold == f) & (y == 1)).sum()) <= 15
            and 6 <= int(((fold == f) & (y == 0)).sum()) <= 10
        )


def test_metadata_rewrite_keeps_every_other_byte(tiny_model: Path) -> None:
    onnx = pytest.importorskip("onnx")
    raw = tiny_model.read_bytes()
    props = read_metadata(raw)
    assert (
        set(props) == {"model_card"}
        and json.loads(props["model_card"])["name"] == "pneumonia-tiny-test"
    )
    new = with_metadata(raw, {**props, "model_card": '{"x": 1}', "extra": "é"})
    a, b = onnx.load_from_string(raw), onnx.load_from_string(new)
    assert {p.key: p.value for p in b.metadata_props} == {"model_card": '{"x": 1}', "extra": "é"}
    assert a.graph.SerializeToString() == b.graph.SerializeToString()
    assert (a.ir_version, a.producer_name, list(a.opset_import)) == (
        b.ir_version,
        b.producer_name,
        list(b.opset_import),
    )


@pytest.fixture(scope="module")
def site_model(
    tiny_model: Path, synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("site") / "site.onnx"
    report = tmp_path_factory.mktemp("site") / "report.json"
    args = [
        "recalibrate",
        "--model",
        str(tiny_model),
        "--data",
        str(synthetic_root / "test"),
        "--out",
        str(out),
    ]
    assert (
        main(
            [
                *args,
                "--threshold-rule",
                "youden",
                "--bootstrap",
                "50",
                "--report",
                str(report),
                "--no-progress",
            ]
        )
        == 0
    )
    return out, json.loads(report.read_text())


def test_site_model_keeps_weights_and_provenance(
    site_model: tuple[Path, dict], tiny_model: Path, synthetic_root: Path
) -> None:
    out, report = site_model
    old, new = Predictor(tiny_model, threads=1), Predictor(out, threads=1)
    x = np.random.default_rng(0).random((3, *old.spec.input_shape), dtype=np.float32)
    # same weights, same logits
    np.testing.assert_array_equal(old.scores(x).logits, new.scores(x).logits)
    for key in (
        "name",
        "training",
        "validation_metrics",
        "preprocess",
        "architecture",
        "versions",
        "weights_sha256",
    ):
        assert getattr(new.card, key) == getattr(old.card, key)
    assert new.weights_sha256 == old.weights_sha256 and new.sha256 != old.sha256
    assert new.card.version.startswith(old.card.version.split("+")[0] + "+site.")
    (parent,) = new.card.lineage
    assert (parent.name, parent.version, parent.sha256) == (old.name, old.version, old.sha256)
    rec = new.card.site_recalibration
    assert rec is not None
    assert (new.threshold, new.temperature, new.bias) == (
        rec["fitted"]["threshold"],
        rec["fitted"]["temperature"],
        rec["fitted"]["bias"],
    )
    assert rec["original"]["sha256"] == old.sha256 and rec["original"]["threshold"] == old.threshold
    assert (
        rec["refitted"] == ["temperature", "bias", "threshold"]
        and "Ranking is unchanged" in rec["unchanged"]
    )
    files = sorted(
        p.relative_to(synthetic_root / "test").as_posix()
        for p in (synthetic_root / "test").rglob("*.jpeg")
    )
    assert rec["site"]["files_sha256"] == hashlib.sha256("\n".join(files).encode()).hexdigest()
    assert (
        rec["site"]["counts"] == {"NORMAL": 12, "PNEUMONIA": 12} and rec["site"]["patients"] == 12
    )
    assert rec["site"]["ids_parsed"] == 24 and rec["date"]
    assert new.card.threshold_rule.rule == "youden"
    assert new.card.threshold_rule.bound_by == "rule optimum"
    assert "the site's films" in new.card.calibration.fitted_on
    assert any("too small" in w or "small for" in w for w in rec["warnings"])  # 24 films
    sidecar = json.loads(out.with_suffix(".card.json").read_text())
    assert sidecar["sha256"] == new.sha256 and sidecar["site_recalibration"]["site"] == rec["site"]
    md = out.with_suffix(".card.md").read_text()
    assert "## Site recalibration" in md and "## Intended use" in md
    assert f"Comes from {old.name} {old.version}" in md
    assert report["before"]["ci95"]["auc"] == report["after"]["ci95"]["auc"]


def test_site_model_serves(site_model: tuple[Path, dict]) -> None:
    from pneumonia.serve.app import create_app
    from pneumonia.serve.settings import Settings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    out, _ = site_model
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(TestClient(create_app(Settings(model_path=out))))
        for _ in range(200):
            if client.get("/ready").status_code == 200:
                break
            threading.Event().wait(0.02)
        card = client.get("/model").json()
    assert card["site_recalibration"]["site"]["counts"] == {"NORMAL": 12, "PNEUMONIA": 12}
    assert card["threshold"] == Predictor(out, threads=1).threshold


def test_refuses_to_overwrite_the_input_and_one_class_sites(
    tiny_model: Path, synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "recalibrate",
                "--model",
                str(tiny_model),
                "--data",
                str(synthetic_root / "test"),
                "--out",
                str(tiny_model),
            ]
        )
        == 2
    )
    assert "input model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="both NORMAL and PNEUMONIA"):
        recalibrate_scores(
            np.zeros(4),
            np.ones(4),
            list("abcd"),
            original=(1, 0, 0.5),
            rule="youden",
            min_sensitivity=0.9,
        )


def test_card_command_shows_the_site_section(site_model: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = site_model
    md = tmp_path / "card.md"
    assert main(["card", "--model", str(out), "--out", str(md)]) == 0
    text = md.read_text()
    assert "## Site recalibration" in text and "Ranking is unchanged by design" in text
