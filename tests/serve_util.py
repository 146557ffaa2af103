"""Helpers for the service tests: encoded test images (DICOM, 16-bit PNG, bombs) and a real
``pneumonia serve`` process on a free port."""

from __future__ import annotations

import contextlib
import io
import os
import re
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
    patient: tuple[str, str] = ("Doe^Jane", "PATIENT-SECRET-0042"),
) -> bytes:
    """A DICOM file (12 bits stored in 16) with patient fields that must never be logged.

    ``encapsulated`` puts that one fragment in a compressed ``transfer_syntax`` instead of
    the native pixels. ``patient`` is (PatientName, PatientID).
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
    ds.PatientName, ds.PatientID = patient
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


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_chunk_span(data: bytes, kind: bytes) -> tuple[int, int]:
    """(offset of its data, its length) of the first ``kind`` chunk of a PNG, walking chunks."""
    pos = 8
    while pos + 8 <= len(data):
        length = struct.unpack(">I", data[pos : pos + 4])[0]
        if data[pos + 4 : pos + 8] == kind:
            return pos + 8, length
        pos += 12 + length
    raise AssertionError(f"no {kind!r} chunk")


def damage_png(data: bytes, kind: bytes, where: str = "crc") -> bytes:
    """A PNG damaged in one place of its first ``kind`` chunk.

    ``where``: "crc" flips a byte of the chunk's CRC; "data" a byte in the middle of its data
    (the CRC left as it was); "adler" (IDAT) the last byte of the zlib stream's Adler-32, with
    the chunk's CRC made right again, so that only the zlib check can tell.
    """
    start, length = png_chunk_span(data, kind)
    out = bytearray(data)
    if where == "crc":
        out[start + length] ^= 0xFF
    elif where == "data":
        out[start + length // 2] ^= 0xFF
    elif where == "adler":
        body = bytearray(data[start : start + length])
        body[-1] ^= 0xFF
        return data[: start - 8] + png_chunk(kind, bytes(body)) + data[start + length + 4 :]
    else:
        raise ValueError(where)
    return bytes(out)


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A few hundred bytes of PNG that claim ``width x height`` pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


#: Keys every successful /predict answer carries.
PREDICT_KEYS = {
    "filename",
    "prediction",
    "probability",
    "probabilities",
    "threshold",
    "model",
    "processing_ms",
    "request_id",
}


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """(status line and headers, body) of one HTTP response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    while length and len(body) < int(length.group(1)) and (chunk := sock.recv(65536)):
        body += chunk
    return head, body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def process_tree(root: int) -> list[int]:
    """``root`` and its live descendants, from the parent ids in /proc/*/stat (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # The parent id follows the command name, which is in parentheses and may hold spaces.
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_memory_mib(root: int) -> tuple[float, float]:
    """(resident now, peak resident) of a process tree in MiB: VmRSS and VmHWM summed.

    The summed VmHWM bounds the tree's true peak from above (the processes may peak at
    different times); for a single process it is exact, however short the spike.
    """
    rss = hwm = 0
    for pid in process_tree(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:  # exited meanwhile
            continue
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key == "VmRSS":
                rss += int(value.split()[0])
            elif key == "VmHWM":
                hwm += int(value.split()[0])
    return rss / 1024, hwm / 1024


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
