"""The test-look ledger: every scoring of a model on an official test set, in order.

A test set stays an honest estimate only while nothing is chosen on it; each look spends some of
that. ``pneumonia evaluate --ledger FILE`` appends what it scored (the model's name, version,
file and weights digests; the data set and split; the command, date and commit) and the model
card reads the ledger to say which look its figures are (:func:`describe_look`), instead of a
sentence typed by hand. The project keeps its own in ``artifacts/test_looks.json``.
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pneumonia.card import ModelCard


class LedgerError(ValueError):
    """A ledger that cannot be read or a look it does not hold; the message says which."""


@dataclass(frozen=True)
class Look:
    """One scoring of one model file on one test set.

    Attributes:
        dataset / split: Which test set (the dataset descriptor's name and the split).
        n: Images scored.
        model: ``name``, ``version``, ``sha256`` (file) and ``weights_sha256`` (None where the
            file predates the digest and could not be recovered).
        command: What was run.
        date: UTC, ISO 8601.
        commit: The repository's commit when it ran (None outside a git checkout).
        note: What else the record shows (e.g. how an old look was reconstructed).
    """

    dataset: str
    split: str
    n: int
    model: dict[str, str | None]
    command: str
    date: str
    commit: str | None = None
    note: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Look:
        try:
            look = cls(**d)
        except TypeError as exc:
            raise LedgerError(f"a ledger entry does not read as a look: {exc}") from None
        for key in ("name", "version", "sha256"):
            if not look.model.get(key):
                raise LedgerError(f"a ledger entry's model lacks {key}: {d}")
        return look

    def same_model(self, sha256: str | None, weights_sha256: str | None) -> bool:
        return (sha256 is not None and self.model.get("sha256") == sha256) or (
            weights_sha256 is not None and self.model.get("weights_sha256") == weights_sha256
        )


@dataclass
class Ledger:
    """The looks recorded in one file, oldest first."""

    path: Path
    looks: list[Look] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Ledger:
        """Read ``path``; a missing file is an empty ledger (the first look creates it)."""
        path = Path(path)
        if not path.is_file():
            return cls(path)
        try:
            d = json.loads(path.read_text())
            return cls(path, [Look.from_dict(x) for x in d["looks"]])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise LedgerError(f"test-look ledger {path} is malformed: {exc}") from None

    def append(self, look: Look) -> None:
        """Add ``look`` and write the file whole."""
        from pneumonia import atomic

        self.looks.append(look)
        doc = {
            "about": "Every scoring of a model on an official test set, oldest first "
            "(pneumonia.ledger; `pneumonia evaluate --ledger` appends).",
            "looks": [asdict(x) for x in self.looks],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.path, json.dumps(doc, indent=1) + "\n")

    def at(self, dataset: str, split: str) -> list[Look]:
        """The looks at one test set, oldest first."""
        return [x for x in self.looks if x.dataset == dataset and x.split == split]


def current_commit(repo: Path | None = None) -> str | None:
    """The git commit of ``repo`` (default: the working directory), or None outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def record_look(
    ledger: Path,
    *,
    dataset: str,
    split: str,
    n: int,
    model: Mapping[str, str | None],
    argv: Sequence[str] | None = None,
) -> Look:
    """Append one look to the ledger at ``ledger`` and return it."""
    look = Look(
        dataset=dataset,
        split=split,
        n=n,
        model=dict(model),
        command=shlex.join(["pneumonia", *(sys.argv[1:] if argv is None else argv)]),
        date=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        commit=current_commit(),
    )
    book = Ledger.load(ledger)
    book.append(look)
    return look


def lineage_digests(card: ModelCard) -> set[str]:
    """Weights digests of the model and every model it comes from."""
    return {card.weights_sha256} | {r.weights_sha256 for r in card.lineage if r.weights_sha256}


def describe_look(book: Ledger, card: ModelCard, report: Mapping[str, Any]) -> tuple[str, str]:
    """(heading, note) for a test report in the model card, from the ledger alone.

    The heading says which look at that test set the report is; the note lists the earlier
    looks and how often this model's lineage has been scored there.

    Raises:
        LedgerError: the report's model was never recorded as a look at its set.
    """
    model = report.get("model", {})
    dataset = report.get("dataset") or (card.dataset.name if card.dataset else None)
    if dataset is None:
        raise LedgerError("the report names no data set and the card declares none")
    split = report.get("split", "test")
    at = book.at(dataset, split)
    mine = [
        i
        for i, x in enumerate(at)
        if x.same_model(model.get("sha256"), model.get("weights_sha256"))
    ]
    if not mine:
        raise LedgerError(
            f"{book.path} holds no look at {dataset}/{split} by model "
            f"{str(model.get('sha256'))[:12]}...; score it with `pneumonia evaluate --ledger`"
        )
    k = mine[-1] + 1
    digests = lineage_digests(card)
    lineage = sum(1 for x in at if x.model.get("weights_sha256") in digests)
    if k == 1:
        heading = (
            "the first look at this test set (test-look ledger): nothing was chosen on it before"
        )
    else:
        heading = (
            f"look {k} at this test set (test-look ledger): earlier looks may have shaped choices, "
            "so these figures are not a fresh held-out estimate"
        )
    earlier = [
        f"{x.model['name']} {x.model['version']} on {x.date[:10]}"
        + (f" at {x.commit}" if x.commit else "")
        + (f" ({x.note})" if x.note else "")
        for x in at[: k - 1]
    ]
    this = at[k - 1]
    note = (
        f"This model's lineage has been scored on this set {lineage} time(s) in all"
        + (f"; this look: {this.note}" if this.note else "")
        + "."
        + (" Earlier looks at it: " + "; ".join(earlier) + "." if earlier else "")
    )
    return heading, note
