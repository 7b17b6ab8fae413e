"""cdul_server's preprocessing against open_clip's transform on real photographs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdul_export.clip_export import open_clip_transform
from cdul_export.parity import (
    PREPROCESS_MAX_MEAN_ABS_DIFF,
    PREPROCESS_MIN_COSINE,
    row_cosines,
)
from cdul_server.model_repository import ClipModel, SessionConfig, load_model
from cdul_server.preprocess import PreprocessConfig, preprocess_batch, preprocess_image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIGS = [
    PreprocessConfig(224, OPENAI_MEAN, OPENAI_STD, "bicubic", "shortest"),
    PreprocessConfig(224, OPENAI_MEAN, OPENAI_STD, "bicubic", "longest", fill_color=0),
    PreprocessConfig(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", "squash"),
    PreprocessConfig(256, OPENAI_MEAN, OPENAI_STD, "bilinear", "shortest"),
    PreprocessConfig(32, OPENAI_MEAN, OPENAI_STD, "bicubic", "shortest"),
    PreprocessConfig(96, OPENAI_MEAN, OPENAI_STD, "bicubic", "longest", fill_color=128),
]


@pytest.fixture(scope="module")
def photos(shared_data: Path) -> list[Image.Image]:
    files = sorted((shared_data / "coco128" / "images").glob("*.jpg"))
    assert len(files) == 128
    return [Image.open(path).convert("RGB") for path in files]


def _reference(images: list[Image.Image], config: PreprocessConfig) -> np.ndarray:
    transform = open_clip_transform(config)
    return torch.stack([transform(image) for image in images]).numpy()


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: f"{c.size}-{c.resize_mode}-{c.interpolation}"
)
def test_pixels_match_open_clip(photos: list[Image.Image], config: PreprocessConfig) -> None:
    # All 128 photographs at small sizes; every eighth one at 224 and 256 px to save time.
    images = photos if config.size <= 96 else photos[::8]
    ours = preprocess_batch(images, config)
    expected = _reference(images, config)
    assert ours.shape == expected.shape
    assert ours.dtype == np.float32
    mean_abs_diff = np.abs(ours - expected).mean(axis=(1, 2, 3))
    assert mean_abs_diff.max() <= PREPROCESS_MAX_MEAN_ABS_DIFF


@pytest.mark.parametrize(("view", "mode"), [("squash", "squash"), ("pad", "longest")])
def test_views_match_open_clip_modes(photos: list[Image.Image], view: str, mode: str) -> None:
    config = CONFIGS[0]
    images = photos[:16]
    ours = preprocess_batch(images, config, view=view)
    expected = _reference(images, PreprocessConfig(224, OPENAI_MEAN, OPENAI_STD, "bicubic", mode))
    assert np.abs(ours - expected).mean(axis=(1, 2, 3)).max() <= PREPROCESS_MAX_MEAN_ABS_DIFF


def test_grayscale_photo_matches(shared_data: Path) -> None:
    path = shared_data / "odd-images" / "hopper_gray.jpg"
    config = CONFIGS[0]
    with Image.open(path) as image:
        gray = image.copy()
    assert gray.mode == "L"
    ours = preprocess_image(gray, config)
    # open_clip resizes in the file's mode and converts to RGB afterwards.
    expected = open_clip_transform(config)(gray).numpy()
    assert np.abs(ours - expected).mean() <= PREPROCESS_MAX_MEAN_ABS_DIFF


def test_embeddings_match_through_same_graph(
    photos: list[Image.Image], tiny_model_repository: Path
) -> None:
    clip = load_model(tiny_model_repository / "tiny-clip", SessionConfig(intra_op_threads=2))
    assert isinstance(clip, ClipModel)
    ours = clip.encode_images(preprocess_batch(photos, clip.preprocess))
    expected = clip.encode_images(_reference(photos, clip.preprocess))
    assert row_cosines(ours, expected).min() >= PREPROCESS_MIN_COSINE
