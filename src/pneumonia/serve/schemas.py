"""Typed request and response bodies; their descriptions are the API's field documentation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Label = Literal["NORMAL", "PNEUMONIA"]


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable error code, e.g. `unsupported_format`.")
    message: str = Field(description="What went wrong and what to do about it, for people.")


class ErrorResponse(BaseModel):
    """Every error, whatever the route or status."""

    error: ErrorDetail


class Probabilities(BaseModel):
    NORMAL: float = Field(
        ge=0, le=1, description="Calibrated probability of NORMAL (1 - PNEUMONIA)."
    )
    PNEUMONIA: float = Field(ge=0, le=1, description="Calibrated probability of PNEUMONIA.")


class ModelIdentity(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str = Field(description="Model name from its card.")
    version: str = Field(description="The model's own version from its card (docs/model.md).")
    sha256: str = Field(description="SHA-256 of the .onnx file being served.")
    weights_sha256: str = Field(
        description="SHA-256 of the file without its metadata (graph and weights): the same "
        "whatever card the file carries."
    )


class InputCheckResult(BaseModel):
    """What the input check made of the image (docs/input_check.md)."""

    outcome: Literal[
        "typical", "unlike_training", "not_a_chest_xray", "not_a_frontal_chest_xray"
    ] = Field(
        description="`typical`: like the training films; `unlike_training`: a radiograph unlike "
        "the films the model was trained and validated on (the answer is given, unvalidated for "
        "such films); `not_a_chest_xray` and `not_a_frontal_chest_xray` (another body part, "
        "another modality, a lateral view): only when the service runs with INPUT_CHECK=flag "
        "(otherwise such images get 422 with that code)."
    )
    score: float | None = Field(
        default=None,
        description="Distance of the image's features from the training films', in units of the "
        "flag threshold (above 1: unlike the training films); absent (or null in a batch) when "
        "the model carries no fitted feature statistics.",
    )
    refusal_score: float | None = Field(
        default=None,
        description="The distance the refusal reads (the network's mid-level feature statistics) "
        "in units of the refusal threshold: above 1 the image is refused as not a chest X-ray; "
        "null when the model carries no fitted feature statistics.",
    )
    message: str = Field(description="The outcome in words, with its reasons.")


class ImageResult(BaseModel):
    """One image's classification."""

    filename: str = Field(
        description="The uploaded file's name as the client sent it (base name only)."
    )
    prediction: Label = Field(description="PNEUMONIA if P(PNEUMONIA) >= threshold, else NORMAL.")
    probability: float = Field(
        ge=0,
        le=1,
        description="Calibrated P(PNEUMONIA), whatever the `prediction` (as in the original "
        "system's last version); the label comes from comparing it with `threshold`.",
    )
    probabilities: Probabilities = Field(description="Both class probabilities; they sum to 1.")
    threshold: float = Field(
        ge=0,
        le=1,
        description="Operating threshold on P(PNEUMONIA), chosen on validation data (see /model).",
    )
    input_check: InputCheckResult | None = Field(
        default=None,
        description="Whether the image is like the films the model was trained on (additive; "
        "the fields above keep their meaning).",
    )


class PredictionResponse(ImageResult):
    """``POST /predict``: one image's result with the model's identity and timing."""

    model_config = ConfigDict(protected_namespaces=())

    model: ModelIdentity = Field(description="Which model produced this result.")
    processing_ms: float = Field(
        description="Server time after the upload was received: queueing, decoding, model, "
        "heatmap (ms)."
    )
    request_id: str = Field(
        description="Id of this request, also in the X-Request-ID header and the logs."
    )
    heatmap_png: str | None = Field(
        default=None,
        description="Only with `?heatmap=true`: base64 PNG of the class activation map for the "
        "returned label over the image (longer side at most 512 px).",
    )


class BatchError(BaseModel):
    """One file of a batch that could not be classified."""

    filename: str = Field(description="The uploaded file's name (base name only).")
    error: ErrorDetail = Field(
        description="Why this file was refused; same codes as POST /predict."
    )


class BatchResponse(BaseModel):
    """``POST /predict/batch``: one entry per uploaded file, in upload order."""

    model_config = ConfigDict(protected_namespaces=())

    results: list[ImageResult | BatchError] = Field(
        description="Per file, in upload order: a result, or an `error` object for that file."
    )
    model: ModelIdentity
    processing_ms: float = Field(description="Server time after the upload was received (ms).")
    request_id: str


class HealthResponse(BaseModel):
    status: Literal["ok"] = Field(description="Always `ok` when the process answers.")


class ReadyResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    status: Literal["ready"] = Field(description="`ready`: the model is loaded and warmed up.")
    model: ModelIdentity


#: The model card is the exported card plus ``sha256``; its keys are documented in docs/api.md.
ModelCard = dict[str, Any]
