"""Turn paths, bytes, PIL images and uint8 arrays into the images of a request."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import numpy as np
import PIL.Image

from cdul_proto.v1 import labeler_pb2

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContentKey:
    """An image that the server has seen before, named by the SHA-256 of its bytes.

    Sending a content key instead of the bytes lets the server answer from its embedding
    cache; when it no longer has the image, that image's result has reason
    "content_key_not_found".
    """

    key: str

    def __post_init__(self) -> None:
        key = self.key
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(
                f"content key {key!r} is not a lowercase hex SHA-256 (64 characters): use the "
                "content_key of an earlier result"
            )


ImageSource: TypeAlias = (
    "str | os.PathLike[str] | bytes | PIL.Image.Image | np.ndarray | ContentKey"
)
ImageInput: TypeAlias = "ImageSource | tuple[str, ImageSource]"


def content_key(data: bytes) -> str:
    """Return the content key of encoded image bytes: their lowercase hex SHA-256."""
    return hashlib.sha256(data).hexdigest()


def encode_image(source: ImageSource) -> bytes | ContentKey:
    """Return the bytes to send for one image source, or the content key itself.

    Paths are read as they are (the server decodes any format it supports); PIL images and
    uint8 arrays of shape (H, W), (H, W, 3) or (H, W, 4) are encoded as PNG, which is lossless.

    Raises:
        TypeError: an unsupported type or array dtype.
        ValueError: an array of unsupported shape.
        OSError: a path that cannot be read.
    """
    if isinstance(source, ContentKey | bytes):
        return source
    if isinstance(source, bytearray | memoryview):
        return bytes(source)
    if isinstance(source, str | os.PathLike):
        return Path(source).read_bytes()
    if isinstance(source, PIL.Image.Image):
        return _encode_png(source)
    if isinstance(source, np.ndarray):
        return _encode_png(_array_to_image(source))
    raise TypeError(
        f"unsupported image type {type(source).__name__}: pass a path, bytes, a PIL image, a "
        "uint8 numpy array or a ContentKey"
    )


def _array_to_image(array: np.ndarray) -> PIL.Image.Image:
    if array.dtype != np.uint8:
        raise TypeError(
            f"image array has dtype {array.dtype}, expected uint8: scale and convert it with "
            "array.astype(np.uint8)"
        )
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
        return PIL.Image.fromarray(np.ascontiguousarray(array))
    raise ValueError(
        f"image array has shape {array.shape}, expected (H, W), (H, W, 3) or (H, W, 4)"
    )


def _encode_png(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def default_image_id(source: ImageSource, index: int) -> str:
    """Return the id of an image given without one: the path for paths, else its index."""
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    if isinstance(source, ContentKey):
        return source.key
    return str(index)


def split_image_input(item: ImageInput, index: int) -> tuple[str, ImageSource]:
    """Return (id, source) of an image input, which is a source or an (id, source) pair."""
    if isinstance(item, tuple):
        if len(item) != 2 or not isinstance(item[0], str):
            raise TypeError(
                f"an image given as a tuple must be (id, image) with a string id, got {item!r:.80}"
            )
        return item[0], item[1]
    return default_image_id(item, index), item


def to_proto_image(image_id: str, source: ImageSource) -> labeler_pb2.Image:
    """Build the request message of one image."""
    encoded = encode_image(source)
    if isinstance(encoded, ContentKey):
        return labeler_pb2.Image(id=image_id, content_key=encoded.key)
    return labeler_pb2.Image(id=image_id, data=encoded)


def to_proto_images(images: Iterable[ImageInput]) -> list[labeler_pb2.Image]:
    """Build the request messages of a batch of images, giving default ids where none is set."""
    messages = []
    for index, item in enumerate(images):
        image_id, source = split_image_input(item, index)
        messages.append(to_proto_image(image_id, source))
    return messages


def batched(items: Iterable[ImageInput], batch_size: int) -> Iterable[Sequence[ImageInput]]:
    """Yield lists of at most `batch_size` items, in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    batch: list[ImageInput] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
