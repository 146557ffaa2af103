"""Resident memory of ``pneumonia serve`` after warm-up: what a source tree costs at serving time.

Starts ``pneumonia serve`` (artifacts/model.onnx unless --model) on a free loopback port with
``PYTHONPATH=<--src>``, waits for /ready, sends --requests uploads of a 1500x1200 JPEG to
/predict and scrapes /metrics once, then reads the server's VmRSS from /proc and stops it.
Repeats --runs times and prints the median and the range, in MiB, as one JSON line.

Written for issue 10 (prometheus-client instead of a hand-written exporter, unless it costs
more than 3 MB): run it on the tree before and after the change, e.g.::

    git worktree add /tmp/before <commit before> && \\
    .venv/bin/python benchmarks/serve_rss.py --src /tmp/before/src && \\
    .venv/bin/python benchmarks/serve_rss.py --src src

Linux only (/proc). Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BOUNDARY = "serve-rss-boundary"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def jpeg(width: int = 1500, height: int = 1200) -> bytes:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    img = 60 + 120 * xx / width + 40 * yy / height + rng.normal(0, 8, (height, width))
    out = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def post_predict(url: str, data: bytes) -> int:
    body = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x.jpeg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    req = urllib.request.Request(
        url + "/predict",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return int(resp.status)


def vm_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def one_run(src: Path, model: Path, requests: int, image: bytes) -> float:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(src), "HOST": "127.0.0.1", "PORT": str(port)}
    env["MODEL_PATH"] = str(model)
    code = "import sys; from pneumonia.cli import main; sys.exit(main(['serve']))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(url + "/ready", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server not ready after 300 s")
            time.sleep(0.2)
        for _ in range(requests):
            assert post_predict(url, image) == 200
        with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
            resp.read()
        time.sleep(0.5)
        return vm_rss_mib(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--src", type=Path, default=REPO / "src", help="source tree to serve from")
    p.add_argument("--model", type=Path, default=REPO / "artifacts" / "model.onnx")
    p.add_argument("--requests", type=int, default=20, help="warm-up uploads per run")
    p.add_argument("--runs", type=int, default=5, help="server starts; the median is reported")
    a = p.parse_args()
    image = jpeg()
    rss = [one_run(a.src.resolve(), a.model, a.requests, image) for _ in range(a.runs)]
    print(
        json.dumps(
            {
                "src": str(a.src),
                "runs": a.runs,
                "requests": a.requests,
                "rss_mib_median": round(statistics.median(rss), 1),
                "rss_mib_min": round(min(rss), 1),
                "rss_mib_max": round(max(rss), 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
