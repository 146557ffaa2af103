"""Every error the service answers, in one JSON shape: ``{"error": {"code", "message"}}``.

Codes are stable (clients may branch on them); messages say what to do. Exception text from
inside the service is never echoed: unexpected failures answer ``internal_error`` and are
logged with the request id.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pneumonia.preprocess import MAX_DECODE_BYTES, MAX_PIXELS, MIN_SIDE, ImageError
from pneumonia.serve.schemas import ErrorResponse

log = logging.getLogger("pneumonia.serve")


@dataclass(frozen=True)
class ErrorCode:
    """One stable error code: the HTTP status it answers with and when it is answered.

    ``when`` is Markdown, written for clients. It is the only description of the code: the
    error table of docs/api.md is rendered from these (``python -m pneumonia.serve.errors``,
    kept equal by tests/test_docs.py) and the OpenAPI ``responses`` of each route are built
    from them by :func:`openapi_responses`.
    """

    code: str
    status: int
    when: str


#: Every code the service answers with, in the order of the docs table (by status).
ERRORS: dict[str, ErrorCode] = {
    e.code: e
    for e in (
        ErrorCode(
            "missing_file",
            400,
            "not `multipart/form-data`, or no part in the field `file` (`files` for the batch); "
            "the message names the fields it found",
        ),
        ErrorCode("empty_file", 400, "the file has no bytes"),
        ErrorCode(
            "invalid_multipart",
            400,
            "malformed multipart body, no boundary, or a body cut off before its closing boundary",
        ),
        ErrorCode(
            "too_many_files",
            400,
            "more than one `file` on `/predict`, or more than `MAX_BATCH_FILES` on "
            "`/predict/batch` (refused as soon as the extra part starts)",
        ),
        ErrorCode("too_many_parts", 400, "more than `MAX_BATCH_FILES + 16` form parts of any name"),
        ErrorCode(
            "unauthorized",
            401,
            "`API_KEY` is set and the request has no key or a wrong one "
            "(`WWW-Authenticate: Bearer`)",
        ),
        ErrorCode("not_found", 404, "no such route"),
        ErrorCode("method_not_allowed", 405, "the route exists, the method does not"),
        ErrorCode("upload_timeout", 408, "the body took longer than `UPLOAD_TIMEOUT_S` to arrive"),
        ErrorCode(
            "payload_too_large",
            413,
            "the body is over `MAX_UPLOAD_MB`: refused up front from `Content-Length`, or, for "
            "bodies without it (chunked), at the read that passes the limit, without reading "
            "the rest",
        ),
        ErrorCode(
            "unsupported_format",
            415,
            "not JPEG, PNG or DICOM (the message names GIF, BMP, TIFF, WebP, PDF, JPEG 2000 "
            "when it recognises them)",
        ),
        ErrorCode(
            "unsupported_transfer_syntax",
            415,
            "a compressed DICOM transfer syntax this installation does not decode; send it "
            "uncompressed (Explicit VR Little Endian) or as JPEG/PNG",
        ),
        ErrorCode(
            "undecodable_image",
            422,
            "JPEG/PNG/DICOM data the decoder cannot read that no check of its format caught, "
            "DICOM without pixel data",
        ),
        ErrorCode(
            "corrupt_image",
            422,
            "the file fails a check its own format carries, so it was damaged in transfer or on "
            "disk; the message names the check: a PNG chunk's CRC, the Adler-32 or the length "
            "of a PNG's image data, a PNG that ends before its IEND chunk, a JPEG whose scan "
            "data ends without its end-of-image marker, DICOM pixel data shorter than its header "
            "says or cut off by the end of the file, a Deflated DICOM stream cut short. Checked "
            "before decoding; never classified",
        ),
        ErrorCode("image_too_small", 422, f"a side under {MIN_SIDE} pixels"),
        ErrorCode(
            "decompression_bomb",
            422,
            f"more than {MAX_PIXELS:,} pixels, or an image whose decoding would hold more than "
            f"{MAX_DECODE_BYTES // 2**20} MiB (colour PNGs over 4096×4096, 16-bit PNGs over "
            "33.5 M pixels, large progressive JPEGs and compressed DICOMs; see "
            "[operations.md](operations.md#memory-per-request)); both checked from the header, "
            "before decoding",
        ),
        ErrorCode(
            "not_a_chest_xray",
            422,
            "the input check found the image is not a chest X-ray (a photo, document, "
            "screenshot, blank, gradient or noise image); the message says why and what was "
            "expected. `INPUT_CHECK=flag` answers such images instead, flagged "
            "([input_check.md](input_check.md))",
        ),
        ErrorCode(
            "not_a_frontal_chest_xray",
            422,
            "the frontal-chest check found a radiograph or medical image that is not a frontal "
            "chest film: another body part, another modality (CT, MRI, ultrasound, "
            "mammography) or a lateral chest view, by its image or by its DICOM header "
            "(BodyPartExamined, ViewPosition, Modality); the message names what it looks like. "
            "`INPUT_CHECK=flag` answers such images instead, flagged; "
            "`INPUT_CHECK_HEADERS=ignore` stops headers from refusing "
            "([input_check.md](input_check.md))",
        ),
        ErrorCode(
            "invalid_image",
            422,
            "an image that cannot become model input for a reason not above (none today)",
        ),
        ErrorCode("validation_error", 422, "a bad query parameter, e.g. `?heatmap=maybe`"),
        ErrorCode(
            "client_disconnected",
            499,
            "never sent: the client hung up before its upload arrived; the status appears only "
            'in `/metrics` and the logs (nginx\'s "client closed request"), so that vanished '
            "clients do not count as server errors",
        ),
        ErrorCode(
            "internal_error",
            500,
            "an unexpected failure; logged with the request id and traceback, never echoed",
        ),
        ErrorCode(
            "queue_full",
            503,
            "`MAX_CONCURRENCY` jobs run and `QUEUE_SIZE` wait; `Retry-After` (seconds) estimates "
            "when a slot frees",
        ),
        ErrorCode(
            "queue_timeout",
            503,
            "no slot freed within `QUEUE_TIMEOUT_S`; `Retry-After` as above",
        ),
        ErrorCode("not_ready", 503, "`/ready` before warm-up ends (`Retry-After: 1`)"),
    )
}

#: Codes for plain HTTP errors raised by the framework (unknown path, wrong method).
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def image_error_status(exc: ImageError) -> int:
    """The HTTP status an image error answers with.

    pneumonia.preprocess knows codes only (it is shared with training and scoring, which speak
    no HTTP); tests/test_errors.py checks that every ImageError subclass has its entry here.
    """
    return ERRORS[exc.code].status


def openapi_responses(*codes: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route that may answer ``codes``: one entry per status,
    its description naming each code and when it is answered."""
    by_status: dict[int, list[ErrorCode]] = {}
    for code in codes:
        by_status.setdefault(ERRORS[code].status, []).append(ERRORS[code])
    return {
        status: {
            "model": ErrorResponse,
            "description": "; ".join(f"`{e.code}`: {e.when}" for e in entries),
        }
        for status, entries in sorted(by_status.items())
    }


def markdown_table() -> str:
    """The error table of docs/api.md."""
    rows = ["| Status | `code` | When |", "| --- | --- | --- |"]
    rows += [f"| {e.status} | `{e.code}` | {e.when} |" for e in ERRORS.values()]
    return "\n".join(rows) + "\n"


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


if __name__ == "__main__":  # python -m pneumonia.serve.errors > the table in docs/api.md
    print(markdown_table(), end="")
