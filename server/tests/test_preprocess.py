"""Tests of the torch-free image preprocessing (parity with open_clip is in the export tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdul_server.preprocess import (
    PreprocessConfig,
    preprocess_batch,
    preprocess_image,
    resize_view,
)

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG = PreprocessConfig(size=32, mean=MEAN, std=STD)


def _normalized(rgb: tuple[int, int, int], config: PreprocessConfig = CONFIG) -> np.ndarray:
    value = np.asarray(rgb, np.float32) / np.float32(255.0)
    return (value - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32)


def test_uniform_image_normalization() -> None:
    image = Image.new("RGB", (50, 40), (200, 100, 50))
    pixels = preprocess_image(image, CONFIG)
    assert pixels.shape == (3, 32, 32)
    assert pixels.dtype == np.float32
    expected = _normalized((200, 100, 50))
    for channel in range(3):
        np.testing.assert_allclose(pixels[channel], expected[channel], atol=1e-6)


def test_shortest_resizes_short_side_and_crops_center() -> None:
    # Left third red, middle third green, right third blue: a center crop keeps only green.
    image = Image.new("RGB", (300, 100), (0, 255, 0))
    image.paste((255, 0, 0), (0, 0, 100, 100))
    image.paste((0, 0, 255), (200, 0, 300, 100))
    resized = resize_view(image, CONFIG)
    assert resized.size == (32, 32)
    array = np.asarray(resized)
    assert array[:, 4:28, 1].min() > 200
    assert array[:, 4:28, 0].max() < 50


def test_pad_view_fills_borders() -> None:
    config = PreprocessConfig(size=32, mean=MEAN, std=STD, fill_color=0)
    image = Image.new("RGB", (64, 32), (255, 255, 255))
    array = np.asarray(resize_view(image, config, view="pad"))
    assert array.shape == (32, 32, 3)
    assert (array[:8] == 0).all()
    assert (array[24:] == 0).all()
    assert (array[9:23] == 255).all()


def test_pad_fill_color() -> None:
    config = PreprocessConfig(size=32, mean=MEAN, std=STD, fill_color=128)
    array = np.asarray(resize_view(Image.new("RGB", (64, 32), (255, 0, 0)), config, view="pad"))
    assert (array[0, 0] == 128).all()


def test_squash_keeps_whole_image() -> None:
    image = Image.new("RGB", (300, 100), (0, 255, 0))
    image.paste((255, 0, 0), (0, 0, 100, 100))
    array = np.asarray(resize_view(image, CONFIG, view="squash"))
    assert array[:, :8, 0].min() > 200


def test_resize_mode_used_by_center_crop_view() -> None:
    config = PreprocessConfig(size=32, mean=MEAN, std=STD, resize_mode="longest")
    image = Image.new("RGB", (64, 32), (255, 255, 255))
    assert (np.asarray(resize_view(image, config))[0] == 0).all()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "1"])
def test_any_mode_converted(mode: str) -> None:
    image = Image.new("RGB", (40, 30), (10, 20, 30)).convert(mode)
    assert preprocess_image(image, CONFIG).shape == (3, 32, 32)


def test_batch_equals_single_images(shared_data: Path) -> None:
    files = sorted((shared_data / "coco128" / "images").glob("*.jpg"))[:4]
    images = [Image.open(path) for path in files]
    batch = preprocess_batch(images, CONFIG)
    assert batch.shape == (4, 3, 32, 32)
    for index, image in enumerate(images):
        np.testing.assert_array_equal(batch[index], preprocess_image(image, CONFIG))
    low = (0 - max(MEAN)) / min(STD)
    high = (1 - min(MEAN)) / min(STD)
    assert batch.min() >= low
    assert batch.max() <= high


def test_empty_batch() -> None:
    assert preprocess_batch([], CONFIG).shape == (0, 3, 32, 32)


def test_unknown_view_rejected() -> None:
    with pytest.raises(ValueError, match="view 'zoom'"):
        preprocess_image(Image.new("RGB", (8, 8)), CONFIG, view="zoom")


def test_config_round_trip() -> None:
    config = PreprocessConfig(224, MEAN, STD, "bilinear", "squash", 7)
    assert PreprocessConfig.from_dict(config.to_dict()) == config


def test_config_accepts_square_size_pair() -> None:
    data = {"size": [64, 64], "mean": [0.5] * 3, "std": [0.5] * 3}
    assert PreprocessConfig.from_dict(data).size == 64


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"size": [64, 32], "mean": [0.5] * 3, "std": [0.5] * 3}, "square"),
        ({"size": 0, "mean": [0.5] * 3, "std": [0.5] * 3}, "positive integer"),
        ({"size": 8, "mean": [0.5] * 2, "std": [0.5] * 3}, "3 numbers"),
        ({"size": 8, "mean": [0.5] * 3, "std": [0.5, 0.0, 0.5]}, "std must be positive"),
        ({"size": 8, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "lanczos"}, "lanczos"),
        ({"size": 8, "mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "crop"}, "crop"),
        ({"size": 8, "mean": [0.5] * 3, "std": [0.5] * 3, "fill_color": 300}, "fill_color"),
        ({"mean": [0.5] * 3, "std": [0.5] * 3}, "missing"),
    ],
)
def test_config_rejects_invalid(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PreprocessConfig.from_dict(data)
