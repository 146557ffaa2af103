"""Data-parallel training (pneumonia.training.distributed): several CPU processes (gloo) under
torchrun train as one process does on the same global batch.

Without BatchNorm (the ``logreg`` network) two processes reach one process's weights within
float tolerance; with it (the tiny CNN) each CPU process normalises its share of the batch with
its own statistics, and the weights stay within the bound docs/training.md states. Only rank 0
writes; a distributed run killed after an epoch resumes to the end of one never stopped; ranks
given other configurations or data, or a batch that does not divide, are refused.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_split
from pneumonia.preprocess import PreprocessSpec
from pneumonia.training.config import TrainConfig
from pneumonia.training.distributed import SINGLE, Dist, from_env, shard
from pneumonia.training.model import ModelConfig
from pneumonia.training.run import CHECKPOINT, LAST, RunFolder
from pneumonia.training.train import train

DDP_TRAIN = Path(__file__).with_name("ddp_train.py")
#: The relative L2 distance between the trained parameters of two CPU processes and of one,
#: for the tiny CNN below (BatchNorm statistics per process); docs/training.md states it.
BATCHNORM_BOUND = 0.15
# 60 training images in global batches of 16: three of 16 (8 a process) and one of 12.
BASE = TrainConfig(
    preprocess=PreprocessSpec(size=32),
    seeds=(0,),
    epochs=3,
    batch_size=16,
    lr=1e-2,
    val_fraction=0.25,
    threads=1,
)
LOGREG = BASE.with_overrides(model=ModelConfig(arch="logreg"))
CNN = BASE.with_overrides(model=ModelConfig(arch="cnn", channels=(4, 8, 16), dropout=0.0))
CNN_DROPOUT = BASE.with_overrides(model=ModelConfig(arch="cnn", channels=(4, 8, 16), dropout=0.2))


def test_one_process_without_torchrun_variables() -> None:
    assert from_env({}) == SINGLE
    assert not SINGLE.active and SINGLE.is_main
    assert from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}) == Dist(2, 4, 0)
    with pytest.raises(ValueError, match="RANK 4 / WORLD_SIZE 4"):
        from_env({"WORLD_SIZE": "4", "RANK": "4"})
    with pytest.raises(ValueError, match="torchrun"):
        from_env({"WORLD_SIZE": "2", "RANK": "x"})


def test_the_shares_of_a_global_batch_cover_it_once() -> None:
    shares = [shard(Dist(r, 3), 11).tolist() for r in range(3)]
    assert sorted(i for s in shares for i in s) == list(range(11))
    assert [len(s) for s in shares] == [4, 4, 3]


def _torchrun(
    cfg: TrainConfig, data: Path, out: Path, tmp: Path, *extra: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """``pneumonia train`` in two gloo processes (tests/ddp_train.py under torchrun)."""
    config = tmp / f"{out.name}-config.json"
    cfg.save(config)
    writes = tmp / f"{out.name}-writes"
    writes.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += [str(DDP_TRAIN), "train", "--no-progress"]
    cmd += ["--resume", str(out)] if "--resume" in extra else []
    if "--resume" not in extra:
        cmd += ["--data", str(data), "--out", str(out), "--config", str(config)]
    cmd += [a for a in extra if a != "--resume"]
    return subprocess.run(
        cmd,
        env={**os.environ, "WRITES_DIR": str(writes), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _params(run: Path, name: str = CHECKPOINT) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "member-0" / name, map_location="cpu", weights_only=True)
    return dict(ckpt["state_dict" if name == CHECKPOINT else "model"])


def _relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    keys = [k for k in a if a[k].is_floating_point() and "running" not in k]
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in keys)
    return float((num / sum(float((a[k] ** 2).sum()) for k in keys)) ** 0.5)


def _probabilities(run: Path) -> list[float]:
    with RunFolder(run).val_predictions.open(newline="") as f:
        return [float(r["probability"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_split(tmp_path_factory.mktemp("ddp-data"), 40, seed=1)


@pytest.mark.slow
def test_two_processes_without_batchnorm_reach_one_process_weights(
    data: Path, tmp_path: Path
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    train(LOGREG, data, one, progress=False)
    config = tmp_path / "config.json"
    LOGREG.save(config)
    cmd = [sys.executable, "-m", "pneumonia.cli", "train", "--nproc", "2", "--no-progress"]
    cmd += ["--data", str(data), "--out", str(two), "--config", str(config)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-8000:]
    want, got = _params(one), _params(two)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    a, b = (json.loads(RunFolder(r).calibration.read_text()) for r in (one, two))
    assert a["members"][0]["best_epoch"] == b["members"][0]["best_epoch"]
    assert b["threshold"] == pytest.approx(a["threshold"], abs=1e-5)
    assert _probabilities(two) == pytest.approx(_probabilities(one), abs=1e-5)


@pytest.mark.slow
def test_with_batchnorm_on_cpus_the_weights_stay_within_the_bound_and_only_rank_0_writes(
    data: Path, tmp_path: Path
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    train(CNN, data, one, progress=False)
    done = _torchrun(CNN, data, two, tmp_path)
    assert done.returncode == 0, done.stderr[-8000:]
    distance = _relative_distance(_params(one, LAST), _params(two, LAST))
    # Not equal (each process's batch statistics), yet within the stated bound.
    assert 1e-4 < distance < BATCHNORM_BOUND
    written = (tmp_path / "two-writes" / "rank-0.txt").read_text().split()
    assert {Path(p).name for p in written} >= {"config.json", "split.json", LAST, CHECKPOINT}
    assert not (tmp_path / "two-writes" / "rank-1.txt").exists(), "rank 1 wrote files"


@pytest.mark.slow
def test_a_distributed_run_killed_after_an_epoch_resumes_to_the_same_end(
    data: Path, tmp_path: Path
) -> None:
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    done = _torchrun(CNN_DROPOUT, data, whole, tmp_path)
    assert done.returncode == 0, done.stderr[-8000:]
    killed = _torchrun(CNN_DROPOUT, data, stopped, tmp_path, STOP_AFTER="1")
    assert killed.returncode != 0
    last = torch.load(stopped / "member-0" / LAST, weights_only=True)
    assert last["epoch"] == 1 and len(last["torch_rng_by_rank"]) == 2
    resumed = _torchrun(CNN_DROPOUT, data, stopped, tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-8000:]
    want, got = _params(whole, LAST), _params(stopped, LAST)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    a, b = (json.loads(RunFolder(r).calibration.read_text()) for r in (whole, stopped))
    assert b["threshold"] == pytest.approx(a["threshold"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["configuration", "split"])
def test_ranks_given_other_configurations_or_data_are_refused(
    what: str, data: Path, tmp_path: Path
) -> None:
    other = {
        "configuration": "--lr 0.5",
        "split": f"--data {make_split(tmp_path / 'other', 40, seed=7)}",
    }[what]
    done = _torchrun(LOGREG, data, tmp_path / "run", tmp_path, RANK1_ARGS=other)
    assert done.returncode != 0
    refused = {"configuration": "training configuration", "split": "training and validation split"}
    assert f"the processes disagree on the {refused[what]}" in done.stderr


@pytest.mark.slow
def test_a_global_batch_that_does_not_divide_among_the_processes_is_refused(
    data: Path, tmp_path: Path
) -> None:
    done = _torchrun(LOGREG.with_overrides(batch_size=15), data, tmp_path / "run", tmp_path)
    assert done.returncode != 0
    assert "batch_size 15 is the global batch" in done.stderr
