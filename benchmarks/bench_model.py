"""Size and one-image inference time of exported models, one onnxruntime thread each.

    python benchmarks/bench_model.py artifacts/model.onnx runs/v1/model.onnx [--repeats 200]

Prints one JSON line per model: file size, input size, median and p90 of `Predictor.run` on one
preprocessed image (the ONNX session alone: decoding and resizing are measured by
bench_serve.py), and the ratio of each median to the first model's. Run on an idle machine;
the figures in docs/model.md come from this command.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from pneumonia.predictor import INPUT_NAME, Predictor


def time_model(path: Path, repeats: int, warmup: int = 20) -> dict[str, float | int | str]:
    pred = Predictor(path, threads=1)
    x = np.random.default_rng(0).random((1, *pred.spec.input_shape), dtype=np.float32)
    names, feed = list(pred.output_names), {INPUT_NAME: x}
    for _ in range(warmup):  # the model alone: no input check, no calibration
        pred.session.run(names, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pred.session.run(names, feed)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {
        "model": str(path),
        "name": pred.name,
        "bytes": path.stat().st_size,
        "input_size": pred.spec.size,
        "median_ms": round(statistics.median(times), 3),
        "p90_ms": round(times[int(0.9 * (len(times) - 1))], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("models", type=Path, nargs="+", help="ONNX files; ratios are to the first one")
    ap.add_argument("--repeats", type=int, default=200)
    a = ap.parse_args()
    # Interleave rounds so that a busy machine slows every model alike.
    rounds = 5
    per: dict[Path, list[dict[str, float | int | str]]] = {m: [] for m in a.models}
    for _ in range(rounds):
        for m in a.models:
            per[m].append(time_model(m, max(1, a.repeats // rounds)))
    base = None
    for m in a.models:
        rows = per[m]
        row = dict(rows[0])
        row["median_ms"] = round(statistics.median(float(r["median_ms"]) for r in rows), 3)
        row["p90_ms"] = round(statistics.median(float(r["p90_ms"]) for r in rows), 3)
        base = base or float(row["median_ms"])
        row["ratio_to_first"] = round(float(row["median_ms"]) / base, 3)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
