"""Three small ASGI middlewares: request id + log line + metrics, draining the rest of a body
the app answered early, and the body size limit."""

from __future__ import annotations

import logging
import re
import time
import uuid

import anyio
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


class DrainMiddleware:
    """Lets clients that send their whole body before reading the answer read it.

    The app answers some requests before it has read their body: 413 (too large), 503
    ``queue_full``, 401, a 400 for a form without the file. Python's urllib and ``requests``
    send the whole body first and read the answer after; if the server closes the
    connection with body bytes still unread, the kernel answers them with a reset and the
    client gets ``ConnectionResetError`` instead of the error (curl waits for ``100
    Continue`` and is spared). So such an answer is sent at once, marked ``Connection:
    close``, and before it is completed (which closes the connection) the rest of the body
    is read and thrown away: at most ``max_bytes`` more, for at most ``timeout_s``. A body
    whose declared ``Content-Length`` leaves more than ``max_bytes`` unread is not drained at
    all: past the bound the connection is closed right after the answer.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        # RFC 9112 section 6.3: a request has a body only with a length or transfer-encoding.
        if not (declared.isdigit() and int(declared) > 0) and "transfer-encoding" not in headers:
            await self.app(scope, receive, send)
            return
        received = 0
        body_done = False
        answered_early = False

        async def tracking_receive() -> Message:
            nonlocal received, body_done
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
            else:  # http.disconnect: nothing more will come
                body_done = True
            return message

        async def draining_send(message: Message) -> None:
            nonlocal answered_early
            if message["type"] == "http.response.start" and not body_done:
                answered_early = True
                MutableHeaders(scope=message)["Connection"] = "close"
            elif (
                message["type"] == "http.response.body"
                and answered_early
                and not message.get("more_body", False)
            ):
                # The answer's bytes go out now; completing the response closes the
                # connection, so that waits until the body is drained.
                if message.get("body"):
                    await send({**message, "more_body": True})
                if not body_done:
                    await self._drain(tracking_receive, received, declared)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send(message)

        await self.app(scope, tracking_receive, draining_send)

    async def _drain(self, receive: Receive, received: int, declared: str) -> None:
        if declared.isdigit() and int(declared) - received > self.max_bytes:
            return
        drained = 0
        with anyio.move_on_after(self.timeout_s):
            while drained <= self.max_bytes:
                message = await receive()
                if message["type"] != "http.request":
                    return
                drained += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return


class BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413 as soon as the limit passes.

    (:class:`DrainMiddleware`, outside it, then reads and discards the rest within its bound,
    without keeping it.) A declared ``Content-Length`` over the limit is refused before the app runs. Otherwise the
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
