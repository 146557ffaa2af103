"""The service's settings: one typed object read from the environment, checked at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pneumonia.predictor import Predictor, shipped_model_path

MIB = 1024 * 1024


class Settings(BaseSettings):
    """Everything an operator can set, each from the environment variable of the same name
    in upper case (``MODEL_PATH``, ``PORT``, ...). ``pneumonia serve`` flags override them.

    Attributes:
        model_path: Exported ``.onnx`` model (default: the model shipped with the package).
        host: Interface to listen on.
        port: TCP port to listen on.
        api_key: If set, the prediction routes require it (``X-API-Key`` or ``Authorization:
            Bearer``); health, readiness, metrics, model card and the web page stay open.
        max_upload_mb: Largest request body accepted (MiB), a single image or a whole batch;
            larger bodies are refused with 413 while they stream in.
        max_batch_files: Most files accepted by ``POST /predict/batch``.
        max_concurrency: Inference jobs run at the same time (each uses ``inference_threads``).
        queue_size: Jobs allowed to wait for a free slot; beyond that requests get 503.
        queue_timeout_s: Longest a job waits for a slot before 503.
        upload_timeout_s: Longest a client may take to send its upload before 408.
        drain_max_mb: When the service answers before it has read the whole request body
            (413, 503 ``queue_full``, 401, ...), it reads and discards at most this much more
            of the body (MiB) before it closes the connection, so that clients that send the
            whole body before reading (Python's urllib, ``requests``) get the answer instead
            of a connection reset. A body declared longer is not read: the connection is
            closed right after the answer. 0 turns draining off.
        drain_timeout_s: Longest that draining may take (seconds); then the connection is
            closed.
        inference_threads: onnxruntime threads per job; default: the CPUs the container's
            cgroup quota allows.
        graceful_timeout_s: On SIGTERM, how long requests in flight may take to finish.
        log_level: Level of the JSON logs.
        input_check: ``refuse``: answer 422 ``not_a_chest_xray`` for what the input check finds
            is not a chest X-ray; ``flag``: answer it anyway, with
            ``input_check.outcome == "not_a_chest_xray"`` (docs/input_check.md). The same
            holds for ``not_a_frontal_chest_xray`` (another body part, modality or view).
        input_check_headers: ``use``: a DICOM header naming another body part
            (BodyPartExamined), a lateral view (ViewPosition) or another modality refuses the
            file as ``not_a_frontal_chest_xray``; ``ignore``: headers are not read for it.
    """

    model_config = SettingsConfigDict(
        case_sensitive=False, extra="ignore", frozen=True, protected_namespaces=()
    )

    model_path: Path = Field(default_factory=shipped_model_path)
    host: str = Field(default="0.0.0.0", min_length=1)
    port: int = Field(default=8000, ge=1, le=65535)
    api_key: SecretStr | None = None
    max_upload_mb: float = Field(default=20.0, gt=0, le=1024)
    max_batch_files: int = Field(default=16, ge=1, le=256)
    max_concurrency: int = Field(default=1, ge=1, le=64)
    queue_size: int = Field(default=8, ge=0, le=10_000)
    queue_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    upload_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    drain_max_mb: float = Field(default=64.0, ge=0, le=1024)
    drain_timeout_s: float = Field(default=10.0, ge=0, le=600)
    inference_threads: int | None = Field(default=None, ge=1, le=256)
    graceful_timeout_s: float = Field(default=20.0, ge=0, le=3600)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    input_check: Literal["refuse", "flag"] = "refuse"
    input_check_headers: Literal["use", "ignore"] = "use"

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, v: object) -> object:
        # An empty API_KEY= in a compose file means "no key", not "the empty key".
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    @field_validator("input_check", "input_check_headers", mode="before")
    @classmethod
    def _lower_check(cls, v: object) -> object:
        return v.strip().lower() if isinstance(v, str) else v

    @property
    def max_upload_bytes(self) -> int:
        """``max_upload_mb`` in bytes."""
        return int(self.max_upload_mb * MIB)

    @property
    def drain_max_bytes(self) -> int:
        """``drain_max_mb`` in bytes."""
        return int(self.drain_max_mb * MIB)


def settings_error_message(exc: ValidationError) -> str:
    """One line naming every bad setting, its environment variable and what was expected."""
    parts = []
    for err in exc.errors():
        name = ".".join(str(x) for x in err["loc"]) or "settings"
        got = "" if name == "api_key" else f" (got {err.get('input')!r})"
        parts.append(f"{name.upper()}: {err['msg']}{got}")
    return "invalid settings: " + "; ".join(parts)


def load_predictor(settings: Settings) -> Predictor:
    """The model named by the settings, with the configured thread count.

    Raises:
        ModelLoadError: missing, corrupt or incomplete model file.
    """
    return Predictor(
        settings.model_path,
        threads=settings.inference_threads,
        refuse=settings.input_check == "refuse",
        use_headers=settings.input_check_headers == "use",
        # One image per model call, whatever predictor.BATCH becomes: onnxruntime's arena
        # keeps the largest call's activations for the life of the process, and a batch
        # upload must not grow the service's memory for good (16 images in one call keep
        # about 100 MB more; benchmarks/bench_batch.py).
        batch=1,
    )
