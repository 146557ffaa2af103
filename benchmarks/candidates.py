"""The v2 comparison table of docs/model.md: each candidate run's validation and stressed-
validation figures from its calibration.json, and the pick of the selection rule.

    python benchmarks/candidates.py runs/v2-effnet runs/v2-cnn [--timing bench_model.jsonl]

``--timing`` takes the JSON lines of benchmarks/bench_model.py (the v1 model first, then each
candidate's exported model in the order of the runs) for the eligibility columns. Reads no test
data: the rule picks on validation only (docs/model.md, "Selection rule").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

MAX_BYTES = 15_000_000
MAX_LATENCY_RATIO = 0.6
TIE = 0.01


def load(run: Path) -> dict[str, Any]:
    calib = json.loads((run / "calibration.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    s = calib["stressed_validation"]
    return {
        "run": str(run),
        "arch": cfg["model"]["arch"],
        "size": cfg["preprocess"]["size"],
        "epochs": cfg["epochs"],
        "members": len(cfg["seeds"]),
        "val_auc": calib["validation"]["auc"],
        "val_sens": calib["validation"]["sensitivity"],
        "val_spec": calib["validation"]["specificity"],
        "threshold": calib["threshold"],
        "worst_bal_acc": s["worst"]["balanced_accuracy"]["value"],
        "worst_bal_acc_at": s["worst"]["balanced_accuracy"]["perturbation"],
        "worst_auc": s["worst"]["auc"]["value"],
        "worst_spec": s["worst"]["specificity"]["value"],
        "worst_spec_at": s["worst"]["specificity"]["perturbation"],
        "worst_sens": s["worst"]["sensitivity"]["value"],
        "mean_auc": s["mean_auc"],
        "pooled_ece": s["pooled"]["ece"],
    }


def pick(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The selection rule of docs/model.md, applied to eligible rows."""
    eligible = [r for r in rows if r.get("eligible", True)]
    if not eligible:
        raise SystemExit("no candidate is eligible")
    best = max(r["worst_bal_acc"] for r in eligible)
    near = [r for r in eligible if best - r["worst_bal_acc"] <= TIE]
    top_auc = max(r["worst_auc"] for r in near)
    near = [r for r in near if r["worst_auc"] == top_auc] if len(near) > 1 else near
    return min(near, key=lambda r: r.get("median_ms", 0.0))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument(
        "--timing", type=Path, help="bench_model.py output: v1 first, then one line per run"
    )
    a = ap.parse_args()
    rows = [load(r) for r in a.runs]
    if a.timing:
        t = [json.loads(line) for line in a.timing.read_text().splitlines() if line.strip()]
        v1 = t[0]
        for r, m in zip(rows, t[1:], strict=True):
            r["bytes"], r["median_ms"] = m["bytes"], m["median_ms"]
            r["latency_ratio"] = m["median_ms"] / v1["median_ms"]
            r["eligible"] = m["bytes"] <= MAX_BYTES and r["latency_ratio"] <= MAX_LATENCY_RATIO
    print(
        "| run | arch, px, epochs x members | val AUC | val sens / spec | worst stressed bal. acc. (where) | "
        "worst AUC | worst spec (where) | worst sens | mean stressed AUC | pooled ECE | MB | ms/image (x v1) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        size = f"{r['bytes'] / 1e6:.1f}" if "bytes" in r else "-"
        ms = f"{r['median_ms']:.1f} ({r['latency_ratio']:.2f})" if "median_ms" in r else "-"
        print(
            f"| {r['run']} | {r['arch']}, {r['size']}, {r['epochs']} x {r['members']} | {r['val_auc']:.4f} | "
            f"{r['val_sens']:.3f} / {r['val_spec']:.3f} | {r['worst_bal_acc']:.3f} ({r['worst_bal_acc_at']}) | "
            f"{r['worst_auc']:.4f} | {r['worst_spec']:.3f} ({r['worst_spec_at']}) | {r['worst_sens']:.3f} | "
            f"{r['mean_auc']:.4f} | {r['pooled_ece']:.3f} | {size} | {ms} |"
        )
    print(f"\npicked by the rule: {pick(rows)['run']}")


if __name__ == "__main__":
    main()
