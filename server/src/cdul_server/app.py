"""The server: configuration, startup, health, TLS, authentication and graceful shutdown.

Lifecycle: :meth:`LabelerServer.start` binds the ports and serves health checks as
NOT_SERVING (Labeler calls get UNAVAILABLE); :meth:`LabelerServer.load` loads the models,
warms them up and reloads the embedding cache; :meth:`LabelerServer.set_serving` flips health to
SERVING. :meth:`LabelerServer.stop` flips health back to NOT_SERVING, rejects new calls with
UNAVAILABLE, waits up to the grace period for calls in flight, stops the gRPC server, saves the
cache and stops the metrics endpoint. :func:`create_server` runs the first three steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cdul_server import __version__
from cdul_server.auth import BearerTokenInterceptor, read_token_file
from cdul_server.batcher import DynamicBatcher
from cdul_server.cache import EmbeddingCache, VectorLru
from cdul_server.interceptors import DrainGate
from cdul_server.limits import MIB, Limits
from cdul_server.metrics import ServerMetrics
from cdul_server.model_repository import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_MODEL_REPOSITORY,
    ClassifierModel,
    ClipModel,
    ModelRepositoryError,
    SessionConfig,
    list_model_dirs,
    load_model_repository,
)
from cdul_server.service import SERVICE_NAME, LabelerServicer, LoadedModel
from cdul_server.sources import FileReader

_logger = logging.getLogger(__name__)

CACHE_FILE_NAME = "embeddings.npz"
# Seconds without any new call that shutdown waits for before it stops gRPC.
_QUIET_BEFORE_STOP_S = 0.2


class StartupError(ValueError):
    """The server cannot start with the given settings; the message names the fix."""


@dataclass
class ServerConfig:
    """Every setting of ``cdul-server``; each field is the flag of the same name.

    Sizes are in bytes, times in the unit their name ends with. See ``cdul-server --help``.
    """

    models: Path | None = None
    clip: str | None = None
    classifier: str | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    precision: str = "fp32"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 0
    inter_op_threads: int = 0
    max_batch_size: int = 32
    max_queue_delay_ms: float = 5.0
    max_queue_views: int = 8192
    decode_workers: int = 4
    max_concurrent_rpcs: int = 64
    cache_dir: Path | None = None
    cache_max_embeddings: int = 200_000
    cache_save_interval_s: float = 300.0
    text_cache_size: int = 50_000
    prediction_cache_size: int = 100_000
    max_receive_message_bytes: int = 64 * MIB
    max_send_message_bytes: int = 64 * MIB
    max_images_per_request: int = 256
    max_classes: int = 1000
    max_templates: int = 32
    max_prompt_chars: int = 300
    max_grid_size: int = 8
    max_pixels: int = 40_000_000
    max_search_k: int = 1000
    allow_roots: tuple[Path, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    auth_token_file: Path | None = None
    grace_s: float = 30.0
    warmup: bool = True

    def limits(self) -> Limits:
        names = {f.name for f in dataclasses.fields(Limits)}
        return Limits(**{name: getattr(self, name) for name in names})

    def validate(self) -> None:
        """Check the settings that do not need the models.

        Raises:
            StartupError: A setting is out of range or two settings conflict.
        """
        try:
            self.limits()
        except ValueError as err:
            raise StartupError(str(err)) from err
        positive = {
            "--max-batch-size": self.max_batch_size,
            "--max-queue-views": self.max_queue_views,
            "--decode-workers": self.decode_workers,
            "--max-concurrent-rpcs": self.max_concurrent_rpcs,
            "--text-cache-size": self.text_cache_size,
            "--prediction-cache-size": self.prediction_cache_size,
        }
        for flag, value in positive.items():
            if value < 1:
                raise StartupError(f"{flag} must be at least 1, got {value}")
        non_negative = {
            "--max-queue-delay-ms": self.max_queue_delay_ms,
            "--cache-save-interval-s": self.cache_save_interval_s,
            "--grace-s": self.grace_s,
            "--threads": self.threads,
            "--inter-op-threads": self.inter_op_threads,
        }
        if self.cache_max_embeddings < 0:
            raise StartupError(
                "--cache-max-embeddings must be 0 (cache off) or more, got "
                f"{self.cache_max_embeddings}"
            )
        for flag, number in non_negative.items():
            if number < 0:
                raise StartupError(f"{flag} must not be negative, got {number}")
        for flag, port in (("--port", self.port), ("--metrics-port", self.metrics_port)):
            if not 0 <= port <= 65535:
                raise StartupError(f"{flag} must be from 0 to 65535, got {port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise StartupError("--tls-cert and --tls-key go together: give both or neither")


def model_fingerprint(model: ClipModel | ClassifierModel) -> str:
    """Return a short digest of a model's config and graph files (name, size, mtime).

    Cache entries are keyed by it, so a model exported again under the same name does not
    reuse the embeddings of the old one.
    """
    digest = hashlib.sha256()
    config_path = model.path / "config.json"
    digest.update(config_path.read_bytes())
    digest.update(model.precision.encode())
    for name in sorted(str(value) for value in model.config.get("files", {}).values()):
        path = model.path / name
        if path.is_file():
            stat = path.stat()
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


class LabelerServer:
    """A running server; see the module docstring for its lifecycle.

    Attributes:
        port: The bound gRPC port (useful with port 0).
        metrics_port: The bound metrics HTTP port.
    """

    def __init__(self, config: ServerConfig) -> None:
        config.validate()
        self.config = config
        self.limits = config.limits()
        self.metrics = ServerMetrics()
        self.gate = DrainGate()
        self.health = health.HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._stopping = False
        self._saver_stop = threading.Event()
        self._saver: threading.Thread | None = None
        # Set once the cache file has been read, so a failed start never overwrites it.
        self._cache_loaded = False
        self.batchers: list[DynamicBatcher] = []
        if config.cache_dir is not None:
            _check_writable_folder(config.cache_dir, "--cache-dir")
        cache_path = config.cache_dir / CACHE_FILE_NAME if config.cache_dir else None
        self.cache = EmbeddingCache(config.cache_max_embeddings, cache_path)
        self.text_cache = VectorLru(config.text_cache_size)
        self.pool = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="decode")
        try:
            files = FileReader(config.allow_roots, self.limits.max_receive_message_bytes)
        except (OSError, ValueError) as err:
            raise StartupError(f"--allow-root: {err}") from err
        self.servicer = LabelerServicer(
            clip_models={},
            classifiers={},
            default_clip=None,
            default_classifier=None,
            cache=self.cache,
            text_cache=self.text_cache,
            prediction_cache=VectorLru(config.prediction_cache_size),
            limits=self.limits,
            files=files,
            pool=self.pool,
            metrics=self.metrics,
        )
        interceptors: list[grpc.ServerInterceptor] = [self.metrics.interceptor(), self.gate]
        if config.auth_token_file is not None:
            try:
                token = read_token_file(config.auth_token_file)
            except ValueError as err:
                raise StartupError(str(err)) from err
            interceptors.append(BearerTokenInterceptor(token))
        # gRPC core reads messages up to twice the limit, so that the service can reject them
        # with a message that names the flag. Larger ones get gRPC's own RESOURCE_EXHAUSTED.
        core_receive = min(2**31 - 1, max(2 * self.limits.max_receive_message_bytes, 4 * MIB))
        core_send = min(2**31 - 1, self.limits.max_send_message_bytes + MIB)
        self._grpc = grpc.server(
            ThreadPoolExecutor(config.max_concurrent_rpcs + 8, thread_name_prefix="grpc"),
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", core_receive),
                ("grpc.max_send_message_length", core_send),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        self.servicer.add_to_server(self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc
        )
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.gate.set_starting(True)

    # ----------------------------------------------------------------- startup

    def start(self) -> None:
        """Bind the gRPC and metrics ports and start serving health checks (NOT_SERVING)."""
        address = f"{self.config.host}:{self.config.port}"
        try:
            if self.config.tls_cert is not None and self.config.tls_key is not None:
                credentials = grpc.ssl_server_credentials(
                    [(self.config.tls_key.read_bytes(), self.config.tls_cert.read_bytes())]
                )
                self.port = self._grpc.add_secure_port(address, credentials)
            else:
                self.port = self._grpc.add_insecure_port(address)
        except OSError as err:
            raise StartupError(f"cannot read the TLS files (--tls-cert/--tls-key): {err}") from err
        except RuntimeError as err:
            raise StartupError(f"cannot listen on {address} (--host/--port): {err}") from err
        if self.port == 0:
            raise StartupError(f"cannot listen on {address}: is the port in use? (--host/--port)")
        try:
            self.metrics_port = self.metrics.serve(
                self.config.metrics_host, self.config.metrics_port
            )
        except OSError as err:
            self._grpc.stop(0)
            raise StartupError(
                f"cannot serve metrics on {self.config.metrics_host}:{self.config.metrics_port} "
                f"(--metrics-host/--metrics-port): {err}"
            ) from err
        self._grpc.start()
        _logger.info(
            "listening on %s:%d (%s), NOT_SERVING until the models are loaded",
            self.config.host,
            self.port,
            "TLS" if self.config.tls_cert else "plaintext",
        )

    def load(self) -> None:
        """Load the models, warm them up and reload the embedding cache.

        Raises:
            StartupError: The repository or a model cannot be served.
        """
        config = self.config
        root = config.models if config.models is not None else DEFAULT_MODEL_REPOSITORY
        if config.models is None and (not root.is_dir() or not list_model_dirs(root)):
            raise StartupError(
                f"no --models given and the packaged default model repository {root} contains no "
                "model: pass --models DIR with a folder that cdul-export wrote"
            )
        session = SessionConfig(
            providers=tuple(config.providers),
            intra_op_threads=config.threads,
            inter_op_threads=config.inter_op_threads,
            precision=config.precision,
        )
        try:
            models = load_model_repository(root, None, session)
        except ModelRepositoryError as err:
            raise StartupError(str(err)) from err
        clips = {name: m for name, m in models.items() if isinstance(m, ClipModel)}
        classifiers = {name: m for name, m in models.items() if isinstance(m, ClassifierModel)}
        default_clip = _choose_default(
            "--clip", config.clip, clips, classifiers, DEFAULT_CLIP_MODEL
        )
        default_classifier = _choose_default(
            "--classifier", config.classifier, classifiers, clips, None
        )
        if config.warmup:
            self._warm_up(clips, classifiers)
        loaded_clips = {name: self._wrap(model) for name, model in clips.items()}
        loaded_classifiers = {name: self._wrap(model) for name, model in classifiers.items()}
        self.servicer.clip_models = loaded_clips
        self.servicer.classifiers = loaded_classifiers
        self.servicer.default_clip = default_clip
        self.servicer.default_classifier = default_classifier
        self.cache.load({loaded.key for loaded in loaded_clips.values()})
        self._cache_loaded = True
        self.metrics.set_build_info(
            __version__, [(name, config.providers[0]) for name in sorted(models)]
        )
        self.metrics.track_sizes(lambda: self.cache.size, lambda: len(self.text_cache))
        if self.cache.path is not None and config.cache_save_interval_s > 0:
            self._saver = threading.Thread(
                target=self._save_periodically, name="cache-saver", daemon=True
            )
            self._saver.start()
        _logger.info(
            "serving models %s (default CLIP %s, default classifier %s)",
            sorted(models),
            default_clip,
            default_classifier,
        )

    def _wrap(self, model: ClipModel | ClassifierModel) -> LoadedModel:
        encode = model.encode_images if isinstance(model, ClipModel) else model.predict_logits
        batcher = DynamicBatcher(
            model.name,
            encode,
            max_batch_size=self.config.max_batch_size,
            max_queue_delay_s=self.config.max_queue_delay_ms / 1000.0,
            max_queue_views=self.config.max_queue_views,
            observer=self.metrics.batch_observer(model.name),
        )
        self.batchers.append(batcher)
        key = f"{model.name}@{model_fingerprint(model)}"
        return LoadedModel(model=model, key=key, batcher=batcher, provider=self.config.providers[0])

    def _warm_up(
        self, clips: dict[str, ClipModel], classifiers: dict[str, ClassifierModel]
    ) -> None:
        started = time.perf_counter()
        for clip in clips.values():
            size = clip.preprocess.size
            clip.encode_images(np.zeros((1, 3, size, size), dtype=np.float32))
            clip.encode_texts(["a photo of a warm-up."])
        for classifier in classifiers.values():
            size = classifier.preprocess.size
            classifier.predict_logits(np.zeros((1, 3, size, size), dtype=np.float32))
        _logger.info(
            "warmed up %d models in %.2f s",
            len(clips) + len(classifiers),
            time.perf_counter() - started,
        )

    def set_serving(self) -> None:
        """Accept Labeler calls and report SERVING."""
        self.gate.set_starting(False)
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        _logger.info("SERVING on port %d", self.port)

    # ----------------------------------------------------------------- shutdown

    def _save_periodically(self) -> None:
        saved_at = self.cache.mutations
        while not self._saver_stop.wait(self.config.cache_save_interval_s):
            if self.cache.mutations != saved_at:
                saved_at = self.cache.mutations
                try:
                    self.cache.save()
                except OSError as err:
                    _logger.error("saving the embedding cache failed: %s", err)

    def stop(self, grace_s: float | None = None) -> bool:
        """Drain and stop; returns True when every call in flight finished within the grace.

        Safe to call more than once and from a signal-handling thread.
        """
        grace = self.config.grace_s if grace_s is None else grace_s
        with self._stop_lock:
            if self._stopping:
                self._stopped.wait()
                return True
            self._stopping = True
        started = time.monotonic()
        self.health.enter_graceful_shutdown()
        self.gate.start_draining()
        in_flight = self.gate.in_flight
        _logger.info(
            "shutting down: NOT_SERVING, waiting up to %.1f s for %d calls", grace, in_flight
        )
        drained = self.gate.wait_idle(grace)
        if not drained:
            _logger.warning(
                "grace period over with %d calls in flight; cancelling them", self.gate.in_flight
            )
        remaining = max(0.0, grace - (time.monotonic() - started))
        # Once gRPC's stop begins, grpcio (1.85) dispatches no new call: calls that reach the
        # server then are CANCELLED rather than rejected. So the gate keeps rejecting calls with
        # UNAVAILABLE until none has arrived for a moment, and stop cancels right away what is
        # left (health watch streams, which already received NOT_SERVING).
        # NOTE: a call that arrives during stop itself can still be CANCELLED.
        if drained and not self.gate.wait_quiet(_QUIET_BEFORE_STOP_S, min(remaining, 1.0)):
            _logger.info("calls still arriving while shutting down; stopping anyway")
        self._grpc.stop(0).wait()
        for batcher in self.batchers:
            batcher.close(timeout_s=5.0)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._saver_stop.set()
        if self._cache_loaded:
            try:
                self.cache.save()
            except OSError as err:
                _logger.error("saving the embedding cache failed: %s", err)
        self.metrics.shutdown()
        _logger.info("stopped after %.2f s", time.monotonic() - started)
        self._stopped.set()
        return drained

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the server has stopped; returns False on timeout."""
        return self._stopped.wait(timeout_s)

    def __enter__(self) -> LabelerServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop(0.0 if exc_info[0] is not None else None)


def _check_writable_folder(folder: Path, flag: str) -> None:
    """Create ``folder`` if needed and write and delete a probe file in it.

    Raises:
        StartupError: The folder cannot be created or written.
    """
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise StartupError(
            f"{flag} {folder} cannot be created or written ({err.strerror or err}): "
            "give a writable folder"
        ) from err


def _choose_default(
    flag: str,
    requested: str | None,
    models: dict[str, Any],
    other_kind: dict[str, Any],
    preferred: str | None,
) -> str | None:
    if requested:
        if requested in models:
            return requested
        if requested in other_kind:
            raise StartupError(f"{flag} {requested!r} names a model of the other kind")
        raise StartupError(f"{flag} {requested!r} not found: the repository has {sorted(models)}")
    if preferred in models:
        return preferred
    return sorted(models)[0] if models else None


def create_server(config: ServerConfig) -> LabelerServer:
    """Start a server, load its models and start serving.

    Raises:
        StartupError: A setting is invalid, a port cannot be bound, or a model cannot load.
    """
    server = LabelerServer(config)
    server.start()
    try:
        server.load()
    except BaseException:
        server.stop(0.0)
        raise
    server.set_serving()
    return server


def write_port_file(path: Path, port: int) -> None:
    """Write a port number atomically, so a reader never sees a partial file."""
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    temporary.write_text(f"{port}\n", encoding="utf-8")
    os.replace(temporary, path)
