"""The re-created original stack as a container on the target box (`make container-original`).

Builds benchmarks/original_stack/Dockerfile (TensorFlow 2.19 + Keras, FastAPI, the
8.4M-parameter CNN with random weights built at image build time) with the same podman flags
as benchmarks/container_check.py, runs it with the same ``--memory 256m --cpus 0.1`` and
watches it for at most --watch-s seconds: every half second the container's state and its
memory cgroup (usage, high-water mark, anonymous memory), and whether ``POST /predict``
answers. Expected on this machine: the kernel's memory-cgroup OOM killer ends it before it
ever answers. Reports when it died, how (exit code, OOMKilled, the cgroup's oom_kill count),
the memory it had reached, and the kernel's OOM line when dmesg is readable.

Prints a Markdown table to stdout (progress to stderr); --json writes every figure. The
container and the image are removed at the end, whatever happened. Exits 0 when the run was
observed to its end (killed or answering), 1 on a failure of the harness itself; skips like
container_check.py when podman cannot run here.

    python3 benchmarks/container_original.py --json runs/container_original.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import podman_box as box
from common import free_port
from container_check import Client, Part, films_from_image, shared_films

TAG = "original"
CONTEXT = box.REPO / "benchmarks" / "original_stack"


def log(msg: str) -> None:
    box.log(TAG, msg)


def watch(name: str, port: int, big: bytes, t0: float, watch_s: float) -> dict[str, Any]:
    """Sample state and memory until the container stops, answers /predict, or watch_s."""
    mem = box.cgroup_memory(name)
    seen: dict[str, Any] = {"peak_mb": 0.0, "anon_mb": 0.0, "oom_kills": 0, "samples": 0}
    client = Client(port, timeout=5)
    next_poll = 0.0
    while True:
        elapsed = time.monotonic() - t0
        try:
            peak = mem.peak()
            anon = mem.stat("total_rss" if mem.version == 1 else "anon")
            seen["oom_kills"] = max(seen["oom_kills"], mem.oom_kills())
            seen["peak_mb"] = max(seen["peak_mb"], round(peak / box.MB, 1))
            seen["anon_mb"] = max(seen["anon_mb"], round(anon / box.MB, 1))
            seen["samples"] += 1
        except OSError:  # the cgroup went away with the container
            pass
        st = box.state(name)
        if not st.get("Running"):
            seen.update(
                outcome="stopped",
                stopped_after_s=round(elapsed, 1),
                exit_code=st.get("ExitCode"),
                oom_killed=st.get("OOMKilled"),
            )
            return seen
        if elapsed >= next_poll:  # the model loads at import: nothing answers before that
            next_poll = elapsed + 2
            try:
                status, payload = client.post("/predict", [Part("file", "big.jpeg", big)])
            except OSError:
                client.close()
            else:
                seen.update(outcome="answered", answered_after_s=round(elapsed, 1))
                seen["first_answer"] = f"{status} {payload[:200].decode(errors='replace')}"
                return seen
        if elapsed > watch_s:
            seen.update(outcome="still running, never answered", watched_s=round(elapsed, 1))
            return seen
        time.sleep(0.5)


def kernel_oom_line() -> str | None:
    """The kernel's last memory-cgroup OOM kill line, when dmesg is readable here."""
    proc = box.run(["dmesg"], 30, check=False)
    if proc.returncode != 0:
        return None
    hits = [ln for ln in proc.stdout.splitlines() if re.search(r"Killed process|oom-kill", ln)]
    return hits[-1].strip() if hits else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path)
    p.add_argument("--watch-s", type=float, default=180.0, help="longest watch (default 180)")
    p.add_argument("--build-timeout", type=float, default=1800.0)
    p.add_argument("--base-script", type=Path, default=box.BASE_SCRIPT)
    p.add_argument("--keep-image", action="store_true")
    args = p.parse_args(argv)
    if not 0 < args.watch_s <= 600:
        p.error("--watch-s must be in (0, 600]")
    try:
        box.ensure_podman(args.base_script, TAG)
    except box.Skip as exc:
        if box.required():
            print(f"original container FAILED: podman cannot run: {exc}", file=sys.stderr)
            return 1
        print(f"original container SKIPPED: {exc}")
        return 0
    suffix = uuid.uuid4().hex[:8]
    tag, name = f"localhost/pneumonia-original-check:{suffix}", f"pd-original-{suffix}"
    figures: dict[str, Any] = {}
    error = None
    with (
        tempfile.TemporaryDirectory(prefix="container-original-") as tmp,
        box.cleanup([name], [tag], args.keep_image),
    ):
        try:
            figures["build_s"] = round(box.build(CONTEXT, tag, None, args.build_timeout, TAG), 1)
            figures["image_mb"] = round(box.image_bytes(tag) / box.MB, 1)
            # The 1500x1200 JPEG of container_check.py, made by this image's numpy and Pillow.
            made = Path(tmp)
            made.chmod(0o777)
            films = shared_films()
            films_from_image(tag, made, films[0] if films else None, "make-upload")
            big = (made / "big.jpeg").read_bytes()
            port = free_port()
            t0 = box.run_limited(tag, name, {"PORT": str(port), "HOST": "127.0.0.1"}, TAG)
            figures.update(watch(name, port, big, t0, args.watch_s))
            figures["kernel"] = kernel_oom_line()
            figures["logs_tail"] = box.logs(name, 5)
        except (box.CheckFailed, OSError, ValueError, KeyError) as exc:
            error = f"{type(exc).__name__}: {exc}"
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"figures": figures, "error": error}, indent=2) + "\n")
    print(table(figures))
    if error:
        print(f"\noriginal container: harness FAILED: {error}")
        return 1
    return 0


def table(f: dict[str, Any]) -> str:
    if f.get("outcome") == "stopped":
        # Podman's OOMKilled and the cgroup's oom_kill count can both miss the kill here (the
        # cgroup goes with the container between two samples); the kernel's line does not.
        kernel_oom = "Memory cgroup out of memory" in str(f.get("kernel"))
        oom = (
            f.get("oom_killed") or f.get("oom_kills") or (f.get("exit_code") == 137 and kernel_oom)
        )
        how = "OOM-killed" if oom else "exited"
        outcome = (
            f"{how} {f['stopped_after_s']} s after start (exit code {f.get('exit_code')}), "
            "never answered"
        )
    elif f.get("outcome") == "answered":
        outcome = f"answered {f['answered_after_s']} s after start: {f.get('first_answer')}"
    else:
        outcome = str(f.get("outcome", "-"))
    rows = [
        ("Outcome", outcome),
        ("Memory cgroup high-water mark before it ended", f"{f.get('peak_mb', '-')} MB"),
        ("Anonymous memory (largest sample)", f"{f.get('anon_mb', '-')} MB"),
        ("cgroup oom_kill count (last sample)", f.get("oom_kills", "-")),
        ("Kernel log", f.get("kernel") or "not readable here"),
        ("Image size", f"{f.get('image_mb', '-')} MB"),
        ("Build time", f"{f.get('build_s', '-')} s"),
    ]
    lines = ["| Original stack at --memory 256m --cpus 0.1 | |", "| --- | --- |"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
