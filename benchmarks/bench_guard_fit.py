"""How long the input-check fit (``pneumonia guard fit``) takes: onnxruntime (what it runs now)
against torch's eager kernels (what it ran before issue 21), on the same run and films.

A run of the shipped architecture (the default configuration: EfficientNet-Lite0, 160 px, one
member) is trained on a subset of the data (``--max-images``, one epoch: the weights do not
change the cost) into ``--run`` unless it is there already. The fit is then timed whole both
ways, one after the other, in three parts: the fixed cost (tracing the features to ONNX and
opening the session, once whatever the data), the feature passes (each training-split film
once, each validation film as it is and under every simulated site shift) and the rest (reading
films, the shifts, fitting the statistics). The shipped configuration's time is projected as the
fixed cost plus the other two in proportion to its 22,507 feature passes (3,747 training films;
938 validation films, 20 ways).

Usage (the figures in docs/benchmarks.md, "Input-check fit")::

    .venv/bin/python benchmarks/bench_guard_fit.py --data ../shared/data/chest_xray \\
        --run runs/guard-fit-subset --max-images 300 --threads 2 --json runs/bench_guard_fit.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

#: Feature passes of the shipped configuration's fit (docs/benchmarks.md).
SHIPPED_PASSES = 22_507


def _train(data: Path, out: Path, max_images: int, threads: int) -> None:
    from pneumonia.training.config import TrainConfig
    from pneumonia.training.train import train

    cfg = TrainConfig(max_images=max_images, epochs=1, threads=threads)
    train(cfg, data, out, progress=False)


def _eager(net: Any, input_shape: tuple[int, ...], threads: int) -> Any:
    """The pre-issue-21 path: the torch network, eagerly, a chunk at a time."""
    from pneumonia.training.guard_fit import embed_inputs

    return lambda x: embed_inputs(net, x)


def time_fit(run: Path, engine: str, threads: int) -> dict[str, float]:
    """Seconds of one whole fit: ``total``, ``fixed`` (building the features function) and
    ``passes`` (inside it)."""
    import torch

    from pneumonia.training import guard_fit

    torch.set_num_threads(threads)
    original = guard_fit.onnx_features
    build = _eager if engine == "torch" else original
    spent = {"fixed": 0.0, "passes": 0.0}

    def timed(net: Any, input_shape: tuple[int, ...], threads: int) -> Any:
        t0 = time.perf_counter()
        fn = build(net, input_shape, threads)
        spent["fixed"] += time.perf_counter() - t0

        def features(x: Any) -> Any:
            t1 = time.perf_counter()
            out = fn(x)
            spent["passes"] += time.perf_counter() - t1
            return out

        return features

    guard_fit.onnx_features = timed  # type: ignore[assignment]
    try:
        t0 = time.perf_counter()
        guard_fit.fit_run_guard(run)
        return {"total": time.perf_counter() - t0, **spent}
    finally:
        guard_fit.onnx_features = original


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/chest_xray"))
    ap.add_argument(
        "--run", type=Path, required=True, help="the subset run (trained here if missing)"
    )
    ap.add_argument("--max-images", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from pneumonia.shifts import SITE_SHIFTS
    from pneumonia.training.config import TrainConfig
    from pneumonia.training.guard_fit import recorded_split
    from pneumonia.training.run import RunFolder

    if not RunFolder(a.run).calibration.is_file():
        t0 = time.perf_counter()
        _train(a.data, a.run, a.max_images, a.threads)
        print(f"trained a subset run in {time.perf_counter() - t0:.0f} s")
    split = recorded_split(a.run)
    passes = len(split.train) + len(split.val) * (1 + len(SITE_SHIFTS))
    cfg = TrainConfig.load(RunFolder(a.run).config)
    scale = SHIPPED_PASSES / passes
    result: dict[str, Any] = {
        "arch": cfg.model.arch,
        "size": cfg.preprocess.size,
        "members": len(cfg.seeds),
        "threads": a.threads,
        "train_films": len(split.train),
        "validation_films": len(split.val),
        "feature_passes": passes,
    }
    for engine in ("onnxruntime", "torch"):
        t = time_fit(a.run, engine, a.threads)
        rest = t["total"] - t["fixed"] - t["passes"]
        result[engine] = {
            "seconds": round(t["total"], 1),
            "fixed_seconds": round(t["fixed"], 1),
            "ms_per_feature_pass": round(1000 * t["passes"] / passes, 1),
            "other_seconds": round(rest, 1),
            "projected_shipped_minutes": round((t["fixed"] + (t["passes"] + rest) * scale) / 60, 1),
        }
        print(engine, json.dumps(result[engine]), flush=True)
    result["speedup_per_pass"] = round(
        result["torch"]["ms_per_feature_pass"] / result["onnxruntime"]["ms_per_feature_pass"], 1
    )
    print(json.dumps(result, indent=1))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
