"""Faults around real ``pneumonia serve`` processes: a wrongly shaped model at start-up,
SIGTERM with requests in flight, clients that vanish mid-upload or trickle their body.

(Missing, corrupt and truncated model files are covered in test_serve_process.py.)
"""

from __future__ import annotations

import json
import re
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from benchmarks.common import read_response
from conftest import jpeg_bytes
from pneumonia.card import weights_digest
from pneumonia.predictor import CARD_METADATA_KEY, ModelLoadError, Predictor
from serve_util import ServerProcess, running_server, serve_command, served_statuses

pytestmark = pytest.mark.slow

BOUNDARY = "faults-b0undary"
START_UP_TIMEOUT_S = 60


def card_of(model: Path) -> dict[str, Any]:
    meta = ort.InferenceSession(str(model)).get_modelmeta().custom_metadata_map
    return dict(json.loads(meta[CARD_METADATA_KEY]))


def hand_built_model(
    path: Path,
    card: dict[str, Any] | None,
    *,
    channels: int = 1,
    input_name: str = "image",
    outputs: tuple[str, ...] = ("logit", "cam"),
    logit_rank: int = 1,
    cam_rank: int = 3,
    input_type: int = TensorProto.FLOAT,
) -> Path:
    """A small valid ONNX model built node by node, shaped as asked.

    With the defaults it honours the contract: ``image`` (N, 1, S, S) to ``logit`` (N,) and
    ``cam`` (N, S/16, S/16), where S is the card's input size.
    """
    size = card["preprocess"]["size"] if card else 64
    side = size // 16
    nodes = [
        helper.make_node("Cast", [input_name], ["x"], to=TensorProto.FLOAT),
        helper.make_node("AveragePool", ["x"], ["pooled"], kernel_shape=[16, 16], strides=[16, 16]),
        helper.make_node("ReduceMean", ["pooled"], ["cam3"], axes=[1], keepdims=0),  # (N, s, s)
        helper.make_node("ReduceMean", ["cam3"], ["cam2"], axes=[2], keepdims=0),  # (N, s)
        helper.make_node("ReduceMean", ["cam3"], ["logit1"], axes=[1, 2], keepdims=0),  # (N,)
    ]
    sources = {
        "logit": {1: ("logit1", ["N"]), 2: ("cam2", ["N", side])}[logit_rank],
        "cam": {3: ("cam3", ["N", side, side]), 2: ("cam2", ["N", side])}[cam_rank],
    }
    outs = []
    for name in outputs:
        src, shape = sources[name]
        nodes.append(helper.make_node("Identity", [src], [name]))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    image = helper.make_tensor_value_info(input_name, input_type, ["N", channels, size, size])
    model = helper.make_model(
        helper.make_graph(nodes, "hand-built", [image], outs),
        opset_imports=[helper.make_opsetid("", 13)],
    )
    model.ir_version = 8
    if card is not None:
        if "weights_sha256" in card:  # the card must name these weights (pneumonia.card)
            card = {**card, "weights_sha256": weights_digest(model.SerializeToString())}
        helper.set_model_props(model, {CARD_METADATA_KEY: json.dumps(card)})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# Each: how the model is wrong, and a word the one-line error must contain.
WRONG_MODELS: dict[str, tuple[dict[str, Any], str]] = {
    "three-channel-input": ({"channels": 3}, "takes input"),
    "input-not-named-image": ({"input_name": "pixels"}, "must take 'image'"),
    "only-a-logit-output": ({"outputs": ("logit",)}, "must take 'image'"),
    "outputs-swapped": ({"outputs": ("cam", "logit")}, "must take 'image'"),
    # Regression: these three loaded, and then scored wrongly or failed on every request.
    "logit-(N,s)": ({"logit_rank": 2}, "logit (N,)"),
    "cam-(N,s)": ({"cam_rank": 2}, "cam (N, h, w)"),
    "float64-input": ({"input_type": TensorProto.DOUBLE}, "float32"),
}


def test_the_hand_built_model_loads_when_shaped_right(tiny_model: Path, tmp_path: Path) -> None:
    """The builder itself makes loadable models, so the refusals below are about the shape."""
    model = hand_built_model(tmp_path / "right.onnx", card_of(tiny_model))
    pred = Predictor(model, threads=1)
    result = pred.predict_bytes(jpeg_bytes(1, 3), with_cam=True)
    assert result.label in ("NORMAL", "PNEUMONIA") and result.cam is not None
    assert result.cam.ndim == 2


@pytest.mark.parametrize("kind", sorted(WRONG_MODELS))
def test_wrongly_shaped_model_is_refused_at_load(
    tiny_model: Path, tmp_path: Path, kind: str
) -> None:
    kwargs, words = WRONG_MODELS[kind]
    model = hand_built_model(tmp_path / "wrong.onnx", card_of(tiny_model), **kwargs)
    with pytest.raises(ModelLoadError, match=re.escape(words)):
        Predictor(model, threads=1)


@pytest.mark.parametrize("kind", ["three-channel-input", "logit-(N,s)", "no-model-card"])
def test_wrong_model_stops_start_up_with_one_clear_line(
    tiny_model: Path, tmp_path: Path, kind: str
) -> None:
    model = tmp_path / "model.onnx"
    if kind == "no-model-card":
        hand_built_model(model, None)
    else:
        hand_built_model(model, card_of(tiny_model), **WRONG_MODELS[kind][0])
    out = subprocess.run(
        [*serve_command(), "--model", str(model), "--host", "127.0.0.1", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=START_UP_TIMEOUT_S,
    )
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("pneumonia serve: error: model") and str(model) in lines[0]
    assert "Traceback" not in out.stderr


# --- raw HTTP helpers ----------------------------------------------------------------------


def multipart_head(content_length: int | None, path: str = "/predict") -> bytes:
    """Request line and headers of a multipart upload (chunked when no length is given)."""
    length = (
        f"Content-Length: {content_length}\r\n"
        if content_length is not None
        else "Transfer-Encoding: chunked\r\n"
    )
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n{length}\r\n"
    ).encode()


def multipart_body(data: bytes, filename: str = "x.jpeg") -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n\r\n'.encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def metric(server: ServerProcess, pattern: str) -> float:
    """The value of the first /metrics sample line matching ``pattern`` (0 if none)."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    match = re.search(rf"^{pattern} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def wait_for(condition: Any, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def assert_no_unhandled_errors(server: ServerProcess) -> None:
    records = [json.loads(line) for line in server.stderr().splitlines() if line.startswith("{")]
    assert [r for r in records if r["level"] in ("ERROR", "CRITICAL")] == []
    assert all(status < 500 for status in served_statuses(records))


def predict_ok(server: ServerProcess) -> bool:
    resp = httpx.post(
        server.url + "/predict", files={"file": ("x.jpeg", jpeg_bytes(0, 1))}, timeout=30
    )
    return resp.status_code == 200 and resp.json()["prediction"] in ("NORMAL", "PNEUMONIA")


# --- clients that vanish or dawdle -------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One inference slot, a one-second upload deadline."""
    env = {"MAX_CONCURRENCY": "1", "UPLOAD_TIMEOUT_S": "1", "INFERENCE_THREADS": "1"}
    with running_server(tiny_model, tmp_path_factory.mktemp("faults"), **env) as srv:
        yield srv


@pytest.mark.parametrize("how", ["close", "reset"])
def test_client_that_disconnects_mid_upload(server: ServerProcess, how: str) -> None:
    """Regression: a vanished client was logged as an unhandled error and counted as a 500."""
    before = metric(
        server, r'pneumonia_http_requests_total\{route="/predict",method="POST",status="499"\}'
    )
    body = multipart_body(bytes(1 << 20))
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(multipart_head(len(body)) + body[:100_000])
    wait_for(
        lambda: metric(server, "pneumonia_http_requests_in_flight") >= 2, "the upload to start"
    )
    if how == "reset":  # an RST instead of a FIN, as a crashed client or a dropped link gives
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    # Only the scrape itself is left in flight: the abandoned request did not leak.
    wait_for(lambda: metric(server, "pneumonia_http_requests_in_flight") == 1, "in-flight to drop")
    after = metric(
        server, r'pneumonia_http_requests_total\{route="/predict",method="POST",status="499"\}'
    )
    assert after == before + 1
    assert metric(server, "pneumonia_inference_jobs") == 0
    assert predict_ok(server)
    assert_no_unhandled_errors(server)


def trickle(port: int, results: list[tuple[bytes, bytes]]) -> None:
    """Send the upload's headers, then one byte of body every 0.1 s until the server answers."""
    body = multipart_body(jpeg_bytes(1, 2))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(multipart_head(len(body)) + body[:50])
        deadline = time.monotonic() + 30
        for i in range(50, len(body)):
            if select.select([sock], [], [], 0.1)[0] or time.monotonic() > deadline:
                break
            sock.sendall(body[i : i + 1])
        results.append(read_response(sock))


def test_slow_client_gets_408_and_frees_the_server(server: ServerProcess) -> None:
    results: list[tuple[bytes, bytes]] = []
    slow = [threading.Thread(target=trickle, args=(server.port, results)) for _ in range(3)]
    for t in slow:
        t.start()
    wait_for(
        lambda: metric(server, "pneumonia_http_requests_in_flight") >= 4,
        "the slow uploads to start",
    )
    # While three clients dawdle, the one inference slot is free for everyone else.
    assert predict_ok(server)
    for t in slow:
        t.join(timeout=60)
    assert len(results) == 3
    for head, body in results:
        assert head.startswith(b"HTTP/1.1 408"), head
        assert json.loads(body)["error"]["code"] == "upload_timeout"
    wait_for(lambda: metric(server, "pneumonia_http_requests_in_flight") == 1, "in-flight to drop")
    assert predict_ok(server)
    assert_no_unhandled_errors(server)


# --- SIGTERM under load ------------------------------------------------------------------------


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True


def test_sigterm_under_load_finishes_work_in_flight_and_refuses_the_rest(
    tiny_model: Path, tmp_path: Path
) -> None:
    graceful_s = 30
    n = 5
    env = {"MAX_CONCURRENCY": "1", "GRACEFUL_TIMEOUT_S": str(graceful_s), "INFERENCE_THREADS": "1"}
    bodies = [multipart_body(jpeg_bytes(i % 2, i, size=256), f"{i}.jpeg") for i in range(n)]
    with running_server(tiny_model, tmp_path, **env) as server:
        # n requests in flight: everything sent but the last bytes of each body.
        socks = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in bodies]
        for sock, body in zip(socks, bodies, strict=True):
            sock.sendall(multipart_head(len(body)) + body[:-8])
        wait_for(
            lambda: metric(server, "pneumonia_http_requests_in_flight") == n + 1,
            "the requests to be in flight",
        )
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: refuses_connections(server.port), "the listening socket to close", 10)
        # Requests sent after the signal are refused; none hangs, none is a 500.
        late: list[int | str] = []
        for _ in range(3):
            try:
                resp = httpx.post(
                    server.url + "/predict", files={"file": ("x.jpeg", jpeg_bytes())}, timeout=10
                )
                late.append(resp.status_code)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                late.append(type(exc).__name__)
        assert server.proc.poll() is None, "the server exited with requests in flight"
        # The requests in flight complete, all at once: they queue for the one inference slot.
        for sock, body in zip(socks, bodies, strict=True):
            sock.sendall(body[-8:])
        answers = []
        for sock in socks:
            answers.append(read_response(sock))
            sock.close()
        code = server.proc.wait(timeout=graceful_s + 15)
        stopped_after = time.monotonic() - t0
    for i, (head, payload) in enumerate(answers):
        assert head.startswith(b"HTTP/1.1 200"), head
        assert json.loads(payload)["filename"] == f"{i}.jpeg"
    assert set(late) <= {"ConnectError", "RemoteProtocolError", "ReadError", 503}, late
    # Regression: uvicorn re-raises SIGTERM once shut down, and the status read -15.
    assert code == 0
    assert stopped_after < graceful_s + 15
    assert_no_unhandled_errors(server)
    messages = [json.loads(x).get("message") for x in server.stderr().splitlines() if x[:1] == "{"]
    assert "Application shutdown complete." in messages
