"""The one owner of a training run folder: its file names, its split record and its
environment record.

A run folder holds::

    RUN/config.json            the resolved TrainConfig
    RUN/split.json             the training and validation films as training drew them, once,
                               with a digest (every later stage reads this, none re-draws it)
    RUN/environment.json       per stage (train, calibrate, guard_fit): python, torch, numpy,
                               onnxruntime, onnx versions and the thread count it ran with
    RUN/data.json              counts, skipped files, validation patients, the split's digest
    RUN/member-<seed>/         best.pt, last.pt and history.json per ensemble member
    RUN/calibration.json       temperature, bias, threshold and the (stressed) validation
    RUN/val_predictions.csv    validation file, label, ensemble logit and probability
    RUN/guard.json             the fitted input check (``pneumonia guard fit``)

Every stage after training (``pneumonia calibrate``, ``pneumonia guard fit``, ``pneumonia
export``) takes the split from ``split.json`` and refuses a record whose digest does not match
its lists, or whose digest differs from the one the earlier stages recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from pneumonia import __version__, atomic
from pneumonia.data import (
    Sample,
    TrainValSplit,
    is_manifest,
    train_val_split,
)

log = logging.getLogger(__name__)

CONFIG = "config.json"
SPLIT = "split.json"
ENVIRONMENT = "environment.json"
DATA = "data.json"
CALIBRATION = "calibration.json"
VAL_PREDICTIONS = "val_predictions.csv"
GUARD = "guard.json"
MEMBER_PREFIX = "member-"
#: Per member: the best epoch's weights and configs (what export and guard fit load).
CHECKPOINT = "best.pt"
#: Per member, rewritten after every epoch: model, optimizer, step, RNG states, history, best.
LAST = "last.pt"
HISTORY = "history.json"

#: Version of split.json's layout.
SPLIT_SCHEMA = 1
#: Stages that record their environment in environment.json.
STAGES = ("train", "calibrate", "guard_fit")


class SplitRecordError(ValueError):
    """split.json is missing a field, was edited, or disagrees with the run's other records."""


@dataclass(frozen=True)
class RunFolder:
    """Paths of one training run folder; the only place that spells its file names."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def split(self) -> Path:
        return self.path / SPLIT

    @property
    def environment(self) -> Path:
        return self.path / ENVIRONMENT

    @property
    def data(self) -> Path:
        return self.path / DATA

    @property
    def calibration(self) -> Path:
        return self.path / CALIBRATION

    @property
    def val_predictions(self) -> Path:
        return self.path / VAL_PREDICTIONS

    @property
    def guard(self) -> Path:
        return self.path / GUARD

    def member(self, seed: int) -> Path:
        """The folder of the member trained with ``seed``."""
        return self.path / f"{MEMBER_PREFIX}{seed}"

    def members(self) -> list[Path]:
        """The member folders that hold a checkpoint, in name order.

        Raises:
            FileNotFoundError: none does (not a finished training run folder).
        """
        dirs = sorted(p for p in self.path.glob(f"{MEMBER_PREFIX}*") if (p / CHECKPOINT).is_file())
        if not dirs:
            raise FileNotFoundError(
                f"{self.path} holds no {MEMBER_PREFIX}*/{CHECKPOINT}; is it a training run folder?"
            )
        return dirs

    def checkpoints(self) -> list[Path]:
        """Each member's ``best.pt``."""
        return [d / CHECKPOINT for d in self.members()]

    def read_data(self) -> dict[str, Any]:
        return dict(json.loads(self.data.read_text()))


# --- environment ------------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit() -> str:
    """The code's git commit (with ``-dirty`` for uncommitted changes), or ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
            cwd=here.parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(threads: int) -> dict[str, str]:
    """The versions that decide a run's numbers and the thread count it runs with.

    onnxruntime is here because the stressed validation (and so calibration and threshold)
    runs through it on the CPU; the thread count, the CPU and the instruction set torch
    dispatches to because CPU kernels reduce in another order with another count or another
    vector width; the commit because nothing else names the code (``-dirty``: it had
    uncommitted changes under src/pneumonia).
    """
    import torch

    return {
        "pneumonia": __version__,
        "commit": _commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "onnxruntime": _version("onnxruntime"),
        "onnx": _version("onnx"),
        "onnxscript": _version("onnxscript"),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "threads": str(threads),
    }


def record_environment(
    run: RunFolder, stage: str, threads: int, processes: int = 1
) -> dict[str, str]:
    """Write this process's :func:`environment` under ``stage`` in ``environment.json``.

    ``processes``: a data-parallel training's process count, recorded when above one (each
    process's BatchNorm statistics make another count give other weights).

    A stage run again with other versions than it recorded (say a resumed training) logs a
    warning naming them: the result is then not the one those versions would give alone.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {list(STAGES)}, got {stage!r}")
    env = environment(threads)
    if processes > 1:
        env["processes"] = str(processes)
    records = read_environment(run)
    before = records.get(stage)
    if before is not None and before != env:
        changed = sorted(k for k in env if before.get(k) != env[k])
        log.warning(
            "%s ran before with other versions or threads (%s): %s",
            stage,
            ", ".join(changed),
            {k: (before.get(k), env[k]) for k in changed},
        )
    records[stage] = env
    atomic.write_text(run.environment, json.dumps(records, indent=1, sort_keys=True) + "\n")
    return env


def read_environment(run: RunFolder) -> dict[str, dict[str, str]]:
    """environment.json's records by stage; empty for a run that predates it."""
    if not run.environment.is_file():
        return {}
    return {k: dict(v) for k, v in json.loads(run.environment.read_text()).items()}


# --- the split ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedSplit:
    """A run's split as :func:`load_split` gives it to the stages after training."""

    train: list[Sample]
    val: list[Sample]
    root: Path
    method: str
    description: str
    sha256: str


def _base(root: Path) -> Path:
    # Folders and .npz files name their films below themselves; a manifest beside itself.
    return root.parent if is_manifest(root) else root


def _rows(samples: list[Sample], root: Path) -> list[list[Any]]:
    base = _base(root)
    rows = []
    for s in samples:
        try:
            name = s.path.relative_to(base).as_posix()
        except ValueError:  # a manifest may name films anywhere: kept as it named them
            name = s.path.as_posix()
        rows.append([name, int(s.label), s.patient, s.npz_index])
    return rows


def _digest(method: str, train: list[list[Any]], val: list[list[Any]]) -> str:
    text = json.dumps(
        {"method": method, "train": train, "validation": val},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(text.encode()).hexdigest()


def split_digest(split: TrainValSplit, root: Path) -> str:
    """The digest :func:`record_split` records for ``split``, without writing (a training
    process other than rank 0 checks its own draw against rank 0's with it)."""
    return _digest(split.method, _rows(split.train, root), _rows(split.val, root))


def record_split(run: RunFolder, split: TrainValSplit, root: Path, params: dict[str, Any]) -> str:
    """Write the split training drew to ``split.json``; returns its digest.

    Args:
        params: What drew it (val_fraction, split_seed, max_images), checked against the
            config by :func:`load_split`.
    """
    train, val = _rows(split.train, root), _rows(split.val, root)
    digest = _digest(split.method, train, val)
    record = {
        "schema": SPLIT_SCHEMA,
        "data_root": str(root),
        "method": split.method,
        "description": split.description,
        "drawn_with": params,
        "sha256": digest,
        "columns": ["path", "label", "patient", "npz_index"],
        "train": train,
        "validation": val,
    }
    atomic.write_text(run.split, json.dumps(record, indent=0) + "\n")
    return digest


def _samples(rows: list[list[Any]], base: Path) -> list[Sample]:
    return [
        Sample(base / name, int(label), npz_index, manifest_patient=str(patient))
        for name, label, patient, npz_index in rows
    ]


def load_split(
    run: RunFolder,
    data_root: Path | None = None,
    params: dict[str, Any] | None = None,
    *,
    films: bool = True,
) -> RecordedSplit:
    """The split recorded in ``split.json``, its films under ``data_root`` (default: where
    training read them).

    Args:
        params: The run config's split parameters; a record drawn with others is refused.
        films: Check that every film is under ``data_root`` (a stage that reads them);
            False for a stage that needs only the record (export).

    Raises:
        SplitRecordError: the record is missing, unreadable, edited (its lists do not give its
            digest), drawn with other parameters than the config's, or names films that are
            not under ``data_root``.
    """
    if not run.split.is_file():
        raise SplitRecordError(
            f"{run.split} is missing: the run predates split records or did not start; "
            "retrain it, or use pneumonia.training.run.legacy_split"
        )
    try:
        record = json.loads(run.split.read_text())
        method, train_rows, val_rows = record["method"], record["train"], record["validation"]
        recorded = record["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SplitRecordError(f"{run.split} is not a split record ({exc}); retrain") from exc
    if record.get("schema") != SPLIT_SCHEMA:
        raise SplitRecordError(
            f"{run.split} has schema {record.get('schema')!r}, this version reads {SPLIT_SCHEMA}"
        )
    actual = _digest(method, train_rows, val_rows)
    if actual != recorded:
        raise SplitRecordError(
            f"{run.split} was changed after training: its lists give sha256 {actual[:12]}..., "
            f"the record says {recorded[:12]}...; restore it from the run or retrain"
        )
    if params is not None and record.get("drawn_with") != params:
        raise SplitRecordError(
            f"{run.split} was drawn with {record.get('drawn_with')}, the run's config says "
            f"{params}; the config was edited after training (restore it) or retrain"
        )
    data = run.read_data() if run.data.is_file() else {}
    if data.get("split_sha256") not in (None, recorded):
        raise SplitRecordError(
            f"{run.split} (sha256 {recorded[:12]}...) is not the split {run.data} recorded "
            f"({str(data['split_sha256'])[:12]}...); restore the run's own split.json"
        )
    root = Path(data_root) if data_root is not None else Path(record["data_root"])
    base = _base(root)
    train, val = _samples(train_rows, base), _samples(val_rows, base)
    files = {s.npz_file if s.npz_index is not None else s.path for s in train + val}
    missing = sorted(str(p) for p in files if films and p is not None and not p.exists())
    if missing:
        raise SplitRecordError(
            f"{len(missing)} film(s) of the run's split are not under {root} (first: "
            f"{missing[0]}); pass the run's training data with --data"
        )
    return RecordedSplit(train, val, root, method, str(record["description"]), recorded)


def legacy_split(run: RunFolder, cfg: Any, data_root: Path | None = None) -> RecordedSplit:
    """The split of a run that predates ``split.json``, drawn again from its config and
    checked against the validation patients its ``data.json`` recorded.

    Raises:
        SplitRecordError: the drawn validation split is not the recorded one (other data).
    """
    data = run.read_data()
    root = Path(data_root or data["data_root"])
    split = train_val_split(root, cfg.val_fraction, cfg.split_seed, cfg.max_images)
    recorded = data.get("validation_patients")
    # The run records the patients of the films it could read; every one must be drawn again.
    if recorded is not None and not set(recorded) <= {s.patient for s in split.val}:
        raise SplitRecordError(
            f"the validation split drawn from {root} is not the one {run.path} recorded; "
            "pass the run's training data with --data"
        )
    log.warning("%s predates split records: its split was drawn again and checked", run.path)
    train, val = _rows(split.train, root), _rows(split.val, root)
    return RecordedSplit(
        split.train,
        split.val,
        root,
        split.method,
        split.description,
        _digest(split.method, train, val),
    )


def split_params(cfg: Any) -> dict[str, Any]:
    """The config fields that draw the split (what ``split.json`` records as ``drawn_with``)."""
    return {
        "val_fraction": cfg.val_fraction,
        "split_seed": cfg.split_seed,
        "max_images": cfg.max_images,
    }


def run_split(
    run: RunFolder, cfg: Any, data_root: Path | None = None, *, films: bool = True
) -> RecordedSplit:
    """The run's split for a stage after training: the record, or for a run that predates it,
    :func:`legacy_split`."""
    if run.split.is_file():
        return load_split(run, data_root, split_params(cfg), films=films)
    return legacy_split(run, cfg, data_root)


def check_split_digest(what: str, recorded: str | None, split: RecordedSplit) -> None:
    """Refuse a stage's output that was made on another split than the run's record.

    Raises:
        SplitRecordError: ``recorded`` (from ``what``) is not the split's digest.
    """
    if recorded is not None and recorded != split.sha256:
        raise SplitRecordError(
            f"{what} was made on split {recorded[:12]}..., the run's split record is "
            f"{split.sha256[:12]}...; redo that stage"
        )
