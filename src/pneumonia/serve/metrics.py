"""Prometheus metrics from prometheus-client, in the text exposition format 0.0.4.

The counters, gauges and histograms are prometheus-client's, in one registry per app (on
``app.state``; nothing here is module-level state, and the library's global registry with its
process collectors is not used). The gauges that read the running service (readiness, queue,
model) are read at scrape time.

The text is written by :meth:`Metrics.render` from the library's collected samples rather than by
``prometheus_client.generate_latest``, which sorts label names alphabetically and prints every
value as a float: the lines would change (``{route=..,method=..,status=..} 1`` becoming
``{method=..,route=..,status=..} 1.0``) for dashboards, alerts and tests that match them.
https://prometheus.io/docs/instrumenting/exposition_formats/
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from pneumonia.serve.state import Service

#: Request latency buckets (seconds): from a cached health check to a slow batch.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Model and decoding time buckets (seconds).
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

#: The media type of ``/metrics``.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _fmt_value(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


def _fmt_labels(labels: dict[str, str]) -> str:
    """Labels in the order declared (a histogram's ``le`` last), bucket bounds as ``1`` not
    ``1.0``: the lines stay those of the hand-written exporter this replaced."""
    if not labels:
        return ""
    items = ((k, _fmt_value(float(v)) if k == "le" else v) for k, v in labels.items())
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}"


def _service_gauges(svc: Service) -> list[Metric]:
    """The gauges read from the running service when scraped."""

    def gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, help_, value=value)

    info = GaugeMetricFamily(
        "pneumonia_model_info",
        "The model being served (value always 1).",
        labels=("name", "version", "sha256"),
    )
    p = svc.predictor
    info.add_metric((p.name, p.version, p.sha256), 1.0)
    return [
        gauge("pneumonia_ready", "1 once the model is loaded and warmed up.", float(svc.ready)),
        gauge("pneumonia_inference_jobs", "Inference jobs running or waiting.", svc.queue.admitted),
        gauge("pneumonia_inference_running", "Inference jobs running.", svc.queue.running),
        gauge(
            "pneumonia_inference_capacity", "Most jobs running plus waiting.", svc.queue.capacity
        ),
        info,
    ]


class Metrics:
    """The service's counters, gauges and histograms; thread-safe; rendered on ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._requests = Counter(
            "pneumonia_http_requests",
            "HTTP requests by route template, method and status code.",
            ("route", "method", "status"),
            registry=r,
        )
        self._latency = Histogram(
            "pneumonia_http_request_duration_seconds",
            "Time from request arrival to the end of the response, by route template.",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._in_flight = Gauge(
            "pneumonia_http_requests_in_flight", "Requests being handled now.", registry=r
        )
        self._decode = Histogram(
            "pneumonia_decode_duration_seconds",
            "Time to decode and preprocess the images of one inference job.",
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self._inference = Histogram(
            "pneumonia_inference_duration_seconds",
            "Time in the model (onnxruntime) per job; batch=1 for /predict, many for batches.",
            ("batch",),
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self._predictions = Counter(
            "pneumonia_predictions", "Images classified, by returned label.", ("label",), registry=r
        )
        self._image_errors = Counter(
            "pneumonia_image_errors",
            "Uploaded images refused, by error code.",
            ("code",),
            registry=r,
        )
        self._input_checks = Counter(
            "pneumonia_input_check",
            "Images by input-check outcome (typical, unlike_training, not_a_chest_xray, "
            "not_a_frontal_chest_xray) and action (answered, or refused with 422 and the "
            "outcome as its code).",
            ("outcome", "action"),
            registry=r,
        )

    def request_started(self) -> None:
        self._in_flight.inc()

    def request_finished(self, route: str, method: str, status: int, seconds: float) -> None:
        self._in_flight.dec()
        self._requests.labels(route, method, str(status)).inc()
        self._latency.labels(route).observe(seconds)

    def observe_job(self, decode_s: float, inference_s: float, images: int) -> None:
        """Time spent decoding and in the model for one job of ``images`` images."""
        self._decode.observe(decode_s)
        if images:
            self._inference.labels("1" if images == 1 else "many").observe(inference_s)

    def count_prediction(self, label: str) -> None:
        self._predictions.labels(label).inc()

    def count_image_error(self, code: str) -> None:
        self._image_errors.labels(code).inc()

    def count_input_check(self, outcome: str, action: str) -> None:
        """One image's input-check outcome; ``action``: ``answered`` or ``refused``."""
        self._input_checks.labels(outcome=outcome, action=action).inc()

    def render(self, service: Service | None = None) -> str:
        """The exposition text; with ``service``, also its readiness, queue and model gauges."""
        families: Iterable[Metric] = self.registry.collect()
        if service is not None:
            families = [*families, *_service_gauges(service)]
        out: list[str] = []
        for family in families:
            name = family.name + ("_total" if family.type == "counter" else "")
            out.append(f"# HELP {name} {family.documentation}")
            out.append(f"# TYPE {name} {family.type}")
            out.extend(
                f"{s.name}{_fmt_labels(s.labels)} {_fmt_value(s.value)}"
                for s in family.samples
                if not s.name.endswith("_created")  # not part of the 0.0.4 text format
            )
        return "\n".join(out) + "\n"
