"""Prometheus metrics in the text exposition format, written by hand (no client library).

https://prometheus.io/docs/instrumenting/exposition_formats/ : counters, gauges and cumulative
histograms with ``_bucket{le=...}``, ``_sum`` and ``_count``. One :class:`Metrics` object lives
on ``app.state``; nothing here is module-level state.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence

#: Request latency buckets (seconds): from a cached health check to a slow batch.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Model and decoding time buckets (seconds).
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _fmt_labels(labels: Labels, extra: Labels = ()) -> str:
    items = (*labels, *extra)
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}"


def _fmt_value(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Histogram:
    """A cumulative histogram per label set."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        self._counts: dict[Labels, list[int]] = {}
        self._sums: dict[Labels, float] = defaultdict(float)

    def observe(self, value: float, labels: Labels = ()) -> None:
        counts = self._counts.setdefault(labels, [0] * (len(self.buckets) + 1))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self._sums[labels] += value

    def lines(self, name: str) -> Iterable[str]:
        for labels in sorted(self._counts):
            running = 0
            for le, n in zip((*self.buckets, float("inf")), self._counts[labels], strict=True):
                running += n
                yield f"{name}_bucket{_fmt_labels(labels, (('le', _fmt_value(le)),))} {running}"
            yield f"{name}_sum{_fmt_labels(labels)} {self._sums[labels]!r}"
            yield f"{name}_count{_fmt_labels(labels)} {running}"


class Metrics:
    """The service's counters, gauges and histograms; thread-safe; rendered on ``/metrics``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[Labels, int] = defaultdict(int)
        self._predictions: dict[Labels, int] = defaultdict(int)
        self._image_errors: dict[Labels, int] = defaultdict(int)
        self._latency = Histogram(LATENCY_BUCKETS)
        self._decode = Histogram(STAGE_BUCKETS)
        self._inference = Histogram(STAGE_BUCKETS)
        self.in_flight = 0

    def request_started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def request_finished(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.in_flight -= 1
            self._requests[(("route", route), ("method", method), ("status", str(status)))] += 1
            self._latency.observe(seconds, (("route", route),))

    def observe_job(self, decode_s: float, inference_s: float, images: int) -> None:
        """Time spent decoding and in the model for one job of ``images`` images."""
        with self._lock:
            self._decode.observe(decode_s)
            if images:
                self._inference.observe(inference_s, (("batch", "1" if images == 1 else "many"),))

    def count_prediction(self, label: str) -> None:
        with self._lock:
            self._predictions[(("label", label),)] += 1

    def count_image_error(self, code: str) -> None:
        with self._lock:
            self._image_errors[(("code", code),)] += 1

    def render(self, gauges: Sequence[tuple[str, str, Labels, float]] = ()) -> str:
        """The exposition text, plus ``gauges``: ``(name, help, labels, value)`` read now."""
        out: list[str] = []

        def block(name: str, kind: str, help_: str, lines: Iterable[str]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(lines)

        def counter_lines(name: str, values: dict[Labels, int]) -> list[str]:
            return [f"{name}{_fmt_labels(k)} {v}" for k, v in sorted(values.items())]

        with self._lock:
            block(
                "pneumonia_http_requests_total",
                "counter",
                "HTTP requests by route template, method and status code.",
                counter_lines("pneumonia_http_requests_total", self._requests),
            )
            block(
                "pneumonia_http_request_duration_seconds",
                "histogram",
                "Time from request arrival to the end of the response, by route template.",
                self._latency.lines("pneumonia_http_request_duration_seconds"),
            )
            block(
                "pneumonia_http_requests_in_flight",
                "gauge",
                "Requests being handled now.",
                [f"pneumonia_http_requests_in_flight {self.in_flight}"],
            )
            block(
                "pneumonia_decode_duration_seconds",
                "histogram",
                "Time to decode and preprocess the images of one inference job.",
                self._decode.lines("pneumonia_decode_duration_seconds"),
            )
            block(
                "pneumonia_inference_duration_seconds",
                "histogram",
                "Time in the model (onnxruntime) per job; batch=1 for /predict, many for batches.",
                self._inference.lines("pneumonia_inference_duration_seconds"),
            )
            block(
                "pneumonia_predictions_total",
                "counter",
                "Images classified, by returned label.",
                counter_lines("pneumonia_predictions_total", self._predictions),
            )
            block(
                "pneumonia_image_errors_total",
                "counter",
                "Uploaded images refused, by error code.",
                counter_lines("pneumonia_image_errors_total", self._image_errors),
            )
        for name, help_, labels, value in gauges:
            block(name, "gauge", help_, [f"{name}{_fmt_labels(labels)} {_fmt_value(value)}"])
        return "\n".join(out) + "\n"
