"""A real ``pneumonia serve`` process on a free port, for the service tests.

Test images, the /proc walker, ports and the error assert are in benchmarks/common.py,
shared with the benchmarks.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import free_port

#: Keys every successful /predict answer carries.
PREDICT_KEYS = {
    "filename",
    "prediction",
    "probability",
    "probabilities",
    "threshold",
    "input_check",
    "model",
    "processing_ms",
    "request_id",
}


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    url: str
    stderr_path: Path
    stdout_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


def serve_command() -> list[str]:
    """``pneumonia serve`` from this interpreter's environment."""
    script = Path(sys.executable).parent / "pneumonia"
    return (
        [str(script), "serve"]
        if script.exists()
        else [sys.executable, "-m", "pneumonia.cli", "serve"]
    )


@contextlib.contextmanager
def running_server(
    model: Path,
    tmp_path: Path,
    cwd: Path | None = None,
    command: list[str] | None = None,
    **env: str,
) -> Iterator[ServerProcess]:
    """Start ``pneumonia serve`` on a free loopback port; wait until /ready; stop it after.

    Its stderr and stdout go to files in ``tmp_path``; ``cwd`` is its working directory;
    ``command`` replaces :func:`serve_command` (e.g. ``gated_serve.py``).
    """
    port = free_port()
    err = tmp_path / f"serve-{port}.log"
    out = tmp_path / f"serve-{port}.out"
    full_env = {
        **os.environ,
        "MODEL_PATH": str(model),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        **env,
    }
    with err.open("wb") as err_file, out.open("wb") as out_file:
        proc = subprocess.Popen(
            command or serve_command(), env=full_env, stdout=out_file, stderr=err_file, cwd=cwd
        )
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", err, out)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}: {server.stderr()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(server.url + "/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"server not ready after 60 s: {server.stderr()}")
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def served_statuses(records: list[dict[str, Any]]) -> list[int]:
    """The statuses of the server's request log lines, less the readiness probes that
    :func:`running_server` sends while warm-up runs (their 503 ``not_ready`` is the designed
    answer; whether a probe lands inside the warm-up is a race)."""
    return [
        int(r["status"])
        for r in records
        if r.get("message") == "request" and not (r.get("path") == "/ready" and r["status"] == 503)
    ]
