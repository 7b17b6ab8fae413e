"""Settings of a client: channel options, TLS, retries and the pseudo-label options."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

_logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
GLOBAL_VIEWS = ("center_crop", "squash", "pad")


@dataclass(frozen=True)
class ChannelConfig:
    """gRPC channel options, set explicitly instead of relying on gRPC's defaults.

    Attributes:
        max_send_message_bytes: largest request the client sends; a larger one fails with
            RESOURCE_EXHAUSTED before it is sent (gRPC's default is unlimited on the client but
            4 MiB on most servers, so a batch of large photographs needs the server raised too).
        max_receive_message_bytes: largest response the client accepts; embeddings of a big
            batch exceed gRPC's 4 MiB default.
        keepalive_time_ms: interval of HTTP/2 keepalive pings; 0 disables them.
        keepalive_timeout_ms: how long a ping waits for its acknowledgement before the
            connection counts as dead.
        keepalive_permit_without_calls: also ping while no call is active.
        channel_args: raw `(name, value)` gRPC channel arguments, appended last so they win.
    """

    max_send_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_receive_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    keepalive_time_ms: int = 30_000
    keepalive_timeout_ms: int = 10_000
    keepalive_permit_without_calls: bool = False
    channel_args: tuple[tuple[str, str | int], ...] = ()

    def __post_init__(self) -> None:
        for name in ("max_send_message_bytes", "max_receive_message_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 byte, got {getattr(self, name)}")
        for name in ("keepalive_time_ms", "keepalive_timeout_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 ms, got {getattr(self, name)}")

    def options(self) -> list[tuple[str, str | int]]:
        """Return the options list for `grpc.insecure_channel` / `grpc.secure_channel`."""
        options: list[tuple[str, str | int]] = [
            ("grpc.max_send_message_length", self.max_send_message_bytes),
            ("grpc.max_receive_message_length", self.max_receive_message_bytes),
        ]
        if self.keepalive_time_ms > 0:
            options += [
                ("grpc.keepalive_time_ms", self.keepalive_time_ms),
                ("grpc.keepalive_timeout_ms", self.keepalive_timeout_ms),
                ("grpc.keepalive_permit_without_calls", int(self.keepalive_permit_without_calls)),
            ]
        options.extend(self.channel_args)
        return options


@dataclass(frozen=True)
class TlsConfig:
    """TLS settings of a secure channel.

    Attributes:
        root_certificates: PEM root certificates as bytes, or the path of a PEM file; None uses
            the system's trust store (as chosen by gRPC).
        certificate_chain: PEM client certificate (bytes or path) for mutual TLS.
        private_key: PEM key of the client certificate (bytes or path).
        server_name: expected name in the server's certificate when it differs from the host
            in the target (`grpc.ssl_target_name_override`).
    """

    root_certificates: bytes | Path | None = None
    certificate_chain: bytes | Path | None = None
    private_key: bytes | Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """Build the gRPC channel credentials, reading certificate files now."""
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError(
                "mutual TLS needs both certificate_chain and private_key, got only one: "
                "pass both or neither"
            )
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.root_certificates, "root_certificates"),
            private_key=_read_pem(self.private_key, "private_key"),
            certificate_chain=_read_pem(self.certificate_chain, "certificate_chain"),
        )


def _read_pem(value: bytes | Path | None, name: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    path = Path(value)
    try:
        return path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {name} file {path}: {err.strerror}") from err


@dataclass(frozen=True)
class RetryConfig:
    """Exponential backoff with jitter for calls that failed with a retryable status.

    Only UNAVAILABLE (server starting, draining or unreachable) and RESOURCE_EXHAUSTED (queue
    full) are retried, except a RESOURCE_EXHAUSTED for a message over the size limit; every
    other status reaches the caller at once. Every cdul call is
    idempotent, so a retried call cannot label an image twice. The delay before retry n
    (n = 1, 2, ...) is drawn uniformly from
    `[(1 - jitter) * d, d]` with `d = min(max_backoff_s, initial_backoff_s * multiplier**(n-1))`.

    Attributes:
        max_attempts: attempts in all, the first one included; 1 disables retries.
        initial_backoff_s: delay before the first retry, before jitter.
        max_backoff_s: upper bound of one delay.
        multiplier: growth factor of the delay per retry.
        jitter: fraction in [0, 1] of the delay that is randomized.
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    multiplier: float = 2.0
    jitter: float = 0.5
    retryable_codes: frozenset[grpc.StatusCode] = field(
        default=frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
    )

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError(
                f"backoff delays must be >= 0 s, got initial {self.initial_backoff_s}, "
                f"max {self.max_backoff_s}"
            )
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def backoff_s(self, retry: int, rng: random.Random | None = None) -> float:
        """Return the delay in seconds before retry number `retry` (1 for the first retry)."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        draw = (rng or random).random()
        return ceiling * (1.0 - self.jitter * draw)


@dataclass(frozen=True)
class PseudoLabelOptions:
    """How the server turns an image into pseudo labels.

    Attributes:
        grid_size: tiles per side of the grid (3 gives 9 tiles).
        threshold: aggregation threshold in [0, 1] on the per-class maximum over tiles; None
            is the server's default (0).
        lambda_weight: weight in [0, 1] of |global - aggregate| in the final pseudo label;
            None is 0.
        temperature: multiplier of the cosine similarities, finite and > 0; None is the
            model's logit scale.
        global_view: "center_crop", "squash" or "pad".
        templates: prompt templates with one "{}" each; empty uses the model's defaults.
        return_tile_scores: also return the (grid_size^2, C) tile scores.
        return_embeddings: also return the whole-image and tile embeddings.
    """

    grid_size: int = 3
    threshold: float | None = None
    lambda_weight: float | None = None
    temperature: float | None = None
    global_view: str = "center_crop"
    templates: Sequence[str] = ()
    return_tile_scores: bool = False
    return_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.grid_size < 1:
            raise ValueError(f"grid_size must be at least 1, got {self.grid_size}")
        for name in ("threshold", "lambda_weight"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.temperature is not None and not (
            math.isfinite(self.temperature) and self.temperature > 0
        ):
            raise ValueError(
                f"temperature must be a finite number > 0, got {self.temperature}: pass about "
                "100 for CLIP, or None for the model's logit scale"
            )
        if self.global_view not in GLOBAL_VIEWS:
            raise ValueError(
                f"global_view {self.global_view!r} is not one of {', '.join(GLOBAL_VIEWS)}"
            )
        if isinstance(self.templates, str):
            raise TypeError(
                f"templates must be a sequence of strings, got the string {self.templates!r}: "
                "wrap it in a list"
            )
        for template in self.templates:
            if template.count("{}") != 1:
                raise ValueError(
                    f"template {template!r} must contain exactly one '{{}}' for the class name"
                )
        object.__setattr__(self, "templates", tuple(self.templates))
