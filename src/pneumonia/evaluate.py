"""Metrics from predictions, the threshold rule, and the JSON evaluation report.

PNEUMONIA (label 1) is the positive class throughout. numpy only: evaluation runs through
the exported ONNX model, without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties).

    Returns NaN when ``y`` holds only one class (the report turns it into null).
    """
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p), dtype=np.float64)
    sp = p[order]
    # Average ranks over ties.
    _, start, counts = np.unique(sp, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds); predicting positive when ``p >= threshold``."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    thr = np.unique(p)[::-1]
    pos = (p[None, :] >= thr[:, None]) if len(p) * len(thr) <= 4_000_000 else None
    if pos is None:
        order = np.argsort(-p, kind="mergesort")
        sp, sy = p[order], y[order]
        last = np.r_[np.nonzero(np.diff(sp))[0], len(sp) - 1]
        tp, fp = np.cumsum(sy)[last], np.cumsum(~sy)[last]
    else:
        tp, fp = (pos & y).sum(1), (pos & ~y).sum(1)
    tpr = np.r_[0.0, tp / max(1, y.sum())]
    fpr = np.r_[0.0, fp / max(1, (~y).sum())]
    return fpr, tpr, np.r_[np.inf, thr]


def precision_recall_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) over all distinct thresholds, high to low."""
    fpr, tpr, _ = roc_curve(y, p)
    y = np.asarray(y).astype(bool)
    tp, fp = tpr * y.sum(), fpr * (~y).sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 1.0)
    return precision, tpr


def confusion(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, int]:
    y = np.asarray(y).astype(bool)
    pred = np.asarray(p) >= threshold
    return {
        "tn": int((~pred & ~y).sum()),
        "fp": int((pred & ~y).sum()),
        "fn": int((~pred & y).sum()),
        "tp": int((pred & y).sum()),
    }


def _ratio(a: float, b: float) -> float | None:
    """a / b, or None (JSON null) when the denominator is empty."""
    return float(a / b) if b else None


def threshold_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float | None]:
    """Accuracy, sensitivity, specificity, PPV, NPV and F1 at one threshold."""
    c = confusion(y, p, threshold)
    tp, tn, fp, fn = c["tp"], c["tn"], c["fp"], c["fn"]
    sens, ppv = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
    return {
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "sensitivity": sens,
        "specificity": _ratio(tn, tn + fp),
        "ppv": ppv,
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * ppv * sens, ppv + sens) if tp and ppv and sens else 0.0,
    }


def reliability(y: np.ndarray, p: np.ndarray, bins: int = 10) -> dict[str, list[Any]]:
    """Equal-width reliability bins: mean confidence, observed frequency and count per bin.

    Empty bins have ``None`` (JSON null) as mean confidence and observed frequency.
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    conf: list[float | None] = []
    freq: list[float | None] = []
    count: list[int] = []
    for b in range(bins):
        m = idx == b
        count.append(int(m.sum()))
        conf.append(float(p[m].mean()) if m.any() else None)
        freq.append(float(y[m].mean()) if m.any() else None)
    return {"mean_predicted": conf, "fraction_positive": freq, "count": count}


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """ECE of P(PNEUMONIA) over equal-width bins, weighted by bin size."""
    r = reliability(y, p, bins)
    n = max(1, len(y))
    return float(
        sum(
            c / n * abs(f - m)
            for c, f, m in zip(r["count"], r["fraction_positive"], r["mean_predicted"], strict=True)
            if c
        )
    )


def brier(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((np.asarray(p, np.float64) - np.asarray(y, np.float64)) ** 2))


def _finite_or_none(x: float) -> float | None:
    """``x``, or None (JSON null) where the value is undefined (NaN)."""
    return float(x) if np.isfinite(x) else None


def bootstrap_auc_ci(
    y: np.ndarray, p: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval for ROC-AUC (resampling images with replacement).

    Resamples holding one class only are dropped; ``(None, None)`` if every one does
    (``y`` holds one class).
    """
    y, p = np.asarray(y), np.asarray(p)
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        a = roc_auc(y[i], p[i])
        if not np.isnan(a):
            aucs.append(a)
    if not aucs:
        return None, None
    alpha = (1 - level) / 2
    return float(np.quantile(aucs, alpha)), float(np.quantile(aucs, 1 - alpha))


def choose_threshold(
    y: np.ndarray,
    p: np.ndarray,
    rule: str,
    min_sensitivity: float | None = None,
) -> float:
    """The threshold by one rule's arithmetic (pneumonia.card.RULES is the table of rules).

    Rules:
        ``min_sensitivity``: the highest threshold whose sensitivity is still at least
            ``min_sensitivity``; i.e. the most specific operating point that keeps a screening
            tool's miss rate within budget.
        ``youden``: the threshold maximising sensitivity + specificity - 1 (median of the
            longest run of adjacent best thresholds; the first, most specific, on a tie).

    Raises:
        ValueError: one class only, ``min_sensitivity`` outside (0, 1], or an unknown rule.
    """
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    if y.all() or (~y).all():
        raise ValueError("threshold choice needs both classes in the validation split")
    if rule == "min_sensitivity":
        if min_sensitivity is None or not 0.0 < min_sensitivity <= 1.0:
            raise ValueError(f"min_sensitivity must be in (0, 1], got {min_sensitivity}")
        pos = np.sort(p[y])
        # Allow at most floor((1 - s) * n_pos) misses: threshold at the next positive score.
        k = int(np.floor((1.0 - min_sensitivity) * len(pos) + 1e-9))
        return float(pos[k])
    if rule == "youden":
        fpr, tpr, thr = roc_curve(y, p)
        j, thr = (tpr - fpr)[1:], thr[1:]  # drop the +inf "nothing positive" point
        best = np.flatnonzero(j == j.max())
        # Equally good thresholds need not be adjacent, and a median across a gap can land
        # where J is lower: take the median of one run of adjacent best thresholds.
        runs = np.split(best, np.flatnonzero(np.diff(best) > 1) + 1)
        run = max(runs, key=len)
        return float(np.clip(np.median(thr[run]), 0.0, 1.0))
    raise ValueError(f"unknown threshold rule {rule!r}; expected 'min_sensitivity' or 'youden'")


def threshold_sweep(y: np.ndarray, p: np.ndarray, steps: int = 101) -> dict[str, list[Any]]:
    ts = np.linspace(0.0, 1.0, steps)
    rows = [threshold_metrics(y, p, float(t)) for t in ts]
    out: dict[str, list[Any]] = {"threshold": [float(t) for t in ts]}
    for key in ("accuracy", "sensitivity", "specificity", "f1"):
        out[key] = [r[key] for r in rows]
    return out


@dataclass(frozen=True)
class Evaluation:
    """Everything measured on one labelled set; ``to_json`` is the report format."""

    report: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return self.report


def evaluate_predictions(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> Evaluation:
    """Build the full evaluation report from labels and calibrated P(PNEUMONIA).

    Top-level keys: n, auc, auc_ci95, accuracy, sensitivity, specificity, ppv, npv, f1,
    brier, ece, threshold, confusion_matrix, class_counts, and ``curves`` (ROC, PR,
    reliability, threshold sweep) for the plots. The report is strict JSON: a value that is
    undefined on this set (AUC with one class, a ratio with an empty denominator) is None.
    """
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=np.float64)
    fpr, tpr, thr = roc_curve(y, p)
    prec, rec = precision_recall_curve(y, p)
    lo, hi = bootstrap_auc_ci(y, p, n_boot=n_boot, seed=seed)
    empty = len(y) == 0
    report: dict[str, Any] = {
        "n": len(y),
        "class_counts": {"NORMAL": int((y == 0).sum()), "PNEUMONIA": int((y == 1).sum())},
        "positive_class": "PNEUMONIA",
        "auc": _finite_or_none(roc_auc(y, p)),
        "auc_ci95": [lo, hi],
        **threshold_metrics(y, p, threshold),
        "brier": None if empty else brier(y, p),
        "ece": None if empty else expected_calibration_error(y, p),
        "threshold": float(threshold),
        "confusion_matrix": confusion(y, p, threshold),
        "curves": {
            "roc": {
                "fpr": fpr.tolist(),
                "tpr": tpr.tolist(),
                "threshold": np.nan_to_num(thr, posinf=1.0).tolist(),
            },
            "pr": {"precision": prec.tolist(), "recall": rec.tolist()},
            "reliability": reliability(y, p),
            "threshold_sweep": threshold_sweep(y, p),
        },
    }
    if extra:
        report.update(extra)
    return Evaluation(report)


def _f4(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def markdown_summary(report: dict[str, Any], title: str) -> str:
    """A short Markdown table of an evaluation report (undefined values read "n/a")."""
    cm = report["confusion_matrix"]
    lo, hi = report["auc_ci95"]
    counts = report["class_counts"]
    rows = [
        ("images", f"{report['n']} ({counts['NORMAL']} NORMAL, {counts['PNEUMONIA']} PNEUMONIA)"),
        ("ROC-AUC (95% bootstrap CI)", f"{_f4(report['auc'])} ({_f4(lo)}-{_f4(hi)})"),
        ("threshold on P(PNEUMONIA)", _f4(report["threshold"])),
        ("accuracy", _f4(report["accuracy"])),
        ("sensitivity (recall of PNEUMONIA)", _f4(report["sensitivity"])),
        ("specificity", _f4(report["specificity"])),
        ("PPV / NPV", f"{_f4(report['ppv'])} / {_f4(report['npv'])}"),
        ("F1", _f4(report["f1"])),
        ("Brier score / ECE", f"{_f4(report['brier'])} / {_f4(report['ece'])}"),
        ("confusion (tn, fp, fn, tp)", f"{cm['tn']}, {cm['fp']}, {cm['fn']}, {cm['tp']}"),
    ]
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"
