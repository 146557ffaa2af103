"""The API routes: thin. Read the upload, queue the job, shape the answer."""

from __future__ import annotations

import base64
import hmac
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, Security
from fastapi.responses import PlainTextResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from pneumonia.guard import NotAChestXrayError
from pneumonia.predictor import ItemError, Prediction
from pneumonia.preprocess import ImageError, sniff_format
from pneumonia.serve.errors import ApiError, openapi_responses
from pneumonia.serve.inference import JobResult, predict_job
from pneumonia.serve.metrics import CONTENT_TYPE
from pneumonia.serve.schemas import (
    BatchError,
    BatchResponse,
    ErrorDetail,
    HealthResponse,
    ImageResult,
    ModelCard,
    PredictionResponse,
    ReadyResponse,
)
from pneumonia.serve.settings import Settings
from pneumonia.serve.state import Service, get_service
from pneumonia.serve.upload import read_uploads

PREDICT_FIELD = "file"
BATCH_FIELD = "files"

_api_key_header = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="Needed only when the service runs with API_KEY set.",
)
_bearer = HTTPBearer(
    auto_error=False, description="The API key as a bearer token (alternative to X-API-Key)."
)


#: The codes each route may answer; their statuses and descriptions come from serve/errors.py.
_UPLOAD_CODES = (
    "missing_file",
    "invalid_multipart",
    "too_many_files",
    "too_many_parts",
    "unauthorized",
    "upload_timeout",
    "payload_too_large",
    "validation_error",
    "internal_error",
    "queue_full",
    "queue_timeout",
    "not_ready",
)
_IMAGE_CODES = (
    "empty_file",
    "unsupported_format",
    "unsupported_transfer_syntax",
    "undecodable_image",
    "corrupt_image",
    "image_too_small",
    "decompression_bomb",
    "not_a_chest_xray",
    "not_a_frontal_chest_xray",
)
# A batch answers 200 with each bad image's error in its entry, so image codes are /predict's.
PREDICT_CODES = (*_UPLOAD_CODES, *_IMAGE_CODES)
BATCH_CODES = _UPLOAD_CODES


def _multipart_body(field: str, many: bool) -> dict[str, Any]:
    binary = {"type": "string", "format": "binary"}
    # minItems: a batch with no file is refused (400 missing_file), so it is not valid input.
    prop = {"type": "array", "items": binary, "minItems": 1} if many else binary
    what = (
        "The chest X-rays (JPEG, PNG or DICOM), one part each."
        if many
        else ("The chest X-ray: JPEG, PNG or DICOM, recognised from its bytes.")
    )
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [field],
                        "properties": {field: {**prop, "description": what}},
                    }
                }
            },
        }
    }


def document_settings(doc: dict[str, Any], settings: Settings) -> None:
    """Fit the app's OpenAPI document to the settings it runs with, in place.

    The batch route states its MAX_BATCH_FILES as ``maxItems``. Without API_KEY no route
    needs a key: an empty security requirement beside the key schemes makes them optional
    (OpenAPI 3, Security Requirement Object), so clients and API testers expect no 401.
    """
    batch = doc["paths"]["/predict/batch"]["post"]["requestBody"]["content"]
    files = batch["multipart/form-data"]["schema"]["properties"][BATCH_FIELD]
    files["maxItems"] = settings.max_batch_files
    if settings.api_key is None:
        for operations in doc["paths"].values():
            for operation in operations.values():
                if "security" in operation:
                    operation["security"].append({})


async def require_api_key(
    request: Request,
    api_key: Annotated[str | None, Security(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """Check the API key when the service has one; compare in constant time."""
    expected = get_service(request).settings.api_key
    if expected is None:
        return
    given = api_key or (bearer.credentials if bearer else "")
    if not given or not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise ApiError(
            401,
            "unauthorized",
            "missing or wrong API key; send it in the X-API-Key header "
            "or as Authorization: Bearer <key>",
            {"WWW-Authenticate": "Bearer"},
        )


ServiceDep = Annotated[Service, Depends(get_service)]
api = APIRouter()


def _image_result(filename: str, pred: Prediction) -> dict[str, Any]:
    # Prediction.to_dict is also what `pneumonia predict` prints: one definition of the fields.
    return {"filename": filename, **pred.to_dict()}


def _record(svc: Service, job: JobResult) -> None:
    svc.metrics.observe_job(
        job.decode_s, job.inference_s, sum(isinstance(o, Prediction) for o in job.outcomes)
    )
    for o in job.outcomes:
        if isinstance(o, Prediction):
            svc.metrics.count_prediction(o.label)
            if o.check is not None:
                svc.metrics.count_input_check(o.check.outcome, "answered")
        else:
            svc.metrics.count_image_error(o.code)
            if isinstance(o, NotAChestXrayError):
                svc.metrics.count_input_check(o.code, "refused")


@api.post(
    "/predict",
    tags=["prediction"],
    summary="Classify one chest X-ray",
    response_model=PredictionResponse,
    response_model_exclude_none=True,
    responses=openapi_responses(*PREDICT_CODES),
    openapi_extra=_multipart_body(PREDICT_FIELD, many=False),
    dependencies=[Depends(require_api_key)],
)
async def predict(
    request: Request,
    response: Response,
    svc: ServiceDep,
    heatmap: Annotated[
        bool,
        Query(description="Also return `heatmap_png`: where the model saw evidence for its label."),
    ] = False,
) -> dict[str, Any]:
    """Upload one image in the multipart field `file`; get the label and its probability.

    `curl -X POST "http://localhost:8000/predict" -F "file=@chest_xray.jpeg"`
    """
    svc.queue.refuse_if_full()  # before the upload is read: a busy service answers at once
    (upload,) = await read_uploads(request, PREDICT_FIELD, 1, svc.settings.upload_timeout_s)
    t0 = time.perf_counter()
    try:
        sniff_format(upload.data)  # empty or not an image: answer before taking a queue slot
    except ImageError as exc:
        svc.metrics.count_image_error(exc.code)
        raise
    job = await svc.queue.run(predict_job, svc.predictor, [upload.data], heatmap)
    _record(svc, job)
    outcome = job.outcomes[0]
    if isinstance(outcome, ItemError):  # logged with its traceback where it happened
        raise ApiError(500, "internal_error", outcome.message)
    if isinstance(outcome, ImageError):
        raise outcome
    response.headers["Cache-Control"] = "no-store"
    body = {
        **_image_result(upload.filename, outcome),
        "model": svc.identity,
        "processing_ms": round((time.perf_counter() - t0) * 1000, 2),
        "request_id": request.state.request_id,
    }
    if job.heatmap_png is not None:
        body["heatmap_png"] = base64.b64encode(job.heatmap_png).decode("ascii")
    return body


@api.post(
    "/predict/batch",
    tags=["prediction"],
    summary="Classify several chest X-rays in one request",
    response_model=BatchResponse,
    responses=openapi_responses(*BATCH_CODES),
    openapi_extra=_multipart_body(BATCH_FIELD, many=True),
    dependencies=[Depends(require_api_key)],
)
async def predict_batch(request: Request, response: Response, svc: ServiceDep) -> dict[str, Any]:
    """Upload up to MAX_BATCH_FILES images, each a part of the multipart field `files`.

    Answers 200 with one entry per file in upload order: a result, or that file's error
    (same codes as `POST /predict`). The whole body counts against MAX_UPLOAD_MB.
    """
    svc.queue.refuse_if_full()  # before the upload is read: a busy service answers at once
    uploads = await read_uploads(
        request, BATCH_FIELD, svc.settings.max_batch_files, svc.settings.upload_timeout_s
    )
    t0 = time.perf_counter()
    job = await svc.queue.run(predict_job, svc.predictor, [u.data for u in uploads])
    _record(svc, job)
    results: list[dict[str, Any]] = []
    for up, outcome in zip(uploads, job.outcomes, strict=True):
        if isinstance(outcome, (ImageError, ItemError)):
            err = ErrorDetail(code=outcome.code, message=outcome.message)
            results.append(BatchError(filename=up.filename, error=err).model_dump())
        else:
            results.append(ImageResult(**_image_result(up.filename, outcome)).model_dump())
    response.headers["Cache-Control"] = "no-store"
    return {
        "results": results,
        "model": svc.identity,
        "processing_ms": round((time.perf_counter() - t0) * 1000, 2),
        "request_id": request.state.request_id,
    }


@api.get("/health", tags=["operations"], summary="Liveness", response_model=HealthResponse)
async def health() -> dict[str, str]:
    """200 while the process answers; never touches the model."""
    return {"status": "ok"}


@api.get(
    "/ready",
    tags=["operations"],
    summary="Readiness",
    response_model=ReadyResponse,
    responses=openapi_responses("not_ready"),
)
async def ready(request: Request) -> dict[str, Any]:
    """200 once the model is loaded and one warm-up inference has run; 503 before."""
    svc = get_service(request)
    if not svc.ready:
        raise ApiError(
            503, "not_ready", "the model is warming up; retry shortly", {"Retry-After": "1"}
        )
    return {"status": "ready", "model": svc.identity}


@api.get(
    "/metrics",
    tags=["operations"],
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={
        200: {
            "content": {"text/plain": {}},
            "description": "Prometheus text exposition format 0.0.4.",
        }
    },
)
async def metrics(request: Request) -> PlainTextResponse:
    """Requests by route and status, latency, decode and inference histograms, in-flight, queue."""
    svc = getattr(request.app.state, "service", None)
    text = request.app.state.metrics.render(svc if isinstance(svc, Service) else None)
    return PlainTextResponse(text, media_type=CONTENT_TYPE)


@api.get("/model", tags=["operations"], summary="The model card", response_model=ModelCard)
async def model_card(svc: ServiceDep) -> dict[str, Any]:
    """The card exported with the model (labels, threshold, preprocessing, validation metrics,
    intended use, limitations, versions) plus the served file's `sha256`."""
    return {
        **svc.predictor.card.public(),
        "sha256": svc.predictor.sha256,
        "weights_sha256": svc.predictor.weights_sha256,
    }
