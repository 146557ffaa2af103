"""onnxruntime session options against the service's peak memory and latency (issue 23).

Starts ``pneumonia serve`` once per variant, each with one option changed from what
``pneumonia.predictor.open_session`` sets (the baseline row is open_session as it is), and
measures what bench_serve.py measures (its ``bench_server``, on the same full-size JPEG):
cold start to the first 200 from /predict, peak RSS of the server's process tree (the larger
of the 50 ms samples and the summed VmHWM), sequential p50/p95, server CPU per request, and
requests per second with 4 clients. Variants are interleaved over ``--rounds`` rounds so that a
busy machine slows each alike; the table gives each figure's median over the rounds.

A variant is applied in the server process by wrapping ``onnxruntime.InferenceSession``: the
options object open_session built is changed just before the session opens, so every other
option stays the project's.

    .venv/bin/python benchmarks/bench_session.py [--model m.onnx] [--rounds 3] [--json out.json]

Prints one Markdown table to stdout; progress goes to stderr. Loopback only; bounded waits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench_serve import REPO, ServerSpec, _get, bench_server, make_upload, median_result
from common import MB, logger

log = logger("bench_session")

#: Each variant: a name, SessionOptions attributes to set, session config entries to add, and
#: environment variables of the process. The baseline is open_session unchanged. The last two
#: are not session options but glibc's mmap threshold, which serve/heap.py fixes at 64 KiB
#: (its environment variable overrides that): the page faults it costs each request go with
#: the memory the session options move.
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline (open_session)": {},
    "enable_mem_pattern on": {"attrs": {"enable_mem_pattern": True}},
    "enable_cpu_mem_arena off": {"attrs": {"enable_cpu_mem_arena": False}},
    "prepacking off": {"config": {"session.disable_prepacking": "1"}},
    "intra_op_num_threads 1": {"attrs": {"intra_op_num_threads": 1}},
    "intra-op spinning on": {"config": {"session.intra_op.allow_spinning": "1"}},
    "inter_op_num_threads 2": {"attrs": {"inter_op_num_threads": 2}},
    "graph optimization basic": {"attrs": {"graph_optimization_level": "ORT_ENABLE_BASIC"}},
    "graph optimization extended": {"attrs": {"graph_optimization_level": "ORT_ENABLE_EXTENDED"}},
    "malloc mmap threshold 1 MiB": {"env": {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}},
    "malloc mmap threshold 4 MiB": {"env": {"MALLOC_MMAP_THRESHOLD_": str(4 << 20)}},
    "malloc mmap threshold 256 KiB": {"env": {"MALLOC_MMAP_THRESHOLD_": str(256 << 10)}},
    "malloc arenas 2": {"env": {"MALLOC_ARENA_MAX": "2"}},
}

# Wraps InferenceSession so that the variant (argv[1]) changes the options open_session built.
_WRAP = """
import json, sys
import onnxruntime as ort
variant = json.loads(sys.argv[1])
_open = ort.InferenceSession
def _session(source, sess_options=None, **kw):
    for key, value in variant.get("attrs", {}).items():
        if key == "graph_optimization_level":
            value = getattr(ort.GraphOptimizationLevel, value)
        setattr(sess_options, key, value)
    for key, value in variant.get("config", {}).items():
        sess_options.add_session_config_entry(key, value)
    return _open(source, sess_options=sess_options, **kw)
ort.InferenceSession = _session
"""
# Runs in the server process: the service as `pneumonia serve` starts it.
_SERVER = (
    _WRAP
    + """
from pneumonia.cli import main
sys.exit(main(["serve"]))
"""
)
# Runs in a fresh process per variant: the service's heap setting and imports, then the
# session alone (argv[2]: the model, argv[3]: threads): resident memory before it opens, the
# kernel's peak (VmHWM) while it opens and over 25 runs of one image, and the run's median ms.
# argv[4] "early": the session opens before the web stack is imported (the service imports
# it first), to see whether the order changes the peak.
_PROBE = (
    _WRAP
    + """
import statistics, time
from pathlib import Path
import numpy as np
from pneumonia.serve.heap import fix_mmap_threshold
fix_mmap_threshold()
from pneumonia.predictor import INPUT_NAME, open_session
early = sys.argv[4] == "early"
if not early:
    import pneumonia.serve.app
def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
before = kib("VmRSS")
sess = open_session(Path(sys.argv[2]), int(sys.argv[3]))
if early:  # the web stack imported after the session opened
    import pneumonia.serve.app
opened, opened_hwm = kib("VmRSS"), kib("VmHWM")
x = np.random.default_rng(0).random((1, *sess.get_inputs()[0].shape[1:]), dtype=np.float32)
names = [o.name for o in sess.get_outputs()]
times = []
for _ in range(25):
    t0 = time.perf_counter()
    sess.run(names, {INPUT_NAME: x})
    times.append(time.perf_counter() - t0)
print(json.dumps({"before_kib": before, "opened_kib": opened, "open_hwm_kib": opened_hwm,
                  "hwm_kib": kib("VmHWM"), "run_ms": statistics.median(times[5:]) * 1e3}))
"""
)
# Writes the graph as onnxruntime optimizes it at open_session's level (argv[1] -> argv[2]).
_SAVE_OPTIMIZED = """
import sys
from pathlib import Path
from pneumonia.predictor import import_onnxruntime, open_session
ort = import_onnxruntime()
_open = ort.InferenceSession
def _session(source, sess_options=None, **kw):
    sess_options.optimized_model_filepath = sys.argv[2]
    return _open(source, sess_options=sess_options, **kw)
ort.InferenceSession = _session
open_session(Path(sys.argv[1]), 1)
"""


#: What the service imports, in the order it first needs them: each group's resident memory and
#: modules, measured one after the other in one fresh process (``_IMPORTS``). The last rows are
#: the project's own modules on top of the libraries.
IMPORT_GROUPS = (
    ("numpy", "numpy"),
    ("Pillow", "PIL.Image"),
    ("onnxruntime", "onnxruntime"),
    ("fastapi (pydantic, starlette, opentelemetry-api, email)", "fastapi"),
    ("uvicorn (click, h11)", "uvicorn"),
    ("pydantic-settings (dotenv)", "pydantic_settings"),
    ("prometheus-client", "prometheus_client"),
    ("python-multipart", "python_multipart"),
    ("pneumonia: predictor, card, checks, preprocess", "pneumonia.predictor"),
    ("pneumonia: cli, serve", "pneumonia.cli,pneumonia.serve.app"),
)
#: Never to be imported by the service (tests/test_boundaries.py holds it to this too).
NOT_SERVING = ("torch", "matplotlib", "tqdm", "onnx", "sklearn", "pandas", "scipy", "pydicom")
_IMPORTS = """
import importlib, json, os, sys
from pneumonia.serve.heap import fix_mmap_threshold
fix_mmap_threshold()
def kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
rows, last = [["the interpreter, pneumonia/__init__, serve.heap", kib(), len(sys.modules)]], kib()
for label, names in json.loads(sys.argv[1]):
    n = len(sys.modules)
    for name in names.split(","):
        importlib.import_module(name)
    now = kib()
    rows.append([label, now - last, len(sys.modules) - n])
    last = now
banned = [m for m in json.loads(sys.argv[2]) if m in sys.modules]
print(json.dumps({"rows": rows, "total_kib": last, "modules": len(sys.modules), "banned": banned}))
"""


def imports() -> dict[str, Any]:
    """The service's imports, one group at a time (see ``IMPORT_GROUPS``)."""
    out = subprocess.run(
        [sys.executable, "-c", _IMPORTS, json.dumps(IMPORT_GROUPS), json.dumps(NOT_SERVING)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def import_table(runs: list[dict[str, Any]]) -> str:
    lines = ["| imported | RSS MB | modules |", "|---|---|---|"]
    for i, row in enumerate(runs[0]["rows"]):
        kib = statistics.median(r["rows"][i][1] for r in runs)
        sign = "" if i == 0 else "+"
        lines.append(f"| {row[0]} | {sign}{kib * 1024 / MB:.1f} | {row[2]} |")
    total = statistics.median(r["total_kib"] for r in runs) * 1024 / MB
    lines.append(f"| **all of the above** | **{total:.1f}** | {runs[0]['modules']} |")
    return "\n".join(lines)


#: The probe's extra row: the graph saved as onnxruntime optimized it, opened unoptimized (a
#: cache of the optimized model; the service would refuse it: its weights digest differs).
PRE_OPTIMIZED = "optimized copy, optimization off"
#: And the baseline with the session opened before the web stack's imports.
EARLY = "baseline, session opened before the web stack's imports"


def probe(model: Path, variant: dict[str, Any], early: bool = False) -> dict[str, Any]:
    """One fresh process: the session's memory and one-image run time (see ``_PROBE``)."""
    order = "early" if early else "late"
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(variant), str(model), "1", order],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1", **variant.get("env", {})},
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def probe_table(rows: dict[str, list[dict[str, Any]]]) -> str:
    def mb(rs: list[dict[str, Any]], key: str) -> str:
        return f"{statistics.median(r[key] for r in rs) * 1024 / MB:.1f}"

    lines = [
        "| variant | RSS before open MB | peak while opening MB | RSS after open MB "
        "| peak after 25 runs MB | one image, 1 thread, ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, rs in rows.items():
        lines.append(
            f"| {name} | {mb(rs, 'before_kib')} | {mb(rs, 'open_hwm_kib')} "
            f"| {mb(rs, 'opened_kib')} | {mb(rs, 'hwm_kib')} "
            f"| {statistics.median(r['run_ms'] for r in rs):.2f} |"
        )
    return "\n".join(lines)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def median(rows: list[dict[str, Any]], *keys: str) -> float | None:
    """The median over ``rows`` (bench_server results) of the figure at ``keys``."""
    return _get(median_result(rows), *keys) if rows else None


def fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    base = results.get("baseline (open_session)", [])
    b_peak, b_p50 = median(base, "peak_rss_mb"), median(base, "sequential", "p50_ms")
    lines = [
        "| variant | peak RSS MB | vs baseline | p50 ms | vs baseline | p95 ms | CPU ms/req "
        "| req/s (4 clients) | cold start s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        peak, p50 = median(rows, "peak_rss_mb"), median(rows, "sequential", "p50_ms")
        d_peak = None if peak is None or b_peak is None else peak - b_peak
        d_p50 = None if p50 is None or b_p50 is None else p50 / b_p50
        lines.append(
            f"| {name} | {fmt(peak)} | {'' if d_peak is None else f'{d_peak:+.1f}'} "
            f"| {fmt(p50)} | {'' if d_p50 is None else f'{d_p50:.2f}x'} "
            f"| {fmt(median(rows, 'sequential', 'p95_ms'))} "
            f"| {fmt(median(rows, 'sequential', 'server_cpu_ms_per_request'))} "
            f"| {fmt(median(rows, 'throughput', 'rps'))} "
            f"| {fmt(median(rows, 'cold_start_s'), 2)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="the ONNX model to serve (default: $MODEL_PATH, else artifacts/model.onnx)",
    )
    p.add_argument("--image", type=Path, default=None, help="upload this file instead")
    p.add_argument("--rounds", type=int, default=3, help="server starts per variant (median)")
    p.add_argument("--requests", type=int, default=60, help="sequential requests per start")
    p.add_argument("--warmup", type=int, default=5, help="requests before timing")
    p.add_argument("--clients", type=int, default=4, help="clients of the throughput test")
    p.add_argument("--duration", type=float, default=4.0, help="seconds of the throughput test")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        metavar="NAME",
        help=f"which variants (default all: {', '.join(repr(v) for v in VARIANTS)})",
    )
    p.add_argument(
        "--skip-servers", action="store_true", help="only the session probe (no server starts)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write every measurement here")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.requests < 1:
        p.error("--rounds and --requests must be >= 1")
    model = (
        a.model or Path(os.environ.get("MODEL_PATH") or REPO / "artifacts" / "model.onnx")
    ).resolve()
    if not model.is_file():
        p.error(f"model {model} does not exist; pass --model or set MODEL_PATH")
    args = argparse.Namespace(
        start_timeout=300.0,
        request_timeout=120.0,
        warmup=a.warmup,
        clients=a.clients,
        duration=a.duration,
        max_requests=20_000,
    )
    load_before = load_average()
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in a.variants}
    probes: dict[str, list[dict[str, Any]]] = {v: [] for v in [*a.variants, PRE_OPTIMIZED, EARLY]}
    with tempfile.TemporaryDirectory(prefix="bench_session_") as tmp:
        work = Path(tmp)
        optimized = work / "optimized.onnx"
        subprocess.run(
            [sys.executable, "-c", _SAVE_OPTIMIZED, str(model), str(optimized)],
            capture_output=True,
            timeout=300,
            check=True,
        )
        for _ in range(a.rounds):
            for name in a.variants:
                probes[name].append(probe(model, VARIANTS[name]))
            off = {"attrs": {"graph_optimization_level": "ORT_DISABLE_ALL"}}
            probes[PRE_OPTIMIZED].append(probe(optimized, off))
            probes[EARLY].append(probe(model, {}, early=True))
        import_runs = [imports() for _ in range(a.rounds)]
        log("session probe done")
        up = make_upload(a.image, work)
        log(f"upload: {up.size[0]}x{up.size[1]}, {len(up.data):,} bytes ({up.source})")
        for rnd in range(0 if a.skip_servers else a.rounds):
            for name in a.variants:
                spec = ServerSpec(
                    name=f"{name} #{rnd + 1}",
                    cmd=[sys.executable, "-c", _SERVER, json.dumps(VARIANTS[name])],
                    # numpy is imported before cli.main could set OPENBLAS_NUM_THREADS (it
                    # does for `pneumonia serve`), so set it as the service runs it.
                    env={
                        "MODEL_PATH": str(model),
                        "OPENBLAS_NUM_THREADS": "1",
                        **VARIANTS[name].get("env", {}),
                    },
                    cwd=REPO,
                    requests=a.requests,
                )
                results[name].append(bench_server(spec, up, args, work))
    load_after = load_average()
    if not a.skip_servers:
        print(table(results))
        print(
            f"\nThe service: {a.rounds} start(s) per variant, {a.requests} sequential requests "
            f"each, medians over starts. Upload: {up.size[0]}x{up.size[1]} JPEG, "
            f"{len(up.data):,} bytes ({up.source}).\n"
        )
    print(probe_table(probes))
    print(
        f"\nThe session alone: one fresh process per variant and round ({a.rounds}), after the "
        f"service's imports and heap setting; medians. Model: {model.name} "
        f"({model.stat().st_size / 1e6:.2f} MB). {os.cpu_count()} CPUs; load average "
        f"{load_before} before, {load_after} after."
    )
    print("\n" + import_table(import_runs))
    banned = sorted({m for r in import_runs for m in r["banned"]})
    print(
        f"\nThe imports: one fresh process, the groups imported in this order; medians of "
        f"{a.rounds}. Of {', '.join(NOT_SERVING)}: "
        + (f"LOADED: {', '.join(banned)}." if banned else "none loaded.")
    )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(
            json.dumps(
                {"model": str(model), "servers": results, "probes": probes, "imports": import_runs},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
