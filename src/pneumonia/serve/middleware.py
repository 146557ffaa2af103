"""Two small ASGI middlewares: request id + log line + metrics, and the body size limit."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pneumonia.serve.errors import PayloadTooLargeError, error_response, internal_error_response
from pneumonia.serve.metrics import Metrics

log = logging.getLogger("pneumonia.serve")

REQUEST_ID_HEADER = "X-Request-ID"
# A client's own request id is kept only if it is short and plain, so it cannot forge log lines.
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def _route_label(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class ObservabilityMiddleware:
    """Gives every request an id (``X-Request-ID``), counts and times it, logs one JSON line.

    Also the last line of defence: an exception that escapes the app is logged with the request
    id and answered with a plain ``internal_error``, never with its text.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = incoming if _CLIENT_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = int(message["status"]), True
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = request_id
                for k, v in _SECURITY_HEADERS.items():
                    headers.setdefault(k, v)
            await send(message)

        self.metrics.request_started()
        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            log.error("unhandled error", exc_info=exc, extra={"request_id": request_id})
            if not started:
                await internal_error_response()(scope, receive, send_with_id)
            status = 500
        finally:
            seconds = time.perf_counter() - t0
            route = _route_label(scope)
            self.metrics.request_finished(route, scope["method"], status, seconds)
            log.info(
                "request",
                extra={
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 2),
                },
            )


class BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413, without reading the rest.

    A declared ``Content-Length`` over the limit is refused before the app runs. Otherwise the
    bytes are counted as they arrive (chunked bodies too) and the read that passes the limit
    raises :class:`PayloadTooLargeError`, which the app answers as 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            exc = PayloadTooLargeError(self.max_bytes)
            await error_response(exc.status, exc.code, exc.message)(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLargeError(self.max_bytes)
            return message

        await self.app(scope, counting_receive, send)
