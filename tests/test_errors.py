"""The error codes: every preprocessing error has an HTTP status, kept in serve/, not preprocess."""

from __future__ import annotations

from pneumonia import preprocess
from pneumonia.preprocess import ImageError
from pneumonia.serve.errors import IMAGE_ERROR_STATUS


def _subclasses(cls: type[ImageError]) -> list[type[ImageError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _subclasses(sub)
    return out


def test_every_image_error_code_has_an_http_status() -> None:
    codes = {c.code for c in _subclasses(ImageError)}
    assert codes == set(IMAGE_ERROR_STATUS), "add the new code to serve/errors.py"


def test_preprocess_speaks_no_http() -> None:
    # Regression (issue 10): HTTP statuses lived on the preprocessing errors.
    assert not any(hasattr(c, "status") for c in _subclasses(ImageError))
    assert "status" not in vars(preprocess.ImageError)
