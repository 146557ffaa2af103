"""Results on disk: parts written atomically while scoring, merged into OUT at the end.

While a job runs, finished rows go to ``OUT.parts/part-00001.<ext>`` and so on, each written
to a temporary name, flushed to disk and renamed, so a part is either whole or absent. At the
end the parts (after the rows of an earlier OUT, if any) are streamed into a temporary file
that replaces OUT in one rename, and the parts folder is removed. A rerun reads the keys
already in OUT and the parts and skips them; a key seen twice (a crash between the rename
and the removal, or a duplicate in the input) is kept once, first occurrence first.

CSV needs nothing beyond the standard library; Parquet needs pyarrow.
"""

from __future__ import annotations

import csv
import fcntl
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from pneumonia.labels import LABELS
from pneumonia.score.inputs import PARQUET_SUFFIXES, require_pyarrow
from pneumonia.score.rows import ScoreError, ScoreRow, columns

_PART_PREFIX = "part-"
_READ_BATCH = 8192


class RowFormat(Protocol):
    suffix: str

    def writer(self, path: Path, key_name: str) -> Any:
        """Context manager giving ``write(rows)``; the file is fsynced on close."""
        ...

    def read(self, path: Path) -> tuple[tuple[str, ...], Iterator[list[ScoreRow]]]:
        """(the column names, batches of rows)."""
        ...


def _fsync(f: IO[Any]) -> None:
    f.flush()
    os.fsync(f.fileno())


class CsvFormat:
    """Plain CSV; empty cells are missing values, floats are written with full precision."""

    suffix = ".csv"

    @contextmanager
    def writer(self, path: Path, key_name: str) -> Iterator[Any]:
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns(key_name))

            class _W:
                @staticmethod
                def write(rows: Sequence[ScoreRow]) -> None:
                    w.writerows(
                        [
                            "" if v is None else repr(float(v)) if isinstance(v, float) else v
                            for v in r
                        ]
                        for r in rows
                    )

            yield _W
            _fsync(f)

    def read(self, path: Path) -> tuple[tuple[str, ...], Iterator[list[ScoreRow]]]:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [""])
        return tuple(header), self._rows(path)

    @staticmethod
    def _rows(path: Path) -> Iterator[list[ScoreRow]]:
        def opt(s: str) -> str | None:
            return s or None

        def num(s: str) -> float | None:
            return float(s) if s else None

        with path.open(newline="") as f:
            reader = csv.reader(f)
            next(reader, None)
            batch: list[ScoreRow] = []
            for key, sha, pred, pn, pp, thr, model, check, err in reader:
                batch.append(
                    ScoreRow(
                        key,
                        opt(sha),
                        opt(pred),
                        num(pn),
                        num(pp),
                        float(thr),
                        model,
                        opt(check),
                        opt(err),
                    )
                )
                if len(batch) >= _READ_BATCH:
                    yield batch
                    batch = []
            if batch:
                yield batch


class ParquetFormat:
    """Parquet with a fixed schema (strings, float64)."""

    suffix = ".parquet"

    def __init__(self) -> None:
        self.pa = require_pyarrow("Parquet output")

    def schema(self, key_name: str) -> Any:
        pa = self.pa
        s, f = pa.string(), pa.float64()
        return pa.schema(list(zip(columns(key_name), (s, s, s, f, f, f, s, s, s), strict=True)))

    @contextmanager
    def writer(self, path: Path, key_name: str) -> Iterator[Any]:
        pa = self.pa
        schema = self.schema(key_name)
        with path.open("wb") as f, pa.parquet.ParquetWriter(f, schema) as pw:

            class _W:
                @staticmethod
                def write(rows: Sequence[ScoreRow]) -> None:
                    if rows:
                        cols = list(zip(*rows, strict=True))
                        pw.write_table(
                            pa.Table.from_arrays(
                                [pa.array(c, t) for c, t in zip(cols, schema.types, strict=True)],
                                schema=schema,
                            )
                        )

            yield _W
            pw.close()
            _fsync(f)

    def read(self, path: Path) -> tuple[tuple[str, ...], Iterator[list[ScoreRow]]]:
        pf = self.pa.parquet.ParquetFile(path)
        return tuple(pf.schema_arrow.names), self._rows(pf)

    @staticmethod
    def _rows(pf: Any) -> Iterator[list[ScoreRow]]:
        for batch in pf.iter_batches(batch_size=_READ_BATCH):
            yield [ScoreRow(*r) for r in zip(*(c.to_pylist() for c in batch.columns), strict=True)]


def format_for(out: Path) -> RowFormat:
    """The output format named by ``out``'s extension."""
    suffix = out.suffix.lower()
    if suffix == ".csv":
        return CsvFormat()
    if suffix in PARQUET_SUFFIXES:
        return ParquetFormat()
    raise ScoreError(f"--out {out} must end in .parquet or .csv")


@dataclass
class Tally:
    """Rows by prediction, by error code and by the input check's outcome."""

    labels: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    checks: Counter[str] = field(default_factory=Counter)

    def add(self, row: ScoreRow) -> None:
        if row.error_code:
            self.errors[row.error_code] += 1
        elif row.prediction:
            self.labels[row.prediction] += 1
        if row.input_check:
            self.checks[row.input_check] += 1

    @property
    def rows(self) -> int:
        return sum(self.labels.values()) + sum(self.errors.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "labels": {k: self.labels[k] for k in LABELS},
            "errors": dict(sorted(self.errors.items())),
            "input_check": dict(sorted(self.checks.items())),
        }


class ScoreOutput:
    """OUT and its parts folder for one job; use as a context manager.

    Args:
        out: The final ``.parquet`` or ``.csv`` file.
        key_name: ``path`` or ``id``.
        model_sha256: The model scoring this job; rows of another model are refused.
        part_rows: Rows per part; a crash loses at most the rows not yet in a part.
        part_seconds: Also write a part when this long has passed since the last one.

    Raises:
        ScoreError: another job holds OUT, or OUT/parts were written for another key or model.
    """

    def __init__(
        self,
        out: Path,
        key_name: str,
        model_sha256: str,
        *,
        part_rows: int = 1000,
        part_seconds: float = 30.0,
    ) -> None:
        if part_rows < 1:
            raise ScoreError(f"part_rows must be >= 1, got {part_rows}")
        self.out = Path(out)
        self.format = format_for(self.out)
        self.key_name = key_name
        self.model_sha256 = model_sha256
        self.part_rows = part_rows
        self.part_seconds = part_seconds
        self.parts_dir = self.out.with_name(self.out.name + ".parts")
        self.done: set[str] = set()
        self.tally = Tally()
        self._buffer: list[ScoreRow] = []
        self._last_flush = time.monotonic()
        self._next_part = 1
        self._lock: IO[Any] | None = None

    def __enter__(self) -> ScoreOutput:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.parts_dir.mkdir(exist_ok=True)
        self._lock = (self.parts_dir / ".lock").open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ScoreError(
                f"another `pneumonia score` is writing {self.out}; "
                "wait for it or choose another --out"
            ) from None
        for tmp in self.parts_dir.glob("*.tmp"):  # half-written by a killed run
            tmp.unlink()
        parts = self._parts()
        if parts:
            self._next_part = int(parts[-1].name[len(_PART_PREFIX) :].split(".")[0]) + 1
        for _ in self._existing_rows(parts):
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.flush()  # rows in the buffer are finished results, also on Ctrl-C
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    def _parts(self) -> list[Path]:
        return sorted(
            p for p in self.parts_dir.glob(f"{_PART_PREFIX}*{self.format.suffix}") if p.is_file()
        )

    def _existing_rows(self, parts: Sequence[Path]) -> Iterator[list[ScoreRow]]:
        """Rows of OUT then of the parts, checked and de-duplicated; fills ``done``, ``tally``."""
        self.done.clear()
        self.tally = Tally()
        for src in ([self.out] if self.out.is_file() else []) + list(parts):
            names, batches = self.format.read(src)
            if names[:1] != (self.key_name,):
                raise ScoreError(
                    f"{src} is keyed by {names[0] if names else ''!r} but this input by "
                    f"{self.key_name!r}; choose another --out"
                )
            if names != columns(self.key_name):
                raise ScoreError(
                    f"{src} has the columns {list(names)}, written by another version of "
                    f"pneumonia score (this one writes {list(columns(self.key_name))}); "
                    "choose another --out"
                )
            for batch in batches:
                fresh = []
                for row in batch:
                    if row.key in self.done:
                        continue
                    if row.model_sha256 != self.model_sha256:
                        raise ScoreError(
                            f"{src} holds rows of model {row.model_sha256[:12]}..., not of "
                            f"this model {self.model_sha256[:12]}...; "
                            f"choose another --out or delete {src.name}"
                        )
                    self.done.add(row.key)
                    self.tally.add(row)
                    fresh.append(row)
                yield fresh

    def add(self, rows: Sequence[ScoreRow]) -> None:
        """Take finished rows; write a part when enough have gathered."""
        self._buffer.extend(rows)
        for row in rows:
            self.tally.add(row)
        if (
            len(self._buffer) >= self.part_rows
            or time.monotonic() - self._last_flush >= self.part_seconds
        ):
            self.flush()

    def flush(self) -> None:
        """Write buffered rows as the next part (temporary file, fsync, rename)."""
        self._last_flush = time.monotonic()
        if not self._buffer:
            return
        final = self.parts_dir / f"{_PART_PREFIX}{self._next_part:05d}{self.format.suffix}"
        self._write_atomic(final, [self._buffer])
        self._next_part += 1
        self._buffer = []

    def _write_atomic(self, path: Path, batches: Any) -> None:
        tmp = path.with_name(path.name + ".tmp")
        try:
            with self.format.writer(tmp, self.key_name) as w:
                for batch in batches:
                    w.write(batch)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def commit(self) -> Tally:
        """Merge OUT and the parts into OUT in one rename, remove the parts, return the totals."""
        self.flush()
        parts = self._parts()
        if parts or not self.out.is_file():
            self._write_atomic(self.out, self._existing_rows(parts))
        shutil.rmtree(self.parts_dir)
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        return self.tally
