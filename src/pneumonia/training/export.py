"""Export a training run to one ONNX file that carries its model card, plus sidecar cards."""

from __future__ import annotations

import datetime as dt
import json
import logging
import platform
from pathlib import Path
from typing import Any

import numpy as np

from pneumonia import __version__
from pneumonia.card import (
    GUARD_METADATA_KEY,
    Calibration,
    Dataset,
    ModelCard,
    ThresholdChoice,
    weights_digest,
    write_model,
)
from pneumonia.guard import (
    EMBEDDING_OUTPUT,
    FeatureGuard,
    image_check_limits,
)
from pneumonia.predictor import (
    INPUT_NAME,
    OUTPUT_NAMES_WITH_EMBEDDING,
    Predictor,
    sha256_file,
)
from pneumonia.training.config import TrainConfig
from pneumonia.training.run import (
    RunFolder,
    SplitRecordError,
    check_split_digest,
    read_environment,
    run_split,
)

log = logging.getLogger(__name__)

#: Tolerance for ONNX Runtime vs PyTorch logits, checked at every export.
PARITY_ATOL = 1e-4
#: The version a model gets when the exporter names none (a release sets its own, docs/model.md).
DEFAULT_MODEL_VERSION = "0.1.0"


def threshold_choice(calib: dict[str, Any]) -> ThresholdChoice:
    """How a run's calibration.json says its threshold was chosen (older runs: without which
    constraint bound it, which they did not record)."""
    if "threshold_choice" in calib:
        return ThresholdChoice.from_dict(calib["threshold_choice"])
    stressed = calib.get("calibrate_on") == "stressed"
    return ThresholdChoice.from_dict(
        {
            "rule": calib["threshold_rule"],
            "min_sensitivity": calib.get("min_sensitivity"),
            "fitted_on": "the clean validation split" if stressed else "the validation split",
            **(
                {"youden_on": "the pooled stressed validation"}
                if calib["threshold_rule"] == "stressed_youden"
                else {}
            ),
        }
    )


def _model_card(
    run_dir: Path,
    cfg: TrainConfig,
    calib: dict[str, Any],
    name: str,
    version: str,
    n_params: int,
    weights_sha256: str,
    input_check: dict[str, Any],
) -> ModelCard:
    import onnx
    import torch

    from pneumonia.predictor import import_onnxruntime

    onnxruntime = import_onnxruntime()
    data = dict(calib["data"])
    dataset = data.pop("dataset", None)
    return ModelCard(
        name=name,
        version=version,
        created=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        threshold=calib["threshold"],
        threshold_rule=threshold_choice(calib),
        calibration=Calibration(
            temperature=calib["temperature"],
            bias=calib["bias"],
            fitted_on=calib.get("calibration_fitted_on")
            or (
                "the pooled stressed validation (the validation split under fixed "
                "perturbations, clean included)"
                if calib.get("calibrate_on") == "stressed"
                else "the validation split"
            ),
        ),
        preprocess=cfg.preprocess.to_dict(),
        input={
            "name": INPUT_NAME,
            "dtype": "float32",
            "shape": ["N", *cfg.preprocess.input_shape],
            "range": list(cfg.preprocess.value_range),
        },
        outputs={
            OUTPUT_NAMES_WITH_EMBEDDING[0]: "raw logit of PNEUMONIA, shape (N,)",
            OUTPUT_NAMES_WITH_EMBEDDING[1]: "class activation map, shape (N, h, w); its spatial "
            "mean is the logit",
            EMBEDDING_OUTPUT: (
                "for the input check: the pooled penultimate features of every member, then "
                "their mid-level feature statistics, concatenated, shape (N, D + M)"
            ),
        },
        architecture={**cfg.model.to_dict(), "members": len(cfg.seeds), "parameters": n_params},
        weights_sha256=weights_sha256,
        dataset=Dataset.from_dict(dataset) if dataset else None,
        training={"config": cfg.to_dict(), "data": data, "members": calib["members"]},
        validation_metrics=calib["validation"],
        stressed_validation=calib.get("stressed_validation"),
        input_check=input_check,
        versions=card_versions(
            RunFolder(run_dir),
            {
                "pneumonia": __version__,
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
                "python": platform.python_version(),
            },
        ),
        run_dir=run_dir.name,
    )


def traced_graph(net: Any, input_shape: tuple[int, ...], output_names: list[str]) -> Any:
    """``net`` traced to an ONNX graph (opset 17, batch axis free) and folded (an
    ``onnx.ModelProto``): what export writes and what guard fit runs its films through."""
    import tempfile

    import onnx
    import onnxscript.optimizer
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "net.onnx"
        torch.onnx.export(
            net,
            (torch.rand(2, *input_shape),),
            str(path),
            input_names=[INPUT_NAME],
            output_names=output_names,
            dynamic_axes={INPUT_NAME: {0: "N"}, **{o: {0: "N"} for o in output_names}},
            opset_version=17,
            dynamo=False,
        )
        proto = onnx.load(str(path))
    # Fold what the tracer left as run-time arithmetic (the pads of the stride-2 "SAME"
    # convolutions are reversed with a step -1 Slice that torch's folding skips), so
    # onnxruntime sees constants it can fuse: EfficientNet-Lite0 runs about 1.6x faster.
    return onnxscript.optimizer.optimize(proto)


def card_versions(run: RunFolder, export: dict[str, str]) -> dict[str, str]:
    """The card's ``versions``: the exporting process's (``export``), then each recorded stage
    of the run's ``environment.json`` as ``STAGE.PACKAGE`` (``train.torch``,
    ``train.threads``, ``guard_fit.onnxruntime``, ...): the versions that made the weights,
    calibration and input check, not those of the machine that happened to export them."""
    versions = dict(export)
    for stage, env in read_environment(run).items():
        versions.update({f"{stage}.{k}": v for k, v in env.items()})
    return versions


def check_run_split(run: RunFolder, calib: dict[str, Any]) -> None:
    """Refuse to export a run whose calibration or input check was made on another split
    than its record (``split.json``); runs that predate split records pass unchecked.

    Raises:
        SplitRecordError: the record was edited, or a stage used another split.
    """
    if not run.split.is_file():
        log.warning("%s predates split records: its split is not checked", run.path)
        return
    cfg = TrainConfig.load(run.config)
    split = run_split(run, cfg, films=False)
    calibrated_on = calib.get("data", {}).get("split_sha256")
    if calibrated_on is None:
        raise SplitRecordError(
            f"{run.calibration} names no split; rerun `pneumonia calibrate {run.path}`"
        )
    check_split_digest(str(run.calibration), calibrated_on, split)
    if run.guard.is_file():
        fitted = json.loads(run.guard.read_text()).get("fitted", {})
        check_split_digest(str(run.guard), fitted.get("split_sha256"), split)


def load_run_guard(run_dir: Path) -> FeatureGuard | None:
    """The input check fitted for this run's current checkpoints, or None if there is none.

    Raises:
        ValueError: ``guard.json`` was fitted on other checkpoints (refit it).
    """
    run = RunFolder(run_dir)
    path = run.guard
    if not path.is_file():
        log.warning(
            "%s is missing: the model is exported without the feature-space input check "
            "(only the image checks will run); run `pneumonia guard fit %s` first",
            path,
            run_dir,
        )
        return None
    guard = FeatureGuard.from_dict(json.loads(path.read_text()))
    current = [sha256_file(p) for p in run.checkpoints()]
    if guard.fitted.get("members_sha256") != current:
        raise ValueError(
            f"{path} was fitted on other checkpoints than the run's; rerun `pneumonia guard fit {run_dir}`"
        )
    return guard


def export_run(
    run_dir: Path, out: Path, name: str | None = None, version: str | None = None
) -> dict[str, Any]:
    """Export the ensemble of a run folder to ``out`` (ONNX) with card JSON and Markdown beside it.

    The run's fitted input check (``guard.json``, from ``pneumonia guard fit``) goes into the
    file beside the card, its summary into the card. Checks that onnxruntime reproduces the
    PyTorch logits, CAMs and features within ``PARITY_ATOL``.

    Args:
        version: The model's own version (a release's, docs/model.md), not the package's;
            default :data:`DEFAULT_MODEL_VERSION`.

    Returns:
        The sidecar card (the card's public form plus ``sha256``, ``file`` and ``bytes``).
    """
    import onnx
    import torch

    from pneumonia.training.model import EnsembleForExport
    from pneumonia.training.train import load_member

    run_dir, out = Path(run_dir), Path(out)
    run = RunFolder(run_dir)
    cfg = TrainConfig.load(run.config)
    if not run.calibration.is_file():
        raise FileNotFoundError(f"{run.calibration} is missing; the training run did not finish")
    calib = json.loads(run.calibration.read_text())
    check_run_split(run, calib)
    members = [load_member(p) for p in run.checkpoints()]
    net = EnsembleForExport(members).eval()
    n_params = sum(p.numel() for p in net.parameters())
    name = name or f"pneumonia-{cfg.model.arch}"
    guard = load_run_guard(run_dir)
    check = (
        guard.summary()
        if guard is not None
        else {
            "method": "image checks only (no fitted feature statistics)",
            "image_checks": image_check_limits(),
        }
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    proto = traced_graph(net, cfg.preprocess.input_shape, list(OUTPUT_NAMES_WITH_EMBEDDING))
    del proto.metadata_props[:]
    proto.producer_name = "pneumonia-detection"
    proto.producer_version = __version__
    onnx.checker.check_model(proto)
    raw = proto.SerializeToString()
    card = _model_card(
        run_dir,
        cfg,
        calib,
        name,
        version or DEFAULT_MODEL_VERSION,
        n_params,
        weights_digest(raw),
        check,
    )
    extra = {GUARD_METADATA_KEY: json.dumps(guard.to_dict())} if guard is not None else {}
    # Each file whole or not at all: a model being served from OUT is never seen half-written.
    sidecar = write_model(out, raw, card, extra)

    # Parity: the exported graph must reproduce the PyTorch ensemble.
    check_x = torch.rand(4, *cfg.preprocess.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_logit, ref_cam, ref_emb = net(check_x)
    got = Predictor(out, threads=1).scores(check_x.numpy(), cams=True)
    logits, cams, emb = got.logits, got.cams, got.features
    assert cams is not None
    # Logits agree absolutely; CAMs relative to their scale (the baseline's per-pixel map is
    # the logit's 1024 terms times 1024, so float32 rounding alone reaches 1e-4 there).
    cam_scale = max(1.0, float(np.abs(ref_cam.numpy()).max()))
    emb_scale = max(1.0, float(np.abs(ref_emb.numpy()).max()))
    assert emb is not None
    err = max(
        float(np.abs(logits - ref_logit.numpy()).max()),
        float(np.abs(cams - ref_cam.numpy()).max()) / cam_scale,
        float(np.abs(emb - ref_emb.numpy()).max()) / emb_scale,
    )
    if err > PARITY_ATOL:
        raise RuntimeError(f"ONNX export disagrees with PyTorch by {err:.2e} (> {PARITY_ATOL})")
    log.info(
        "exported %s (%d bytes, sha256 %s, weights %s, parity %.1e)",
        out,
        sidecar["bytes"],
        sidecar["sha256"][:12],
        card.weights_sha256[:12],
        err,
    )
    return sidecar
