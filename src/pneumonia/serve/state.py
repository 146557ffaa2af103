"""What the running service holds: settings, the loaded model, its queue and metrics."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image
from starlette.requests import Request

from pneumonia.predictor import Predictor
from pneumonia.serve.errors import ApiError
from pneumonia.serve.inference import InferenceQueue, predict_job
from pneumonia.serve.metrics import Metrics
from pneumonia.serve.schemas import ModelIdentity
from pneumonia.serve.settings import Settings

log = logging.getLogger("pneumonia.serve")


@dataclass
class Service:
    """The service's one instance of everything, kept on ``app.state.service``."""

    settings: Settings
    predictor: Predictor
    queue: InferenceQueue
    metrics: Metrics
    ready: bool = False

    @property
    def identity(self) -> ModelIdentity:
        p = self.predictor
        return ModelIdentity(**p.identity())

    async def warm_up(self) -> None:
        """One full request's work (decode, model, heatmap) so the first real one is not slow."""
        size = self.predictor.spec.size
        ramp = np.tile(np.linspace(0, 255, size, dtype=np.float32), (size, 1)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(ramp).save(buf, format="PNG")
        try:
            await self.queue.run(predict_job, self.predictor, [buf.getvalue()], True)
        except Exception:
            log.exception("warm-up failed; the service stays not ready")
            return
        self.ready = True
        log.info("ready", extra={"model": self.predictor.name, "sha256": self.predictor.sha256})


def get_service(request: Request) -> Service:
    """The running service, or 503 while the model is still loading."""
    svc = getattr(request.app.state, "service", None)
    if svc is None:
        raise ApiError(
            503, "not_ready", "the model is still loading; retry shortly", {"Retry-After": "1"}
        )
    assert isinstance(svc, Service)
    return svc
