"""The one exception type of cdul_client, and the translation of gRPC errors into it."""

from __future__ import annotations

import logging

import grpc

_logger = logging.getLogger(__name__)

_CODES_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


class LabelerError(Exception):
    """A failed call, or a failed image inside a successful call.

    Attributes:
        code: the gRPC status code, such as `grpc.StatusCode.UNAVAILABLE`.
        message: the server's (or the transport's) description of the failure.
        image_id: the caller's id of the image that failed, or None for a whole-call failure.
        reason: the server's machine-readable reason for a failed image, such as
            "decode_failed"; empty when the server gave none.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        image_id: str | None = None,
        reason: str = "",
    ) -> None:
        self.code = code
        self.message = message
        self.image_id = image_id
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.reason:
            text += f" ({self.reason})"
        if self.image_id is not None:
            text += f" [image {self.image_id!r}]"
        return text

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_error, (self.code, self.message, self.image_id, self.reason))


def _rebuild_error(
    code: grpc.StatusCode, message: str, image_id: str | None, reason: str
) -> LabelerError:
    return LabelerError(code, message, image_id=image_id, reason=reason)


def status_code_from_number(number: int) -> grpc.StatusCode:
    """Return the gRPC status code of a google.rpc.Code number; UNKNOWN for unknown numbers."""
    return _CODES_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def error_from_rpc(err: grpc.RpcError) -> LabelerError:
    """Translate a grpc.RpcError (sync or asyncio) into a LabelerError."""
    code_method = getattr(err, "code", None)
    details_method = getattr(err, "details", None)
    code = code_method() if callable(code_method) else None
    details = details_method() if callable(details_method) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return LabelerError(code, details or str(err) or code.name)
