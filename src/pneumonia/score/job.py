"""One scoring job: open the output, skip what is done, run an engine, commit, summarise."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumonia.predictor import Predictor, available_cpus
from pneumonia.progress import progress_bar
from pneumonia.score.dicomweb import DicomWebSource
from pneumonia.score.inputs import FolderSource, ManifestSource, NpzSource, ParquetBytesSource
from pneumonia.score.output import ScoreOutput
from pneumonia.score.rows import ScoreError, ScoreRow

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class ScoreSummary:
    """What a job left in OUT and what this run did.

    Attributes:
        out: The output file.
        rows: Rows in OUT (one per image).
        labels: Rows per predicted label.
        errors: Rows per error code (images that could not be scored).
        scored: Images scored by this run.
        resumed: Images found already scored in OUT or its parts.
        seconds: Time spent scoring in this run.
        input_check: Rows per input check outcome (``typical``, ``unlike_training``,
            ``not_a_chest_xray``, ``not_a_frontal_chest_xray``).
    """

    out: Path
    rows: int
    labels: dict[str, int]
    errors: dict[str, int]
    scored: int
    resumed: int
    seconds: float
    input_check: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "rows": self.rows,
            "labels": self.labels,
            "errors": self.errors,
            "input_check": self.input_check,
            "scored": self.scored,
            "resumed": self.resumed,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_second, 2),
        }


#: Called with each batch's rows before they are saved (``--write-back``); raising stops the job
#: with those rows unsaved, so that a rerun scores them again.
RowHook = Callable[[Predictor, list[ScoreRow]], None]


def score_archive(
    source: FolderSource | ManifestSource | ParquetBytesSource | NpzSource | DicomWebSource,
    out: Path,
    model_path: Path,
    *,
    engine: str = "local",
    workers: int | None = None,
    batch_size: int = 8,
    part_rows: int = 1000,
    address: str | None = None,
    progress: bool = False,
    refuse: bool = True,
    stop: threading.Event | None = None,
    use_headers: bool = True,
    on_rows: RowHook | None = None,
) -> ScoreSummary:
    """Score every image of ``source`` into ``out``, resuming whatever an earlier run left.

    Args:
        source: From :func:`pneumonia.score.open_input`.
        out: ``.parquet`` or ``.csv`` result file.
        model_path: Exported ``.onnx`` model.
        engine: ``local`` (processes on this machine) or ``ray`` (Ray Data).
        workers: Processes or Ray actors; default: the CPUs available. Local with 1: in
            this process.
        batch_size: Images per inference batch.
        part_rows: Rows per saved part (at most this many are lost on a hard kill).
        address: Ray cluster address (``ray`` engine only); default: a local Ray instance.
        progress: Draw a progress bar with images/s and time left.
        refuse: Images the input check finds are not (frontal) chest X-rays become error
            rows (``not_a_chest_xray``, ``not_a_frontal_chest_xray``); False scores them,
            flagged in ``input_check`` (use the same setting when resuming a job).
        stop: Set (by a signal handler) to stop after the batch in hand: raises
            ``KeyboardInterrupt`` there, with every finished row saved.
        use_headers: Let a DICOM header naming another body part, view or modality refuse
            the file (pneumonia.frontal); False ignores headers.
        on_rows: Called with each batch's rows (and the job's model) before they are saved.

    Raises:
        ScoreError: bad arguments, an output of another model or input kind, a missing
            optional dependency, or a dead worker.
        ModelLoadError: the model cannot be loaded.
    """
    if engine not in ENGINES:
        raise ScoreError(f"engine must be one of {ENGINES}, got {engine!r}")
    if address and engine != "ray":
        raise ScoreError("--address only applies to --engine ray")
    if engine == "ray" and isinstance(source, DicomWebSource):
        raise ScoreError("a dicomweb: input is scored by the local engine; leave out --engine ray")
    if batch_size < 1 or (workers is not None and workers < 1):
        raise ScoreError(f"batch size and workers must be >= 1, got {batch_size} and {workers}")
    predictor = Predictor(model_path, threads=1, refuse=refuse, use_headers=use_headers)
    with ScoreOutput(Path(out), source.key_name, predictor.sha256, part_rows=part_rows) as output:
        done = output.done
        resumed = len(done)
        todo = sum(1 for key in source.iter_keys() if key not in done)
        scored = 0
        start = time.monotonic()
        with progress_bar(
            enabled=progress, total=todo, unit="img", desc="scoring", dynamic_ncols=True
        ) as bar:
            if engine == "ray":
                from pneumonia.score.ray_engine import iter_ray

                assert not isinstance(source, DicomWebSource)  # refused above
                batches = iter_ray(
                    source,
                    model_path,
                    predictor,
                    frozenset(done),
                    workers=workers,
                    batch_size=batch_size,
                    address=address,
                )
            else:
                from pneumonia.score.local import iter_local

                batches = iter_local(
                    source.items(done),
                    model_path,
                    predictor,
                    workers=workers or available_cpus(),
                    batch_size=batch_size,
                )
            try:
                for rows in batches:
                    if on_rows is not None:
                        on_rows(predictor, rows)
                    output.add(rows)
                    scored += len(rows)
                    bar.update(len(rows))
                    if stop is not None and stop.is_set():
                        # Here, between batches, nothing is half-done: the engine's pool is
                        # shut down by closing it, the finished rows are flushed on the way out.
                        raise KeyboardInterrupt
            finally:
                batches.close()
        seconds = time.monotonic() - start
        tally = output.commit()
    t = tally.to_dict()
    return ScoreSummary(
        Path(out), t["rows"], t["labels"], t["errors"], scored, resumed, seconds, t["input_check"]
    )
