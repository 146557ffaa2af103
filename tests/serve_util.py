"""Helpers for the service tests: encoded test images (DICOM, 16-bit PNG, bombs) and a real
``pneumonia serve`` process on a free port."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def dicom_bytes(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    *,
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    transfer_syntax: str | None = None,
    encapsulated: bytes | None = None,
) -> bytes:
    """A DICOM file (12 bits stored in 16) with patient fields that must never be logged.

    ``encapsulated`` puts that one fragment in a compressed ``transfer_syntax`` instead of
    the native pixels.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PATIENT-SECRET-0042"
    ds.PatientBirthDate = "20190101"
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0.0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if encapsulated is None:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    else:
        ds.PixelData = encapsulate([encapsulated])
        ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def png16_bytes(gray8: np.ndarray) -> bytes:
    """A 16-bit grayscale PNG holding the same image as ``gray8`` (each value times 257)."""
    buf = io.BytesIO()
    Image.fromarray(gray8.astype(np.uint16) * 257).save(buf, format="PNG")
    return buf.getvalue()


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A few hundred bytes of PNG that claim ``width x height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    url: str
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def serve_command() -> list[str]:
    """``pneumonia serve`` from this interpreter's environment."""
    script = Path(sys.executable).parent / "pneumonia"
    return (
        [str(script), "serve"]
        if script.exists()
        else [sys.executable, "-m", "pneumonia.cli", "serve"]
    )


@contextlib.contextmanager
def running_server(model: Path, tmp_path: Path, **env: str) -> Iterator[ServerProcess]:
    """Start ``pneumonia serve`` on a free loopback port; wait until /ready; stop it after."""
    port = free_port()
    err = tmp_path / f"serve-{port}.log"
    full_env = {
        **os.environ,
        "MODEL_PATH": str(model),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        **env,
    }
    with err.open("wb") as err_file:
        proc = subprocess.Popen(
            serve_command(), env=full_env, stdout=subprocess.DEVNULL, stderr=err_file
        )
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", err)
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
