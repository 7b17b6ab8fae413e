"""Classifier architectures for `cdul-train fit`: ResNets, small CNNs, heads on CLIP embeddings."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

_logger = logging.getLogger(__name__)

ARCHS = ("resnet50", "resnet101", "small-cnn", "cnn-maxavg", "clip-linear", "clip-windows")
# Archs that train on frozen CLIP embeddings rather than on pixels.
CLIP_ARCHS = ("clip-linear", "clip-windows")
# The small CNNs by name: (width, global pooling). They take pixels normalized with 0.5/0.5.
SMALL_CNNS = {"small-cnn": (32, "avg"), "cnn-maxavg": (32, "max+avg")}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Default input side in pixels: 448 for ResNets as in the multi-label literature, 64 for the
# small CNN (digit scenes are 96 px); clip-linear takes embeddings, not pixels.
DEFAULT_IMAGE_SIZE = {"resnet50": 448, "resnet101": 448} | {name: 64 for name in SMALL_CNNS}


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU stages with max pooling, global pooling and a linear head.

    About 0.24 M parameters at width 32; meant for small images (32 to 128 px) such as digit scenes.
    Global pooling `avg` averages each channel over the image. `max+avg` concatenates the
    channel maxima with the averages, so that one small object anywhere in the image can raise
    its class score.
    """

    def __init__(self, num_classes: int, width: int = 32, pooling: str = "avg") -> None:
        super().__init__()
        if pooling not in ("avg", "max+avg"):
            raise ValueError(f"unknown pooling {pooling!r}: use avg or max+avg")
        if width <= 0:
            raise ValueError(f"width {width}: use 1 or more channels")
        channels = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(channels):
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*layers)
        self.pooling = pooling
        self.pool = nn.AdaptiveAvgPool2d(1)
        pooled = channels[-1] * (2 if pooling == "max+avg" else 1)
        self.head = nn.Linear(pooled, num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Map pixels (B, 3, S, S) to logits (B, C)."""
        features = self.features(pixels)
        pooled = self.pool(features).flatten(1)
        if self.pooling == "max+avg":
            pooled = torch.cat([torch.amax(features, dim=(2, 3)), pooled], dim=1)
        return self.head(pooled)


class LinearHead(nn.Module):
    """A linear layer on frozen, L2-normalized CLIP image embeddings (B, D) -> logits (B, C)."""

    def __init__(self, embedding_dim: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(embedding_dim, num_classes)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Map embeddings (B, D) to logits (B, C)."""
        return self.head(embeddings)


def build_classifier(
    arch: str, num_classes: int, weights: str = "none", embedding_dim: int | None = None
) -> nn.Module:
    """Build a classifier with a fresh head of `num_classes` outputs.

    Args:
        arch: one of `ARCHS`.
        num_classes: number of outputs.
        weights: for ResNets, `none` (random init), `imagenet` (torchvision's IMAGENET1K_V2
            weights, downloaded to the torch hub cache where a network exists) or the path of
            a state dict of the same ResNet; its `fc` layer is dropped because the head is new.
        embedding_dim: the CLIP embedding size, required for `clip-linear` and `clip-windows`.

    Raises:
        ValueError: unknown arch, weights given where they do not apply, or a bad weights file.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: use one of {', '.join(ARCHS)}")
    if arch in CLIP_ARCHS:
        if embedding_dim is None or embedding_dim <= 0:
            raise ValueError(f"{arch} needs the embedding size of the CLIP model")
        _require_no_weights(arch, weights)
        if arch == "clip-windows":
            from cdul_training.clip_windows import WindowHead

            return WindowHead(embedding_dim, num_classes)
        return LinearHead(embedding_dim, num_classes)
    if arch in SMALL_CNNS:
        _require_no_weights(arch, weights)
        width, pooling = SMALL_CNNS[arch]
        return SmallCNN(num_classes, width, pooling)
    return _build_resnet(arch, num_classes, weights)


def _require_no_weights(arch: str, weights: str) -> None:
    if weights != "none":
        raise ValueError(f"--weights {weights!r} applies to ResNets only; use 'none' with {arch}")


def _build_resnet(arch: str, num_classes: int, weights: str) -> nn.Module:
    import torchvision

    factory = {"resnet50": torchvision.models.resnet50, "resnet101": torchvision.models.resnet101}
    enum = {
        "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
        "resnet101": torchvision.models.ResNet101_Weights.IMAGENET1K_V2,
    }
    if weights == "imagenet":
        try:
            model = factory[arch](weights=enum[arch])
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            raise ValueError(
                f"--weights imagenet: torchvision could not fetch the {arch} weights ({err}); "
                "download them elsewhere and pass the file with --weights PATH, or use none"
            ) from err
    else:
        model = factory[arch](weights=None)
        if weights != "none":
            _load_backbone(model, Path(weights))
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def _load_backbone(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"--weights {path}: file not found; pass a state dict, imagenet or none")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"--weights {path}: expected a state dict, got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"--weights {path} does not fit this ResNet: {len(missing)} missing keys "
            f"(first {missing[:3]}), {len(unexpected)} unexpected (first {unexpected[:3]})"
        )
    _logger.info("loaded backbone weights from %s", path)


CHECKPOINT_FORMAT = "cdul-classifier-checkpoint"


def load_classifier(
    path: Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the classifier of a `cdul-train fit` checkpoint, in eval mode.

    Returns:
        the model with its trained weights, and the whole checkpoint dict.

    Raises:
        ValueError: the file is not a classifier checkpoint.
    """
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not a {CHECKPOINT_FORMAT} file: pass final.pt or best.pt of a fit run"
        )
    model = build_classifier(
        checkpoint["arch"],
        checkpoint["num_classes"],
        "none",
        checkpoint.get("embedding_dim"),
    )
    model.load_state_dict(checkpoint["model"])
    model.eval()
    return model, checkpoint
