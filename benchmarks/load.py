"""Load, memory and backpressure of `pneumonia serve`, for minutes, on loopback.

Starts ``pneumonia serve`` on a free 127.0.0.1 port (model: --model, else $MODEL_PATH, else
the shipped artifacts/model.onnx) and runs three phases against ``POST /predict`` with real
JPEG uploads (--images, default ../shared/data/chest_xray/test, else synthetic films):

1. load: --clients concurrent clients (one keep-alive connection each) send back to back
   for --duration seconds. The server runs with QUEUE_SIZE = --clients, so every client's
   request fits in MAX_CONCURRENCY + QUEUE_SIZE and none should be refused;
2. burst: waves of --burst-factor x (MAX_CONCURRENCY + QUEUE_SIZE) simultaneous requests
   for --burst-duration seconds. What exceeds the capacity must get a clean 503
   (``queue_full`` or ``queue_timeout``, with ``Retry-After``), and nothing else may fail;
3. recovery: once the queue has drained, --clients clients for --recovery-duration seconds
   must again see no error at all.

Meanwhile the summed RSS of the server's process tree is sampled every second. The report
gives, per phase, the count of answers by status, latency p50/p95/p99 and throughput; for
memory, the start, minimum, maximum and end of the load phase, the least-squares slope over
its second half (MB/min: growth there would be a leak) and the kernel's high-water mark.

Every loop is bounded in time and count, traffic stays on 127.0.0.1 and the server is
stopped at the end (SIGTERM, then SIGKILL). Run it on a quiet CPU, e.g.::

    .venv/bin/python benchmarks/load.py --json runs/load.json

Prints a Markdown summary to stdout (progress to stderr); exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from common import (
    DEFAULT_OURS_CMD,
    HOST,
    MB,
    TreeSampler,
    cpu_seconds,
    free_port,
    hwm_bytes,
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
SHARED_TEST = REPO.parent / "shared" / "data" / "chest_xray" / "test"
#: The 503 codes of a full or slow queue; both must carry Retry-After.
BUSY_CODES = ("queue_full", "queue_timeout")
#: A memory slope over less of the load phase than this is noise, not judged.
MIN_SLOPE_MINUTES = 1.0

log = logger("load")


# -------------------------------------------------------------------------------- uploads


@dataclass(frozen=True)
class Upload:
    name: str
    body: bytes
    content_type: str
    image_bytes: int


def load_uploads(
    folder: Path | None, limit: int, resize: tuple[int, int] | None
) -> tuple[list[Upload], str]:
    """Up to ``limit`` JPEGs spread over ``folder`` (both classes), or synthetic films.

    Returns:
        The uploads, multipart bodies ready to send, and a description of where they came from.
    """
    from PIL import Image

    explicit = folder is not None
    folder = folder if folder is not None else SHARED_TEST
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg"))
    if explicit and not files:
        raise SystemExit(f"load: no .jpeg/.jpg files under {folder}")
    datas: list[tuple[str, bytes]] = []
    if files:
        step = max(1, len(files) // limit)
        datas = [(p.name, p.read_bytes()) for p in files[::step][:limit]]
        source = f"{len(datas)} JPEGs from {folder} (one in {step} of {len(files)})"
    else:
        for i in range(min(limit, 16)):
            side = 256 + 96 * i  # 256 ... 1696 px: a spread of upload sizes
            buf = io.BytesIO()
            synthetic_film((side, side * 5 // 4)).save(buf, format="JPEG", quality=90)
            datas.append((f"synthetic-{i}.jpeg", buf.getvalue()))
        source = f"{len(datas)} synthetic films, 256-1696 px wide (no {folder})"
    if resize is not None:
        resized = []
        for name, data in datas:
            with Image.open(io.BytesIO(data)) as im:
                buf = io.BytesIO()
                im.convert("L").resize(resize, Image.Resampling.BICUBIC).save(
                    buf, format="JPEG", quality=90
                )
            resized.append((name, buf.getvalue()))
        datas = resized
        source += f", resized bicubic to {resize[0]}x{resize[1]}"
    uploads = [Upload(name, *multipart(data, name), len(data)) for name, data in datas]
    return uploads, source


# --------------------------------------------------------------------------------- memory


def memory_summary(samples: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Start, min, max, end of a phase's RSS and the slope of its second half (MB/min)."""
    if not samples:
        return {}
    mbs = [mb for _, mb in samples]
    half = list(samples[len(samples) // 2 :])
    slope = None
    if len(half) >= 3 and half[-1][0] > half[0][0]:
        fit = statistics.linear_regression([t / 60 for t, _ in half], [mb for _, mb in half])
        slope = fit.slope
    return {
        "samples": len(samples),
        "start_mb": mbs[0],
        "min_mb": min(mbs),
        "max_mb": max(mbs),
        "end_mb": mbs[-1],
        "second_half_minutes": (half[-1][0] - half[0][0]) / 60 if half else 0.0,
        "second_half_slope_mb_per_min": slope,
    }


# ------------------------------------------------------------------------------------ HTTP


@dataclass
class Phase:
    """Everything one phase observed."""

    name: str
    concurrency: int
    seconds: float = 0.0
    statuses: Counter[str] = field(default_factory=Counter)
    error_codes: Counter[str] = field(default_factory=Counter)
    ok_latencies: list[float] = field(default_factory=list)
    busy_latencies: list[float] = field(default_factory=list)
    busy_clean: int = 0  # 503 with a busy code and an integer Retry-After >= 1
    busy_unclean: list[str] = field(default_factory=list)
    per_second: Counter[int] = field(default_factory=Counter)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def ok(self) -> int:
        return len(self.ok_latencies)

    def record(
        self, t_start: float, status: str, latency: float, resp: httpx.Response | None
    ) -> None:
        self.statuses[status] += 1
        self.per_second[int(time.monotonic() - t_start)] += 1
        if resp is None:
            return
        body: Any = None
        with contextlib.suppress(ValueError):
            body = resp.json()
        if resp.status_code == 200 and isinstance(body, dict) and "prediction" in body:
            self.ok_latencies.append(latency)
            return
        code = body["error"]["code"] if isinstance(body, dict) and "error" in body else "?"
        self.error_codes[f"{resp.status_code} {code}"] += 1
        if resp.status_code == 503:
            self.busy_latencies.append(latency)
            retry = resp.headers.get("retry-after", "")
            if code in BUSY_CODES and retry.isdigit() and int(retry) >= 1:
                self.busy_clean += 1
            elif len(self.busy_unclean) < 5:
                self.busy_unclean.append(f"code={code} Retry-After={retry!r}")

    def summary(self) -> dict[str, Any]:
        lat = [x * 1e3 for x in self.ok_latencies]
        return {
            "concurrency": self.concurrency,
            "seconds": self.seconds,
            "requests": self.requests,
            "ok": self.ok,
            "statuses": dict(self.statuses),
            "errors_by_code": dict(self.error_codes),
            "throughput_ok_per_s": self.ok / self.seconds if self.seconds else 0.0,
            "p50_ms": percentile(lat, 50),
            "p95_ms": percentile(lat, 95),
            "p99_ms": percentile(lat, 99),
            "max_ms": max(lat) if lat else float("nan"),
            "busy_503_clean": self.busy_clean,
            "busy_503_unclean_examples": self.busy_unclean,
            "busy_503_p50_ms": percentile([x * 1e3 for x in self.busy_latencies], 50),
            "completed_per_second": [self.per_second[i] for i in range(int(self.seconds) + 1)],
        }


class Sender:
    """Round-robin over the uploads; one POST at a time per call."""

    def __init__(self, client: httpx.AsyncClient, uploads: list[Upload]) -> None:
        self.client = client
        self.uploads = uploads
        self.next = 0

    async def post(self, phase: Phase, t_start: float) -> None:
        up = self.uploads[self.next % len(self.uploads)]
        self.next += 1
        t = time.perf_counter()
        try:
            resp = await self.client.post(
                "/predict", content=up.body, headers={"Content-Type": up.content_type}
            )
        except httpx.HTTPError as exc:
            phase.record(t_start, type(exc).__name__, time.perf_counter() - t, None)
            await asyncio.sleep(0.1)  # a dead or refusing server must not make this spin
            return
        phase.record(t_start, str(resp.status_code), time.perf_counter() - t, resp)


def _client(url: str, connections: int, timeout: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout)


async def steady(
    url: str,
    uploads: list[Upload],
    phase: Phase,
    duration: float,
    max_requests: int,
    timeout: float,
) -> Phase:
    """``phase.concurrency`` clients back to back until ``duration`` or ``max_requests``."""
    async with _client(url, phase.concurrency, timeout) as client:
        sender = Sender(client, uploads)
        t_start = time.monotonic()
        deadline = t_start + duration

        async def worker() -> None:
            while time.monotonic() < deadline and phase.requests < max_requests:
                await sender.post(phase, t_start)

        await asyncio.gather(*(worker() for _ in range(phase.concurrency)))
        phase.seconds = time.monotonic() - t_start
    return phase


async def burst(
    url: str, uploads: list[Upload], phase: Phase, duration: float, timeout: float
) -> Phase:
    """Waves of ``phase.concurrency`` simultaneous requests until ``duration`` has passed."""
    async with _client(url, phase.concurrency, timeout) as client:
        sender = Sender(client, uploads)
        t_start = time.monotonic()
        while time.monotonic() - t_start < duration:
            await asyncio.gather(*(sender.post(phase, t_start) for _ in range(phase.concurrency)))
        phase.seconds = time.monotonic() - t_start
    return phase


def metrics(url: str) -> dict[str, float]:
    """``/metrics`` as {sample line without value: value}."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def server_5xx(m: dict[str, float]) -> dict[str, int]:
    """Answers with status >= 500 the server counted in its own /metrics, as "route status"."""
    out: Counter[str] = Counter()
    for key, value in m.items():
        if not key.startswith("pneumonia_http_requests_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', key))
        if labels.get("status", "").startswith("5"):
            out[f"{labels.get('route')} {labels['status']}"] += int(value)
    return dict(out)


def wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"load: the server exited with code {proc.returncode} before /ready")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"load: the server was not ready after {timeout:.0f} s")


def wait_drained(url: str, timeout: float) -> float | None:
    """Seconds until the server reports no inference job running or waiting."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if metrics(url).get("pneumonia_inference_jobs", 1.0) == 0.0:
            return time.monotonic() - t0
        time.sleep(0.1)
    return None


# ----------------------------------------------------------------------------------- report


def _ms(x: float | None) -> str:
    return "—" if x is None or x != x else f"{x:,.0f}"


def _mb(x: float | None, digits: int = 1) -> str:
    return "—" if x is None or x != x else f"{x:,.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    ph = result["phases"]
    mem = result["memory"]
    cpu = result["load_cpu_s"]
    lines = [
        f"Model `{Path(result['model']).name}` (sha256 {result['model_sha256'][:12]}), "
        f"{result['uploads']['description']}, average upload {result['uploads']['avg_kb']:.1f} KB. "
        f"Server: MAX_CONCURRENCY={result['server']['max_concurrency']}, "
        f"QUEUE_SIZE={result['server']['queue_size']} "
        f"(capacity {result['server']['capacity']}). Machine: {result['machine']['cpus']} CPUs, "
        f"load average at start {result['machine']['loadavg_at_start'][0]:.2f}. "
        f"CPU time in the load phase: server {cpu['server']:.0f} s, this load client "
        f"{cpu['load_client']:.0f} s (of {ph['load']['seconds']:.0f} s x {result['machine']['cpus']} CPUs).",
        "",
        "| Phase | Concurrency | Seconds | Requests | 200 | Other answers | Throughput (200/s) "
        "| Latency p50 / p95 / p99 (ms) |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for name in ("load", "burst", "recovery"):
        p = ph.get(name)
        if not p:
            continue
        others = ", ".join(f"{k}: {v}" for k, v in sorted(p["errors_by_code"].items())) or "none"
        exc = {k: v for k, v in p["statuses"].items() if not k.isdigit()}
        if exc:
            others += ", " + ", ".join(f"{k}: {v}" for k, v in sorted(exc.items()))
        if p["busy_503_clean"]:
            others += f" (503 answered in p50 {_mb(p['busy_503_p50_ms'])} ms)"
        lines.append(
            f"| {name} | {p['concurrency']} | {p['seconds']:.0f} | {p['requests']:,} | {p['ok']:,} "
            f"| {others} | {p['throughput_ok_per_s']:.1f} "
            f"| {_ms(p['p50_ms'])} / {_ms(p['p95_ms'])} / {_ms(p['p99_ms'])} |"
        )
    load_mem = mem.get("load", {})
    slope = load_mem.get("second_half_slope_mb_per_min")
    lines += [
        "",
        "| Server memory, RSS of the process tree (MB) | Value |",
        "| --- | ---: |",
        f"| When ready (before any upload) | {_mb(mem.get('ready_mb'))} |",
        f"| Load phase: start / min / max / end | {_mb(load_mem.get('start_mb'))} / "
        f"{_mb(load_mem.get('min_mb'))} / {_mb(load_mem.get('max_mb'))} / "
        f"{_mb(load_mem.get('end_mb'))} |",
        f"| Load phase: slope of the second half ({load_mem.get('second_half_minutes', 0):.1f} min), "
        f"MB/min | {_mb(slope, 2)} |",
        f"| Burst: max / after recovery | {_mb(mem.get('burst', {}).get('max_mb'))} / "
        f"{_mb(mem.get('recovery', {}).get('end_mb'))} |",
        f"| Peak, kernel high-water mark (VmHWM) | {_mb(mem.get('hwm_mb'))} |",
        "",
        "| Check | Result |",
        "| --- | --- |",
    ]
    for check in result["checks"]:
        verdict = {True: "pass", False: "**FAIL**", None: "n/a"}[check["pass"]]
        lines.append(f"| {check['check']} | {verdict}: {check['detail']} |")
    return "\n".join(lines)


def checks(result: dict[str, Any], max_slope: float) -> list[dict[str, Any]]:
    ph, mem = result["phases"], result["memory"]
    out = []

    def add(name: str, ok: bool | None, detail: str) -> None:
        out.append({"check": name, "pass": ok, "detail": detail})

    load = ph["load"]
    add(
        "Load: every request answered 200",
        load["ok"] == load["requests"] and load["requests"] > 0,
        f"{load['requests'] - load['ok']} of {load['requests']:,} were not",
    )
    b = ph.get("burst")
    if b:
        other = {k: v for k, v in b["statuses"].items() if k not in ("200", "503")}
        add(
            "Burst: only 200 or 503, and some 503",
            not other and b["statuses"].get("503", 0) > 0,
            f"503: {b['statuses'].get('503', 0):,}, other: {other or 'none'}",
        )
        unclean = b["statuses"].get("503", 0) - b["busy_503_clean"]
        add(
            "Burst: every 503 is queue_full/queue_timeout with Retry-After",
            unclean == 0,
            f"{unclean} without"
            + (f" (e.g. {b['busy_503_unclean_examples'][0]})" if unclean else ""),
        )
    r = ph.get("recovery")
    if r:
        add(
            "Recovery: every request answered 200 after the burst",
            r["ok"] == r["requests"] and r["requests"] > 0 and result["drain_s"] is not None,
            f"queue drained in {_mb(result['drain_s'], 2)} s; "
            f"{r['requests'] - r['ok']} of {r['requests']:,} not 200",
        )
    fives = {k: v for k, v in result["server_5xx"].items() if not k.endswith(" 503")}
    add(
        "Server: no 5xx other than 503 in its own metrics, no unhandled error in its log",
        not fives and result["server_unhandled_errors"] == 0,
        f"5xx by route and status {result['server_5xx'] or 'none'}, "
        f"{result['server_unhandled_errors']} unhandled errors logged",
    )
    load_mem = mem.get("load", {})
    slope, minutes = (
        load_mem.get("second_half_slope_mb_per_min"),
        load_mem.get("second_half_minutes", 0),
    )
    add(
        f"Memory: no growth in the load phase's second half (slope < {max_slope:g} MB/min)",
        None if minutes < MIN_SLOPE_MINUTES or slope is None else slope < max_slope,
        f"{_mb(slope, 2)} MB/min over {minutes * 60:.0f} s"
        + (
            f" (not judged: under {MIN_SLOPE_MINUTES * 60:.0f} s)"
            if minutes < MIN_SLOPE_MINUTES
            else ""
        ),
    )
    add(
        "Server stopped cleanly on SIGTERM",
        result["server_stopped_cleanly"],
        f"exit code {result['server_exit_code']}, "
        + (
            "shutdown completed" if result["server_stopped_cleanly"] else "no clean shutdown logged"
        ),
    )
    return out


# ------------------------------------------------------------------------------------- main


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    if not (w.isdigit() and h.isdigit()) or int(w) < 1 or int(h) < 1:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 1500x1200, got {text!r}")
    return int(w), int(h)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="ONNX model (default: $MODEL_PATH, else artifacts/model.onnx)",
    )
    p.add_argument(
        "--images",
        type=Path,
        default=None,
        help=f"folder of JPEGs to upload (default: {SHARED_TEST}, else synthetic)",
    )
    p.add_argument(
        "--max-images",
        type=int,
        default=200,
        help="most distinct images kept in memory (default 200)",
    )
    p.add_argument(
        "--resize",
        type=_size,
        default=None,
        help="re-encode every image at WIDTHxHEIGHT first, e.g. 1500x1200",
    )
    p.add_argument(
        "--clients",
        type=int,
        default=16,
        help="concurrent clients in the load and recovery phases (default 16)",
    )
    p.add_argument(
        "--duration", type=float, default=300.0, help="seconds of the load phase (default 300)"
    )
    p.add_argument(
        "--max-requests", type=int, default=1_000_000, help="cap on requests in the load phase"
    )
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="MAX_CONCURRENCY of the server (default: the service's)",
    )
    p.add_argument(
        "--queue-size", type=int, default=None, help="QUEUE_SIZE of the server (default: --clients)"
    )
    p.add_argument(
        "--burst-factor",
        type=float,
        default=3.0,
        help="burst concurrency as a multiple of the capacity (default 3)",
    )
    p.add_argument(
        "--burst-duration", type=float, default=15.0, help="seconds of the burst (default 15)"
    )
    p.add_argument(
        "--recovery-duration",
        type=float,
        default=15.0,
        help="seconds of the recovery phase (default 15)",
    )
    p.add_argument(
        "--sample-interval",
        type=float,
        default=1.0,
        help="seconds between memory samples (default 1)",
    )
    p.add_argument(
        "--max-slope",
        type=float,
        default=1.0,
        help="memory slope (MB/min) above which the check fails (default 1)",
    )
    p.add_argument(
        "--request-timeout", type=float, default=120.0, help="seconds per request (default 120)"
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for /ready (default 120)",
    )
    p.add_argument(
        "--serve-cmd",
        default=DEFAULT_OURS_CMD,
        help=f"command that starts the server (default {DEFAULT_OURS_CMD!r})",
    )
    p.add_argument(
        "--json", type=Path, default=None, help="also write every measurement to this JSON file"
    )
    a = p.parse_args(argv)
    for name in ("max_images", "clients", "max_requests"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("duration", "burst_duration", "recovery_duration"):
        if not 0 <= getattr(a, name) <= 3600:
            p.error(f"--{name.replace('_', '-')} must be in [0, 3600] seconds")
    if a.duration <= 0:
        p.error("--duration must be > 0")
    if a.burst_factor <= 1:
        p.error("--burst-factor must be > 1: the burst has to exceed the capacity")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = (
        args.model or Path(os.environ.get("MODEL_PATH") or REPO / "artifacts" / "model.onnx")
    ).resolve()
    if not model.is_file():
        raise SystemExit(f"load: model {model} does not exist; pass --model or set MODEL_PATH")
    loadavg = os.getloadavg()
    if loadavg[0] > 0.5:
        log(f"warning: load average {loadavg[0]:.2f}: other work is running; figures will be noisy")
    uploads, source = load_uploads(args.images, args.max_images, args.resize)
    avg_kb = sum(u.image_bytes for u in uploads) / len(uploads) / 1e3
    log(f"uploads: {source}, average {avg_kb:.1f} KB")

    port = free_port()
    url = f"http://{HOST}:{port}"
    queue_size = args.queue_size if args.queue_size is not None else args.clients
    env = {
        **os.environ,
        "MODEL_PATH": str(model),
        "HOST": HOST,
        "PORT": str(port),
        "QUEUE_SIZE": str(queue_size),
    }
    if args.max_concurrency is not None:
        env["MAX_CONCURRENCY"] = str(args.max_concurrency)
    cmd = [c.replace("{port}", str(port)) for c in ours_command(args.serve_cmd)]
    result: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "serve_command": shlex.join(cmd),
        "model": str(model),
        "uploads": {"description": source, "count": len(uploads), "avg_kb": avg_kb},
        "machine": {
            "cpus": os.cpu_count(),
            "arch": platform.machine(),
            "loadavg_at_start": loadavg,
        },
        "phases": {},
        "memory": {},
    }
    with tempfile.TemporaryDirectory(prefix="load_") as tmp:
        logfile = Path(tmp) / "serve.log"
        log(f"starting `{shlex.join(cmd)}` on {url} (QUEUE_SIZE={queue_size})")
        with logfile.open("wb") as out:
            proc = subprocess.Popen(
                cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        sampler = TreeSampler(proc.pid, args.sample_interval, keep=True)
        sampler.start()
        try:
            result["ready_s"] = wait_ready(proc, url, args.start_timeout)
            sampler.phase = "ready"
            m = metrics(url)
            info = httpx.get(url + "/model", timeout=10).json()
            result["model_sha256"] = info.get("sha256", "")
            capacity = int(m["pneumonia_inference_capacity"])
            result["server"] = {
                "max_concurrency": capacity - queue_size,
                "queue_size": queue_size,
                "capacity": capacity,
                "pid": proc.pid,
            }
            time.sleep(2 * args.sample_interval)  # a couple of samples at rest
            result["memory"]["ready_mb"] = sampler.current() / MB
            log(
                f"ready after {result['ready_s']:.1f} s, RSS {result['memory']['ready_mb']:.1f} MB, capacity {capacity}"
            )

            asyncio.run(
                steady(url, uploads, Phase("warm-up", args.clients), 3.0, 200, args.request_timeout)
            )
            cpu0, client_cpu0 = cpu_seconds(process_tree(proc.pid)), time.process_time()
            sampler.phase = "load"
            log(f"load: {args.clients} clients for {args.duration:.0f} s")
            load = asyncio.run(
                steady(
                    url,
                    uploads,
                    Phase("load", args.clients),
                    args.duration,
                    args.max_requests,
                    args.request_timeout,
                )
            )
            result["phases"]["load"] = load.summary()
            result["load_cpu_s"] = {
                "server": cpu_seconds(process_tree(proc.pid)) - cpu0,
                "load_client": time.process_time() - client_cpu0,
            }
            log(
                f"load: {load.requests:,} requests, {load.ok:,} ok, "
                f"{load.ok / load.seconds:.1f}/s, statuses {dict(load.statuses)}"
            )

            if args.burst_duration > 0:
                width = max(capacity + 1, round(capacity * args.burst_factor))
                sampler.phase = "burst"
                log(
                    f"burst: waves of {width} simultaneous requests for {args.burst_duration:.0f} s"
                )
                b = asyncio.run(
                    burst(
                        url,
                        uploads,
                        Phase("burst", width),
                        args.burst_duration,
                        args.request_timeout,
                    )
                )
                result["phases"]["burst"] = b.summary()
                log(f"burst: {b.requests:,} requests, statuses {dict(b.statuses)}")
            sampler.phase = "drain"
            result["drain_s"] = wait_drained(url, 60.0)
            if args.recovery_duration > 0:
                sampler.phase = "recovery"
                r = asyncio.run(
                    steady(
                        url,
                        uploads,
                        Phase("recovery", args.clients),
                        args.recovery_duration,
                        args.max_requests,
                        args.request_timeout,
                    )
                )
                result["phases"]["recovery"] = r.summary()
                log(f"recovery: {r.requests:,} requests, statuses {dict(r.statuses)}")
            sampler.phase = "end"
            final = metrics(url)
            result["server_5xx"] = server_5xx(final)
            result["memory"]["hwm_mb"] = sum(hwm_bytes(p) for p in process_tree(proc.pid)) / MB
        finally:
            sampler.stop()
            stop_process(proc)
            result["server_exit_code"] = proc.returncode
            server_log = logfile.read_text(errors="replace")
            result["server_unhandled_errors"] = server_log.count('"message": "unhandled error"')
            result["server_stopped_cleanly"] = proc.returncode == 0 and (
                "Application shutdown complete" in server_log
            )
            if not result["server_stopped_cleanly"] or result["server_unhandled_errors"]:
                log(f"--- last lines of the server log ---\n{tail(logfile, 30)}")
    for phase in ("load", "burst", "recovery"):
        result["memory"][phase] = memory_summary(sampler.of(phase))
    result["memory"]["curve"] = sampler.series
    result["checks"] = checks(result, args.max_slope)
    print(markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        log(f"wrote {args.json}")
    return 1 if any(c["pass"] is False for c in result["checks"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
