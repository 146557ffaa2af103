"""Helpers the tests and the benchmarks share: test images, the /proc walker, ports, HTTP bits.

One copy of each, so that what a test pins and what a benchmark measures are built alike.
The benchmark scripts import this as ``common`` (their own folder is on ``sys.path`` when they
run); the tests import it as ``benchmarks.common`` (pyproject's pytest ``pythonpath`` puts
the repository root on ``sys.path``). Only the standard library, numpy, Pillow and pydicom:
everything the serving install already has, and numpy, Pillow and pydicom imported only by the
helpers that build images (benchmarks/container_check.py imports this on a host with Python
alone).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from base64 import b64encode
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

HOST = "127.0.0.1"
#: Memory is reported in MB = 10^6 bytes (the stricter reading of "120 MB"), MiB where it says so.
MB = 1_000_000
#: How the benchmarks start our service (``{pneumonia}``, ``{python}``, ``{host}``, ``{port}``).
DEFAULT_OURS_CMD = "{pneumonia} serve --host {host} --port {port}"
#: Keys of every error answer, and of its ``error`` object.
ERROR_KEYS = {"error"}
ERROR_DETAIL_KEYS = {"code", "message"}
#: Exception text that must never reach a client.
_LEAK = re.compile(r"Traceback|File \"|\b[A-Z]\w*(Error|Exception)\b|site-packages|/tmp/|/work/")


def logger(tag: str) -> Callable[[str], None]:
    """A ``log(msg)`` that writes one progress line ``[tag] msg`` to stderr (stdout is for
    results)."""

    def log(msg: str) -> None:
        print(f"[{tag}] {msg}", file=sys.stderr, flush=True)

    return log


# --- test images ------------------------------------------------------------------------------


def dicom_bytes(
    pixels: np.ndarray | None,
    photometric: str = "MONOCHROME2",
    *,
    bits: int = 12,
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    transfer_syntax: str | None = None,
    encapsulated: bytes | None = None,
    patient: tuple[str, str] = ("Doe^Jane", "PATIENT-SECRET-0042"),
    **attrs: Any,
) -> bytes:
    """A CR DICOM file with patient fields that must never be logged.

    Args:
        pixels: uint16 values (``bits`` stored in 16) if 2-D, 8-bit RGB if 3-D; None for a
            file without PixelData (64x64 by its header).
        photometric: PhotometricInterpretation.
        bits: BitsStored of a 2-D image.
        slope, intercept: RescaleSlope / RescaleIntercept, if given.
        window: (WindowCenter, WindowWidth), if given.
        transfer_syntax: its UID (default Explicit VR Little Endian). Deflated is deflated on
            writing; RLE Lossless compresses ``pixels`` unless ``encapsulated`` is given.
        encapsulated: one fragment to store as the (compressed) pixel data instead of
            ``pixels``.
        patient: (PatientName, PatientID).
        attrs: any other header fields, set last (e.g. ``Rows=60`` for a header that does not
            match the pixel data).
    """
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        UID,
        ExplicitVRLittleEndian,
        RLELossless,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(transfer_syntax) if transfer_syntax else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = patient
    ds.PatientBirthDate = "20190101"
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape[:2] if pixels is not None else (64, 64)
    ds.PhotometricInterpretation = photometric
    if pixels is not None and pixels.ndim == 3:
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    else:
        ds.SamplesPerPixel = 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0.0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    for key, value in attrs.items():
        setattr(ds, key, value)
    if encapsulated is not None:
        ds.PixelData = encapsulate([encapsulated])
        ds["PixelData"].VR = "OB"
    elif pixels is not None:
        dtype = np.uint8 if pixels.ndim == 3 else np.dtype("<u2")
        ds.PixelData = pixels.astype(dtype).tobytes()
        if meta.TransferSyntaxUID == RLELossless:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.compress(RLELossless)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_raw(
    width: int,
    height: int,
    idat: bytes,
    *extra: bytes,
    depth: int = 8,
    colour: int = 0,
    interlace: int = 0,
) -> bytes:
    """A PNG from its parts: IHDR (gray 8-bit unless said), ``extra`` chunks, one IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", ihdr)
        + b"".join(extra)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A few hundred bytes of PNG that claim ``width x height`` pixels (a decompression bomb)."""
    return png_raw(width, height, zlib.compress(b"\x00" * 4096))


def png_of_zeros(width: int, height: int) -> bytes:
    """A valid 1-bit gray PNG of zeros: a few KB for any size (legal, but bomb-like)."""
    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return png_raw(width, height, idat, depth=1)


def png16_bytes(gray8: np.ndarray) -> bytes:
    """A 16-bit grayscale PNG holding the same image as ``gray8`` (each value times 257)."""
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(gray8.astype(np.uint16) * 257).save(buf, format="PNG")
    return buf.getvalue()


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


def synthetic_film(size: tuple[int, int]) -> Any:
    """A deterministic chest-film-like grayscale Pillow image (bright body, two dark lungs,
    noise) of ``size`` (width, height)."""
    import numpy as np
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    yy, xx = yy / h, xx / w
    img = 0.75 - 0.3 * np.exp(-(((xx - 0.3) / 0.13) ** 2 + ((yy - 0.5) / 0.25) ** 2))
    img -= 0.3 * np.exp(-(((xx - 0.7) / 0.13) ** 2 + ((yy - 0.5) / 0.25) ** 2))
    img += rng.normal(0, 0.03, img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


# --- processes and their memory, from /proc (Linux) -------------------------------------------


def process_tree(root: int) -> list[int]:
    """``root`` and its live descendants, from the parent ids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # The parent id follows the command name, which is in parentheses and may hold spaces.
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    if not Path(f"/proc/{root}").exists():
        return []
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICK = os.sysconf("SC_CLK_TCK")


def _status_kib(pid: int | str, field: str) -> int:
    """A ``kB`` field of /proc/PID/status (``pid`` may be "self"); 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def rss_bytes(pid: int) -> int:
    """Resident memory of one process now (0 if it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def hwm_bytes(pid: int) -> int:
    """The kernel's peak RSS of one process (VmHWM), exact however short the spike."""
    return _status_kib(pid, "VmHWM") * 1024


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process (shared pages split between their users)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def self_status_kib(field: str) -> int:
    """A ``kB`` field of this process's /proc/self/status (VmRSS, VmHWM, ...)."""
    value = _status_kib("self", field)
    if not value:
        raise RuntimeError(f"{field} not in /proc/self/status")
    return value


def tree_memory_mib(root: int) -> tuple[float, float]:
    """(resident now, peak resident) of a process tree in MiB: VmRSS and VmHWM summed.

    The summed VmHWM bounds the tree's true peak from above (the processes may peak at
    different times); for a single process it is exact, however short the spike.
    """
    pids = process_tree(root)
    rss = sum(_status_kib(p, "VmRSS") for p in pids)
    hwm = sum(_status_kib(p, "VmHWM") for p in pids)
    return rss / 1024, hwm / 1024


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of these processes."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total / _TICK


class TreeSampler(threading.Thread):
    """Samples the summed RSS (and, if asked, PSS) of a process tree every ``interval``
    seconds until stopped.

    Attributes:
        peak: Highest summed RSS sampled, bytes. ``peak_pss``: the same for PSS.
        samples: How many samples were taken.
        hwm: Summed VmHWM of the tree when :meth:`stop` was called (bytes): the kernel's
            exact per-process peaks, an upper bound of the tree's.
        phase: A label stored with each sample when ``keep`` (set it as the run goes on).
        series: With ``keep``, every sample as (seconds since start, MB, phase).
    """

    def __init__(
        self, root: int, interval: float = 0.05, *, pss: bool = False, keep: bool = False
    ) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.interval = interval
        self.pss = pss
        self.keep = keep
        self.peak = self.peak_pss = self.samples = self.hwm = 0
        self.phase = "start"
        self.series: list[tuple[float, float, str]] = []
        self.t0 = time.monotonic()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            pids = process_tree(self.root)
            rss = sum(rss_bytes(p) for p in pids)
            self.peak = max(self.peak, rss)
            if self.pss:
                self.peak_pss = max(self.peak_pss, sum(pss_bytes(p) for p in pids))
            if self.keep:
                t = round(time.monotonic() - self.t0, 3)
                self.series.append((t, round(rss / MB, 2), self.phase))
            self.samples += 1
            self._halt.wait(self.interval)

    def current(self) -> int:
        """Summed RSS of the tree now, bytes."""
        return sum(rss_bytes(p) for p in process_tree(self.root))

    def of(self, phase: str) -> list[tuple[float, float]]:
        """(seconds, MB) of the samples taken in ``phase`` (with ``keep``)."""
        return [(t, mb) for t, mb, p in self.series if p == phase]

    def stop(self) -> None:
        """Stop sampling; first record the summed VmHWM of the still-running tree."""
        self.hwm = sum(hwm_bytes(p) for p in process_tree(self.root))
        self._halt.set()
        self.join(timeout=5)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process's own group (started with ``start_new_session``), then SIGKILL."""
    if proc.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def ours_command(template: str = DEFAULT_OURS_CMD) -> list[str]:
    """The command line of our service from a template (see ``DEFAULT_OURS_CMD``); ``{port}``
    is left for the caller."""
    exe = Path(sys.executable).parent / "pneumonia"
    pneumonia = str(exe) if exe.exists() else (shutil.which("pneumonia") or "pneumonia")
    subs = {"{pneumonia}": pneumonia, "{python}": sys.executable, "{host}": HOST}
    cmd = []
    for token in shlex.split(template):
        for key, value in subs.items():
            token = token.replace(key, value)
        cmd.append(token)
    return cmd


def tail(path: Path, n: int = 15) -> str:
    """The last ``n`` lines of a log file ("" if unreadable)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method); NaN for no values."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# --- network and HTTP -------------------------------------------------------------------------


def free_port(host: str = HOST) -> int:
    """A TCP port free on ``host`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def multipart(data: bytes, filename: str, field: str = "file") -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data upload of one file."""
    boundary = "bench" + hashlib.sha256(data).hexdigest()[:24]
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return (
        head + data + f"\r\n--{boundary}--\r\n".encode(),
        f"multipart/form-data; boundary={boundary}",
    )


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


def assert_error(resp: Any, status: int, code: str) -> str:
    """The service's one error shape, with the status and code expected, and a message that
    leaks no exception text; returns the message.

    ``resp`` is an httpx or TestClient response (``status_code``, ``text``, ``json()``).
    """
    assert resp.status_code == status, resp.text[:500]
    assert resp.headers["content-type"] == "application/json", resp.headers
    body = resp.json()
    assert set(body) == ERROR_KEYS and set(body["error"]) == ERROR_DETAIL_KEYS, body
    assert body["error"]["code"] == code, body
    message = body["error"]["message"]
    assert message and not _LEAK.search(message), message
    return str(message)


# --- a real PACS: Orthanc with its DICOMweb plugin (tests/test_pacs.py, bench_pacs.py) ----------
# From the Debian packages (apt-get install orthanc orthanc-dicomweb; .ci/run installs them), on
# a free loopback port, its storage in the caller's folder, stopped afterwards; and the films
# uploaded to it, with the study, series, body part and view attributes a PACS would hold.

ORTHANC_PACKAGES = "orthanc orthanc-dicomweb"
#: Where Debian's orthanc-dicomweb puts the plugin (`dpkg -L orthanc-dicomweb`).
PLUGIN_GLOB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so*"
USER, PASSWORD = "radiology", "s3cret-for-tests"


def find_orthanc() -> tuple[str, str] | str:
    """(the Orthanc binary, the DICOMweb plugin library), or why they cannot be found."""
    binary = shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").is_file() else None
    )
    if binary is None:
        return f"no Orthanc binary (apt-get install {ORTHANC_PACKAGES})"
    plugin = _plugin_from_dpkg() or next(
        iter(sorted(Path("/").glob(PLUGIN_GLOB.lstrip("/")))), None
    )
    if plugin is None:
        return f"no Orthanc DICOMweb plugin (apt-get install {ORTHANC_PACKAGES})"
    return binary, str(plugin)


def _plugin_from_dpkg() -> str | None:
    try:
        listed = subprocess.run(
            ["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    libs = [p for p in listed if "/plugins/" in p and ".so" in Path(p).name]
    return libs[0] if libs else None


@dataclass
class Orthanc:
    """One Orthanc process; ``with Orthanc(folder) as pacs:`` starts it and stops it.

    Attributes:
        folder: Holds its config, storage and log.
        user, password: Its one HTTP user (authentication is on, as in a hospital).
    """

    folder: Path
    user: str = USER
    password: str = PASSWORD
    port: int = 0
    _proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def root(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def dicomweb(self) -> str:
        """The DICOMweb base URL (``pneumonia score dicomweb:<this>``)."""
        return f"{self.root}/dicom-web"

    def start(self, timeout: float = 30.0) -> Orthanc:
        found = find_orthanc()
        if isinstance(found, str):
            raise RuntimeError(found)
        binary, plugin = found
        self.port = free_port()
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "pneumonia-tests",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "DicomServerEnabled": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "HttpsVerifyPeers": True,
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        self._log = (self.folder / "orthanc.log").open("wb")
        self._proc = subprocess.Popen(
            [binary, str(cfg)], stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self._proc.returncode}: {self.log_tail()}"
                )
            try:
                self.get("/dicom-web/studies")
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout:g} s: {self.log_tail()}")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 2000) -> str:
        path = self.folder / "orthanc.log"
        return path.read_text(errors="replace")[-n:] if path.is_file() else ""

    def _request(self, path: str, data: bytes | None = None, method: str = "GET") -> bytes:
        auth = b64encode(f"{self.user}:{self.password}".encode()).decode()
        req = urllib.request.Request(
            self.root + path, data=data, method=method, headers={"Authorization": f"Basic {auth}"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return bytes(r.read())

    def get(self, path: str) -> Any:
        """Orthanc's REST API (JSON)."""
        return json.loads(self._request(path))

    def post(self, path: str, body: Any) -> Any:
        """POST JSON to Orthanc's REST API (JSON answer)."""
        return json.loads(self._request(path, json.dumps(body).encode(), "POST"))

    def upload(self, dicom: bytes) -> None:
        """Store one DICOM file as it is (Orthanc's REST API keeps the bytes)."""
        self._request("/instances", dicom, "POST")

    def delete_instance(self, sop: str) -> None:
        """Delete the instance with this SOPInstanceUID."""
        (found,) = json.loads(self._request("/tools/lookup", sop.encode(), "POST"))
        self._request(f"/instances/{found['ID']}", method="DELETE")

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])


def film_dicom(
    pixels: Any,
    *,
    study: str,
    series: str | None = None,
    sop: str | None = None,
    modality: str = "CR",
    body_part: str | None = "CHEST",
    view: str | None = "PA",
    study_date: str = "20260101",
    study_time: str = "080000",
    patient: tuple[str, str] = ("Doe^Jane", "PATIENT-SECRET-0042"),
    bits: int = 12,
    **attrs: Any,
) -> bytes:
    """A CR/DX film as a PACS holds one: ``pixels`` (2-D; uint8 is scaled to ``bits``; None: an
    instance without pixel data) with
    study, series and instance UIDs, date and time, body part and view (None leaves either
    attribute out), and patient fields that must never be logged."""
    import numpy as np
    from pydicom.uid import generate_uid

    arr = None if pixels is None else np.asarray(pixels)
    if arr is not None and arr.dtype == np.uint8:
        arr = arr.astype(np.uint16) << (bits - 8)
    extra: dict[str, Any] = {
        "StudyInstanceUID": study,
        "SeriesInstanceUID": series or generate_uid(),
        "StudyDate": study_date,
        "StudyTime": study_time,
        "AccessionNumber": "ACC-" + study[-6:],
        "Modality": modality,
        "InstanceNumber": 1,
        "SeriesNumber": 1,
        **attrs,
    }
    if body_part is not None:
        extra["BodyPartExamined"] = body_part
    if view is not None:
        extra["ViewPosition"] = view
    data = dicom_bytes(arr, bits=bits, patient=patient, **extra)
    if sop is None:
        return data
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
