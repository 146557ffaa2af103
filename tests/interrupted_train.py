"""``pneumonia train`` that stops itself at a chosen moment, for the resume tests.

``STOP_AT`` names the moment and the signal:

- ``batch:N:SIG``: before the N-th training batch of the run (counted over every member);
- ``write:NAME:N:SIG``: during the N-th atomic write of a file called NAME, once its bytes
  are handed to the temporary file and before it is flushed and renamed (the old file, if
  any, is still in place);
- ``written:NAME:N:SIG``: just after that write's rename.

SIG is ``INT`` (what Ctrl-C sends) or ``KILL`` (nothing runs after it, as when a machine is
lost). Everything else is the real command: ``python interrupted_train.py train --data ...``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pneumonia.training.train as train_module
from pneumonia import atomic
from pneumonia.cli import main

_event, *_rest = os.environ["STOP_AT"].split(":")
_name = _rest[0] if _event != "batch" else ""
_n, _sig = int(_rest[-2]), getattr(signal, "SIG" + _rest[-1])
_count = 0


def _hit(event: str, name: str = "") -> None:
    global _count
    if event == _event and name == _name:
        _count += 1
        if _count == _n:
            os.kill(os.getpid(), _sig)


_real_replacing = atomic.replacing
_real_augment = train_module.augment_batch


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[IO[bytes]]:
    with _real_replacing(path) as f:
        yield f
        _hit("write", Path(path).name)
    _hit("written", Path(path).name)


def _augment(*args: Any, **kwargs: Any) -> Any:
    _hit("batch")
    return _real_augment(*args, **kwargs)


if __name__ == "__main__":
    atomic.replacing = _replacing  # type: ignore[assignment]
    train_module.augment_batch = _augment  # type: ignore[assignment]
    sys.exit(main(sys.argv[1:]))
