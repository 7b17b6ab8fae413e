"""Request errors and their gRPC status codes, mapped in one place.

Handlers raise :class:`ServiceError` (or one of the library errors below); the servicer turns
each into a status with :func:`status_for_exception`. Per-image problems never raise: they
become an ``ImageStatus`` in that image's result.
"""

from __future__ import annotations

import concurrent.futures
import logging

import grpc

_logger = logging.getLogger(__name__)

#: Characters of a user value (a model name, URI, text) that an error message repeats.
MAX_ECHO_CHARS = 200
#: Characters of a whole status message. gRPC sends the message in the trailing metadata, which
#: a client rejects above 16 KiB by default (grpc.max_metadata_size), so messages stay far below.
MAX_MESSAGE_CHARS = 2000


def echo(value: object, max_chars: int = MAX_ECHO_CHARS) -> str:
    """Return ``repr(value)`` for an error message, shortened to about ``max_chars`` characters.

    A shortened value ends with ``...`` and its full length, such as ``'aaaa'... (20000 chars)``.
    """
    text = str(value)
    if len(text) <= max_chars:
        return repr(text) if isinstance(value, str) else text
    head = text[:max_chars]
    return f"{head!r}... ({len(text)} chars)" if isinstance(value, str) else f"{head}..."


def clip_message(message: str, max_chars: int = MAX_MESSAGE_CHARS) -> str:
    """Shorten a status message to ``max_chars`` characters, marking the cut with ``...``."""
    if len(message) <= max_chars:
        return message
    return message[: max_chars - 3] + "..."


class ServiceError(Exception):
    """A whole-request failure with the gRPC status code that the call ends with.

    The message is shortened to :data:`MAX_MESSAGE_CHARS`, so that a long user value repeated
    in it cannot push the status past gRPC's metadata size limit.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        message = clip_message(message)
        super().__init__(message)
        self.code = code
        self.message = message


class QueueFullError(ServiceError):
    """The encoder queue has no room for a request's views."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


class DrainingError(ServiceError):
    """The server is shutting down and takes no new work."""

    def __init__(
        self, message: str = "the server is shutting down: retry on another replica"
    ) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)


def invalid_argument(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, message)


def resource_exhausted(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def deadline_exceeded(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, message)


def status_for_exception(err: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map an exception raised while serving a request to a status code and message.

    ServiceError carries its own code, and a timed-out wait maps to DEADLINE_EXCEEDED. Anything
    else is a server bug: it is logged with its traceback and returned as INTERNAL without
    internals.
    """
    if isinstance(err, ServiceError):
        return err.code, clip_message(err.message)
    if isinstance(err, concurrent.futures.TimeoutError | TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the request deadline passed before it finished"
    if isinstance(err, concurrent.futures.CancelledError):
        return grpc.StatusCode.CANCELLED, "the request was cancelled"
    _logger.error("request failed with an unexpected error", exc_info=err)
    return grpc.StatusCode.INTERNAL, f"internal server error ({type(err).__name__}); see server log"


# google.rpc.Code numbers for the per-image ImageStatus.code field.
CODE_NUMBERS: dict[grpc.StatusCode, int] = {code: code.value[0] for code in grpc.StatusCode}
