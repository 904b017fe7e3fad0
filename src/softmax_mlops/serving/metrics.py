"""Prometheus metrics for the inference service, on GET /metrics (prometheus-client's text format), named the way
Prometheus and KServe users expect:

- `softmax_mlops_requests_total{route, protocol, status}`: every answered request;
- `softmax_mlops_requests_in_flight`: requests being answered now;
- `request_preprocess_seconds`, `request_predict_seconds` and `request_postprocess_seconds{protocol}`
  (KServe's names): a request's reading and decoding up to inference, onnxruntime, and its encoding and sending;
- `softmax_mlops_refused_total{limit}`: requests refused by a limit (body_bytes, instances, image_pixels,
  read_timeout, inference_time, connections);
- `softmax_mlops_predictions_total{class_name}`: images predicted, by their most probable class;
- `softmax_mlops_model_info{name, version, data_md5, temperature}`: 1, for the model served;
- `softmax_mlops_drift_window_images`: images in the online drift window (0: nothing tested yet);
- `softmax_mlops_drift_class_p_value`: the chi² p-value of the window's predicted classes against the test
  set's (NaN without a drift reference, or with an empty window).

Routes are the app's route templates (`/v2/models/{name}/infer`), and a path that matches none is `other`, so
that clients cannot grow the label set. The online drift window keeps the last ``serve.drift_window`` predicted
classes; its chi² test is the batch drift check's class test (drift.class_p_value), computed when Prometheus
scrapes, not per request. Each app has its own registry.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator
from contextvars import ContextVar

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from . import drift

_TIMES: ContextVar[dict[str, float] | None] = ContextVar("softmax_mlops_request_times", default=None)
MLFLOW_PATHS = ("/invocations", "/ping", "/version")


def protocol_of(route: str) -> str:
    if route.startswith("/v2"):
        return "v2"
    return "mlflow" if route in MLFLOW_PATHS else "native"


class _DriftWindow(Collector):
    """The last ``size`` predicted classes, tested against the reference's classes when scraped."""

    def __init__(self, size: int, reference_counts: np.ndarray | None, classes: int) -> None:
        self.classes: deque[int] = deque(maxlen=size)
        self.reference_counts, self.n_classes = reference_counts, classes

    def add(self, predicted: np.ndarray) -> None:
        self.classes.extend(predicted.tolist())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        window = np.array(self.classes.copy(), dtype=np.int64)  # a copy: the event loop appends while this runs
        p_value = math.nan
        if self.reference_counts is not None and len(window):
            p_value = drift.class_p_value(self.reference_counts, np.bincount(window, minlength=self.n_classes))
        yield GaugeMetricFamily(
            "softmax_mlops_drift_window_images", "images in the online drift window", value=len(window)
        )
        yield GaugeMetricFamily(
            "softmax_mlops_drift_class_p_value",
            "chi-squared p-value of the window's predicted classes against the test set's",
            value=p_value,
        )


class Metrics:
    """One app's metrics, and the ASGI middleware that counts and times its requests."""

    def __init__(self, class_names: list[str], model: dict[str, str], window: int, reference: dict | None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "softmax_mlops_requests", "answered requests", ["route", "protocol", "status"], registry=r
        )
        self.in_flight = Gauge("softmax_mlops_requests_in_flight", "requests being answered", registry=r)
        phases = {"preprocess": "reading and decoding", "predict": "inference", "postprocess": "encoding and sending"}
        self.phases = {
            name: Histogram(f"request_{name}_seconds", f"{what} of a request", ["protocol"], registry=r)
            for name, what in phases.items()
        }
        self.refused = Counter("softmax_mlops_refused", "requests refused by a limit", ["limit"], registry=r)
        self.predictions = Counter(
            "softmax_mlops_predictions", "images predicted, by most probable class", ["class_name"], registry=r
        )
        info = Gauge("softmax_mlops_model_info", "the model served", list(model), registry=r)
        info.labels(**model).set(1)
        self.class_names = class_names
        counts = None
        if reference is not None:
            counts = np.bincount(reference["probabilities"].argmax(axis=1), minlength=len(class_names))
        self.window = _DriftWindow(window, counts, len(class_names))
        r.register(self.window)

    def predicted(self, probabilities: np.ndarray) -> None:
        """Count one request's images by class, and add them to the drift window."""
        classes = probabilities.argmax(axis=1)
        for index, count in enumerate(np.bincount(classes, minlength=len(self.class_names)).tolist()):
            if count:
                self.predictions.labels(self.class_names[index]).inc(count)
        self.window.add(classes)

    @staticmethod
    def inference_started() -> None:
        if (times := _TIMES.get()) is not None:
            times["predict_start"] = time.perf_counter()

    @staticmethod
    def inference_ended() -> None:
        if (times := _TIMES.get()) is not None:
            times["predict_end"] = time.perf_counter()

    def middleware(self, app):  # noqa: ANN001, ANN201 - ASGI
        metrics = self

        async def counted(scope, receive, send) -> None:  # noqa: ANN001 - ASGI
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            times = {"start": time.perf_counter()}
            token = _TIMES.set(times)
            status = 500

            async def sending(message) -> None:  # noqa: ANN001 - ASGI
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            metrics.in_flight.inc()
            try:
                await app(scope, receive, sending)
            finally:
                _TIMES.reset(token)
                metrics.in_flight.dec()
                route = getattr(scope.get("route"), "path", None) or "other"
                protocol = protocol_of(route)
                metrics.requests.labels(route, protocol, str(status)).inc()
                if "predict_start" in times and "predict_end" in times:
                    end = time.perf_counter()
                    metrics.phases["preprocess"].labels(protocol).observe(times["predict_start"] - times["start"])
                    metrics.phases["predict"].labels(protocol).observe(times["predict_end"] - times["predict_start"])
                    metrics.phases["postprocess"].labels(protocol).observe(end - times["predict_end"])

        return counted
