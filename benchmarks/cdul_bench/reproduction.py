"""(c) The way a public reproduction of CDUL labels images: open_clip in PyTorch, per image.

For each image, the loop loads it with PIL and runs the model's transform on the whole image and
on each of its n x n tiles. It encodes the whole image in one pass and the tiles in a second
pass, then aggregates the softmax scores. It runs in fp32 and eager mode, with no batching across
images. The text embeddings of the vocabulary are computed once, before the timed runs.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .measure import Measurement, measure_rate

_logger = logging.getLogger(__name__)

# A small open_clip model for the smoke mode: the same code path as ViT-B-32 at a tiny cost.
SMOKE_MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
SMOKE_MODEL_NAME = "cdul-bench-smoke"


def register_smoke_model() -> str:
    """Register the smoke-mode model config with open_clip and return its name."""
    import open_clip

    if SMOKE_MODEL_NAME not in open_clip.list_models():
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{SMOKE_MODEL_NAME}.json"
            path.write_text(json.dumps(SMOKE_MODEL_CONFIG))
            open_clip.add_model_config(path)
    return SMOKE_MODEL_NAME


def _tile_boxes(width: int, height: int, grid_size: int) -> list[tuple[int, int, int, int]]:
    tile_w, tile_h = width // grid_size, height // grid_size
    return [
        (col * tile_w, row * tile_h, (col + 1) * tile_w, (row + 1) * tile_h)
        for row in range(grid_size)
        for col in range(grid_size)
    ]


def measure_reproduction(
    model_name: str,
    image_paths: Sequence[Path],
    class_names: Sequence[str],
    *,
    grid_size: int,
    threads: int,
    repeats: int,
) -> Measurement:
    """Measure images per second of the per-image open_clip loop.

    Args:
        model_name: An open_clip model name, created with random weights (speed does not
            depend on them).
        image_paths: The images of one repeat.
        class_names: Vocabulary of the pseudo labels.
        grid_size: Tiles per side.
        threads: torch intra-op threads.
        repeats: Timed repeats over ``image_paths``.
    """
    import open_clip
    import torch
    from PIL import Image

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, _, transform = open_clip.create_model_and_transforms(model_name, pretrained=None)
        model.eval()
        tokenizer = open_clip.get_tokenizer(model_name)
        with torch.no_grad():
            text = model.encode_text(tokenizer([f"a photo of a {name}." for name in class_names]))
            text = text / text.norm(dim=-1, keepdim=True)
        scale = float(model.logit_scale.detach().exp())

        def label(path: Path) -> np.ndarray:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
            whole = transform(image).unsqueeze(0)
            boxes = _tile_boxes(image.width, image.height, grid_size)
            tiles = torch.stack([transform(image.crop(box)) for box in boxes])
            with torch.no_grad():
                global_features = model.encode_image(whole)
                tile_features = model.encode_image(tiles)
            global_features = global_features / global_features.norm(dim=-1, keepdim=True)
            tile_features = tile_features / tile_features.norm(dim=-1, keepdim=True)
            global_scores = (scale * global_features @ text.T).softmax(dim=-1)[0]
            tile_scores = (scale * tile_features @ text.T).softmax(dim=-1)
            # Threshold 0: every class takes its tile maximum; lambda 0: the plain mean.
            aggregate = tile_scores.max(dim=0).values
            return ((global_scores + aggregate) / 2).numpy()

        def run_once() -> tuple[float, float]:
            start = time.perf_counter()
            for path in image_paths:
                label(path)
            return len(image_paths), time.perf_counter() - start

        params = {
            "model": model_name,
            "weights": "random init",
            "precision": "fp32",
            "grid": f"{grid_size}x{grid_size}",
            "passes per image": "1 global (batch 1) + 1 over the tiles (batch n^2)",
            "threads": threads,
            "images per repeat": len(image_paths),
            "classes": len(class_names),
            "torch": torch.__version__,
        }
        return measure_rate(
            "c", f"open_clip eager, {model_name}", run_once, repeats=repeats, params=params
        )
    finally:
        torch.set_num_threads(previous_threads)
