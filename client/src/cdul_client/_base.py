"""Settings and retry decisions that the sync and asyncio clients share."""

from __future__ import annotations

import logging
import math
import random
import re
import time
from typing import Any

import grpc

from cdul_client.config import ChannelConfig, RetryConfig, TlsConfig
from cdul_client.errors import LabelerError

_logger = logging.getLogger(__name__)

_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")
MESSAGE_TOO_LARGE_REASON = "message_too_large"
# Status details of a message over a size limit: grpcio's own ("Sent message larger than max
# (N vs. M)", "Received message larger than max ..."), cdul-server's (which name its
# --max-receive-message-bytes and --max-send-message-bytes flags) and this client's (which
# name max_send_message_bytes).
_MESSAGE_TOO_LARGE = re.compile(
    r"larger than max|max[-_](send|receive)[-_]message[-_](bytes|length)", re.IGNORECASE
)


def is_message_size_error(error: LabelerError) -> bool:
    """Return whether a failed call exceeded a message size limit, so a retry cannot help."""
    return error.reason == MESSAGE_TOO_LARGE_REASON or bool(
        _MESSAGE_TOO_LARGE.search(error.message)
    )


class ClientSettings:
    """The resolved settings of one client: target, deadline, credentials and retries."""

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float,
        token: str | None,
        tls: bool | TlsConfig,
        channel: ChannelConfig | None,
        retry: RetryConfig | None,
    ) -> None:
        if not target or target.startswith(("http://", "https://")):
            raise ValueError(
                f"target {target!r} is not a gRPC target: pass HOST:PORT, such as localhost:50051"
            )
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a finite number > 0 s, got {timeout_s}")
        if token is not None and (not token or "\n" in token or token != token.strip()):
            raise ValueError(
                "token is empty or contains whitespace at its ends or a line break: pass the "
                "bare bearer token"
            )
        self.target = target
        self.timeout_s = timeout_s
        self.channel_config = channel or ChannelConfig()
        self.retry = retry or RetryConfig()
        self.tls: TlsConfig | None = TlsConfig() if tls is True else (tls or None)
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self.rng = random.Random()
        host = target.removeprefix("dns:///").rsplit(":", 1)[0]
        if token and self.tls is None and host not in _LOOPBACK_HOSTS:
            _logger.warning(
                "sending a bearer token to %s over a plaintext channel: enable TLS", target
            )

    def call_timeout(self, timeout_s: float | None) -> float:
        """Return the deadline of one call in seconds: the given one or the client's default."""
        if timeout_s is None:
            return self.timeout_s
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a finite number > 0 s, got {timeout_s}")
        return timeout_s

    def check_request_size(self, request: Any, method: str) -> None:
        """Raise a RESOURCE_EXHAUSTED LabelerError for a request over max_send_message_bytes.

        The check runs before the request is sent. gRPC checks the limit too, but only after
        serializing the request, and its error does not name the setting to change.
        """
        size = request.ByteSize()
        limit = self.channel_config.max_send_message_bytes
        if size > limit:
            raise LabelerError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the {method} request is {size} bytes, more than max_send_message_bytes "
                f"{limit}: send fewer or smaller images per call, or raise "
                "max_send_message_bytes (and the server's --max-receive-message-bytes)",
                reason=MESSAGE_TOO_LARGE_REASON,
            )

    def retry_delay_s(
        self, error: LabelerError, attempt: int, deadline: float, method: str
    ) -> float | None:
        """Return how long to wait before retrying a failed attempt, or None to give up.

        A call is retried only on a retryable status, while attempts are left, and when the
        retry can start before the call's deadline.
        """
        if error.code not in self.retry.retryable_codes or attempt >= self.retry.max_attempts:
            return None
        if is_message_size_error(error):
            # A message over a size limit is RESOURCE_EXHAUSTED too, but the same message
            # would exceed the limit again.
            return None
        delay = self.retry.backoff_s(attempt, self.rng)
        if time.monotonic() + delay >= deadline:
            return None
        _logger.info(
            "%s failed with %s (attempt %d of %d), retrying in %.2f s: %s",
            method,
            error.code.name,
            attempt,
            self.retry.max_attempts,
            delay,
            error.message,
        )
        return delay


def check_max_in_flight(max_in_flight: int) -> None:
    """Raise ValueError unless at least one request may be in flight."""
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")


def health_status_name(status: int) -> str:
    """Return the name of a grpc.health.v1 serving status, such as "SERVING"."""
    from grpc_health.v1 import health_pb2

    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
