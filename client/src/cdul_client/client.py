"""The synchronous client of the cdul labeling service."""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Literal, overload

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cdul_client import _convert
from cdul_client._base import ClientSettings, check_max_in_flight, health_status_name
from cdul_client.config import (
    DEFAULT_TIMEOUT_S,
    ChannelConfig,
    PseudoLabelOptions,
    RetryConfig,
    TlsConfig,
)
from cdul_client.errors import LabelerError, error_from_rpc
from cdul_client.images import ImageInput, batched, split_image_input, to_proto_images
from cdul_client.results import (
    CropHit,
    ModelInfo,
    Prediction,
    PredictResponse,
    PseudoLabelResponse,
    PseudoLabelResult,
)
from cdul_proto.v1 import labeler_pb2, labeler_pb2_grpc

_logger = logging.getLogger(__name__)


class LabelerClient:
    """A blocking client of `cdul.v1.Labeler`, used as a context manager or closed with close().

    Every call has a deadline (`timeout_s`, 60 s by default) that covers its retries, and is
    retried with exponential backoff and jitter on UNAVAILABLE and RESOURCE_EXHAUSTED only,
    never for a message over a size limit. A request larger than
    `ChannelConfig.max_send_message_bytes` fails with RESOURCE_EXHAUSTED before it is sent.
    Every failure reaches the caller as a `LabelerError`. One client is safe to share
    between threads.

    Args:
        target: the server as HOST:PORT (any gRPC target string works).
        timeout_s: default deadline of one call, retries included, in seconds.
        token: bearer token, sent as `authorization: Bearer <token>` metadata on every call.
        tls: True for TLS with the system's root certificates, a TlsConfig for custom root
            certificates or mutual TLS, False for a plaintext channel.
        channel: message size limits, keepalive and raw channel arguments.
        retry: backoff settings; `RetryConfig(max_attempts=1)` disables retries.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        token: str | None = None,
        tls: bool | TlsConfig = False,
        channel: ChannelConfig | None = None,
        retry: RetryConfig | None = None,
    ) -> None:
        self._settings = ClientSettings(
            target, timeout_s=timeout_s, token=token, tls=tls, channel=channel, retry=retry
        )
        options = self._settings.channel_config.options()
        if self._settings.tls is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            if self._settings.tls.server_name:
                options.append(("grpc.ssl_target_name_override", self._settings.tls.server_name))
            self._channel = grpc.secure_channel(
                target, self._settings.tls.credentials(), options=options
            )
        self._stub = labeler_pb2_grpc.LabelerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @property
    def target(self) -> str:
        """The server this client talks to."""
        return self._settings.target

    def close(self) -> None:
        """Close the channel. Calls still in flight fail with CANCELLED."""
        self._channel.close()

    def __enter__(self) -> LabelerClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def pseudo_label(
        self,
        images: Sequence[ImageInput],
        class_names: Sequence[str],
        *,
        options: PseudoLabelOptions | None = None,
        model: str = "",
        timeout_s: float | None = None,
    ) -> PseudoLabelResponse:
        """Compute CDUL pseudo labels of a batch of images over `class_names`.

        Args:
            images: paths, encoded bytes, PIL images, uint8 arrays or ContentKeys, each
                optionally as an `(id, image)` pair; without an id, a path is its own id and
                anything else gets its index.
            class_names: the vocabulary, unique and non-blank.
            options: grid, threshold, lambda, view, templates, extra outputs.
            model: a CLIP model name; empty for the server's default CLIP model.
            timeout_s: deadline of this call in seconds; None for the client's default.

        Returns:
            One result per image in request order. A failed image has `ok` False and its
            status; the call itself fails only for whole-request problems.

        Raises:
            LabelerError: the call failed (bad vocabulary, unknown model, unreachable
                server after retries, deadline exceeded, ...).
        """
        request = _convert.pseudo_label_request(
            to_proto_images(images),
            class_names,
            options or PseudoLabelOptions(),
            model,
            _new_request_id(),
        )
        message = self._call(self._stub.PseudoLabel, request, timeout_s, "PseudoLabel")
        return _convert.pseudo_label_response(message)

    @overload
    def pseudo_label_batches(
        self,
        batches: Iterable[Sequence[ImageInput]],
        class_names: Sequence[str],
        *,
        options: PseudoLabelOptions | None = ...,
        model: str = ...,
        max_in_flight: int = ...,
        timeout_s: float | None = ...,
        return_exceptions: Literal[False] = ...,
    ) -> Iterator[PseudoLabelResponse]: ...

    @overload
    def pseudo_label_batches(
        self,
        batches: Iterable[Sequence[ImageInput]],
        class_names: Sequence[str],
        *,
        options: PseudoLabelOptions | None = ...,
        model: str = ...,
        max_in_flight: int = ...,
        timeout_s: float | None = ...,
        return_exceptions: Literal[True],
    ) -> Iterator[PseudoLabelResponse | LabelerError]: ...

    def pseudo_label_batches(
        self,
        batches: Iterable[Sequence[ImageInput]],
        class_names: Sequence[str],
        *,
        options: PseudoLabelOptions | None = None,
        model: str = "",
        max_in_flight: int = 4,
        timeout_s: float | None = None,
        return_exceptions: bool = False,
    ) -> Iterator[PseudoLabelResponse] | Iterator[PseudoLabelResponse | LabelerError]:
        """Pseudo-label a stream of batches with at most `max_in_flight` calls at once.

        Each batch is its own PseudoLabel call with its own deadline and retries, so a slow
        or failed batch never cancels the others. `batches` is read lazily, only as far as
        the in-flight bound allows, so it may be an endless generator.

        Args:
            batches: the image batches, in the forms that `pseudo_label` takes.
            class_names: the vocabulary of every batch.
            options: as for `pseudo_label`.
            model: as for `pseudo_label`.
            max_in_flight: most calls awaiting a response at any time.
            timeout_s: deadline of each call in seconds.
            return_exceptions: yield a failed batch's LabelerError in its place instead of
                raising it.

        Yields:
            One response per batch, in the order of `batches`.
        """
        resolved = options or PseudoLabelOptions()
        requests = (
            _convert.pseudo_label_request(
                to_proto_images(batch), class_names, resolved, model, _new_request_id()
            )
            for batch in batches
        )
        for outcome in self._bounded(
            self._stub.PseudoLabel, requests, max_in_flight, timeout_s, "PseudoLabel"
        ):
            if isinstance(outcome, LabelerError):
                if not return_exceptions:
                    raise outcome
                yield outcome
            else:
                yield _convert.pseudo_label_response(outcome)

    def pseudo_label_iter(
        self,
        images: Iterable[ImageInput],
        class_names: Sequence[str],
        *,
        options: PseudoLabelOptions | None = None,
        model: str = "",
        batch_size: int = 16,
        max_in_flight: int = 4,
        timeout_s: float | None = None,
    ) -> Iterator[PseudoLabelResult]:
        """Pseudo-label any number of images, batched, with bounded calls in flight.

        Images without an id get their position in `images` (paths keep their path).

        Yields:
            One result per image, in input order.

        Raises:
            LabelerError: a batch failed as a whole; results of earlier batches were yielded.
        """
        numbered = (split_image_input(item, index) for index, item in enumerate(images))
        for response in self.pseudo_label_batches(
            batched(numbered, batch_size),
            class_names,
            options=options,
            model=model,
            max_in_flight=max_in_flight,
            timeout_s=timeout_s,
        ):
            yield from response.results

    def predict(
        self,
        images: Sequence[ImageInput],
        *,
        model: str = "",
        top_k: int = 0,
        threshold: float | None = None,
        timeout_s: float | None = None,
    ) -> PredictResponse:
        """Score a batch of images with a trained classifier.

        Args:
            images: as for `pseudo_label`.
            model: a classifier name; empty for the server's default classifier.
            top_k: also return the k best labels of each image; 0 returns none.
            threshold: also return every label with a score of at least this value.
            timeout_s: deadline of this call in seconds; None for the client's default.

        Raises:
            LabelerError: the call failed.
        """
        request = _convert.predict_request(
            to_proto_images(images), model, top_k, threshold, _new_request_id()
        )
        message = self._call(self._stub.Predict, request, timeout_s, "Predict")
        return _convert.predict_response(message)

    def predict_batches(
        self,
        batches: Iterable[Sequence[ImageInput]],
        *,
        model: str = "",
        top_k: int = 0,
        threshold: float | None = None,
        max_in_flight: int = 4,
        timeout_s: float | None = None,
        return_exceptions: bool = False,
    ) -> Iterator[PredictResponse | LabelerError]:
        """Score a stream of batches with at most `max_in_flight` calls at once.

        Works like `pseudo_label_batches`: one Predict call per batch, with its own deadline
        and retries.

        Yields:
            One response per batch in order; a failed batch's LabelerError in its place when
            `return_exceptions` is True, else that error is raised.
        """
        requests = (
            _convert.predict_request(
                to_proto_images(batch), model, top_k, threshold, _new_request_id()
            )
            for batch in batches
        )
        for outcome in self._bounded(
            self._stub.Predict, requests, max_in_flight, timeout_s, "Predict"
        ):
            if isinstance(outcome, LabelerError):
                if not return_exceptions:
                    raise outcome
                yield outcome
            else:
                yield _convert.predict_response(outcome)

    def predict_iter(
        self,
        images: Iterable[ImageInput],
        *,
        model: str = "",
        top_k: int = 0,
        threshold: float | None = None,
        batch_size: int = 32,
        max_in_flight: int = 4,
        timeout_s: float | None = None,
    ) -> Iterator[Prediction]:
        """Score any number of images, batched, with bounded calls in flight.

        Yields:
            One prediction per image, in input order.

        Raises:
            LabelerError: a batch failed as a whole; earlier predictions were yielded.
        """
        numbered = (split_image_input(item, index) for index, item in enumerate(images))
        for response in self.predict_batches(
            batched(numbered, batch_size),
            model=model,
            top_k=top_k,
            threshold=threshold,
            max_in_flight=max_in_flight,
            timeout_s=timeout_s,
        ):
            if isinstance(response, LabelerError):  # only with return_exceptions
                raise response
            yield from response.results

    def search_crops(
        self,
        text: str,
        *,
        k: int = 10,
        model: str = "",
        include_whole_images: bool = False,
        timeout_s: float | None = None,
    ) -> list[CropHit]:
        """Return the cached tiles (and whole images, when asked) most similar to `text`.

        Raises:
            ValueError: empty text or k < 1.
            LabelerError: the call failed.
        """
        if not text.strip():
            raise ValueError("search text is empty: pass a description such as 'a red car'")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        request = labeler_pb2.SearchCropsRequest(
            model=model, text=text, k=k, include_whole_images=include_whole_images
        )
        message = self._call(self._stub.SearchCrops, request, timeout_s, "SearchCrops")
        return _convert.crop_hits(message)

    def list_models(self, *, timeout_s: float | None = None) -> list[ModelInfo]:
        """Return the models that the server serves."""
        message = self._call(
            self._stub.ListModels, labeler_pb2.ListModelsRequest(), timeout_s, "ListModels"
        )
        return [_convert.model_info(info) for info in message.models]

    def model_info(self, name: str, *, timeout_s: float | None = None) -> ModelInfo:
        """Describe one model by its name, as `list_models` lists it.

        Raises:
            LabelerError: NOT_FOUND for an unknown name.
        """
        message = self._call(
            self._stub.GetModelInfo,
            labeler_pb2.GetModelInfoRequest(name=name),
            timeout_s,
            "GetModelInfo",
        )
        return _convert.model_info(message)

    def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """Return the grpc.health.v1 status of the server, such as "SERVING" or "NOT_SERVING".

        Raises:
            LabelerError: the server is unreachable or has no health service.
        """
        request = health_pb2.HealthCheckRequest(service=service)
        message = self._call(self._health.Check, request, timeout_s, "Health.Check")
        return health_status_name(message.status)

    def _call(
        self,
        method: grpc.UnaryUnaryMultiCallable,
        request: Any,
        timeout_s: float | None,
        name: str,
    ) -> Any:
        deadline = time.monotonic() + self._settings.call_timeout(timeout_s)
        self._settings.check_request_size(request, name)
        for attempt in itertools.count(1):
            try:
                return method(
                    request,
                    timeout=max(deadline - time.monotonic(), 0.001),
                    metadata=self._settings.metadata,
                )
            except grpc.RpcError as err:
                error = error_from_rpc(err)
                delay = self._settings.retry_delay_s(error, attempt, deadline, name)
                if delay is None:
                    raise error from err
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _bounded(
        self,
        method: grpc.UnaryUnaryMultiCallable,
        requests: Iterable[Any],
        max_in_flight: int,
        timeout_s: float | None,
        name: str,
    ) -> Iterator[Any]:
        """Yield each request's response (or LabelerError) in order, bounding calls in flight.

        Retries of a call run when it reaches the head of the queue, while the calls behind
        it stay in flight.
        """
        check_max_in_flight(max_in_flight)
        timeout = self._settings.call_timeout(timeout_s)
        pending: deque[_PendingCall] = deque()
        source = iter(requests)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < max_in_flight:
                    request = next(source, None)
                    if request is None:
                        exhausted = True
                        break
                    deadline = time.monotonic() + timeout
                    try:
                        self._settings.check_request_size(request, name)
                    except LabelerError as error:
                        pending.append(_PendingCall(request, None, deadline, error))
                        continue
                    pending.append(self._start(method, request, deadline))
                if not pending:
                    return
                yield self._finish(method, pending.popleft(), name)
        finally:
            for call in pending:
                if call.future is not None:
                    call.future.cancel()

    def _start(
        self, method: grpc.UnaryUnaryMultiCallable, request: Any, deadline: float
    ) -> _PendingCall:
        future = method.future(
            request,
            timeout=max(deadline - time.monotonic(), 0.001),
            metadata=self._settings.metadata,
        )
        return _PendingCall(request, future, deadline)

    def _finish(self, method: grpc.UnaryUnaryMultiCallable, call: _PendingCall, name: str) -> Any:
        for attempt in itertools.count(1):
            if call.future is None:
                return call.error
            try:
                return call.future.result()
            except grpc.RpcError as err:
                error = error_from_rpc(err)
                delay = self._settings.retry_delay_s(error, attempt, call.deadline, name)
                if delay is None:
                    return error
            time.sleep(delay)
            call = self._start(method, call.request, call.deadline)
        raise AssertionError("unreachable")


class _PendingCall:
    """A call in flight, or (with `future` None) one that failed before it was sent."""

    __slots__ = ("deadline", "error", "future", "request")

    def __init__(
        self,
        request: Any,
        future: grpc.Future | None,
        deadline: float,
        error: LabelerError | None = None,
    ) -> None:
        self.request = request
        self.future = future
        self.deadline = deadline
        self.error = error


def _new_request_id() -> str:
    return uuid.uuid4().hex
