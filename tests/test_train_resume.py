"""A stopped training run resumes: ``pneumonia train`` on tiny synthetic data, stopped by
SIGINT or SIGKILL at several moments (mid-epoch, mid-write of a checkpoint, between two
files of one epoch, in the second member, during calibration), leaves a readable run folder,
and ``--resume`` then ends with what a run never stopped gives: the same checkpoint choice,
the same weights within float tolerance, the same calibration and threshold.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from pneumonia.preprocess import PreprocessSpec
from pneumonia.training.config import TrainConfig
from pneumonia.training.model import ModelConfig
from pneumonia.training.train import CHECKPOINT, LAST, train

pytestmark = pytest.mark.slow

INTERRUPTED_TRAIN = Path(__file__).with_name("interrupted_train.py")
# 60 training images in batches of 16: 4 batches an epoch, 12 a member, 24 in the run.
CONFIG = TrainConfig(
    preprocess=PreprocessSpec(size=48),
    model=ModelConfig(channels=(4, 8, 16), dropout=0.2),  # dropout draws on torch's global RNG
    seeds=(0, 1),
    epochs=3,
    batch_size=16,
    lr=1e-2,
    val_fraction=0.25,
    threads=1,
)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resume-config") / "config.json"
    CONFIG.save(path)
    return path


@pytest.fixture(scope="module")
def reference(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run, never stopped."""
    run = tmp_path_factory.mktemp("uninterrupted")
    train(CONFIG, synthetic_root, run, progress=False)
    return run


def run_stopped(
    stop_at: str, data: Path, config: Path, run: Path
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(INTERRUPTED_TRAIN), "train", "--data", str(data), "--out", str(run)]
    cmd += ["--config", str(config), "--no-progress"]
    return subprocess.run(
        cmd, env={**os.environ, "STOP_AT": stop_at}, capture_output=True, text=True, timeout=600
    )


def assert_readable(run: Path) -> None:
    """Every file a stopped run left can be read whole (no half-written file but temporaries)."""
    for path in sorted(run.rglob("*")):
        if not path.is_file() or path.name.endswith(".tmp"):
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".pt":
            torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".csv":
            rows = list(csv.reader(path.open(newline="")))
            assert rows[0] == ["path", "label", "logit", "probability"]


def history_without_times(path: Path) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in row.items() if k != "seconds"} for row in json.loads(path.read_text())
    ]


def assert_close(a: Any, b: Any, where: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), (where, a, b)
    else:
        assert a == b, (where, a, b)


def assert_same_result(run: Path, reference: Path) -> None:
    for seed in CONFIG.seeds:
        member, ref = run / f"member-{seed}", reference / f"member-{seed}"
        got = torch.load(member / CHECKPOINT, map_location="cpu", weights_only=True)
        want = torch.load(ref / CHECKPOINT, map_location="cpu", weights_only=True)
        assert got["epoch"] == want["epoch"], f"seed {seed} chose another epoch"
        assert got["state_dict"].keys() == want["state_dict"].keys()
        for k, v in want["state_dict"].items():
            torch.testing.assert_close(got["state_dict"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        assert_close(
            history_without_times(member / "history.json"),
            history_without_times(ref / "history.json"),
            "history",
        )
    got_cal = json.loads((run / "calibration.json").read_text())
    want_cal = json.loads((reference / "calibration.json").read_text())
    assert_close(got_cal, want_cal, "calibration")
    got_rows = list(csv.reader((run / "val_predictions.csv").open(newline="")))
    want_rows = list(csv.reader((reference / "val_predictions.csv").open(newline="")))
    assert [r[:2] for r in got_rows] == [r[:2] for r in want_rows]
    for g, w in zip(got_rows[1:], want_rows[1:], strict=True):
        assert abs(float(g[2]) - float(w[2])) <= 2e-6 and abs(float(g[3]) - float(w[3])) <= 2e-6


# Each: where the run is stopped, and with which signal.
STOPS = {
    "ctrl-c mid-epoch": "batch:6:INT",  # member 0, second batch of epoch 2
    "killed writing last.pt": "write:last.pt:2:KILL",  # member 0, end of epoch 2
    "killed between best.pt and last.pt": "written:best.pt:1:KILL",  # member 0, epoch 1
    "killed in the second member": "batch:19:KILL",  # member 1, epoch 2
    "ctrl-c writing calibration.json": "write:calibration.json:1:INT",  # members done
}
#: The stop resumed with ``pneumonia train --resume RUN_DIR`` (the others call train()).
CLI_RESUMED = "killed in the second member"


@pytest.mark.parametrize("stop", sorted(STOPS))
def test_stopped_run_resumes_to_the_same_result(
    stop: str, synthetic_root: Path, config_file: Path, reference: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    stopped = run_stopped(STOPS[stop], synthetic_root, config_file, run)
    if STOPS[stop].endswith("INT"):
        assert stopped.returncode == 130, stopped.stderr
        assert f"pneumonia train --resume {run}" in stopped.stderr
    else:
        assert stopped.returncode == -signal.SIGKILL, stopped.stderr
    assert not (run / "calibration.json").exists(), "the run was not stopped before its end"
    assert_readable(run)

    if stop == CLI_RESUMED:  # the command, with the data and the config taken from the run
        resumed = subprocess.run(
            [sys.executable, "-m", "pneumonia.cli", "train", "--resume", str(run), "--no-progress"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert resumed.returncode == 0, resumed.stderr
        assert json.loads(resumed.stdout.splitlines()[-1])["run_dir"] == str(run)
    else:
        train(
            TrainConfig.load(run / "config.json"), synthetic_root, run, progress=False, resume=True
        )

    assert_same_result(run, reference)
    assert list(run.rglob("*.tmp")) == [], "a half-written temporary file was left"
    for seed in CONFIG.seeds:
        last = torch.load(run / f"member-{seed}" / LAST, map_location="cpu", weights_only=True)
        assert last["finished"] and last["epoch"] == CONFIG.epochs


def test_resume_refuses_flags_that_change_the_run(tmp_path: Path, config_file: Path) -> None:
    from pneumonia.cli import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(config_file.read_text())
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "9"]) == 2
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert main(["train", "--data", str(tmp_path)]) == 2  # no --out, no --resume


def test_a_finished_run_resumes_to_itself(
    synthetic_root: Path, reference: Path, tmp_path: Path
) -> None:
    """Resuming a run that had finished trains nothing more and rewrites the same result."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    train(TrainConfig.load(run / "config.json"), synthetic_root, run, progress=False, resume=True)
    assert_same_result(run, reference)
