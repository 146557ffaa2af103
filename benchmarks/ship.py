"""``make ship``: rebuild the shipped model and its baseline from the data, timed, in a scratch
folder; publish into artifacts/ only when asked.

Scratch mode (the default) writes only under ``--out``: the two training runs, their input
checks, their ONNX files, and each compared with the published file on the validation split
(benchmarks/compare_models.py). It never writes artifacts/ and never scores the official test
set. ``--publish`` then exports both runs into artifacts/, scores each once on the test set with
``--ledger artifacts/test_looks.json`` (a recorded look), refits the shipped file's frontal-chest
check (``make frontal-fit``, which needs ../shared/data), reruns the input-check benchmark and
renders the cards.

Every step's command and wall-clock seconds go to ``OUT/ship.json`` as it finishes, with the
versions and CPU count, so the time in docs/model.md comes from the run's own record.

Usage::

    python benchmarks/ship.py --data ../shared/data/chest_xray --dataset datasets/kermany-2018.json \\
        --out runs/ship-20261206 [--publish --version 3.0.0]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: The shipped model's training command's own arguments: the default configuration.
SHIPPED_ARGS: tuple[str, ...] = ()
#: The logistic-regression baseline's (docs/model.md).
BASELINE_ARGS = (
    "--arch", "logreg", "--size", "192", "--seeds", "0", "--epochs", "24",
    "--lr", "2e-3", "--schedule", "cosine",
)  # fmt: skip
#: The published files (artifacts/), relative to ``--artifacts``.
PUBLISHED = {"shipped": "model.onnx", "baseline": "baseline/model.onnx"}
#: Their test reports, relative to ``--artifacts``.
REPORTS = {"shipped": "eval", "baseline": "baseline/eval"}
LEDGER = "test_looks.json"


def _pneumonia() -> list[str]:
    """The CLI of this interpreter's environment (the one ``make ship`` installed)."""
    return [sys.executable, "-c", "import sys; from pneumonia.cli import main; sys.exit(main())"]


class Ship:
    """Runs the steps in order, recording each in ``OUT/ship.json``."""

    def __init__(self, out: Path, publish: bool) -> None:
        self.out = out
        self.record: dict[str, Any] = {
            "started": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
            "mode": "publish" if publish else "scratch",
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "steps": [],
        }

    def step(self, name: str, args: list[str], *, cli: bool = True) -> None:
        cmd = [*_pneumonia(), *args] if cli else args
        shown = shlex.join(["pneumonia", *args] if cli else args)
        print(f"== {name}: {shown}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        seconds = round(time.perf_counter() - t0, 1)
        self.record["steps"].append({"step": name, "command": shown, "seconds": seconds})
        self.record["total_seconds"] = round(sum(s["seconds"] for s in self.record["steps"]), 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "ship.json").write_text(json.dumps(self.record, indent=1) + "\n")


def ship(a: argparse.Namespace) -> dict[str, Any]:
    out, art = a.out, a.artifacts
    s = Ship(out, a.publish)
    extra = shlex.split(a.train_args)
    dataset = ["--dataset", str(a.dataset)] if a.dataset else []
    version = ["--version", a.version] if a.version else []
    for which, args in (("shipped", SHIPPED_ARGS), ("baseline", BASELINE_ARGS)):
        run = out / which
        model = out / which / "model.onnx"
        s.step(
            f"train {which}",
            [
                *("train", "--data", str(a.data), *dataset, "--out", str(run)),
                *(*args, *extra, "--no-progress"),
            ],
        )
        s.step(f"guard fit {which}", ["guard", "fit", str(run), "--no-progress"])
        s.step(f"export {which}", ["export", str(run), "--out", str(model), *version])
        reference = art / PUBLISHED[which]
        if reference.is_file():
            s.step(
                f"compare {which}",
                [
                    *(sys.executable, str(Path(__file__).with_name("compare_models.py"))),
                    *("--run", str(run), "--model", str(model), "--reference", str(reference)),
                    *("--json", str(out / f"compare-{which}.json")),
                ],
                cli=False,
            )
    if not a.publish:
        return s.record
    # Publishing: a new model in artifacts/, and one recorded look at the test set each.
    make = os.environ.get("MAKE", "make")
    for which in ("shipped", "baseline"):
        run, model, report = out / which, art / PUBLISHED[which], art / REPORTS[which]
        s.step(
            f"publish {which}",
            ["export", str(run), "--out", str(model), *version],
        )
        if which == "shipped":
            # The frontal-chest check reads the new weights' features: fitted again for them
            # and written into the file (its graph and weights untouched) before the test look.
            s.step(
                "frontal check shipped",
                [make, "frontal-fit", f"MODEL={model}", f"DATA={a.data}"],
                cli=False,
            )
        s.step(
            f"test set {which}",
            ["evaluate", "--model", str(model), "--data", str(a.data)]
            + ["--json", str(report / "test.json"), "--markdown", str(report / "test.md")]
            + ["--plots", str(report / "plots"), "--run-dir", str(run), *dataset]
            + (["--predictions", str(report / "predictions.csv")] if which == "shipped" else [])
            + ["--ledger", str(art / LEDGER)],
        )
    s.step(
        "input-check benchmark",
        [make, "guard-bench", f"MODEL={art / PUBLISHED['shipped']}", f"RUN={out / 'shipped'}"],
        cli=False,
    )
    s.step("cards", [make, "cards"], cli=False)
    return s.record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="the training data (Kaggle layout)")
    ap.add_argument("--dataset", type=Path, help="its dataset descriptor (datasets/)")
    ap.add_argument("--out", type=Path, required=True, help="the scratch folder")
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    ap.add_argument(
        "--version", help="the model's version in its card (default: pneumonia export's)"
    )
    ap.add_argument(
        "--publish",
        action="store_true",
        help="also write artifacts/ and score the official test set (a recorded look)",
    )
    ap.add_argument(
        "--train-args", default="", help="appended to both training commands (smoke tests)"
    )
    a = ap.parse_args(argv)
    if a.out.resolve() == a.artifacts.resolve() or a.artifacts.resolve() in a.out.resolve().parents:
        ap.error(f"--out {a.out} is inside {a.artifacts}; the scratch folder must be elsewhere")
    record = ship(a)
    print(json.dumps({"out": str(a.out), **record}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
