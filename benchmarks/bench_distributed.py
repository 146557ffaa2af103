"""Data-parallel training on one machine: ``pneumonia train --nproc N`` for N = 1 and 2.

Runs the real command (the default configuration unless ``--arch``) for ``--epochs`` epochs
over ``--max-images`` training films, once per process count, and samples every 0.2 s the
memory of the whole process tree from /proc: the summed PSS (proportional set size: a page
shared by two processes counts half in each, so the memory-mapped training set counts once)
and the summed RSS (counting shared pages in every process). Reported per process count: the
peak of each and the median PSS over the run, the float32 size of the training set, the
seconds of the last epoch (rank 0's history.json) and training images per second over it.

Usage (the figures in docs/training.md, "Several processes, machines and GPUs")::

    .venv/bin/python benchmarks/bench_distributed.py --data ../shared/data/chest_xray \\
        --max-images 400 --epochs 2 --json runs/bench_distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pneumonia.training.config import TrainConfig
from pneumonia.training.run import RunFolder


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _memory_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in KiB; zeros if it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    values = {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines()[1:]}
    return values.get("Pss", 0), values.get("Rss", 0)


def _input_floats(run: Path) -> int:
    cfg = TrainConfig.load(RunFolder(run).config)
    c, h, w = cfg.preprocess.input_shape
    return c * h * w


def run(nproc: int, a: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pneumonia.cli", "train", "--data", str(a.data)]
    cmd += ["--out", str(out), "--nproc", str(nproc), "--epochs", str(a.epochs)]
    cmd += ["--max-images", str(a.max_images), "--no-progress", "--device", "cpu"]
    cmd += ["--threads", str(a.threads // nproc or 1)]
    if a.arch:
        cmd += ["--arch", a.arch]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_pss = peak_rss = 0
    pss: list[int] = []
    while proc.poll() is None:
        mem = [_memory_kib(p) for p in _tree(proc.pid)]
        pss.append(sum(m[0] for m in mem))
        peak_pss = max(peak_pss, pss[-1])
        peak_rss = max(peak_rss, sum(m[1] for m in mem))
        time.sleep(0.2)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"--nproc {nproc} failed:\n{err[-3000:]}")
    member = RunFolder(out).members()[0]
    last = json.loads((member / "history.json").read_text())[-1]
    n_train = sum(RunFolder(out).read_data()["train"].values())
    return {
        "nproc": nproc,
        "threads_per_process": a.threads // nproc or 1,
        "train_images": n_train,
        "train_set_float32_mib": round(n_train * _input_floats(out) * 4 / 2**20),
        "peak_pss_mib": round(peak_pss / 1024),
        "median_pss_mib": round(sorted(pss)[len(pss) // 2] / 1024) if pss else 0,
        "peak_rss_mib": round(peak_rss / 1024),
        "last_epoch_s": last["seconds"],
        "images_per_s": round(n_train / last["seconds"], 1),
        "wall_s": round(time.time() - t0, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--max-images", type=int, default=400)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="split among ranks")
    p.add_argument("--arch", help="default: the default configuration's")
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.nproc:
            rows.append(run(n, a, Path(tmp) / f"nproc-{n}"))
            print(json.dumps(rows[-1]))
    record = {"load_average": os.getloadavg(), "cpus": os.cpu_count(), "rows": rows}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
