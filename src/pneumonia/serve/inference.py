"""Inference off the event loop, with bounded concurrency and a bounded wait queue.

Decoding and the model run in worker threads (onnxruntime and Pillow release the GIL), at
most ``max_concurrency`` at once; at most ``queue_size`` more jobs wait. A request that finds
the queue full is refused at once with 503 and ``Retry-After`` rather than piling up memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
import anyio.to_thread

from pneumonia.heatmap import MAX_OVERLAY_SIDE, overlay_png
from pneumonia.predictor import ItemError, Prediction, Predictor, StageTimes
from pneumonia.preprocess import ImageError, Preprocessed
from pneumonia.serve.errors import ApiError

T = TypeVar("T")


class InferenceQueue:
    """Admission control for inference jobs.

    Args:
        max_concurrency: Jobs running at once.
        queue_size: Jobs allowed to wait beyond those.
        queue_timeout_s: Longest a job may wait for a slot.
    """

    def __init__(self, max_concurrency: int, queue_size: int, queue_timeout_s: float) -> None:
        self.max_concurrency = max_concurrency
        self.capacity = max_concurrency + queue_size
        self.queue_timeout_s = queue_timeout_s
        self._limiter = anyio.CapacityLimiter(max_concurrency)
        self._admitted = 0
        self._mean_job_s = 0.5  # a prior for Retry-After until real jobs have been timed

    @property
    def admitted(self) -> int:
        """Jobs running or waiting."""
        return self._admitted

    @property
    def running(self) -> int:
        return int(self._limiter.borrowed_tokens)

    def retry_after_s(self) -> int:
        """A rough wait before a retry can get a slot: the queue's worth of average jobs."""
        est = self._mean_job_s * max(1, self._admitted) / self.max_concurrency
        return int(min(60, max(1, math.ceil(est))))

    def refuse_if_full(self) -> None:
        """Refuse now if no job could be admitted.

        The routes call it before they read the upload, so that under overload a client
        gets its 503 as soon as its headers are in, not after sending the whole image.
        :meth:`run` checks again: the queue may fill while the upload streams in.

        Raises:
            ApiError: 503 ``queue_full`` with ``Retry-After``.
        """
        if self._admitted >= self.capacity:
            raise ApiError(
                503,
                "queue_full",
                "the service is busy (inference queue full); retry after the time in Retry-After",
                {"Retry-After": str(self.retry_after_s())},
            )

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` in a worker thread once a slot is free.

        Raises:
            ApiError: 503 ``queue_full`` if the queue is full, 503 ``queue_timeout`` if no
                slot freed up in time; both with ``Retry-After``.
        """
        self.refuse_if_full()
        self._admitted += 1
        try:
            try:
                with anyio.fail_after(self.queue_timeout_s):
                    await self._limiter.acquire()
            except TimeoutError:
                raise ApiError(
                    503,
                    "queue_timeout",
                    f"no inference slot freed up within {self.queue_timeout_s:g} s; retry later",
                    {"Retry-After": str(self.retry_after_s())},
                ) from None
            t0 = time.perf_counter()
            try:
                # Not cancellable once started: the slot stays taken until the thread is done,
                # so the concurrency bound holds even when clients disconnect.
                return await anyio.to_thread.run_sync(fn, *args)
            finally:
                self._limiter.release()
                self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * (time.perf_counter() - t0)
        finally:
            self._admitted -= 1


@dataclass(frozen=True)
class JobResult:
    """What one job produced: a result or an error per input, and where time went."""

    outcomes: list[Prediction | ImageError | ItemError]
    heatmap_png: bytes | None
    decode_s: float
    inference_s: float


def predict_job(predictor: Predictor, images: list[bytes], heatmap: bool = False) -> JobResult:
    """Decode and classify the images through ``Predictor.predict``, the batch path every
    command takes, so the service's scores and input-check verdicts equal the CLI's.

    Runs in a worker thread. A heatmap, if asked, is drawn for the first image only, on a
    view decoded sharp enough for the overlay.
    """
    items: list[bytes | Preprocessed | ImageError] = list(images)
    gray = None
    times = StageTimes()
    if heatmap and images:
        t0 = time.perf_counter()
        try:
            first = predictor.prepare(images[0], view_side=MAX_OVERLAY_SIDE)
            gray, items[0] = first.view, first
        except ImageError as exc:
            items[0] = exc
        times.decode_s += time.perf_counter() - t0
    outcomes = list(predictor.predict(items, with_cam=heatmap, times=times))
    png = None
    top = outcomes[0] if outcomes else None
    if gray is not None and isinstance(top, Prediction) and top.cam is not None:
        png = overlay_png(gray, top.cam, top.label)
    return JobResult(outcomes, png, decode_s=times.decode_s, inference_s=times.inference_s)
