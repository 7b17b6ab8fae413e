"""A base for server interceptors that run code before and after every call of any kind."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from cdul_server.errors import DrainingError

_logger = logging.getLogger(__name__)

HEALTH_SERVICE_PREFIX = "/grpc.health.v1.Health/"


class CallInterceptor(grpc.ServerInterceptor):
    """Calls :meth:`begin` before and :meth:`end` after each call of the methods it applies to.

    ``begin`` may reject a call with ``context.abort``. For calls that stream responses,
    ``end`` runs when the stream finishes. Subclasses override :meth:`applies`, :meth:`begin`
    and :meth:`end`.
    """

    def applies(self, method: str) -> bool:
        return True

    def begin(self, method: str, context: grpc.ServicerContext) -> Any:
        return None

    def end(
        self, method: str, context: grpc.ServicerContext, state: Any, error: BaseException | None
    ) -> None:
        return None

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self.applies(method):
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(method, handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(method, handler.stream_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap_unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            state = self.begin(method, context)
            error: BaseException | None = None
            try:
                return behavior(request, context)
            except BaseException as err:
                error = err
                raise
            finally:
                self.end(method, context, state, error)

        return wrapped

    def _wrap_stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            state = self.begin(method, context)
            error: BaseException | None = None
            try:
                yield from behavior(request, context)
            except BaseException as err:
                error = err
                raise
            finally:
                self.end(method, context, state, error)

        return wrapped


class _Once:
    """Wraps a callable so that only its first call runs it."""

    def __init__(self, function: Callable[[], None]) -> None:
        self._function: Callable[[], None] | None = function
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            function, self._function = self._function, None
        if function is not None:
            function()


class DrainGate(CallInterceptor):
    """Counts calls in flight; rejects calls with UNAVAILABLE while starting or draining.

    Health checks pass through, so that probes can see NOT_SERVING while the server drains.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._in_flight = 0
        self._draining = False
        self._starting = False
        self._last_call = time.monotonic()

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._in_flight

    @property
    def draining(self) -> bool:
        with self._cond:
            return self._draining

    def applies(self, method: str) -> bool:
        return not method.startswith(HEALTH_SERVICE_PREFIX)

    def begin(self, method: str, context: grpc.ServicerContext) -> Any:
        with self._cond:
            self._last_call = time.monotonic()
            admitted = not self._draining and not self._starting
            if admitted:
                self._in_flight += 1
            starting = self._starting and not self._draining
        if admitted:
            # The handler returns before gRPC has sent the response. So a call counts as in
            # flight until gRPC reports it terminated, and shutdown cannot cut a reply.
            release = _Once(self._release)
            if not context.add_callback(release):
                release()
            return True
        error = DrainingError(
            "the server is starting: wait until its health check reports SERVING"
            if starting
            else "the server is shutting down: retry on another replica"
        )
        context.abort(error.code, error.message)
        return False

    def _release(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self._last_call = time.monotonic()
            self._cond.notify_all()

    def set_starting(self, starting: bool) -> None:
        with self._cond:
            self._starting = starting

    def start_draining(self) -> None:
        with self._cond:
            self._draining = True

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no call is in flight; return False when ``timeout_s`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._in_flight == 0, timeout=timeout_s)

    def wait_quiet(self, quiet_s: float, timeout_s: float) -> bool:
        """Wait until no call has arrived or ended for ``quiet_s`` seconds, at most ``timeout_s``.

        Returns False when calls kept arriving until the timeout.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            with self._cond:
                quiet_until = self._last_call + quiet_s
            now = time.monotonic()
            if now >= quiet_until:
                return True
            if now >= deadline:
                return False
            time.sleep(min(quiet_until, deadline) - now)
