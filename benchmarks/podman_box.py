"""Podman on these machines, and the target box: 0.1 CPU and 256 MB.

Shared by benchmarks/container_check.py (our image) and benchmarks/container_original.py (the
re-created original TensorFlow stack). Standard library only, so that the checks run with any
Python 3.11 without the project's venv.

Why the flags (see the header of ../shared/tools/container-base.sh, which builds the stand-in
``python:3.11-slim`` base image and installs podman and runc): no container registry is
reachable, hence the local base image and ``--pull=never``; ``RUN`` steps need ``--isolation
chroot`` (crun refuses this machine's hybrid cgroups); pip inside the build uses the host's
certificates and pip config, mounted read-only, over the host network; ``podman run`` needs
runc and ulimits no higher than the host's; ``--format docker`` keeps ``HEALTHCHECK``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parents[1]
BASE_IMAGE = "docker.io/library/python:3.11-slim"
BASE_SCRIPT = REPO.parent / "shared" / "tools" / "container-base.sh"
#: The target box of the issue and of docker-compose.yml's `deploy` service.
MEMORY = "256m"
MEMORY_BYTES = 256 * 1024 * 1024
CPUS = "0.1"
MB = 1_000_000
#: Host files the build mounts read-only so that pip inside it reaches PyPI as the host does.
BUILD_MOUNTS = ("/etc/ssl/certs", "/etc/xdg/pip")


class Skip(Exception):
    """Podman cannot run here; the message says how to make it run."""


class CheckFailed(Exception):
    """A check of the container failed; the message says which and what was seen."""


def log(tag: str, msg: str) -> None:
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


def run(
    args: Sequence[str], timeout: float, check: bool = True, stream: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run a command with a hard time limit; raise CheckFailed on a non-zero exit if check.

    stream: its output goes to this process's stderr as it comes (a build's progress)
    instead of being captured.
    """
    out = sys.stderr if stream else subprocess.PIPE
    try:
        proc = subprocess.run(
            list(args), stdout=out, stderr=out, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise CheckFailed(f"`{' '.join(args[:4])} ...` did not finish in {timeout:.0f} s") from exc
    if check and proc.returncode != 0:
        said = "" if stream else f":\n{(proc.stdout + proc.stderr)[-3000:]}"
        raise CheckFailed(f"`{' '.join(args)}` exited with {proc.returncode}{said}")
    return proc


def ensure_podman(base_script: Path, tag: str) -> None:
    """Make podman and the base image available, or raise Skip saying how.

    Runs the base script when it exists (idempotent: it installs podman, runc and debootstrap
    with apt when they are missing and builds the base image once); else needs podman and
    the base image already there.
    """
    hint = (
        f"run ../shared/tools/container-base.sh (looked for at {base_script}) on a Debian "
        "machine that reaches the Debian and PyPI registries "
        f"(it installs podman and runc and builds {BASE_IMAGE} from Debian packages), or install "
        f"podman and runc and `podman pull {BASE_IMAGE}` where a container registry is reachable"
    )
    if base_script.is_file():
        log(tag, f"base image: {base_script} (installs podman once, builds the base once)")
        try:
            proc = run(["bash", str(base_script)], timeout=1200, check=False)
        except CheckFailed as exc:
            raise Skip(f"{exc}; {hint}") from exc
        if proc.returncode != 0:
            raise Skip(f"{base_script} failed:\n{proc.stderr[-2000:]}\n{hint}")
    if shutil.which("podman") is None:
        raise Skip(f"podman is not installed; {hint}")
    if shutil.which("runc") is None:
        raise Skip(f"runc is not installed (crun refuses hybrid cgroups); {hint}")
    info = run(["podman", "info", "--format", "{{.Host.CgroupsVersion}}"], 120, check=False)
    if info.returncode != 0:
        raise Skip(f"podman cannot run here: {info.stderr.strip()[-500:]}; {hint}")
    if run(["podman", "image", "exists", BASE_IMAGE], 60, check=False).returncode != 0:
        raise Skip(f"the base image {BASE_IMAGE} is missing; {hint}")


def build(context: Path, tag: str, dockerfile: Path | None, timeout: float, who: str) -> float:
    """``podman build`` with the flags that work here; returns the seconds it took.

    ``--layers=false`` leaves no intermediate images behind (the price: no layer cache).
    """
    args = [
        "podman", "build", "--isolation", "chroot", "--network", "host", "--pull=never",
        "--format", "docker", "--layers=false", "--force-rm",
    ]  # fmt: skip
    for path in BUILD_MOUNTS:
        if Path(path).exists():
            args += ["-v", f"{path}:{path}:ro"]
    if dockerfile is not None:
        args += ["-f", str(dockerfile)]
    args += ["-t", tag, str(context)]
    log(who, f"building {tag} from {context} (at most {timeout:.0f} s)")
    t0 = time.monotonic()
    run(args, timeout, stream=True)
    return time.monotonic() - t0


def image_bytes(tag: str) -> int:
    return int(run(["podman", "image", "inspect", "--format", "{{.Size}}", tag], 60).stdout)


def ulimits(want: int = 4096) -> dict[str, int]:
    """nofile and nproc no higher than this process's own hard limits (no CAP_SYS_RESOURCE)."""
    limits = {}
    for name, res in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        hard = resource.getrlimit(res)[1]
        limits[name] = want if hard == resource.RLIM_INFINITY else min(want, hard)
    return limits


def host_ulimits() -> list[str]:
    """The --ulimit flags of ulimits()."""
    return [f for name, n in ulimits().items() for f in ("--ulimit", f"{name}={n}:{n}")]


def run_limited(tag: str, name: str, env: dict[str, str], who: str) -> float:
    """Start the image detached on the target box (host network); returns the start time."""
    args = ["podman", "--runtime", "runc", "run", "-d", "--name", name, "--network", "host"]
    args += host_ulimits()
    args += ["--memory", MEMORY, "--memory-swap", MEMORY, "--cpus", CPUS]
    for key, value in env.items():
        args += ["-e", f"{key}={value}"]
    args.append(tag)
    log(who, f"starting {name}: --memory {MEMORY} --cpus {CPUS}")
    t0 = time.monotonic()
    run(args, 120)
    return t0


def state(name: str) -> dict[str, object]:
    """The container's State (Status, Running, ExitCode, OOMKilled, Pid, ...)."""
    out = run(["podman", "inspect", "--format", "{{json .State}}", name], 60).stdout
    parsed: dict[str, object] = json.loads(out)
    return parsed


def cgroup_dir(pid: int) -> tuple[Path, int]:
    """The memory cgroup folder of a process and the cgroup version (1 or 2)."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return cgroup_from_lines(lines, Path("/sys/fs/cgroup"))


def cgroup_from_lines(lines: Sequence[str], root: Path) -> tuple[Path, int]:
    """Parse /proc/PID/cgroup: the v1 memory controller's line if any, else the v2 line."""
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return root / "memory" / path.lstrip("/"), 1
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            unified = root / "unified" if (root / "unified").is_dir() else root
            return unified / path.lstrip("/"), 2
    raise CheckFailed(f"no memory cgroup in {list(lines)}")


@dataclass
class CgroupMemory:
    """The container's memory cgroup, read from the host while the container lives."""

    path: Path
    version: int

    def _read(self, v1: str, v2: str) -> str:
        return (self.path / (v1 if self.version == 1 else v2)).read_text()

    def usage(self) -> int:
        return int(self._read("memory.usage_in_bytes", "memory.current"))

    def peak(self) -> int:
        """The kernel's high-water mark of the cgroup's charged memory (anon + page cache)."""
        return int(self._read("memory.max_usage_in_bytes", "memory.peak"))

    def limit(self) -> int:
        raw = self._read("memory.limit_in_bytes", "memory.max").strip()
        return -1 if raw == "max" else int(raw)

    def oom_kills(self) -> int:
        """OOM kills inside the cgroup so far (v1: memory.oom_control, v2: memory.events)."""
        text = self._read("memory.oom_control", "memory.events")
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def stat(self, key: str) -> int:
        """One field of memory.stat (v1 `total_rss`, v2 `anon`, ...), 0 when absent."""
        for line in (self.path / "memory.stat").read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
        return 0


def cgroup_memory(name: str) -> CgroupMemory:
    pid = int(str(state(name)["Pid"]))
    if pid <= 0:
        raise CheckFailed(f"container {name} has no process (state {state(name)['Status']})")
    path, version = cgroup_dir(pid)
    return CgroupMemory(path, version)


def cpu_quota(name: str) -> float | None:
    """The container's CPU quota in CPUs from its cgroup (None when unlimited or unreadable)."""
    pid = int(str(state(name)["Pid"]))
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        base = Path("/sys/fs/cgroup")
        if "cpu" in controllers.split(","):
            d = base / controllers / path.lstrip("/")
            if not d.is_dir():
                d = base / "cpu" / path.lstrip("/")
            quota = int((d / "cpu.cfs_quota_us").read_text())
            period = int((d / "cpu.cfs_period_us").read_text())
            return None if quota < 0 else quota / period
        if hierarchy == "0" and controllers == "":
            f = base / path.lstrip("/") / "cpu.max"
            if f.is_file():
                q, p = f.read_text().split()
                return None if q == "max" else int(q) / int(p)
    return None


def logs(name: str, n: int = 40) -> str:
    proc = run(["podman", "logs", "--tail", str(n), name], 60, check=False)
    return (proc.stdout + proc.stderr).strip()


@contextmanager
def cleanup(containers: Sequence[str], images: Sequence[str], keep_image: bool) -> Iterator[None]:
    """Remove the named containers and images on the way out, whatever happened.

    SIGTERM and SIGHUP become SystemExit so that the removal also runs when the check is
    killed by a time limit (as ``trap ... EXIT`` would in a shell script).
    """

    def _exit(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, _exit) for s in (signal.SIGTERM, signal.SIGHUP)}
    removals = [["podman", "rm", "-f", "-t", "5", name] for name in containers]
    if not keep_image:
        removals += [["podman", "rmi", "-f", tag] for tag in images]
    try:
        yield
    finally:
        for args in removals:
            try:  # a large image takes minutes to delete on a busy disk
                run(args, 600, check=False)
            except CheckFailed as exc:
                log("cleanup", f"{exc}; remove it by hand")
        for s, handler in previous.items():
            signal.signal(s, handler)


def required() -> bool:
    """In CI (CI=true) the container checks must run; elsewhere they may skip."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
