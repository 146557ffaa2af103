"""The local engine: batches scored in this process or in a pool of worker processes.

Each worker loads the model once (onnxruntime with one thread, one worker per CPU) and scores
a batch at a time. At most ``2 x workers`` batches are in flight, so the reader never runs
ahead of the workers and memory stays flat however large the archive.
"""

from __future__ import annotations

import functools
import itertools
import signal
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

from pneumonia.predictor import Predictor
from pneumonia.score.rows import Item, ScoreError, ScoreRow, score_items


def batched(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


# Process pools carry per-worker state only through module scope: this cache holds the one
# Predictor of a worker process, loaded by the pool initializer.
@functools.cache
def _worker_predictor(model_path: str, refuse: bool, use_headers: bool) -> Predictor:
    return Predictor(model_path, threads=1, refuse=refuse, use_headers=use_headers)


def _init_worker(model_path: str, refuse: bool, use_headers: bool) -> None:
    # Ctrl-C reaches the whole process group; only the parent decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_predictor(model_path, refuse, use_headers)


def _score_batch(
    model_path: str, refuse: bool, use_headers: bool, batch: list[Item]
) -> list[ScoreRow]:
    return score_items(_worker_predictor(model_path, refuse, use_headers), batch)


def iter_local(
    items: Iterable[Item],
    model_path: Path,
    predictor: Predictor,
    *,
    workers: int,
    batch_size: int,
) -> Generator[list[ScoreRow], None, None]:
    """Score ``items`` in batches, yielding each batch's rows in input order.

    Args:
        items: What to score (read lazily).
        model_path: The model each worker loads.
        predictor: An already loaded model, used when ``workers == 1`` (no pool); workers
            load theirs with its ``refuse`` and ``use_headers`` settings.
        workers: Worker processes; 1 scores in this process.
        batch_size: Images per inference batch.

    Raises:
        ScoreError: a worker process died (for example, killed for lack of memory).
    """
    batches = batched(items, batch_size)
    if workers <= 1:
        for batch in batches:
            yield score_items(predictor, batch)
        return
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=get_context("spawn"),  # no fork of a process holding onnxruntime threads
        initializer=_init_worker,
        initargs=(str(model_path), predictor.refuse, predictor.use_headers),
    )
    pending: deque[Future[list[ScoreRow]]] = deque()
    try:
        for batch in batches:
            pending.append(
                pool.submit(
                    _score_batch, str(model_path), predictor.refuse, predictor.use_headers, batch
                )
            )
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise ScoreError(
            "a worker process died (out of memory?); "
            "the rows scored so far are saved, rerun to finish"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
