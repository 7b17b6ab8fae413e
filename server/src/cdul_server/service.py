"""The ``cdul.v1.Labeler`` servicer: request validation, the labeling pipeline, responses.

A request is checked whole first (model, vocabulary, options, limits); any problem there fails
the call with the status code that :mod:`cdul_server.errors` maps. Then each image is handled
on its own: a bad image gets an error status in its result and the other images go on.

For each image, cached embeddings are used when present (a hit skips decoding and the image
encoder). Missing views are decoded and preprocessed in the worker pool and submitted to the
model's :class:`~cdul_server.batcher.DynamicBatcher`, which batches them with views of other
requests.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np

from cdul_proto.v1 import labeler_pb2 as pb
from cdul_server import scoring
from cdul_server.batcher import Admission, DynamicBatcher
from cdul_server.cache import EmbeddingCache, ImageInfo, VectorLru
from cdul_server.decode import DECODE_FAILURE_REASONS, DecodeError, decode_image
from cdul_server.errors import (
    CODE_NUMBERS,
    ServiceError,
    deadline_exceeded,
    echo,
    invalid_argument,
    not_found,
    resource_exhausted,
    status_for_exception,
)
from cdul_server.limits import Limits
from cdul_server.metrics import ServerMetrics
from cdul_server.model_repository import ClassifierModel, ClipModel
from cdul_server.sources import FileReader, ImageSourceError, content_key, normalize_content_key
from cdul_server.views import image_views

_logger = logging.getLogger(__name__)

SERVICE_NAME = "cdul.v1.Labeler"
DEFAULT_GRID_SIZE = 3
DEFAULT_SEARCH_K = 10
_TEXT_CHUNK = 256
_GLOBAL_VIEW_NAMES = {
    pb.GLOBAL_VIEW_UNSPECIFIED: "center_crop",
    pb.GLOBAL_VIEW_CENTER_CROP: "center_crop",
    pb.GLOBAL_VIEW_SQUASH: "squash",
    pb.GLOBAL_VIEW_PAD: "pad",
}
# Without a client deadline, waits on the pipeline end after this long (a safety net only).
_NO_DEADLINE_S = 3600.0


@dataclass
class LoadedModel:
    """A model with what the service keeps beside it."""

    model: ClipModel | ClassifierModel
    key: str
    batcher: DynamicBatcher
    provider: str


@dataclass
class _ImageJob:
    """One image of a request on its way through the pipeline."""

    image_id: str
    data: bytes | None = None
    key: str = ""
    failure: ImageSourceError | None = None
    width: int = 0
    height: int = 0
    whole: np.ndarray | None = None
    tiles: np.ndarray | None = None
    logits: np.ndarray | None = None
    cache_hit: bool = False

    def fail(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        self.failure = ImageSourceError(code, reason, message)


@dataclass
class _Prepared:
    width: int
    height: int
    embeddings: Future[np.ndarray]


@dataclass
class _Call:
    """Deadline and cancellation of the RPC being served."""

    deadline: float
    cancelled: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def of(cls, context: grpc.ServicerContext) -> _Call:
        remaining = context.time_remaining()
        if remaining is None or remaining > _NO_DEADLINE_S:
            remaining = _NO_DEADLINE_S
        call = cls(deadline=time.monotonic() + remaining)
        context.add_callback(call.cancelled.set)
        return call

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise deadline_exceeded("the request deadline passed before it finished")
        return left

    def wait(self, future: Future[Any]) -> Any:
        """Wait for a pipeline future, raising on the deadline or a cancelled call."""
        while True:
            if self.cancelled.is_set():
                raise ServiceError(grpc.StatusCode.CANCELLED, "the request was cancelled")
            try:
                return future.result(timeout=min(0.1, self.remaining()))
            except TimeoutError:
                if future.done():
                    raise  # the work itself timed out, not this wait


class _TooSmall(ValueError):
    """An image with fewer pixels on a side than the grid has tiles."""


class _Oversized:
    """Stands in for a request message larger than --max-receive-message-bytes."""

    def __init__(self, size: int) -> None:
        self.size = size


_Handler = TypeVar("_Handler", bound=Callable[..., Any])


def _unary(handler: _Handler) -> _Handler:
    @functools.wraps(handler)
    def wrapped(self: LabelerServicer, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            self._check_size(request)
            return handler(self, request, context)
        except Exception as err:
            self._abort(context, err)

    return wrapped  # type: ignore[return-value]


def _streaming(handler: _Handler) -> _Handler:
    @functools.wraps(handler)
    def wrapped(
        self: LabelerServicer, requests: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        try:
            yield from handler(self, requests, context)
        except Exception as err:
            self._abort(context, err)

    return wrapped  # type: ignore[return-value]


class LabelerServicer:
    """Serves the Labeler RPCs over the loaded models; see the module docstring.

    Args:
        clip_models: CLIP models by name.
        classifiers: Classifier models by name.
        default_clip: Name used when a request leaves ``model`` empty, or None.
        default_classifier: Name used when a Predict request leaves ``model`` empty, or None.
        cache: The image and tile embedding cache.
        text_cache: Prompt embeddings.
        prediction_cache: Classifier logits by (model key, content key).
        limits: Request limits.
        files: Reader of file:// URIs.
        pool: Worker pool for decoding and preprocessing.
        metrics: Where measurements go.
    """

    def __init__(
        self,
        *,
        clip_models: dict[str, LoadedModel],
        classifiers: dict[str, LoadedModel],
        default_clip: str | None,
        default_classifier: str | None,
        cache: EmbeddingCache,
        text_cache: VectorLru,
        prediction_cache: VectorLru,
        limits: Limits,
        files: FileReader,
        pool: ThreadPoolExecutor,
        metrics: ServerMetrics,
    ) -> None:
        self.clip_models = clip_models
        self.classifiers = classifiers
        self.default_clip = default_clip
        self.default_classifier = default_classifier
        self.cache = cache
        self.text_cache = text_cache
        self._text_encode_lock = threading.Lock()
        self.prediction_cache = prediction_cache
        self.limits = limits
        self.files = files
        self.pool = pool
        self.metrics = metrics

    # ----------------------------------------------------------------- gRPC registration

    def add_to_server(self, server: grpc.Server) -> None:
        """Register the RPCs; request deserializers enforce --max-receive-message-bytes."""
        size_limit = self.limits.max_receive_message_bytes

        def reader(message: Any) -> Callable[[bytes], Any]:
            def deserialize(data: bytes) -> Any:
                if len(data) > size_limit:
                    return _Oversized(len(data))
                return message.FromString(data)

            return deserialize

        handlers = {
            "PseudoLabel": grpc.unary_unary_rpc_method_handler(
                self.PseudoLabel,
                request_deserializer=reader(pb.PseudoLabelRequest),
                response_serializer=pb.PseudoLabelResponse.SerializeToString,
            ),
            "StreamPseudoLabel": grpc.stream_stream_rpc_method_handler(
                self.StreamPseudoLabel,
                request_deserializer=reader(pb.PseudoLabelRequest),
                response_serializer=pb.PseudoLabelResponse.SerializeToString,
            ),
            "Predict": grpc.unary_unary_rpc_method_handler(
                self.Predict,
                request_deserializer=reader(pb.PredictRequest),
                response_serializer=pb.PredictResponse.SerializeToString,
            ),
            "StreamPredict": grpc.stream_stream_rpc_method_handler(
                self.StreamPredict,
                request_deserializer=reader(pb.PredictRequest),
                response_serializer=pb.PredictResponse.SerializeToString,
            ),
            "SearchCrops": grpc.unary_unary_rpc_method_handler(
                self.SearchCrops,
                request_deserializer=reader(pb.SearchCropsRequest),
                response_serializer=pb.SearchCropsResponse.SerializeToString,
            ),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                self.ListModels,
                request_deserializer=reader(pb.ListModelsRequest),
                response_serializer=pb.ListModelsResponse.SerializeToString,
            ),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                self.GetModelInfo,
                request_deserializer=reader(pb.GetModelInfoRequest),
                response_serializer=pb.ModelInfo.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )

    def _check_size(self, request: Any) -> None:
        if isinstance(request, _Oversized):
            raise resource_exhausted(self.limits.request_too_large_message(request.size))

    def _abort(self, context: grpc.ServicerContext, err: Exception) -> None:
        if isinstance(err, grpc.RpcError) and not context.is_active():
            # gRPC raises a bare RpcError in the servicer when the client cancelled the call,
            # for example while reading the next request of a stream. No status can be sent then.
            _logger.debug("call from %s was cancelled by the client", context.peer())
            return
        code, message = status_for_exception(err)
        # Client errors are counted by code in cdul_requests_total; the log keeps the message.
        _logger.debug("call from %s failed with %s: %s", context.peer(), code.name, message)
        context.abort(code, message)

    def _respond(self, response: Any) -> Any:
        self.limits.check_response_size(response.ByteSize())
        return response

    # ----------------------------------------------------------------- RPCs

    @_unary
    def PseudoLabel(
        self, request: pb.PseudoLabelRequest, context: grpc.ServicerContext
    ) -> pb.PseudoLabelResponse:
        return self._respond(self._pseudo_label(request, _Call.of(context)))

    @_streaming
    def StreamPseudoLabel(
        self, requests: Iterator[pb.PseudoLabelRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.PseudoLabelResponse]:
        for request in requests:
            self._check_size(request)
            yield self._respond(self._pseudo_label(request, _Call.of(context)))

    @_unary
    def Predict(
        self, request: pb.PredictRequest, context: grpc.ServicerContext
    ) -> pb.PredictResponse:
        return self._respond(self._predict(request, _Call.of(context)))

    @_streaming
    def StreamPredict(
        self, requests: Iterator[pb.PredictRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.PredictResponse]:
        for request in requests:
            self._check_size(request)
            yield self._respond(self._predict(request, _Call.of(context)))

    @_unary
    def SearchCrops(
        self, request: pb.SearchCropsRequest, context: grpc.ServicerContext
    ) -> pb.SearchCropsResponse:
        loaded = self._clip(request.model)
        text = request.text.strip()
        if not text:
            raise invalid_argument("text is empty: give the object to search for, such as 'a dog'")
        self.limits.check_prompt(text, "search text")
        k = request.k or DEFAULT_SEARCH_K
        self.limits.check_search_k(k)
        query = self._prompt_embeddings(loaded, [text])[0]
        hits = self.cache.search(loaded.key, query, k, request.include_whole_images)
        response = pb.SearchCropsResponse(model=loaded.model.name)
        for hit in hits:
            row, col = divmod(hit.tile_index, hit.grid_size) if hit.tile_index >= 0 else (0, 0)
            x0, y0, x1, y1 = hit.box
            response.hits.append(
                pb.CropHit(
                    content_key=hit.content_key,
                    image_id=hit.image_id,
                    tile_index=hit.tile_index,
                    grid_size=hit.grid_size,
                    row=row,
                    col=col,
                    box=pb.Box(x0=x0, y0=y0, x1=x1, y1=y1),
                    score=hit.score,
                )
            )
        return self._respond(response)

    @_unary
    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        infos = [self._model_info(name) for name in sorted({*self.clip_models, *self.classifiers})]
        return pb.ListModelsResponse(models=infos)

    @_unary
    def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> pb.ModelInfo:
        if request.name not in self.clip_models and request.name not in self.classifiers:
            raise not_found(
                f"model {echo(request.name)} not found: the server serves {self._model_names()}"
            )
        return self._model_info(request.name)

    # ----------------------------------------------------------------- models

    def _model_names(self) -> list[str]:
        return sorted({*self.clip_models, *self.classifiers})

    def _clip(self, name: str) -> LoadedModel:
        name = name or (self.default_clip or "")
        if not name:
            raise not_found("the server serves no CLIP model: start it with --models and --clip")
        if name in self.clip_models:
            return self.clip_models[name]
        if name in self.classifiers:
            raise invalid_argument(
                f"model {echo(name)} is a classifier: use Predict, or a CLIP model"
            )
        raise not_found(f"model {echo(name)} not found: the server serves {self._model_names()}")

    def _classifier(self, name: str) -> LoadedModel:
        name = name or (self.default_classifier or "")
        if not name:
            raise not_found("the server serves no classifier: start it with --classifier")
        if name in self.classifiers:
            return self.classifiers[name]
        if name in self.clip_models:
            raise invalid_argument(f"model {echo(name)} is a CLIP model: use PseudoLabel")
        raise not_found(f"model {echo(name)} not found: the server serves {self._model_names()}")

    def _model_info(self, name: str) -> pb.ModelInfo:
        if name in self.clip_models:
            clip = self.clip_models[name].model
            assert isinstance(clip, ClipModel)  # the dict contains CLIP models only
            return pb.ModelInfo(
                name=name,
                kind="clip",
                embedding_dim=clip.embedding_dim,
                logit_scale=clip.logit_scale,
                preprocess=_preprocess_info(clip),
                weights=clip.weights,
                is_default=name == self.default_clip,
                precision=clip.precision,
                default_templates=clip.default_templates,
            )
        classifier = self.classifiers[name].model
        assert isinstance(classifier, ClassifierModel)
        return pb.ModelInfo(
            name=name,
            kind="classifier",
            class_names=classifier.class_names,
            preprocess=_preprocess_info(classifier),
            weights=str(classifier.config.get("training", {}).get("arch", "")),
            is_default=name == self.default_classifier,
            precision=classifier.precision,
        )

    # ----------------------------------------------------------------- PseudoLabel

    def _pseudo_label(self, request: pb.PseudoLabelRequest, call: _Call) -> pb.PseudoLabelResponse:
        loaded = self._clip(request.model)
        clip = loaded.model
        assert isinstance(clip, ClipModel)
        class_names, templates = self._vocabulary(request.vocabulary, clip)
        options = request.options
        grid_size = options.grid_size or DEFAULT_GRID_SIZE
        self.limits.check_grid_size(grid_size)
        # Scores are softmax probabilities, so a threshold outside [0, 1] keeps all or nothing.
        threshold = (
            _unit_interval(options.threshold, "threshold") if options.HasField("threshold") else 0.0
        )
        lambda_weight = (
            _unit_interval(options.lambda_weight, "lambda_weight")
            if options.HasField("lambda_weight")
            else 0.0
        )
        temperature = (
            _finite(options.temperature, "temperature")
            if options.HasField("temperature")
            else clip.logit_scale
        )
        if temperature <= 0:
            raise invalid_argument(
                f"temperature must be a finite number greater than 0, got {temperature}"
            )
        if options.global_view not in _GLOBAL_VIEW_NAMES:
            raise invalid_argument(f"global_view {options.global_view} is not a GlobalView value")
        view = _GLOBAL_VIEW_NAMES[options.global_view]
        self.limits.check_image_count(len(request.images))

        text_embeddings = self._class_embeddings(loaded, class_names, templates)
        jobs = [self._job(image) for image in request.images]
        self._embed_clip(loaded, jobs, view, grid_size, call)

        response = pb.PseudoLabelResponse(
            model=clip.name, class_names=class_names, request_id=request.request_id
        )
        done = [job for job in jobs if job.failure is None]
        if done:
            whole = np.stack([job.whole for job in done if job.whole is not None])
            tiles = np.stack([job.tiles for job in done if job.tiles is not None])
            global_scores = scoring.similarity_scores(whole, text_embeddings, temperature)
            tile_scores = scoring.similarity_scores(tiles, text_embeddings, temperature)
            labels = scoring.pseudo_labels(global_scores, tile_scores, threshold, lambda_weight)
        row = 0
        for job in jobs:
            result = pb.PseudoLabelResult(id=job.image_id, content_key=job.key)
            if job.failure is not None:
                result.status.CopyFrom(self._status(job.failure, "PseudoLabel"))
                response.results.append(result)
                continue
            self.metrics.images.labels(method="PseudoLabel", outcome="ok").inc()
            result.status.code = 0
            result.global_scores.extend(labels.global_scores[row].tolist())
            result.aggregate_scores.extend(labels.aggregate[row].tolist())
            result.final_scores.extend(labels.final[row].tolist())
            if options.return_tile_scores:
                result.tile_scores.CopyFrom(_matrix(tile_scores[row]))
            if options.return_embeddings:
                assert job.whole is not None and job.tiles is not None
                result.embedding.extend(job.whole.tolist())
                result.tile_embeddings.CopyFrom(_matrix(job.tiles))
            result.cache_hit = job.cache_hit
            result.width = job.width
            result.height = job.height
            response.results.append(result)
            row += 1
        return response

    def _vocabulary(
        self, vocabulary: pb.Vocabulary, clip: ClipModel
    ) -> tuple[list[str], list[str]]:
        names = [name.strip() for name in vocabulary.class_names]
        if not names:
            raise invalid_argument("the vocabulary has no class names: give at least one")
        self.limits.check_class_count(len(names))
        empty = [index for index, name in enumerate(names) if not name]
        if empty:
            raise invalid_argument(f"class names at positions {empty[:10]} are empty")
        duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
        if duplicates:
            raise invalid_argument(
                "class names must be unique, but "
                f"{', '.join(echo(name, 80) for name in duplicates[:10])} occur more than once"
            )
        for name in names:
            self.limits.check_prompt(name, "class name")
        templates = list(vocabulary.templates) or list(clip.default_templates)
        self.limits.check_template_count(len(templates))
        for template in templates:
            if template.count("{}") != 1:
                raise invalid_argument(
                    f"template {echo(template)} must contain exactly one '{{}}' for the class name"
                )
            self.limits.check_prompt(template, "template")
        longest = max(names, key=len)
        for template in templates:
            self.limits.check_prompt(template.replace("{}", longest), "prompt")
        return names, templates

    def _class_embeddings(
        self, loaded: LoadedModel, class_names: Sequence[str], templates: Sequence[str]
    ) -> np.ndarray:
        """Return the (C, D) class embeddings: per class, the normalized template mean."""
        prompts = [template.replace("{}", name) for name in class_names for template in templates]
        vectors = self._prompt_embeddings(loaded, prompts)
        per_class = vectors.reshape(len(class_names), len(templates), -1).mean(axis=1)
        norms = np.linalg.norm(per_class, axis=1, keepdims=True)
        return (per_class / np.maximum(norms, 1e-12)).astype(np.float32)

    def _prompt_embeddings(self, loaded: LoadedModel, prompts: Sequence[str]) -> np.ndarray:
        clip = loaded.model
        assert isinstance(clip, ClipModel)
        unique = list(dict.fromkeys(prompts))
        cached = self.text_cache.get_many(loaded.key, unique)
        missing = [prompt for prompt, vector in zip(unique, cached, strict=True) if vector is None]
        self.metrics.cache_hits.labels(kind="text").inc(len(unique) - len(missing))
        self.metrics.cache_misses.labels(kind="text").inc(len(missing))
        found = {
            prompt: vector
            for prompt, vector in zip(unique, cached, strict=True)
            if vector is not None
        }
        if missing:
            # One request at a time encodes prompts, so concurrent requests that bring the same
            # new vocabulary encode it once: the others find it in the cache after the wait.
            with self._text_encode_lock:
                again = self.text_cache.get_many(loaded.key, missing)
                found.update(
                    (prompt, vector)
                    for prompt, vector in zip(missing, again, strict=True)
                    if vector is not None
                )
                missing = [
                    prompt for prompt, vector in zip(missing, again, strict=True) if vector is None
                ]
                self._encode_prompts(loaded, missing, found)
        return np.stack([found[prompt] for prompt in prompts]).astype(np.float32)

    def _encode_prompts(
        self, loaded: LoadedModel, prompts: list[str], found: dict[str, np.ndarray]
    ) -> None:
        clip = loaded.model
        assert isinstance(clip, ClipModel)
        _check_prompt_lengths(clip, prompts)
        for start in range(0, len(prompts), _TEXT_CHUNK):
            chunk = prompts[start : start + _TEXT_CHUNK]
            started = time.perf_counter()
            encoded = clip.encode_texts(chunk)
            self.metrics.text_encoder_seconds.labels(model=clip.name).observe(
                time.perf_counter() - started
            )
            self.text_cache.put_many(loaded.key, chunk, encoded)
            found.update(zip(chunk, encoded, strict=True))

    def _job(self, image: pb.Image) -> _ImageJob:
        job = _ImageJob(image_id=image.id)
        source = image.WhichOneof("source")
        try:
            if source == "data":
                job.data = image.data
                job.key = content_key(image.data)
            elif source == "content_key":
                job.key = normalize_content_key(image.content_key)
            elif source == "uri":
                job.data = self.files.read(image.uri)
                job.key = content_key(job.data)
            else:
                job.fail(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "no_source",
                    "the image has no data, content_key or uri",
                )
        except ImageSourceError as err:
            job.failure = err
        return job

    def _embed_clip(
        self, loaded: LoadedModel, jobs: list[_ImageJob], view: str, grid_size: int, call: _Call
    ) -> None:
        """Fill each job's whole-image and tile embeddings from the cache or the encoder."""
        clip = loaded.model
        assert isinstance(clip, ClipModel)
        todo: list[tuple[_ImageJob, bool, bool]] = []
        for job in jobs:
            if job.failure is not None:
                continue
            job.whole = self.cache.get_whole(loaded.key, job.key, view)
            job.tiles = self.cache.get_tiles(loaded.key, job.key, grid_size)
            hits = (job.whole is not None) + (job.tiles is not None)
            self.metrics.cache_hits.labels(kind="image_view").inc(hits)
            self.metrics.cache_misses.labels(kind="image_view").inc(2 - hits)
            if hits == 2:
                info = self.cache.image_info(job.key)
                job.cache_hit = True
                job.width, job.height = (info.width, info.height) if info else (0, 0)
                continue
            if job.data is None:
                job.fail(
                    grpc.StatusCode.NOT_FOUND,
                    "content_key_not_found",
                    f"no cached embeddings of content key {job.key} for model {clip.name}, view "
                    f"{view} and grid {grid_size}: send the image bytes",
                )
                continue
            todo.append((job, job.whole is None, job.tiles is None))
        if not todo:
            return
        views = sum(
            need_whole + need_tiles * grid_size * grid_size for _, need_whole, need_tiles in todo
        )
        with loaded.batcher.admit(views) as admission, _cancel_on_error(call):
            futures = [
                self.pool.submit(
                    self._prepare,
                    loaded,
                    job.data or b"",
                    view if need_whole else None,
                    grid_size if need_tiles else 0,
                    admission,
                    call,
                )
                for job, need_whole, need_tiles in todo
            ]
            for (job, need_whole, need_tiles), future in zip(todo, futures, strict=True):
                prepared = self._wait_prepared(job, future, call)
                if prepared is None:
                    admission.release(need_whole + need_tiles * grid_size * grid_size)
                    continue
                embeddings = call.wait(prepared.embeddings)
                job.width, job.height = prepared.width, prepared.height
                info = ImageInfo(width=job.width, height=job.height, image_id=job.image_id)
                if need_whole:
                    job.whole = embeddings[0]
                    self.cache.put_whole(loaded.key, job.key, view, job.whole, info)
                if need_tiles:
                    job.tiles = embeddings[int(need_whole) :]
                    self.cache.put_tiles(loaded.key, job.key, grid_size, job.tiles, info)

    def _wait_prepared(
        self, job: _ImageJob, future: Future[_Prepared], call: _Call
    ) -> _Prepared | None:
        try:
            prepared: _Prepared = call.wait(future)
        except DecodeError as err:
            job.fail(grpc.StatusCode.INVALID_ARGUMENT, err.reason, str(err))
            return None
        except _TooSmall as err:
            job.fail(grpc.StatusCode.INVALID_ARGUMENT, "too_small", str(err))
            return None
        return prepared

    def _prepare(
        self,
        loaded: LoadedModel,
        data: bytes,
        global_view: str | None,
        grid_size: int,
        admission: Admission,
        call: _Call,
    ) -> _Prepared:
        """Decode an image, cut and preprocess its views, and queue them (in the pool)."""
        if call.cancelled.is_set():
            raise ServiceError(grpc.StatusCode.CANCELLED, "the request was cancelled")
        started = time.perf_counter()
        # JPEGs far larger than any view needs are decoded at a reduced scale. The scale depends
        # on the model and the server's grid limit, never on the request, so a cached view
        # embedding is the same whichever request computed it.
        min_side = loaded.model.preprocess.size
        if isinstance(loaded.model, ClipModel):
            min_side *= self.limits.max_grid_size
        decoded = decode_image(data, self.limits.max_pixels, min_side=min_side)
        try:
            pixels = image_views(
                decoded.image, loaded.model.preprocess, global_view=global_view, grid_size=grid_size
            )
        except ValueError as err:
            raise _TooSmall(str(err)) from err
        self.metrics.preprocess_seconds.observe(time.perf_counter() - started)
        future = loaded.batcher.submit(
            pixels, admission, timeout_s=call.remaining(), cancelled=call.cancelled
        )
        return _Prepared(width=decoded.width, height=decoded.height, embeddings=future)

    def _status(self, failure: ImageSourceError, method: str) -> pb.ImageStatus:
        self.metrics.images.labels(method=method, outcome="error").inc()
        decode_reason = failure.reason in DECODE_FAILURE_REASONS
        self.metrics.image_failed(failure.reason, decode=decode_reason)
        return pb.ImageStatus(
            code=CODE_NUMBERS[failure.code], message=failure.message, reason=failure.reason
        )

    # ----------------------------------------------------------------- Predict

    def _predict(self, request: pb.PredictRequest, call: _Call) -> pb.PredictResponse:
        loaded = self._classifier(request.model)
        classifier = loaded.model
        assert isinstance(classifier, ClassifierModel)
        self.limits.check_image_count(len(request.images))
        options = request.options
        threshold = (
            _unit_interval(options.threshold, "threshold")
            if options.HasField("threshold")
            else None
        )
        top_k = min(options.top_k, len(classifier.class_names))
        jobs = [self._job(image) for image in request.images]
        self._embed_classifier(loaded, jobs, call)
        response = pb.PredictResponse(
            model=classifier.name, class_names=classifier.class_names, request_id=request.request_id
        )
        for job in jobs:
            result = pb.PredictResult(id=job.image_id, content_key=job.key)
            if job.failure is not None or job.logits is None:
                assert job.failure is not None
                result.status.CopyFrom(self._status(job.failure, "Predict"))
                response.results.append(result)
                continue
            self.metrics.images.labels(method="Predict", outcome="ok").inc()
            scores = _sigmoid(job.logits)
            result.scores.extend(scores.tolist())
            order = np.argsort(-scores, kind="stable")
            chosen = list(order[:top_k])
            if threshold is not None:
                chosen += [i for i in order[top_k:] if scores[i] >= threshold]
            for index in chosen:
                result.labels.append(
                    pb.Label(
                        name=classifier.class_names[index],
                        index=int(index),
                        score=float(scores[index]),
                    )
                )
            response.results.append(result)
        return response

    def _embed_classifier(self, loaded: LoadedModel, jobs: list[_ImageJob], call: _Call) -> None:
        todo: list[_ImageJob] = []
        for job in jobs:
            if job.failure is not None:
                continue
            job.logits = self.prediction_cache.get_many(loaded.key, [job.key])[0]
            if job.logits is not None:
                self.metrics.cache_hits.labels(kind="image_view").inc()
                job.cache_hit = True
                continue
            self.metrics.cache_misses.labels(kind="image_view").inc()
            if job.data is None:
                job.fail(
                    grpc.StatusCode.NOT_FOUND,
                    "content_key_not_found",
                    f"no cached prediction of content key {job.key} for model "
                    f"{loaded.model.name}: send the image bytes",
                )
                continue
            todo.append(job)
        if not todo:
            return
        with loaded.batcher.admit(len(todo)) as admission, _cancel_on_error(call):
            futures = [
                self.pool.submit(
                    self._prepare, loaded, job.data or b"", "center_crop", 0, admission, call
                )
                for job in todo
            ]
            for job, future in zip(todo, futures, strict=True):
                prepared = self._wait_prepared(job, future, call)
                if prepared is None:
                    admission.release(1)
                    continue
                job.logits = call.wait(prepared.embeddings)[0]
                self.prediction_cache.put_many(loaded.key, [job.key], job.logits[None])


def _check_prompt_lengths(clip: ClipModel, prompts: Sequence[str]) -> None:
    """Reject a prompt whose tokens do not fit the text encoder's context.

    The tokenizer would cut such a prompt, so two class names that differ only after the cut
    would get the same embedding and the same scores.
    """
    tokenizer = clip.tokenizer
    room = tokenizer.context_length - 2  # the start and end tokens
    for prompt in prompts:
        length = len(tokenizer.encode(prompt))
        if length > room:
            _logger.info("rejected a prompt of %d tokens for model %s", length, clip.name)
            raise invalid_argument(
                f"prompt {echo(prompt, 80)} has {length} tokens, more than the {room} that "
                f"the text encoder of {clip.name} takes (context of {tokenizer.context_length} "
                "with start and end tokens): shorten the class name or the template"
            )


@contextlib.contextmanager
def _cancel_on_error(call: _Call) -> Iterator[None]:
    """Tell queued pool work of a request to skip itself once the request has failed."""
    try:
        yield
    except BaseException:
        call.cancelled.set()
        raise


def _finite(value: float, name: str) -> float:
    if not math.isfinite(value):
        raise invalid_argument(f"{name} must be a finite number, got {value}")
    return float(value)


def _unit_interval(value: float, name: str) -> float:
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise invalid_argument(f"{name} must be a number from 0 to 1, got {value}")
    return float(value)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    result: np.ndarray = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    return result.astype(np.float32)


def _matrix(values: np.ndarray) -> pb.FloatMatrix:
    rows, cols = values.shape
    return pb.FloatMatrix(rows=rows, cols=cols, values=values.reshape(-1).tolist())


def _preprocess_info(model: ClipModel | ClassifierModel) -> pb.Preprocess:
    config = model.preprocess
    return pb.Preprocess(
        size=config.size,
        mean=list(config.mean),
        std=list(config.std),
        interpolation=config.interpolation,
        resize_mode=config.resize_mode,
    )
