"""A fake Labeler servicer on a real loopback gRPC server, for client-only behavior.

The fake computes deterministic scores from the SHA-256 of each image's bytes, so the tests
can check what reached the server and what came back, and it can inject failures, delays and
an authorization check. Behavior of the real server is tested against `cdul-server`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cdul_proto.v1 import labeler_pb2, labeler_pb2_grpc

FAKE_CLASSIFIER_CLASSES = ("cat", "dog", "car")
FAKE_EMBEDDING_DIM = 4


def fake_scores(key: str, n: int, salt: str = "") -> np.ndarray:
    """Return the fake's deterministic softmax scores (n,) for a content key."""
    seed = int(hashlib.sha256((salt + key).encode()).hexdigest()[:8], 16)
    logits = np.random.default_rng(seed).normal(size=n)
    exp = np.exp(logits - logits.max())
    return (exp / exp.sum()).astype(np.float32)


@dataclass
class FakeLabeler(labeler_pb2_grpc.LabelerServicer):
    """Servicer whose behavior the tests set through its attributes."""

    fail_next: list[grpc.StatusCode | None] = field(default_factory=list)
    fail_message: str = ""
    delay_s: float = 0.0
    required_token: str | None = None
    forget_content_keys: bool = False
    calls: int = 0
    metadata: list[dict[str, str]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight_seen: int = 0
    seen: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _enter(self, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls += 1
            self.metadata.append(dict(context.invocation_metadata()))
            failure = self.fail_next.pop(0) if self.fail_next else None
            self.in_flight += 1
            self.max_in_flight_seen = max(self.max_in_flight_seen, self.in_flight)
        try:
            if self.required_token is not None:
                sent = dict(context.invocation_metadata()).get("authorization")
                if sent != f"Bearer {self.required_token}":
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
            if failure is not None:
                context.abort(failure, self.fail_message or f"injected {failure.name}")
            if self.delay_s:
                time.sleep(self.delay_s)
        except BaseException:
            self._leave()
            raise

    def _leave(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def _key(self, image: labeler_pb2.Image, status: labeler_pb2.ImageStatus) -> str:
        if image.WhichOneof("source") == "content_key":
            if self.forget_content_keys or image.content_key not in self.seen:
                status.code = grpc.StatusCode.NOT_FOUND.value[0]
                status.reason = "content_key_not_found"
                status.message = f"content key {image.content_key} is not cached"
            return image.content_key
        key = hashlib.sha256(image.data).hexdigest()
        if image.data.startswith(b"BAD"):
            status.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            status.reason = "decode_failed"
            status.message = "cannot identify image file"
        else:
            self.seen[key] = image.id
        return key

    def PseudoLabel(
        self, request: labeler_pb2.PseudoLabelRequest, context: grpc.ServicerContext
    ) -> labeler_pb2.PseudoLabelResponse:
        self._enter(context)
        try:
            names = list(request.vocabulary.class_names)
            if len(set(names)) != len(names) or not names:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "duplicate or no class names")
            grid = request.options.grid_size or 3
            results = []
            for image in request.images:
                status = labeler_pb2.ImageStatus()
                key = self._key(image, status)
                result = labeler_pb2.PseudoLabelResult(id=image.id, content_key=key, status=status)
                if status.code == 0:
                    salt = ",".join(names)
                    glob = fake_scores(key, len(names), "g" + salt)
                    agg = fake_scores(key, len(names), "a" + salt)
                    result.global_scores.extend(glob)
                    result.aggregate_scores.extend(agg)
                    result.final_scores.extend((glob + agg) / 2)
                    result.cache_hit = image.WhichOneof("source") == "content_key"
                    result.width, result.height = 64, 48
                    if request.options.return_tile_scores:
                        tiles = [fake_scores(key, len(names), f"t{k}") for k in range(grid**2)]
                        result.tile_scores.rows = grid**2
                        result.tile_scores.cols = len(names)
                        result.tile_scores.values.extend(np.concatenate(tiles))
                    if request.options.return_embeddings:
                        result.embedding.extend(fake_scores(key, FAKE_EMBEDDING_DIM, "e"))
                        result.tile_embeddings.rows = grid**2
                        result.tile_embeddings.cols = FAKE_EMBEDDING_DIM
                        result.tile_embeddings.values.extend(
                            np.zeros(grid**2 * FAKE_EMBEDDING_DIM, dtype=np.float32)
                        )
                results.append(result)
            return labeler_pb2.PseudoLabelResponse(
                model=request.model or "fake-clip",
                class_names=names,
                results=results,
                request_id=request.request_id,
            )
        finally:
            self._leave()

    def Predict(
        self, request: labeler_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> labeler_pb2.PredictResponse:
        self._enter(context)
        try:
            results = []
            for image in request.images:
                status = labeler_pb2.ImageStatus()
                key = self._key(image, status)
                result = labeler_pb2.PredictResult(id=image.id, content_key=key, status=status)
                if status.code == 0:
                    scores = fake_scores(key, len(FAKE_CLASSIFIER_CLASSES), "p")
                    result.scores.extend(scores)
                    order = np.argsort(-scores)
                    chosen = list(order[: request.options.top_k])
                    if request.options.HasField("threshold"):
                        extra = [j for j in order if scores[j] >= request.options.threshold]
                        chosen += [j for j in extra if j not in chosen]
                    for j in chosen:
                        result.labels.add(
                            name=FAKE_CLASSIFIER_CLASSES[j], index=int(j), score=scores[j]
                        )
                results.append(result)
            return labeler_pb2.PredictResponse(
                model=request.model or "fake-classifier",
                class_names=FAKE_CLASSIFIER_CLASSES,
                results=results,
                request_id=request.request_id,
            )
        finally:
            self._leave()

    def SearchCrops(
        self, request: labeler_pb2.SearchCropsRequest, context: grpc.ServicerContext
    ) -> labeler_pb2.SearchCropsResponse:
        self._enter(context)
        try:
            hits = [
                labeler_pb2.CropHit(
                    content_key=key,
                    image_id=image_id,
                    tile_index=4,
                    grid_size=3,
                    row=1,
                    col=1,
                    box=labeler_pb2.Box(x0=21, y0=16, x1=42, y1=32),
                    score=0.5,
                )
                for key, image_id in sorted(self.seen.items())
            ]
            return labeler_pb2.SearchCropsResponse(model="fake-clip", hits=hits[: request.k])
        finally:
            self._leave()

    def ListModels(
        self, request: labeler_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> labeler_pb2.ListModelsResponse:
        self._enter(context)
        try:
            return labeler_pb2.ListModelsResponse(models=[_clip_info(), _classifier_info()])
        finally:
            self._leave()

    def GetModelInfo(
        self, request: labeler_pb2.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> labeler_pb2.ModelInfo:
        self._enter(context)
        try:
            for info in (_clip_info(), _classifier_info()):
                if request.name in (info.name, "") and (request.name or info.kind == "clip"):
                    return info
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.name!r} not found")
        finally:
            self._leave()


def _clip_info() -> labeler_pb2.ModelInfo:
    return labeler_pb2.ModelInfo(
        name="fake-clip",
        kind="clip",
        embedding_dim=FAKE_EMBEDDING_DIM,
        logit_scale=100.0,
        preprocess=labeler_pb2.Preprocess(
            size=32, mean=[0.5] * 3, std=[0.5] * 3, interpolation="bicubic", resize_mode="shortest"
        ),
        weights="none",
        is_default=True,
        precision="fp32",
        default_templates=["a photo of a {}."],
    )


def _classifier_info() -> labeler_pb2.ModelInfo:
    return labeler_pb2.ModelInfo(
        name="fake-classifier",
        kind="classifier",
        class_names=FAKE_CLASSIFIER_CLASSES,
        preprocess=labeler_pb2.Preprocess(size=32, mean=[0.5] * 3, std=[0.5] * 3),
        weights="fit.pt",
        is_default=True,
        precision="fp32",
    )


@dataclass
class FakeServer:
    """A running fake: its `target` (HOST:PORT) and the servicer the tests configure."""

    target: str
    servicer: FakeLabeler
    server: grpc.Server


def start_fake_server(credentials: grpc.ServerCredentials | None = None) -> FakeServer:
    """Start a fake Labeler with the standard health service on 127.0.0.1, port 0."""
    servicer = FakeLabeler()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    labeler_pb2_grpc.add_LabelerServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return FakeServer(target=f"127.0.0.1:{port}", servicer=servicer, server=server)


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    """A plaintext fake server, stopped after the test."""
    running = start_fake_server()
    try:
        yield running
    finally:
        running.server.stop(grace=None)


@pytest.fixture
def fake_server_factory() -> Iterator[Callable[[grpc.ServerCredentials | None], FakeServer]]:
    """A function that starts fake servers (optionally with TLS), all stopped after the test."""
    started: list[FakeServer] = []

    def start(credentials: grpc.ServerCredentials | None = None) -> FakeServer:
        started.append(start_fake_server(credentials))
        return started[-1]

    try:
        yield start
    finally:
        for running in started:
            running.server.stop(grace=None)
