"""Find labelled images on disk, group them by patient, split and load them.

Two kinds of data: image folders (the Kaggle layout ``ROOT/{train,test}/{NORMAL,PNEUMONIA}/``
or one split folder) and MedMNIST ``.npz`` files (``pneumoniamnist_224.npz`` and the 28/64/128
sizes: ``{train,val,test}_images`` uint8 (N, H, W) and ``{train,val,test}_labels`` (N, 1),
1 = pneumonia). Both give :class:`Sample` lists, and :func:`load_images` reads both with the
preprocessing of serving (an npz image with ``preprocess_uint8``: the scaling of an 8-bit file).

A CSV manifest (:func:`read_manifest`, the one reader of every command) names the images of a
set: a ``path`` or ``relpath`` column (relative paths: to the manifest's folder), a ``label``
(0/1 or NORMAL/PNEUMONIA, any case), optional ``patient_id``, ``site`` and ``split``; any other
column is kept per row as metadata. A labelled folder may hold a ``manifest.csv`` beside its
``NORMAL/`` and ``PNEUMONIA/``: its patient ids and metadata then belong to the folder's films.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pneumonia.labels import LABELS
from pneumonia.preprocess import ImageError, PreprocessSpec, preprocess_bytes, preprocess_uint8
from pneumonia.progress import progress_bar

if TYPE_CHECKING:
    from pneumonia.guard import InputCheck
    from pneumonia.predictor import Prediction, Predictor

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".dcm", ".dicom"})

#: The splits of a MedMNIST .npz file, in its own order.
NPZ_SPLITS = ("train", "val", "test")

#: Defaults of the trainer's patient-grouped validation split (TrainConfig uses these), so
#: that torch-free tools (``pneumonia data audit``) draw the same split.
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_SPLIT_SEED = 0

SPLIT_PATIENT_GROUPED = "patient-grouped"
SPLIT_MEDMNIST_VAL = "medmnist-val"

# Patient id rules of the file names (see the data README): Kermany's three, then NIH
# ChestX-ray14's PATIENT_FOLLOWUP (``00001280_004.png``).
_PATIENT_RULES = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),
    re.compile(r"^(NORMAL2-IM-\d+)-", re.IGNORECASE),
    re.compile(r"^(IM-\d+)-", re.IGNORECASE),
    re.compile(r"^(\d{8})_\d{3}\."),
)

#: Manifest columns, in the order of preference where there are two spellings.
PATH_COLUMNS = ("path", "relpath")
LABEL_COLUMNS = ("label", "class")
PATIENT_COLUMN = "patient_id"
SITE_COLUMN = "site"
SPLIT_COLUMN = "split"
#: The manifest a labelled folder may hold beside NORMAL/ and PNEUMONIA/.
FOLDER_MANIFEST = "manifest.csv"
#: Where a row's patient id came from when the manifest has none for it.
PATIENT_FROM_MANIFEST = "manifest"


class DatasetLayoutError(ValueError):
    """The folder does not have the expected NORMAL/ and PNEUMONIA/ layout."""


class ManifestError(DatasetLayoutError):
    """A manifest lacks a column or holds a bad row; the message names the line and value."""


@dataclass(frozen=True)
class Sample:
    """One labelled image: a file, or row ``npz_index`` of a MedMNIST .npz split.

    For an npz row, ``path`` is ``FILE.npz/SPLIT/NNNNN`` (a name, not a file on disk).
    """

    path: Path
    label: int
    npz_index: int | None = None
    #: The patient as a manifest names it; None: parsed from the file name.
    manifest_patient: str | None = None

    @property
    def patient(self) -> str:
        if self.manifest_patient is not None:
            return self.manifest_patient
        if self.npz_index is not None:  # MedMNIST has no patient ids: each image is its own
            return f"{self.path.parent.name}/{self.npz_index}"
        return patient_id(self.path.name)

    @property
    def npz_file(self) -> Path | None:
        return self.path.parent.parent if self.npz_index is not None else None

    @property
    def npz_split(self) -> str | None:
        return self.path.parent.name if self.npz_index is not None else None


@dataclass(frozen=True)
class TrainValSplit:
    """The trainer's training and validation samples and how they were drawn."""

    train: list[Sample]
    val: list[Sample]
    method: str  # SPLIT_PATIENT_GROUPED or SPLIT_MEDMNIST_VAL

    @property
    def description(self) -> str:
        if self.method == SPLIT_MEDMNIST_VAL:
            return (
                "MedMNIST's own val split (the file has no patient ids, so no patient-grouped "
                "split can be drawn)"
            )
        return "patient-grouped split of train (no patient on both sides)"


@dataclass
class LoadedImages:
    """Preprocessed images with their labels and the files that could not be read."""

    x: np.ndarray  # (N, C, H, W) float32
    y: np.ndarray  # (N,) int64
    samples: list[Sample]
    skipped: list[tuple[Path, str]]


def patient_id(filename: str) -> str:
    """Patient of a Kermany file name; a file matching no rule is its own patient.

    ``person123_bacteria_456.jpeg`` -> ``person123``; ``IM-0115-0001.jpeg`` -> ``IM-0115``;
    ``NORMAL2-IM-1427-0001.jpeg`` -> ``NORMAL2-IM-1427``; NIH ``00001280_004.png`` ->
    ``00001280``.
    """
    return patient_id_rule(filename)[0]


def patient_id_rule(filename: str) -> tuple[str, str | None]:
    """(patient id, the pattern that parsed it), or (filename, None) when no rule matches."""
    for rule in _PATIENT_RULES:
        m = rule.match(filename)
        if m:
            return m.group(1), rule.pattern
    return filename, None


def parse_label(raw: str) -> int:
    """The class index of a label as a manifest writes it: 0/1 or a class name, any case.

    Raises:
        ValueError: ``raw`` is none of these (the caller names the row).
    """
    text = raw.strip()
    if text in ("0", "1"):
        return int(text)
    upper = text.upper()
    if upper in LABELS:
        return LABELS.index(upper)
    raise ValueError(f"label {raw!r} is not one of 0, 1, {', '.join(LABELS)} (any case)")


@dataclass(frozen=True)
class ManifestRow:
    """One image of a manifest (or of a labelled folder) with what the manifest says of it."""

    line: int  # line of the file the row ends on (the header is line 1); 0: no manifest row
    key: str  # the path as the manifest writes it (or relative to the folder)
    path: Path  # the file to read
    label: int | None  # None when labels were not asked for
    patient: str  # from the patient_id column, else from the file name
    patient_from: str  # PATIENT_FROM_MANIFEST, a file-name rule's pattern, or "file name"
    site: str | None = None
    split: str | None = None
    #: Every other column of the row, as written.
    metadata: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def sample(self) -> Sample:
        """The row as a labelled :class:`Sample` (its patient kept where the manifest named it)."""
        if self.label is None:
            raise ValueError(f"{self.key} has no label")
        manifest_patient = self.patient if self.patient_from == PATIENT_FROM_MANIFEST else None
        return Sample(self.path, self.label, manifest_patient=manifest_patient)


@dataclass(frozen=True)
class Manifest:
    """The rows of a manifest or labelled folder, and its metadata columns in file order."""

    source: Path
    rows: list[ManifestRow]
    metadata_columns: tuple[str, ...]

    @property
    def samples(self) -> list[Sample]:
        return [r.sample for r in self.rows]


def manifest_columns(
    header: Sequence[str], source: Path, path_column: str | None = None, *, labels: bool = True
) -> tuple[str, str | None]:
    """(path column, label column) of a manifest header.

    Args:
        header: the column names.
        source: the manifest, for the message.
        path_column: the path column's name; None: ``path``, else ``relpath``.
        labels: whether a label column is required.

    Raises:
        ManifestError: a required column is missing.
    """
    candidates = PATH_COLUMNS if path_column is None else (path_column,)
    pcol = next((c for c in candidates if c in header), None)
    lcol = next((c for c in LABEL_COLUMNS if c in header), None)
    if pcol is None or (labels and lcol is None):
        need = " or ".join(repr(c) for c in candidates)
        if labels:
            need += " column and a 'label' (0/1 or NORMAL/PNEUMONIA)"
        raise ManifestError(f"manifest {source} needs a {need} column; it has {list(header)}")
    return pcol, lcol


def _bad_row(source: Path, line: int, what: str) -> ManifestError:
    return ManifestError(f"manifest {source}, line {line}: {what}")


def iter_manifest(
    source: Path, *, path_column: str | None = None, labels: bool = True
) -> Iterator[ManifestRow]:
    """The rows of a CSV manifest, one at a time and checked as they are read.

    Args:
        source: the CSV file.
        path_column: the path column's name; None: ``path``, else ``relpath``.
        labels: whether each row must carry a label (scoring needs none).

    Raises:
        ManifestError: a missing column, or a row with an empty path or a bad label (the
            message names its line and value).
    """
    source = Path(source)
    try:
        f = source.open(newline="", encoding="utf-8-sig")  # utf-8-sig: Excel writes a BOM
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {source}: {exc.strerror or exc}") from None
    with f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        pcol, lcol = manifest_columns(header, source, path_column, labels=labels)
        other = _metadata_columns(header, pcol)
        for row in reader:
            # The line the row ends on: its line unless a quoted field spans lines.
            line = reader.line_num
            bad = functools.partial(_bad_row, source, line)
            if None in row:
                raise bad(f"more fields than the header's {len(header)}: {row[None]!r}")
            key = (row.get(pcol) or "").strip()
            if not key:
                raise bad(f"empty {pcol!r}")
            label = None
            if labels and lcol is not None:
                try:
                    label = parse_label(row.get(lcol) or "")
                except ValueError as exc:
                    raise bad(f"{lcol} column: {exc}") from None
            rel = Path(key)
            pid = (row.get(PATIENT_COLUMN) or "").strip()
            pfrom = PATIENT_FROM_MANIFEST
            if not pid:
                pid, rule = patient_id_rule(rel.name)
                pfrom = rule or "file name"
            yield ManifestRow(
                line=line,
                key=key,
                path=rel if rel.is_absolute() else source.parent / rel,
                label=label,
                patient=pid,
                patient_from=pfrom,
                site=(row.get(SITE_COLUMN) or "").strip() or None,
                split=(row.get(SPLIT_COLUMN) or "").strip() or None,
                metadata={c: row.get(c) or "" for c in other},
            )


def _metadata_columns(header: Sequence[str], path_column: str) -> tuple[str, ...]:
    """The columns of a header kept as metadata: all but path, label, patient, site, split."""
    used = {path_column, *LABEL_COLUMNS, PATIENT_COLUMN, SITE_COLUMN, SPLIT_COLUMN}
    return tuple(c for c in header if c not in used)


def read_manifest(source: Path, *, path_column: str | None = None, labels: bool = True) -> Manifest:
    """Every row of a CSV manifest (see :func:`iter_manifest`), checked.

    Raises:
        ManifestError: a missing column or a bad row, or no rows at all.
    """
    rows = list(iter_manifest(source, path_column=path_column, labels=labels))
    if not rows:
        raise ManifestError(f"manifest {source} has no rows")
    columns = list(dict.fromkeys(c for r in rows for c in r.metadata))
    return Manifest(Path(source), rows, tuple(columns))


def is_image_file(path: Path) -> bool:
    return (
        path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
    )


def list_split(folder: Path) -> list[Sample]:
    """List the images of one split folder holding ``NORMAL/`` and ``PNEUMONIA/``.

    With a ``manifest.csv`` beside the class folders, each film's patient is the manifest's
    (see :func:`read_folder`).

    Raises:
        DatasetLayoutError: a class folder is missing, or a class holds no images.
        ManifestError: the folder's manifest is malformed or contradicts a class folder.
    """
    return read_folder(folder).samples


def read_folder(folder: Path) -> Manifest:
    """The films of a labelled folder (``NORMAL/``, ``PNEUMONIA/``) as manifest rows.

    The label is the class folder's. An optional ``manifest.csv`` beside the class folders
    (``path`` or ``relpath`` relative to the folder) gives each film it lists its patient id,
    site, split and metadata; a film it does not list keeps its file-name patient.

    Raises:
        DatasetLayoutError: a class folder is missing, or a class holds no images.
        ManifestError: the manifest is malformed, or labels a film unlike its class folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetLayoutError(
            f"{folder} is not a folder; expected a folder holding NORMAL/ and PNEUMONIA/"
        )
    listed: dict[Path, ManifestRow] = {}
    metadata_columns: tuple[str, ...] = ()
    manifest_file = folder / FOLDER_MANIFEST
    if manifest_file.is_file():
        manifest = read_manifest(manifest_file)
        metadata_columns = manifest.metadata_columns
        listed = {r.path: r for r in manifest.rows}
    rows: list[ManifestRow] = []
    for label, name in enumerate(LABELS):
        cls_dir = folder / name
        if not cls_dir.is_dir():
            present = sorted(p.name for p in folder.iterdir() if p.is_dir())
            raise DatasetLayoutError(
                f"{folder} has no {name}/ folder (found: {present or 'no folders'}); "
                f"expected {folder}/NORMAL/ and {folder}/PNEUMONIA/ with images in each"
            )
        files = sorted(p for p in cls_dir.rglob("*") if is_image_file(p))
        if not files:
            raise DatasetLayoutError(
                f"{cls_dir} holds no images; expected files ending in {sorted(IMAGE_SUFFIXES)}"
            )
        for p in files:
            key = p.relative_to(folder).as_posix()
            m = listed.get(p)
            if m is None:
                pid, rule = patient_id_rule(p.name)
                rows.append(ManifestRow(0, key, p, label, pid, rule or "file name"))
                continue
            if m.label != label:
                raise ManifestError(
                    f"manifest {manifest_file}, line {m.line}: labels {m.key} "
                    f"{LABELS[m.label or 0]} but it lies in {name}/; correct the manifest"
                )
            rows.append(
                ManifestRow(
                    m.line, key, p, label, m.patient, m.patient_from, m.site, m.split, m.metadata
                )
            )
    missing = len(listed) - sum(r.line > 0 for r in rows)
    if missing:
        log.warning(
            "%s lists %d film(s) that are not in %s/ or %s/; they are left out",
            manifest_file,
            missing,
            *LABELS,
        )
    return Manifest(folder, rows, metadata_columns)


def read_labelled(data: Path) -> Manifest:
    """A labelled set for a command: a CSV manifest or a labelled folder (:func:`read_folder`).

    Raises:
        DatasetLayoutError: neither, or a folder without the class folders.
        ManifestError: a malformed manifest.
    """
    data = Path(data)
    if data.is_file() and is_manifest(data):
        return read_manifest(data)
    return read_folder(data)


def resolve_split(root: Path, split: str) -> Path:
    """The folder of ``split`` under a Kaggle-layout root, or ``root`` itself if it is one split.

    Raises:
        DatasetLayoutError: ``root`` is not a folder, or holds neither ``split/`` nor a
            class folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(
            f"{root} is not a folder (or does not exist); expected the Kaggle layout "
            f"ROOT/{{train,test}}/{{NORMAL,PNEUMONIA}}/ or a split folder DIR/{{NORMAL,PNEUMONIA}}/"
        )
    if (root / split).is_dir():
        return root / split
    if (root / LABELS[0]).is_dir() or (root / LABELS[1]).is_dir():
        return root
    raise DatasetLayoutError(
        f"{root} holds neither {split}/ nor NORMAL/ and PNEUMONIA/; expected the Kaggle layout "
        f"ROOT/{{train,test}}/{{NORMAL,PNEUMONIA}}/ or a split folder DIR/{{NORMAL,PNEUMONIA}}/"
    )


def grouped_split(
    samples: Sequence[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Deterministic, stratified, patient-grouped train/validation split.

    Patients are grouped by their majority label and, per label, shuffled with ``seed`` and
    moved to validation until it holds ``val_fraction`` of that label's images. No patient is
    on both sides.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.patient, []).append(s)
    rng = np.random.default_rng(seed)
    val_patients: set[str] = set()
    for label in range(len(LABELS)):
        pats = sorted(
            p for p, ss in groups.items() if round(np.mean([s.label for s in ss])) == label
        )
        n_images = sum(len(groups[p]) for p in pats)
        target = val_fraction * n_images
        taken = 0
        for idx in rng.permutation(len(pats)):
            if taken >= target:
                break
            val_patients.add(pats[idx])
            taken += len(groups[pats[idx]])
    train = [s for s in samples if s.patient not in val_patients]
    val = [s for s in samples if s.patient in val_patients]
    return train, val


def is_npz(path: Path | str) -> bool:
    """Whether ``path`` names a MedMNIST-style ``.npz`` file (by its suffix)."""
    return Path(path).suffix.lower() == ".npz"


def _npz_arrays(npz: Any, path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of one split of an open npz, checked against the MedMNIST layout."""
    ki, kl = f"{split}_images", f"{split}_labels"
    missing = [k for k in (ki, kl) if k not in npz.files]
    if missing:
        raise DatasetLayoutError(
            f"{path} has no {missing} (arrays: {sorted(npz.files)}); expected the MedMNIST "
            f"layout {{train,val,test}}_images (uint8, N x H x W) and {{train,val,test}}_labels (N x 1)"
        )
    images, labels = npz[ki], npz[kl]
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DatasetLayoutError(
            f"{path}: {ki} is {images.dtype} {images.shape}; expected uint8 (N, H, W) grayscale"
        )
    if labels.shape != (len(images), 1) and labels.shape != (len(images),):
        raise DatasetLayoutError(
            f"{path}: {kl} has shape {labels.shape}; expected ({len(images)}, 1) to match {ki}"
        )
    labels = labels.reshape(-1).astype(np.int64)
    if len(labels) and not np.isin(labels, (0, 1)).all():
        raise DatasetLayoutError(
            f"{path}: {kl} holds {sorted(set(labels.tolist()))}; expected 0 (NORMAL) and 1 (PNEUMONIA)"
        )
    return images, labels


def read_npz_split(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W), labels int64 (N,)) of one split of a MedMNIST .npz file.

    Raises:
        DatasetLayoutError: missing file or arrays, or arrays not in the MedMNIST layout.
    """
    path = Path(path)
    if split not in NPZ_SPLITS:
        raise DatasetLayoutError(
            f"split must be one of {NPZ_SPLITS} for an .npz file, got {split!r}"
        )
    if not path.is_file():
        raise DatasetLayoutError(f"{path} does not exist; expected a MedMNIST .npz file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return _npz_arrays(npz, path, split)
    except (OSError, ValueError) as exc:
        raise DatasetLayoutError(f"{path} is not a readable .npz file ({exc})") from None


def list_npz_split(path: Path, split: str) -> list[Sample]:
    """One :class:`Sample` per image of ``split`` in a MedMNIST .npz file."""
    _, labels = read_npz_split(path, split)
    if len(labels) == 0:
        raise DatasetLayoutError(f"{path}: split {split!r} holds no images")
    base = Path(path) / split
    return [Sample(base / f"{i:05d}", int(y), i) for i, y in enumerate(labels)]


def is_manifest(path: Path | str) -> bool:
    """Whether ``path`` names a CSV manifest (by its suffix)."""
    return Path(path).suffix.lower() == ".csv"


def manifest_split(manifest: Manifest, split: str) -> list[Sample]:
    """The samples of a manifest's rows whose ``split`` is ``split``; every row when no row
    names a split.

    Raises:
        ManifestError: rows name splits, but none is ``split``.
    """
    named = sorted({r.split for r in manifest.rows if r.split})
    if not named:
        return manifest.samples
    if split not in named:
        raise ManifestError(
            f"manifest {manifest.source} has no row of split {split!r} (its splits: {named}); "
            "choose one of them, or leave the split column empty to use every row"
        )
    return [r.sample for r in manifest.rows if r.split == split]


def split_samples(data: Path, split: str) -> list[Sample]:
    """The samples of ``split`` of a data source: a Kaggle root, a split folder, an .npz, or
    a CSV manifest (:func:`manifest_split`)."""
    if is_npz(data):
        return list_npz_split(data, split)
    if is_manifest(data):
        return manifest_split(read_manifest(data), split)
    return list_split(resolve_split(data, split))


def _subsample(samples: list[Sample], n: int, seed: int) -> list[Sample]:
    if len(samples) <= n:
        return samples
    rng = np.random.default_rng(seed)
    return [samples[i] for i in sorted(rng.choice(len(samples), n, replace=False))]


def train_val_split(
    data: Path,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SPLIT_SEED,
    max_images: int | None = None,
) -> TrainValSplit:
    """The training and validation samples the trainer uses for ``data``.

    A folder or CSV manifest: its ``train`` split (a manifest without a split column: every
    row; optionally subsampled to ``max_images``), split by :func:`grouped_split`. An .npz:
    MedMNIST's own train and val splits (the file has no patient ids), each subsampled in
    proportion when ``max_images`` is set.
    """
    if is_npz(data):
        train, val = list_npz_split(data, "train"), list_npz_split(data, "val")
        if max_images is not None and len(train) + len(val) > max_images:
            share = max_images / (len(train) + len(val))
            train = _subsample(train, max(2, math.floor(share * len(train))), seed)
            val = _subsample(val, max(2, math.ceil(share * len(val))), seed)
        return TrainValSplit(train, val, SPLIT_MEDMNIST_VAL)
    samples = split_samples(data, "train")
    if max_images is not None:
        samples = _subsample(samples, max_images, seed)
    train, val = grouped_split(samples, val_fraction, seed)
    return TrainValSplit(train, val, SPLIT_PATIENT_GROUPED)


class NpzReader:
    """Reads the images of npz samples; each (file, split) array is loaded once."""

    def __init__(self) -> None:
        self._arrays: dict[tuple[Path, str], np.ndarray] = {}
        self._lock = threading.Lock()

    def image(self, sample: Sample) -> np.ndarray:
        assert sample.npz_file is not None and sample.npz_split is not None
        key = (sample.npz_file, sample.npz_split)
        with self._lock:
            if key not in self._arrays:
                self._arrays[key] = read_npz_split(*key)[0]
        return self._arrays[key][sample.npz_index]


def _load_one(sample: Sample, spec: PreprocessSpec, reader: NpzReader) -> np.ndarray | str:
    try:
        if sample.npz_index is not None:
            return preprocess_uint8(reader.image(sample), spec)
        return preprocess_bytes(sample.path.read_bytes(), spec)
    except (ImageError, OSError) as exc:
        return getattr(exc, "message", None) or type(exc).__name__


def _warn_skipped(skipped: Sequence[tuple[Path, str]], total: int) -> None:
    """Log each file a loader skipped and why, then how many of ``total``."""
    for path, why in skipped:
        log.warning("skipped unreadable image %s: %s", path, why)
    if skipped:
        log.warning("skipped %d unreadable image(s) of %d", len(skipped), total)


def load_images(
    samples: Iterable[Sample], spec: PreprocessSpec, *, workers: int = 2, progress: bool = False
) -> LoadedImages:
    """Read and preprocess images; unreadable files are listed and skipped, not fatal."""
    samples = list(samples)
    reader = NpzReader()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = progress_bar(
            pool.map(lambda s: _load_one(s, spec, reader), samples),
            enabled=progress,
            total=len(samples),
            desc="reading images",
            unit="img",
        )
        arrays: list[np.ndarray] = []
        kept: list[Sample] = []
        skipped: list[tuple[Path, str]] = []
        for s, r in zip(samples, results, strict=True):
            if isinstance(r, str):
                skipped.append((s.path, r))
            else:
                arrays.append(r)
                kept.append(s)
    _warn_skipped(skipped, len(samples))
    x = np.stack(arrays) if arrays else np.zeros((0, *spec.input_shape), np.float32)
    y = np.array([s.label for s in kept], dtype=np.int64)
    return LoadedImages(x=x, y=y, samples=kept, skipped=skipped)


@dataclass
class ScoredSamples:
    """Labelled images scored by an exported model: a prediction per readable image (never
    refused: evaluation and recalibration score every film) and the files it skipped."""

    samples: list[Sample]
    y: np.ndarray  # (N,) int64
    predictions: list[Prediction]
    skipped: list[tuple[Path, str]]

    @property
    def logits(self) -> np.ndarray:
        return np.array([p.logit for p in self.predictions], dtype=np.float64)

    @property
    def probabilities(self) -> np.ndarray:
        return np.array([p.p_pneumonia for p in self.predictions], dtype=np.float64)

    @property
    def checks(self) -> list[InputCheck]:
        out = []
        for p in self.predictions:
            assert p.check is not None  # Predictor.predict checks every image it scores
            out.append(p.check)
        return out


def score_samples(
    predictor: Predictor, samples: Sequence[Sample], *, progress: bool = False
) -> ScoredSamples:
    """Score labelled samples through the predictor's batch path (``Predictor.predict``), a
    batch at a time: the service's decode, model and input check, and memory bounded by the
    batch rather than the data set. Unreadable or undecodable files are listed and skipped."""
    from pneumonia.predictor import Prediction  # lazily: data.py serves the torch side too

    reader = NpzReader()
    items = (reader.image(s) if s.npz_index is not None else s.path for s in samples)
    outcomes = progress_bar(
        predictor.predict(items, refuse=False),
        enabled=progress,
        total=len(samples),
        desc="scoring images",
        unit="img",
    )
    kept: list[Sample] = []
    preds: list[Prediction] = []
    skipped: list[tuple[Path, str]] = []
    for s, out in zip(samples, outcomes, strict=True):
        if isinstance(out, Prediction):
            kept.append(s)
            preds.append(out)
        else:  # ImageError or ItemError
            skipped.append((s.path, f"{out.code}: {out.message}"))
    _warn_skipped(skipped, len(samples))
    y = np.array([s.label for s in kept], dtype=np.int64)
    return ScoredSamples(samples=kept, y=y, predictions=preds, skipped=skipped)


def class_counts(labels: np.ndarray) -> dict[str, int]:
    return {name: int((labels == i).sum()) for i, name in enumerate(LABELS)}
