"""Image preprocessing that reproduces open_clip's inference transform without torch.

open_clip (3.x) builds its inference transform from torchvision operations that, for PIL input,
call Pillow underneath: ``Resize`` is ``PIL.Image.resize``, ``CenterCrop`` is ``PIL.Image.crop``
with offsets rounded by Python's ``round`` and padding is ``ImageOps.expand``. This module
performs the same Pillow calls with the same sizes and offsets, then converts to float32 and
normalizes as ``ToTensor`` and ``Normalize`` do, so the output matches open_clip's to float32
rounding. The parity tests of the export package state and check the tolerance.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

_logger = logging.getLogger(__name__)

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
RESIZE_MODES = ("shortest", "longest", "squash")
VIEWS = ("center_crop", "squash", "pad")


def _float_triple(value: Any, field: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 3:
        raise ValueError(
            f"preprocess {field} must be 3 numbers (one per RGB channel), got {value!r}"
        )
    return (float(value[0]), float(value[1]), float(value[2]))


@dataclass(frozen=True)
class PreprocessConfig:
    """Parameters of a model's image transform, as stored in ``config.json`` under ``preprocess``.

    Attributes:
        size: Side of the square model input in pixels.
        mean: Per-channel mean subtracted after scaling pixels to [0, 1].
        std: Per-channel standard deviation divided by after subtracting the mean.
        interpolation: Resampling filter: ``bicubic``, ``bilinear`` or ``nearest``.
        resize_mode: ``shortest`` (resize the short side, center crop), ``longest`` (resize the
            long side, pad) or ``squash`` (resize both sides, ignoring the aspect ratio).
        fill_color: Gray level (0-255) of the padding in ``longest`` mode and the ``pad`` view.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"preprocess size must be a positive integer, got {self.size!r}")
        object.__setattr__(self, "mean", _float_triple(self.mean, "mean"))
        object.__setattr__(self, "std", _float_triple(self.std, "std"))
        if any(s <= 0 for s in self.std):
            raise ValueError(f"preprocess std must be positive, got {self.std!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"preprocess interpolation {self.interpolation!r} is not supported: "
                f"use one of {sorted(INTERPOLATIONS)}"
            )
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(
                f"preprocess resize_mode {self.resize_mode!r} is not supported: "
                f"use one of {list(RESIZE_MODES)}"
            )
        if not 0 <= int(self.fill_color) <= 255:
            raise ValueError(f"preprocess fill_color must be in 0..255, got {self.fill_color!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessConfig:
        """Build a config from the ``preprocess`` object of ``config.json``.

        Raises:
            ValueError: A key is missing or a value is invalid.
        """
        missing = [key for key in ("size", "mean", "std") if key not in data]
        if missing:
            raise ValueError(f"preprocess config is missing {missing}: add them to config.json")
        size = data["size"]
        if isinstance(size, (list, tuple)):
            if len(size) != 2 or size[0] != size[1]:
                raise ValueError(f"preprocess size must be square, got {size!r}")
            size = size[0]
        return cls(
            size=int(size),
            mean=_float_triple(data["mean"], "mean"),
            std=_float_triple(data["std"], "std"),
            interpolation=str(data.get("interpolation", "bicubic")),
            resize_mode=str(data.get("resize_mode", "shortest")),
            fill_color=int(data.get("fill_color", 0)),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the ``preprocess`` object of ``config.json``."""
        return {
            "size": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
            "fill_color": self.fill_color,
        }


def _resize_shortest(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    # torchvision's Resize(int): the short side becomes `size`, the long side is truncated.
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_width, new_height) == (width, height):
        return image
    return image.resize((new_width, new_height), resample)


def _resize_longest(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    # open_clip's ResizeKeepRatio(longest=1): both sides divided by the larger ratio, rounded.
    width, height = image.size
    ratio = max(height / size, width / size)
    new_height, new_width = round(height / ratio), round(width / ratio)
    if (new_width, new_height) == (width, height):
        return image
    return image.resize((new_width, new_height), resample)


def _center_crop_or_pad(image: Image.Image, size: int, fill: int) -> Image.Image:
    width, height = image.size
    if size > width or size > height:
        left = (size - width) // 2 if size > width else 0
        top = (size - height) // 2 if size > height else 0
        right = (size - width + 1) // 2 if size > width else 0
        bottom = (size - height + 1) // 2 if size > height else 0
        padded = Image.new(image.mode, (width + left + right, height + top + bottom), (fill,) * 3)
        padded.paste(image, (left, top))
        image = padded
        width, height = image.size
        if (width, height) == (size, size):
            return image
    # Python's round (half to even) is what torchvision uses for the crop offsets.
    top = round((height - size) / 2.0)
    left = round((width - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


def resize_view(
    image: Image.Image, config: PreprocessConfig, view: str = "center_crop"
) -> Image.Image:
    """Resize and crop or pad an RGB image to the model's square input, before normalization.

    Args:
        image: The decoded image; converted to RGB when it is in another mode.
        config: The model's preprocessing parameters.
        view: ``center_crop`` applies the model's own ``resize_mode``; ``squash`` resizes both
            sides to the input size; ``pad`` resizes the long side and pads the short one.

    Returns:
        An RGB image of ``config.size`` x ``config.size`` pixels.

    Raises:
        ValueError: The view is unknown or the image is empty.
    """
    if view not in VIEWS:
        raise ValueError(f"view {view!r} is not supported: use one of {list(VIEWS)}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image of {image.width}x{image.height} pixels is empty")
    if image.mode != "RGB":
        image = image.convert("RGB")
    resample = INTERPOLATIONS[config.interpolation]
    mode = (
        config.resize_mode
        if view == "center_crop"
        else {"squash": "squash", "pad": "longest"}[view]
    )
    size = config.size
    if mode == "squash":
        if image.size == (size, size):
            return image
        return image.resize((size, size), resample)
    if mode == "longest":
        return _center_crop_or_pad(_resize_longest(image, size, resample), size, config.fill_color)
    return _center_crop_or_pad(_resize_shortest(image, size, resample), size, config.fill_color)


def normalize_pixels(rgb: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Scale uint8 RGB pixels (..., H, W, 3) to [0, 1], normalize, and move channels first.

    Returns:
        float32 array (..., 3, H, W).
    """
    pixels = rgb.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(config.mean, dtype=np.float32)
    std = np.asarray(config.std, dtype=np.float32)
    pixels = (pixels - mean) / std
    return np.ascontiguousarray(np.moveaxis(pixels, -1, -3), dtype=np.float32)


def preprocess_image(
    image: Image.Image, config: PreprocessConfig, view: str = "center_crop"
) -> np.ndarray:
    """Turn one image into the model input.

    Args:
        image: The decoded image (any mode; converted to RGB).
        config: The model's preprocessing parameters.
        view: ``center_crop``, ``squash`` or ``pad``; see :func:`resize_view`.

    Returns:
        float32 array (3, S, S) with S = ``config.size``.
    """
    resized = resize_view(image, config, view)
    return normalize_pixels(np.asarray(resized, dtype=np.uint8), config)


def preprocess_batch(
    images: Sequence[Image.Image], config: PreprocessConfig, view: str = "center_crop"
) -> np.ndarray:
    """Turn images into one batch of model inputs.

    Returns:
        float32 array (N, 3, S, S); (0, 3, S, S) for an empty sequence.
    """
    size = config.size
    batch = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        batch[index] = np.asarray(resize_view(image, config, view), dtype=np.uint8)
    return normalize_pixels(batch, config)
