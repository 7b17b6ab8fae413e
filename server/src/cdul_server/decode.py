"""Image decoding: encoded bytes to an 8-bit RGB Pillow image, or a per-image error.

Every failure raises :class:`DecodeError` with a short machine-readable ``reason`` from
:data:`DECODE_FAILURE_REASONS`, so that the service can fail one image of a batch and count
failures by reason with a bounded label set.
"""

from __future__ import annotations

import io
import logging
import math
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_logger = logging.getLogger(__name__)

#: Colour that transparent pixels are composited onto (white, as image viewers show them).
BACKGROUND_RGB = (255, 255, 255)

#: Every reason that :class:`DecodeError` may carry.
DECODE_FAILURE_REASONS = (
    "empty",
    "unidentified",
    "too_many_pixels",
    "truncated",
    "decode_failed",
    "unsupported_mode",
)


class DecodeError(ValueError):
    """An image that cannot be decoded; ``reason`` is one of DECODE_FAILURE_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in DECODE_FAILURE_REASONS:
            raise ValueError(f"unknown decode failure reason {reason!r}")
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DecodedImage:
    """An image after decoding: RGB pixels with EXIF orientation applied."""

    image: Image.Image
    source_format: str
    source_mode: str

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


def decode_image(data: bytes, max_pixels: int, min_side: int | None = None) -> DecodedImage:
    """Decode encoded image bytes into an 8-bit RGB image.

    The first frame of an animation is used. EXIF orientation is applied. Transparent pixels
    are composited onto :data:`BACKGROUND_RGB`. 16-bit samples are scaled to 8 bits (divided by
    257), not clipped.

    Args:
        data: The encoded file (JPEG, PNG, GIF, WebP, TIFF, BMP, ...).
        max_pixels: Images with more than this many pixels (width * height, as declared in the
            file header) are rejected before their pixels are decoded.
        min_side: When set, a JPEG whose shorter side is at least twice this many pixels is
            decoded in draft mode, at a fraction of the cost of a full decode. The decoder then
            scales it by 1/2, 1/4 or 1/8 in the DCT, to the smallest such size whose shorter
            side is still at least ``min_side``.

    Returns:
        The decoded image.

    Raises:
        DecodeError: The bytes are empty, not an image, too large, truncated or undecodable.
    """
    if not data:
        raise DecodeError("empty", "the image has no bytes")
    try:
        with warnings.catch_warnings():
            # Our own bound below is the one that counts; Pillow's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        # Pillow rejects images above twice Image.MAX_IMAGE_PIXELS before the check below runs.
        pillow_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        if max_pixels < pillow_limit:
            message = (
                f"the image declares more pixels than the server's limit of {max_pixels} "
                "(--max-pixels)"
            )
        else:
            message = (
                f"the image declares more than {pillow_limit} pixels, the most that Pillow "
                f"decodes (--max-pixels {max_pixels} cannot raise it)"
            )
        raise DecodeError("too_many_pixels", message) from err
    except UnidentifiedImageError as err:
        raise DecodeError("unidentified", "the bytes are not an image format Pillow reads") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise DecodeError("decode_failed", f"the image header cannot be read: {err}") from err
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError(
            "too_many_pixels",
            f"the image has {width}x{height} = {width * height} pixels, more than the server's "
            f"limit of {max_pixels} (--max-pixels)",
        )
    if width < 1 or height < 1:
        raise DecodeError("decode_failed", f"the image has an empty size {width}x{height}")
    source_format = image.format or "unknown"
    source_mode = image.mode
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        if min_side is not None and source_format == "JPEG":
            _draft(image, min_side)
        image.load()
        rgb = to_rgb8(_apply_exif_orientation(image))
    except DecodeError:
        raise
    except OSError as err:
        reason = "truncated" if "truncated" in str(err) else "decode_failed"
        raise DecodeError(reason, f"the image data cannot be decoded: {err}") from err
    except (ValueError, SyntaxError, EOFError, UnicodeDecodeError, struct.error) as err:
        raise DecodeError("decode_failed", f"the image data cannot be decoded: {err}") from err
    return DecodedImage(image=rgb, source_format=source_format, source_mode=source_mode)


def _draft(image: Image.Image, min_side: int) -> None:
    """Let the JPEG decoder downscale ``image`` while its shorter side stays >= ``min_side``."""
    width, height = image.size
    shorter = min(width, height)
    if min_side < 1 or shorter < 2 * min_side:
        return
    # Pillow picks the largest DCT reduction whose result is at least the requested size.
    scale = min_side / shorter
    image.draft(image.mode, (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))))


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        transposed = ImageOps.exif_transpose(image)
    except (OSError, ValueError, KeyError, TypeError, SyntaxError) as err:
        # A malformed EXIF block should not lose an otherwise good image.
        _logger.debug("ignoring unreadable EXIF orientation: %s", err)
        return image
    return transposed if transposed is not None else image


def to_rgb8(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any Pillow mode to 8-bit RGB.

    Raises:
        DecodeError: The mode has no RGB conversion (reason ``unsupported_mode``).
    """
    mode = image.mode
    transparency = image.info.get("transparency")
    if mode == "RGB" and transparency is None:
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return _high_bit_gray_to_rgb(image, transparency)
    if mode == "F":
        return _float_gray_to_rgb(image)
    if mode == "P" or (mode in ("L", "RGB", "1") and transparency is not None):
        # Palette and tRNS transparency become an alpha channel first.
        return _composite(image.convert("RGBA"))
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite(image.convert("RGBA"))
    if mode == "CMYK":
        # Pillow inverts Adobe CMYK JPEGs at decode; the naive conversion is then close to the
        # RGB rendering (mean 4.7 levels off on Pillow's sample pair).
        return image.convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise DecodeError(
            "unsupported_mode", f"images of mode {mode} cannot be converted to RGB"
        ) from err


def _composite(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, BACKGROUND_RGB)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _high_bit_gray_to_rgb(image: Image.Image, transparency: object) -> Image.Image:
    values = np.asarray(image).astype(np.float64)
    # 16-bit modes span 0..65535; mode I comes from 16-bit PNG and TIFF files in older Pillows.
    gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    rgb = Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
    if isinstance(transparency, int):
        alpha = np.where(values == transparency, 0, 255).astype(np.uint8)
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.fromarray(alpha))
        return _composite(rgba)
    return rgb


def _float_gray_to_rgb(image: Image.Image) -> Image.Image:
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    # Float images in [0, 1] are scaled; others are taken as 8-bit levels.
    scale = 255.0 if values.size and values.max() <= 1.0 and values.min() >= 0.0 else 1.0
    gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
