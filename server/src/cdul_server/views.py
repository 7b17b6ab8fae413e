"""Model inputs cut from a decoded image: the whole-image view and the n x n tiles."""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from cdul_server.preprocess import PreprocessConfig, preprocess_batch, preprocess_image
from cdul_server.scoring import tile_boxes

_logger = logging.getLogger(__name__)

#: Global views by their names in the API, as ``preprocess_image`` calls them.
GLOBAL_VIEWS = ("center_crop", "squash", "pad")


def whole_image_view(image: Image.Image, config: PreprocessConfig, view: str) -> np.ndarray:
    """Preprocess the whole image with one of :data:`GLOBAL_VIEWS`; returns (3, S, S)."""
    return preprocess_image(image, config, view)


def tile_views(
    image: Image.Image, config: PreprocessConfig, grid_size: int
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Cut the n x n tiles and preprocess each with the model's own transform.

    Returns:
        The (n * n, 3, S, S) inputs in row-major tile order and each tile's (x0, y0, x1, y1).

    Raises:
        ValueError: The image has fewer than ``grid_size`` pixels on a side.
    """
    boxes = tile_boxes(image.height, image.width, grid_size)
    tiles = [image.crop(box) for box in boxes]
    return preprocess_batch(tiles, config, "center_crop"), boxes


def image_views(
    image: Image.Image,
    config: PreprocessConfig,
    *,
    global_view: str | None,
    grid_size: int,
) -> np.ndarray:
    """Stack the whole-image view (when ``global_view`` is set) and the tiles (when
    ``grid_size`` > 0) into one (V, 3, S, S) batch, whole image first."""
    parts: list[np.ndarray] = []
    if global_view is not None:
        parts.append(whole_image_view(image, config, global_view)[None])
    if grid_size > 0:
        parts.append(tile_views(image, config, grid_size)[0])
    if not parts:
        return np.zeros((0, 3, config.size, config.size), dtype=np.float32)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
