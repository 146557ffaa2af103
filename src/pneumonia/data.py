"""Find labelled images on disk, group them by patient, split and load them."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumonia.labels import LABELS
from pneumonia.preprocess import ImageError, PreprocessSpec, preprocess_bytes

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".dcm", ".dicom"})

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
    """One labelled image file."""

    path: Path
    label: int

    @property
    def patient(self) -> str:
        return patient_id(self.path.name)


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


def _load_one(sample: Sample, spec: PreprocessSpec) -> np.ndarray | str:
    try:
        return preprocess_bytes(sample.path.read_bytes(), spec)
    except (ImageError, OSError) as exc:
        return getattr(exc, "message", None) or type(exc).__name__


def load_images(
    samples: Iterable[Sample], spec: PreprocessSpec, *, workers: int = 2, progress: bool = False
) -> LoadedImages:
    """Read and preprocess images; unreadable files are listed and skipped, not fatal."""
    samples = list(samples)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda s: _load_one(s, spec), samples)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(samples), desc="reading images", unit="img")
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
