"""Whole-image and tile views cut from the decoded pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cdul_server.preprocess import PreprocessConfig, preprocess_image
from cdul_server.scoring import tile_boxes
from cdul_server.views import image_views, tile_views

CONFIG = PreprocessConfig(size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (47, 61, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_tiles_match_preprocessed_crops(image: Image.Image) -> None:
    tiles, boxes = tile_views(image, CONFIG, 3)
    assert boxes == tile_boxes(47, 61, 3)
    assert tiles.shape == (9, 3, 16, 16)
    for tile, box in zip(tiles, boxes, strict=True):
        np.testing.assert_array_equal(
            tile, preprocess_image(image.crop(box), CONFIG, "center_crop")
        )


@pytest.mark.parametrize("view", ["center_crop", "squash", "pad"])
def test_whole_view_first_then_tiles(image: Image.Image, view: str) -> None:
    views = image_views(image, CONFIG, global_view=view, grid_size=2)
    assert views.shape == (5, 3, 16, 16)
    assert views.dtype == np.float32
    np.testing.assert_array_equal(views[0], preprocess_image(image, CONFIG, view))
    np.testing.assert_array_equal(views[1:], tile_views(image, CONFIG, 2)[0])


def test_only_requested_views(image: Image.Image) -> None:
    assert image_views(image, CONFIG, global_view=None, grid_size=2).shape[0] == 4
    assert image_views(image, CONFIG, global_view="squash", grid_size=0).shape[0] == 1
    assert image_views(image, CONFIG, global_view=None, grid_size=0).shape[0] == 0


def test_image_smaller_than_grid_rejected() -> None:
    with pytest.raises(ValueError, match="grid"):
        tile_views(Image.new("RGB", (2, 5)), CONFIG, 3)
