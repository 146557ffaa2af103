"""Throughput and memory of `pneumonia score`: one process, the local pool, and Ray.

Builds an input of --images films by repeating the official test set (symlinks in a temp
folder, or a Parquet of bytes with --input parquet; never inside the repository), then runs
`pneumonia score` on it as a user would, once per engine, each as its own subprocess:

- one:  ``--workers 1`` (everything in one process, onnxruntime with one thread);
- pool: the default local engine (one worker process per available CPU);
- ray:  ``--engine ray`` (a local Ray instance started by the command; its startup counts).

For each it reports the wall time of the whole command, the images/s the command itself
measured while scoring (without start-up), and the peak memory of the command's process tree
(Ray's raylet, GCS and workers included), sampled every 0.2 s from /proc: the sum of RSS, and
the sum of PSS, which counts shared pages (Ray's object store) once instead of per process.
It checks that every engine wrote one row per image with the same predictions.

The model is --model, else $MODEL_PATH, else the shipped artifacts/model.onnx. The machine
should be otherwise idle. The README's figures come from::

    .venv/bin/python benchmarks/bench_score.py --images 10000

Prints a Markdown table to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import TreeSampler, logger

REPO = Path(__file__).resolve().parents[1]
SHARED_TEST = REPO.parent / "shared" / "data" / "chest_xray" / "test"
ENGINES = ("one", "pool", "ray")
SAMPLE_INTERVAL_S = 0.2

log = logger("bench_score")


def test_images(data: Path) -> list[Path]:
    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    if not files:
        raise SystemExit(f"no images under {data}; pass --data a folder of JPEG/PNG films")
    return files


def build_folder(files: list[Path], n: int, dest: Path) -> Path:
    """``dest/copyNNNN/<class>/<name>`` symlinks, ``n`` in all."""
    root = dest / "archive"
    for i in range(n):
        src = files[i % len(files)]
        link = root / f"copy{i // len(files):04d}" / src.parent.name / src.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(src)
    return root


def build_parquet(files: list[Path], n: int, dest: Path) -> Path:
    """``dest/archive.parquet`` with columns id (int64) and bytes, written in row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = dest / "archive.parquet"
    blobs = [p.read_bytes() for p in files]
    schema = pa.schema([("id", pa.int64()), ("bytes", pa.binary())])
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, n, 1000):
            ids = list(range(start, min(n, start + 1000)))
            w.write_table(
                pa.table({"id": ids, "bytes": [blobs[i % len(blobs)] for i in ids]}, schema=schema)
            )
    return path


def run_engine(engine: str, src: Path, out: Path, model: Path, batch_size: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pneumonia.cli", "score", str(src), "--out", str(out)]
    cmd += ["--model", str(model), "--batch-size", str(batch_size), "--no-progress"]
    cmd += {"one": ["--workers", "1"], "pool": [], "ray": ["--engine", "ray"]}[engine]
    log(f"{engine}: {' '.join(cmd)}")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mem = TreeSampler(proc.pid, SAMPLE_INTERVAL_S, pss=True)
    mem.start()
    stdout, stderr = proc.communicate()
    wall = time.monotonic() - start
    mem.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{engine} failed ({proc.returncode}):\n{stderr[-3000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {
        "engine": engine,
        "wall_s": wall,
        "summary": summary,
        "rss": mem.peak,
        "pss": mem.peak_pss,
    }


def predictions(out: Path) -> dict[str, tuple[str | None, float | None]]:
    import pyarrow.parquet as pq

    t = pq.read_table(out)
    keys = t.column(0).to_pylist()
    return dict(
        zip(
            keys,
            zip(t["prediction"].to_pylist(), t["p_pneumonia"].to_pylist(), strict=True),
            strict=True,
        )
    )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=10_000, help="films to score (default 10000)")
    ap.add_argument(
        "--model", type=Path, help="exported .onnx (default: $MODEL_PATH, else the shipped model)"
    )
    ap.add_argument("--data", type=Path, default=SHARED_TEST, help="folder of films to repeat")
    ap.add_argument("--input", choices=["folder", "parquet"], default="folder", help="input kind")
    ap.add_argument(
        "--engines", default=",".join(ENGINES), help="comma-separated subset of one,pool,ray"
    )
    ap.add_argument("--batch-size", type=int, default=8, help="as pneumonia score's default")
    ap.add_argument(
        "--workdir", type=Path, help="keep the input and outputs here (default: a temp dir)"
    )
    a = ap.parse_args()

    from pneumonia.predictor import Predictor, available_cpus, default_model_path

    model = a.model or default_model_path()
    if not model.is_file():
        raise SystemExit(f"model {model} does not exist; pass --model an exported .onnx")
    engines = [e for e in a.engines.split(",") if e]
    if unknown := set(engines) - set(ENGINES):
        raise SystemExit(f"unknown engines {sorted(unknown)}; choose from {ENGINES}")
    if "ray" in engines:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise SystemExit(
                "Ray is not installed: pip install '.[ray]', or --engines one,pool"
            ) from None

    load_before = os.getloadavg()[0]
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench_score_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        files = test_images(a.data)
        log(f"building a {a.input} input of {a.images} films from {len(files)} in {a.data}")
        src = (build_parquet if a.input == "parquet" else build_folder)(files, a.images, work)
        results = [run_engine(e, src, work / f"{e}.parquet", model, a.batch_size) for e in engines]
        reference = predictions(work / f"{engines[0]}.parquet")
        for r in results:
            got = predictions(work / f"{r['engine']}.parquet")
            r["rows_ok"] = len(got) == a.images and got.keys() == reference.keys()
            r["same_labels"] = sum(got[k][0] == reference[k][0] for k in reference)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    predictor = Predictor(model, threads=1)
    mib = 1024 * 1024
    print(
        f"`pneumonia score` on {a.images:,} films ({a.input} input, {a.data.name} set repeated), "
        f"model {predictor.name} ({predictor.sha256[:12]}), {available_cpus()} CPUs, "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"load average before: {load_before:.2f}\n"
    )
    print(
        "| engine | workers | wall time (s) | images/s, whole command | images/s, scoring | "
        "peak RSS of tree (MiB) | peak PSS of tree (MiB) | rows / same labels |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        s = r["summary"]
        workers = {
            "one": "1 process",
            "pool": f"{available_cpus()} processes",
            "ray": "Ray actors",
        }[r["engine"]]
        print(
            f"| {r['engine']} | {workers} | {r['wall_s']:.1f} | {a.images / r['wall_s']:.0f} | "
            f"{s['images_per_s']:.0f} | {r['rss'] / mib:.0f} | {r['pss'] / mib:.0f} | "
            f"{s['rows']:,}{'' if r['rows_ok'] else ' (WRONG)'} / {r['same_labels']:,} |"
        )
    return 0 if all(r["rows_ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
