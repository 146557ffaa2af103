"""Export a training run to one ONNX file that carries its model card, plus sidecar cards."""

from __future__ import annotations

import datetime as dt
import json
import logging
import platform
from pathlib import Path
from typing import Any

import numpy as np

from pneumonia import __version__, atomic
from pneumonia.guard import (
    EMBEDDING_OUTPUT,
    GUARD_METADATA_KEY,
    FeatureGuard,
    image_check_limits,
    rates_table,
)
from pneumonia.labels import LABELS
from pneumonia.predictor import (
    CARD_METADATA_KEY,
    INPUT_NAME,
    OUTPUT_NAMES_WITH_EMBEDDING,
    Predictor,
    sha256_file,
    sidecar_card_path,
)
from pneumonia.training.config import TrainConfig

log = logging.getLogger(__name__)

INTENDED_USE = (
    "Research and engineering use: triage support, dataset audits and benchmarking of "
    "pneumonia detection on pediatric chest X-rays. Not a diagnostic device; every output "
    "must be reviewed by a qualified clinician."
)
LIMITATIONS = [
    "Trained only on pediatric (1-5 years) anterior-posterior chest films from one hospital "
    "(Guangzhou Women and Children's Medical Center, Kermany et al. 2018).",
    "Not validated on adults, lateral views, other hospitals, scanners or populations.",
    "Binary NORMAL vs PNEUMONIA only; it does not tell bacterial from viral pneumonia and "
    "says nothing about other findings.",
    "The official test set differs from the training distribution; scores on new sources can "
    "be lower and the threshold may need re-validation on local data.",
    "Not a diagnostic device; not cleared or approved by any regulator.",
]

#: Tolerance for ONNX Runtime vs PyTorch logits, checked at every export.
PARITY_ATOL = 1e-4


def _model_card(
    run_dir: Path, cfg: TrainConfig, calib: dict[str, Any], name: str, n_params: int
) -> dict[str, Any]:
    import onnx
    import torch

    from pneumonia.predictor import import_onnxruntime

    onnxruntime = import_onnxruntime()

    return {
        "name": name,
        "version": __version__,
        "created": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "labels": list(LABELS),
        "positive_label": LABELS[1],
        "threshold": calib["threshold"],
        "threshold_rule": {
            "rule": calib["threshold_rule"],
            "min_sensitivity": calib["min_sensitivity"],
            "description": "highest threshold on calibrated P(PNEUMONIA) whose validation "
            "sensitivity is at least min_sensitivity"
            if calib["threshold_rule"] == "min_sensitivity"
            else "Youden's J on validation",
        },
        "temperature": calib["temperature"],
        "bias": calib["bias"],
        "calibration": "temperature and bias fitted on the validation split: p = sigmoid(logit / temperature + bias)",
        "preprocess": cfg.preprocess.to_dict(),
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "shape": ["N", *cfg.preprocess.input_shape],
            "range": list(cfg.preprocess.value_range),
        },
        "outputs": {
            OUTPUT_NAMES_WITH_EMBEDDING[0]: "raw logit of PNEUMONIA, shape (N,)",
            OUTPUT_NAMES_WITH_EMBEDDING[
                1
            ]: "class activation map, shape (N, h, w); its spatial mean is the logit",
            EMBEDDING_OUTPUT: (
                "for the input check: the pooled penultimate features of every member, then "
                "their mid-level feature statistics, concatenated, shape (N, D + M)"
            ),
        },
        "architecture": {**cfg.model.to_dict(), "members": len(cfg.seeds), "parameters": n_params},
        "training": {
            "config": cfg.to_dict(),
            "data": calib["data"],
            "members": calib["members"],
        },
        "validation_metrics": calib["validation"],
        "calibrated_on": calib.get("calibrate_on", "clean"),
        "stressed_validation": calib.get("stressed_validation"),
        "intended_use": INTENDED_USE,
        "limitations": LIMITATIONS,
        "versions": {
            "pneumonia": __version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
        },
        "run_dir": run_dir.name,
    }


#: File of a run folder holding the fitted input check (``pneumonia guard fit``).
GUARD_FILE = "guard.json"


def load_run_guard(run_dir: Path) -> FeatureGuard | None:
    """The input check fitted for this run's current checkpoints, or None if there is none.

    Raises:
        ValueError: ``guard.json`` was fitted on other checkpoints (refit it).
    """
    from pneumonia.training.train import member_dirs

    path = run_dir / GUARD_FILE
    if not path.is_file():
        log.warning(
            "%s is missing: the model is exported without the feature-space input check "
            "(only the image checks will run); run `pneumonia guard fit %s` first",
            path,
            run_dir,
        )
        return None
    guard = FeatureGuard.from_dict(json.loads(path.read_text()))
    current = [sha256_file(d / "best.pt") for d in member_dirs(run_dir)]
    if guard.fitted.get("members_sha256") != current:
        raise ValueError(
            f"{path} was fitted on other checkpoints than the run's; rerun `pneumonia guard fit {run_dir}`"
        )
    return guard


def export_run(run_dir: Path, out: Path, name: str | None = None) -> dict[str, Any]:
    """Export the ensemble of a run folder to ``out`` (ONNX) with card JSON and Markdown beside it.

    The run's fitted input check (``guard.json``, from ``pneumonia guard fit``) goes into the
    file beside the card, its summary into the card. Checks that onnxruntime reproduces the
    PyTorch logits, CAMs and features within ``PARITY_ATOL``.

    Returns:
        The sidecar card (the embedded card plus ``sha256`` and ``file``).
    """
    import onnx
    import torch

    from pneumonia.training.model import EnsembleForExport
    from pneumonia.training.train import load_member, member_dirs

    run_dir, out = Path(run_dir), Path(out)
    cfg = TrainConfig.load(run_dir / "config.json")
    calib_path = run_dir / "calibration.json"
    if not calib_path.is_file():
        raise FileNotFoundError(f"{calib_path} is missing; the training run did not finish")
    calib = json.loads(calib_path.read_text())
    members = [load_member(d / "best.pt") for d in member_dirs(run_dir)]
    net = EnsembleForExport(members).eval()
    n_params = sum(p.numel() for p in net.parameters())
    name = name or f"pneumonia-{cfg.model.arch}"
    card = _model_card(run_dir, cfg, calib, name, n_params)
    guard = load_run_guard(run_dir)
    card["input_check"] = (
        guard.summary()
        if guard is not None
        else {
            "method": "image checks only (no fitted feature statistics)",
            "image_checks": image_check_limits(),
        }
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(2, *cfg.preprocess.input_shape)
    tmp = out.with_suffix(".tmp.onnx")
    torch.onnx.export(
        net,
        (example,),
        str(tmp),
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES_WITH_EMBEDDING),
        dynamic_axes={INPUT_NAME: {0: "N"}, **{o: {0: "N"} for o in OUTPUT_NAMES_WITH_EMBEDDING}},
        opset_version=17,
        dynamo=False,
    )
    proto = onnx.load(str(tmp))
    tmp.unlink()
    # Fold what the tracer left as run-time arithmetic (the pads of the stride-2 "SAME"
    # convolutions are reversed with a step -1 Slice that torch's folding skips), so
    # onnxruntime sees constants it can fuse: EfficientNet-Lite0 runs about 1.6x faster.
    import onnxscript.optimizer

    proto = onnxscript.optimizer.optimize(proto)
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = CARD_METADATA_KEY, json.dumps(card)
    if guard is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = GUARD_METADATA_KEY, json.dumps(guard.to_dict())
    proto.producer_name = "pneumonia-detection"
    proto.producer_version = __version__
    onnx.checker.check_model(proto)
    # Each file whole or not at all: a model being served from OUT is never seen half-written.
    atomic.write_bytes(out, proto.SerializeToString())

    sidecar = {**card, "sha256": sha256_file(out), "file": out.name, "bytes": out.stat().st_size}
    atomic.write_text(sidecar_card_path(out), json.dumps(sidecar, indent=2) + "\n")
    atomic.write_text(out.with_suffix(".card.md"), render_model_card(sidecar))

    # Parity: the exported graph must reproduce the PyTorch ensemble.
    check = torch.rand(4, *cfg.preprocess.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_logit, ref_cam, ref_emb = net(check)
    logits, cams, emb = Predictor(out, threads=1).run_all(check.numpy())
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
        "exported %s (%d bytes, sha256 %s, parity %.1e)",
        out,
        sidecar["bytes"],
        sidecar["sha256"][:12],
        err,
    )
    return sidecar


def _describe_arch(arch: dict[str, Any]) -> str:
    if arch["arch"] == "effnet_lite0":
        start = "ImageNet weights" if arch.get("pretrained", True) else "random weights"
        return f"EfficientNet-Lite0 (fine-tuned end to end from {start}, gray stem)"
    if arch["arch"] == "cnn":
        return f"compact CNN (channels {arch['channels']})"
    return f"logistic regression on a {arch['logreg_grid']}x{arch['logreg_grid']} thumbnail"


def _stress_lines(stress: dict[str, Any] | None) -> list[str]:
    """The stressed-validation table of the card (absent for runs older than v2)."""
    if not stress:
        return []
    lines = [
        "## Stressed validation (the validation split under fixed perturbations; docs/model.md)",
        f"At the operating threshold {stress['threshold']:.4f}:",
        "",
        "| perturbation | ROC-AUC | sensitivity | specificity | normals called PNEUMONIA |",
        "|---|---|---|---|---|",
    ]
    for name, r in stress["perturbations"].items():
        lines.append(
            f"| {name} | {_fmt(r['auc'])} | {_fmt(r['sensitivity'], 3)} | "
            f"{_fmt(r['specificity'], 3)} | {_fmt(r['fpr_normals'], 3)} |"
        )
    w = stress["worst"]
    lines += [
        "",
        "Worst case: "
        + ", ".join(f"{k} {_fmt(v['value'], 3)} ({v['perturbation']})" for k, v in w.items())
        + ".",
        "",
    ]
    return lines


def _fmt(x: Any, digits: int = 4) -> str:
    """A metric for a table; ``n/a`` where it is undefined (e.g. AUC on one class)."""
    if x is None:
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _counts(by_label: dict[str, int]) -> str:
    return ", ".join(f"{n} {label}" for label, n in by_label.items())


#: Published reference points quoted in the model card and README.
REFERENCES = [
    ("Kermany et al. 2018 (ImageNet transfer learning)", "0.968", "0.928", "0.932", "0.901"),
    ("MedMNIST v2 PneumoniaMNIST, ResNet-50 (224)", "0.962", "0.884", "-", "-"),
    ("MedMNIST+ ResNet-18 (224, ImageNet-pretrained, threshold 0.5)", "0.980", "0.911", "-", "-"),
    ("MedMNIST+ DINO ViT-B/16 linear probe", "0.989", "0.916", "-", "-"),
    ("Google AutoML Vision on PneumoniaMNIST", "0.991", "0.946", "-", "-"),
    ("Original system (TensorFlow CNN, 128x128)", "never measured on held-out data", "-", "-", "-"),
]


def comparison_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """Markdown table: our models' test figures beside the published references."""
    lines = [
        "| model | test ROC-AUC | accuracy | sensitivity | specificity |",
        "|---|---|---|---|---|",
    ]
    for label, r in rows:
        lines.append(
            "| "
            + " | ".join(
                [label] + [_fmt(r[k], 3) for k in ("auc", "accuracy", "sensitivity", "specificity")]
            )
            + " |"
        )
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in REFERENCES]
    return "\n".join(lines) + "\n"


#: Said wherever v2's test figures are reported (docs/model.md explains it).
SECOND_LOOK = (
    "This is the second look at the official test set: v1 was evaluated on it first, and the "
    "probes that shaped the v2 recipe (aspect-jittered crops, ImageNet features) were scored on "
    "it too. The v2 configuration, selection rule and threshold rule were committed before v2 was "
    "scored, but these figures are not a fresh held-out estimate."
)


def _shortcut_lines(rows: list[dict[str, Any]] | None) -> list[str]:
    """The training data's shortcut check (``pneumonia data audit``); absent in older runs."""
    if not rows:
        return []
    cells = [
        f"{r['statistic']} {_fmt(r['auc'], 2)}{' **(warning)**' if r['warning'] else ''}"
        for r in rows
    ]
    return [
        "- Shortcut check (ROC-AUC of one nuisance statistic alone as a PNEUMONIA score, folded to >= 0.5; "
        f"warning above 0.7; `pneumonia data audit`): {', '.join(cells)}."
    ]


def render_model_card(
    card: dict[str, Any],
    test: dict[str, Any] | None = None,
    baseline: dict[str, Any] | None = None,
    previous: tuple[str, dict[str, Any]] | None = None,
    input_check: dict[str, Any] | None = None,
) -> str:
    """The Markdown model card; test reports, when given, add the held-out figures.

    Args:
        card: The sidecar card of the model.
        test: Its evaluation report on the test set.
        baseline: The baseline's report on the same set.
        previous: (label, report) of the model this one replaces, on the same set.
        input_check: ``benchmarks/bench_guard.py``'s JSON for this file: the input check's
            measured rates.
    """
    v = card["validation_metrics"]
    data = card["training"]["data"]
    pp = card["preprocess"]
    arch = card["architecture"]
    medmnist = data.get("split") == "medmnist-val"
    val_name = "MedMNIST val split" if medmnist else "patient-grouped split of train"
    lines = [
        f"# Model card: {card['name']} {card['version']}",
        "",
        "## Intended use",
        card["intended_use"],
        "",
        "## Limits",
        *[f"- {x}" for x in card["limitations"]],
        "",
        "## Model",
        f"- File: `{card.get('file', '?')}`, sha256 `{card.get('sha256', '?')}`",
        f"- Architecture: {_describe_arch(arch)}, ensemble of {arch['members']}, "
        f"{arch['parameters']:,} parameters; global average pooling "
        "and a linear head (class activation maps without gradients).",
        f"- Input: {pp['size']}x{pp['size']} grayscale, float32 in {pp['value_range']}, aspect ratio {pp['resize']}ed, "
        f"{pp['interpolation']} resampling; {pp['normalization']}.",
        "- Output: calibrated P(PNEUMONIA) = sigmoid(logit / "
        f"{card['temperature']:.4f} + {card['bias']:.4f}) (temperature and bias "
        "fitted on validation; the bias restores the class prior that class-weighted training removes).",
        f"- Operating threshold: **{card['threshold']:.4f}**; rule: {card['threshold_rule']['description']} "
        f"(min_sensitivity = {card['threshold_rule'].get('min_sensitivity')}). "
        "Chosen before any test-set figure was seen.",
        "",
        "## Training data",
        "- Source: Kermany et al. 2018 pediatric chest X-rays (CC BY 4.0), training folder only.",
        f"- Training split: {_counts(data['train'])} ({data['train_patients']} patients); "
        f"validation split ({data.get('split_description', 'patient-grouped')}): {_counts(data['validation'])}.",
        f"- Unreadable files skipped: {len(data['skipped'])}.",
        *_shortcut_lines(data.get("shortcuts")),
        "",
        f"## Validation metrics ({val_name}; used to choose everything)",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(x)} |" for k, x in v.items()],
        "",
        *_stress_lines(card.get("stressed_validation")),
    ]
    if test is not None:
        rows = [(f"{card['name']} (this model)", test)]
        if previous is not None:
            rows.append(previous)
        if baseline is not None:
            rows.append(("Logistic-regression baseline (same code)", baseline))
        cm = test["confusion_matrix"]
        lo, hi = test["auc_ci95"] or (None, None)
        f = {
            k: _fmt(test[k])
            for k in (
                "auc",
                "threshold",
                "accuracy",
                "sensitivity",
                "specificity",
                "ppv",
                "npv",
                "f1",
                "brier",
                "ece",
            )
        }
        lines += [
            f"## Held-out evaluation: {test['n']} images never used for any choice",
            f"ROC-AUC {f['auc']} (95% bootstrap CI {_fmt(lo)}-{_fmt(hi)}); at threshold {f['threshold']}: "
            f"accuracy {f['accuracy']}, sensitivity {f['sensitivity']}, specificity {f['specificity']}, "
            f"PPV {f['ppv']}, NPV {f['npv']}, F1 {f['f1']}, Brier {f['brier']}, ECE {f['ece']}; "
            f"confusion tn={cm['tn']} fp={cm['fp']} fn={cm['fn']} tp={cm['tp']}.",
            "",
            *([SECOND_LOOK, ""] if previous is not None else []),
            comparison_table(rows),
        ]
    lines += input_check_section(card.get("input_check"))
    if input_check is not None:
        lines += input_check_measured(input_check, card.get("sha256"))[1:]
    lines += [
        "## Versions",
        *[f"- {k}: {x}" for k, x in card["versions"].items()],
        "",
    ]
    return "\n".join(lines)


def input_check_measured(bench: dict[str, Any], sha256: str | None) -> list[str]:
    """The card's table of the input check's measured rates, from ``benchmarks/bench_guard.py``'s
    JSON (refused per kind of non-radiograph, refused and flagged chest films)."""
    if sha256 and bench.get("model", {}).get("sha256") != sha256:
        raise ValueError("the input check report was measured on another model file")
    lines = [
        "",
        "Measured on this file by `benchmarks/bench_guard.py` (refusal turned into a flag so that "
        "every outcome is counted; the non-radiographs are an evaluation set the check was not "
        "designed on, docs/input_check.md):",
        "",
        *rates_table(bench.get("kinds", {}), bench.get("films", {})),
    ]
    return [*lines, ""]


def input_check_section(check: dict[str, Any] | None) -> list[str]:
    """The card's account of the input check: how it was fitted, its thresholds and measured rates."""
    lines = ["## Input check (refuses what is not a chest X-ray)"]
    if not check:
        lines += [
            "This model was exported before the input check existed: every image is classified.",
            "",
        ]
        return lines
    limits = check.get("image_checks", {})
    lines += [
        "Every image first passes fixed image checks: more than "
        f"{limits.get('max_colour_fraction', 0):.0%} coloured pixels, contrast under {limits.get('min_contrast')}, "
        f"pixel noise over {limits.get('max_noise')} of the contrast, or over {limits.get('max_flat_share', 0):.0%} "
        "of the image in one flat tone is refused as not a chest X-ray.",
    ]
    if "flag_distance" not in check:
        lines += [
            "No feature statistics were fitted for this model (`pneumonia "
            "guard fit` was not run): only the image checks apply.",
            "",
        ]
        return lines
    q = check.get("validation_distance_quantiles", {})
    lines += [
        f"- Then a {check['method']} ({check['dim']} features, {check['components']} principal directions), "
        f"fitted on {check.get('n_train')} films: {check.get('fitted_on', 'the training split')}.",
        f"- Flagged as unlike the training films above distance {check['flag_distance']:.4f} "
        f"({check.get('flag_rule')}).",
    ]
    if "mid_dim" in check:
        mq = check.get("mid_validation_distance_quantiles", {})
        lines += [
            f"- And the same distance in the network's mid-level feature statistics ({check['mid_dim']} "
            f"features, {check['mid_components']} principal directions): flagged above "
            f"{check['mid_flag_distance']:.4f} (the same rule), refused as not a chest X-ray above "
            f"{check['refuse_distance']:.4f} ({check.get('refuse_rule')}; set by "
            f"{check.get('refuse_set_by')}; validation median {mq.get('0.5', float('nan')):.4f}).",
        ]
    else:
        lines.append(
            f"- Refused as not a chest X-ray above {check['refuse_distance']:.4f} ({check.get('refuse_rule')})."
        )
    lines += [
        f"- Validation films ({check.get('n_validation')}): median distance {q.get('0.5', float('nan')):.4f}, "
        f"maximum {q.get('1.0', float('nan')):.4f}; {check.get('validation_flagged', 0):.1%} flagged, "
        f"{check.get('validation_refused', 0):.1%} refused by the feature distance.",
    ]
    lines += [
        "- It is a screen, not a guarantee: an unusual film can be flagged or refused, and an image "
        "that is not a chest X-ray can pass. Operators can turn refusal into a flag (`INPUT_CHECK=flag`).",
        "",
    ]
    return lines
