"""Prometheus metrics of the server, served on their own HTTP port.

Every label takes values from a bounded set: gRPC method names of this server ("other" for any
other), status code names, names of the models loaded at start, decode-failure reasons and
cache kinds. Image ids, paths and class names never become labels.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from cdul_server.decode import DECODE_FAILURE_REASONS
from cdul_server.interceptors import CallInterceptor

_logger = logging.getLogger(__name__)

KNOWN_METHODS = (
    "/cdul.v1.Labeler/PseudoLabel",
    "/cdul.v1.Labeler/StreamPseudoLabel",
    "/cdul.v1.Labeler/Predict",
    "/cdul.v1.Labeler/StreamPredict",
    "/cdul.v1.Labeler/SearchCrops",
    "/cdul.v1.Labeler/ListModels",
    "/cdul.v1.Labeler/GetModelInfo",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
)

#: Per-image failure reasons besides decoding failures.
IMAGE_FAILURE_REASONS = (
    *DECODE_FAILURE_REASONS,
    "too_small",
    "content_key_not_found",
    "invalid_content_key",
    "no_source",
    "uri_not_allowed",
    "uri_unreadable",
    "too_large",
    "other",
)

CACHE_KINDS = ("image_view", "text")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def method_label(method: str) -> str:
    """Return the short method name for a known method, else "other"."""
    return method.rsplit("/", 1)[-1] if method in KNOWN_METHODS else "other"


class ServerMetrics:
    """The server's metrics in their own registry, so several servers can share a process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cdul_requests",
            "Finished RPCs by method and status code.",
            ["method", "code"],
            registry=r,
        )
        self.request_latency = Histogram(
            "cdul_request_latency_seconds",
            "Time from the start of an RPC to its end, in seconds.",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("cdul_in_flight_requests", "RPCs being served now.", registry=r)
        self.images = Counter(
            "cdul_images",
            "Images processed, by RPC and outcome (ok or error).",
            ["method", "outcome"],
            registry=r,
        )
        self.image_failures = Counter(
            "cdul_image_failures",
            "Images that failed in their result, by reason.",
            ["reason"],
            registry=r,
        )
        self.decode_failures = Counter(
            "cdul_decode_failures",
            "Images whose bytes could not be decoded, by reason.",
            ["reason"],
            registry=r,
        )
        self.views = Counter(
            "cdul_views_encoded",
            "Views (whole images and tiles) run through an image encoder, by model.",
            ["model"],
            registry=r,
        )
        self.batch_size = Histogram(
            "cdul_encoder_batch_size",
            "Views per image-encoder call, by model.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.encoder_seconds = Histogram(
            "cdul_encoder_seconds",
            "Time of one image-encoder call, in seconds, by model.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.text_encoder_seconds = Histogram(
            "cdul_text_encoder_seconds",
            "Time of one text-encoder call, in seconds, by model.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.preprocess_seconds = Histogram(
            "cdul_preprocess_seconds",
            "Time to decode one image and cut and preprocess its views, in seconds.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "cdul_queue_depth_views",
            "Views admitted to an encoder queue and not yet encoded, by model.",
            ["model"],
            registry=r,
        )
        self.cache_hits = Counter(
            "cdul_cache_hits",
            "Embedding cache hits: image_view counts whole-image or tile-grid entries, text "
            "counts prompts.",
            ["kind"],
            registry=r,
        )
        self.cache_misses = Counter(
            "cdul_cache_misses", "Embedding cache misses, by kind.", ["kind"], registry=r
        )
        self.cache_size = Gauge(
            "cdul_cache_embeddings", "Image and tile embeddings in the cache.", registry=r
        )
        self.text_cache_size = Gauge(
            "cdul_text_cache_entries", "Prompt embeddings in the text cache.", registry=r
        )
        self.build_info = Gauge(
            "cdul_build_info",
            "Always 1: the server version, each loaded model and its execution provider.",
            ["version", "model", "provider"],
            registry=r,
        )
        self._http_server: Any = None
        self._http_thread: threading.Thread | None = None

    def set_build_info(self, version: str, models: Iterable[tuple[str, str]]) -> None:
        for model, provider in models:
            self.build_info.labels(version=version, model=model, provider=provider).set(1)

    def track_sizes(
        self, image_cache_size: Callable[[], int], text_cache_size: Callable[[], int]
    ) -> None:
        self.cache_size.set_function(lambda: float(image_cache_size()))
        self.text_cache_size.set_function(lambda: float(text_cache_size()))

    def image_failed(self, reason: str, decode: bool) -> None:
        reason = reason if reason in IMAGE_FAILURE_REASONS else "other"
        self.image_failures.labels(reason=reason).inc()
        if decode:
            self.decode_failures.labels(reason=reason).inc()

    def batch_observer(self, model: str) -> _BatchObserver:
        return _BatchObserver(self, model)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint in a daemon thread; return the bound port."""
        self._http_server, self._http_thread = start_http_server(
            port, addr=host, registry=self.registry
        )
        bound = int(self._http_server.server_port)
        _logger.info("metrics at http://%s:%d/metrics", host, bound)
        return bound

    def shutdown(self) -> None:
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None

    def interceptor(self) -> MetricsInterceptor:
        return MetricsInterceptor(self)


class _BatchObserver:
    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self._metrics = metrics
        self._model = model
        self._batch_size = metrics.batch_size.labels(model=model)
        self._encoder_seconds = metrics.encoder_seconds.labels(model=model)
        self._views = metrics.views.labels(model=model)
        self._queue_depth = metrics.queue_depth.labels(model=model)

    def batch_encoded(self, views: int, seconds: float) -> None:
        self._batch_size.observe(views)
        self._encoder_seconds.observe(seconds)
        self._views.inc(views)

    def queue_depth(self, views: int) -> None:
        self._queue_depth.set(views)


class MetricsInterceptor(CallInterceptor):
    """Counts every RPC by method and status code and records its latency and concurrency."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def begin(self, method: str, context: grpc.ServicerContext) -> Any:
        self._metrics.in_flight.inc()
        return time.perf_counter()

    def end(
        self, method: str, context: grpc.ServicerContext, state: Any, error: BaseException | None
    ) -> None:
        label = method_label(method)
        self._metrics.in_flight.dec()
        self._metrics.request_latency.labels(method=label).observe(time.perf_counter() - state)
        self._metrics.requests.labels(method=label, code=_status_name(context, error)).inc()


def _status_name(context: grpc.ServicerContext, error: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if error is None:
        return "OK"
    if isinstance(error, GeneratorExit) or not context.is_active():
        return "CANCELLED"
    return "UNKNOWN"
