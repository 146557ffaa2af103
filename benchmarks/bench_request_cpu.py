"""Where one /predict request's CPU time goes, on one core (issue 23).

The total is measured on a real server: ``pneumonia serve`` pinned to one core
(``taskset -c 0``, so onnxruntime runs one thread), the server tree's utime + stime from /proc
over ``--requests`` sequential uploads of bench_serve.py's full-size JPEG (its ``bench_server``).
The parts are timed in this process, pinned to the same core and with the service's malloc
setting (serve/heap.py), with ``time.process_time`` over ``--repeats`` runs each, through the
functions the service calls:

- receive and parse: ``serve.upload.read_uploads`` on the multipart body, fed in 64 KiB chunks
  (the bytes' arrival on the socket and HTTP parsing are uvicorn's, in "framework");
- decode: ``preprocess.decode_image`` (reduced-scale JPEG decoding, gray conversion);
- resize: ``preprocess.resize_gray`` to the model's input;
- inference: the onnxruntime session's ``run`` on that input (one thread, as on one core),
  as ``Predictor.scores`` runs it;
- input check: ``Predictor.input_checks`` (image checks, feature guard, frontal head) and the
  calibrated probability;
- encode: the route's answer validated against ``PredictionResponse`` and dumped to JSON, as
  FastAPI does with a response model;
- framework: the rest of the total (uvicorn's socket and HTTP handling, middleware, routing,
  the worker-thread hop, logging, metrics).

At 0.1 vCPU the quota stretches each CPU millisecond to ten of wall time, so the last column is
10x the CPU column.

    .venv/bin/python benchmarks/bench_request_cpu.py [--model m.onnx] [--requests 200] [--runs 3]

Prints one Markdown table to stdout; progress goes to stderr. Linux only (/proc, taskset).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_serve import REPO, VCPU_FRACTION, ServerSpec, Upload, bench_server, make_upload
from common import logger, ours_command

log = logger("bench_request_cpu")
CHUNK = 65536  # bytes per body chunk handed to the parser (uvicorn reads the socket in 64 KiB)


def cpu_ms(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    """Mean process CPU milliseconds of one call of ``fn``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append((time.process_time() - t0) * 1e3)
    return statistics.fmean(times)


def parse_ms(up: Upload, repeats: int) -> float:
    """Mean CPU ms of ``read_uploads`` on the upload's multipart body, on one event loop."""
    from starlette.requests import Request

    from pneumonia.serve.upload import read_uploads

    chunks = [up.body[i : i + CHUNK] for i in range(0, len(up.body), CHUNK)]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/predict",
        "headers": [
            (b"content-type", up.content_type.encode()),
            (b"content-length", str(len(up.body)).encode()),
        ],
    }

    async def once() -> None:
        it = iter(chunks)

        async def receive() -> dict[str, Any]:
            chunk = next(it, b"")
            return {"type": "http.request", "body": chunk, "more_body": chunk != b""}

        (got,) = await read_uploads(Request(scope, receive), "file", 1, 60.0)
        assert got.data == up.data

    async def run() -> float:
        for _ in range(3):
            await once()
        total = 0.0
        for _ in range(repeats):
            t0 = time.process_time()
            await once()
            total += time.process_time() - t0
        return total / repeats * 1e3

    return asyncio.run(run())


def stage_ms(model: Path, up: Upload, repeats: int) -> dict[str, float]:
    """Mean CPU ms of each in-process step, one onnxruntime thread."""
    from pydantic import TypeAdapter

    from pneumonia.calibration import calibrated_probability
    from pneumonia.predictor import INPUT_NAME, Predictor
    from pneumonia.preprocess import decode_image, resize_gray
    from pneumonia.serve.heap import fix_mmap_threshold
    from pneumonia.serve.schemas import PredictionResponse

    # As the service: every buffer over 64 KiB is its own mapping, given back on free, so each
    # request pays its page faults (in the step that allocates, not in "framework").
    fix_mmap_threshold()
    pred = Predictor(model, threads=1, refuse=False)
    gray, stats = decode_image(up.data, draft_size=pred.spec.size)
    x = resize_gray(gray, pred.spec)[None]
    names = list(pred.output_names)
    outs = pred.session.run(names, {INPUT_NAME: x})
    logits, feats = outs[0], (outs[2] if len(outs) > 2 else None)

    def check() -> Any:
        probs = calibrated_probability(logits.astype("float64"), pred.temperature, pred.bias)
        return probs, pred.input_checks(x, feats, [stats])

    answer = pred.predict_bytes(up.data)
    body = {
        "filename": "upload.jpeg",
        **answer.to_dict(),
        "model": pred.identity(),
        "processing_ms": 12.34,
        "request_id": "0123456789abcdef0123456789abcdef",
    }
    adapter = TypeAdapter(PredictionResponse)

    def encode() -> bytes:
        return adapter.dump_json(adapter.validate_python(body), exclude_none=True, by_alias=True)

    return {
        "receive and parse": parse_ms(up, repeats),
        "decode": cpu_ms(lambda: decode_image(up.data, draft_size=pred.spec.size), repeats),
        "resize": cpu_ms(lambda: resize_gray(gray, pred.spec), repeats),
        "inference": cpu_ms(lambda: pred.session.run(names, {INPUT_NAME: x}), repeats),
        "input check": cpu_ms(check, repeats),
        "encode": cpu_ms(encode, repeats),
    }


WHAT = {
    "receive and parse": "serve.upload.read_uploads: multipart body to bytes",
    "decode": "preprocess.decode_image: JPEG at reduced scale, gray",
    "resize": "preprocess.resize_gray: bilinear to the model input",
    "inference": "onnxruntime session.run, one thread",
    "input check": "Predictor.input_checks (image checks, guard, frontal) + calibration",
    "encode": "PredictionResponse validation + JSON",
    "framework": "the rest: uvicorn, middleware, routing, thread hop, logs, metrics",
}


def table(total: float, parts: dict[str, float]) -> str:
    rows = {**parts, "framework": total - sum(parts.values())}
    lines = [
        "| step | what runs | CPU ms | share | wall ms at 0.1 vCPU |",
        "|---|---|---|---|---|",
    ]
    for name, ms in rows.items():
        lines.append(
            f"| {name} | {WHAT[name]} | {ms:.2f} | {ms / total:.0%} | {ms / VCPU_FRACTION:.0f} |"
        )
    lines.append(
        f"| **total** | server tree utime + stime per request | **{total:.2f}** | 100% "
        f"| {total / VCPU_FRACTION:.0f} |"
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
        help="the ONNX model (default: $MODEL_PATH, else artifacts/model.onnx)",
    )
    p.add_argument("--image", type=Path, default=None, help="upload this file instead")
    p.add_argument("--requests", type=int, default=200, help="sequential requests to the server")
    p.add_argument("--repeats", type=int, default=100, help="timed calls of each in-process step")
    p.add_argument("--core", type=int, default=0, help="the one core everything runs on")
    p.add_argument("--runs", type=int, default=3, help="whole runs; each figure's median")
    a = p.parse_args(argv)
    if min(a.requests, a.repeats, a.runs) < 1:
        p.error("--requests, --repeats and --runs must be >= 1")
    model = (
        a.model or Path(os.environ.get("MODEL_PATH") or REPO / "artifacts" / "model.onnx")
    ).resolve()
    if not model.is_file():
        p.error(f"model {model} does not exist; pass --model or set MODEL_PATH")
    taskset = shutil.which("taskset")
    if taskset is None:
        p.error("taskset not found (util-linux)")
    # The in-process steps on the server's core, numpy's BLAS on one thread as `serve` sets it.
    os.sched_setaffinity(0, {a.core})
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="bench_request_cpu_") as tmp:
        work = Path(tmp)
        up = make_upload(a.image, work)
        log(f"upload: {up.size[0]}x{up.size[1]}, {len(up.data):,} bytes ({up.source})")
        spec = ServerSpec(
            name="one core",
            cmd=[taskset, "-c", str(a.core), *ours_command()],
            env={"MODEL_PATH": str(model)},
            cwd=REPO,
            requests=a.requests,
        )
        args = argparse.Namespace(
            start_timeout=300.0,
            request_timeout=120.0,
            warmup=5,
            clients=1,
            duration=0.5,
            max_requests=1,
        )
        totals, p50s, runs = [], [], []
        for _ in range(a.runs):  # a busy machine: medians of whole runs
            served = bench_server(spec, up, args, work)
            if "error" in served:
                raise SystemExit(f"bench_request_cpu: the server failed: {served['error']}")
            totals.append(float(served["sequential"]["server_cpu_ms_per_request"]))
            p50s.append(float(served["sequential"]["p50_ms"]))
            runs.append(stage_ms(model, up, a.repeats))
        total = statistics.median(totals)
        parts = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(table(total, parts))
    print(
        f"\nModel: {model.name} ({model.stat().st_size / 1e6:.2f} MB). Upload: {up.size[0]}x"
        f"{up.size[1]} JPEG, {len(up.data):,} bytes ({up.source}). Total: {a.requests} "
        f"sequential requests, server p50 {statistics.median(p50s):.1f} ms wall on core "
        f"{a.core}; steps: mean of {a.repeats} calls each; medians of {a.runs} runs (totals "
        f"{', '.join(f'{t:.1f}' for t in totals)} ms). Load average {load_before} before, "
        f"{load_after} after ({os.cpu_count()} CPUs)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
