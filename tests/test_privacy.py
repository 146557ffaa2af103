"""Patient data in an uploaded DICOM never leaves the request: not in the answer, not in the
logs (even at DEBUG), not on disk. Checked against a real ``pneumonia serve`` process."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.common import dicom_bytes
from conftest import synthetic_xray
from serve_util import running_server

pytestmark = pytest.mark.slow

# Distinctive enough that any occurrence is a leak; each name part is searched on its own too.
PATIENT_NAME = "Quixotlewaite^Zebrandine"
PATIENT_ID = "PID-7QX3-ZEBRA-5512"
SECRETS = (PATIENT_NAME, *PATIENT_NAME.split("^"), PATIENT_ID)


def patient_dicom(transfer_syntax: str | None = None, encapsulated: bytes | None = None) -> bytes:
    pixels = synthetic_xray(1, 5, 96).astype(np.uint16) * 16
    return dicom_bytes(
        pixels,
        transfer_syntax=transfer_syntax,
        encapsulated=encapsulated,
        patient=(PATIENT_NAME, PATIENT_ID),
    )


def leaks(data: bytes) -> list[str]:
    """The secrets found in ``data``, as UTF-8 or as UTF-16 (either byte order)."""
    return [
        s
        for s in SECRETS
        if any(s.encode(enc) in data for enc in ("utf-8", "utf-16-le", "utf-16-be"))
    ]


def test_patient_fields_appear_in_no_answer_log_or_file(tiny_model: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    (workdir / "tmp").mkdir(parents=True)
    good = patient_dicom()
    assert leaks(good) == [PATIENT_NAME, *PATIENT_NAME.split("^"), PATIENT_ID]  # the probe works
    # name: (file, the status of POST /predict)
    uploads = {
        "good": (good, 200),
        "truncated": (good[: len(good) // 2], 422),
        "no-pixels": (good[: good.rindex(b"\xe0\x7f\x10\x00")], 422),
        "compressed": (
            patient_dicom(
                transfer_syntax="1.2.840.10008.1.2.4.80",
                encapsulated=b"\xff\xd8\xff\xf7" + bytes(64),
            ),
            415,
        ),
    }
    env = {"LOG_LEVEL": "DEBUG", "TMPDIR": str(workdir / "tmp"), "INFERENCE_THREADS": "1"}
    answers: list[bytes] = []
    with (
        running_server(tiny_model, tmp_path, cwd=workdir, **env) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        for name, (data, status) in uploads.items():
            for path in ("/predict", "/predict?heatmap=true"):
                resp = client.post(path, files={"file": (f"{name}.dcm", data)})
                assert resp.status_code == status, resp.text
                answers.append(resp.content)
        files = [("files", (f"{name}.dcm", data)) for name, (data, _) in uploads.items()]
        resp = client.post("/predict/batch", files=files)
        assert resp.status_code == 200
        assert [("error" in r) for r in resp.json()["results"]] == [False, True, True, True]
        answers.append(resp.content)
        answers.append(client.get("/metrics").content)
    # The server has stopped: its logs are complete.
    logs = server.stderr_path.read_bytes() + server.stdout_path.read_bytes()
    assert b'"level": "DEBUG"' in logs  # it really logged at DEBUG
    assert [leaks(a) for a in answers] == [[]] * len(answers)
    assert leaks(logs) == []
    for path in workdir.rglob("*"):
        if path.is_file():
            assert leaks(path.read_bytes()) == [], path
