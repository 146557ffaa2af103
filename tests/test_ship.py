"""`make ship` (benchmarks/ship.py), issue 21: its default scratch mode writes only its own
folder, leaves artifacts/ as it was and scores no test set; only PUBLISH=1 asks for the test set
and the ledger."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIP = REPO / "benchmarks" / "ship.py"


def _make_n(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(
        ["make", "-n", "ship", *args], cwd=REPO, capture_output=True, text=True, check=True
    )
    return out.stdout


def test_make_ship_is_scratch_unless_publish_is_asked_for() -> None:
    scratch = _make_n()
    command = next(line for line in scratch.splitlines() if "benchmarks/ship.py" in line)
    assert "--out runs/ship-" in command and "--publish" not in scratch
    assert "artifacts" not in scratch  # the recipe names no published file: ship.py's default
    assert "pip install -r requirements/ship.lock" in scratch or (REPO / ".venv-ship").exists()
    assert "--publish" in _make_n("PUBLISH=1")


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow  # trains two tiny runs through the CLI
def test_scratch_ship_never_touches_artifacts_nor_the_test_set(
    synthetic_root: Path, tiny_model: Path, tmp_path: Path
) -> None:
    # Training data without test/: any scoring of a test set would fail the run.
    data = tmp_path / "data"
    shutil.copytree(synthetic_root / "train", data / "train")
    artifacts = tmp_path / "artifacts"
    for name in ("model.onnx", "baseline/model.onnx"):
        (artifacts / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_model, artifacts / name)
    (artifacts / "test_looks.json").write_text('{"looks": []}\n')
    before = _digests(artifacts)
    out = tmp_path / "ship"
    args = ["--data", str(data), "--out", str(out), "--artifacts", str(artifacts)]
    args += ["--train-args", "--arch cnn --size 48 --epochs 1 --threads 1"]
    subprocess.run([sys.executable, str(SHIP), *args], cwd=REPO, check=True, timeout=600)
    assert _digests(artifacts) == before
    record = json.loads((out / "ship.json").read_text())
    assert record["mode"] == "scratch"
    steps = [s["step"] for s in record["steps"]]
    assert steps == [
        f"{stage} {which}"
        for which in ("shipped", "baseline")
        for stage in ("train", "guard fit", "export", "compare")
    ]
    assert all(s["seconds"] >= 0 for s in record["steps"])
    compared = json.loads((out / "compare-shipped.json").read_text())
    assert compared["reference"]["model"] == str(artifacts / "model.onnx")
    assert 0.0 <= compared["rebuilt"]["auc"] <= 1.0
    assert (out / "shipped" / "model.onnx").is_file()


def test_the_scratch_folder_may_not_be_inside_artifacts(tmp_path: Path) -> None:
    args = ["--data", str(tmp_path), "--out", str(tmp_path / "a" / "x")]
    out = subprocess.run(
        [sys.executable, str(SHIP), *args, "--artifacts", str(tmp_path / "a")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "must be elsewhere" in out.stderr
