"""`pneumonia score dicomweb:URL --write-back` against a real Orthanc: the wall time of scoring
--instances films from the PACS and storing a report for each (target: 500 in at most 2
minutes), then of the same command again (nothing new to score or store).

Starts Orthanc and its DICOMweb plugin (Debian packages) on a free loopback port with its
storage in a temporary folder, uploads --instances films as 12-bit CR DICOM (real films of the
training split under --films, converted with pydicom, 2 per study; synthetic films where the
folder is absent), then runs the command as a user would, as its own process, with the
credentials in the environment. It checks that one report was stored per scored film, that the
PACS holds exactly that many reports after the rerun, and that the rerun scored nothing.

The official test set is never used. The model is --model, else $MODEL_PATH, else the shipped
artifacts/model.onnx. docs/pacs.md's figures come from::

    .venv/bin/python benchmarks/bench_pacs.py --instances 500

Prints a Markdown table to stdout (and --json writes the figures); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import Orthanc, film_dicom, logger, synthetic_film

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO.parent / "shared" / "data" / "chest_xray" / "train"
FILMS_PER_STUDY = 2

log = logger("bench_pacs")


def film_pixels(films: Path | None, n: int) -> list[Any]:
    """``n`` grayscale films (uint8 arrays): the folder's JPEGs in name order, repeated, or
    synthetic films of 1024x1024 where there is no folder."""
    import numpy as np
    from PIL import Image

    paths = sorted(films.rglob("*.jpeg")) if films is not None and films.is_dir() else []
    if not paths:
        log(f"no films under {films}: synthetic 1024x1024 films instead")
        return [np.asarray(synthetic_film((1024, 1024)))] * n
    # Spread over the classes: every k-th file of the sorted list.
    step = max(1, len(paths) // n)
    chosen = [paths[(i * step) % len(paths)] for i in range(n)]
    return [np.asarray(Image.open(p).convert("L")) for p in chosen]


def upload(pacs: Orthanc, pixels: list[Any], size: tuple[int, int] | None) -> tuple[float, int]:
    """Upload every film (resized to ``size``, width x height, if given), ``FILMS_PER_STUDY``
    to a study; return the seconds it took and the bytes uploaded."""
    import numpy as np
    from PIL import Image
    from pydicom.uid import generate_uid

    studies = [generate_uid() for _ in range(0, len(pixels), FILMS_PER_STUDY)]

    def one(i: int) -> int:
        date = f"202601{1 + (i // FILMS_PER_STUDY) % 28:02d}"
        film = pixels[i]
        if size is not None:  # resized here, one at a time: 500 full-size films would fill RAM
            film = np.asarray(Image.fromarray(film).resize(size, Image.Resampling.BICUBIC))
        data = film_dicom(film, study=studies[i // FILMS_PER_STUDY], study_date=date)
        pacs.upload(data)
        return len(data)

    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        total = sum(pool.map(one, range(len(pixels))))
    return time.monotonic() - start, total


def run_score(pacs: Orthanc, out: Path, args: argparse.Namespace) -> tuple[float, dict[str, Any]]:
    """Run the command; (its wall time, its JSON summary)."""
    cmd = [str(Path(sys.executable).with_name("pneumonia")), "score", f"dicomweb:{pacs.dicomweb}"]
    cmd += ["--out", str(out), "--write-back", "--no-progress"]
    if args.model:
        cmd += ["--model", str(args.model)]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    env = {**os.environ, "DICOMWEB_USER": pacs.user, "DICOMWEB_PASSWORD": pacs.password}
    start = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def per_film_costs(
    pacs: Orthanc, film: Any, model: Path | None, repeats: int = 10
) -> dict[str, float]:
    """Milliseconds per step for one film (``film``: a uint8 array), one step at a time in this
    process: WADO-RS retrieval with and without gzip, splitting the answer, reading the header,
    decoding, scoring (decode, model and input check), building the report."""
    import requests
    from pydicom.uid import generate_uid

    from pneumonia.predictor import Predictor, default_model_path
    from pneumonia.score.dicomweb import (
        DicomWebSettings,
        DicomWebSource,
        Instance,
        _multipart_parts,
        read_header,
    )
    from pneumonia.score.report import build_report, model_identity
    from pneumonia.score.rows import Item, score_items

    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    data = film_dicom(film, study=study, series=series, sop=sop)
    pacs.upload(data)
    settings = DicomWebSettings(pacs.dicomweb, user=pacs.user, password=pacs.password)
    source = DicomWebSource(settings, [])
    inst = Instance(study, series, sop)
    predictor = Predictor(model or default_model_path(), threads=1)
    row = score_items(predictor, [Item("k", data=data)])[0]
    header = read_header(data)
    identity = model_identity(predictor)
    session = settings.session()
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    answer = session.get(
        source._url(inst), headers={"Accept": accept, "Accept-Encoding": "identity"}
    )

    def gzip_get() -> requests.Response:
        return session.get(source._url(inst), headers={"Accept": accept, "Accept-Encoding": "gzip"})

    steps = {
        "retrieve (WADO-RS, no encoding)": lambda: source.retrieve(inst),
        "retrieve (WADO-RS, gzip accepted)": gzip_get,
        "split the answer": lambda: _multipart_parts(
            answer.headers["Content-Type"], answer.content
        ),
        "read the header": lambda: read_header(data),
        "decode (prepare)": lambda: predictor.prepare(data),
        "score (decode, model, input check)": lambda: score_items(
            predictor, [Item("k", data=data)]
        ),
        "build the report": lambda: build_report(header, row, identity),
    }
    costs = {}
    for name, step in steps.items():
        step()  # warm: imports, caches
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        costs[name] = round((time.perf_counter() - start) / repeats * 1000, 1)
    return costs


def report_count(pacs: Orthanc) -> int:
    return len(pacs.post("/tools/find", {"Level": "Instance", "Query": {"Modality": "SR"}}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--films", type=Path, default=TRAIN, help="JPEG films to convert (not test!)")
    ap.add_argument(
        "--size",
        help="resize every film to WIDTHxHEIGHT first, e.g. 2048x2500 for a full-size CR film "
        "(default: as they are; the Kaggle films under ../shared are 224x224)",
    )
    ap.add_argument("--model", type=Path, help="default: $MODEL_PATH, else the shipped model")
    ap.add_argument("--workers", type=int, help="default: the command's (the CPUs available)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if "test" in args.films.parts:
        raise SystemExit("the official test set is never scored by benchmarks; use the train split")

    size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else None
    if size is not None and len(size) != 2:
        raise SystemExit(f"--size {args.size}: write WIDTHxHEIGHT, e.g. 2048x2500")
    import numpy as np

    pixels = film_pixels(args.films, args.instances)
    with tempfile.TemporaryDirectory(prefix="bench_pacs-") as tmp, Orthanc(Path(tmp)) as pacs:
        log(f"Orthanc at {pacs.dicomweb}; uploading {len(pixels)} films")
        upload_s, total_bytes = upload(pacs, pixels, size)  # type: ignore[arg-type]
        del pixels
        load_before = os.getloadavg()[0]
        log(f"uploaded in {upload_s:.1f} s; load average {load_before:.2f}; scoring")
        first_s, first = run_score(pacs, Path(tmp) / "scores.csv", args)
        log(f"first run {first_s:.1f} s: {json.dumps(first)}")
        stored_after_first = report_count(pacs)
        again_s, again = run_score(pacs, Path(tmp) / "scores.csv", args)
        log(f"second run {again_s:.1f} s: {json.dumps(again)}")
        stored = report_count(pacs)
        film = film_pixels(args.films, 1)[0]
        if size is not None:
            from PIL import Image

            film = np.asarray(Image.fromarray(film).resize(size, Image.Resampling.BICUBIC))
        costs = per_film_costs(pacs, film, args.model)
    scored = first["labels"]["NORMAL"] + first["labels"]["PNEUMONIA"]
    checks = {
        "one row per instance": first["rows"] == args.instances,
        "one report per scored film": first["reports_stored"] == scored == stored_after_first,
        "rerun scored and stored nothing": (again["scored"], again["reports_stored"]) == (0, 0),
        "no duplicate reports": stored == stored_after_first,
    }
    figures = {
        "instances": args.instances,
        "upload_s": round(upload_s, 1),
        "mean_film_mb": round(total_bytes / args.instances / 1e6, 2),
        "size": args.size or "as stored",
        "first_run_s": round(first_s, 1),
        "second_run_s": round(again_s, 1),
        "scored": scored,
        "errors": first["errors"],
        "input_check": first["input_check"],
        "reports_stored": first["reports_stored"],
        "reports_in_pacs": stored,
        "images_per_s_scoring": first["images_per_s"],
        "load_average_before": round(load_before, 2),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "checks": checks,
        "per_film_ms": costs,
    }
    print("| Run | Wall time (s) | Films scored | Reports stored |")
    print("| --- | --- | --- | --- |")
    print(f"| first (score + write back) | {first_s:.1f} | {scored} | {first['reports_stored']} |")
    print(
        f"| again (resume: nothing new) | {again_s:.1f} | {again['scored']} | {again['reports_stored']} |"
    )
    print()
    print(
        f"{args.instances} instances; errors {first['errors']}; input check {first['input_check']};"
    )
    print(f"reports in the PACS after both runs: {stored}; load average before: {load_before:.2f}")
    print()
    print("| One film, one step at a time (this process) | ms |")
    print("| --- | --- |")
    for name, ms in costs.items():
        print(f"| {name} | {ms} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    failed = [k for k, ok in checks.items() if not ok]
    if failed:
        log(f"FAILED: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
