"""Does a rebuild on the same machine and code give the same model, and what does the thread
count change? Trains the same tiny run (synthetic films, one epoch) twice with each thread
count, for the v1 CNN and for EfficientNet-Lite0 (the shipped architecture, at 64 px), and
prints the largest weight difference and the calibration of each.

Usage (the figures in docs/model.md, "Reproducibility")::

    .venv/bin/python benchmarks/repro_threads.py --threads 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

# The test suite's synthetic chest films (tests/conftest.py), not a second generator.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_split
from pneumonia.preprocess import PreprocessSpec
from pneumonia.training.config import TrainConfig
from pneumonia.training.model import ModelConfig
from pneumonia.training.run import RunFolder
from pneumonia.training.train import train


def _run(data: Path, out: Path, arch: str, threads: int) -> dict[str, Any]:
    cfg = TrainConfig(
        preprocess=PreprocessSpec(size=64),
        model=ModelConfig(arch=arch),
        epochs=1,
        batch_size=16,
        threads=threads,
    )
    train(cfg, data, out, progress=False)
    run = RunFolder(out)
    cal = json.loads(run.calibration.read_text())
    weights = torch.load(run.checkpoints()[0], weights_only=True)["state_dict"]
    return {"weights": weights, "temperature": cal["temperature"], "threshold": cal["threshold"]}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--archs", nargs="+", default=["cnn", "effnet_lite0"])
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_split(data / "train", 40, seed=1)
        for arch in a.archs:
            runs = {
                (t, k): _run(data, Path(tmp) / f"{arch}-{t}-{k}", arch, t)
                for t in a.threads
                for k in (0, 1)
            }
            base = runs[(a.threads[0], 0)]
            for (t, k), r in runs.items():
                print(
                    json.dumps(
                        {
                            "arch": arch,
                            "threads": t,
                            "rebuild": k,
                            "max_weight_difference": _max_diff(base["weights"], r["weights"]),
                            "temperature": round(r["temperature"], 6),
                            "threshold": round(r["threshold"], 6),
                        }
                    ),
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
