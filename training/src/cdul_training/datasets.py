"""Image corpora for training: listing, matching to pseudo-label records, decoding, views."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cdul_training.records import PseudoLabelFile, RecordError

_logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
AUGMENTATIONS = ("none", "flip", "crop", "crop-flip")
# Random resized crop: fraction of the image area and aspect ratio range of the crop.
CROP_SCALE = (0.6, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def list_images(spec: Path) -> dict[str, Path]:
    """List a corpus as {image id: path}.

    Args:
        spec: a folder, searched recursively for image files (id = path relative to the folder,
            with `/`), or a text file with one image path a line (id = the line as written;
            relative paths are relative to the list file's folder; `#` starts a comment line).

    Raises:
        RecordError: `spec` does not exist, is empty, or lists a missing file.
    """
    if spec.is_dir():
        images = {
            path.relative_to(spec).as_posix(): path
            for path in sorted(spec.rglob("*"))
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
        }
        if not images:
            raise RecordError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {spec}")
        return images
    if not spec.is_file():
        raise RecordError(f"image folder or list not found: {spec}")
    images = {}
    for line_number, line in enumerate(spec.read_text(encoding="utf-8").splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry) if Path(entry).is_absolute() else spec.parent / entry
        if not path.is_file():
            raise RecordError(f"{spec}:{line_number}: image {entry!r} not found at {path}")
        images[entry] = path
    if not images:
        raise RecordError(f"image list {spec} contains no paths")
    return images


def match_records(images: dict[str, Path], pseudo: PseudoLabelFile) -> list[Path]:
    """Return the image path of every record, in record order.

    Raises:
        RecordError: naming the first record whose image is missing, or else the first image
            (in id order) that has no record.
    """
    paths = []
    for record in pseudo.records:
        path = images.get(record["id"])
        if path is None:
            raise RecordError(
                f"pseudo-label record {record['id']!r} has no image in the corpus: label the "
                "same corpus that --images lists, or remove the record"
            )
        paths.append(path)
    if len(paths) < len(images):
        with_record = set(pseudo.ids)
        first = next(image_id for image_id in images if image_id not in with_record)
        raise RecordError(
            f"image {first!r} has no pseudo-label record ({len(images) - len(paths)} images "
            "without one): label them, or leave them out of --images"
        )
    return paths


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ImageDataset(Dataset):
    """Decoded, resized and normalized images, each item a tuple `(pixels (3, S, S), index)`.

    The whole image is resized to S x S (squash, bilinear), the view that the exported
    classifier's preprocessing uses at inference. Augmentation draws from a generator seeded
    by (seed, epoch, index), so a run gives the same views whatever the number of loader
    workers or processes, and a resumed run the same as an uninterrupted one.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: str = "none",
        seed: int = 0,
    ) -> None:
        if augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {augment!r}: use one of {AUGMENTATIONS}")
        self.paths = list(paths)
        self.image_size = image_size
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of `epoch`."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        try:
            with Image.open(path) as raw:
                image = raw.convert("RGB")
        except (OSError, ValueError) as err:
            raise RecordError(f"image {path} cannot be decoded: {err}") from err
        if self.augment != "none":
            image = self._augment(image, index)
        image = image.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        pixels = (pixels - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(pixels)), index

    def _augment(self, image: Image.Image, index: int) -> Image.Image:
        rng = np.random.default_rng(_sample_seed(self.seed, self.epoch, index))
        if "crop" in self.augment:
            width, height = image.size
            area = width * height * rng.uniform(*CROP_SCALE)
            ratio = float(np.exp(rng.uniform(np.log(CROP_RATIO[0]), np.log(CROP_RATIO[1]))))
            crop_w = min(width, max(1, round(np.sqrt(area * ratio))))
            crop_h = min(height, max(1, round(np.sqrt(area / ratio))))
            x0 = int(rng.integers(0, width - crop_w + 1))
            y0 = int(rng.integers(0, height - crop_h + 1))
            image = image.crop((x0, y0, x0 + crop_w, y0 + crop_h))
        if "flip" in self.augment and rng.uniform() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image


class EmbeddingDataset(Dataset):
    """Precomputed CLIP image embeddings; each item is `(embedding (D,), index)`."""

    def __init__(self, embeddings: np.ndarray) -> None:
        self.embeddings = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))

    def set_epoch(self, epoch: int) -> None:
        """Accept the epoch like ImageDataset; embeddings have no augmentation."""

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.embeddings[index], index
