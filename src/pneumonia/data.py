"""Find labelled images on disk, group them by patient, split and load them.

Two kinds of data: image folders (the Kaggle layout ``ROOT/{train,test}/{NORMAL,PNEUMONIA}/``
or one split folder) and MedMNIST ``.npz`` files (``pneumoniamnist_224.npz`` and the 28/64/128
sizes: ``{train,val,test}_images`` uint8 (N, H, W) and ``{train,val,test}_labels`` (N, 1),
1 = pneumonia). Both give :class:`Sample` lists, and :func:`load_images` reads both with the
preprocessing of serving (an npz image with ``preprocess_uint8``: the scaling of an 8-bit file).
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumonia.labels import LABELS
from pneumonia.preprocess import ImageError, PreprocessSpec, preprocess_bytes, preprocess_uint8
from pneumonia.progress import progress_bar

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

# Patient id rules of the Kermany file names (see the data README).
_PATIENT_RULES = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),
    re.compile(r"^(NORMAL2-IM-\d+)-", re.IGNORECASE),
    re.compile(r"^(IM-\d+)-", re.IGNORECASE),
)


class DatasetLayoutError(ValueError):
    """The folder does not have the expected NORMAL/ and PNEUMONIA/ layout."""


@dataclass(frozen=True)
class Sample:
    """One labelled image: a file, or row ``npz_index`` of a MedMNIST .npz split.

    For an npz row, ``path`` is ``FILE.npz/SPLIT/NNNNN`` (a name, not a file on disk).
    """

    path: Path
    label: int
    npz_index: int | None = None

    @property
    def patient(self) -> str:
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
    ``NORMAL2-IM-1427-0001.jpeg`` -> ``NORMAL2-IM-1427``.
    """
    for rule in _PATIENT_RULES:
        m = rule.match(filename)
        if m:
            return m.group(1)
    return filename


def patient_id_rule(filename: str) -> tuple[str, str | None]:
    """(patient id, the pattern that parsed it), or (filename, None) when no rule matches."""
    for rule in _PATIENT_RULES:
        m = rule.match(filename)
        if m:
            return m.group(1), rule.pattern
    return filename, None


def is_image_file(path: Path) -> bool:
    return (
        path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
    )


def list_split(folder: Path) -> list[Sample]:
    """List the images of one split folder holding ``NORMAL/`` and ``PNEUMONIA/``.

    Raises:
        DatasetLayoutError: a class folder is missing, or a class holds no images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetLayoutError(
            f"{folder} is not a folder; expected a folder holding NORMAL/ and PNEUMONIA/"
        )
    samples: list[Sample] = []
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
        samples.extend(Sample(p, label) for p in files)
    return samples


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


def split_samples(data: Path, split: str) -> list[Sample]:
    """The samples of ``split`` of a data source: a Kaggle root, a split folder, or an .npz."""
    if is_npz(data):
        return list_npz_split(data, split)
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

    A folder: its ``train`` split (optionally subsampled to ``max_images``), split by
    :func:`grouped_split`. An .npz: MedMNIST's own train and val splits (the file has no
    patient ids), each subsampled in proportion when ``max_images`` is set.
    """
    if is_npz(data):
        train, val = list_npz_split(data, "train"), list_npz_split(data, "val")
        if max_images is not None and len(train) + len(val) > max_images:
            share = max_images / (len(train) + len(val))
            train = _subsample(train, max(2, math.floor(share * len(train))), seed)
            val = _subsample(val, max(2, math.ceil(share * len(val))), seed)
        return TrainValSplit(train, val, SPLIT_MEDMNIST_VAL)
    samples = list_split(resolve_split(data, "train"))
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
    for path, why in skipped:
        log.warning("skipped unreadable image %s: %s", path, why)
    if skipped:
        log.warning("skipped %d unreadable image(s) of %d", len(skipped), len(samples))
    x = np.stack(arrays) if arrays else np.zeros((0, *spec.input_shape), np.float32)
    y = np.array([s.label for s in kept], dtype=np.int64)
    return LoadedImages(x=x, y=y, samples=kept, skipped=skipped)


def class_counts(labels: np.ndarray) -> dict[str, int]:
    return {name: int((labels == i).sum()) for i, name in enumerate(LABELS)}
