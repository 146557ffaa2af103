"""Load an exported model once; bytes in, typed prediction out. onnxruntime + numpy only."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from pneumonia.calibration import calibrated_probability
from pneumonia.card import (
    CARD_METADATA_KEY,
    FRONTAL_METADATA_KEY,
    GUARD_METADATA_KEY,
    NOT_RECORDED,
    CardError,
    ModelCard,
    file_digests,
    sidecar_card_path,
)
from pneumonia.frontal import (
    FrontalCheck,
    FrontalVerdict,
    combine,
    header_reasons,
)
from pneumonia.guard import (
    EMBEDDING_OUTPUT,
    FeatureGuard,
    InputCheck,
    image_only_check,
    image_reasons,
)
from pneumonia.labels import LABELS
from pneumonia.preprocess import (
    DecodeStats,
    ImageError,
    Preprocessed,
    PreprocessSpec,
    check_model_input,
    preprocess_image,
    preprocess_uint8,
)

log = logging.getLogger(__name__)

#: A check read from the model's metadata that reads the ``embedding`` output (its ``dim``).
_Check = TypeVar("_Check", FeatureGuard, FrontalCheck)

INPUT_NAME = "image"
OUTPUT_NAMES = ("logit", "cam")
#: Outputs of a model exported with its pooled features, for the input check (pneumonia.guard).
OUTPUT_NAMES_WITH_EMBEDDING = (*OUTPUT_NAMES, EMBEDDING_OUTPUT)


#: Environment variable naming the exported model every command and the service use.
MODEL_PATH_ENV = "MODEL_PATH"
#: onnxruntime >= 1.29 sends usage telemetry to Microsoft from Linux too and writes a device id
#: file under $TMPDIR, unless this is set before it is first imported (microsoft/onnxruntime#27379).
ORT_TELEMETRY_OPT_OUT_ENV = "ORT_DISABLE_TELEMETRY"


def import_onnxruntime() -> Any:
    """Import onnxruntime with its telemetry off (unless the operator set the variable).

    A tool that handles X-rays sends nothing anywhere and leaves nothing on disk; every
    module that needs onnxruntime imports it through here.
    """
    os.environ.setdefault(ORT_TELEMETRY_OPT_OUT_ENV, "1")
    import onnxruntime

    return onnxruntime


def open_session(model: Path | bytes, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with the project's options: every session (the service,
    scoring, evaluation, export's checks, the input-check fit, training's validation) opens
    here, so a measured option (docs/benchmarks.md) holds for all of them.

    Args:
        model: An ``.onnx`` file, or a serialized graph.
        threads: Intra-op threads; default: the CPUs the cgroup quota allows.
    """
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or available_cpus()
    opts.inter_op_num_threads = 1
    # Threads that wait between operators sleep rather than spin: on the int8 model spinning
    # costs the service 26.4 against 15.5 ms of CPU per request on 2 threads for a 7% lower
    # p50 (bench_session.py, docs/benchmarks.md); on a 0.1-CPU quota that is budget burnt.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # The arena keeps its largest allocation for the life of the session, so each run reuses
    # pages instead of mapping and faulting fresh ones (serve/heap.py sends every block over
    # 64 KiB to its own mapping). On the int8 model it cuts one image on one thread from 7.4
    # to 3.1 ms, and the service's p50 by 1.31-1.54x and its CPU per request by 5-8 ms, for
    # 3-5.5 MB more peak RSS (bench_session.py, docs/benchmarks.md). Off was the choice for
    # the float32 model, where it saved 5.4 MB for 7 ms of CPU.
    opts.enable_cpu_mem_arena = True
    # With the arena on, memory patterns (a plan of every run's buffers, kept beside it) only
    # add memory: off, the service's peak is 2.8-3.5 MB lower at the same or better p50. Prepacking
    # stays on: off, 1.36x the p50 and no memory saved.
    opts.enable_mem_pattern = False
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Below ORT_ENABLE_ALL (no layout transformations) requests take 1.5x as long. Its
    # optimization holds about 18 MB more while the session opens than after, which is why
    # `pneumonia serve` opens the model before importing the web stack (cli.cmd_serve).
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])


def shipped_model_path() -> Path:
    """The model committed under ``artifacts/`` and installed with the package."""
    return Path(str(resources.files("pneumonia.artifacts").joinpath("model.onnx")))


def default_model_path() -> Path:
    """``$MODEL_PATH`` if set, else the shipped model."""
    env = os.environ.get(MODEL_PATH_ENV)
    return Path(env) if env else shipped_model_path()


class ModelLoadError(RuntimeError):
    """The model file is missing, corrupt, or lacks what prediction needs."""


#: Images per model call on the batch path by default (scoring, evaluation, recalibration, a
#: site fit). onnxruntime's arena (open_session) keeps the largest call's activations for the
#: session's life, about 6.7 MB per image of the call. The session alone takes the same time
#: per image from 1 to 32 images per call (benchmarks/bench_batch.py), but each call also
#: runs the input checks and the calibration: `pneumonia score` on 10,000 films is 1.34-1.43x
#: faster at 8 than at 1 for 33-85 MB more (bench_score.py; docs/benchmarks.md). The service
#: makes calls of one image (serve/settings.py).
BATCH = 8


class ItemError(Exception):
    """An item :meth:`Predictor.predict` could not score for a reason outside the image's
    content: ``unreadable_file`` (the file could not be read) or ``internal_error`` (the
    decoder failed unexpectedly; logged with its traceback, never echoed)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


#: One item for :meth:`Predictor.predict`.
Item = bytes | Path | np.ndarray | Preprocessed | ImageError


@dataclass
class StageTimes:
    """Seconds :meth:`Predictor.predict` spent decoding and in the model, summed."""

    decode_s: float = 0.0
    inference_s: float = 0.0


@dataclass(frozen=True)
class Scores:
    """The model's outputs for a batch of model inputs, one row per image.

    Attributes:
        logits: Raw logits (N,).
        probabilities: Calibrated P(PNEUMONIA) (N,).
        features: The pooled ``embedding`` (N, D), None if the model has no such output.
        cams: Class-activation maps (N, h, w), if asked for.
        checks: The input check's verdict per image (never refused here).
    """

    logits: np.ndarray
    probabilities: np.ndarray
    features: np.ndarray | None
    cams: np.ndarray | None
    checks: list[InputCheck]


@dataclass(frozen=True)
class Prediction:
    """One image's result. ``probability`` is the calibrated P(PNEUMONIA) whatever the label
    (``label`` is PNEUMONIA when it reaches ``threshold``)."""

    label: str
    probability: float
    p_pneumonia: float
    p_normal: float
    threshold: float
    logit: float
    cam: np.ndarray | None = None
    check: InputCheck | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "prediction": self.label,
            "probability": self.probability,
            "probabilities": {"NORMAL": self.p_normal, "PNEUMONIA": self.p_pneumonia},
            "threshold": self.threshold,
        }
        if self.check is not None:
            d["input_check"] = self.check.to_dict()
        return d


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def available_cpus() -> int:
    """CPUs this process may use: the cgroup CPU quota if set, else the affinity mask."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, int(quota + 0.999)))
    return max(1, n)


def _cgroup_cpu_quota() -> float | None:
    try:  # cgroup v2: "max 100000" or "10000 100000"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        p = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return q / p if q > 0 and p > 0 else None
    except (OSError, ValueError):
        return None


class Predictor:
    """An exported ONNX model with its card, loaded once.

    Args:
        path: The ``.onnx`` file written by ``pneumonia export``.
        threads: onnxruntime intra-op threads; default: the CPUs the cgroup quota allows.
        refuse: Refuse what the input check finds is not a (frontal) chest X-ray
            (:class:`~pneumonia.guard.NotAChestXrayError` or its subclass
            ``NotAFrontalChestXrayError``); if False, answer it with ``check.outcome`` saying
            so (flag only).
        use_headers: Let a DICOM header that names another body part, a lateral view or
            another modality refuse the file (:func:`pneumonia.frontal.header_reasons`);
            False ignores headers.
        batch: Images per model call (and per decoding chunk); see :data:`BATCH`.

    Raises:
        ModelLoadError: missing, unreadable or incomplete model file, naming what is wrong.
    """

    def __init__(
        self,
        path: Path | str,
        threads: int | None = None,
        refuse: bool = True,
        use_headers: bool = True,
        batch: int = BATCH,
    ) -> None:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        self.batch = batch
        self.refuse = refuse
        self.use_headers = use_headers

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(
                f"model file {self.path} does not exist; set MODEL_PATH or --model to an exported .onnx"
            )
        try:
            self.session = open_session(self.path, threads)
        except Exception as exc:
            raise ModelLoadError(
                f"model file {self.path} is not a valid ONNX model ({type(exc).__name__})"
            ) from None
        try:
            digests = file_digests(self.path)
        except CardError as exc:  # onnxruntime read it, so this is unlikely; never a traceback
            raise ModelLoadError(
                f"model file {self.path} is not a valid ONNX model: {exc}"
            ) from None
        self.sha256 = digests.sha256
        #: The file without its metadata: the same whatever card it carries (pneumonia.card).
        self.weights_sha256 = digests.weights_sha256
        meta = self.session.get_modelmeta().custom_metadata_map
        if CARD_METADATA_KEY not in meta:
            raise ModelLoadError(
                f"model file {self.path} carries no model card; export it with `pneumonia export`"
            )
        try:
            card = ModelCard.from_json(meta[CARD_METADATA_KEY])
            self.spec = PreprocessSpec.from_dict(card.preprocess)
        except (CardError, ValueError, TypeError, KeyError) as exc:
            raise ModelLoadError(
                f"model card in {self.path} is invalid: {exc}; re-export the model with `pneumonia export`"
            ) from None
        if card.weights_sha256 == NOT_RECORDED:  # a card older than the digest
            card = card.with_(weights_sha256=self.weights_sha256)
        elif card.weights_sha256 != self.weights_sha256:
            raise ModelLoadError(
                f"model card in {self.path} describes other weights (weights sha256 "
                f"{card.weights_sha256[:12]}..., file has {self.weights_sha256[:12]}...)"
            )
        self.card = card
        inputs = self.session.get_inputs()
        outputs = [o.name for o in self.session.get_outputs()]
        if (
            len(inputs) != 1
            or inputs[0].name != INPUT_NAME
            or tuple(outputs) not in (OUTPUT_NAMES, OUTPUT_NAMES_WITH_EMBEDDING)
        ):
            raise ModelLoadError(
                f"model {self.path} must take '{INPUT_NAME}' and give {OUTPUT_NAMES} (and "
                f"optionally '{EMBEDDING_OUTPUT}'), got {[i.name for i in inputs]} -> {outputs}"
            )
        self.output_names = tuple(outputs)
        if list(inputs[0].shape[1:]) != list(self.spec.input_shape):
            raise ModelLoadError(
                f"model {self.path} takes input {inputs[0].shape}, but its card says {self.spec.input_shape}"
            )
        # A wrong-ranked output would not fail at load: a (N, 2) logit would silently give each
        # image another image's score, a 2-D cam would fail every heatmap request.
        got = {a.name: (a.type, a.shape) for a in (inputs[0], *self.session.get_outputs())}
        want = {
            INPUT_NAME: 4,
            OUTPUT_NAMES[0]: 1,
            OUTPUT_NAMES[1]: 3,
            **({EMBEDDING_OUTPUT: 2} if EMBEDDING_OUTPUT in got else {}),
        }
        if any(
            got[k][0] != "tensor(float)" or not isinstance(got[k][1], list) or len(got[k][1]) != n
            for k, n in want.items()
        ):
            raise ModelLoadError(
                f"model {self.path} must map float32 {INPUT_NAME} (N, C, H, W) to "
                f"{OUTPUT_NAMES[0]} (N,) and {OUTPUT_NAMES[1]} (N, h, w), got {got}"
            )
        sidecar = sidecar_card_path(self.path)
        if sidecar.is_file():
            declared = json.loads(sidecar.read_text()).get("sha256")
            if declared and declared != self.sha256:
                raise ModelLoadError(
                    f"{sidecar} describes a different file (sha256 {declared[:12]}..., file has {self.sha256[:12]}...)"
                )
        self.threshold = card.threshold
        self.temperature = card.temperature
        self.bias = card.bias
        self.guard = self._load_guard(meta)
        self.frontal = self._load_frontal(meta)

    def _load_guard(self, meta: dict[str, str]) -> FeatureGuard | None:
        """The fitted feature statistics, or None (then only the image checks run)."""
        if GUARD_METADATA_KEY not in meta:
            log.info(
                "model %s carries no fitted input check; only the image checks run "
                "(re-export it with `pneumonia guard fit` first for the feature check)",
                self.path.name,
            )
            return None
        return self._embedding_check(
            "input check statistics",
            lambda: FeatureGuard.from_dict(json.loads(meta[GUARD_METADATA_KEY])),
        )

    def _load_frontal(self, meta: dict[str, str]) -> FrontalCheck | None:
        """The fitted frontal-chest head, or None (then only DICOM headers say it)."""
        if FRONTAL_METADATA_KEY not in meta:
            log.info(
                "model %s carries no frontal-chest check; only DICOM headers can refuse another "
                "body part or view (fit one with benchmarks/frontal_fit.py --write)",
                self.path.name,
            )
            return None
        return self._embedding_check(
            "frontal-chest check", lambda: FrontalCheck.from_json(meta[FRONTAL_METADATA_KEY])
        )

    def _embedding_check(self, what: str, parse: Callable[[], _Check]) -> _Check:
        """A check stored beside the card that reads the ``embedding`` output: parsed, and its
        width checked against the graph's; raises ModelLoadError naming what is wrong."""
        if EMBEDDING_OUTPUT not in self.output_names:
            raise ModelLoadError(
                f"model {self.path} carries a {what} but no '{EMBEDDING_OUTPUT}' output"
            )
        try:
            check = parse()
        except ValueError as exc:
            raise ModelLoadError(f"model {self.path}: {exc}") from None
        width = self.embedding_width
        if width is not None and width != check.dim:
            raise ModelLoadError(
                f"model {self.path} gives {width} features but its {what} reads {check.dim}"
            )
        return check

    @property
    def embedding_width(self) -> int | None:
        """Width of the ``embedding`` output (None: no such output, or a symbolic width)."""
        if EMBEDDING_OUTPUT not in self.output_names:
            return None
        width = self.session.get_outputs()[self.output_names.index(EMBEDDING_OUTPUT)].shape[1]
        return width if isinstance(width, int) else None

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def version(self) -> str:
        return self.card.version

    def identity(self) -> dict[str, str]:
        """Which model this is: name and version from its card, the file's and the weights'
        sha256 (reports, score rows, DICOM reports and site models name it so)."""
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "weights_sha256": self.weights_sha256,
        }

    def prepare(self, data: bytes, view_side: int | None = None) -> Preprocessed:
        """Bytes to one model input and what the decoder saw, by the model's own spec (and the
        picture a heatmap is drawn on, if ``view_side``); raises ``ImageError`` on a bad image."""
        return preprocess_image(data, self.spec, view_side=view_side)

    def scores(
        self,
        x: np.ndarray,
        stats: Sequence[DecodeStats | None] | None = None,
        *,
        cams: bool = False,
    ) -> Scores:
        """The model's outputs for model inputs ``x`` (N, C, H, W), run ``batch`` at a time.

        The one place the session runs: :meth:`predict` comes here, and so do the callers that
        hold model inputs already (a site's shifted films, export's parity check).

        Args:
            x: float32 model inputs by the model's spec.
            stats: What the decoder saw per image, for the colour and DICOM-header checks.
            cams: Keep the class-activation maps (N, h, w) too.
        """
        n = len(x)
        st = list(stats) if stats is not None else [None] * n
        if len(st) != n:
            raise ValueError(f"{len(st)} decode statistics for {n} images")
        logits, feats, maps, checks = [], [], [], []
        for i in range(0, n, self.batch):
            chunk = np.ascontiguousarray(x[i : i + self.batch])
            check_model_input(chunk, self.spec)
            outs = self.session.run(list(self.output_names), {INPUT_NAME: chunk})
            logits.append(np.asarray(outs[0], dtype=np.float64).reshape(-1))
            emb = np.asarray(outs[2], dtype=np.float32) if len(outs) > 2 else None
            if emb is not None:
                feats.append(emb)
            if cams:
                maps.append(np.asarray(outs[1]))
            checks += self.input_checks(chunk, emb, st[i : i + self.batch])
        z = np.concatenate(logits) if logits else np.zeros(0)
        return Scores(
            logits=z,
            probabilities=calibrated_probability(z, self.temperature, self.bias),
            features=np.concatenate(feats) if feats else None,
            cams=np.concatenate(maps) if maps else None,
            checks=checks,
        )

    def predict(
        self,
        items: Iterable[Item],
        *,
        with_cam: bool = False,
        refuse: bool | None = None,
        times: StageTimes | None = None,
    ) -> Iterator[Prediction | ImageError | ItemError]:
        """Decode, batch and classify images, one outcome per item, in order.

        The batch path of the service, ``pneumonia predict``, ``score``, ``evaluate`` and
        ``recalibrate``: an item that cannot be read or decoded, or that the input check
        refuses, becomes its own error and never costs the others their results. Items are
        taken ``batch`` at a time, so memory stays bounded however many there are.

        Args:
            items: Encoded bytes, a file to read, a uint8 grayscale array (H, W) (an ``.npz``
                image), an image :meth:`prepare` already decoded, or the ``ImageError`` that
                kept it from being one (kept in its place).
            with_cam: Keep each prediction's class-activation map.
            refuse: Answer what the input check refuses with its error; default: the
                predictor's ``refuse``. False scores every image (evaluation, recalibration).
            times: Adds the seconds spent decoding and in the model (service metrics).
        """
        refuse = self.refuse if refuse is None else refuse
        it = iter(items)
        while chunk := list(itertools.islice(it, self.batch)):
            t0 = time.perf_counter()
            decoded = [self._decode(item) for item in chunk]
            ready = [d for d in decoded if isinstance(d, Preprocessed)]
            t1 = time.perf_counter()
            preds = iter(self._predictions(ready, with_cam) if ready else [])
            if times is not None:
                times.decode_s += t1 - t0
                times.inference_s += time.perf_counter() - t1
            for d in decoded:
                if not isinstance(d, Preprocessed):
                    yield d
                    continue
                pred = next(preds)
                if refuse and pred.check is not None and pred.check.refused:
                    yield pred.check.error()
                else:
                    yield pred

    def predict_bytes(self, data: bytes, with_cam: bool = False) -> Prediction:
        """Decode, check and classify one encoded image.

        Raises:
            ImageError: a bad image, or ``NotAChestXrayError`` when the check refuses it.
        """
        (out,) = self.predict([data], with_cam=with_cam)
        if isinstance(out, ItemError):
            raise RuntimeError(out.message)
        if isinstance(out, ImageError):
            raise out
        return out

    def _decode(self, item: Item) -> Preprocessed | ImageError | ItemError:
        if isinstance(item, (Preprocessed, ImageError)):
            return item
        try:
            if isinstance(item, np.ndarray):
                return Preprocessed(preprocess_uint8(item, self.spec))
            if isinstance(item, Path):
                try:
                    item = item.read_bytes()
                except OSError as exc:
                    return ItemError(
                        "unreadable_file",
                        f"cannot read the file: {exc.strerror or type(exc).__name__}",
                    )
            return self.prepare(item)
        except ImageError as exc:
            return exc
        except Exception as exc:  # a decoder bug costs this image, not the batch
            log.error("unexpected error decoding an image", exc_info=exc)
            return ItemError(
                "internal_error",
                "decoding this image failed unexpectedly; the log has the traceback",
            )

    def _predictions(self, ready: list[Preprocessed], with_cam: bool) -> list[Prediction]:
        out = self.scores(
            np.stack([p.input for p in ready]), [p.stats for p in ready], cams=with_cam
        )
        return [
            self._prediction(
                float(z), float(p), out.cams[i] if out.cams is not None else None, out.checks[i]
            )
            for i, (z, p) in enumerate(zip(out.logits, out.probabilities, strict=True))
        ]

    def input_checks(
        self, batch: np.ndarray, features: np.ndarray | None, stats: Sequence[DecodeStats | None]
    ) -> list[InputCheck]:
        """The input check's verdict per image (see pneumonia.guard); never raises for an image."""
        reasons = [image_reasons(x, s) for x, s in zip(batch, stats, strict=True)]
        if self.guard is None or features is None:
            base = [image_only_check(r) for r in reasons]
        else:
            base = self.guard.check(features, reasons)
        verdicts: list[FrontalVerdict | None] = [None] * len(batch)
        if self.frontal is not None and features is not None:
            verdicts = list(self.frontal.verdicts(features))
        return [
            combine(b, v, self.frontal, header_reasons(s) if self.use_headers else ())
            for b, v, s in zip(base, verdicts, stats, strict=True)
        ]

    def _prediction(
        self, logit: float, p: float, cam: np.ndarray | None, check: InputCheck | None = None
    ) -> Prediction:
        positive = p >= self.threshold
        return Prediction(
            label=LABELS[1] if positive else LABELS[0],
            probability=p,
            p_pneumonia=p,
            p_normal=1.0 - p,
            threshold=self.threshold,
            logit=logit,
            cam=cam,
            check=check,
        )

    def info(self) -> dict[str, Any]:
        """The model card (with its derived sentences) plus the file's identity."""
        return {**self.card.public(), "sha256": self.sha256, "path": str(self.path)}
