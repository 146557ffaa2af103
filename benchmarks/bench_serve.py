"""Speed and memory, side by side: our service vs a re-creation of the original stack.

Starts each server as a subprocess on a free loopback port and, with the same full-size
JPEG upload (about 1500x1200), measures:

- cold start: from ``Popen`` to the first 200 from ``POST /predict`` (polled every 50 ms);
- peak resident memory of the server's process tree, sampled every 50 ms from start to
  stop (and cross-checked with the kernel's own per-process high-water mark, VmHWM);
- sequential latency p50/p95 over N requests on one keep-alive connection;
- throughput with 4 concurrent clients (threads, one connection each) for a fixed time;

then stops the server. Our service is also run pinned to one core (``taskset -c 0``),
which gives the single-core service time and from it the latency implied at 0.1 vCPU.

Ours: ``pneumonia serve`` with MODEL_PATH = --model (default: $MODEL_PATH, else the shipped
artifacts/model.onnx). Original: benchmarks/original_stack/app.py (TensorFlow 2.19 + Keras,
FastAPI, blocking ``model.predict``) run by benchmarks/.venv-original (make it with
benchmarks/setup_original.sh), its 8.4M-parameter CNN built with random weights in a temp
dir at run time.

Everything goes to 127.0.0.1 only; every loop is bounded in count and time. Run it when the
CPU is otherwise idle, e.g.::

    .venv/bin/python benchmarks/bench_serve.py --json runs/bench_serve.json

Prints one Markdown table (ours, original, ratio, target, pass/fail) to stdout; progress
goes to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import io
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    DEFAULT_OURS_CMD,
    HOST,
    MB,
    TreeSampler,
    cpu_seconds,
    free_port,
    logger,
    multipart,
    ours_command,
    percentile,
    process_tree,
    stop_process,
    synthetic_film,
    tail,
)

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
ORIGINAL_APP_DIR = BENCH / "original_stack"
DEFAULT_ORIGINAL_VENV = BENCH / ".venv-original"
SHARED_TEST = REPO.parent / "shared" / "data" / "chest_xray" / "test"
UPLOAD_SIZE = (1500, 1200)  # width, height of the full-size upload
SAMPLE_INTERVAL_S = 0.05
VCPU_FRACTION = 0.1

# Targets from issue 23 (they replace issue 3's 120 MB, 0.5x cold start, 0.2x p50, 5x throughput).
PEAK_MB_LIMIT = 110.0
#: Issue 23's targets: cold start to the first 200 from /predict, p50 and throughput vs the original.
COLD_START_LIMIT_S = 0.5
P50_RATIO_LIMIT = 0.15
THROUGHPUT_RATIO_MIN = 7.0


log = logger("bench")


# ---------------------------------------------------------------------------- HTTP client


@dataclass
class Upload:
    data: bytes
    body: bytes
    content_type: str
    source: str
    size: tuple[int, int]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


class Client:
    """One keep-alive HTTP/1.1 connection that POSTs the upload to /predict."""

    def __init__(self, port: int, timeout: float) -> None:
        self.port = port
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def post(self, up: Upload) -> tuple[int, bytes]:
        for attempt in (0, 1):  # one silent reconnect if the server closed a kept-alive socket
            if self.conn is None:
                self.conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
            try:
                self.conn.request(
                    "POST", "/predict", body=up.body, headers={"Content-Type": up.content_type}
                )
                resp = self.conn.getresponse()
                payload = resp.read()
                if resp.getheader("connection", "").lower() == "close":
                    self.close()
                return resp.status, payload
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def check_ok(status: int, payload: bytes) -> bool:
    if status != 200:
        return False
    try:
        return "prediction" in json.loads(payload)
    except ValueError:
        return False


# ------------------------------------------------------------------------------- servers


@dataclass
class ServerSpec:
    name: str
    cmd: list[str]
    env: dict[str, str]
    cwd: Path
    requests: int
    info: dict[str, Any] = field(default_factory=dict)


class ServerFailed(RuntimeError):
    pass


def wait_first_prediction(
    proc: subprocess.Popen[bytes], port: int, up: Upload, t0: float, timeout: float
) -> float:
    """Seconds from ``t0`` (just before Popen) to the first successful prediction."""
    client = Client(port, timeout=timeout)
    last = "no answer"
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise ServerFailed(
                f"server exited with code {proc.returncode} before its first prediction"
            )
        try:
            status, payload = client.post(up)
            if check_ok(status, payload):
                elapsed = time.perf_counter() - t0
                client.close()
                return elapsed
            last = f"HTTP {status}: {payload[:200]!r}"
        except (ConnectionRefusedError, http.client.HTTPException, OSError) as exc:
            last = type(exc).__name__
            client.close()
        time.sleep(SAMPLE_INTERVAL_S)
    raise ServerFailed(f"no successful prediction within {timeout:.0f} s (last: {last})")


def sequential(port: int, up: Upload, n: int, timeout: float) -> tuple[list[float], int]:
    client = Client(port, timeout=timeout)
    lat, errors = [], 0
    try:
        for _ in range(n):
            t = time.perf_counter()
            status, payload = client.post(up)
            dt = time.perf_counter() - t
            if check_ok(status, payload):
                lat.append(dt)
            else:
                errors += 1
    finally:
        client.close()
    return lat, errors


def concurrent(
    port: int, up: Upload, clients: int, duration: float, max_requests: int, timeout: float
) -> dict[str, Any]:
    """``clients`` threads POST back to back for ``duration`` s (or ``max_requests`` in all)."""
    lock = threading.Lock()
    lat: list[float] = []
    errors = [0]
    issued = [0]
    start = time.perf_counter()
    deadline = start + duration

    def worker() -> None:
        client = Client(port, timeout=timeout)
        try:
            while time.perf_counter() < deadline:
                with lock:
                    if issued[0] >= max_requests:
                        return
                    issued[0] += 1
                t = time.perf_counter()
                try:
                    status, payload = client.post(up)
                    ok = check_ok(status, payload)
                except (http.client.HTTPException, OSError):
                    ok = False
                    client.close()
                dt = time.perf_counter() - t
                with lock:
                    if ok:
                        lat.append(dt)
                    else:
                        errors[0] += 1
        finally:
            client.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:  # a request in flight at the deadline finishes (bounded by its timeout)
        th.join(timeout=duration + timeout + 5)
    elapsed = time.perf_counter() - start
    return {
        "clients": clients,
        "seconds": elapsed,
        "ok": len(lat),
        "errors": errors[0],
        "rps": len(lat) / elapsed if elapsed > 0 else 0.0,
        "p50_ms": percentile(lat, 50) * 1e3,
        "p95_ms": percentile(lat, 95) * 1e3,
    }


def bench_server(
    spec: ServerSpec, up: Upload, args: argparse.Namespace, logdir: Path
) -> dict[str, Any]:
    """Start one server, measure everything, stop it. Returns the measurements."""
    port = free_port()
    cmd = [c.replace("{port}", str(port)) for c in spec.cmd]
    env = {**os.environ, **spec.env, "PORT": str(port), "HOST": HOST}
    logfile = logdir / f"{spec.name.replace(' ', '_')}.log"
    log(f"{spec.name}: starting `{shlex.join(cmd)}` on {HOST}:{port} (log: {logfile})")
    with logfile.open("wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, env=env, cwd=spec.cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    sampler = TreeSampler(proc.pid, SAMPLE_INTERVAL_S)
    sampler.start()
    result: dict[str, Any] = {"name": spec.name, "command": shlex.join(cmd), **spec.info}
    try:
        cold = wait_first_prediction(proc, port, up, t0, args.start_timeout)
        result["cold_start_s"] = cold
        result["rss_after_first_prediction_mb"] = sampler.current() / MB
        log(f"{spec.name}: first prediction after {cold:.2f} s")
        sequential(port, up, args.warmup, args.request_timeout)
        pids = process_tree(proc.pid)
        cpu0, w0 = cpu_seconds(pids), time.perf_counter()
        lat, errors = sequential(port, up, spec.requests, args.request_timeout)
        wall = time.perf_counter() - w0
        cpu = cpu_seconds(process_tree(proc.pid)) - cpu0
        result["sequential"] = {
            "n": spec.requests,
            "ok": len(lat),
            "errors": errors,
            "p50_ms": percentile(lat, 50) * 1e3,
            "p95_ms": percentile(lat, 95) * 1e3,
            "mean_ms": sum(lat) / len(lat) * 1e3 if lat else float("nan"),
            "server_cpu_ms_per_request": cpu / spec.requests * 1e3,
            "server_cpu_utilisation": cpu / wall if wall > 0 else float("nan"),
        }
        s = result["sequential"]
        log(
            f"{spec.name}: sequential n={spec.requests} p50 {s['p50_ms']:.1f} ms "
            f"p95 {s['p95_ms']:.1f} ms, errors {errors}"
        )
        tp = concurrent(
            port, up, args.clients, args.duration, args.max_requests, args.request_timeout
        )
        result["throughput"] = tp
        log(
            f"{spec.name}: {args.clients} clients for {tp['seconds']:.1f} s: "
            f"{tp['rps']:.1f} req/s, errors {tp['errors']}"
        )
    except ServerFailed as exc:
        result["error"] = str(exc)
        log(f"{spec.name}: FAILED: {exc}\n--- last lines of {logfile} ---\n{tail(logfile)}")
    finally:
        sampler.stop()
        stop_process(proc)
    result["peak_rss_sampled_mb"] = sampler.peak / MB
    result["peak_rss_hwm_sum_mb"] = sampler.hwm / MB
    # The sum of per-process high-water marks bounds the tree's true peak from above; the
    # sampled peak bounds it from below. Report the larger: never flatter ourselves.
    peak = max(sampler.peak, sampler.hwm) / MB
    if "error" not in result:  # a server that never served has no meaningful peak
        result["peak_rss_mb"] = peak
    result["rss_samples"] = sampler.samples
    log(f"{spec.name}: peak RSS {peak:.1f} MB ({sampler.samples} samples); stopped")
    return result


# -------------------------------------------------------------------------------- inputs


def make_upload(image: Path | None, workdir: Path) -> Upload:
    """The full-size upload, identical bytes for every server.

    Default: the first NORMAL test image of ../shared/data/chest_xray (sorted by name),
    resized to 1500x1200 with bicubic; without the data, a deterministic synthetic film.
    """
    from PIL import Image

    if image is not None:
        data = image.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            return Upload(data, *multipart(data, image.name), source=str(image), size=im.size)
    candidates = sorted((SHARED_TEST / "NORMAL").glob("*.jpeg")) if SHARED_TEST.is_dir() else []
    if candidates:
        src = candidates[0]
        with Image.open(src) as im:
            gray = im.convert("L").resize(UPLOAD_SIZE, Image.Resampling.BICUBIC)
        source = (
            f"{src.relative_to(REPO.parent)} resized bicubic to {UPLOAD_SIZE[0]}x{UPLOAD_SIZE[1]}"
        )
    else:
        gray = synthetic_film(UPLOAD_SIZE)
        source = f"synthetic {UPLOAD_SIZE[0]}x{UPLOAD_SIZE[1]} film (no ../shared test data)"
    buf = io.BytesIO()
    gray.save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    (workdir / "upload.jpeg").write_bytes(data)
    return Upload(data, *multipart(data, "upload.jpeg"), source=source, size=gray.size)


def build_original_model(python: Path, workdir: Path) -> dict[str, Any]:
    out = workdir / "original_model.h5"
    log(f"original: building the 8.4M-parameter Keras CNN with random weights -> {out}")
    proc = subprocess.run(
        [str(python), str(ORIGINAL_APP_DIR / "build_model.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"bench_serve: building the original model failed:\n{proc.stderr[-2000:]}")
    info: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    log(
        f"original: {info['params']:,} parameters "
        f"(TensorFlow {info['tensorflow']}, Keras {info['keras']})"
    )
    return info


def onnxruntime_version() -> str:
    try:
        import onnxruntime

        return str(onnxruntime.__version__)
    except ImportError:
        return "not installed"


# -------------------------------------------------------------------------------- report


def _fmt(x: float | None, digits: int = 1) -> str:
    return "—" if x is None or x != x else f"{x:,.{digits}f}"


def _get(r: dict[str, Any] | None, *keys: str) -> float | None:
    cur: Any = r
    for k in keys:
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return float(cur)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def report(
    ours: dict[str, Any] | None, orig: dict[str, Any] | None, one: dict[str, Any] | None
) -> tuple[str, list[dict[str, Any]]]:
    """The Markdown table and the list of target checks."""
    rows: list[tuple[str, float | None, float | None, float | None, str, bool | None, int]] = []
    checks: list[dict[str, Any]] = []

    def row(
        label: str,
        key: tuple[str, ...],
        target: str,
        ok: Callable[[float, float | None, float | None], bool | None] | None,
        digits: int = 1,
    ) -> None:
        a, b = _get(ours, *key), _get(orig, *key)
        r = _ratio(a, b)
        passed = ok(a, b, r) if ok is not None and a is not None else None
        rows.append((label, a, b, r, target, passed, digits))
        if ok is not None:
            checks.append(
                {
                    "metric": label,
                    "ours": a,
                    "original": b,
                    "ratio": r,
                    "target": target,
                    "pass": passed,
                }
            )

    row(
        "Cold start: process start to first prediction (s)",
        ("cold_start_s",),
        f"≤ {COLD_START_LIMIT_S} s",
        lambda a, b, r: a <= COLD_START_LIMIT_S,
        2,
    )
    row(
        "Peak resident memory, server process tree (MB)",
        ("peak_rss_mb",),
        f"≤ {PEAK_MB_LIMIT:.0f} MB",
        lambda a, b, r: a <= PEAK_MB_LIMIT,
    )
    row(
        "Resident memory after the first prediction (MB)",
        ("rss_after_first_prediction_mb",),
        "",
        None,
    )
    row(
        "Sequential latency p50 (ms)",
        ("sequential", "p50_ms"),
        f"≤ {P50_RATIO_LIMIT}× original",
        lambda a, b, r: None if r is None else r <= P50_RATIO_LIMIT,
    )
    row("Sequential latency p95 (ms)", ("sequential", "p95_ms"), "", None)
    row("Server CPU time per request (ms)", ("sequential", "server_cpu_ms_per_request"), "", None)
    row(
        f"Throughput, {_client_count(ours, orig)} concurrent clients (req/s)",
        ("throughput", "rps"),
        f"≥ {THROUGHPUT_RATIO_MIN:g}× original",
        lambda a, b, r: None if r is None else r >= THROUGHPUT_RATIO_MIN,
    )

    lines = [
        "| Metric | Ours | Original | Ours ÷ original | Target | Pass |",
        "| --- | ---: | ---: | ---: | --- | :---: |",
    ]
    for label, a, b, r, target, passed, digits in rows:
        mark = (
            "" if not target else ("—" if passed is None else ("✅ pass" if passed else "❌ fail"))
        )
        cells = [label, _fmt(a, digits), _fmt(b, digits), _fmt(r, 2), target, mark]
        lines.append("| " + " | ".join(cells) + " |")
    if one is not None:
        p50 = _get(one, "sequential", "p50_ms")
        cpu = _get(one, "sequential", "server_cpu_ms_per_request")
        implied = p50 / VCPU_FRACTION if p50 is not None else None
        p95 = _get(one, "sequential", "p95_ms")
        ours_only = [
            (
                "Ours on 1 core (`taskset -c 0`): latency p50 / p95 (ms)",
                f"{_fmt(p50)} / {_fmt(p95)}",
            ),
            ("Ours on 1 core: server CPU time per request (ms)", _fmt(cpu)),
            (
                f"Ours on 1 core: throughput, {_client_count(one, None)} clients (req/s)",
                _fmt(_get(one, "throughput", "rps")),
            ),
            (
                "Ours on 1 core: cold start (s) / peak memory (MB)",
                f"{_fmt(_get(one, 'cold_start_s'), 2)} / {_fmt(_get(one, 'peak_rss_mb'))}",
            ),
            (
                f"Implied latency at {VCPU_FRACTION} vCPU (ms) = 1-core p50 ÷ {VCPU_FRACTION}",
                _fmt(implied, 0),
            ),
        ]
        lines += [f"| {label} | {value} | | | | |" for label, value in ours_only]
    return "\n".join(lines), checks


def median_result(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One server's measurements over several runs: the median of every number (a run that
    failed to give a figure is left out of that figure), other values from the first run that
    has them; ``runs`` counts the runs."""
    return {**_median_leaves(runs), "runs": len(runs)}


def _median_leaves(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for r in runs for k in r):  # every key, in first-seen order
        values = [r[key] for r in runs if key in r]
        first = values[0]
        if isinstance(first, dict):
            out[key] = _median_leaves([v for v in values if isinstance(v, dict)])
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            nums = [float(v) for v in values if isinstance(v, (int, float))]
            out[key] = statistics.median(nums)
        else:
            out[key] = first
    return out


def _client_count(*results: dict[str, Any] | None) -> int:
    for r in results:
        n = _get(r, "throughput", "clients")
        if n is not None:
            return int(n)
    return 4


def vcpu_note(one: dict[str, Any]) -> str:
    """Why the single-core p50 divided by 0.1 is the latency at 0.1 vCPU, with the numbers."""
    p50 = _get(one, "sequential", "p50_ms")
    cpu = _get(one, "sequential", "server_cpu_ms_per_request")
    implied = _fmt(p50 / VCPU_FRACTION if p50 is not None else None, 0)
    text = (
        f"Latency at {VCPU_FRACTION} vCPU: a quota of {VCPU_FRACTION} vCPU (CFS: 10 ms of CPU per "
        "100 ms period) lets the service run on one core for a tenth of the wall-clock time, so a "
        f"request that needs S ms of one core takes S / {VCPU_FRACTION} ms of wall time whenever "
        "the quota is the bottleneck (requests back to back, or one longer than the 10 ms "
        f"budget). S is the single-core sequential p50 latency, {_fmt(p50)} ms: with the service "
        "pinned to one core (taskset -c 0) and one request at a time there is no queueing, so "
        "that latency is the service time; it includes the loopback round trip and so overstates "
        f"the CPU needed (the server's own CPU time per request was {_fmt(cpu)} ms). Hence "
        f"{_fmt(p50)} / {VCPU_FRACTION} = {implied} ms. A lone request shorter than the 10 ms "
        "budget that arrives with budget left finishes in about S; one that arrives after the "
        "budget is spent waits up to the rest of the 100 ms period. The predictor sizes its "
        "onnxruntime thread pool from the cgroup quota (one thread below one CPU), so it does "
        "not spend the budget on parallel threads."
    )
    return textwrap.fill(text, width=92)


# ---------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="our ONNX model (default: $MODEL_PATH, else artifacts/model.onnx)",
    )
    p.add_argument(
        "--image",
        type=Path,
        default=None,
        help="send this file instead of the generated 1500x1200 JPEG",
    )
    p.add_argument(
        "--requests", type=int, default=200, help="sequential requests to our service (default 200)"
    )
    p.add_argument(
        "--original-requests",
        type=int,
        default=100,
        help="sequential requests to the original (default 100; it is slow)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="requests after the first prediction, before timing (default 5)",
    )
    p.add_argument(
        "--clients",
        type=int,
        default=4,
        help="concurrent clients for the throughput test (default 4)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=20.0,
        help="seconds of the throughput test per server (default 20)",
    )
    p.add_argument(
        "--max-requests", type=int, default=20_000, help="cap on requests in one throughput test"
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for a first prediction (default 300)",
    )
    p.add_argument(
        "--request-timeout", type=float, default=120.0, help="seconds per request (default 120)"
    )
    p.add_argument(
        "--original-venv",
        type=Path,
        default=DEFAULT_ORIGINAL_VENV,
        help="venv made by setup_original.sh",
    )
    p.add_argument(
        "--ours-cmd",
        default=DEFAULT_OURS_CMD,
        help="command that starts our service; {pneumonia}, {python}, {host}, {port} are filled in "
        f"(default: {DEFAULT_OURS_CMD!r}; PORT, HOST and MODEL_PATH are also set in its "
        "environment)",
    )
    p.add_argument(
        "--skip-original", action="store_true", help="benchmark only our service (no ratios)"
    )
    p.add_argument("--skip-single-core", action="store_true", help="skip the taskset -c 0 run")
    p.add_argument(
        "--runs",
        type=int,
        default=1,
        help="side-by-side runs (every server once per run); the table gives each figure's "
        "median over the runs (default 1)",
    )
    p.add_argument(
        "--json", type=Path, default=None, help="also write every measurement to this JSON file"
    )
    a = p.parse_args(argv)
    for name in ("requests", "original_requests", "clients", "max_requests", "runs"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.duration <= 0 or a.duration > 600:
        p.error("--duration must be in (0, 600] seconds")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = (
        args.model or Path(os.environ.get("MODEL_PATH") or REPO / "artifacts" / "model.onnx")
    ).resolve()
    if not model.is_file():
        raise SystemExit(
            f"bench_serve: our model {model} does not exist; pass --model or set MODEL_PATH"
        )
    orig_python = args.original_venv / "bin" / "python"
    if not args.skip_original and not orig_python.exists():
        raise SystemExit(
            f"bench_serve: {orig_python} not found; "
            "run benchmarks/setup_original.sh first (or pass --skip-original)"
        )
    load = os.getloadavg()
    if load[0] > 0.5:
        log(
            f"warning: load average {load[0]:.2f}: other work is running, "
            "figures will be pessimistic and noisy"
        )

    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        workdir = Path(tmp)
        up = make_upload(args.image, workdir)
        log(
            f"upload: {up.size[0]}x{up.size[1]} JPEG, {len(up.data):,} bytes, "
            f"sha256 {up.sha256[:12]} ({up.source})"
        )
        ours_cmd = ours_command(args.ours_cmd)
        ours_env = {"MODEL_PATH": str(model)}
        ours_info = {"model": str(model), "onnxruntime": onnxruntime_version()}
        specs: list[ServerSpec] = []
        if not args.skip_original:
            info = build_original_model(orig_python, workdir)
            specs.append(
                ServerSpec(
                    "original",
                    [
                        str(orig_python),
                        "-m",
                        "uvicorn",
                        "app:app",
                        "--host",
                        HOST,
                        "--port",
                        "{port}",
                    ],
                    {"MODEL_PATH": info["path"]},
                    ORIGINAL_APP_DIR,
                    args.original_requests,
                    {
                        "params": info["params"],
                        "tensorflow": info["tensorflow"],
                        "keras": info["keras"],
                    },
                )
            )
        specs.append(ServerSpec("ours", ours_cmd, ours_env, REPO, args.requests, ours_info))
        if not args.skip_single_core:
            if shutil.which("taskset"):
                specs.append(
                    ServerSpec(
                        "ours 1 core",
                        ["taskset", "-c", "0", *ours_cmd],
                        ours_env,
                        REPO,
                        args.requests,
                        ours_info,
                    )
                )
            else:
                log("taskset not found: skipping the single-core run")
        runs: list[dict[str, dict[str, Any]]] = []
        for i in range(args.runs):  # each run side by side: every server once, in turn
            if args.runs > 1:
                log(f"run {i + 1} of {args.runs}")
            runs.append({s.name: bench_server(s, up, args, workdir) for s in specs})
        results = (
            runs[0]
            if len(runs) == 1
            else {s.name: median_result([r[s.name] for r in runs]) for s in specs}
        )

    table, checks = report(results.get("ours"), results.get("original"), results.get("ours 1 core"))
    print(
        f"Upload: {up.size[0]}x{up.size[1]} grayscale JPEG, {len(up.data):,} bytes ({up.source})."
    )
    if "original" in results:
        o = results["original"]
        print(
            f"Original: TensorFlow {o.get('tensorflow')} + Keras {o.get('keras')}, "
            f"{o.get('params', 0):,}-parameter CNN, "
            f"{o['sequential']['n'] if 'sequential' in o else '?'} sequential requests."
        )
    print(
        f"Ours: onnxruntime {ours_info['onnxruntime']}, model {model.name}, "
        f"{args.requests} sequential requests. "
        f"Machine: {os.cpu_count()} CPUs, {platform.machine()}, "
        f"load average at start {load[0]:.2f}.\n"
    )
    print(table)
    if "ours 1 core" in results:
        print("\n" + vcpu_note(results["ours 1 core"]))
    failed = [c["metric"] for c in checks if c["pass"] is False]
    errors = {n: r["error"] for n, r in results.items() if "error" in r}
    print(
        f"\nTargets: {sum(c['pass'] is True for c in checks)} pass, {len(failed)} fail, "
        f"{sum(c['pass'] is None for c in checks)} not measured."
    )
    if errors:
        print(f"Errors: {json.dumps(errors)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "command": shlex.join([Path(sys.executable).name, *sys.argv]),
                    "upload": {
                        "width": up.size[0],
                        "height": up.size[1],
                        "bytes": len(up.data),
                        "sha256": up.sha256,
                        "source": up.source,
                    },
                    "machine": {
                        "cpus": os.cpu_count(),
                        "arch": platform.machine(),
                        "loadavg_at_start": load,
                    },
                    "results": results,
                    "runs": runs,
                    "targets": checks,
                },
                indent=1,
            )
            + "\n"
        )
        log(f"wrote {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
