"""The error codes, written once in serve/errors.py: statuses, docs table, OpenAPI descriptions."""

from __future__ import annotations

import re

from conftest import REPO
from pneumonia import preprocess
from pneumonia.predictor import default_model_path
from pneumonia.preprocess import ImageError
from pneumonia.serve.app import create_app
from pneumonia.serve.errors import ERRORS, image_error_status, markdown_table
from pneumonia.serve.routes import BATCH_CODES, PREDICT_CODES
from pneumonia.serve.settings import Settings


def _subclasses(cls: type[ImageError]) -> list[type[ImageError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _subclasses(sub)
    return out


def test_every_image_error_code_has_an_http_status() -> None:
    for cls in _subclasses(ImageError):
        assert cls.code in ERRORS, f"add {cls.code} to ERRORS in serve/errors.py"
        assert image_error_status(cls("x")) in (400, 415, 422)


def test_preprocess_speaks_no_http() -> None:
    # Regression (issue 10): HTTP statuses lived on the preprocessing errors.
    assert not any(hasattr(c, "status") for c in _subclasses(ImageError))
    assert "status" not in vars(preprocess.ImageError)


def test_docs_error_table_is_the_registry() -> None:
    """docs/api.md's table is rendered from ERRORS; rerun `python -m pneumonia.serve.errors`."""
    docs = (REPO / "docs" / "api.md").read_text()
    start = docs.index("| Status | `code` | When |")
    end = docs.index("<!-- end of generated table -->", start)
    assert docs[start:end] == markdown_table()


def test_every_status_and_code_written_in_serve_is_the_registrys() -> None:
    """Regression (issue 10): statuses and codes were written by hand in several places."""
    written: set[tuple[int, str]] = set()
    for path in (REPO / "src" / "pneumonia" / "serve").glob("*.py"):
        text = path.read_text()
        written |= {(int(s), c) for s, c in re.findall(r'\(\s*(\d{3}),\s*"([a-z_]+)"', text)}
    assert written, "no ApiError(status, code, ...) found: the pattern is stale"
    for status, code in written:
        assert code in ERRORS and ERRORS[code].status == status, (status, code)


def test_openapi_names_each_code_under_its_status() -> None:
    spec = create_app(Settings(model_path=default_model_path())).openapi()
    for path, method, codes in (
        ("/predict", "post", PREDICT_CODES),
        ("/predict/batch", "post", BATCH_CODES),
        ("/ready", "get", ("not_ready",)),
    ):
        responses = spec["paths"][path][method]["responses"]
        for code in codes:
            description = responses[str(ERRORS[code].status)]["description"]
            assert f"`{code}`: {ERRORS[code].when}" in description
