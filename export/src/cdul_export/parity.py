"""Parity inputs and figures: real photographs, fixed prompts, cosines between embeddings."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

_logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FP32_MIN_COSINE = 0.9999
# fp16 arithmetic (the fp16 graph and the TensorRT engine) against fp32 PyTorch.
GPU_MIN_COSINE = 0.99
PREPROCESS_MAX_MEAN_ABS_DIFF = 0.01
PREPROCESS_MIN_COSINE = 0.999

# Fixed prompts for the export-time check: plain class prompts, odd characters, an empty string
# and a prompt longer than any CLIP context.
PARITY_PROMPTS: tuple[str, ...] = (
    "a photo of a dog.",
    "a photo of a cat.",
    "a photo of a person riding a bicycle.",
    "a photo of a traffic light.",
    "a photo of a fire hydrant.",
    "a photo of a teddy bear.",
    "a photo of a hair drier.",
    "a photo of the digit seven",
    "an aerial photograph of a harbour at dusk",
    "A Photo Of A Red CAR!!!",
    "café, crème brûlée & naïve façade",
    "Ünïcödé ßtraße in München",
    "日本の寿司",
    "🐶🐱 emoji pets 🚲",
    "???!!!...---",
    "it's a dog's life, isn't it?",
    "“curly quotes” and ‘single’ ones",
    "ＦＵＬＬＷＩＤＴＨ letters",
    "tab\tseparated\nand new line",
    "",
    " ".join(["a very long prompt that keeps going"] * 20),
)


@dataclass(frozen=True)
class ParityImage:
    """One real photograph used for parity checks."""

    name: str
    image: Image.Image


def sample_photographs() -> list[ParityImage]:
    """Return scikit-learn's two bundled photographs and their four quadrants (10 images).

    These are real photographs that ship with scikit-learn, so an export can check parity on
    real pixels without any data set on disk.
    """
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    images: list[ParityImage] = []
    for file_name, array in zip(bunch.filenames, bunch.images, strict=True):
        stem = Path(file_name).stem
        photo = Image.fromarray(np.asarray(array, dtype=np.uint8), "RGB")
        images.append(ParityImage(stem, photo))
        width, height = photo.size
        for row in range(2):
            for col in range(2):
                box = (
                    col * width // 2,
                    row * height // 2,
                    (col + 1) * width // 2,
                    (row + 1) * height // 2,
                )
                images.append(ParityImage(f"{stem}-{row}{col}", photo.crop(box)))
    return images


def load_parity_images(folder: Path | None, count: int) -> list[ParityImage]:
    """Load the first ``count`` images of a folder in name order, as RGB.

    Args:
        folder: A folder of image files, or None for :func:`sample_photographs`.
        count: How many images to use (at most).

    Raises:
        ValueError: The folder is missing or contains no readable image, or count < 1.
    """
    if count < 1:
        raise ValueError(f"parity image count must be at least 1, got {count}")
    if folder is None:
        return sample_photographs()[:count]
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"parity image folder {folder} not found: pass a folder of photographs")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    images: list[ParityImage] = []
    for path in files:
        if len(images) == count:
            break
        try:
            with Image.open(path) as handle:
                images.append(ParityImage(path.name, handle.convert("RGB")))
        except OSError as err:
            _logger.warning("skipping unreadable parity image %s: %s", path, err)
    if not images:
        raise ValueError(f"no readable image ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return images


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of two (N, D) arrays, in float64."""
    if a.shape != b.shape:
        raise ValueError(f"cannot compare embeddings of shapes {a.shape} and {b.shape}")
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return np.sum(a64 * b64, axis=1) / np.maximum(norms, 1e-30)


def run_in_batches(encode: object, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """Apply ``encode`` (a callable on arrays) to ``inputs`` in chunks of ``batch_size`` rows."""
    if not callable(encode):
        raise TypeError(f"encode must be callable, got {type(encode).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    parts = [
        encode(inputs[start : start + batch_size]) for start in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(parts, axis=0)


def check_min(figure: str, value: float, threshold: float) -> None:
    """Raise ParityError when ``value`` is below ``threshold``, naming both."""
    if not value >= threshold:
        raise ParityError(figure, value, threshold)


def tile_batch(batch: np.ndarray, count: int) -> np.ndarray:
    """Repeat rows cyclically to get ``count`` rows (for batch sizes above the image count)."""
    if len(batch) == 0:
        raise ValueError("cannot tile an empty batch")
    index = np.arange(count) % len(batch)
    return batch[index]


class ParityError(RuntimeError):
    """An exported graph gives results too far from PyTorch's."""

    def __init__(self, figure: str, value: float, threshold: float) -> None:
        super().__init__(
            f"parity check failed: {figure} = {value:.6f}, below the threshold {threshold}; "
            "the export was not written"
        )
        self.figure = figure
        self.value = value
        self.threshold = threshold
