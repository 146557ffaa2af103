"""``pneumonia serve`` whose inference jobs wait for a gate file before they run.

Overload tests start it to keep the inference slot busy for as long as they need without
burning CPU: each job of a prediction route waits in its worker thread until the file named
by ``GATE_FILE`` exists (60 s at most) and then runs as usual. Everything else, uvicorn and
the sockets included, is the real ``pneumonia serve``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import pneumonia.serve.routes as routes
from pneumonia.cli import main

_real_job = routes.predict_job


def _gated_job(*args: Any, **kwargs: Any) -> Any:
    gate = Path(os.environ["GATE_FILE"])
    deadline = time.monotonic() + 60
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return _real_job(*args, **kwargs)


if __name__ == "__main__":
    routes.predict_job = _gated_job  # type: ignore[assignment]
    sys.exit(main(["serve", *sys.argv[1:]]))
