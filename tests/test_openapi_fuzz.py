"""Schemathesis against the service's own OpenAPI document, in-process (ASGI).

For every documented operation, requests generated from the document (valid and invalid
query values, multipart bodies, headers, credentials) must never get a 5xx, and every
response must be one the document declares: status code, content type, headers and body
schema. Run twice: without API_KEY (the default) and with one, whose document differs.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from benchmarks.common import dicom_bytes
from conftest import encode, jpeg_bytes, synthetic_xray
from pneumonia.serve.app import create_app
from pneumonia.serve.settings import Settings

#: Schema-driven fuzzing of every operation: the longest tests outside the server suites.
pytestmark = pytest.mark.slow

with warnings.catch_warnings():
    # Starlette 1.x nags about httpx inside its TestClient; the client still works.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

#: Generated requests per operation and configuration; Schemathesis adds its explicit
#: examples, coverage cases and the extra requests of its checks on top.
EXAMPLES_PER_OPERATION = 60
API_KEY = "fuzz-key-0123456789"

FUZZ = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


class LateApp:
    """An ASGI app that forwards HTTP requests to an app set later; its own lifespan is empty.

    Schemathesis binds a schema to its app at import, to make one test per operation, but
    the model to serve exists only once the ``tiny_model`` fixture has built it. (Its lazy
    ``from_fixture`` loader would wait, but fails under pytest 9: no ``Function._nodeid``.)
    The served app's lifespan is run by the fixture, once per module: Schemathesis ends
    lifespans after every test, and a restarted service answers /ready with 503 until it
    has warmed up again.
    """

    def __init__(self) -> None:
        self.target: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        assert self.target is not None, "the app fixture has not started this app"
        await self.target(scope, receive, send)


def _bound_schema(api_key: str | None) -> tuple[Any, LateApp, dict[str, Any]]:
    """The app's OpenAPI document (it does not depend on the model: building the app loads
    none), as a Schemathesis schema sending its requests in-process to a LateApp."""
    doc = create_app(Settings(model_path=Path("model-not-loaded.onnx"), api_key=api_key)).openapi()
    loaded = schemathesis.openapi.from_dict(doc)
    late = LateApp()
    loaded.app = late  # as schemathesis.openapi.from_asgi binds it
    return loaded, late, doc


open_schema, OPEN_APP, OPEN_DOC = _bound_schema(None)
keyed_schema, KEYED_APP, KEYED_DOC = _bound_schema(API_KEY)


@contextlib.contextmanager
def _serving(
    late: LateApp, model: Path, api_key: str | None, doc: dict[str, Any]
) -> Iterator[None]:
    """Point ``late`` at an app serving ``model``, started and warm, until the block ends."""
    app = create_app(Settings(model_path=model, api_key=api_key))
    with TestClient(app) as client:  # runs the app's lifespan until the block ends
        assert client.get("/openapi.json").json() == doc, "fuzzing a stale document"
        deadline = time.monotonic() + 60
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "service never became ready"
            time.sleep(0.02)
        late.target = app
        try:
            yield
        finally:
            late.target = None


@pytest.fixture(scope="module")
def open_app(tiny_model: Path) -> Iterator[None]:
    with _serving(OPEN_APP, tiny_model, None, OPEN_DOC):
        yield


@pytest.fixture(scope="module")
def keyed_app(tiny_model: Path) -> Iterator[None]:
    with _serving(KEYED_APP, tiny_model, API_KEY, KEYED_DOC):
        yield


#: Real images to put in generated bodies: random bytes alone never reach a 200 of /predict.
IMAGES = st.one_of(
    st.none(),
    st.sampled_from(
        [
            jpeg_bytes(label=1, seed=5),
            encode(synthetic_xray(0, seed=6, size=64), "PNG"),
            dicom_bytes(np.tile(np.arange(64, dtype=np.uint16) * 64, (48, 1))),
        ]
    ),
)


def _with_image(case: schemathesis.Case, image: bytes | None) -> None:
    """Swap the generated file (the first, for the batch) for ``image``, if there is one."""
    body = case.body
    if image is None or not isinstance(body, dict):
        return
    if "file" in body:
        body["file"] = image
    elif isinstance(body.get("files"), list) and body["files"]:
        body["files"][0] = image


def _excluded_checks(case: schemathesis.Case) -> list[Any]:
    """Checks that cannot hold for a route, and why."""
    if case.operation.path == "/predict":
        # A schema cannot say that the binary `file` must be a JPEG, PNG or DICOM of at least
        # 32x32 pixels, so schema-valid bytes are rightly refused (415, 422).
        return [schemathesis.checks.positive_data_acceptance]
    if case.operation.path == "/predict/batch":
        # On the wire every multipart part is bytes: a part holding `{}` ("wrong type" to
        # Schemathesis) is as binary as a JPEG, and the batch answers a bad file with 200 and
        # a per-file error. Its 400s must still be documented (status code conformance).
        return [schemathesis.checks.negative_data_rejection]
    return []


@open_schema.parametrize()
@open_schema.given(image=IMAGES)
@FUZZ
def test_without_api_key_every_operation_answers_as_documented(
    case: schemathesis.Case, image: bytes | None, open_app: None
) -> None:
    _with_image(case, image)
    case.call_and_validate(excluded_checks=_excluded_checks(case))


@keyed_schema.parametrize()
@keyed_schema.given(image=IMAGES)
@FUZZ
def test_with_api_key_every_operation_answers_as_documented(
    case: schemathesis.Case, image: bytes | None, keyed_app: None
) -> None:
    """With the right key; Schemathesis also tries none and wrong ones (must be 401)."""
    _with_image(case, image)
    case.call_and_validate(headers={"X-API-Key": API_KEY}, excluded_checks=_excluded_checks(case))


def test_auth_is_documented_as_optional_only_without_a_key() -> None:
    """Regression: without API_KEY the document demanded a key the service never checks."""
    for doc, optional in ((OPEN_DOC, True), (KEYED_DOC, False)):
        for route in ("/predict", "/predict/batch"):
            security = doc["paths"][route]["post"]["security"]
            assert ({} in security) is optional
            assert {"APIKeyHeader": []} in security and {"HTTPBearer": []} in security
