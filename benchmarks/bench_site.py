"""Fit the model to a site and measure it: the figures of docs/site.md (``make site``).

On a labelled site folder (``../shared/data/nih_site``: 538 adult films of 345 patients):

1. ``pneumonia adapt`` on every film, timed: the cross-validated figures, the learning curve,
   the figures by view, sex and age band, and the refitted input check's cross-fitted rates.
2. The adapted model on the development non-radiographs (``benchmarks/nonradiographs.py --set
   dev``): the share refused (and the base model's, for comparison).
3. Films adapt never saw: the patients split in two by a hash of their ids; adapt on each half,
   the other half scored as a new film would be (ROC-AUC, sensitivity, specificity, ECE at the
   fitted operating point; flagged and refused).
4. From 100 films: 50 per class, whole patients taken in the order of a hash of their ids (a
   fixed subset, chosen by no one); adapt on them, the other patients' films scored as in 3.

Usage::

    .venv/bin/python benchmarks/bench_site.py --model artifacts/model.onnx \\
        --data ../shared/data/nih_site --nonxray runs/nonradiographs-dev --json runs/bench_site.json

Timings are wall-clock on whatever machine runs it (say how busy it was).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pneumonia.adapt import SiteFilms, adapt_model, read_site
from pneumonia.evaluate import expected_calibration_error, roc_auc
from pneumonia.guard import REFUSED_OUTCOMES, UNLIKE_TRAINING
from pneumonia.predictor import Predictor
from pneumonia.preprocess import ImageError


def log(msg: str) -> None:
    print(f"[bench_site] {msg}", file=sys.stderr, flush=True)


def _hash(pid: str) -> str:
    return hashlib.sha256(pid.encode()).hexdigest()


def subset(site: SiteFilms, ix: np.ndarray) -> SiteFilms:
    """The films ``ix`` of a site, with their metadata."""
    return replace(
        site,
        x=site.x[ix],
        y=site.y[ix],
        groups=[site.groups[i] for i in ix],
        keys=[site.keys[i] for i in ix],
        metadata={k: [v[i] for i in ix] for k, v in site.metadata.items()},
    )


def halves(site: SiteFilms) -> tuple[np.ndarray, np.ndarray]:
    """Films of the patients whose id hash is even / odd (a fixed two-way split by patient)."""
    odd = np.array([int(_hash(g)[-1], 16) % 2 for g in site.groups], dtype=bool)
    return np.flatnonzero(~odd), np.flatnonzero(odd)


def hundred(site: SiteFilms, per_class: int = 50) -> np.ndarray:
    """Up to ``per_class`` films of each class, whole patients in the order of their id hash
    (a patient whose films hold both classes is skipped)."""
    members: dict[str, list[int]] = {}
    for i, g in enumerate(site.groups):
        members.setdefault(g, []).append(i)
    taken = {0: 0, 1: 0}
    picked: list[int] = []
    for g in sorted(members, key=_hash):
        labels = {int(site.y[i]) for i in members[g]}
        if len(labels) != 1:
            continue
        label = labels.pop()
        if taken[label] + len(members[g]) <= per_class:
            picked += members[g]
            taken[label] += len(members[g])
    return np.array(sorted(picked), dtype=np.int64)


def score(model: Path, site: SiteFilms) -> dict[str, Any]:
    """The model on films it did not see: ranking, the operating point, calibration, the check."""
    p = Predictor(model, refuse=False)
    scored = p.scores(site.x)
    probs, checks = scored.probabilities, scored.checks
    y = site.y
    pos = probs >= p.threshold
    outcomes = [c.outcome for c in checks]
    return {
        "n": len(y),
        "patients": len(set(site.groups)),
        "auc": roc_auc(y, probs),
        "sensitivity": float(pos[y == 1].mean()),
        "specificity": float((~pos[y == 0]).mean()),
        "ece": expected_calibration_error(y, probs),
        "flagged_unlike_training": outcomes.count(UNLIKE_TRAINING) / len(outcomes),
        "refused": sum(o in REFUSED_OUTCOMES for o in outcomes) / len(outcomes),
    }


def refusals(model: Path, folder: Path) -> dict[str, Any]:
    """Share of the images under ``folder`` the model's input check refuses, per kind."""
    p = Predictor(model, refuse=False)
    by: dict[str, list[bool]] = {}
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or f.suffix.lower() not in (".png", ".jpg", ".jpeg"):
            continue
        try:
            refused = p.predict_bytes(f.read_bytes()).check.outcome in REFUSED_OUTCOMES
        except ImageError:
            refused = True  # not decodable as an image at all
        by.setdefault(f.relative_to(folder).parts[0], []).append(refused)
    every = [r for v in by.values() for r in v]
    return {
        "n": len(every),
        "refused": sum(every) / max(1, len(every)),
        "by_kind": {k: {"n": len(v), "refused": sum(v)} for k, v in by.items()},
    }


def adapt_on(model: Path, data: Path, site: SiteFilms, out: Path) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    rec = adapt_model(model, data, out, site=site, force=True)
    return rec, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="the base model")
    ap.add_argument("--data", type=Path, required=True, help="the labelled site folder")
    ap.add_argument(
        "--nonxray", type=Path, help="development non-radiographs (nonradiographs.py --set dev)"
    )
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--keep", type=Path, help="keep the model adapted on every film here (.onnx)")
    a = ap.parse_args()
    base_sha = hashlib.sha256(a.model.read_bytes()).hexdigest()
    report: dict[str, Any] = {"model": str(a.model), "data": str(a.data)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # 1. Every film, timed from the command's start (reading the films included).
        full = a.keep or work / "site.onnx"
        start = time.perf_counter()
        rec = adapt_model(a.model, a.data, full, force=True)
        report["all_films"] = {"seconds": time.perf_counter() - start, "record": rec}
        log(
            f"adapt on every film: {report['all_films']['seconds']:.0f} s, CV AUC {rec['cross_validated']['auc']:.3f}"
        )
        site = read_site(a.data, Predictor(a.model).spec)
        # 2. Non-radiographs.
        if a.nonxray:
            report["nonradiographs_dev"] = {
                "adapted": refusals(full, a.nonxray),
                "base": refusals(a.model, a.nonxray),
            }
            log(
                f"dev non-radiographs refused: {report['nonradiographs_dev']['adapted']['refused']:.3f}"
            )
        report["base_on_site"] = score(a.model, site)
        # 3. Two halves by patient: adapt on one, score the other.
        report["halves"] = []
        for i, (fit_ix, test_ix) in enumerate((halves(site), halves(site)[::-1])):
            out = work / f"half{i}.onnx"
            rec_h, sec = adapt_on(a.model, a.data, subset(site, fit_ix), out)
            row = {
                "fitted_on": len(fit_ix),
                "seconds": sec,
                "cross_validated_auc": rec_h["cross_validated"]["auc"],
                "head": rec_h["head"]["chosen"],
                "other_half": score(out, subset(site, test_ix)),
            }
            report["halves"].append(row)
            log(f"half {i}: fitted on {len(fit_ix)}, other half {json.dumps(row['other_half'])}")
        # 4. A hundred films.
        ix = hundred(site)
        rest = np.setdiff1d(np.arange(len(site.y)), ix)
        assert not {site.groups[i] for i in ix} & {site.groups[i] for i in rest}
        rec_100, sec = adapt_on(a.model, a.data, subset(site, ix), work / "hundred.onnx")
        report["hundred"] = {
            "films": len(ix),
            "counts": {"NORMAL": int((site.y[ix] == 0).sum()), "PNEUMONIA": int(site.y[ix].sum())},
            "patients": len({site.groups[i] for i in ix}),
            "seconds": sec,
            "cross_validated_auc": rec_100["cross_validated"]["auc"],
            "head": rec_100["head"]["chosen"],
            "other_patients": score(work / "hundred.onnx", subset(site, rest)),
        }
        log(f"100 films: {json.dumps(report['hundred'])}")
    after = hashlib.sha256(a.model.read_bytes()).hexdigest()
    report["base_file_unchanged"] = after == base_sha
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(markdown(report))
    return 0 if report["base_file_unchanged"] else 1


def _f(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def markdown(r: dict[str, Any]) -> str:
    """The tables docs/site.md quotes."""
    rec = r["all_films"]["record"]
    cv = rec["cross_validated"]
    lines = [
        f"adapt on all {rec['site']['n']} films ({rec['site']['patients']} patients): "
        f"{r['all_films']['seconds']:.0f} s wall; head {rec['head']['chosen']}",
        "",
        "| cross-validated on the site films | value (95% CI) |",
        "|---|---|",
        f"| ROC-AUC | {_f(cv['auc'])} ({_f(cv['auc_ci95'][0])}-{_f(cv['auc_ci95'][1])}) |",
        *[
            f"| {m} | {_f(cv[m])} ({_f(cv['ci95'][m][0])}-{_f(cv['ci95'][m][1])}) |"
            for m in ("sensitivity", "specificity", "ece")
        ],
        f"| base model as shipped, ROC-AUC | {_f(rec['base_on_site']['auc'])} |",
        "",
        "| learning curve: films | ROC-AUC mean | worst | best |",
        "|---|---|---|---|",
        *[
            f"| {x['films']} | {_f(x['auc_mean'])} | {_f(x['auc_min'])} | {_f(x['auc_max'])} |"
            for x in rec["learning_curve"]["rows"]
        ],
        "",
        "| films adapt never saw | fitted on | ROC-AUC | sensitivity | specificity | ECE | flagged | refused |",
        "|---|---|---|---|---|---|---|---|",
    ]
    b = r["base_on_site"]
    lines.append(
        f"| all {b['n']} (base model as shipped) | - | {_f(b['auc'])} | {_f(b['sensitivity'])} | "
        f"{_f(b['specificity'])} | {_f(b['ece'])} | {b['flagged_unlike_training']:.1%} | {b['refused']:.1%} |"
    )
    for i, h in enumerate(r["halves"]):
        o = h["other_half"]
        lines.append(
            f"| half {i + 1} of the patients ({o['n']} films) | the other half ({h['fitted_on']}) | "
            f"{_f(o['auc'])} | {_f(o['sensitivity'])} | {_f(o['specificity'])} | {_f(o['ece'])} | "
            f"{o['flagged_unlike_training']:.1%} | {o['refused']:.1%} |"
        )
    h = r["hundred"]
    o = h["other_patients"]
    lines.append(
        f"| the other patients ({o['n']} films) | 100 films by patient hash ({h['counts']['NORMAL']} / "
        f"{h['counts']['PNEUMONIA']}) | {_f(o['auc'])} | {_f(o['sensitivity'])} | {_f(o['specificity'])} | "
        f"{_f(o['ece'])} | {o['flagged_unlike_training']:.1%} | {o['refused']:.1%} |"
    )
    if "nonradiographs_dev" in r:
        n = r["nonradiographs_dev"]
        lines += [
            "",
            f"Development non-radiographs refused: adapted {n['adapted']['refused']:.1%} of "
            f"{n['adapted']['n']}, base {n['base']['refused']:.1%}.",
        ]
    ic = rec["input_check"]
    lines += [
        f"Input check on the site films, cross-fitted: flagged {ic['site_flagged_cross_fitted']:.1%}, "
        f"refused {ic['site_refused_cross_fitted']:.1%}; the inherited base refusal refuses "
        f"{ic['site_refused_by_base']:.1%}.",
        f"Base file unchanged: {r['base_file_unchanged']}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
