"""Train digits-clip, the small CLIP model of the embedded default, on scikit-learn's digits.

The model is an open_clip model with the custom configuration `digits-clip` (a ResNet image
tower at 32 pixels and a small text tower with the real CLIP BPE tokenizer). It trains on the
train split of the digit scans only, contrastively against class captions from several
templates. The views look like the ones that CDUL pseudo labeling feeds it: whole digit-scenes
canvases downscaled to the input, tile-sized windows of canvases that cut digits off or contain
none, single digits, and empty frames. A view's target spreads over the classes by how much of
each digit shows, and what the digits do not cover goes to the uniform distribution, so empty
and fragment views are trained toward maximum entropy instead of a confident guess.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdul_training import scenes

if TYPE_CHECKING:
    import torch

_logger = logging.getLogger(__name__)

MODEL_NAME = "digits-clip"
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
DEFAULT_TEMPLATE = "a photo of the digit {}."
# Templates filled with the class name ("seven"); the first is the default of the shipped model.
WORD_TEMPLATES: tuple[str, ...] = (
    DEFAULT_TEMPLATE,
    "a handwritten {}.",
    "the digit {}.",
    "a photo of a handwritten {}.",
    "a blurry photo of the digit {}.",
    "a scan of the number {}.",
    "the number {}.",
)
# Templates filled with the numeral ("7"); used in training only, because a server fills
# templates with class names.
NUMERAL_TEMPLATES: tuple[str, ...] = (
    "a handwritten {}.",
    "a photo of the digit {}.",
    "the number {}.",
)
INPUT_SIDE = 32
# Rendering settings of the held-out scans for zero-shot accuracy: one scan centered in the
# 32-pixel input with a 28-pixel side, on a background in the middle of the scenes' ranges.
EVAL_DIGIT_SIDE = 28
EVAL_BACKGROUND = 0.15
EVAL_INK = 0.85
EVAL_NOISE_STD = 0.07
EVAL_SEED = 7

_registered = False


def register_model_config() -> str:
    """Register the `digits-clip` model configuration with open_clip; returns the model name.

    Safe to call more than once. After it, `open_clip.create_model("digits-clip", ...)` and
    `open_clip.get_tokenizer("digits-clip")` work like for a built-in model.
    """
    global _registered
    import open_clip

    if not _registered or MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR / f"{MODEL_NAME}.json")
        _registered = True
    return MODEL_NAME


@dataclass(frozen=True)
class TrainClipConfig:
    """Settings of one digits-clip training run; written next to the checkpoint."""

    out: str
    steps: int = 1000
    seed: int = 0
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    threads: int = 1
    canvas_side: int = 96
    # Shares of a batch: whole canvases downscaled, tile-sized windows, single digits, empty.
    share_global: float = 0.35
    share_tile: float = 0.35
    share_single: float = 0.22
    share_empty: float = 0.08
    init_logit_scale: float = 10.0
    max_logit_scale: float = 100.0
    eval_every: int = 500


def caption_tokens(tokenizer: Any) -> torch.Tensor:
    """Tokenize every training caption: returns (templates, classes, context) token ids."""
    captions = [
        [template.format(name) for name in scenes.CLASS_NAMES] for template in WORD_TEMPLATES
    ]
    captions += [[template.format(d) for d in range(10)] for template in NUMERAL_TEMPLATES]
    flat = [caption for row in captions for caption in row]
    tokens = tokenizer(flat)
    return tokens.reshape(len(captions), len(scenes.CLASS_NAMES), -1)


def _targets(visible: torch.Tensor, classes: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Soft targets: each class gets the visible fraction of its digits, the rest is uniform."""
    import torch

    mass = torch.zeros(visible.shape[0], n_classes)
    mass.scatter_add_(1, classes, visible)
    total = mass.sum(dim=1, keepdim=True)
    full = mass / total.clamp_min(1.0)
    return full + (1.0 - total).clamp_min(0.0) / n_classes


def _to_pixels(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Quantize like an 8-bit PNG, replicate gray to RGB and normalize: (B, 3, S, S)."""
    images = quantize_8bit(images.clamp(0.0, 1.0))
    return (images.unsqueeze(1).expand(-1, 3, -1, -1) - mean) / std


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """Round intensities in [0, 1] to the nearest of 256 levels, as an 8-bit file stores them."""
    import torch

    return torch.round(images * 255.0) / 255.0


def make_batch(
    config: TrainClipConfig,
    scans: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one training batch of views: (images (B, 32, 32) in [0, 1], targets (B, 10))."""
    import torch
    import torch.nn.functional as F

    n_classes = len(scenes.CLASS_NAMES)
    side = config.canvas_side
    counts = _share_counts(config)
    images: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []

    # Whole canvases, rendered at full size and downscaled like the global view.
    n = counts["global"]
    layout = scenes.sample_layout(n, side, len(scans), generator)
    window = torch.tensor([[0.0, 0.0, float(side)]]).expand(n, -1)
    canvas, visible = scenes.render(layout, scans, window, side, generator)
    canvas = quantize_8bit(canvas).unsqueeze(1)
    small = F.interpolate(canvas, size=INPUT_SIDE, mode="bicubic", antialias=True).squeeze(1)
    images.append(small)
    targets.append(_targets(visible, labels[layout.scan_index], n_classes))

    # Windows of the size of a 3 x 3 tile at any position of a canvas.
    n = counts["tile"]
    layout = scenes.sample_layout(n, side, len(scans), generator)
    tile = side // 3
    offsets = torch.floor(torch.rand(n, 2, generator=generator) * (side - tile + 1))
    window = torch.cat([offsets, torch.full((n, 1), float(tile))], dim=1)
    crop, visible = scenes.render(layout, scans, window, tile, generator)
    if tile != INPUT_SIDE:
        crop = F.interpolate(
            crop.unsqueeze(1), size=INPUT_SIDE, mode="bicubic", antialias=True
        ).squeeze(1)
    images.append(crop)
    targets.append(_targets(visible, labels[layout.scan_index], n_classes))

    # One digit filling half to all of the input, fully inside it.
    n = counts["single"]
    layout = scenes.sample_layout(n, INPUT_SIDE, len(scans), generator, max_digits=1)
    digit_side = torch.randint(INPUT_SIDE // 2, INPUT_SIDE + 1, (n,), generator=generator)
    top_left = torch.floor(
        torch.rand(n, 2, generator=generator) * (INPUT_SIDE - digit_side + 1).unsqueeze(1)
    )
    layout.boxes[:, 0, :2] = top_left
    layout.boxes[:, 0, 2] = digit_side.float()
    window = torch.tensor([[0.0, 0.0, float(INPUT_SIDE)]]).expand(n, -1)
    single, visible = scenes.render(layout, scans, window, INPUT_SIDE, generator)
    images.append(single)
    targets.append(_targets(visible, labels[layout.scan_index], n_classes))

    # Empty frames: background and noise only, with the uniform target.
    n = counts["empty"]
    layout = scenes.sample_layout(n, INPUT_SIDE, len(scans), generator)
    layout.present[:] = False
    window = torch.tensor([[0.0, 0.0, float(INPUT_SIDE)]]).expand(n, -1)
    empty, _ = scenes.render(layout, scans, window, INPUT_SIDE, generator)
    images.append(empty)
    targets.append(torch.full((n, n_classes), 1.0 / n_classes))

    return torch.cat(images), torch.cat(targets)


def _share_counts(config: TrainClipConfig) -> dict[str, int]:
    shares = {
        "global": config.share_global,
        "tile": config.share_tile,
        "single": config.share_single,
        "empty": config.share_empty,
    }
    total = sum(shares.values())
    counts = {kind: int(config.batch_size * share / total) for kind, share in shares.items()}
    counts["global"] += config.batch_size - sum(counts.values())
    return counts


def heldout_scan_images(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Render every scan of a split once, centered, for zero-shot accuracy.

    Returns:
        (images (N, 32, 32) in [0, 1], labels (N,)); the same pixels on every call.
    """
    import torch

    scans_np, labels_np = scenes.scan_split(split)
    scans = torch.from_numpy(scans_np)
    n = len(scans)
    offset = (INPUT_SIDE - EVAL_DIGIT_SIDE) / 2
    layout = scenes.SceneLayout(
        scan_index=torch.arange(n).unsqueeze(1),
        present=torch.ones(n, 1, dtype=torch.bool),
        boxes=torch.tensor([[[offset, offset, float(EVAL_DIGIT_SIDE)]]]).expand(n, -1, -1),
        ink=torch.full((n, 1), EVAL_INK),
        background=torch.full((n,), EVAL_BACKGROUND),
        noise_std=torch.full((n,), EVAL_NOISE_STD),
    )
    window = torch.tensor([[0.0, 0.0, float(INPUT_SIDE)]]).expand(n, -1)
    generator = torch.Generator().manual_seed(EVAL_SEED)
    images, _ = scenes.render(layout, scans, window, INPUT_SIDE, generator)
    return quantize_8bit(images), torch.from_numpy(labels_np)


def class_embeddings(model: Any, tokenizer: Any, templates: tuple[str, ...]) -> torch.Tensor:
    """Normalized mean text embedding of each class over `templates`: (10, D)."""
    import torch

    with torch.no_grad():
        rows = []
        for template in templates:
            tokens = tokenizer([template.format(name) for name in scenes.CLASS_NAMES])
            rows.append(model.encode_text(tokens, normalize=True))
        mean = torch.stack(rows).mean(dim=0)
        return mean / mean.norm(dim=-1, keepdim=True)


def zero_shot_accuracy(
    model: Any, tokenizer: Any, templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
) -> float:
    """Zero-shot accuracy in percent on the held-out (test split) scans, centered."""
    import torch

    images, labels = heldout_scan_images("test")
    mean, std = _normalization(model)
    text = class_embeddings(model, tokenizer, templates)
    with torch.no_grad():
        embeddings = model.encode_image(_to_pixels(images, mean, std), normalize=True)
    predicted = (embeddings @ text.T).argmax(dim=1)
    return float((predicted == labels).float().mean()) * 100.0


def _normalization(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    cfg = model.visual.preprocess_cfg
    mean = torch.tensor(cfg["mean"], dtype=torch.float32).reshape(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32).reshape(1, 3, 1, 1)
    return mean, std


def train(config: TrainClipConfig) -> dict[str, Any]:
    """Train digits-clip and save the checkpoint; returns the run's measured facts."""
    import open_clip
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    register_model_config()
    model = open_clip.create_model(MODEL_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(config.init_logit_scale))
    mean, std = _normalization(model)

    scans_np, labels_np = scenes.scan_split("train")
    scans = torch.from_numpy(scans_np)
    labels = torch.from_numpy(labels_np)
    tokens = caption_tokens(tokenizer)
    n_templates, n_classes, context = tokens.shape
    generator = torch.Generator().manual_seed(config.seed)

    decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in name]
    no_decay = [p for name, p in model.named_parameters() if p.ndim < 2 or "embedding" in name]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    history: list[dict[str, float]] = []
    start_wall = time.perf_counter()
    start_cpu = time.process_time()
    model.train()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        images, targets = make_batch(config, scans, labels, generator)
        template_index = torch.randint(0, n_templates, (len(images),), generator=generator)
        image_features = model.encode_image(_to_pixels(images, mean, std), normalize=True)
        text_features = model.encode_text(tokens.reshape(-1, context), normalize=True)
        text_features = text_features.reshape(n_templates, n_classes, -1)[template_index]
        scale = model.logit_scale.exp()
        logits = scale * torch.einsum("bd,bcd->bc", image_features, text_features)
        loss = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, math.log(config.max_logit_scale))

        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            model.eval()
            accuracy = zero_shot_accuracy(model, tokenizer)
            model.train()
            record = {
                "step": step + 1,
                "loss": float(loss.detach()),
                "logit_scale": float(scale.detach()),
                "zero_shot_accuracy": accuracy,
                "wall_s": time.perf_counter() - start_wall,
            }
            history.append(record)
            _logger.info(
                "step %d loss %.4f scale %.1f zero-shot %.1f%% (%.0f s)",
                step + 1,
                record["loss"],
                record["logit_scale"],
                accuracy,
                record["wall_s"],
            )

    wall_s = time.perf_counter() - start_wall
    cpu_s = time.process_time() - start_cpu
    model.eval()
    facts = {
        "model": MODEL_NAME,
        "steps": config.steps,
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "steps_per_s": config.steps / wall_s if wall_s > 0 else 0.0,
        "zero_shot_accuracy": zero_shot_accuracy(model, tokenizer),
        "zero_shot_accuracy_ensemble": zero_shot_accuracy(model, tokenizer, WORD_TEMPLATES),
        "logit_scale": float(model.logit_scale.detach().exp()),
        "history": history,
    }
    save_checkpoint(model, config, facts)
    return facts


def save_checkpoint(model: Any, config: TrainClipConfig, facts: dict[str, Any]) -> None:
    """Save the open_clip state dict to `config.out` and the settings and facts beside it."""
    import torch

    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "model": MODEL_NAME}, out)
    summary = {"config": asdict(config), "facts": facts}
    out.with_name(out.name + ".json").write_text(json.dumps(summary, indent=2) + "\n")
    _logger.info("saved %s and %s.json", out, out.name)


def load_model(checkpoint: Path | None) -> tuple[Any, Any]:
    """Load a digits-clip checkpoint with open_clip: returns (model in eval mode, tokenizer).

    With `checkpoint` None the model has random weights, which tests use.
    """
    import open_clip

    register_model_config()
    pretrained = None if checkpoint is None else str(checkpoint)
    model = open_clip.create_model(MODEL_NAME, pretrained=pretrained)
    model.eval()
    return model, open_clip.get_tokenizer(MODEL_NAME)


def scene_pseudo_label_map(
    model: Any,
    tokenizer: Any,
    scenes_dir: Path,
    split: str = "train",
    limit: int | None = None,
    grid_size: int = 3,
    template: str = DEFAULT_TEMPLATE,
    batch_size: int = 256,
    threshold: float = 0.0,
    lambda_weight: float = 0.0,
) -> dict[str, float]:
    """Measure CDUL pseudo-label mAP of the global, aggregate and final scores on digit-scenes.

    The views go through open_clip's own transform and the PyTorch model. Scores, aggregation
    and mAP are computed as in `_scene_maps`, with `threshold` and `lambda_weight` passed to
    `cdul_server.scoring.pseudo_labels` (0 and 0 by default, the CDUL defaults).

    Returns:
        mAP in percent under the keys "global", "aggregate" and "final", and "n_images".
    """
    import numpy as np
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2

    transform = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)

    def encode(images: list[Any]) -> np.ndarray:
        with torch.no_grad():
            pixels = torch.stack([transform(image) for image in images])
            return model.encode_image(pixels, normalize=True).numpy()

    text = class_embeddings(model, tokenizer, (template,)).numpy()
    temperature = float(model.logit_scale.detach().exp())
    return _scene_maps(
        encode,
        text,
        temperature,
        scenes_dir,
        split,
        limit,
        grid_size,
        batch_size,
        threshold,
        lambda_weight,
    )


def onnx_scene_pseudo_label_map(
    clip_model: Any,
    scenes_dir: Path,
    split: str = "train",
    limit: int | None = None,
    grid_size: int = 3,
    template: str = DEFAULT_TEMPLATE,
    batch_size: int = 256,
    threshold: float = 0.0,
    lambda_weight: float = 0.0,
) -> dict[str, float]:
    """Measure the same mAPs as `scene_pseudo_label_map` for an exported model.

    Args:
        clip_model: a `cdul_server.model_repository.ClipModel`; the views go through the
            server's preprocessing (its center-crop view) and the ONNX graphs.
    """
    from cdul_server.preprocess import preprocess_batch

    def encode(images: list[Any]) -> Any:
        return clip_model.encode_images(preprocess_batch(images, clip_model.preprocess))

    text = clip_model.encode_texts([template.format(name) for name in scenes.CLASS_NAMES])
    temperature = float(clip_model.logit_scale)
    return _scene_maps(
        encode,
        text,
        temperature,
        scenes_dir,
        split,
        limit,
        grid_size,
        batch_size,
        threshold,
        lambda_weight,
    )


def _scene_maps(
    encode: Callable[[list[Any]], Any],
    text: Any,
    temperature: float,
    scenes_dir: Path,
    split: str,
    limit: int | None,
    grid_size: int,
    batch_size: int,
    threshold: float,
    lambda_weight: float,
) -> dict[str, float]:
    """Score a split's images and their tiles and return the pseudo-label mAPs.

    The images are read from the PNG files, tiles are cut with `cdul_server.scoring.cut_tiles`,
    and scores, aggregation and final pseudo labels come from `cdul_server.scoring` (threshold
    and lambda as given, 0 by default) at the model's learned temperature. The mAP comes from
    `cdul_training.metrics`.
    """
    import numpy as np
    from PIL import Image

    from cdul_server import scoring
    from cdul_training.metrics import mean_average_precision

    _, ids, labels = scenes.read_ground_truth(Path(scenes_dir) / f"{split}-labels.json")
    if limit is not None:
        ids, labels = ids[:limit], labels[:limit]
    if not ids:
        raise ValueError(f"no images in the {split} split of {scenes_dir}: write some first")
    embeddings: list[np.ndarray] = []
    pending: list[Image.Image] = []
    for image_id in ids:
        with Image.open(Path(scenes_dir) / split / image_id) as file:
            image = file.convert("RGB")
        pending.append(image)
        pending.extend(
            Image.fromarray(tile) for tile in scoring.cut_tiles(np.asarray(image), grid_size)
        )
        if len(pending) >= batch_size:
            embeddings.append(np.asarray(encode(pending)))
            pending = []
    if pending:
        embeddings.append(np.asarray(encode(pending)))
    views = np.concatenate(embeddings).reshape(len(ids), 1 + grid_size * grid_size, -1)
    global_scores = scoring.similarity_scores(views[:, 0], text, temperature)
    tile_scores = scoring.similarity_scores(views[:, 1:], text, temperature)
    result = scoring.pseudo_labels(global_scores, tile_scores, threshold, lambda_weight)
    return {
        "global": mean_average_precision(result.global_scores, labels).map,
        "aggregate": mean_average_precision(result.aggregate, labels).map,
        "final": mean_average_precision(result.final, labels).map,
        "n_images": float(len(ids)),
    }


def onnx_zero_shot_accuracy(clip_model: Any, template: str = DEFAULT_TEMPLATE) -> float:
    """Zero-shot accuracy in percent of an exported model on the held-out scans.

    Args:
        clip_model: a `cdul_server.model_repository.ClipModel`, such as the shipped digits-clip;
            the images go through the server's own preprocessing and ONNX graphs.
        template: prompt template with `{}` for the class name.
    """
    import numpy as np
    from PIL import Image

    from cdul_server.preprocess import preprocess_batch

    images, labels = heldout_scan_images("test")
    pixels = np.round(images.numpy() * 255.0).astype(np.uint8)
    photos = [Image.fromarray(image, mode="L").convert("RGB") for image in pixels]
    embeddings = clip_model.encode_images(preprocess_batch(photos, clip_model.preprocess))
    text = clip_model.encode_texts([template.format(name) for name in scenes.CLASS_NAMES])
    predicted = (embeddings @ text.T).argmax(axis=1)
    return float((predicted == labels.numpy()).mean()) * 100.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `cdul-train train-clip`."""
    defaults = TrainClipConfig(out="")
    parser.add_argument(
        "--out", required=True, help="checkpoint file to write (a .json summary goes beside it)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=defaults.steps,
        help=f"training steps (default {defaults.steps})",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default 0)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help=f"views per step (default {defaults.batch_size})",
    )
    parser.add_argument(
        "--lr", type=float, default=defaults.lr, help=f"peak learning rate (default {defaults.lr})"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=defaults.threads,
        help=f"torch CPU threads (default {defaults.threads}); results are reproducible for a "
        "fixed seed and thread count",
    )
    for kind, description in (
        ("global", "whole canvases downscaled to the input"),
        ("tile", "tile-sized windows of canvases"),
        ("single", "single digits inside the frame"),
        ("empty", "empty frames with the uniform target"),
    ):
        default = getattr(defaults, f"share_{kind}")
        parser.add_argument(
            f"--share-{kind}",
            type=float,
            default=default,
            help=f"relative share of {description} in a batch (default {default})",
        )
    parser.add_argument(
        "--scenes",
        type=Path,
        default=None,
        help="digit-scenes folder (from `cdul-train scenes`): after training, measure the "
        "pseudo-label mAP of the global, aggregate and final scores on its splits and add it "
        "to the summary (default: no scene evaluation)",
    )
    parser.add_argument(
        "--scenes-limit",
        type=int,
        default=400,
        help="images per split for --scenes, the first in file order (default 400)",
    )
    parser.add_argument(
        "--export",
        type=Path,
        default=None,
        help="after training, export the checkpoint with cdul-export (fp32 and int8 image "
        "graphs, default template) into this model folder, replacing it; needs the cdul-export "
        "distribution (default: no export)",
    )
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="load the existing --out checkpoint, export it if --export is given, and evaluate "
        "it instead of training",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=defaults.eval_every,
        help=f"steps between zero-shot evaluations on held-out scans (default "
        f"{defaults.eval_every})",
    )


def run(args: argparse.Namespace) -> int:
    """Run `cdul-train train-clip`."""
    from cdul_training.cli import UsageError

    for name in ("steps", "batch_size", "threads", "eval_every"):
        value = getattr(args, name)
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value}: use a positive integer")
    if not args.lr > 0:
        raise UsageError(f"--lr {args.lr}: use a positive learning rate")
    shares = [args.share_global, args.share_tile, args.share_single, args.share_empty]
    if min(shares) < 0 or sum(shares) <= 0:
        raise UsageError(f"--share-* values {shares}: use shares of 0 or more with a positive sum")
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder: give a checkpoint file name")
    if args.evaluate_only and not out.is_file():
        raise UsageError(f"--out {out} not found: --evaluate-only needs an existing checkpoint")
    if args.scenes is not None and not (args.scenes / "train-labels.json").is_file():
        raise UsageError(
            f"--scenes {args.scenes} has no train-labels.json: write it with cdul-train scenes"
        )
    if args.scenes_limit < 1:
        raise UsageError(f"--scenes-limit {args.scenes_limit}: use a positive integer")
    if args.evaluate_only:
        if args.export is not None:
            print(f"exported {out} to {export_checkpoint(out, args.export, args.threads)}")
        return _evaluate_checkpoint(out, args.scenes, args.scenes_limit, args.threads)
    config = TrainClipConfig(
        out=str(out),
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        threads=args.threads,
        share_global=args.share_global,
        share_tile=args.share_tile,
        share_single=args.share_single,
        share_empty=args.share_empty,
        eval_every=args.eval_every,
    )
    _logger.info("training digits-clip: %s", config)
    facts = train(config)
    print(
        f"{out}: zero-shot accuracy {facts['zero_shot_accuracy']:.1f}% on held-out scans, "
        f"{facts['steps']} steps in {facts['wall_s']:.0f} s "
        f"({facts['steps_per_s']:.2f} steps/s, {facts['cpu_s']:.0f} CPU s)"
    )
    if args.export is not None:
        folder = export_checkpoint(out, args.export, args.threads)
        print(f"exported {out} to {folder}")
    if args.scenes is not None:
        return _evaluate_checkpoint(out, args.scenes, args.scenes_limit, args.threads)
    return 0


def export_checkpoint(checkpoint: Path, folder: Path, threads: int = 1) -> Path:
    """Export a digits-clip checkpoint into a model folder with `cdul_export.export_clip`.

    The folder gets the fp32 graphs, the int8 image graph and the default template
    "a photo of the digit {}.", and replaces an existing folder.

    Raises:
        cdul_training.cli.UsageError: cdul-export is not installed.
    """
    from cdul_training.cli import UsageError

    try:
        from cdul_export.clip_export import ClipExportOptions, export_clip
    except ImportError as err:
        raise UsageError(
            f"--export needs the cdul-export distribution ({err}): install it with "
            "`pip install -e ./export` or export with `cdul-export clip`"
        ) from err
    options = ClipExportOptions(
        model=MODEL_NAME,
        pretrained=str(checkpoint),
        out=folder,
        model_config=MODEL_CONFIG_DIR / f"{MODEL_NAME}.json",
        overwrite=True,
        quantize="int8",
        default_templates=(DEFAULT_TEMPLATE,),
        threads=threads,
    )
    return export_clip(options)


def _evaluate_checkpoint(
    checkpoint: Path, scenes_dir: Path | None, limit: int, threads: int
) -> int:
    """Print zero-shot accuracy and scene mAPs and add them to the checkpoint's summary."""
    import torch

    torch.set_num_threads(threads)
    model, tokenizer = load_model(checkpoint)
    evaluation: dict[str, Any] = {
        "zero_shot_accuracy": zero_shot_accuracy(model, tokenizer),
        "zero_shot_accuracy_ensemble": zero_shot_accuracy(model, tokenizer, WORD_TEMPLATES),
    }
    print(
        f"{checkpoint}: zero-shot accuracy {evaluation['zero_shot_accuracy']:.1f}% "
        f"({evaluation['zero_shot_accuracy_ensemble']:.1f}% with all word templates)"
    )
    if scenes_dir is not None:
        for split in scenes.SPLITS:
            labels_path = scenes_dir / f"{split}-labels.json"
            if not labels_path.is_file() or not json.loads(labels_path.read_text())["labels"]:
                continue
            maps = scene_pseudo_label_map(model, tokenizer, scenes_dir, split, limit)
            evaluation[f"scenes_{split}"] = maps
            print(
                f"{scenes_dir} {split} ({maps['n_images']:.0f} images): pseudo-label mAP "
                f"global {maps['global']:.1f}, aggregate {maps['aggregate']:.1f}, "
                f"final {maps['final']:.1f}"
            )
    summary_path = checkpoint.with_name(checkpoint.name + ".json")
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary["evaluation"] = evaluation
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return 0
