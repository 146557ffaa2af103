"""The frontal-chest check of a model file: outcomes per group of images, and its cost.

For each ``--images`` folder (one sub-folder per group, e.g. ``../shared/data/not_frontal_chest``),
every image is run through the model with refusal turned into a flag, so every outcome is
counted per group. The cost is CPU time per image, one image at a time as ``/predict`` runs
it, of the whole input check (``Predictor.check_inputs``: image rules, feature distances, the
frontal head, the header rule) and of the frontal part alone; numpy on one BLAS thread, as the
container runs it (set ``OPENBLAS_NUM_THREADS`` in front to measure another setting).

Usage::

    .venv/bin/python benchmarks/bench_frontal.py --model artifacts/model.onnx \\
        --images ../shared/data/not_frontal_chest [--json runs/bench_frontal.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy is imported

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pneumonia.data import is_image_file
from pneumonia.frontal import combine, header_reasons
from pneumonia.predictor import Prediction, Predictor
from pneumonia.preprocess import ImageError, Preprocessed


def log(msg: str) -> None:
    print(f"[bench_frontal] {msg}", file=sys.stderr, flush=True)


def cost(predictor: Predictor, prepared: list[Preprocessed], repeats: int = 3) -> dict[str, float]:
    """Best of ``repeats`` CPU ms per image: the whole check, and the frontal part alone."""
    assert predictor.frontal is not None
    x = np.stack([p.input for p in prepared])
    stats = [p.stats for p in prepared]
    out = predictor.scores(x, stats)
    emb, base = out.features, out.checks
    assert emb is not None
    whole = frontal = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        for i in range(len(x)):
            predictor.input_checks(x[i : i + 1], emb[i : i + 1], stats[i : i + 1])
        whole = min(whole, (time.process_time() - t0) / len(x))
        t0 = time.process_time()
        for i in range(len(x)):
            (v,) = predictor.frontal.verdicts(emb[i : i + 1])
            combine(base[i], v, predictor.frontal, header_reasons(stats[i]))
        frontal = min(frontal, (time.process_time() - t0) / len(x))
    return {"check_ms_per_image": whole * 1000, "frontal_ms_per_image": frontal * 1000}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--images", type=Path, nargs="+", required=True)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    predictor = Predictor(a.model, threads=1, refuse=False)
    if predictor.frontal is None:
        raise SystemExit(f"{a.model} carries no frontal-chest check")
    groups: dict[str, Counter[str]] = {}
    prepared: list[Preprocessed] = []
    for root in a.images:
        for path in sorted(p for p in root.glob("*/*") if is_image_file(p)):
            try:
                pre = predictor.prepare(path.read_bytes())
            except ImageError as exc:
                log(f"skipped {path}: {exc.code}")
                continue
            (pred,) = predictor.predict([pre])
            assert isinstance(pred, Prediction) and pred.check is not None
            groups.setdefault(path.parent.name, Counter())[pred.check.outcome] += 1
            prepared.append(pre)
    report: dict[str, Any] = {
        "model": {"path": str(a.model), "sha256": predictor.sha256},
        "groups": {g: dict(c) for g, c in groups.items()},
        "cost": cost(predictor, prepared),
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
    }
    print("| group | images | outcomes |")
    print("|---|---|---|")
    for g, c in groups.items():
        print(
            f"| {g} | {sum(c.values())} | {', '.join(f'{k} {v}' for k, v in sorted(c.items()))} |"
        )
    print(json.dumps(report["cost"]))
    if a.json:
        a.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
