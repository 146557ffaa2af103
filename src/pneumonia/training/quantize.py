"""Static int8 quantization of an exported model, refitted on its own outputs (issue 23).

The fp32 graph goes through onnxruntime's static quantization: QDQ format (QuantizeLinear /
DequantizeLinear pairs around each quantized operator, the form onnxruntime recommends for
convolutional networks), weights as signed 8-bit integers per output channel, activations as
unsigned 8-bit integers with ranges from the minima and maxima seen on calibration films. The
outputs (``logit``, ``cam``, ``embedding``) stay float32, so the Predictor, the service and
``pneumonia adapt`` read the file as they read the fp32 one.

Quantization moves the logits (the issue's probe: the largest by 1.38 on 200 training films),
so nothing that reads them is carried over. The quantized file's temperature, bias, threshold
and input check are fitted again on its own outputs by the rules the base card records, through
the code that fits them for a training run: :func:`pneumonia.training.train.calibration_record`
on the stressed validation (:func:`pneumonia.training.stress.stressed_logits`), and
:func:`pneumonia.training.guard_fit.fit_split_guard`. The frontal-chest check, fitted on the
fp32 features by ``benchmarks/frontal_fit.py``, is not carried over: refit it on the quantized
file with the same script (docs/input_check.md).

Which films:

- **Calibration** (the activation ranges): :data:`CALIBRATION_FILMS` films of the training side
  of the split only, chosen by :func:`calibration_films`: the training films ordered by the
  sha256 of their path relative to the data root, the first N. A fixed rule anyone can rerun;
  no one picks films, and no validation film sets a range.
- **Refit**: the split the base model was trained on: a run's record (``pneumonia export
  --quantize int8``), or for a file whose run folder is gone, drawn again from the training
  config in its card (``pneumonia quantize``), refused unless its counts are the card's.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import platform
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumonia import __version__
from pneumonia.card import (
    GUARD_METADATA_KEY,
    Calibration,
    CardError,
    FileDigests,
    ModelCard,
    ModelRef,
    ThresholdChoice,
    read_model_card,
    weights_digest,
    with_metadata,
    write_model,
)
from pneumonia.data import Sample, class_counts, load_images, train_val_split
from pneumonia.guard import (
    DEFAULT_COMPONENTS,
    DEFAULT_MID_COMPONENTS,
    FeatureGuard,
    image_check_limits,
)
from pneumonia.preprocess import PreprocessSpec
from pneumonia.training.config import TrainConfig
from pneumonia.training.run import RecordedSplit, split_digest

log = logging.getLogger(__name__)

#: Training films whose activation ranges set the int8 scales. The issue's probe used 200 and
#: kept the validation AUC to four decimals; MinMax ranges need coverage, not numbers, and each
#: film costs a run of the augmented graph on a shared 2-core machine.
CALIBRATION_FILMS = 200
#: The build tag of a quantized file's version: ``2.0.0`` -> ``2.0.0+int8`` (docs/model.md).
INT8_BUILD = "int8"
#: How :func:`calibration_films` chooses, in the card's words.
CHOICE_RULE = (
    "the training-split films ordered by the sha256 of their path relative to the data root, "
    "the first {n} (pneumonia.training.quantize.calibration_films)"
)


class QuantizeError(ValueError):
    """A model or data that cannot be quantized as asked; the message says why and the fix."""


def int8_version(version: str) -> str:
    """The quantized file's version: its base's with ``int8`` as semver build metadata (the
    same trained network and release, another build of it): ``2.0.0`` -> ``2.0.0+int8``."""
    return f"{version.partition('+')[0]}+{INT8_BUILD}"


def film_key(sample: Sample, root: Path) -> str:
    """A film's name relative to the data root (its .npz index appended): what
    :func:`calibration_films` hashes, the same on every machine."""
    try:
        name = sample.path.relative_to(root).as_posix()
    except ValueError:
        name = sample.path.as_posix()
    return name if sample.npz_index is None else f"{name}#{sample.npz_index}"


def calibration_films(train: Sequence[Sample], root: Path, n: int | None = None) -> list[Sample]:
    """The ``n`` (default :data:`CALIBRATION_FILMS`) calibration films: of ``train`` (the
    training side of the split, never the validation side), the first ``n`` by the sha256 of
    :func:`film_key`."""
    n = CALIBRATION_FILMS if n is None else n
    if n < 1:
        raise QuantizeError(f"calibration needs at least 1 film, got {n}")
    ranked = sorted(train, key=lambda s: hashlib.sha256(film_key(s, root).encode()).hexdigest())
    return ranked[:n]


def quantize_graph(fp32: bytes, films: np.ndarray, batch: int = 20) -> bytes:
    """``fp32`` (a serialized ONNX model) statically quantized: QDQ, per-channel QInt8 weights,
    QUInt8 activations with MinMax ranges over ``films`` (N, C, H, W). Metadata is dropped (the
    caller writes the card)."""
    from pneumonia.predictor import INPUT_NAME, import_onnxruntime

    import_onnxruntime()  # telemetry off before onnxruntime.quantization imports it
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Films(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches = iter(
                [np.ascontiguousarray(films[i : i + batch]) for i in range(0, len(films), batch)]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.batches, None)
            return None if x is None else {INPUT_NAME: x}

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(with_metadata(fp32, {}))
        quantize_static(
            str(src),
            str(dst),
            Films(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        return dst.read_bytes()


def split_from_card(card: ModelCard, data: Path) -> tuple[RecordedSplit, TrainConfig]:
    """The base model's training split drawn again from its card's training config, as
    training drew it (patient-grouped, the same seed and fraction).

    Raises:
        QuantizeError: the card records no training config, or the split drawn from ``data``
            has other counts than the card recorded (other data, or another draw).
    """
    training = card.training or {}
    if "config" not in training or "data" not in training:
        raise QuantizeError(
            f"the card of {card.name} {card.version} records no training config and split "
            "counts, so its split cannot be drawn again; quantize it from its run folder "
            "(`pneumonia export RUN --quantize int8`)"
        )
    cfg = TrainConfig.from_dict(training["config"])
    drawn = train_val_split(Path(data), cfg.val_fraction, cfg.split_seed, cfg.max_images)
    recorded = training["data"]
    skipped = {str(p) for p, *_ in recorded.get("skipped", [])}
    for side, samples in (("train", drawn.train), ("validation", drawn.val)):
        kept = [s for s in samples if str(s.path) not in skipped]
        counts = class_counts(np.array([s.label for s in kept], dtype=np.int64))
        if counts != recorded[side]:
            raise QuantizeError(
                f"the {side} split drawn again from {data} has {counts}, the card of "
                f"{card.name} {card.version} recorded {recorded[side]}: not the data (or the "
                "draw) it was trained on; pass the training data root it names "
                f"({recorded.get('data_root', 'not recorded')})"
            )
    split = RecordedSplit(
        train=drawn.train,
        val=drawn.val,
        root=Path(data),
        method=drawn.method,
        description=drawn.description,
        sha256=split_digest(drawn, Path(data)),
    )
    return split, cfg


def quantize_model(
    base: Path,
    out: Path,
    split: RecordedSplit,
    cfg: TrainConfig,
    *,
    films: int | None = None,
    version: str | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Quantize the exported model ``base`` to int8 and write it to ``out`` with its card.

    Calibrates on :func:`calibration_films` of ``split.train``; refits temperature, bias and
    threshold on the stressed ``split.val`` by ``cfg``'s rules, and the input check on the
    int8 features of the split (see the module docstring).

    Args:
        split: The split ``base`` was trained on.
        cfg: Its training config (the calibration and threshold rules, the seeds).
        version: The quantized model's version; default :func:`int8_version` of the base's.

    Returns:
        The sidecar card of ``out``.

    Raises:
        QuantizeError: ``base`` is already quantized, a site model, or not ``split``'s.
    """
    import torch

    from pneumonia.predictor import Predictor, import_onnxruntime, open_session
    from pneumonia.training.guard_fit import fit_split_guard, session_features
    from pneumonia.training.stress import stressed_logits
    from pneumonia.training.train import calibration_record, session_logits

    base, out = Path(base), Path(out)
    base_card, extra, raw = read_model_card(base)
    if base_card.quantization is not None:
        raise QuantizeError(f"{base} is already quantized ({base_card.quantization['method']})")
    if base_card.site_adaptation or base_card.site_recalibration:
        raise QuantizeError(
            f"{base} is a site model (its calibration is the site's, not the training "
            "split's): quantize its base model, then fit the site on the int8 base"
        )
    spec = PreprocessSpec.from_dict(base_card.preprocess)
    chosen = calibration_films(split.train, split.root, films)
    keys = [film_key(s, split.root) for s in chosen]
    calib = load_images(chosen, spec, progress=progress)
    log.info("quantizing %s on %d training films", base, len(calib.y))
    int8 = quantize_graph(raw, calib.x)
    digest = weights_digest(int8)

    threads = threads or torch.get_num_threads()
    sess = open_session(int8, threads)
    val = load_images(split.val, spec, progress=progress)
    stressed = stressed_logits(session_logits(sess), val.x, val.y, cfg.stress_seed)
    record = calibration_record(cfg, stressed)

    guard = None
    if GUARD_METADATA_KEY in extra:
        base_guard = FeatureGuard.from_dict(json.loads(extra[GUARD_METADATA_KEY]))
        summary = base_card.input_check or {}
        guard = fit_split_guard(
            session_features(sess),
            split,
            spec,
            cfg.split_seed,
            base_guard.head.dim,
            {"weights_sha256": digest},
            components=int(summary.get("components", DEFAULT_COMPONENTS)),
            mid_components=int(summary.get("mid_components", DEFAULT_MID_COMPONENTS)),
            progress=progress,
        )
    else:
        log.warning("%s carries no fitted input check: the int8 file gets none either", base)
    if "frontal_check" in extra:
        log.warning(
            "the frontal-chest check of %s read the fp32 features and is not carried over; "
            "refit it on %s with benchmarks/frontal_fit.py --write (docs/input_check.md)",
            base,
            out,
        )

    ort = import_onnxruntime()
    import onnx

    # The base file is in memory already (read_model_card): hash those bytes, not the file again.
    base_digests = FileDigests(hashlib.sha256(raw).hexdigest(), weights_digest(raw))
    quantization = {
        "method": "static quantization, QDQ format (onnxruntime.quantization.quantize_static)",
        "per_channel": True,
        "weight_type": "QInt8",
        "activation_type": "QUInt8",
        "calibrate_method": "MinMax",
        "calibration_films": {
            "n": len(calib.y),
            "chosen": CHOICE_RULE.format(n=len(chosen)),
            "from": f"the training split of {split.root} ({split.description})",
            "split_sha256": split.sha256,
            "names_sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest(),
        },
        "refitted": (
            "temperature, bias and threshold (by the base card's rules, on the int8 model's "
            "stressed validation) and the input check (on the int8 model's features of the "
            "same split); the frontal-chest check is fitted separately (benchmarks/frontal_fit.py)"
        ),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
    }
    card = base_card.with_(
        version=version or int8_version(base_card.version),
        created=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        threshold=record["threshold"],
        threshold_rule=ThresholdChoice.from_dict(record["threshold_choice"]),
        calibration=Calibration(
            record["temperature"], record["bias"], record["calibration_fitted_on"]
        ),
        weights_sha256=digest,
        validation_metrics=record["validation"],
        stressed_validation=record["stressed_validation"],
        input_check=(
            guard.summary()
            if guard is not None
            else {
                "method": "image checks only (no fitted feature statistics)",
                "image_checks": image_check_limits(),
            }
        ),
        quantization=quantization,
        lineage=(
            ModelRef(
                base_card.name,
                base_card.version,
                base_digests.weights_sha256,
                base_digests.sha256,
                "quantized to int8 (quantization); calibration, threshold and input check "
                "refitted on this file's own outputs",
            ),
            *base_card.lineage,
        ),
        versions={
            **base_card.versions,
            "quantize.pneumonia": __version__,
            "quantize.onnxruntime": ort.__version__,
            "quantize.onnx": onnx.__version__,
            "quantize.python": platform.python_version(),
        },
    )
    meta = {GUARD_METADATA_KEY: json.dumps(guard.to_dict())} if guard is not None else {}
    sidecar = write_model(out, int8, card, meta)
    Predictor(out, threads=1)  # loads as served: float32 outputs, the card on its weights
    log.info(
        "wrote %s (%d bytes, sha256 %s; base %d bytes): threshold %.4f, temperature %.3f",
        out,
        sidecar["bytes"],
        sidecar["sha256"][:12],
        base.stat().st_size,
        card.threshold,
        card.temperature,
    )
    return sidecar


def quantize_file(
    base: Path,
    data: Path,
    out: Path,
    *,
    films: int | None = None,
    version: str | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """``pneumonia quantize``: quantize an exported model whose run folder is gone, its split
    drawn again from its card (:func:`split_from_card`).

    Raises:
        QuantizeError: see :func:`split_from_card` and :func:`quantize_model`.
    """
    try:
        card = read_model_card(Path(base))[0]
    except CardError as exc:
        raise QuantizeError(str(exc)) from None
    split, cfg = split_from_card(card, data)
    return quantize_model(
        base, out, split, cfg, films=films, version=version, threads=threads, progress=progress
    )


def quantized_path(out: Path) -> Path:
    """Where ``pneumonia export --out OUT --quantize int8`` writes the int8 file:
    ``model.onnx`` -> ``model.int8.onnx``, beside the fp32 one."""
    return Path(out).with_suffix(f".{INT8_BUILD}.onnx")


def quantize_run(
    run_dir: Path, base: Path, out: Path, *, films: int | None = None
) -> dict[str, Any]:
    """``pneumonia export RUN --quantize int8``: quantize ``base`` (the run's fresh export) on
    the split the run recorded (``split.json``, checked as every later stage checks it)."""
    from pneumonia.training.run import RunFolder, run_split

    run = RunFolder(run_dir)
    cfg = TrainConfig.load(run.config)
    return quantize_model(base, out, run_split(run, cfg), cfg, films=films, threads=cfg.threads)
