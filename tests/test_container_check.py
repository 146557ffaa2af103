"""benchmarks/container_check.py and podman_box.py, the parts that need no podman: the skip
(and CI's refusal to skip) where podman cannot run, and reading a container's memory cgroup.
`make container` itself builds and runs the image (README "Container")."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from conftest import REPO

BENCH = REPO / "benchmarks"


@pytest.fixture()
def box(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """benchmarks/podman_box.py (standard library only), imported from its file."""
    spec = importlib.util.spec_from_file_location("podman_box", BENCH / "podman_box.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "podman_box", module)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


def _check_without_podman(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = str(tmp_path)  # no podman, no runc on it
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [
            sys.executable,
            str(BENCH / "container_check.py"),
            *("--base-script", str(tmp_path / "no"), "--compose", "none"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_skips_without_podman_and_says_how_to_enable_it(tmp_path: Path) -> None:
    proc = _check_without_podman(tmp_path, ci=None)
    assert proc.returncode == 0, proc.stderr
    assert "container check SKIPPED: podman is not installed" in proc.stdout
    assert "container-base.sh" in proc.stdout and "podman pull" in proc.stdout


def test_check_fails_without_podman_in_ci(tmp_path: Path) -> None:
    proc = _check_without_podman(tmp_path, ci="true")
    assert proc.returncode == 1
    assert "container check FAILED: podman cannot run" in proc.stderr


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        # cgroup v1 (this machine's hybrid layout): the memory controller's own hierarchy.
        (
            [
                "12:cpu,cpuacct:/machine.slice/libpod-ab.scope",
                "4:memory:/machine.slice/libpod-ab.scope",
                "0::/",
            ],
            ("memory/machine.slice/libpod-ab.scope", 1),
        ),
        # cgroup v2 only: the unified hierarchy at the root.
        (
            ["0::/machine.slice/libpod-cd.scope/container"],
            ("machine.slice/libpod-cd.scope/container", 2),
        ),
    ],
)
def test_memory_cgroup_of_a_process(
    box: ModuleType, tmp_path: Path, lines: list[str], expected: tuple[str, int]
) -> None:
    path, version = box.cgroup_from_lines(lines, tmp_path)
    assert (path, version) == (tmp_path / expected[0], expected[1])


def test_memory_cgroup_reads_peak_and_oom_kills_of_either_version(
    box: ModuleType, tmp_path: Path
) -> None:
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "memory.max_usage_in_bytes").write_text("83886080\n")
    (v1 / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    (v1 / "memory.stat").write_text("cache 10\nrss 5\ntotal_rss 7\n")
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.peak").write_text("1000\n")
    (v2 / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\n")
    (v2 / "memory.stat").write_text("anon 42\nfile 9\n")
    one, two = box.CgroupMemory(v1, 1), box.CgroupMemory(v2, 2)
    assert (one.peak(), one.oom_kills(), one.stat("total_rss")) == (83886080, 1, 7)
    assert (two.peak(), two.oom_kills(), two.stat("anon")) == (1000, 0, 42)
