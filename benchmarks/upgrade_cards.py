"""The upgrade of the committed model files to card schema 2 (issue 19), kept as its record.

What it does, each from a record, nothing typed from memory:

1. The test-look ledger ``artifacts/test_looks.json``, reconstructed from git history when it
   does not exist yet: every commit that landed a test report (``artifacts/*eval/test.json``)
   is one look; the model file scored is taken from the same commit, and its file and weights
   digests are computed from it.
2. For ``artifacts/model.onnx`` (v2) and ``artifacts/baseline/model.onnx``: which constraint set
   the threshold of their ``stressed_youden`` rule. The validation split is drawn again from
   the card's training config (patient-grouped, the same seed), scored through the file, and
   the rule's sensitivity floor recomputed on it: a threshold equal to the floor (within the
   ONNX-vs-torch parity, 1e-4) was set by the floor, a lower one by Youden's optimum.
3. The rewritten cards: version 2.0.0 (the project's second model release), the data set from
   ``datasets/kermany-2018.json``, ``bound_by``, and for v2 its lineage (the evaluated file,
   whose logits the shipped re-export reproduces: docs/model.md). Weights and graph are kept
   byte for byte (the weights digest is checked before and after).
4. The Markdown cards, with the test reports placed by the ledger.

Usage (needs ../shared/data/chest_xray for step 2; reads only the validation split of train)::

    .venv/bin/python benchmarks/upgrade_cards.py --data ../shared/data/chest_xray
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from pneumonia.card import (
    RULE_OPTIMUM,
    SENSITIVITY_FLOOR,
    Dataset,
    ModelCard,
    ModelRef,
    file_digests,
    pick_threshold,
    read_metadata,
    read_model_card,
    render_markdown,
    rewrite_card,
    weights_digest,
)
from pneumonia.data import load_images, train_val_split
from pneumonia.ledger import Ledger, Look
from pneumonia.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]
VERSION = "2.0.0"
DATASET = REPO / "datasets" / "kermany-2018.json"
LEDGER = REPO / "artifacts" / "test_looks.json"
#: ONNX-vs-PyTorch logit parity of every export (training/export.py's PARITY_ATOL).
PARITY = 1e-4


def git(*args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, check=True).stdout


def reconstruct_ledger() -> Ledger:
    """One look per commit that landed a test report, oldest first."""
    book = Ledger(LEDGER)
    reports = {
        "artifacts/eval/test.json": "artifacts/model.onnx",
        "artifacts/baseline/eval/test.json": "artifacts/baseline/model.onnx",
    }
    log = git("log", "--reverse", "--format=%H %cI", "--", *reports).decode().split("\n")
    for line in filter(None, log):
        commit, date = line.split()
        for report_path, model_path in reports.items():
            try:
                report = json.loads(git("show", f"{commit}:{report_path}"))
                model = git("show", f"{commit}:{model_path}")
            except subprocess.CalledProcessError:
                continue
            if "model" not in report:
                continue
            m = report["model"]
            props = read_metadata(model)
            sha = hashlib.sha256(model).hexdigest()
            if sha != m["sha256"]:  # the report landed beside another file than it scored
                continue
            if any(x.model["sha256"] == sha for x in book.looks):
                continue
            card = json.loads(props["model_card"])
            book.looks.append(
                Look(
                    dataset="kermany-2018",
                    split="test",
                    n=int(report["n"]),
                    model={
                        "name": card["name"],
                        "version": card.get("version", "unversioned"),
                        "sha256": sha,
                        "weights_sha256": weights_digest(model),
                    },
                    command=f"pneumonia evaluate --model {model_path} --data "
                    f"{report.get('data', '?').rsplit('/test', 1)[0]} --json {report_path} (make ship)",
                    date=date,
                    commit=commit[:12],
                    note=f"reconstructed from git history: the report landed in {commit[:7]}",
                )
            )
    return book


def bound_by(p: Predictor, data: Path) -> str:
    """Which constraint of ``stressed_youden`` set this model's threshold (see module doc)."""
    card = p.card
    cfg = (card.training or {})["config"]
    split = train_val_split(data, cfg["val_fraction"], cfg["split_seed"], cfg["max_images"])
    val = load_images(split.val, p.spec)
    recorded = (card.training or {})["data"]["validation"]
    counts = {"NORMAL": int((val.y == 0).sum()), "PNEUMONIA": int((val.y == 1).sum())}
    if counts != recorded:
        raise SystemExit(f"validation split drawn again has {counts}, the card recorded {recorded}")
    probs = p.scores(val.x).probabilities
    rule = card.threshold_rule
    assert rule.rule == "stressed_youden" and rule.min_sensitivity is not None
    floor = pick_threshold("min_sensitivity", val.y, probs, rule.min_sensitivity).threshold
    print(
        f"{card.name}: threshold {card.threshold:.6f}, clean-validation floor at sensitivity "
        f"{rule.min_sensitivity} {floor:.6f} ({len(val.y)} films)",
        file=sys.stderr,
    )
    if abs(card.threshold - floor) <= PARITY:
        return SENSITIVITY_FLOOR
    if card.threshold < floor:
        return RULE_OPTIMUM
    raise SystemExit(
        f"threshold {card.threshold} is above the floor {floor}: the rule cannot give it"
    )


def upgrade(model: Path, data: Path, lineage: tuple[ModelRef, ...]) -> ModelCard:
    p = Predictor(model, threads=1)
    before = p.weights_sha256
    binding = bound_by(p, data)
    dataset = Dataset.load(DATASET)

    def change(c: ModelCard) -> ModelCard:
        return c.with_(
            version=VERSION,
            dataset=dataset,
            threshold_rule=replace(c.threshold_rule, bound_by=binding),
            lineage=lineage,
        )

    rewrite_card(model, model, change)
    card = read_model_card(model)[0]
    assert file_digests(model).weights_sha256 == before == card.weights_sha256
    return card


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--data", type=Path, required=True, help="the Kaggle root the models trained on"
    )
    a = ap.parse_args()
    book = Ledger.load(LEDGER) if LEDGER.is_file() else reconstruct_ledger()
    if not LEDGER.is_file():
        book.looks.sort(key=lambda x: x.date)
        looks = book.looks
        book.looks = []
        for x in looks:
            book.append(x)
    shipped = REPO / "artifacts" / "model.onnx"
    report = json.loads((REPO / "artifacts" / "eval" / "test.json").read_text())
    evaluated = next(x for x in book.looks if x.model["sha256"] == report["model"]["sha256"])
    parent = ModelRef(
        evaluated.model["name"],
        evaluated.model["version"],
        evaluated.model["weights_sha256"],
        evaluated.model["sha256"],
        "the file scored on the test set; this file is the same trained weights exported again "
        "with the input check's mid-level statistics added to the embedding output, its logits "
        "identical on all 624 test films (docs/model.md)",
    )
    card = upgrade(shipped, a.data, (parent,))
    base_model = REPO / "artifacts" / "baseline" / "model.onnx"
    base = upgrade(base_model, a.data, ())
    digests = file_digests(shipped)
    reports: dict[str, Any] = {
        k: json.loads((REPO / "artifacts" / p).read_text())
        for k, p in (
            ("test", "eval/test.json"),
            ("baseline", "baseline/eval/test.json"),
            ("v1", "v1/eval/test.json"),
        )
    }
    (REPO / "artifacts" / "model.card.md").write_text(
        render_markdown(
            card,
            {"sha256": digests.sha256, "file": shipped.name},
            test=reports["test"],
            baseline=reports["baseline"],
            previous=("pneumonia-cnn 1.0.0 (v1)", reports["v1"]),
            looks=book,
        )
    )
    bd = file_digests(base_model)
    (REPO / "artifacts" / "baseline" / "model.card.md").write_text(
        render_markdown(
            base,
            {"sha256": bd.sha256, "file": base_model.name},
            test=reports["baseline"],
            looks=book,
        )
    )
    print(
        json.dumps(
            {
                "model": card.version,
                "sha256": digests.sha256,
                "weights_sha256": digests.weights_sha256,
                "baseline_sha256": bd.sha256,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
