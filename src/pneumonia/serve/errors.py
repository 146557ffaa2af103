"""Every error the service answers, in one JSON shape: ``{"error": {"code", "message"}}``.

Codes are stable (clients may branch on them); messages say what to do. Exception text from
inside the service is never echoed: unexpected failures answer ``internal_error`` and are
logged with the request id.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pneumonia.preprocess import ImageError

log = logging.getLogger("pneumonia.serve")

#: Codes for plain HTTP errors raised by the framework (unknown path, wrong method).
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}

#: The HTTP status each preprocessing error code answers with. pneumonia.preprocess knows codes
#: only (it is shared with training and scoring, which speak no HTTP); tests/test_errors.py
#: checks that every ImageError subclass has its line here.
IMAGE_ERROR_STATUS: dict[str, int] = {
    "invalid_image": 422,
    "empty_file": 400,
    "unsupported_format": 415,
    "unsupported_transfer_syntax": 415,
    "undecodable_image": 422,
    "image_too_small": 422,
    "decompression_bomb": 422,
    "corrupt_image": 422,
}


def image_error_status(exc: ImageError) -> int:
    """The HTTP status an image error answers with."""
    return IMAGE_ERROR_STATUS[exc.code]


class ApiError(Exception):
    """An error answered to the client as-is: status, stable code, actionable message."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


class PayloadTooLargeError(ApiError):
    """The request body passed the size limit (raised while it streams in)."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(
            413,
            "payload_too_large",
            f"the upload is larger than the limit of {limit_bytes / (1024 * 1024):.3g} MiB; "
            "send a smaller image (downscale or re-encode it)",
        )


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=dict(headers or {}))


def internal_error_response() -> JSONResponse:
    return error_response(
        500, "internal_error", "the service failed unexpectedly; retry, and report the request id"
    )


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def _image_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ImageError)
    return error_response(image_error_status(exc), exc.code, exc.message)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    if exc.status_code == 404:
        message = f"no route {request.url.path}; see /docs for the API"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}; see /docs for the API"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, code, message, exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "header"))
        problems.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
    return error_response(
        422, "validation_error", "invalid request parameters: " + "; ".join(problems)
    )


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    log.error("unhandled error", exc_info=exc, extra={"request_id": request_id})
    return internal_error_response()


def install_error_handlers(app: FastAPI) -> None:
    """Replace FastAPI's default error bodies with the one error shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(ImageError, _image_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unhandled)
