"""Image sources of a request: content keys and server-side ``file://`` URIs."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

import grpc

from cdul_server.errors import echo

_logger = logging.getLogger(__name__)

_CONTENT_KEY = re.compile(r"^[0-9a-f]{64}$")


class ImageSourceError(Exception):
    """A per-image problem with where the image comes from."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


def content_key(data: bytes) -> str:
    """Return the lowercase hex SHA-256 of encoded image bytes."""
    return hashlib.sha256(data).hexdigest()


def normalize_content_key(key: str) -> str:
    """Return a content key in lowercase hex.

    Raises:
        ImageSourceError: The key is not 64 hex digits (INVALID_ARGUMENT).
    """
    normalized = key.strip().lower()
    if not _CONTENT_KEY.match(normalized):
        raise ImageSourceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid_content_key",
            f"content key {echo(key)} is not a SHA-256 in hex (64 hex digits)",
        )
    return normalized


class FileReader:
    """Reads ``file://`` URIs under configured root folders only.

    Roots and requested paths are resolved (symlinks followed, ``..`` removed) before the
    containment check, so neither can point outside a root.

    Args:
        roots: Folders under which files may be read; empty turns file reading off.
        max_bytes: Largest file read.
    """

    def __init__(self, roots: Sequence[Path], max_bytes: int) -> None:
        self.roots = tuple(Path(root).resolve(strict=True) for root in roots)
        for root in self.roots:
            if not root.is_dir():
                raise ValueError(f"--allow-root {root} is not a folder")
        self.max_bytes = max_bytes

    def read(self, uri: str) -> bytes:
        """Read the bytes of a ``file://`` URI.

        Raises:
            ImageSourceError: File reading is off (PERMISSION_DENIED), the URI is not a local
                file URI (INVALID_ARGUMENT), the file is outside every root (PERMISSION_DENIED),
                missing (NOT_FOUND), unreadable (INVALID_ARGUMENT) or too large
                (RESOURCE_EXHAUSTED).
        """
        if not self.roots:
            raise ImageSourceError(
                grpc.StatusCode.PERMISSION_DENIED,
                "uri_not_allowed",
                "reading files on the server is off: start it with --allow-root DIR, or send "
                "the image bytes",
            )
        try:
            parsed = urlparse(uri)
        except ValueError as err:  # such as an unclosed "[" of an IPv6 host
            raise ImageSourceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "uri_not_allowed",
                f"URI {echo(uri)} cannot be parsed: {err}",
            ) from err
        if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
            raise ImageSourceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "uri_not_allowed",
                f"URI {echo(uri)} is not a local file:// URI",
            )
        path_text = unquote(parsed.path)
        if "\x00" in path_text:
            raise ImageSourceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "uri_not_allowed",
                f"URI {echo(uri)} contains a NUL byte (%00), which no file path may contain",
            )
        requested = Path(path_text)
        if not requested.is_absolute():
            raise ImageSourceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "uri_not_allowed",
                f"URI {echo(uri)} has no absolute path: use file:///absolute/path",
            )
        try:
            resolved = requested.resolve(strict=True)
        except FileNotFoundError as err:
            raise ImageSourceError(
                grpc.StatusCode.NOT_FOUND, "uri_unreadable", f"file {echo(uri)} not found"
            ) from err
        except (OSError, RuntimeError, ValueError) as err:
            # Too long a name (ENAMETOOLONG), a symlink loop, a file used as a folder, ...
            reason = getattr(err, "strerror", None) or str(err)
            raise ImageSourceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "uri_unreadable",
                f"file {echo(uri)} cannot be opened: {reason}",
            ) from err
        if not any(resolved.is_relative_to(root) for root in self.roots):
            _logger.warning("rejected a file URI outside the allowed roots: %s", uri[:200])
            raise ImageSourceError(
                grpc.StatusCode.PERMISSION_DENIED,
                "uri_not_allowed",
                f"file {echo(uri)} is outside the folders the server may read (--allow-root)",
            )
        return self._read_resolved(resolved, uri)

    def _read_resolved(self, path: Path, uri: str) -> bytes:
        try:
            # O_NOFOLLOW: the resolved path has no link, so a link that appears now is an attack.
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size > self.max_bytes:
                    raise ImageSourceError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "too_large",
                        f"file {echo(uri)} has {size} bytes, more than the limit of "
                        f"{self.max_bytes} bytes (--max-receive-message-bytes)",
                    )
                return handle.read(self.max_bytes + 1)
        except IsADirectoryError as err:
            raise ImageSourceError(
                grpc.StatusCode.INVALID_ARGUMENT, "uri_unreadable", f"{echo(uri)} is a folder"
            ) from err
        except OSError as err:
            raise ImageSourceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "uri_unreadable",
                f"file {echo(uri)} cannot be read: {err.strerror}",
            ) from err
