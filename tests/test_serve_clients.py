"""Every client reads its error: a real ``pneumonia serve`` refusing an upload (413 too large,
503 queue full) to Python's urllib, ``requests`` and curl over loopback.

Regression: the service answered 413 before reading the body and closed the connection with
the rest unread; the kernel then reset it, and urllib and ``requests`` (which send the whole
body before reading) got ``ConnectionResetError`` instead of the answer. A full queue was
answered only after the whole upload had been read. Now an early answer goes out at once
and the rest of the body is read and thrown away within DRAIN_MAX_MB / DRAIN_TIMEOUT_S.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests

from benchmarks.common import read_response
from conftest import jpeg_bytes
from serve_util import ServerProcess, running_server

pytestmark = pytest.mark.slow

MIB = 1 << 20
LIMIT_MB = 1  # MAX_UPLOAD_MB of the server under test
DRAIN_MB = 32  # DRAIN_MAX_MB
DRAIN_S = 2.0  # DRAIN_TIMEOUT_S
# Well past what loopback socket buffers absorb (a few MiB each way), so that without the
# drain the server closes on unread bytes and the client is reset; within LIMIT + DRAIN.
OVERSIZE = 24 * MIB
UNDER_LIMIT = 900 * 1024  # fits MAX_UPLOAD_MB: refused only because the queue is full
BOUNDARY = "clients-b0undary"
GATED_SERVE = Path(__file__).with_name("gated_serve.py")


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One inference slot and no queue; jobs wait for ``server.gate`` to exist."""
    tmp = tmp_path_factory.mktemp("clients")
    gate = tmp / "gate"
    gate.touch()
    env = {
        "MAX_UPLOAD_MB": str(LIMIT_MB),
        "DRAIN_MAX_MB": str(DRAIN_MB),
        "DRAIN_TIMEOUT_S": str(DRAIN_S),
        "MAX_CONCURRENCY": "1",
        "QUEUE_SIZE": "0",
        "INFERENCE_THREADS": "1",
        "GATE_FILE": str(gate),
    }
    with running_server(tiny_model, tmp, command=[sys.executable, str(GATED_SERVE)], **env) as srv:
        srv.gate = gate  # type: ignore[attr-defined]
        yield srv


def inference_jobs(server: ServerProcess) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    line = next(x for x in text.splitlines() if x.startswith("pneumonia_inference_jobs "))
    return float(line.split()[1])


@contextlib.contextmanager
def slot_held(server: ServerProcess) -> Iterator[None]:
    """The one inference slot taken by a request whose job waits for the gate."""
    gate: Path = server.gate  # type: ignore[attr-defined]
    gate.unlink()
    answers: list[int] = []

    def occupy() -> None:
        resp = httpx.post(
            server.url + "/predict", files={"file": ("x.jpeg", jpeg_bytes())}, timeout=60
        )
        answers.append(resp.status_code)

    holder = threading.Thread(target=occupy)
    holder.start()
    try:
        deadline = time.monotonic() + 30
        while inference_jobs(server) < 1:
            assert time.monotonic() < deadline, "the holding request never took the slot"
            time.sleep(0.05)
        yield
    finally:
        gate.touch()
        holder.join(timeout=60)
    assert answers == [200]


def multipart(data: bytes, field: str = "file", filename: str = "big.png") -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


Answer = tuple[int, dict[str, str], dict[str, Any]]


def with_urllib(url: str, field: str, data: bytes) -> Answer:
    req = urllib.request.Request(
        url,
        data=multipart(data, field),
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), json.loads(err.read())


def with_requests(url: str, field: str, data: bytes) -> Answer:
    # As in the README's Python example.
    resp = requests.post(url, files={field: ("big.png", data)}, timeout=60)
    return resp.status_code, dict(resp.headers), resp.json()


def with_curl(url: str, field: str, data: bytes, expect_100: bool = True) -> Answer:
    """curl -F; for a body this large it sends ``Expect: 100-continue`` unless told not to."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.png"
        path.write_bytes(data)
        cmd = [curl, "-sS", "-D", "-", "-F", f"{field}=@{path}", url]
        if not expect_100:
            cmd[1:1] = ["-H", "Expect:"]
        out = subprocess.run(cmd, capture_output=True, timeout=60, check=True).stdout
    # Skip any "100 Continue" block: the last header block is the answer.
    *blocks, body = out.split(b"\r\n\r\n")
    status_line, *header_lines = blocks[-1].decode().split("\r\n")
    headers = dict(h.split(": ", 1) for h in header_lines)
    return int(status_line.split()[1]), headers, json.loads(body)


def with_curl_no_expect(url: str, field: str, data: bytes) -> Answer:
    """curl -H "Expect:" sends the body at once, as urllib does."""
    return with_curl(url, field, data, expect_100=False)


CLIENTS: dict[str, Callable[[str, str, bytes], Answer]] = {
    "urllib": with_urllib,
    "requests": with_requests,
    "curl": with_curl,
    "curl-no-expect": with_curl_no_expect,
}


def header(headers: dict[str, str], name: str) -> str | None:
    return next((v for k, v in headers.items() if k.lower() == name.lower()), None)


def assert_healthy(server: ServerProcess) -> None:
    assert server.proc.poll() is None
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    resp = httpx.post(server.url + "/predict", files={"file": ("x.jpeg", jpeg_bytes())}, timeout=30)
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_oversize_upload_is_read_as_413(server: ServerProcess, client: str) -> None:
    status, headers, body = CLIENTS[client](server.url + "/predict", "file", bytes(OVERSIZE))
    assert status == 413
    assert body["error"]["code"] == "payload_too_large"
    assert f"{LIMIT_MB:g} MiB" in body["error"]["message"]
    assert header(headers, "connection") == "close"
    assert_healthy(server)


@pytest.mark.parametrize("client", sorted(CLIENTS))
@pytest.mark.parametrize(("route", "field"), [("/predict", "file"), ("/predict/batch", "files")])
def test_full_queue_is_read_as_503_with_retry_after(
    server: ServerProcess, client: str, route: str, field: str
) -> None:
    with slot_held(server):
        status, headers, body = CLIENTS[client](server.url + route, field, bytes(UNDER_LIMIT))
    assert status == 503
    assert body["error"]["code"] == "queue_full"
    retry = header(headers, "retry-after")
    assert retry is not None and retry.isdigit() and int(retry) >= 1
    assert_healthy(server)


# --- raw sockets: when the answer comes, and the bounds of the drain --------------------------


def request_head(content_length: int | None, path: str = "/predict") -> bytes:
    length = (
        f"Content-Length: {content_length}\r\n"
        if content_length is not None
        else "Transfer-Encoding: chunked\r\n"
    )
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n{length}\r\n"
    ).encode()


def seconds_until_closed(sock: socket.socket, limit_s: float) -> float:
    """Seconds until the server closes ``sock`` (EOF or reset), reading and dropping data."""
    t0 = time.monotonic()
    sock.settimeout(limit_s)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, TimeoutError):
        pass
    return time.monotonic() - t0


def test_answers_to_bodies_read_in_full_keep_the_connection(server: ServerProcess) -> None:
    """Only an early answer closes the connection: keep-alive is untouched otherwise."""
    body = multipart(jpeg_bytes(), filename="x.jpeg")
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        for _ in range(2):
            sock.sendall(request_head(len(body)) + body)
            head, payload = read_response(sock)
            assert head.startswith(b"HTTP/1.1 200"), head
            assert b"connection: close" not in head.lower()
            assert json.loads(payload)["filename"] == "x.jpeg"
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head, _ = read_response(sock)
        assert head.startswith(b"HTTP/1.1 200"), head


def test_full_queue_answers_before_the_upload_is_sent(server: ServerProcess) -> None:
    """The 503 comes as soon as the headers are in: here no byte of the body is ever sent."""
    with slot_held(server):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        try:
            t0 = time.monotonic()
            sock.sendall(request_head(UNDER_LIMIT))
            head, body = read_response(sock)
            took = time.monotonic() - t0
        finally:
            sock.close()
    assert head.startswith(b"HTTP/1.1 503"), head
    assert json.loads(body)["error"]["code"] == "queue_full"
    assert b"retry-after: " in head.lower()
    assert took < 2, f"503 after {took:.2f} s"


def test_body_declared_past_the_drain_bound_is_not_read(server: ServerProcess) -> None:
    """Past LIMIT + DRAIN the server answers 413 and closes at once, without reading."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        sock.sendall(request_head((LIMIT_MB + DRAIN_MB) * MIB + 1))
        head, body = read_response(sock)
        assert head.startswith(b"HTTP/1.1 413"), head
        assert json.loads(body)["error"]["code"] == "payload_too_large"
        assert seconds_until_closed(sock, 5) < 1
    finally:
        sock.close()
    assert_healthy(server)


def test_drain_stops_after_drain_timeout(server: ServerProcess) -> None:
    """A client that stops sending after the answer is cut off DRAIN_TIMEOUT_S later."""
    total = 4 * MIB
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        sock.sendall(request_head(total) + multipart(bytes(2 * MIB))[: 2 * MIB])
        head, _ = read_response(sock)
        assert head.startswith(b"HTTP/1.1 413"), head
        waited = seconds_until_closed(sock, DRAIN_S + 10)
    finally:
        sock.close()
    assert DRAIN_S - 0.5 < waited < DRAIN_S + 3, waited
    assert_healthy(server)


def test_endless_chunked_body_is_drained_up_to_the_bound_then_closed(
    server: ServerProcess,
) -> None:
    """A client that never stops sending: read past the limit only up to DRAIN_MAX_MB."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    frame = b"%x\r\n%s\r\n" % (1 << 16, bytes(1 << 16))
    sent = 0
    try:
        sock.sendall(request_head(None))
        deadline = time.monotonic() + 30
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while time.monotonic() < deadline:  # ignores the answer, as a broken client would
                sock.sendall(frame)
                sent += len(frame)
    finally:
        sock.close()
    assert time.monotonic() < deadline, "the server never closed the connection"
    # Read: the limit, then the drain bound; unread: at most the socket buffers (a few MiB).
    assert (LIMIT_MB + DRAIN_MB) * MIB < sent < (LIMIT_MB + DRAIN_MB + 24) * MIB, sent / MIB
    assert_healthy(server)


def test_no_unhandled_error_was_logged(server: ServerProcess) -> None:
    records = [json.loads(x) for x in server.stderr().splitlines() if x.startswith("{")]
    assert [r for r in records if r["level"] in ("ERROR", "CRITICAL")] == []
    assert all(r["status"] < 500 or r["status"] == 503 for r in records if "status" in r)
