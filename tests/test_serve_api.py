"""The HTTP API in-process: every route, every status, every error code, real encoded images."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from benchmarks.common import assert_error, dicom_bytes, png16_bytes, png_bomb
from conftest import encode, jpeg_bytes, synthetic_xray
from pneumonia.cli import main as cli_main
from pneumonia.preprocess import decode_gray
from pneumonia.serve.app import create_app
from pneumonia.serve.settings import Settings
from serve_util import PREDICT_KEYS

with warnings.catch_warnings():
    # Starlette 1.x nags about httpx inside its TestClient; the client still works.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


@contextlib.contextmanager
def serve(model: Path, **settings: Any) -> Iterator[TestClient]:
    """The app in-process with its lifespan run, once /ready says the model is warm."""
    app = create_app(Settings(model_path=model, **settings))
    with TestClient(app) as client:
        for _ in range(200):
            if client.get("/ready").status_code == 200:
                break
            threading.Event().wait(0.02)
        else:
            raise AssertionError("service never became ready")
        yield client


@pytest.fixture(scope="module")
def client(tiny_model: Path) -> Iterator[TestClient]:
    with serve(tiny_model) as c:
        yield c


def upload(
    client: TestClient, data: bytes, name: str = "chest_xray.jpeg", url: str = "/predict", **kw: Any
) -> Any:
    return client.post(url, files={"file": (name, data, "application/octet-stream")}, **kw)


def cli_probability(
    model: Path, data: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> dict:
    path = tmp_path / name
    path.write_bytes(data)
    assert cli_main(["predict", str(path), "--model", str(model)]) == 0
    return json.loads(capsys.readouterr().out.strip())


# --- success ---------------------------------------------------------------------------------


def test_predict_jpeg_answers_every_field(client: TestClient, tiny_card: dict) -> None:
    resp = upload(client, jpeg_bytes(1, 5))
    assert resp.status_code == 200
    body = resp.json()
    assert set(body) == PREDICT_KEYS
    assert body["filename"] == "chest_xray.jpeg"
    assert body["prediction"] in ("NORMAL", "PNEUMONIA")
    p = body["probabilities"]
    assert set(p) == {"NORMAL", "PNEUMONIA"}
    assert p["NORMAL"] + p["PNEUMONIA"] == pytest.approx(1.0)
    # Regression (issue 19): P(PNEUMONIA) whatever the label, not the label's own probability.
    assert body["probability"] == p["PNEUMONIA"]
    assert body["threshold"] == tiny_card["threshold"]
    assert (p["PNEUMONIA"] >= body["threshold"]) == (body["prediction"] == "PNEUMONIA")
    assert body["model"] == {
        "name": tiny_card["name"],
        "version": tiny_card["version"],
        "sha256": tiny_card["sha256"],
        "weights_sha256": tiny_card["weights_sha256"],
    }
    assert body["processing_ms"] >= 0
    assert body["request_id"] == resp.headers["X-Request-ID"]
    assert resp.headers["Cache-Control"] == "no-store"


def test_cli_and_api_give_the_same_score(
    client: TestClient, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = jpeg_bytes(1, 11, size=300)
    cli = cli_probability(tiny_model, data, tmp_path, capsys, "same.jpeg")
    api = upload(client, data).json()
    heat = upload(client, data, url="/predict?heatmap=true").json()
    for key in ("prediction", "probability", "probabilities", "threshold"):
        assert api[key] == cli[key], key
        assert heat[key] == cli[key], key  # the heatmap path decodes the same way


def test_png_16_bit_scores_as_the_8_bit_image(client: TestClient) -> None:
    gray = synthetic_xray(1, 21, 128)
    p8 = upload(client, encode(gray, "PNG"), "x.png").json()["probabilities"]["PNEUMONIA"]
    p16 = upload(client, png16_bytes(gray), "x16.png").json()["probabilities"]["PNEUMONIA"]
    assert p16 == pytest.approx(p8, abs=1e-6)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA"])
def test_png_colour_modes_are_accepted(client: TestClient, mode: str) -> None:
    img = Image.fromarray(synthetic_xray(0, 3, 96)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert upload(client, buf.getvalue(), "x.png").status_code == 200


def test_progressive_and_cmyk_jpegs_are_accepted(client: TestClient) -> None:
    gray = synthetic_xray(1, 4, 128)
    assert upload(client, encode(gray, "JPEG", progressive=True)).status_code == 200
    cmyk = io.BytesIO()
    Image.fromarray(gray).convert("CMYK").save(cmyk, format="JPEG")
    assert upload(client, cmyk.getvalue()).status_code == 200


def test_format_comes_from_the_bytes_not_the_name(client: TestClient) -> None:
    png = encode(synthetic_xray(0, 8, 96), "PNG")
    assert (
        upload(client, png, "looks_like.jpeg").json()["probability"]
        == upload(client, png, "x.png").json()["probability"]
    )
    assert_error(upload(client, b"GIF89a" + b"\0" * 100, "x.jpeg"), 415, "unsupported_format")


def test_dicom_monochrome1_is_inverted_to_match_monochrome2(client: TestClient) -> None:
    gray12 = synthetic_xray(1, 31, 128).astype(np.uint16) * 16
    m2 = upload(client, dicom_bytes(gray12, "MONOCHROME2"), "a.dcm")
    m1 = upload(client, dicom_bytes(4095 - gray12, "MONOCHROME1"), "b.dcm")
    assert m2.status_code == m1.status_code == 200
    assert m1.json()["probabilities"]["PNEUMONIA"] == pytest.approx(
        m2.json()["probabilities"]["PNEUMONIA"], abs=1e-6
    )


def test_dicom_rescale_and_window_are_applied(client: TestClient) -> None:
    gray12 = synthetic_xray(1, 32, 128).astype(np.uint16) * 16
    plain = upload(client, dicom_bytes(gray12), "a.dcm").json()["probabilities"]["PNEUMONIA"]
    # A linear rescale alone changes nothing after min-max scaling...
    rescaled = upload(client, dicom_bytes(gray12, slope=2.0, intercept=-1024.0), "b.dcm")
    assert rescaled.json()["probabilities"]["PNEUMONIA"] == pytest.approx(plain, abs=1e-5)
    # ...while a narrow window clips the image and so changes the input. The window sits inside
    # the rescaled values (regression: one below them all made a constant image, and the test
    # passed without showing that windowing works).
    values = gray12.astype(np.float64) * 2.0 - 1024.0
    window = (float(np.median(values)), float(np.ptp(values)) / 4)
    data = dicom_bytes(gray12, slope=2.0, intercept=-1024.0, window=window)
    gray = decode_gray(data)
    assert 0.0 < (gray == 0.0).mean() < 0.9 and 0.0 < (gray == 1.0).mean() < 0.9
    windowed = upload(client, data, "c.dcm")
    assert windowed.status_code == 200
    assert windowed.json()["probabilities"]["PNEUMONIA"] != pytest.approx(plain, abs=1e-5)


def test_heatmap_is_a_png_overlay_with_the_image_aspect(client: TestClient) -> None:
    wide = np.asarray(Image.fromarray(synthetic_xray(1, 40, 200)).resize((300, 200)))
    body = upload(client, encode(wide), url="/predict?heatmap=true").json()
    png = base64.b64decode(body["heatmap_png"])
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.mode == "RGB"
    assert img.size == (300, 200)
    rgb = np.asarray(img).astype(int)
    assert (rgb[..., 0] != rgb[..., 2]).any()  # coloured, not the plain grayscale image
    assert "heatmap_png" not in upload(client, encode(wide)).json()


def test_batch_answers_one_entry_per_file_in_order(client: TestClient, tiny_card: dict) -> None:
    files = [
        ("files", ("a.jpeg", jpeg_bytes(1, 1))),
        ("files", ("b.txt", b"not an image")),
        ("files", ("c.png", encode(synthetic_xray(0, 2, 96), "PNG"))),
        ("files", ("d.jpeg", b"")),
    ]
    resp = client.post("/predict/batch", files=files)
    assert resp.status_code == 200
    body = resp.json()
    assert set(body) == {"results", "model", "processing_ms", "request_id"}
    assert [r["filename"] for r in body["results"]] == ["a.jpeg", "b.txt", "c.png", "d.jpeg"]
    a, b, c, d = body["results"]
    assert set(a) == {
        "filename",
        "prediction",
        "probability",
        "probabilities",
        "threshold",
        "input_check",
    }
    assert a["probability"] == upload(client, jpeg_bytes(1, 1)).json()["probability"]
    assert b["error"]["code"] == "unsupported_format"
    assert c["prediction"] in ("NORMAL", "PNEUMONIA")
    assert d["error"]["code"] == "empty_file"
    assert body["model"]["sha256"] == tiny_card["sha256"]


def test_batch_refuses_more_files_than_the_limit(tiny_model: Path) -> None:
    with serve(tiny_model, max_batch_files=2) as c:
        files = [("files", (f"{i}.jpeg", jpeg_bytes(0, i))) for i in range(3)]
        assert "at most 2" in assert_error(
            c.post("/predict/batch", files=files), 400, "too_many_files"
        )
        assert_error(
            c.post("/predict/batch", files={"file": ("a.jpeg", jpeg_bytes())}), 400, "missing_file"
        )


def test_filename_is_reduced_to_its_base_name(client: TestClient) -> None:
    from pneumonia.serve.upload import clean_filename

    assert upload(client, jpeg_bytes(), "C:\\scans\\..\\x.jpeg").json()["filename"] == "x.jpeg"
    assert upload(client, jpeg_bytes(), "/etc/x.jpeg").json()["filename"] == "x.jpeg"
    assert clean_filename("a/b\r\n\x00c.jpeg") == "bc.jpeg"
    assert len(clean_filename("x" * 1000)) == 255


# --- client errors ---------------------------------------------------------------------------


def test_missing_field_and_non_multipart_are_400(client: TestClient) -> None:
    msg = assert_error(
        client.post("/predict", files={"image": ("x.jpeg", jpeg_bytes())}), 400, "missing_file"
    )
    assert "'image'" in msg and 'field "file"' in msg
    assert_error(client.post("/predict", json={"file": "x"}), 400, "missing_file")
    assert_error(client.post("/predict"), 400, "missing_file")


def test_empty_file_is_400(client: TestClient) -> None:
    assert_error(upload(client, b""), 400, "empty_file")


def test_malformed_or_cut_off_multipart_is_400(client: TestClient) -> None:
    headers = {"content-type": "multipart/form-data; boundary=xyz"}
    assert_error(
        client.post("/predict", content=b"garbage", headers=headers), 400, "invalid_multipart"
    )
    cut = (
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.jpeg"\r\n\r\n'
        + jpeg_bytes()[:500]
    )
    assert_error(client.post("/predict", content=cut, headers=headers), 400, "invalid_multipart")
    no_boundary = {"content-type": "multipart/form-data"}
    assert_error(
        client.post("/predict", content=b"x", headers=no_boundary), 400, "invalid_multipart"
    )


def test_two_files_on_predict_is_400(client: TestClient) -> None:
    files = [("file", ("a.jpeg", jpeg_bytes())), ("file", ("b.jpeg", jpeg_bytes()))]
    assert "/predict/batch" in assert_error(
        client.post("/predict", files=files), 400, "too_many_files"
    )


def test_a_flood_of_form_fields_is_400(client: TestClient) -> None:
    fields = [(f"x{i}", ("a", b"1")) for i in range(30)]
    assert_error(client.post("/predict", files=fields), 400, "too_many_parts")


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"GIF89a" + b"\0" * 64, "unsupported_format"),
        (b"BM" + b"\0" * 64, "unsupported_format"),
        (b"just some text, not an image", "unsupported_format"),
    ],
)
def test_unsupported_formats_are_415(client: TestClient, data: bytes, code: str) -> None:
    assert_error(upload(client, data), 415, code)


def test_compressed_dicom_without_a_decoder_is_415(client: TestClient) -> None:
    from pydicom.uid import JPEGLSLossless

    data = dicom_bytes(
        np.zeros((64, 64), np.uint16),
        transfer_syntax=JPEGLSLossless,
        encapsulated=b"\xff\xd8\xff\xf7" + b"\0" * 64,
    )
    msg = assert_error(upload(client, data, "x.dcm"), 415, "unsupported_transfer_syntax")
    assert "Explicit VR Little Endian" in msg


def test_bad_images_are_422(client: TestClient) -> None:
    good = encode(synthetic_xray(1, 9, 256), "JPEG", quality=95)
    # A cut-off file is corrupt_image since issue 13 (was undecodable_image).
    assert_error(upload(client, good[: len(good) // 2]), 422, "corrupt_image")
    assert_error(upload(client, encode(synthetic_xray(0, 1, 16))), 422, "image_too_small")
    assert_error(upload(client, png_bomb(), "bomb.png"), 422, "decompression_bomb")
    dcm = dicom_bytes(synthetic_xray(1, 2, 64).astype(np.uint16))
    assert_error(upload(client, dcm[: len(dcm) - 2000], "cut.dcm"), 422, "corrupt_image")


def test_bad_query_parameter_is_422(client: TestClient) -> None:
    msg = assert_error(
        upload(client, jpeg_bytes(), url="/predict?heatmap=maybe"), 422, "validation_error"
    )
    assert "heatmap" in msg


def test_unknown_route_and_wrong_method(client: TestClient) -> None:
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/static/../../etc/passwd"), 404, "not_found")
    assert_error(client.get("/predict"), 405, "method_not_allowed")


# --- size limit --------------------------------------------------------------------------------


def test_declared_oversize_body_is_413(tiny_model: Path) -> None:
    with serve(tiny_model, max_upload_mb=0.05) as c:
        big = encode(np.random.default_rng(0).integers(0, 255, (300, 300), dtype=np.uint8), "PNG")
        assert len(big) > 0.05 * 1024 * 1024
        assert "0.05 MiB" in assert_error(upload(c, big, "big.png"), 413, "payload_too_large")
        assert upload(c, jpeg_bytes()).status_code == 200


def test_size_limit_is_enforced_while_the_body_streams(tiny_model: Path) -> None:
    """A chunked body with no Content-Length is answered 413 once the limit passes, not when
    it has been read to the end; the rest is then read and dropped (DRAIN_MAX_MB), so that a
    client that sends before it reads gets the answer rather than a reset."""
    with serve(tiny_model, max_upload_mb=0.25) as c:
        chunk = 64 * 1024
        total_chunks = 100  # 6.4 MB offered
        head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
        reads = 0
        sent: list[dict] = []

        async def receive() -> dict:
            nonlocal reads
            reads += 1
            body = head if reads == 1 else b"\0" * chunk
            return {"type": "http.request", "body": body, "more_body": reads < total_chunks}

        reads_when_answered = 0

        async def send(message: dict) -> None:
            nonlocal reads_when_answered
            if message["type"] == "http.response.start":
                reads_when_answered = reads
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/predict",
            "raw_path": b"/predict",
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"content-type", b"multipart/form-data; boundary=b"),
                (b"transfer-encoding", b"chunked"),
            ],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "state": {},
        }
        c.portal.call(c.app, scope, receive, send)
        assert sent[0]["status"] == 413
        assert json.loads(sent[1]["body"])["error"]["code"] == "payload_too_large"
        assert reads_when_answered <= 0.25 * 1024 * 1024 / chunk + 2, (
            f"answered after {reads_when_answered} chunks of {total_chunks}"
        )
        assert reads == total_chunks  # 6.4 MB: within the default drain bound
        assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


def test_slow_upload_times_out_with_408(tiny_model: Path) -> None:
    with serve(tiny_model, upload_timeout_s=0.2) as c:
        import anyio

        sent: list[dict] = []
        reads = 0

        async def receive() -> dict:
            nonlocal reads
            reads += 1
            if reads > 1:
                await anyio.sleep(5)  # the client stalls mid-upload
            return {"type": "http.request", "body": b"--b\r\n", "more_body": True}

        reads_when_answered = 0

        async def send(message: dict) -> None:
            nonlocal reads_when_answered
            if message["type"] == "http.response.start":
                reads_when_answered = reads
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/predict", "raw_path": b"/predict", "query_string": b"",
            "root_path": "", "headers": [(b"content-type", b"multipart/form-data; boundary=b")],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {},
        }  # fmt: skip
        c.portal.call(c.app, scope, receive, send)
        assert sent[0]["status"] == 408
        assert json.loads(sent[1]["body"])["error"]["code"] == "upload_timeout"


def test_uploads_are_never_written_to_disk(tiny_model: Path) -> None:
    """Starlette's own form parser spools files over 1 MiB to temporary files; ours must not."""
    # Noise is the simple way to a PNG over 2 MiB; the input check would refuse it as noise, so
    # it only flags here and the upload is classified (tests/test_guard.py covers refusal).
    with serve(tiny_model, input_check="flag") as client:
        _uploads_are_never_written_to_disk(client)


def _uploads_are_never_written_to_disk(client: TestClient) -> None:
    from tempfile import SpooledTemporaryFile

    writes: list[str] = []
    active = threading.Event()

    def hook(event: str, args: tuple) -> None:
        if not active.is_set():
            return
        if event == "open" and len(args) >= 3:
            path, mode, flags = args[0], args[1], args[2]
            if (isinstance(mode, str) and any(m in mode for m in "wax+")) or (
                isinstance(flags, int)
                and flags & (0o1 | 0o2 | 0o100)  # O_WRONLY | O_RDWR | O_CREAT
            ):
                writes.append(f"{event} {path}")
        elif event.startswith("tempfile."):
            writes.append(event)

    sys.addaudithook(hook)  # audit hooks cannot be removed; `active` gates this one
    big = encode(np.random.default_rng(1).integers(0, 255, (1500, 1500), dtype=np.uint8), "PNG")
    assert len(big) > 2 * 1024 * 1024
    active.set()
    try:
        # The detector works: a spooled file over its limit is seen.
        with SpooledTemporaryFile(max_size=1024) as f:
            f.write(b"\0" * 4096)
        assert writes, "the audit hook does not see temporary files"
        writes.clear()
        resp = upload(client, big, "big.png")
    finally:
        active.clear()
    assert resp.status_code == 200
    assert writes == []


# --- auth, backpressure, failures ---------------------------------------------------------------


def test_api_key_guards_prediction_routes_only(tiny_model: Path) -> None:
    with serve(tiny_model, api_key="s3cret-key") as c:
        msg = assert_error(upload(c, jpeg_bytes()), 401, "unauthorized")
        assert "X-API-Key" in msg
        assert upload(c, jpeg_bytes()).headers["WWW-Authenticate"] == "Bearer"
        assert_error(upload(c, jpeg_bytes(), headers={"X-API-Key": "wrong"}), 401, "unauthorized")
        assert_error(
            c.post("/predict/batch", files={"files": ("a", jpeg_bytes())}), 401, "unauthorized"
        )
        assert upload(c, jpeg_bytes(), headers={"X-API-Key": "s3cret-key"}).status_code == 200
        assert (
            upload(c, jpeg_bytes(), headers={"Authorization": "Bearer s3cret-key"}).status_code
            == 200
        )
        for path in ("/health", "/ready", "/metrics", "/model", "/", "/openapi.json"):
            assert c.get(path).status_code == 200, path


def test_full_queue_is_503_with_retry_after(tiny_model: Path) -> None:
    with serve(tiny_model, max_concurrency=1, queue_size=0) as c:
        svc = c.app.state.service
        release = threading.Event()
        busy = c.portal.start_task_soon(svc.queue.run, release.wait)
        try:
            while svc.queue.running < 1:
                threading.Event().wait(0.01)
            resp = upload(c, jpeg_bytes())
            assert_error(resp, 503, "queue_full")
            assert int(resp.headers["Retry-After"]) >= 1
        finally:
            release.set()
            busy.result(timeout=10)
        assert upload(c, jpeg_bytes()).status_code == 200


def test_no_free_slot_in_time_is_503(tiny_model: Path) -> None:
    with serve(tiny_model, max_concurrency=1, queue_size=1, queue_timeout_s=0.2) as c:
        svc = c.app.state.service
        release = threading.Event()
        busy = c.portal.start_task_soon(svc.queue.run, release.wait)
        try:
            while svc.queue.running < 1:
                threading.Event().wait(0.01)
            resp = upload(c, jpeg_bytes())
            assert_error(resp, 503, "queue_timeout")
            assert "Retry-After" in resp.headers
        finally:
            release.set()
            busy.result(timeout=10)


def test_unexpected_failure_is_500_without_details(
    tiny_model: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve(tiny_model) as c:

        def boom(*args: object, **kw: object) -> None:
            raise RuntimeError("secret internal detail /srv/model")

        monkeypatch.setattr(c.app.state.service.predictor, "scores", boom)
        with caplog.at_level(logging.ERROR, logger="pneumonia.serve"):
            resp = upload(c, jpeg_bytes())
        msg = assert_error(resp, 500, "internal_error")
        assert "secret" not in resp.text and "RuntimeError" not in resp.text and "secret" not in msg
        logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert any(getattr(r, "request_id", None) == resp.headers["X-Request-ID"] for r in logged)


# --- operations -------------------------------------------------------------------------------


def test_health_ready_and_model_card(client: TestClient, tiny_card: dict) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready == {
        "status": "ready",
        "model": {
            "name": tiny_card["name"],
            "version": tiny_card["version"],
            "sha256": tiny_card["sha256"],
            "weights_sha256": tiny_card["weights_sha256"],
        },
    }
    card = client.get("/model").json()
    assert card["sha256"] == tiny_card["sha256"]
    for key in (
        "labels",
        "threshold",
        "threshold_rule",
        "calibration",
        "preprocess",
        "intended_use",
        "limitations",
        "validation_metrics",
    ):
        assert card[key] == tiny_card[key], key
    assert "path" not in card  # the server's file system stays private


def test_ready_is_503_until_warm(tiny_model: Path) -> None:
    with serve(tiny_model) as c:
        c.app.state.service.ready = False
        resp = c.get("/ready")
        assert_error(resp, 503, "not_ready")
        assert resp.headers["Retry-After"] == "1"
        assert c.get("/health").status_code == 200


def test_request_id_is_echoed_or_made(client: TestClient) -> None:
    assert (
        client.get("/health", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"]
        == "abc-123"
    )
    forged = client.get("/health", headers={"X-Request-ID": 'x" injected\\n'}).headers[
        "X-Request-ID"
    ]
    assert re.fullmatch(r"[0-9a-f]{32}", forged)


_SAMPLE = re.compile(r'^[a-z_]+(\{([a-z_0-9]+="[^"]*",?)+\})? [0-9.e+-]+$')


def test_metrics_text_counts_requests_and_times_inference(tiny_model: Path) -> None:
    with serve(tiny_model) as c:
        upload(c, jpeg_bytes())
        upload(c, b"")
        c.post(
            "/predict/batch", files=[("files", ("a", jpeg_bytes())), ("files", ("b", jpeg_bytes()))]
        )
        resp = c.get("/metrics")
        assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = resp.text
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or _SAMPLE.match(line), line
    assert 'pneumonia_http_requests_total{route="/predict",method="POST",status="200"} 1' in text
    assert 'pneumonia_http_requests_total{route="/predict",method="POST",status="400"} 1' in text
    assert (
        'pneumonia_http_requests_total{route="/predict/batch",method="POST",status="200"} 1' in text
    )
    assert 'pneumonia_http_request_duration_seconds_count{route="/predict"} 2' in text
    assert 'pneumonia_http_request_duration_seconds_bucket{route="/predict",le="+Inf"} 2' in text
    assert 'pneumonia_inference_duration_seconds_count{batch="1"} 1' in text  # warm-up not counted
    assert 'pneumonia_inference_duration_seconds_count{batch="many"} 1' in text
    assert 'pneumonia_image_errors_total{code="empty_file"} 1' in text
    assert "pneumonia_http_requests_in_flight 1" in text  # the scrape itself
    assert "pneumonia_ready 1" in text
    assert re.search(
        r'pneumonia_model_info\{name="pneumonia-tiny-test",version="[^"]+",'
        r'sha256="[0-9a-f]{64}"\} 1',
        text,
    )
    counts = [
        int(v)
        for v in re.findall(r'duration_seconds_bucket\{route="/predict",le="[^"]+"\} (\d+)', text)
    ]
    assert counts == sorted(counts)  # cumulative buckets


def test_logs_are_json_lines_without_file_names_or_patient_data(
    tiny_model: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from pneumonia.serve.logs import configure_logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("INFO")
        with serve(tiny_model) as c:
            dcm = dicom_bytes(synthetic_xray(1, 2, 64).astype(np.uint16) * 16)
            resp = upload(c, dcm, "Doe_Jane_chest.dcm")
            upload(c, dcm[:400], "Doe_Jane_cut.dcm")
        err = capfd.readouterr().err
    finally:
        root.handlers[:], root.level = saved
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    requests = [r for r in lines if r.get("message") == "request" and r.get("route") == "/predict"]
    assert len(requests) == 2
    assert requests[0]["request_id"] == resp.headers["X-Request-ID"]
    assert {"method", "path", "status", "duration_ms"} <= set(requests[0])
    for secret in ("Doe", "PATIENT-SECRET", "20190101"):
        assert secret not in err


# --- docs and page ------------------------------------------------------------------------------


def test_openapi_documents_every_route_and_error(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert set(paths) == {"/predict", "/predict/batch", "/health", "/ready", "/metrics", "/model"}
    predict = paths["/predict"]["post"]
    assert {"200", "400", "401", "408", "413", "415", "422", "500", "503"} <= set(
        predict["responses"]
    )
    form = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["file"] and form["properties"]["file"]["format"] == "binary"
    batch = paths["/predict/batch"]["post"]["requestBody"]["content"]["multipart/form-data"][
        "schema"
    ]
    assert batch["properties"]["files"]["type"] == "array"
    fields = spec["components"]["schemas"]["PredictionResponse"]["properties"]
    assert all(f.get("description") for f in fields.values()), "every response field is described"
    for path, ops in paths.items():
        for op in ops.values():
            for status, r in op["responses"].items():
                assert r.get("description"), (path, status)


def test_docs_work_offline(client: TestClient) -> None:
    html = client.get("/docs").text
    assert "/docs/assets/swagger-ui-bundle.js" in html
    assert "cdn" not in html.lower()
    assert client.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
    assert client.get("/docs/assets/swagger-ui.css").status_code == 200


def test_web_page_is_served_with_its_limits(client: TestClient) -> None:
    resp = client.get("/")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert "Not a diagnostic device" in resp.text
    assert 'id="file"' in resp.text
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    for asset in ("app.js", "style.css"):
        text = client.get(f"/static/{asset}").text
        assert text
        # No CDN, no web fonts: the page must work without internet.
        assert "http://" not in text and "https://" not in text and "@import" not in text
    assert "http://" not in resp.text and "https://" not in resp.text
