"""Figures drawn from an evaluation report (and a run's history), nothing else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_report(report: dict[str, Any], out_dir: Path, title: str = "") -> list[Path]:
    """ROC, precision-recall, confusion matrix, reliability diagram and threshold sweep."""
    out_dir.mkdir(parents=True, exist_ok=True)
    c = report["curves"]
    thr = report["threshold"]
    paths = []

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(
        c["roc"]["fpr"],
        c["roc"]["tpr"],
        lw=2,
        label="AUC n/a (one class)" if report["auc"] is None else f"AUC {report['auc']:.3f}",
    )
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    if report["specificity"] is not None and report["sensitivity"] is not None:
        ax.scatter(
            [1 - report["specificity"]],
            [report["sensitivity"]],
            color="red",
            zorder=3,
            label=f"threshold {thr:.3f}",
        )
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC {title}".strip())
    ax.legend(loc="lower right")
    paths.append(_save(fig, out_dir / "roc.png"))

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(c["pr"]["recall"], c["pr"]["precision"], lw=2)
    if report["sensitivity"] is not None and report["ppv"] is not None:
        ax.scatter(
            [report["sensitivity"]],
            [report["ppv"]],
            color="red",
            zorder=3,
            label=f"threshold {thr:.3f}",
        )
    ax.set(
        xlabel="recall (sensitivity)",
        ylabel="precision (PPV)",
        title=f"Precision-recall {title}".strip(),
        ylim=(0, 1.02),
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left")
    paths.append(_save(fig, out_dir / "precision_recall.png"))

    cm = report["confusion_matrix"]
    grid = [[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]]
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(grid, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, str(grid[i][j]), ha="center", va="center", fontsize=14)
    ax.set_xticks([0, 1], ["NORMAL", "PNEUMONIA"])
    ax.set_yticks([0, 1], ["NORMAL", "PNEUMONIA"])
    ax.set(xlabel="predicted", ylabel="true", title=f"Confusion at {thr:.3f}")
    paths.append(_save(fig, out_dir / "confusion_matrix.png"))

    r = c["reliability"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    pts = [
        (m, f)
        for m, f, n in zip(r["mean_predicted"], r["fraction_positive"], r["count"], strict=True)
        if n
    ]
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.plot([m for m, _ in pts], [f for _, f in pts], "o-", lw=2)
    ax.set(
        xlabel="predicted P(PNEUMONIA)",
        ylabel="observed fraction PNEUMONIA",
        title="Reliability (ECE n/a)"
        if report["ece"] is None
        else f"Reliability (ECE {report['ece']:.3f})",
    )
    paths.append(_save(fig, out_dir / "reliability.png"))

    s = c["threshold_sweep"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key in ("sensitivity", "specificity", "accuracy", "f1"):
        ax.plot(s["threshold"], s[key], label=key)
    ax.axvline(thr, color="k", ls="--", lw=1, label="shipped threshold")
    ax.set(
        xlabel="threshold on P(PNEUMONIA)", ylabel="value", title="Threshold sweep", ylim=(0, 1.02)
    )
    ax.legend(loc="lower center", fontsize=8)
    paths.append(_save(fig, out_dir / "threshold_sweep.png"))
    return paths


def plot_training_curves(run_dir: Path, out_dir: Path) -> Path:
    """Loss and validation AUC per epoch for every member of a training run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    for hist in sorted(run_dir.glob("member-*/history.json")):
        rows = json.loads(hist.read_text())
        ep = [r["epoch"] for r in rows]
        tag = hist.parent.name
        a1.plot(ep, [r["train_loss"] for r in rows], label=f"{tag} train")
        a1.plot(ep, [r["val_loss"] for r in rows], "--", label=f"{tag} validation")
        a2.plot(ep, [r["val_auc"] for r in rows], label=tag)
    a1.set(xlabel="epoch", ylabel="class-balanced BCE", title="Loss")
    a2.set(xlabel="epoch", ylabel="ROC-AUC", title="Validation AUC")
    a1.legend(fontsize=7)
    a2.legend(fontsize=7)
    return _save(fig, out_dir / "training_curves.png")
