"""A rebuilt model beside a reference one (the shipped file), on the validation split only.

Both ONNX files score the validation films of the rebuilt run's split record (``split.json``;
never the official test set). Printed side by side: validation AUC, the threshold and
sensitivity and specificity at each model's own threshold, temperature and bias from each card,
the weights digests, and the largest difference between the two models' probabilities.

Usage (``make ship`` runs it for the CNN and the baseline)::

    .venv/bin/python benchmarks/compare_models.py --run runs/ship-X/shipped \\
        --model runs/ship-X/model.onnx --reference artifacts/model.onnx --json runs/ship-X/compare.json

Whether the reference was validated on the same films is said, not assumed: its card names the
split's digest (models exported since issue 21) or only its class counts (older ones).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pneumonia.calibration import calibrated_probability
from pneumonia.data import load_images
from pneumonia.evaluate import roc_auc, threshold_metrics
from pneumonia.predictor import Predictor
from pneumonia.training.run import RecordedSplit, RunFolder, load_split

#: Films scored per onnxruntime call.


def score(model: Path, split: RecordedSplit, threads: int | None = None) -> dict[str, Any]:
    """One model's figures on the split's validation films."""
    pred = Predictor(model, threads=threads, refuse=False)
    val = load_images(split.val, pred.spec)
    logits = pred.scores(val.x).logits
    card = pred.card
    prob = calibrated_probability(logits, card.calibration.temperature, card.calibration.bias)
    at = threshold_metrics(val.y, prob, card.threshold)
    data = (card.training or {}).get("data", {})
    return {
        "model": str(model),
        "name": card.name,
        "version": card.version,
        "weights_sha256": pred.weights_sha256,
        "n": len(val.y),
        "auc": roc_auc(val.y, prob),
        "threshold": card.threshold,
        "sensitivity": at["sensitivity"],
        "specificity": at["specificity"],
        "temperature": card.calibration.temperature,
        "bias": card.calibration.bias,
        "card_validation_auc": card.validation_metrics.get("auc"),
        "split_sha256": data.get("split_sha256"),
        "validation_counts": data.get("validation"),
        "probability": prob,
    }


def same_films(rebuilt: dict[str, Any], reference: dict[str, Any], split: RecordedSplit) -> str:
    """Whether the reference's validation films are these, as far as its card says."""
    if reference["split_sha256"] is not None:
        return "same split" if reference["split_sha256"] == split.sha256 else "another split"
    if reference["validation_counts"] == rebuilt["validation_counts"]:
        return "same class counts (the reference's card records no split digest)"
    return "other class counts: the reference was validated on other films"


def compare(run: Path, model: Path, reference: Path, threads: int | None = None) -> dict[str, Any]:
    split = load_split(RunFolder(run))
    new, ref = score(model, split, threads), score(reference, split, threads)
    diff = float(np.abs(new.pop("probability") - ref.pop("probability")).max())
    return {
        "validation": f"{len(split.val)} films of {run}'s split ({split.sha256[:12]}...)",
        "reference_validation": same_films(new, ref, split),
        "weights_identical": new["weights_sha256"] == ref["weights_sha256"],
        "max_probability_difference": diff,
        "rebuilt": new,
        "reference": ref,
    }


def table(result: dict[str, Any]) -> str:
    rows = [
        ("validation AUC (these films)", "auc", "{:.4f}"),
        ("validation AUC (its card)", "card_validation_auc", "{:.4f}"),
        ("threshold", "threshold", "{:.6f}"),
        ("sensitivity at threshold", "sensitivity", "{:.3f}"),
        ("specificity at threshold", "specificity", "{:.3f}"),
        ("temperature", "temperature", "{:.4f}"),
        ("bias", "bias", "{:.4f}"),
        ("weights sha256", "weights_sha256", "{:.12}"),
    ]
    new, ref = result["rebuilt"], result["reference"]

    def cell(v: Any, fmt: str) -> str:
        return "n/a" if v is None else fmt.format(v)

    lines = [
        f"validation: {result['validation']}; reference: {result['reference_validation']}",
        "",
        f"| | rebuilt ({new['model']}) | reference ({ref['model']}) |",
        "|---|---|---|",
        *(f"| {label} | {cell(new[k], f)} | {cell(ref[k], f)} |" for label, k, f in rows),
        f"| largest probability difference | {result['max_probability_difference']:.4f} | |",
        f"| weights identical | {'yes' if result['weights_identical'] else 'no'} | |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="the rebuilt run folder")
    ap.add_argument("--model", type=Path, required=True, help="the rebuilt ONNX file")
    ap.add_argument("--reference", type=Path, required=True, help="e.g. artifacts/model.onnx")
    ap.add_argument("--json", type=Path, help="write the comparison here")
    ap.add_argument("--threads", type=int, help="onnxruntime threads (default: all)")
    a = ap.parse_args(argv)
    result = compare(a.run, a.model, a.reference, a.threads)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    sys.stdout.write(table(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
