"""The benchmark images and the encoder inputs cut from them."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

BENCHMARKS_DIR = Path(__file__).resolve().parents[1]
REPOSITORY_ROOT = BENCHMARKS_DIR.parent
DEFAULT_IMAGES = REPOSITORY_ROOT.parent / "shared" / "data" / "coco128"

# A 20-class vocabulary that coco128 was not labeled with (the PASCAL VOC classes), for the
# relabeling figure.
RELABEL_VOCABULARY = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "dining table",
    "dog",
    "horse",
    "motorbike",
    "person",
    "potted plant",
    "sheep",
    "sofa",
    "train",
    "tv monitor",
]


def image_paths(folder: Path, limit: int | None = None) -> list[Path]:
    """Return the JPEG and PNG files of ``folder/images`` (or ``folder``), sorted by name."""
    root = folder / "images" if (folder / "images").is_dir() else folder
    if not root.is_dir():
        raise ValueError(f"image folder {root} not found: pass --images with the coco128 folder")
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not paths:
        raise ValueError(f"no .jpg or .png files in {root}: pass --images with the coco128 folder")
    return paths[:limit] if limit else paths


def class_names(folder: Path) -> list[str]:
    """Return the class names of ``folder/classes.json``."""
    path = folder / "classes.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: pass --images with the coco128 folder")
    names = json.loads(path.read_text())
    return [str(name) for name in names]


def unique_bytes(data: bytes) -> bytes:
    """Return ``data`` with random bytes appended after the end of the encoded image.

    JPEG and PNG decoders stop at their end marker and ignore what follows, so the image is the
    same while its SHA-256 content key is new, and the server's embedding cache misses it.
    """
    return data + b"cdul-bench" + uuid.uuid4().bytes


def load_rgb(path: Path) -> Any:
    """Return the image at ``path`` decoded by Pillow and converted to RGB."""
    from PIL import Image

    with Image.open(path) as opened:
        return opened.convert("RGB")


def view_batch(paths: Sequence[Path], preprocess: Any, grid_size: int) -> np.ndarray:
    """Return the encoder inputs of pseudo labeling: per image the whole view then its tiles.

    Args:
        paths: The images.
        preprocess: A ``cdul_server.preprocess.PreprocessConfig``.
        grid_size: Tiles per side.

    Returns:
        float32 array (len(paths) * (1 + grid_size**2), 3, S, S).
    """
    from cdul_server.preprocess import preprocess_image
    from cdul_server.scoring import tile_boxes

    views = []
    for path in paths:
        image = load_rgb(path)
        views.append(preprocess_image(image, preprocess, "center_crop"))
        for box in tile_boxes(image.height, image.width, grid_size):
            tile = image.crop(box)
            views.append(preprocess_image(tile, preprocess, "center_crop"))
    return np.stack(views).astype(np.float32, copy=False)
