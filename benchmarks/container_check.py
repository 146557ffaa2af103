"""Build the serving image and prove it on the target box: 0.1 CPU and 256 MB (`make container`).

Steps, each bounded in time:

1. the stand-in base image and podman (../shared/tools/container-base.sh, when present);
2. ``podman build`` of the project's Dockerfile; image size, venv size, and that the venv
   holds neither pip nor matplotlib;
3. test films made by the image itself (it has numpy, Pillow and pydicom; the host needs only
   Python): a 1500x1200 JPEG, a PNG and a DICOM of one film, from the first NORMAL training film
   of ../shared/data/chest_xray when present, else from a synthetic chest-like film;
4. ``podman run --memory 256m --cpus 0.1`` on the host network, bound to 127.0.0.1; the
   cgroup's limits read back; cold start (run to first 200 from ``/health`` and from
   ``/predict``); ``podman healthcheck run`` (the Dockerfile's HEALTHCHECK);
5. films (the shared test films when present, else the made ones; always the PNG and the
   DICOM), a batch with one bad file in it, a heatmap request, and bad inputs, each with its
   exact status and error code;
6. ``/predict`` latency (sequential, one keep-alive connection) and a bounded load
   (--clients clients back to back for --load-s seconds, loopback only): every answer 200;
7. the cgroup's peak memory and OOM-kill count, then ``podman stop``: exit code 0, not
   OOM-killed.

Prints a Markdown table to stdout (progress to stderr), --json writes every figure. The
container and the image are removed at the end, whatever happened (--keep-image keeps the
image). Exits 0 when every check passed, 1 when one failed; when podman cannot run here it
prints how to enable it and exits 0, except in CI (CI=true) or with --require, where it fails.

    python3 benchmarks/container_check.py --json runs/container.json
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import podman_box as box
from common import free_port, percentile

REPO = box.REPO
#: Films the box answers: training films, never the official test split, which is scored once
#: per shipped model and nowhere else (docs/model.md).
SHARED_FILMS = REPO.parent / "shared" / "data" / "chest_xray" / "train"
HOST = "127.0.0.1"
TAG = "container"
UPLOAD_SIZE = (1500, 1200)
MIB = 1024 * 1024
#: The service's default MAX_UPLOAD_MB (settings.py); the 413 check declares a body above it.
MAX_UPLOAD_MIB = 20
LABELS = ("NORMAL", "PNEUMONIA")


def log(msg: str) -> None:
    box.log(TAG, msg)


# ------------------------------------------------------------------ films, made in the image


def make_upload(out: Path, source: Path | None) -> Any:
    """Write big.jpeg, the 1500x1200 upload: ``source`` resized, else the synthetic film.

    Runs inside an image (``container_check.py make-upload``): needs numpy and Pillow.
    """
    import io

    from PIL import Image

    from common import synthetic_film

    if source is not None:
        with Image.open(source) as im:
            gray = im.convert("L").resize(UPLOAD_SIZE, Image.Resampling.BICUBIC)
    else:
        gray = synthetic_film(UPLOAD_SIZE)
    buf = io.BytesIO()
    gray.save(buf, format="JPEG", quality=90)
    (out / "big.jpeg").write_bytes(buf.getvalue())
    return gray


def make_films(out: Path, source: Path | None) -> None:
    """Write big.jpeg (see make_upload), film.png, film.dcm and tiny.png into out.

    Runs inside our image (``container_check.py make-films``), which has numpy, Pillow and
    pydicom, so that the host needs only Python.
    """
    import numpy as np
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    gray = make_upload(out, source)
    small = gray.resize((750, 600), Image.Resampling.BICUBIC)
    small.save(out / "film.png")
    Image.new("L", (16, 16), 128).save(out / "tiny.png")
    # The same film as a 12-bit CR DICOM (12 bits stored in 16, MONOCHROME2).
    pixels = (np.asarray(small, dtype=np.uint16) * 16).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        SecondaryCaptureImageStorage,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(out / "film.dcm", enforce_file_format=True)


def films_from_image(tag: str, out: Path, source: Path | None, command: str = "make-films") -> None:
    """Run make_films (or make_upload) in a throwaway container of the image: no limits, no
    network, this folder mounted read-only, out mounted writable."""
    args = [
        "podman",
        "--runtime",
        "runc",
        "run",
        "--rm",
        "--no-healthcheck",
        "--network",
        "none",
        "--user",
        "0",
    ]
    args += box.host_ulimits()
    args += ["-v", f"{REPO / 'benchmarks'}:/bench:ro", "-v", f"{out}:/out"]
    cmd = ["python", "/bench/container_check.py", command, "/out"]
    if source is not None:
        args += ["-v", f"{source}:/in/{source.name}:ro"]
        cmd.append(f"/in/{source.name}")
    box.run([*args, tag, *cmd], 300)


def shared_films() -> list[Path]:
    """The first two films of each class of ../shared's training folder, when it is there."""
    found: list[Path] = []
    for label in LABELS:
        d = SHARED_FILMS / label
        if d.is_dir():
            found += sorted(d.glob("*.jpeg"))[:2]
    return found


# ----------------------------------------------------------------------------- HTTP


@dataclass
class Part:
    field: str
    filename: str
    data: bytes
    content_type: str = "application/octet-stream"


def multipart(parts: list[Part]) -> tuple[bytes, str]:
    boundary = "check" + uuid.uuid4().hex
    chunks = []
    for p in parts:
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{p.field}"; '
            f'filename="{p.filename}"\r\nContent-Type: {p.content_type}\r\n\r\n'.encode()
        )
        chunks += [p.data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


class Client:
    """One keep-alive connection to the container on 127.0.0.1."""

    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.port = port
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, body: bytes | None = None, ctype: str | None = None
    ) -> tuple[int, bytes]:
        for attempt in (0, 1):  # one reconnect if the server closed a kept-alive socket
            if self.conn is None:
                self.conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
            try:
                headers = {"Content-Type": ctype} if ctype else {}
                self.conn.request(method, path, body=body, headers=headers)
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

    def post(self, path: str, parts: list[Part]) -> tuple[int, bytes]:
        body, ctype = multipart(parts)
        return self.request("POST", path, body, ctype)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def declared_too_large(port: int) -> tuple[int, bytes]:
    """POST /predict declaring a body over MAX_UPLOAD_MB, sending only its first 64 KiB.

    The service refuses a declared Content-Length over the limit before reading the body, so
    a real oversized upload would only make the client block on a socket nobody reads.
    """
    declared = (MAX_UPLOAD_MIB + 1) * MIB
    head = (
        f"POST /predict HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Length: {declared}\r\n"
        "Content-Type: multipart/form-data; boundary=x\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((HOST, port), timeout=30) as s:
        s.sendall(head + b"\0" * 65536)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def error_code(payload: bytes) -> str | None:
    try:
        err = json.loads(payload).get("error")
    except (ValueError, AttributeError):
        return None
    return err.get("code") if isinstance(err, dict) else None


def check_prediction(name: str, status: int, payload: bytes) -> dict[str, Any]:
    if status != 200:
        raise box.CheckFailed(f"{name}: expected 200, got {status}: {payload[:300]!r}")
    body: dict[str, Any] = json.loads(payload)
    if body.get("prediction") not in LABELS or not 0.0 <= body.get("probability", -1) <= 1.0:
        raise box.CheckFailed(f"{name}: not a prediction: {payload[:300]!r}")
    return body


# ------------------------------------------------------------------------------ the check


@dataclass
class Result:
    figures: dict[str, Any] = field(default_factory=dict)
    checks: list[tuple[str, str]] = field(default_factory=list)

    def ok(self, what: str, seen: str) -> None:
        self.checks.append((what, seen))
        log(f"ok: {what}: {seen}")


def wait_until(port: int, name: str, path: str, deadline_s: float, t0: float) -> float:
    """Poll GET path until 200; the seconds since t0. Fails if the container stops."""
    client = Client(port, timeout=10)
    last_state = 0.0
    while True:
        try:
            status, _ = client.request("GET", path)
            if status == 200:
                return time.monotonic() - t0
        except OSError:
            client.close()
        now = time.monotonic()
        if now - last_state > 2:
            last_state = now
            st = box.state(name)
            if not st.get("Running"):
                raise box.CheckFailed(
                    f"the container stopped before {path} answered: {st}\n{box.logs(name)}"
                )
        if now - t0 > deadline_s:
            raise box.CheckFailed(f"no 200 from {path} in {deadline_s:.0f} s\n{box.logs(name)}")
        time.sleep(0.2)


def first_prediction(port: int, film: bytes, t0: float, deadline_s: float, name: str) -> float:
    """Seconds from t0 to the first 200 from /predict (polled every 0.2 s)."""
    wait_until(port, name, "/health", deadline_s, t0)
    client = Client(port, timeout=60)
    while True:
        status, payload = client.post("/predict", [Part("file", "film", film)])
        if status == 200:
            return time.monotonic() - t0
        if status != 503 or time.monotonic() - t0 > deadline_s:  # 503 not_ready: warming up
            raise box.CheckFailed(f"first /predict: {status} {payload[:300]!r}")
        time.sleep(0.2)


def check_inputs(port: int, films: dict[str, bytes], made: Path, res: Result) -> None:
    """Films, a batch, a heatmap and bad inputs, each with its exact status and code."""
    client = Client(port)
    labels = {}
    for name, data in films.items():
        status, payload = client.post("/predict", [Part("file", name, data)])
        body = check_prediction(name, status, payload)
        labels[name] = body["prediction"]
    res.ok(f"{len(films)} films, 200 each", ", ".join(f"{n}: {v}" for n, v in labels.items()))

    batch = [Part("files", n, d) for n, d in films.items()] + [
        Part("files", "notes.txt", b"not an image, just text\n", "text/plain")
    ]
    status, payload = client.post("/predict/batch", batch)
    if status != 200:
        raise box.CheckFailed(f"batch: expected 200, got {status}: {payload[:300]!r}")
    results = json.loads(payload)["results"]
    got = [r.get("prediction") or r["error"]["code"] for r in results]
    want = [labels[n] for n in films] + ["unsupported_format"]
    if got != want:
        raise box.CheckFailed(f"batch: expected {want}, got {got}")
    res.ok(f"batch of {len(batch)} (one not an image)", f"200, per file {got}")

    big = (made / "big.jpeg").read_bytes()
    status, payload = client.post("/predict?heatmap=true", [Part("file", "big.jpeg", big)])
    body = check_prediction("heatmap", status, payload)
    png = base64.b64decode(body.get("heatmap_png", ""))
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise box.CheckFailed(f"heatmap: no PNG in heatmap_png ({len(png)} bytes)")
    res.ok("heatmap=true", f"200, heatmap_png {len(png):,} bytes PNG")

    bad: list[tuple[str, tuple[int, bytes], int, str]] = [
        ("empty file", client.post("/predict", [Part("file", "e.jpeg", b"")]), 400, "empty_file"),
        (
            "text file",
            client.post("/predict", [Part("file", "a.txt", b"hello\n")]),
            415,
            "unsupported_format",
        ),
        (
            "truncated JPEG",
            client.post("/predict", [Part("file", "t.jpeg", big[: len(big) // 3])]),
            422,
            "corrupt_image",
        ),
        (
            "16x16 PNG",
            client.post("/predict", [Part("file", "s.png", (made / "tiny.png").read_bytes())]),
            422,
            "image_too_small",
        ),
        (
            "wrong field name",
            client.post("/predict", [Part("image", "b.jpeg", big)]),
            400,
            "missing_file",
        ),
        (
            "JSON body",
            client.request("POST", "/predict", b'{"file": "x"}', "application/json"),
            400,
            "missing_file",
        ),
        (
            "heatmap=maybe",
            client.post("/predict?heatmap=maybe", [Part("file", "b.jpeg", big)]),
            422,
            "validation_error",
        ),
        ("unknown route", client.request("GET", "/nope"), 404, "not_found"),
        (
            f"declared {MAX_UPLOAD_MIB + 1} MiB body",
            declared_too_large(port),
            413,
            "payload_too_large",
        ),
    ]
    for what, (status, payload), want_status, want_code in bad:
        code = error_code(payload)
        if (status, code) != (want_status, want_code):
            raise box.CheckFailed(
                f"{what}: expected {want_status} {want_code}, got {status} {code}: {payload[:300]!r}"
            )
        res.ok(what, f"{status} {code}")
    client.close()


def sequential(port: int, big: bytes, n: int) -> tuple[list[float], list[float]]:
    """n /predict of the 1500x1200 JPEG on one connection: wall ms and the service's own ms."""
    client = Client(port)
    body, ctype = multipart([Part("file", "big.jpeg", big, "image/jpeg")])
    wall, server = [], []
    for i in range(n):
        t = time.perf_counter()
        status, payload = client.request("POST", "/predict", body, ctype)
        wall.append((time.perf_counter() - t) * 1000)
        check_prediction(f"sequential #{i}", status, payload)
        server.append(float(json.loads(payload)["processing_ms"]))
    client.close()
    return wall, server


def load(port: int, big: bytes, clients: int, seconds: float) -> dict[str, Any]:
    """clients threads POST back to back for seconds; every answer must be 200."""
    body, ctype = multipart([Part("file", "big.jpeg", big, "image/jpeg")])
    stop_at = time.monotonic() + seconds
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: dict[str, int] = {}

    def worker() -> None:
        client = Client(port)
        while time.monotonic() < stop_at:
            t = time.perf_counter()
            try:
                status, _ = client.request("POST", "/predict", body, ctype)
                key = str(status)
            except OSError as exc:
                key = type(exc).__name__
                client.close()
            with lock:
                statuses[key] = statuses.get(key, 0) + 1
                if key == "200":
                    latencies.append((time.perf_counter() - t) * 1000)
        client.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 120)
    elapsed = time.monotonic() - t0
    ok = statuses.get("200", 0)
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "statuses": statuses,
        "throughput_rps": round(ok / elapsed, 2),
        "p50_ms": round(percentile(latencies, 50), 1),
        "p95_ms": round(percentile(latencies, 95), 1),
    }


def venv_report(tag: str) -> dict[str, Any]:
    """Sizes inside the image: the venv, its largest packages; whether pip/matplotlib are in it."""
    code = (
        "import importlib.util as u, json, os, sys\n"
        "def size(p):\n"
        "    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(p) for f in fs"
        " if not os.path.islink(os.path.join(d, f)))\n"
        "sp = '/opt/venv/lib/python3.11/site-packages'\n"
        "tops = sorted(((size(os.path.join(sp, n)), n) for n in os.listdir(sp)"
        " if os.path.isdir(os.path.join(sp, n))), reverse=True)[:6]\n"
        "print(json.dumps({'venv_bytes': size('/opt/venv'),"
        " 'largest': [[n, b] for b, n in tops],"
        " 'present': [m for m in ('pip', 'setuptools', 'matplotlib', 'fontTools')"
        " if u.find_spec(m)]}))\n"
    )
    args = ["podman", "--runtime", "runc", "run", "--rm", "--no-healthcheck", "--network", "none"]
    out = box.run([*args, *box.host_ulimits(), tag, "python", "-c", code], 120).stdout
    parsed: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return parsed


def limits_and_health(name: str, res: Result, prefix: str) -> box.CgroupMemory:
    """The box's limits as the container's cgroup has them, and its health check passing."""
    mem = box.cgroup_memory(name)
    quota = box.cpu_quota(name)
    if mem.limit() != box.MEMORY_BYTES or quota is None or abs(quota - 0.1) > 1e-6:
        raise box.CheckFailed(f"limits not enforced: memory {mem.limit()}, cpu quota {quota}")
    res.ok(
        f"{prefix}limits in the cgroup",
        f"memory {mem.limit() // MIB} MiB, cpu {quota:g} (cgroup v{mem.version})",
    )
    hc = box.run(["podman", "healthcheck", "run", name], 60, check=False)
    if hc.returncode != 0:
        raise box.CheckFailed(f"podman healthcheck run: {hc.returncode} {hc.stdout}{hc.stderr}")
    res.ok(f"{prefix}health check (podman healthcheck run)", "healthy")
    return mem


def stopped_cleanly(
    name: str, mem: box.CgroupMemory, stop: list[str], res: Result, prefix: str
) -> float:
    """Run the stop command; the container must exit 0 and no OOM kill may have happened."""
    oom = mem.oom_kills()
    log(f"{prefix}stopping: {' '.join(stop[-2:])}")
    t = time.monotonic()
    box.run(stop, 120)
    seconds = round(time.monotonic() - t, 2)
    st = box.state(name)
    if st.get("ExitCode") != 0 or st.get("OOMKilled") or oom:
        raise box.CheckFailed(
            f"{prefix}stop: exit code {st.get('ExitCode')}, OOMKilled {st.get('OOMKilled')}, "
            f"oom_kill {oom}\n{box.logs(name)}"
        )
    res.ok(f"{prefix}stop", f"exit code 0 in {seconds} s, no OOM kill")
    return seconds


def compose_check(
    compose: str, res: Result, work: Path, tag: str, project: str, films: dict[str, bytes]
) -> None:
    """docker-compose.yml's `deploy` service, as the file has it (0.1 CPU and 256 MB from
    deploy.resources.limits, its environment, health check and restart policy), run by
    podman-compose on the image just built. An override file gives it that image, a free
    loopback port instead of 8000, and this machine's ulimits; runc as for `podman run`."""
    port = free_port()
    limits = box.ulimits()
    override = work / "compose.override.yml"
    override.write_text(
        "services:\n  deploy:\n"
        f"    image: {tag}\n"
        f'    ports: !override\n      - "{HOST}:{port}:8000"\n'
        "    ulimits:\n" + "".join(f"      {k}: {v}\n" for k, v in limits.items())
    )
    base = [compose, "--podman-args=--runtime runc", "-p", project]
    base += ["-f", str(REPO / "docker-compose.yml"), "-f", str(override)]
    name = f"{project}_deploy_1"
    log(f"compose: {compose} up -d --no-build deploy (project {project})")
    t0 = time.monotonic()
    box.run([*base, "up", "-d", "--no-build", "deploy"], 300)
    f = res.figures
    f["compose_cold_predict_s"] = round(
        first_prediction(port, films[next(iter(films))], t0, 180.0, name), 2
    )
    mem = limits_and_health(name, res, "compose: ")
    client = Client(port)
    for fname, data in films.items():
        check_prediction(f"compose: {fname}", *client.post("/predict", [Part("file", fname, data)]))
    client.close()
    res.ok(f"compose: {len(films)} films", "200 each")
    f["compose_peak_mb"] = round(mem.peak() / box.MB, 1)
    stopped_cleanly(name, mem, [*base, "stop", "deploy"], res, "compose: ")


def check(args: argparse.Namespace, res: Result, work: Path, tag: str, name: str) -> None:
    f = res.figures
    f["build_s"] = round(box.build(REPO, tag, None, args.build_timeout, TAG), 1)
    f["image_mb"] = round(box.image_bytes(tag) / box.MB, 1)
    venv = venv_report(tag)
    f["venv_mb"] = round(venv["venv_bytes"] / box.MB, 1)
    f["venv_largest_mb"] = {n: round(b / box.MB, 1) for n, b in venv["largest"]}
    if venv["present"]:
        raise box.CheckFailed(f"the image's venv still holds {venv['present']}")
    res.ok("venv without pip, setuptools, matplotlib", f"{f['venv_mb']} MB")

    made = work / "made"
    made.mkdir(mode=0o777)
    os.chmod(made, 0o777)
    shared = shared_films()
    films_from_image(tag, made, shared[0] if shared else None)
    big = (made / "big.jpeg").read_bytes()
    films = {p.name: p.read_bytes() for p in shared} or {"synthetic.jpeg": big}
    films["film.png"] = (made / "film.png").read_bytes()
    films["film.dcm"] = (made / "film.dcm").read_bytes()
    f["films"] = "../shared test films" if shared else "synthetic (no ../shared test data)"

    port = free_port()
    t0 = box.run_limited(tag, name, {"PORT": str(port), "HOST": HOST}, TAG)
    f["cold_health_s"] = round(wait_until(port, name, "/health", args.start_timeout, t0), 2)
    f["cold_predict_s"] = round(first_prediction(port, big, t0, args.start_timeout, name), 2)
    mem = limits_and_health(name, res, "")

    check_inputs(port, films, made, res)

    wall, server = sequential(port, big, args.requests)
    f["predict_p50_ms"] = round(statistics.median(wall), 1)
    f["predict_p95_ms"] = round(percentile(wall, 95), 1)
    f["processing_p50_ms"] = round(statistics.median(server), 1)
    res.ok(f"{args.requests} sequential /predict", f"p50 {f['predict_p50_ms']} ms")
    log(f"load: {args.clients} clients for {args.load_s:.0f} s")
    f["load"] = load(port, big, args.clients, args.load_s)
    if set(f["load"]["statuses"]) != {"200"}:
        raise box.CheckFailed(f"load: not every answer was 200: {f['load']['statuses']}")
    res.ok("load", f"{sum(f['load']['statuses'].values())} requests, all 200")

    f["peak_mb"] = round(mem.peak() / box.MB, 1)
    f["rss_end_mb"] = round(mem.stat("total_rss" if mem.version == 1 else "anon") / box.MB, 1)
    f["stop_s"] = stopped_cleanly(name, mem, ["podman", "stop", "-t", "25", name], res, "")

    if args.compose is None:
        f["compose"] = "skipped: podman-compose not found (pip install podman-compose)"
        log(f["compose"])
        return
    project = f"pdcompose{name.rsplit('-', 1)[-1]}"
    try:
        compose_check(args.compose, res, work, tag, project, films)
    finally:
        down = [args.compose, "-p", project, "-f", str(REPO / "docker-compose.yml"), "down"]
        box.run(down, 180, check=False)
    f["compose"] = "passed"


def table(res: Result) -> str:
    f = res.figures
    load_ = f.get("load", {})
    rows = [
        ("Cold start: run to first 200 from /health", f.get("cold_health_s"), "s"),
        ("Cold start: run to first prediction", f.get("cold_predict_s"), "s"),
        ("/predict p50, 1500x1200 JPEG, sequential", f.get("predict_p50_ms"), "ms"),
        ("/predict p95, sequential", f.get("predict_p95_ms"), "ms"),
        ("processing_ms p50 (inside the service)", f.get("processing_p50_ms"), "ms"),
        (
            f"Throughput, {load_.get('clients', '?')} clients for {load_.get('seconds', '?')} s",
            load_.get("throughput_rps"),
            "req/s",
        ),
        (
            "Latency under that load p50 / p95",
            _pair(load_.get("p50_ms"), load_.get("p95_ms")),
            "ms",
        ),
        ("Peak memory (cgroup high-water mark)", f.get("peak_mb"), "MB"),
        (
            "docker-compose.yml `deploy` by podman-compose: first prediction / peak",
            _pair(f.get("compose_cold_predict_s"), f.get("compose_peak_mb")),
            "s / MB",
        ),
        ("Image size", f.get("image_mb"), "MB"),
        ("Venv size (/opt/venv)", f.get("venv_mb"), "MB"),
        ("Build time", f.get("build_s"), "s"),
    ]
    lines = ["| At --memory 256m --cpus 0.1 | Value |", "| --- | --- |"]
    lines += [f"| {what} | {'-' if v is None else v} {unit} |" for what, v, unit in rows]
    return "\n".join(lines)


def _pair(a: Any, b: Any) -> str | None:
    return None if a is None else f"{a} / {b}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write every figure and check here")
    p.add_argument("--requests", type=int, default=30, help="sequential /predict (default 30)")
    p.add_argument("--clients", type=int, default=2, help="load clients (default 2)")
    p.add_argument("--load-s", type=float, default=60.0, help="load seconds (default 60)")
    p.add_argument("--start-timeout", type=float, default=180.0, help="seconds to first answer")
    p.add_argument("--build-timeout", type=float, default=900.0)
    p.add_argument("--base-script", type=Path, default=box.BASE_SCRIPT)
    p.add_argument("--keep-image", action="store_true", help="keep the built image")
    p.add_argument("--require", action="store_true", help="fail, not skip, without podman")
    p.add_argument(
        "--compose",
        default="auto",
        help="podman-compose to run docker-compose.yml's deploy service with after the check; "
        "auto: on PATH or in the repo's .venv; none: skip that part",
    )
    a = p.parse_args(argv)
    if a.compose == "auto":
        found = shutil.which("podman-compose") or REPO / ".venv" / "bin" / "podman-compose"
        a.compose = str(found) if Path(found).is_file() else None
    elif a.compose == "none":
        a.compose = None
    if not (1 <= a.requests <= 1000 and 1 <= a.clients <= 16 and 0 < a.load_s <= 600):
        p.error("--requests 1..1000, --clients 1..16, --load-s up to 600")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["make-films"], ["make-upload"]):  # inside an image: films_from_image
        make = make_films if argv[0] == "make-films" else make_upload
        make(Path(argv[1]), Path(argv[2]) if len(argv) > 2 else None)
        return 0
    args = parse_args(argv)
    try:
        box.ensure_podman(args.base_script, TAG)
    except box.Skip as exc:
        if args.require or box.required():
            print(f"container check FAILED: podman cannot run: {exc}", file=sys.stderr)
            return 1
        print(f"container check SKIPPED: {exc}")
        return 0
    if args.compose is None and (args.require or box.required()):
        print("container check FAILED: podman-compose not found (pip install podman-compose)")
        return 1
    suffix = uuid.uuid4().hex[:8]
    tag, name = f"localhost/pneumonia-detection-check:{suffix}", f"pd-check-{suffix}"
    res = Result()
    error: str | None = None
    with (
        tempfile.TemporaryDirectory(prefix="container-check-") as tmp,
        box.cleanup([name], [tag], args.keep_image),
    ):
        try:
            check(args, res, Path(tmp), tag, name)
        except (box.CheckFailed, OSError, ValueError, KeyError) as exc:
            error = f"{type(exc).__name__}: {exc}"
    res.figures["machine"] = f"{platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()}"
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"figures": res.figures, "checks": res.checks, "error": error}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(table(res))
    if error:
        print(f"\ncontainer check FAILED: {error}")
        return 1
    print(f"\ncontainer check passed: {len(res.checks)} checks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
