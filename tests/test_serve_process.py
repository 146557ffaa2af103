"""The real ``pneumonia serve`` process over loopback HTTP: the original curl example, clean
start-up failures, graceful shutdown on SIGTERM."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import jpeg_bytes
from serve_util import running_server, serve_command

pytestmark = pytest.mark.slow


def test_real_server_answers_over_http(tiny_model: Path, tmp_path: Path) -> None:
    image = tmp_path / "chest_xray.jpeg"
    image.write_bytes(jpeg_bytes(1, 7, size=200))
    with running_server(tiny_model, tmp_path) as server:
        assert httpx.get(server.url + "/health").json() == {"status": "ok"}
        with image.open("rb") as f:
            resp = httpx.post(
                server.url + "/predict", files={"file": ("chest_xray.jpeg", f, "image/jpeg")}
            )
        assert resp.status_code == 200
        body = resp.json()
        assert body["filename"] == "chest_xray.jpeg" and body["prediction"] in (
            "NORMAL",
            "PNEUMONIA",
        )
        assert "pneumonia_http_requests_total" in httpx.get(server.url + "/metrics").text

        if shutil.which("curl"):  # the original README's command, unchanged but for the port
            port = server.url.rsplit(":", 1)[1]
            url = f"http://localhost:{port}/predict"
            out = subprocess.run(
                ["curl", "-s", "-X", "POST", url, "-F", "file=@chest_xray.jpeg"],
                cwd=tmp_path, capture_output=True, text=True, timeout=30, check=True,
            )  # fmt: skip
            curl_body = json.loads(out.stdout)
            assert curl_body["probability"] == body["probability"]
    logs = [json.loads(line) for line in server.stderr().splitlines() if line.startswith("{")]
    assert any(r.get("message") == "request" and r.get("route") == "/predict" for r in logs)


def _request_head(port: int, body_len: int, boundary: str) -> bytes:
    return (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {body_len}\r\nConnection: close\r\n\r\n"
    ).encode()


def test_sigterm_lets_the_request_in_flight_finish(tiny_model: Path, tmp_path: Path) -> None:
    boundary = "b0undary"
    body = (
        f"--{boundary}\r\n".encode()
        + b'Content-Disposition: form-data; name="file"; filename="x.jpeg"\r\n\r\n'
        + jpeg_bytes(0, 3)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    with running_server(tiny_model, tmp_path) as server:
        port = int(server.url.rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        try:
            sock.sendall(_request_head(port, len(body), boundary) + body[:200])
            time.sleep(0.5)  # the server is now reading this request's body
            server.proc.send_signal(signal.SIGTERM)
            # New connections are refused once shutdown has begun...
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    time.sleep(0.1)
                except OSError:
                    break
            else:
                pytest.fail("server still accepts connections 10 s after SIGTERM")
            assert server.proc.poll() is None, "server exited with a request in flight"
            # ...but the one in flight is finished.
            sock.sendall(body[200:])
            response = b""
            while chunk := sock.recv(65536):
                response += chunk
        finally:
            sock.close()
        head, _, payload = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert json.loads(payload)["filename"] == "x.jpeg"
        # Regression: uvicorn re-raises SIGTERM once shut down, and the status read -15.
        assert server.proc.wait(timeout=30) == 0
    messages = [
        json.loads(line).get("message")
        for line in server.stderr().splitlines()
        if line.startswith("{")
    ]
    assert "Application shutdown complete." in messages


@pytest.mark.parametrize("kind", ["missing", "corrupt", "truncated"])
def test_bad_model_stops_start_up_with_one_clear_line(
    tiny_model: Path, tmp_path: Path, kind: str
) -> None:
    model = tmp_path / "model.onnx"
    if kind == "corrupt":
        model.write_bytes(b"this is not an onnx file" * 100)
    elif kind == "truncated":
        model.write_bytes(tiny_model.read_bytes()[:2000])
    out = subprocess.run(
        [*serve_command(), "--model", str(model), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("pneumonia serve: error: model file") and str(model) in lines[0]
