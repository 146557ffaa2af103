"""A scoring job on a PACS: search, score, write reports back, summarise per study; and the
watch mode that repeats it for new studies.

OUT is the record of what was scored, as for every input: each poll of ``--watch`` is one
resumed job, so a film is scored (and reported) once however often it is found.
"""

from __future__ import annotations

import csv
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pneumonia.guard import REFUSED_OUTCOMES
from pneumonia.labels import LABELS
from pneumonia.score.dicomweb import SKIPPED, DicomWebSettings, DicomWebSource, Query
from pneumonia.score.job import ScoreSummary, score_archive
from pneumonia.score.output import format_for
from pneumonia.score.report import ReportWriter
from pneumonia.score.rows import ScoreError, ScoreRow

log = logging.getLogger(__name__)

#: Columns of the per-study summary written beside OUT.
STUDY_COLUMNS = (
    "study",
    "instances",
    "scored",
    "pneumonia",
    "normal",
    "max_p_pneumonia",
    "study_prediction",
    "skipped",
    "refused",
    "errors",
)


@dataclass(frozen=True)
class PacsSummary:
    """One job on a PACS: the scoring summary, the reports stored, the per-study file."""

    job: ScoreSummary
    found: int
    reports_stored: int
    studies: Path
    newest_study: str

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.job.to_dict(),
            "found": self.found,
            "reports_stored": self.reports_stored,
            "studies": str(self.studies),
        }


def studies_path(out: Path) -> Path:
    """``scores.csv`` -> ``scores.studies.csv`` (also for a Parquet OUT)."""
    return out.with_name(f"{out.stem}.studies.csv")


def _rows(out: Path) -> Iterator[ScoreRow]:
    _, batches = format_for(out).read(out)
    for batch in batches:
        yield from batch


def study_rows(out: Path) -> list[dict[str, Any]]:
    """One summary per study of OUT (keyed ``STUDY/SERIES/SOP``), in study UID order.

    ``study_prediction`` is PNEUMONIA if any film of the study is, NORMAL if every scored
    film is NORMAL, empty if none was scored; ``refused`` counts the films the input check
    found are not (frontal) chest X-rays, ``errors`` every other error but the skipped films.
    """
    studies: dict[str, dict[str, Any]] = defaultdict(
        lambda: {c: 0 for c in STUDY_COLUMNS if c not in ("study", "max_p_pneumonia")}
    )
    top: dict[str, float] = {}
    for row in _rows(out):
        study = row.key.split("/", 1)[0]
        s = studies[study]
        s["instances"] += 1
        code = row.error_code
        if code is None and row.prediction is not None and row.p_pneumonia is not None:
            s["scored"] += 1
            s[row.prediction.lower()] += 1
            top[study] = max(top.get(study, 0.0), row.p_pneumonia)
        elif code == SKIPPED:
            s["skipped"] += 1
        elif code in REFUSED_OUTCOMES:
            s["refused"] += 1
        else:
            s["errors"] += 1
    out_rows = []
    for study in sorted(studies):
        s = studies[study]
        prediction = LABELS[1] if s["pneumonia"] else LABELS[0] if s["scored"] else ""
        out_rows.append(
            {
                **s,
                "study": study,
                "max_p_pneumonia": top.get(study),
                "study_prediction": prediction,
            }
        )
    return out_rows


def write_study_summary(out: Path) -> Path:
    """Write OUT's per-study summary beside it (atomically) and return its path."""
    path = studies_path(out)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, STUDY_COLUMNS)
        w.writeheader()
        for row in study_rows(out):
            w.writerow({k: "" if v is None else v for k, v in row.items()})
    os.replace(tmp, path)
    return path


def score_pacs(
    settings: DicomWebSettings,
    query: Query,
    out: Path,
    model_path: Path,
    *,
    write_back: bool = False,
    heatmaps: bool = False,
    fetch_threads: int = 4,
    **job: Any,
) -> PacsSummary:
    """Score what ``query`` finds on the server into ``out``; with ``write_back``, store a
    report per scored film in its study (and with ``heatmaps`` its heatmap as a Secondary
    Capture). ``job``: the options of :func:`score_archive`.

    Raises:
        ScoreError: the server is unreachable, refuses the credentials or a report, or any
            error :func:`score_archive` raises.
    """
    if heatmaps and not write_back:
        raise ScoreError("--write-heatmap goes with --write-back")
    source = DicomWebSource.open(
        settings,
        query,
        fetch_threads=fetch_threads,
        keep_headers=write_back,
        keep_files=heatmaps,
        use_headers=job.get("use_headers", True),
    )
    log.info("%d CR/DX instances found at %s", len(source.instances), settings.url)
    writer = ReportWriter(source, settings, heatmaps) if write_back else None
    summary = score_archive(source, out, model_path, on_rows=writer, **job)
    newest = max((i.when for i in source.instances), default="")
    return PacsSummary(
        summary,
        len(source.instances),
        writer.stored if writer else 0,
        write_study_summary(Path(out)),
        newest,
    )


def _since(query: Query, newest: str) -> Query:
    """``query`` narrowed to studies on or after the date of ``newest`` (date and time text)."""
    if len(newest) < 8:
        return query
    day = newest[:8]
    start, _, end = (query.study_date or "").partition("-")
    if query.study_date and "-" not in query.study_date:  # one day: nothing newer to find
        return query
    return replace(query, study_date=f"{max(start, day)}-{end}")


def watch_pacs(
    settings: DicomWebSettings,
    query: Query,
    out: Path,
    model_path: Path,
    *,
    interval: float = 60.0,
    max_polls: int | None = None,
    duration: float | None = None,
    stop: threading.Event | None = None,
    **kw: Any,
) -> Iterator[PacsSummary]:
    """Poll the server, scoring what is new each time, until ``max_polls`` polls or
    ``duration`` seconds (at least one of them), or until ``stop`` is set.

    Each poll after the first asks only for studies from the date of the newest one seen
    (QIDO matches dates, not times; OUT, read as resume does, skips what was scored).

    Yields:
        Each poll's summary.
    """
    if max_polls is None and duration is None:
        raise ScoreError("--watch needs a bound: --max-polls N or --duration SECONDS")
    if (max_polls is not None and max_polls < 1) or (duration is not None and duration <= 0):
        raise ScoreError(
            f"--max-polls must be >= 1 and --duration > 0, got {max_polls}, {duration}"
        )
    if interval < 0:
        raise ScoreError(f"--poll-interval must be >= 0 seconds, got {interval}")
    stop = stop or threading.Event()
    deadline = None if duration is None else time.monotonic() + duration
    newest, polls = "", 0
    while True:
        summary = score_pacs(settings, _since(query, newest), out, model_path, stop=stop, **kw)
        newest = max(newest, summary.newest_study)
        polls += 1
        yield summary
        if max_polls is not None and polls >= max_polls:
            return
        wait = interval if deadline is None else min(interval, deadline - time.monotonic())
        if wait < 0 or stop.wait(wait) or (deadline is not None and time.monotonic() >= deadline):
            return
