"""Small random-init models exported with the real export code, for tests of every part.

Each function runs in seconds on a CPU. The models have random weights, so their scores carry
no meaning; they exercise the file formats, the loaders and the serving paths.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from cdul_export.classifier_export import ClassifierExportOptions, export_classifier
from cdul_export.clip_export import ClipExportOptions, export_clip

_logger = logging.getLogger(__name__)

# A ViT image tower of width 64 and 2 layers on 32 px inputs, a 2-layer text tower with the real
# CLIP vocabulary and context length: about 3.4 M parameters, most of them token embeddings.
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_CLIP_ARCH = "cdul-tiny-clip"
TINY_CLASSIFIER_SIZE = 32


def export_tiny_clip(out_root: Path, name: str = "tiny-clip", *, quantize: bool = True) -> Path:
    """Export a random-init tiny CLIP model into ``out_root / name`` and return that folder.

    Args:
        out_root: The model repository folder (created when missing).
        name: The model folder name.
        quantize: Also write the int8 image graph, so ``precision="int8"`` can load it.
    """
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        config_path = Path(scratch) / f"{TINY_CLIP_ARCH}.json"
        config_path.write_text(json.dumps(TINY_CLIP_CONFIG), encoding="utf-8")
        return export_clip(
            ClipExportOptions(
                model=TINY_CLIP_ARCH,
                pretrained="none",
                out=Path(out_root) / name,
                model_config=config_path,
                quantize="int8" if quantize else None,
                parity_batch_sizes=(1, 3),
            )
        )


def export_tiny_classifier(
    out_root: Path, class_names: Sequence[str], name: str = "tiny-classifier"
) -> Path:
    """Export a random-init small CNN over ``class_names`` into ``out_root / name``.

    The checkpoint is written in the format of ``cdul-train fit`` and goes through the same
    ``cdul-export classifier`` code as a trained one.
    """
    from cdul_training.classifiers import build_classifier

    names = list(class_names)
    torch.manual_seed(0)
    model = build_classifier("small-cnn", len(names))
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = Path(scratch) / "tiny-classifier.pt"
        torch.save(
            {
                "format": "cdul-classifier-checkpoint",
                "format_version": 1,
                "arch": "small-cnn",
                "class_names": names,
                "image_size": TINY_CLASSIFIER_SIZE,
                "preprocess": {
                    "size": TINY_CLASSIFIER_SIZE,
                    "mean": [0.5, 0.5, 0.5],
                    "std": [0.5, 0.5, 0.5],
                    "interpolation": "bilinear",
                    "resize_mode": "squash",
                    "fill_color": 0,
                },
                "activation": "sigmoid",
                "settings": {"arch": "small-cnn", "loss": "bce", "epochs": 0, "seed": 0},
                "model": model.state_dict(),
            },
            checkpoint,
        )
        return export_classifier(
            ClassifierExportOptions(
                checkpoint=checkpoint,
                out=Path(out_root) / name,
                quantize="int8",
                parity_batch_sizes=(1, 3),
            )
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Build a tiny repository: ``python -m cdul_export.testing OUT_ROOT CLASSES_JSON``.

    CLASSES_JSON is a JSON list of class names for the classifier. The root conftest.py runs
    this in a subprocess, so building the repository does not import torch into the tests.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m cdul_export.testing",
        description="Export tiny-clip and tiny-classifier (random weights) into a repository.",
    )
    parser.add_argument("out_root", type=Path, help="model repository folder to write into")
    parser.add_argument("classes", type=Path, help="JSON file with a list of class names")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch and onnxruntime threads (default: 2)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = json.loads(args.classes.read_text(encoding="utf-8"))
    export_tiny_clip(args.out_root)
    export_tiny_classifier(args.out_root, names)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
