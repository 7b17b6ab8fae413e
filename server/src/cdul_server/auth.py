"""Bearer-token authentication for every RPC except health checks."""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any

import grpc

from cdul_server.interceptors import HEALTH_SERVICE_PREFIX, CallInterceptor

_logger = logging.getLogger(__name__)


def read_token_file(path: Path) -> str:
    """Read a bearer token: the file's content without surrounding whitespace.

    Raises:
        ValueError: The file cannot be read or holds no token.
    """
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read the token file {path} (--auth-token-file): {err}") from err
    if not token:
        raise ValueError(
            f"the token file {path} is empty (--auth-token-file): write a token into it"
        )
    if any(ch.isspace() for ch in token):
        raise ValueError(
            f"the token in {path} contains whitespace (--auth-token-file): use one word"
        )
    return token


class BearerTokenInterceptor(CallInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` metadata as UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the bearer token must not be empty")
        self._expected = f"Bearer {token}".encode()
        self._rejected = 0

    def applies(self, method: str) -> bool:
        return not method.startswith(HEALTH_SERVICE_PREFIX)

    def begin(self, method: str, context: grpc.ServicerContext) -> Any:
        presented = ""
        for key, value in context.invocation_metadata():
            if key == "authorization":
                presented = value if isinstance(value, str) else value.decode("latin-1")
        if hmac.compare_digest(presented.encode("utf-8", "replace"), self._expected):
            return None
        self._rejected += 1
        # Count repeats in the log rather than logging every rejected call.
        if self._rejected in (1, 10, 100, 1000) or self._rejected % 10000 == 0:
            _logger.warning(
                "rejected %d calls without a valid bearer token (latest: %s from %s)",
                self._rejected,
                method,
                context.peer(),
            )
        message = (
            "missing bearer token: send metadata 'authorization: Bearer <token>'"
            if not presented
            else "invalid bearer token"
        )
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        return None
