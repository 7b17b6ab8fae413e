"""A tiny generated multi-label corpus with noisy pseudo labels, for tests and quick checks.

Each image is a dark noisy square with one to three of `n_classes` colored blobs at random
positions; class j is present when a blob of color j is. The pseudo labels mimic CLIP's: a
softmax over classes of noisy evidence, so most labels are small, the present classes rank
higher on average, and some images rank a wrong class first.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cdul_training.records import FORMAT_NAME, FORMAT_VERSION, write_pseudo_labels

_logger = logging.getLogger(__name__)

PROJECTION_SEED = 1234
COLORS = ((230, 40, 40), (40, 220, 40), (50, 80, 240), (235, 235, 60), (220, 60, 220))


@dataclass(frozen=True)
class SyntheticCorpus:
    """Paths of a generated corpus."""

    images: Path
    pseudo_labels: Path
    ground_truth: Path
    classes: list[str]
    truth: np.ndarray


def make_corpus(
    root: Path,
    n_images: int,
    n_classes: int = 4,
    image_size: int = 24,
    seed: int = 0,
    label_noise: float = 1.5,
    embedding_dim: int | None = None,
) -> SyntheticCorpus:
    """Write `root/images/*.png`, `root/pseudo_labels.jsonl` and `root/labels.json`.

    Args:
        root: output folder.
        n_images: number of images.
        n_classes: number of classes (at most 5 colors).
        image_size: side of each image in pixels.
        seed: seed of the images, blobs and label noise.
        label_noise: standard deviation of the Gaussian noise on the evidence (logit scale)
            behind the pseudo labels; larger values give lower pseudo-label mAP.
        embedding_dim: when set, each record also gets an L2-normalized `embedding` of this
            size: a fixed random projection of the truth plus noise, for clip-linear.
    """
    if not 1 <= n_classes <= len(COLORS):
        raise ValueError(f"n_classes {n_classes}: must be between 1 and {len(COLORS)}")
    rng = np.random.default_rng(seed)
    classes = [f"class{j}" for j in range(n_classes)]
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    truth = np.zeros((n_images, n_classes), dtype=np.int64)
    # The class directions are fixed, so corpora of different seeds share one embedding space.
    projection = np.random.default_rng(PROJECTION_SEED).normal(size=(n_classes, embedding_dim or 1))
    records = []
    for i in range(n_images):
        present = rng.choice(
            n_classes, size=int(rng.integers(1, min(3, n_classes) + 1)), replace=False
        )
        truth[i, present] = 1
        pixels = rng.normal(30, 12, size=(image_size, image_size, 3))
        for j in present:
            radius = int(rng.integers(image_size // 8, image_size // 4 + 1))
            cy, cx = rng.integers(radius, image_size - radius, size=2)
            yy, xx = np.ogrid[:image_size, :image_size]
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
            pixels[blob] = COLORS[j]
        image_id = f"img{i:04d}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(image_dir / image_id)
        evidence = 2.0 * truth[i] + rng.normal(0.0, label_noise, size=n_classes)
        scores = np.exp(evidence - evidence.max())
        scores /= scores.sum()
        record = {
            "type": "record",
            "id": image_id,
            "path": f"images/{image_id}",
            "global": scores.tolist(),
            "aggregate": scores.tolist(),
            "final": scores.tolist(),
        }
        if embedding_dim:
            vector = truth[i] @ projection + rng.normal(0.0, 0.8, size=embedding_dim)
            record["embedding"] = (vector / np.linalg.norm(vector)).tolist()
        records.append(record)
    header = {
        "type": "header",
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "classes": classes,
        "model": "synthetic",
        "options": {},
        "created_by": "cdul_training.synthetic",
    }
    pseudo_path = root / "pseudo_labels.jsonl"
    write_pseudo_labels(pseudo_path, header, records)
    labels = {
        f"img{i:04d}.png": [classes[j] for j in np.flatnonzero(truth[i])] for i in range(n_images)
    }
    truth_path = root / "labels.json"
    truth_path.write_text(json.dumps({"classes": classes, "labels": labels}), encoding="utf-8")
    return SyntheticCorpus(image_dir, pseudo_path, truth_path, classes, truth)
