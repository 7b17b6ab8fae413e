"""Write digit-scenes: a multi-label corpus of canvases with one to four handwritten digits.

Every canvas is square with side S and a noisy background. It contains 1 to 4 digits (uniform)
taken from scikit-learn's bundled 8x8 digit scans. Each digit is scaled to a side drawn
uniformly from [S/8, 3S/4] and placed at a position drawn uniformly among those that keep it
inside the canvas, and a later digit is drawn over an earlier one. The train and test splits
draw from disjoint sets of scans (`scan_split`), and digits-clip is trained on the train scans
only.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

_logger = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
# The scan split is fixed once for the project: a permutation of the 1,797 scans by this seed,
# the first quarter for the test split. Changing it would let digits-clip see test scans.
SPLIT_SEED = 20230731
TEST_FRACTION = 0.25
SPLITS = ("train", "test")
MAX_DIGITS = 4
SCAN_SIDE = 8
# Appearance of a canvas, all in intensity units of [0, 1]: a background level, digit ink
# levels, and Gaussian pixel noise added over the whole canvas after the digits are drawn.
BACKGROUND_RANGE = (0.0, 0.3)
INK_RANGE = (0.7, 1.0)
NOISE_STD_RANGE = (0.02, 0.12)
# Canvases are rendered in chunks of this many, so that the random stream, and thus every
# image, depends on the seed only.
RENDER_CHUNK = 64


@dataclass(frozen=True)
class ScenesConfig:
    """Settings of one digit-scenes corpus; written to `scenes.json` next to the images."""

    out: str
    n_train: int
    n_test: int
    side: int
    seed: int
    min_digits: int = 1
    max_digits: int = MAX_DIGITS


@dataclass
class SceneLayout:
    """Random layout of a batch of canvases, as tensors of a leading batch axis B.

    Attributes:
        scan_index: (B, K) index into the split's scans; K = max digits per canvas.
        present: (B, K) whether digit slot k is drawn (slots fill from 0).
        boxes: (B, K, 3) top-left x, top-left y and side of each digit, in canvas pixels.
        ink: (B, K) ink intensity of each digit.
        background: (B,) background intensity.
        noise_std: (B,) standard deviation of the pixel noise.
    """

    scan_index: torch.Tensor
    present: torch.Tensor
    boxes: torch.Tensor
    ink: torch.Tensor
    background: torch.Tensor
    noise_std: torch.Tensor


@lru_cache(maxsize=1)
def _split_indices() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    n_scans = len(load_digits().target)
    order = np.random.default_rng(SPLIT_SEED).permutation(n_scans)
    n_test = round(TEST_FRACTION * n_scans)
    return {"test": np.sort(order[:n_test]), "train": np.sort(order[n_test:])}


def scan_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the digit scans of one split as images in [0, 1] and labels.

    Args:
        split: "train" (about three quarters of the 1,797 scans) or "test" (the rest).

    Returns:
        (scans (N, 8, 8) float32 with 1.0 = full ink, labels (N,) int64 digit values).

    Raises:
        ValueError: for an unknown split name.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    index = _split_indices()[split]
    scans = (digits.images[index] / 16.0).astype(np.float32)
    return scans, digits.target[index].astype(np.int64)


def sample_layout(
    batch: int,
    side: int,
    n_scans: int,
    generator: torch.Generator,
    min_digits: int = 1,
    max_digits: int = MAX_DIGITS,
) -> SceneLayout:
    """Draw the random layout of `batch` canvases of side `side` from the fixed distribution."""
    import torch

    if side < SCAN_SIDE:
        raise ValueError(f"canvas side {side} is too small: use a side of at least {SCAN_SIDE}")
    counts = torch.randint(min_digits, max_digits + 1, (batch,), generator=generator)
    present = torch.arange(MAX_DIGITS).unsqueeze(0) < counts.unsqueeze(1)
    min_side = math.ceil(side / 8)
    max_side = max(min_side, math.floor(3 * side / 4))
    sides = torch.randint(min_side, max_side + 1, (batch, MAX_DIGITS), generator=generator)
    u = torch.rand(batch, MAX_DIGITS, 2, generator=generator)
    top_left = torch.floor(u * (side - sides + 1).unsqueeze(-1).float())
    boxes = torch.cat([top_left, sides.unsqueeze(-1).float()], dim=-1)
    scan_index = torch.randint(0, n_scans, (batch, MAX_DIGITS), generator=generator)
    ink = _uniform(INK_RANGE, (batch, MAX_DIGITS), generator)
    background = _uniform(BACKGROUND_RANGE, (batch,), generator)
    noise_std = _uniform(NOISE_STD_RANGE, (batch,), generator)
    return SceneLayout(scan_index, present, boxes, ink, background, noise_std)


def _uniform(
    bounds: tuple[float, float], shape: tuple[int, ...], generator: torch.Generator
) -> torch.Tensor:
    import torch

    low, high = bounds
    return low + (high - low) * torch.rand(shape, generator=generator)


def render(
    layout: SceneLayout,
    scans: torch.Tensor,
    window: torch.Tensor,
    out_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render a window of each canvas, with digit alpha from bilinear upsampling of the scans.

    Args:
        layout: the canvases' layout (batch B, digit slots K).
        scans: (N, 8, 8) scans in [0, 1] that `layout.scan_index` points into.
        window: (B, 3) top-left x, top-left y and side of the square window, in canvas pixels;
            the full canvas is (0, 0, S). Parts of a digit outside the window are cut off.
        out_size: side of the rendered window in pixels; equal to the window's side for a
            faithful rendering (the noise is per rendered pixel).
        generator: source of the pixel noise.

    Returns:
        (images (B, out_size, out_size) in [0, 1], visible (B, K) the fraction of each digit's
        ink that shows in the window after occlusion by later digits, 0 for absent slots).
    """
    import torch
    import torch.nn.functional as F

    batch, slots = layout.present.shape
    pixel = (torch.arange(out_size, dtype=torch.float32) + 0.5) / out_size
    # Canvas coordinates of the output pixel centers, per window: (B, out_size).
    xs = window[:, 0:1] + pixel.unsqueeze(0) * window[:, 2:3]
    ys = window[:, 1:2] + pixel.unsqueeze(0) * window[:, 2:3]
    x0, y0, digit_side = layout.boxes.unbind(-1)
    # grid_sample's normalized coordinates of each output pixel in each digit: (B, K, out).
    gx = 2.0 * (xs.unsqueeze(1) - x0.unsqueeze(-1)) / digit_side.unsqueeze(-1) - 1.0
    gy = 2.0 * (ys.unsqueeze(1) - y0.unsqueeze(-1)) / digit_side.unsqueeze(-1) - 1.0
    grid = torch.stack(
        [
            gx.unsqueeze(2).expand(-1, -1, out_size, -1),
            gy.unsqueeze(3).expand(-1, -1, -1, out_size),
        ],
        dim=-1,
    ).reshape(batch * slots, out_size, out_size, 2)
    source = scans[layout.scan_index.reshape(-1)].unsqueeze(1)
    alpha = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    alpha = alpha.reshape(batch, slots, out_size, out_size).clamp(0.0, 1.0)
    alpha = alpha * layout.present[:, :, None, None]

    image = layout.background[:, None, None].expand(-1, out_size, out_size).clone()
    cover = torch.ones_like(image)
    visible_alpha = torch.zeros_like(alpha)
    for k in reversed(range(slots)):
        visible_alpha[:, k] = alpha[:, k] * cover
        cover = cover * (1.0 - alpha[:, k])
    for k in range(slots):
        image = image * (1.0 - alpha[:, k]) + layout.ink[:, k, None, None] * alpha[:, k]
    noise = torch.randn(image.shape, generator=generator)
    image = (image + layout.noise_std[:, None, None] * noise).clamp(0.0, 1.0)

    # Ink of a whole digit in output pixels: the integral of the bilinear interpolant, in which
    # a border scan pixel weighs 7/8 per axis because the interpolant falls to half at the edge.
    edge = torch.ones(SCAN_SIDE)
    edge[0] = edge[-1] = 0.875
    weights = torch.outer(edge, edge) / (SCAN_SIDE * SCAN_SIDE)
    pixel_side = window[:, 2:3] / out_size
    scan_ink = (scans[layout.scan_index] * weights).sum(dim=(-1, -2))
    full_ink = scan_ink * (digit_side / pixel_side) ** 2
    shown_ink = visible_alpha.sum(dim=(-1, -2))
    visible = torch.where(
        layout.present, (shown_ink / full_ink.clamp_min(1e-6)).clamp(0.0, 1.0), 0.0
    )
    return image, visible


def generate_split(
    split: str, count: int, side: int, seed: int, min_digits: int = 1, max_digits: int = MAX_DIGITS
) -> tuple[np.ndarray, list[list[str]]]:
    """Generate `count` canvases of one split; the same arguments give the same pixels.

    Returns:
        (images (count, side, side) uint8, label sets as sorted lists of class names).
    """
    import torch

    scans_np, labels_np = scan_split(split)
    scans = torch.from_numpy(scans_np)
    split_offset = SPLITS.index(split)
    generator = torch.Generator().manual_seed(seed * len(SPLITS) + split_offset)
    images = np.empty((count, side, side), dtype=np.uint8)
    label_sets: list[list[str]] = []
    for start in range(0, count, RENDER_CHUNK):
        batch = min(RENDER_CHUNK, count - start)
        layout = sample_layout(batch, side, len(scans), generator, min_digits, max_digits)
        window = torch.tensor([[0.0, 0.0, float(side)]]).expand(batch, -1)
        chunk, _ = render(layout, scans, window, side, generator)
        images[start : start + batch] = np.round(chunk.numpy() * 255.0).astype(np.uint8)
        for row in range(batch):
            slots = layout.present[row].nonzero().flatten().tolist()
            digits = {int(labels_np[int(layout.scan_index[row, k])]) for k in slots}
            label_sets.append([CLASS_NAMES[d] for d in sorted(digits)])
    return images, label_sets


def write_scenes(config: ScenesConfig) -> dict[str, Path]:
    """Write the corpus: `<out>/<split>/<id>.png` and `<out>/<split>-labels.json` per split.

    Returns:
        The ground-truth file of each split.
    """
    from PIL import Image

    out = Path(config.out)
    ground_truth: dict[str, Path] = {}
    for split, count in (("train", config.n_train), ("test", config.n_test)):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        images, label_sets = generate_split(
            split, count, config.side, config.seed, config.min_digits, config.max_digits
        )
        width = max(6, len(str(count)))
        labels: dict[str, list[str]] = {}
        for index, (image, label_set) in enumerate(zip(images, label_sets, strict=True)):
            image_id = f"{index:0{width}d}.png"
            Image.fromarray(image, mode="L").save(folder / image_id)
            labels[image_id] = label_set
        path = out / f"{split}-labels.json"
        path.write_text(json.dumps({"classes": list(CLASS_NAMES), "labels": labels}) + "\n")
        ground_truth[split] = path
        _logger.info("wrote %d %s canvases to %s", count, split, folder)
    (out / "scenes.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    return ground_truth


def read_ground_truth(
    path: Path, image_ids: list[str] | None = None
) -> tuple[list[str], list[str], np.ndarray]:
    """Read a ground-truth file into (class names, image ids, labels (N, C) uint8).

    Args:
        path: a file in the ground-truth format.
        image_ids: the rows to return, in this order (default: every image, in file order).
    """
    data = json.loads(Path(path).read_text())
    classes = list(data["classes"])
    ids = list(data["labels"]) if image_ids is None else list(image_ids)
    column = {name: j for j, name in enumerate(classes)}
    labels = np.zeros((len(ids), len(classes)), dtype=np.uint8)
    for row, image_id in enumerate(ids):
        if image_id not in data["labels"]:
            raise ValueError(f"image id {image_id!r} is not in {path}: pass ids of that file")
        for name in data["labels"][image_id]:
            if name not in column:
                raise ValueError(
                    f"{path}: label {name!r} of {image_id!r} is not in its classes: fix the file"
                )
            labels[row, column[name]] = 1
    return classes, ids, labels


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `cdul-train scenes`."""
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument(
        "--n-train", type=int, default=2000, help="number of training canvases (default 2000)"
    )
    parser.add_argument(
        "--n-test", type=int, default=500, help="number of test canvases (default 500)"
    )
    parser.add_argument(
        "--side",
        type=int,
        default=96,
        help="canvas side S in pixels (default 96); digits-clip's 32-pixel input needs S >= 64",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--max-digits",
        type=int,
        default=MAX_DIGITS,
        help=f"maximum digits per canvas, 1 to {MAX_DIGITS} (default {MAX_DIGITS}); "
        "the reported numbers use the default",
    )


def run(args: argparse.Namespace) -> int:
    """Run `cdul-train scenes`."""
    from cdul_training.cli import UsageError

    if args.n_train < 0 or args.n_test < 0:
        raise UsageError(
            f"--n-train {args.n_train} / --n-test {args.n_test}: use counts of 0 or more"
        )
    if args.side < 64:
        raise UsageError(f"--side {args.side} is too small: use 64 or more pixels")
    if not 1 <= args.max_digits <= MAX_DIGITS:
        raise UsageError(f"--max-digits {args.max_digits}: use a value from 1 to {MAX_DIGITS}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: give a folder")
    config = ScenesConfig(
        out=str(out),
        n_train=args.n_train,
        n_test=args.n_test,
        side=args.side,
        seed=args.seed,
        max_digits=args.max_digits,
    )
    _logger.info("writing digit-scenes: %s", config)
    ground_truth = write_scenes(config)
    for split, path in ground_truth.items():
        print(f"{split}: {out / split} ({path.name})")
    return 0
