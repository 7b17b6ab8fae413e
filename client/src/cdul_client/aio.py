"""The asyncio client of the cdul labeling service, with the same methods as LabelerClient."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
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


class AsyncLabelerClient:
    """An asyncio client of `cdul.v1.Labeler`, used with `async with` or closed with close().

    The methods, arguments, deadlines, retries and errors are those of `LabelerClient`,
    as coroutines and async iterators. Create it inside the event loop that uses it.
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
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            if self._settings.tls.server_name:
                options.append(("grpc.ssl_target_name_override", self._settings.tls.server_name))
            self._channel = grpc.aio.secure_channel(
                target, self._settings.tls.credentials(), options=options
            )
        self._stub = labeler_pb2_grpc.LabelerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @property
    def target(self) -> str:
        """The server this client talks to."""
        return self._settings.target

    async def close(self) -> None:
        """Close the channel. Calls still in flight fail with CANCELLED."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncLabelerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def pseudo_label(
        self,
        images: Sequence[ImageInput],
        class_names: Sequence[str],
        *,
        options: PseudoLabelOptions | None = None,
        model: str = "",
        timeout_s: float | None = None,
    ) -> PseudoLabelResponse:
        """Compute CDUL pseudo labels of a batch; see `LabelerClient.pseudo_label`."""
        request = _convert.pseudo_label_request(
            to_proto_images(images),
            class_names,
            options or PseudoLabelOptions(),
            model,
            uuid.uuid4().hex,
        )
        message = await self._call(self._stub.PseudoLabel, request, timeout_s, "PseudoLabel")
        return _convert.pseudo_label_response(message)

    async def pseudo_label_batches(
        self,
        batches: Iterable[Sequence[ImageInput]] | AsyncIterable[Sequence[ImageInput]],
        class_names: Sequence[str],
        *,
        options: PseudoLabelOptions | None = None,
        model: str = "",
        max_in_flight: int = 4,
        timeout_s: float | None = None,
        return_exceptions: bool = False,
    ) -> AsyncIterator[PseudoLabelResponse | LabelerError]:
        """Pseudo-label a stream of batches with bounded calls in flight.

        See `LabelerClient.pseudo_label_batches`; `batches` may also be an async iterable.

        Yields:
            One response per batch in order; a failed batch's LabelerError in its place when
            `return_exceptions` is True, else that error is raised.
        """
        resolved = options or PseudoLabelOptions()

        def build(batch: Sequence[ImageInput]) -> labeler_pb2.PseudoLabelRequest:
            return _convert.pseudo_label_request(
                to_proto_images(batch), class_names, resolved, model, uuid.uuid4().hex
            )

        async for outcome in self._bounded(
            self._stub.PseudoLabel, batches, build, max_in_flight, timeout_s, "PseudoLabel"
        ):
            if isinstance(outcome, LabelerError):
                if not return_exceptions:
                    raise outcome
                yield outcome
            else:
                yield _convert.pseudo_label_response(outcome)

    async def pseudo_label_iter(
        self,
        images: Iterable[ImageInput],
        class_names: Sequence[str],
        *,
        options: PseudoLabelOptions | None = None,
        model: str = "",
        batch_size: int = 16,
        max_in_flight: int = 4,
        timeout_s: float | None = None,
    ) -> AsyncIterator[PseudoLabelResult]:
        """Pseudo-label any number of images; see `LabelerClient.pseudo_label_iter`."""
        numbered = (split_image_input(item, index) for index, item in enumerate(images))
        async for response in self.pseudo_label_batches(
            batched(numbered, batch_size),
            class_names,
            options=options,
            model=model,
            max_in_flight=max_in_flight,
            timeout_s=timeout_s,
        ):
            if isinstance(response, LabelerError):  # only with return_exceptions
                raise response
            for result in response.results:
                yield result

    async def predict(
        self,
        images: Sequence[ImageInput],
        *,
        model: str = "",
        top_k: int = 0,
        threshold: float | None = None,
        timeout_s: float | None = None,
    ) -> PredictResponse:
        """Score a batch with a trained classifier; see `LabelerClient.predict`."""
        request = _convert.predict_request(
            to_proto_images(images), model, top_k, threshold, uuid.uuid4().hex
        )
        message = await self._call(self._stub.Predict, request, timeout_s, "Predict")
        return _convert.predict_response(message)

    async def predict_batches(
        self,
        batches: Iterable[Sequence[ImageInput]] | AsyncIterable[Sequence[ImageInput]],
        *,
        model: str = "",
        top_k: int = 0,
        threshold: float | None = None,
        max_in_flight: int = 4,
        timeout_s: float | None = None,
        return_exceptions: bool = False,
    ) -> AsyncIterator[PredictResponse | LabelerError]:
        """Score a stream of batches; see `LabelerClient.predict_batches`."""

        def build(batch: Sequence[ImageInput]) -> labeler_pb2.PredictRequest:
            return _convert.predict_request(
                to_proto_images(batch), model, top_k, threshold, uuid.uuid4().hex
            )

        async for outcome in self._bounded(
            self._stub.Predict, batches, build, max_in_flight, timeout_s, "Predict"
        ):
            if isinstance(outcome, LabelerError):
                if not return_exceptions:
                    raise outcome
                yield outcome
            else:
                yield _convert.predict_response(outcome)

    async def predict_iter(
        self,
        images: Iterable[ImageInput],
        *,
        model: str = "",
        top_k: int = 0,
        threshold: float | None = None,
        batch_size: int = 32,
        max_in_flight: int = 4,
        timeout_s: float | None = None,
    ) -> AsyncIterator[Prediction]:
        """Score any number of images; see `LabelerClient.predict_iter`."""
        numbered = (split_image_input(item, index) for index, item in enumerate(images))
        async for response in self.predict_batches(
            batched(numbered, batch_size),
            model=model,
            top_k=top_k,
            threshold=threshold,
            max_in_flight=max_in_flight,
            timeout_s=timeout_s,
        ):
            if isinstance(response, LabelerError):  # only with return_exceptions
                raise response
            for prediction in response.results:
                yield prediction

    async def search_crops(
        self,
        text: str,
        *,
        k: int = 10,
        model: str = "",
        include_whole_images: bool = False,
        timeout_s: float | None = None,
    ) -> list[CropHit]:
        """Return the cached views most similar to `text`; see `LabelerClient.search_crops`."""
        if not text.strip():
            raise ValueError("search text is empty: pass a description such as 'a red car'")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        request = labeler_pb2.SearchCropsRequest(
            model=model, text=text, k=k, include_whole_images=include_whole_images
        )
        message = await self._call(self._stub.SearchCrops, request, timeout_s, "SearchCrops")
        return _convert.crop_hits(message)

    async def list_models(self, *, timeout_s: float | None = None) -> list[ModelInfo]:
        """Return the models that the server serves."""
        message = await self._call(
            self._stub.ListModels, labeler_pb2.ListModelsRequest(), timeout_s, "ListModels"
        )
        return [_convert.model_info(info) for info in message.models]

    async def model_info(self, name: str, *, timeout_s: float | None = None) -> ModelInfo:
        """Describe one model by its name; see `LabelerClient.model_info`."""
        message = await self._call(
            self._stub.GetModelInfo,
            labeler_pb2.GetModelInfoRequest(name=name),
            timeout_s,
            "GetModelInfo",
        )
        return _convert.model_info(message)

    async def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """Return the grpc.health.v1 status of the server, such as "SERVING"."""
        request = health_pb2.HealthCheckRequest(service=service)
        message = await self._call(self._health.Check, request, timeout_s, "Health.Check")
        return health_status_name(message.status)

    async def _call(self, method: Any, request: Any, timeout_s: float | None, name: str) -> Any:
        deadline = time.monotonic() + self._settings.call_timeout(timeout_s)
        return await self._call_until(method, request, deadline, name)

    async def _call_until(self, method: Any, request: Any, deadline: float, name: str) -> Any:
        self._settings.check_request_size(request, name)
        for attempt in itertools.count(1):
            try:
                return await method(
                    request,
                    timeout=max(deadline - time.monotonic(), 0.001),
                    metadata=self._settings.metadata,
                )
            except grpc.RpcError as err:
                error = error_from_rpc(err)
                delay = self._settings.retry_delay_s(error, attempt, deadline, name)
                if delay is None:
                    raise error from err
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _outcome(self, method: Any, request: Any, deadline: float, name: str) -> Any:
        try:
            return await self._call_until(method, request, deadline, name)
        except LabelerError as error:
            return error

    async def _bounded(
        self,
        method: Any,
        batches: Iterable[Sequence[ImageInput]] | AsyncIterable[Sequence[ImageInput]],
        build: Any,
        max_in_flight: int,
        timeout_s: float | None,
        name: str,
    ) -> AsyncIterator[Any]:
        check_max_in_flight(max_in_flight)
        timeout = self._settings.call_timeout(timeout_s)
        pending: deque[asyncio.Task[Any]] = deque()
        source = _aiter(batches)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < max_in_flight:
                    try:
                        batch = await anext(source)
                    except StopAsyncIteration:
                        exhausted = True
                        break
                    deadline = time.monotonic() + timeout
                    pending.append(
                        asyncio.create_task(self._outcome(method, build(batch), deadline, name))
                    )
                if not pending:
                    return
                yield await pending.popleft()
        finally:
            for task in pending:
                task.cancel()


async def _aiter(items: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
