"""Files written whole or not at all: a temporary file in the same folder, fsync, rename.

A process stopped at any moment (Ctrl-C, SIGKILL, a lost machine) leaves either the old
file or the new one, never a half-written one: ``os.replace`` is atomic within a file
system, and the data, then the folder entry, are flushed to disk before the call returns.
A temporary file left by a killed writer is named ``.<name>.<pid>.tmp``;
:func:`remove_leftovers` clears them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

TMP_SUFFIX = ".tmp"


def _fsync_dir(folder: Path) -> None:
    # The rename itself is durable only once the folder is flushed (POSIX; not on Windows).
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[IO[bytes]]:
    """A binary file to write that replaces ``path`` when the block ends without error.

    Example: ``with replacing(run / "best.pt") as f: torch.save(state, f)``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with tmp.open("wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``, atomically."""
    with replacing(path) as f:
        f.write(data)


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8), atomically."""
    write_bytes(path, text.encode("utf-8"))


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete the temporary files killed writers left under ``folder``; return them."""
    found = sorted(p for p in Path(folder).rglob(f".*{TMP_SUFFIX}") if p.is_file())
    for p in found:
        p.unlink(missing_ok=True)
    return found
