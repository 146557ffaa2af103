"""The FastAPI application: built by :func:`create_app`, run by :func:`serve`.

Importing this module loads no model; the model is loaded when the app starts (lifespan),
or before, by ``pneumonia serve``, so that a bad model stops start-up with one clear line.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
from fastapi import FastAPI
from starlette.middleware import Middleware

from pneumonia import __version__
from pneumonia.predictor import Predictor
from pneumonia.serve.errors import install_error_handlers
from pneumonia.serve.inference import InferenceQueue
from pneumonia.serve.metrics import Metrics
from pneumonia.serve.middleware import (
    BodyLimitMiddleware,
    DrainMiddleware,
    ObservabilityMiddleware,
)
from pneumonia.serve.routes import api, document_settings
from pneumonia.serve.settings import Settings, load_predictor
from pneumonia.serve.state import Service
from pneumonia.serve.web import web

log = logging.getLogger("pneumonia.serve")

DESCRIPTION = """\
Pneumonia detection on pediatric chest X-rays, served with onnxruntime.

**Not a diagnostic device.** Every output must be reviewed by a qualified clinician; see
`GET /model` for the model's intended use and limits.

Errors always have the shape `{"error": {"code": ..., "message": ...}}`.
"""


def create_app(settings: Settings | None = None, predictor: Predictor | None = None) -> FastAPI:
    """Build the application.

    Args:
        settings: Service settings; default: read from the environment.
        predictor: An already loaded model (``pneumonia serve`` loads it first to fail fast);
            default: loaded from ``settings.model_path`` when the app starts.
    """
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pred = (
            predictor
            if predictor is not None
            else await anyio.to_thread.run_sync(load_predictor, settings)
        )
        queue = InferenceQueue(
            settings.max_concurrency, settings.queue_size, settings.queue_timeout_s
        )
        svc = Service(settings=settings, predictor=pred, queue=queue, metrics=metrics)
        app.state.service = svc
        log.info(
            "model loaded",
            extra={
                "model": pred.name,
                "version": pred.version,
                "sha256": pred.sha256,
                "threads": pred.session.get_session_options().intra_op_num_threads,
                "max_concurrency": settings.max_concurrency,
                "queue_size": settings.queue_size,
                "api_key": settings.api_key is not None,
            },
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(svc.warm_up)
            yield
            tg.cancel_scope.cancel()
        log.info("stopped")

    app = FastAPI(
        title="Pneumonia detection API",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        middleware=[
            Middleware(ObservabilityMiddleware, metrics=metrics),
            Middleware(
                DrainMiddleware,
                max_bytes=settings.drain_max_bytes,
                timeout_s=settings.drain_timeout_s,
            ),
            Middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes),
        ],
    )
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(api)
    app.include_router(web)
    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        first = app.openapi_schema is None
        doc = build_openapi()  # built once, then cached by FastAPI
        if first:
            document_settings(doc, settings)
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def serve(settings: Settings, predictor: Predictor | None = None) -> int:
    """Load the model (unless given), then run the app under uvicorn until SIGINT/SIGTERM.

    On SIGTERM uvicorn stops accepting connections and lets requests in flight finish (up to
    ``graceful_timeout_s``) before the process exits with status 0.

    Returns:
        0 after a clean shutdown (SIGTERM included), 1 if the server could not start (e.g. port in use).

    Raises:
        ModelLoadError: the model cannot be loaded (the caller prints it as one line).
    """
    import uvicorn

    from pneumonia.serve.logs import configure_logging

    predictor = predictor or load_predictor(settings)
    configure_logging(settings.log_level)
    config = uvicorn.Config(
        create_app(settings, predictor),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        server_header=False,
        lifespan="on",
        timeout_graceful_shutdown=round(settings.graceful_timeout_s),
    )
    server = uvicorn.Server(config)

    def stop(signum: int, frame: object) -> None:
        server.should_exit = True

    # uvicorn catches SIGTERM, shuts down gracefully, then raises the signal again for the
    # handler that was installed before it (cooperative signal handling, uvicorn >= 0.29).
    # With Python's default handler that kills the process, whose status then reads -15
    # although the shutdown was clean. SIGTERM is how a service is meant to be stopped, so
    # this handler takes it instead and the process exits with 0. (A SIGTERM that comes
    # before uvicorn has installed its own handler stops the server all the same.)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if server.started else 1
