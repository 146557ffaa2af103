"""Fetch the Kaggle chest X-ray set and check it: ``pneumonia data download [--to DIR]``.

The download goes through ``kagglehub`` (``pip install 'pneumonia-detection[download]'``),
which unpacks the archive into its cache (``--to DIR`` sets ``KAGGLEHUB_CACHE`` to DIR).
Whatever the folder it lands in, :func:`find_root` finds the ``chest_xray`` root (the one
holding ``train/`` and ``test/`` with ``NORMAL/`` and ``PNEUMONIA/``), and :func:`verify`
counts its images against the published figures. ``--verify DIR`` does the second half for
a copy obtained elsewhere.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumonia.data import DatasetLayoutError, is_image_file
from pneumonia.labels import LABELS

log = logging.getLogger(__name__)

KAGGLE_HANDLE = "paultimothymooney/chest-xray-pneumonia"
KAGGLE_PAGE = f"https://www.kaggle.com/datasets/{KAGGLE_HANDLE}"
#: Images per split and class in the published Kaggle archive (Kermany et al. 2018, v2).
PUBLISHED_COUNTS = {
    "train": {"NORMAL": 1341, "PNEUMONIA": 3875},
    "val": {"NORMAL": 8, "PNEUMONIA": 8},
    "test": {"NORMAL": 234, "PNEUMONIA": 390},
}
#: Splits a usable root must hold (val is tiny and optional: the trainer draws its own).
REQUIRED_SPLITS = ("train", "test")
INSTALL_HINT = "pip install 'pneumonia-detection[download]'"
BY_HAND = (
    f"or download the archive by hand from {KAGGLE_PAGE}, unpack it, and check it with "
    "`pneumonia data download --verify DIR`"
)


class DownloadError(RuntimeError):
    """The download could not be done; the message says what to set or do instead."""


@dataclass
class Verification:
    """Counts of a ``chest_xray`` root against the published ones."""

    root: Path
    counts: dict[str, dict[str, int] | None]
    differences: list[str] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        return not self.differences

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": str(self.root),
            "matches_published": self.matches,
            "counts": self.counts,
            "published": PUBLISHED_COUNTS,
            "differences": self.differences,
        }


def _is_root(folder: Path) -> bool:
    return all((folder / s / c).is_dir() for s in REQUIRED_SPLITS for c in LABELS)


def find_root(folder: Path) -> Path:
    """The shallowest folder under ``folder`` (itself included) holding ``train/`` and
    ``test/`` with ``NORMAL/`` and ``PNEUMONIA/`` each; macOS ``__MACOSX`` copies are skipped.

    Raises:
        DatasetLayoutError: no such folder, naming what was found.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetLayoutError(f"{folder} is not a folder")
    found = [folder] if _is_root(folder) else []
    if not found:
        found = sorted(
            (
                d
                for d in folder.rglob("*")
                if d.is_dir() and "__MACOSX" not in d.parts and _is_root(d)
            ),
            key=lambda d: (len(d.parts), str(d)),
        )
    if not found:
        tops = sorted(p.name for p in folder.iterdir())[:10]
        raise DatasetLayoutError(
            f"no chest_xray root under {folder} (it holds {tops or 'nothing'}); expected a folder "
            "with train/ and test/, each holding NORMAL/ and PNEUMONIA/"
        )
    return found[0]


def _count(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if is_image_file(p))


def verify(root: Path) -> Verification:
    """Count the images of ``root`` (found with :func:`find_root`) per split and class and
    list every difference from :data:`PUBLISHED_COUNTS`.

    Raises:
        DatasetLayoutError: no chest_xray root in ``root``.
    """
    root = find_root(root)
    counts: dict[str, dict[str, int] | None] = {}
    diffs = []
    for split, published in PUBLISHED_COUNTS.items():
        if not (root / split).is_dir():
            counts[split] = None
            diffs.append(
                f"{split}: missing (published: {published['NORMAL']:,} NORMAL / {published['PNEUMONIA']:,} PNEUMONIA)"
            )
            continue
        per = {c: _count(root / split / c) if (root / split / c).is_dir() else 0 for c in LABELS}
        counts[split] = per
        for c in LABELS:
            got, want = per[c], published[c]
            if got != want:
                diffs.append(f"{split} {c}: {got:,} images, published {want:,} ({got - want:+,})")
    return Verification(root, counts, diffs)


def download(to: Path | None = None, *, force: bool = False) -> Path:
    """Download the Kaggle set with kagglehub and return its chest_xray root.

    Args:
        to: Folder for kagglehub's cache (``KAGGLEHUB_CACHE``); default: kagglehub's own
            (``~/.cache/kagglehub``).
        force: Download again even if the cache holds it.

    Raises:
        DownloadError: kagglehub is missing, or the download failed (no network, no or bad
            credentials); the message says what to set, or how to do it by hand.
        DatasetLayoutError: the download holds no chest_xray root.
    """
    if to is not None:
        to = Path(to).absolute()
        to.mkdir(parents=True, exist_ok=True)
        os.environ["KAGGLEHUB_CACHE"] = str(to)
    try:
        import kagglehub
    except ImportError:
        raise DownloadError(f"kagglehub is not installed; {INSTALL_HINT}, {BY_HAND}") from None
    log.info("downloading %s with kagglehub (about 1.2 GB)", KAGGLE_HANDLE)
    try:
        path = kagglehub.dataset_download(KAGGLE_HANDLE, force_download=force)
    except Exception as exc:  # kagglehub raises requests', its own and OS errors alike
        raise DownloadError(
            f"downloading {KAGGLE_HANDLE} failed ({type(exc).__name__}: {exc}). Check the "
            "network; if Kaggle asks for credentials, set KAGGLE_USERNAME and KAGGLE_KEY (an API "
            "token from your Kaggle account settings) or put kaggle.json in ~/.kaggle/; "
            f"{BY_HAND}"
        ) from None
    return find_root(Path(path))
