"""Images per model call: time per image and the memory a call size leaves behind (issue 23).

onnxruntime's arena (on in ``predictor.open_session``) keeps the largest call's activations
for the session's life, so the number of images per model call (``Predictor(batch=...)``)
sets both the speed of the offline commands and what a service keeps resident after a batch
upload. For each call size, in a fresh process with the service's malloc setting
(``serve/heap.py``): the median time per image over repeated calls, and the process's
resident memory after them (the arena's size, kept), for one and two intra-op threads.

Usage::

    .venv/bin/python benchmarks/bench_batch.py [--model artifacts/model.onnx] [--sizes 1 2 4 8 16 32]

Prints a Markdown table; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Runs in a fresh process: the service's heap setting, the session, one call size.
_PROBE = r"""
import json, sys, time
import numpy as np
from pneumonia.serve.heap import fix_mmap_threshold
fix_mmap_threshold()
from pneumonia.predictor import INPUT_NAME, Predictor

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

model, threads, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
p = Predictor(model, threads=threads)
x = np.random.default_rng(0).random((n, *p.spec.input_shape), dtype=np.float32)
names, feed = list(p.output_names), {INPUT_NAME: x}
opened = rss_mb()
for _ in range(2):
    p.session.run(names, feed)
times = []
for _ in range(max(3, 48 // n)):
    t0 = time.perf_counter()
    p.session.run(names, feed)
    times.append((time.perf_counter() - t0) / n * 1000)
print(json.dumps({"ms_per_image": sorted(times)[len(times) // 2], "rss_opened_mb": opened,
                  "rss_after_mb": rss_mb()}))
"""


def probe(model: Path, threads: int, n: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(model), str(threads), str(n)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=REPO / "artifacts" / "model.onnx")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per cell (median)")
    a = ap.parse_args(argv)
    rows = [
        "| images per call | threads | ms per image | resident after the calls MB "
        "| more than after opening MB |",
        "|---|---|---|---|---|",
    ]
    for n in a.sizes:
        for t in a.threads:
            got = [probe(a.model, t, n) for _ in range(a.rounds)]
            ms = statistics.median(g["ms_per_image"] for g in got)
            after = statistics.median(g["rss_after_mb"] for g in got)
            kept = statistics.median(g["rss_after_mb"] - g["rss_opened_mb"] for g in got)
            print(f"{n} images, {t} thread(s): {ms:.2f} ms/image, {after:.1f} MB", file=sys.stderr)
            rows.append(f"| {n} | {t} | {ms:.2f} | {after:.1f} | {kept:+.1f} |")
    print("\n".join(rows))
    print(
        f"\nModel: {a.model.name} ({a.model.stat().st_size / 1e6:.2f} MB); fresh process per "
        f"cell, medians of {a.rounds}; load average {os.getloadavg()[0]:.2f} at the end "
        f"({os.cpu_count()} CPUs)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
