"""``pneumonia train`` under torchrun for the distributed tests: records every file each
process writes and can stop the whole run after an epoch.

Each process appends the files it writes (through :mod:`pneumonia.atomic`) to
``$WRITES_DIR/rank-$RANK.txt``. With ``STOP_AFTER=N``, rank 0 kills itself (SIGKILL, as when
a machine is lost) just after its N-th ``last.pt``; torchrun then ends the other processes.
``RANK1_ARGS`` are appended to rank 1's command line only (ranks that disagree).
Everything else is the real command: ``torchrun ... ddp_train.py train --data ...``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from pneumonia import atomic
from pneumonia.cli import main
from pneumonia.training.run import LAST

_real_replacing = atomic.replacing
_last_written = 0


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[IO[bytes]]:
    global _last_written
    log = Path(os.environ["WRITES_DIR"]) / f"rank-{os.environ.get('RANK', '0')}.txt"
    with log.open("a") as f:
        f.write(f"{path}\n")
    with _real_replacing(path) as out:
        yield out
    if Path(path).name == LAST:
        _last_written += 1
        stop = int(os.environ.get("STOP_AFTER", "0"))
        if stop and _last_written == stop and os.environ.get("RANK") == "0":
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    atomic.replacing = _replacing  # type: ignore[assignment]
    argv = sys.argv[1:]
    if os.environ.get("RANK") == "1":
        argv += os.environ.get("RANK1_ARGS", "").split()
    sys.exit(main(argv))
