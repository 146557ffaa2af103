"""How the input check does: refusal rate per kind of non-radiograph, and the refusal and flag
rates on chest films, plus what the check costs per image.

- non-radiographs: the set benchmarks/nonradiographs.py builds (photos, pages, screenshots,
  uniform, gradient and noise images; colour and gray; JPEG and PNG), built into --nonxray
  if that folder does not exist yet;
- validation films: the validation split of --run (its split record, as training
  drew it; the thresholds were set on these films);
- test films: --data ROOT/test, used here only to measure how many films the check accepts,
  never to set anything.

Usage (the figures in docs/input_check.md)::

    .venv/bin/python benchmarks/bench_guard.py --model runs/guarded/model.onnx --run runs/shipped \\
        --data ../shared/data/chest_xray --nonxray runs/nonradiographs --json runs/bench_guard.json

Every image is checked with refusal turned into a flag, so each outcome is counted. Prints a
Markdown table; progress goes to stderr.
"""

from __future__ import annotations

import os

# One BLAS thread, as the service runs in its container (Dockerfile): the check's CPU time is
# then what it costs, not threads spinning on a shared machine. Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import sys
import time
import tracemalloc
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from pneumonia.guard import OUTCOMES, REFUSED_OUTCOMES, UNLIKE_TRAINING, rates_table
from pneumonia.predictor import Prediction, Predictor
from pneumonia.preprocess import Preprocessed as Prepared

REPO = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[bench_guard] {msg}", file=sys.stderr, flush=True)


def outcomes(
    predictor: Predictor, files: list[Path]
) -> tuple[list[str], list[tuple[float | None, float | None]]]:
    """Each file's outcome (or ``error:<code>``), score and refusal score."""
    out: list[str] = []
    scores: list[tuple[float | None, float | None]] = []
    for p in predictor.predict(files, refuse=False):
        if isinstance(p, Prediction):
            assert p.check is not None
            out.append(p.check.outcome)
            scores.append((p.check.score, p.check.refusal_score))
        else:
            out.append(f"error:{p.code}")
            scores.append((None, None))
    return out, scores


def rates(results: list[str]) -> dict[str, Any]:
    c = Counter(results)
    n = len(results)
    # Either refusal counts: since issue 25 a chest film can also be refused as not frontal.
    refused = sum(c[o] for o in REFUSED_OUTCOMES) + sum(
        v for k, v in c.items() if k.startswith("error:")
    )
    return {
        "n": n,
        "refused": refused,
        "flagged": c[UNLIKE_TRAINING],
        "refused_rate": refused / n if n else None,
        "flagged_rate": c[UNLIKE_TRAINING] / n if n else None,
        "outcomes": dict(c),
    }


def cost(predictor: Predictor, prepared: list[Prepared], repeats: int = 3) -> dict[str, float]:
    """CPU time per image of the check alone (image rules + feature distance), and its memory."""
    x = np.stack([p.input for p in prepared])
    stats = [p.stats for p in prepared]
    emb = predictor.scores(x, stats).features
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()  # CPU time: robust to other processes on a shared machine
        for i in range(len(x)):  # one image at a time, as /predict does
            predictor.input_checks(
                x[i : i + 1], None if emb is None else emb[i : i + 1], stats[i : i + 1]
            )
        best = min(best, (time.process_time() - t0) / len(x))
    tracemalloc.start()
    predictor.input_checks(x[:1], None if emb is None else emb[:1], stats[:1])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    g = predictor.guard
    held = sum(
        q.mean.nbytes + q.components.nbytes + q.variances.nbytes
        for q in ((g.head, g.mid) if g is not None else ())
        if q is not None
    )
    return {
        "ms_per_image": best * 1000,
        "peak_bytes_per_check": float(peak),
        "stored_bytes": float(held),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", type=Path, required=True, help="an exported model with a fitted input check"
    )
    ap.add_argument("--nonxray", type=Path, default=REPO / "runs" / "nonradiographs")
    ap.add_argument("--run", type=Path, help="training run folder: measure its validation split")
    ap.add_argument("--data", type=Path, help="Kaggle root: measure ROOT/test (acceptance only)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    predictor = Predictor(a.model, threads=1, refuse=False)
    if predictor.guard is None:
        log("the model carries no fitted feature statistics: only the image checks are measured")
    if not a.nonxray.is_dir():
        sys.path.insert(0, str(Path(__file__).parent))
        from nonradiographs import build

        film = (
            next(iter(sorted((a.data / "test" / "NORMAL").glob("*.jpeg"))), None)
            if a.data
            else None
        )
        log(f"building the non-radiograph set in {a.nonxray}")
        build(a.nonxray, a.model, film)

    report: dict[str, Any] = {
        "model": {"path": str(a.model), "sha256": predictor.sha256},
        "kinds": {},
        "films": {},
    }
    by_kind: dict[str, list[Path]] = defaultdict(list)
    for f in sorted(a.nonxray.glob("*/*")):
        by_kind[f.parent.name].append(f)
    all_nonxray: list[str] = []
    per_file: dict[str, Any] = {}
    for kind, files in sorted(by_kind.items()):
        res, scores = outcomes(predictor, files)
        all_nonxray += res
        report["kinds"][kind] = rates(res)
        for version in ("colour", "gray"):
            report["kinds"][kind][version] = rates(
                [r for f, r in zip(files, res, strict=True) if f"_{version}." in f.name]
            )
        per_file.update(
            {f"{kind}/{f.name}": [r, *s] for f, r, s in zip(files, res, scores, strict=True)}
        )
        log(f"{kind}: {report['kinds'][kind]['refused']}/{len(files)} refused")
    report["kinds"]["all"] = rates(all_nonxray)
    report["nonxray_files"] = per_file

    film_sets: dict[str, list[Path]] = {}
    if a.run:
        from pneumonia.training.guard_fit import recorded_split

        film_sets["validation"] = [s.path for s in recorded_split(a.run).val]
    if a.data:
        from pneumonia.data import list_split, resolve_split

        film_sets["test"] = [s.path for s in list_split(resolve_split(a.data, "test"))]
    for name, files in film_sets.items():
        res, scores = outcomes(predictor, files)
        report["films"][name] = rates(res)
        report["films"][name]["refused_files"] = [
            str(f) for f, r in zip(files, res, strict=True) if r in REFUSED_OUTCOMES
        ]
        refusal = [s[1] for s in scores if s[1] is not None]
        if refusal:  # how close the films come to being refused (1.0: refused)
            report["films"][name]["refusal_score_quantiles"] = {
                q: float(np.quantile(refusal, float(q))) for q in ("0.5", "0.99", "1.0")
            }
        log(
            f"{name} films: {report['films'][name]['refused']} refused, "
            f"{report['films'][name]['flagged']} flagged of {len(files)}"
        )

    sample = [
        p
        for p in (
            predictor.prepare(f.read_bytes())
            for f in (film_sets.get("validation") or film_sets.get("test") or [])[:200]
        )
    ]
    if sample:
        report["cost"] = cost(predictor, sample)

    print("\n".join(rates_table(report["kinds"], report["films"])))
    if "cost" in report:
        c = report["cost"]
        print(
            f"\ncheck cost: {c['ms_per_image']:.3f} ms CPU per image, "
            f"stored statistics {c['stored_bytes'] / 2**20:.2f} MiB, "
            f"peak {c['peak_bytes_per_check'] / 2**10:.0f} KiB per check"
        )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    assert set(OUTCOMES) >= {
        k for r in report["kinds"].values() for k in r["outcomes"] if not k.startswith("error:")
    }
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
