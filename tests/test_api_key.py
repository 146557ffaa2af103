"""API key mode over real HTTP: wrong, missing and right keys in both headers; the operations
routes stay open; the key is compared in constant time."""

from __future__ import annotations

import base64
import hmac
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import jpeg_bytes
from pneumonia.serve.app import create_app
from pneumonia.serve.settings import Settings
from serve_util import ServerProcess, running_server

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Starlette nags about httpx inside its TestClient
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.slow

KEY = "k3y-Of-Th1s-T3st-9f2c"

# Headers of a request, and whether they carry the right key.
HEADERS: dict[str, tuple[dict[str, str], bool]] = {
    "no-key": ({}, False),
    "x-api-key-right": ({"X-API-Key": KEY}, True),
    "x-api-key-lower-case-name": ({"x-api-key": KEY}, True),
    "x-api-key-wrong": ({"X-API-Key": "not-the-key"}, False),
    "x-api-key-empty": ({"X-API-Key": ""}, False),
    "x-api-key-prefix": ({"X-API-Key": KEY[:-1]}, False),
    "x-api-key-plus-a-char": ({"X-API-Key": KEY + "x"}, False),
    "x-api-key-other-case": ({"X-API-Key": KEY.upper()}, False),
    "bearer-right": ({"Authorization": f"Bearer {KEY}"}, True),
    "bearer-lower-case-scheme": ({"Authorization": f"bearer {KEY}"}, True),
    "bearer-wrong": ({"Authorization": "Bearer not-the-key"}, False),
    "bearer-without-token": ({"Authorization": "Bearer"}, False),
    "basic-with-the-key": (
        {"Authorization": "Basic " + base64.b64encode(f"user:{KEY}".encode()).decode()},
        False,
    ),
    "bare-key-as-authorization": ({"Authorization": KEY}, False),
    # X-API-Key is read first; a wrong one is not rescued by a right bearer token.
    "wrong-x-api-key-right-bearer": (
        {"X-API-Key": "not-the-key", "Authorization": f"Bearer {KEY}"},
        False,
    ),
}


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"API_KEY": KEY, "INFERENCE_THREADS": "1"}
    with running_server(tiny_model, tmp_path_factory.mktemp("api_key"), **env) as srv:
        yield srv


@pytest.mark.parametrize("route", ["/predict", "/predict/batch"])
@pytest.mark.parametrize("kind", sorted(HEADERS))
def test_prediction_needs_the_right_key(server: ServerProcess, kind: str, route: str) -> None:
    headers, right = HEADERS[kind]
    field = "file" if route == "/predict" else "files"
    resp = httpx.post(
        server.url + route,
        files={field: ("x.jpeg", jpeg_bytes())},
        headers=headers,
        timeout=30,
    )
    if right:
        assert resp.status_code == 200, resp.text
    else:
        assert resp.status_code == 401, resp.text
        assert resp.json() == {
            "error": {
                "code": "unauthorized",
                "message": "missing or wrong API key; send it in the X-API-Key header "
                "or as Authorization: Bearer <key>",
            }
        }
        assert resp.headers["WWW-Authenticate"] == "Bearer"


def test_key_in_the_query_string_is_not_accepted(server: ServerProcess) -> None:
    resp = httpx.post(
        server.url + "/predict",
        params={"api_key": KEY, "X-API-Key": KEY},
        files={"file": ("x.jpeg", jpeg_bytes())},
        timeout=30,
    )
    assert resp.status_code == 401


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics", "/model", "/", "/docs"])
def test_operations_routes_stay_open(server: ServerProcess, path: str) -> None:
    assert httpx.get(server.url + path, timeout=30).status_code == 200


def test_the_key_is_never_logged(server: ServerProcess) -> None:
    httpx.post(server.url + "/predict", headers={"X-API-Key": KEY}, timeout=30)
    httpx.post(server.url + "/predict", headers={"Authorization": f"Bearer {KEY}-x"}, timeout=30)
    assert KEY not in server.stderr() and KEY not in server.stdout()


def test_the_key_is_compared_in_constant_time(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every non-empty key given goes through hmac.compare_digest, right or wrong, any length."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    app = create_app(Settings(model_path=tiny_model, api_key=KEY, inference_threads=1))
    with TestClient(app) as client:
        for given, status in [("x", 401), (KEY[:-1], 401), (KEY, 200)]:
            resp = client.post(
                "/predict", files={"file": ("x.jpeg", jpeg_bytes())}, headers={"X-API-Key": given}
            )
            assert resp.status_code == status
        resp = client.post(
            "/predict/batch",
            files={"files": ("x.jpeg", jpeg_bytes())},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert resp.status_code == 200
    assert calls == [
        (b"x", KEY.encode()),
        (KEY[:-1].encode(), KEY.encode()),
        (KEY.encode(), KEY.encode()),
        (KEY.encode(), KEY.encode()),
    ]
