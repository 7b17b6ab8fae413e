"""`clip-windows`: a multiple-instance classifier on frozen CLIP embeddings of image windows.

The classifier's input is an image of side `3 * s`, where `s` is the CLIP model's input side,
normalized with the CLIP model's mean and standard deviation. It is cut into square windows
on a grid of half cells (`s / 2` pixels each, six to a side), at three scales:

- the whole image (6 half cells), averaged 3 x 3 down to side `s`: 1 view;
- windows of 4 half cells at a stride of one half cell, averaged 2 x 2 down to `s`: 9 views;
- windows of 2 half cells at a stride of one half cell, at full resolution: 25 views.

The frozen CLIP image encoder embeds all 35 views. Per scale, a two-layer perceptron maps each
view's embedding to class logits, and the maximum over the views of that scale keeps the
strongest window. The logits are the sum of the three maxima. Windows overlap by half, so an
object that a 3 x 3 tile grid would cut in two lies whole in some window. Only the perceptrons
train, so `cdul-train fit` embeds the corpus once and trains on the embeddings. Export composes
the window cutting, the CLIP image graph and the heads into one ONNX graph from pixels to
logits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from cdul_server.model_repository import ClipModel

_logger = logging.getLogger(__name__)

# Window sides in half cells, largest first; the image is 6 half cells wide.
WINDOW_SCALES = (6, 4, 2)
HALF_CELLS = 6
HIDDEN_UNITS = 128


def views_per_scale() -> tuple[int, ...]:
    """Number of windows of each scale of `WINDOW_SCALES`: (1, 9, 25)."""
    return tuple((HALF_CELLS - side + 1) ** 2 for side in WINDOW_SCALES)


N_VIEWS = sum(views_per_scale())


def input_side(view_side: int) -> int:
    """Side in pixels of the classifier's input for a CLIP model of input side `view_side`."""
    check_view_side(view_side)
    return 3 * view_side


def check_view_side(view_side: int) -> None:
    """Raise ValueError unless `view_side` can be cut into half cells."""
    if view_side < 2 or view_side % 2:
        raise ValueError(
            f"clip-windows needs a CLIP model with an even input side; this one takes "
            f"{view_side} px: pick another arch or CLIP model"
        )


class WindowViews(nn.Module):
    """Cut pixels (B, 3, 3s, 3s) into the `N_VIEWS` views (B * N_VIEWS, 3, s, s), image-major."""

    def __init__(self, view_side: int) -> None:
        super().__init__()
        check_view_side(view_side)
        self.view_side = view_side

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        half = self.view_side // 2
        views = []
        for side in WINDOW_SCALES:
            width = side * half
            factor = side // 2
            for row in range(HALF_CELLS - side + 1):
                for col in range(HALF_CELLS - side + 1):
                    top, left = row * half, col * half
                    window = pixels[:, :, top : top + width, left : left + width]
                    if factor > 1:
                        window = F.avg_pool2d(window, factor)
                    views.append(window)
        stacked = torch.stack(views, dim=1)  # (B, V, 3, s, s)
        return stacked.reshape(-1, 3, self.view_side, self.view_side)


class WindowHead(nn.Module):
    """Map window embeddings (B, N_VIEWS, D) to logits (B, C); see the module docstring."""

    def __init__(self, embedding_dim: int, num_classes: int, hidden: int = HIDDEN_UNITS) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Linear(embedding_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
            )
            for _ in WINDOW_SCALES
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        embeddings = embeddings.reshape(-1, N_VIEWS, self.embedding_dim)
        logits = None
        start = 0
        for head, count in zip(self.heads, views_per_scale(), strict=True):
            strongest = head(embeddings[:, start : start + count]).amax(dim=1)
            logits = strongest if logits is None else logits + strongest
            start += count
        assert logits is not None
        return logits


def embed_windows(
    clip: ClipModel,
    images: Sequence[torch.Tensor] | torch.utils.data.Dataset,
    batch_size: int = 64,
    set_name: str = "images",
) -> np.ndarray:
    """Embed the windows of every image of `images` with the CLIP image encoder.

    Args:
        clip: the frozen CLIP model whose image graph embeds the views.
        images: items `(pixels (3, 3s, 3s), index)` as `cdul_training.datasets.ImageDataset`
            gives them, normalized with the CLIP model's mean and std.
        batch_size: images per encoder call (each brings `N_VIEWS` views).
        set_name: the name of the image set in progress messages.

    Returns:
        float32 array (N, N_VIEWS, D).
    """
    cutter = WindowViews(clip.preprocess.size)
    total = len(images)  # type: ignore[arg-type]
    out = np.zeros((total, N_VIEWS, clip.embedding_dim), dtype=np.float32)
    started = last_report = time.monotonic()
    for start in range(0, total, batch_size):
        stop = min(total, start + batch_size)
        pixels = torch.stack([images[i][0] for i in range(start, stop)])
        with torch.no_grad():
            views = cutter(pixels).numpy()
        out[start:stop] = clip.encode_images(np.ascontiguousarray(views)).reshape(
            stop - start, N_VIEWS, -1
        )
        now = time.monotonic()
        if now - last_report > 10 or stop == total:
            _logger.info(
                "embedded the windows of %d/%d %s (%.1f s)", stop, total, set_name, now - started
            )
            last_report = now
    return out
