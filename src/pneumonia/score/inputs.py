"""What can be scored: a folder tree, a manifest of paths, a Parquet of image bytes, or a
MedMNIST .npz file.

Every source is read lazily (generators, Parquet in record batches), so memory does not grow
with the archive. Each source has a key that names an image in the output: ``path`` (relative
to the folder, or as written in the manifest) or ``id`` (from the Parquet id column).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pneumonia.data import (
    IMAGE_SUFFIXES,
    NPZ_SPLITS,
    PATH_COLUMNS,
    DatasetLayoutError,
    ManifestError,
    iter_manifest,
    manifest_columns,
    read_npz_split,
)
from pneumonia.preprocess import DICOM_MAGIC, DICOM_MAGIC_OFFSET
from pneumonia.score.rows import Item, ScoreError

PARQUET_SUFFIXES = (".parquet", ".pq")
_KINDS = "a folder, a .csv/.parquet manifest, a .parquet of image bytes or a MedMNIST .npz"
PYARROW_HINT = "install it with: pip install 'pneumonia-detection[parquet]'"


class Source(Protocol):
    """A lazily read collection of images."""

    key_name: str

    def iter_keys(self) -> Iterator[str]:
        """Every key, in scoring order, cheaply (no image is read)."""
        ...

    def items(self, skip: Container[str]) -> Iterator[Item]:
        """Every image whose key is not in ``skip``, in scoring order."""
        ...


def require_pyarrow(what: str) -> Any:
    """Import pyarrow, or explain how to get it."""
    try:
        import pyarrow
        import pyarrow.dataset
        import pyarrow.parquet
    except ImportError:
        raise ScoreError(
            f"{what} needs pyarrow, which is not installed; {PYARROW_HINT} (or use .csv)"
        ) from None
    return pyarrow


def _is_dicom_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(DICOM_MAGIC_OFFSET + len(DICOM_MAGIC))
    except OSError:
        return False
    return head[DICOM_MAGIC_OFFSET:] == DICOM_MAGIC


@dataclass(frozen=True)
class FolderSource:
    """Images anywhere under ``root``: JPEG/PNG/DICOM by suffix, plus DICOM files without one.

    Hidden files and folders are skipped and symlinked folders are not followed (no loops);
    folders are walked in name order so that every run sees the same order.
    """

    root: Path
    key_name: ClassVar[str] = "path"

    def files(self) -> Iterator[tuple[str, str]]:
        """(key relative to the root, path to read) for every image file."""
        stack = [self.root]
        while stack:
            folder = stack.pop()
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            subfolders = []
            for e in entries:
                if e.name.startswith("."):
                    continue
                if e.is_dir(follow_symlinks=False):
                    subfolders.append(Path(e.path))
                    continue
                suffix = os.path.splitext(e.name)[1].lower()
                if suffix in IMAGE_SUFFIXES or (not suffix and _is_dicom_file(e.path)):
                    yield Path(e.path).relative_to(self.root).as_posix(), e.path
            stack.extend(reversed(subfolders))

    def iter_keys(self) -> Iterator[str]:
        return (key for key, _ in self.files())

    def items(self, skip: Container[str]) -> Iterator[Item]:
        return (Item(key, path) for key, path in self.files() if key not in skip)


@dataclass(frozen=True)
class ManifestSource:
    """A CSV or Parquet file with a column of image paths (relative ones: to the manifest)."""

    manifest: Path
    column: str
    key_name: ClassVar[str] = "path"

    def iter_keys(self) -> Iterator[str]:
        if self.manifest.suffix.lower() == ".csv":
            # The one manifest reader (labels not needed), row by row: memory stays flat.
            try:
                yield from (
                    r.key
                    for r in iter_manifest(self.manifest, path_column=self.column, labels=False)
                )
            except ManifestError as exc:
                raise ScoreError(str(exc)) from None
        else:
            pa = require_pyarrow("a Parquet manifest")
            dataset = pa.dataset.dataset(self.manifest, format="parquet")
            for batch in dataset.to_batches(columns=[self.column]):
                yield from (str(v) for v in batch.column(0).to_pylist())

    def resolve(self, key: str) -> str:
        path = Path(key)
        return str(path if path.is_absolute() else self.manifest.parent / path)

    def items(self, skip: Container[str]) -> Iterator[Item]:
        return (Item(key, self.resolve(key)) for key in self.iter_keys() if key not in skip)


@dataclass(frozen=True)
class ParquetBytesSource:
    """A Parquet file (or folder of them) with an id column and a column of encoded images."""

    path: Path
    id_column: str
    bytes_column: str
    batch_rows: int = 256
    key_name: ClassVar[str] = "id"

    def _dataset(self) -> Any:
        return require_pyarrow("a Parquet input").dataset.dataset(self.path, format="parquet")

    def iter_keys(self) -> Iterator[str]:
        for batch in self._dataset().to_batches(columns=[self.id_column]):
            yield from (str(v) for v in batch.column(0).to_pylist())

    def items(self, skip: Container[str]) -> Iterator[Item]:
        cols = [self.id_column, self.bytes_column]
        for batch in self._dataset().to_batches(columns=cols, batch_size=self.batch_rows):
            ids, blobs = batch.column(0).to_pylist(), batch.column(1)
            for i, key in enumerate(ids):
                key = str(key)
                if key not in skip:
                    yield Item(key, None, blobs[i].as_py() or b"")


@dataclass(frozen=True)
class NpzSource:
    """Every image of a MedMNIST .npz file (train, val, then test), keyed ``SPLIT/NNNNN``.

    Each image goes through ``preprocess_uint8``: the scaling of an 8-bit file, without the
    upload limits (MedMNIST's 28-pixel size is below the decoder's minimum side).
    """

    path: Path
    key_name: ClassVar[str] = "id"

    def _splits(self) -> Iterator[tuple[str, int]]:
        for split in NPZ_SPLITS:
            try:
                _, labels = read_npz_split(self.path, split)
            except DatasetLayoutError as exc:
                raise ScoreError(str(exc)) from None
            yield split, len(labels)

    def iter_keys(self) -> Iterator[str]:
        for split, n in self._splits():
            yield from (f"{split}/{i:05d}" for i in range(n))

    def items(self, skip: Container[str]) -> Iterator[Item]:
        for split, _ in self._splits():
            images, _ = read_npz_split(self.path, split)
            for i, image in enumerate(images):
                key = f"{split}/{i:05d}"
                if key not in skip:
                    yield Item(key, None, None, image)


def open_input(
    path: Path,
    *,
    path_column: str | None = None,
    id_column: str = "id",
    bytes_column: str | None = None,
) -> FolderSource | ManifestSource | ParquetBytesSource | NpzSource:
    """Recognise what ``path`` is and return the matching source.

    A folder is an image tree (unless named ``*.parquet``, as Spark writes them); a ``.csv``
    is a manifest (read by :func:`pneumonia.data.iter_manifest`); a ``.parquet`` is image
    bytes if it has a binary column, else a manifest. ``path_column`` None: ``path``, else
    ``relpath``.

    Raises:
        ScoreError: the path is missing, of no known kind, or lacks the named columns.
    """
    path = Path(path).absolute()
    if not path.exists():
        raise ScoreError(f"{path} does not exist; INPUT must be {_KINDS}")
    suffix = path.suffix.lower()
    if path.is_dir() and suffix not in PARQUET_SUFFIXES:
        return FolderSource(path)
    if suffix == ".npz":
        return NpzSource(path)
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
        try:
            column, _ = manifest_columns(header, path, path_column, labels=False)
        except ManifestError as exc:
            raise ScoreError(f"{exc}; name the path column with --path-column") from None
        return ManifestSource(path, column)
    if suffix in PARQUET_SUFFIXES:
        pa = require_pyarrow("a Parquet input")
        schema = pa.dataset.dataset(path, format="parquet").schema
        names = list(schema.names)
        binary = [
            f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)
        ]
        if bytes_column is None and len(binary) > 1:
            raise ScoreError(
                f"{path} has several binary columns {binary}; choose one with --bytes-column"
            )
        if bytes_column is not None or binary:
            col = bytes_column or binary[0]
            missing = [c for c in (id_column, col) if c not in names]
            if missing:
                raise ScoreError(
                    f"{path} has no column {missing[0]!r} (columns: {names}); "
                    "name the columns with --id-column/--bytes-column"
                )
            return ParquetBytesSource(path, id_column, col)
        candidates = PATH_COLUMNS if path_column is None else (path_column,)
        found = next((c for c in candidates if c in names), None)
        if found is None:
            raise ScoreError(
                f"{path} has neither a binary image column nor a path column "
                f"{' or '.join(map(repr, candidates))} (columns: {names}); "
                "use --bytes-column or --path-column"
            )
        return ManifestSource(path, found)
    raise ScoreError(f"cannot score {path}: INPUT must be {_KINDS}")
