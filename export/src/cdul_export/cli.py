"""``cdul-export``: write open_clip models and trained classifiers into a model repository."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from cdul_export import __version__
from cdul_export.parity import FP32_MIN_COSINE

_logger = logging.getLogger(__name__)

EXIT_PARITY = 1
EXIT_USAGE = 2


class _ArgumentParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line that points to --help, without usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"invalid batch sizes {text!r}: use comma-separated integers such as 1,2,7"
        ) from err
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes {text!r} must be positive integers")
    return sizes


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="model folder to write, e.g. models/NAME; the folder name is the model name that "
        "requests use. Written to a temporary sibling folder and renamed when complete",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if it exists (default: reject)"
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=17,
        help="ONNX opset version, within the range of the installed torch exporter (default: 17)",
    )
    parser.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="also write an int8 graph (ONNX Runtime dynamic quantization) next to the fp32 one "
        "and record its cosine against fp32 (default: fp32 only)",
    )
    parser.add_argument(
        "--parity-images",
        type=Path,
        default=None,
        help="folder of photographs for the parity check, first --parity-count files in name "
        "order (default: scikit-learn's two sample photographs and their quadrants)",
    )
    parser.add_argument(
        "--parity-count",
        type=_positive_int,
        default=8,
        help="number of parity images (default: 8)",
    )
    parser.add_argument(
        "--parity-batch-sizes",
        type=_batch_sizes,
        default=(1, 2, 7),
        help="comma-separated ONNX Runtime batch sizes the parity check runs (default: 1,2,7)",
    )
    parser.add_argument(
        "--min-cosine",
        type=float,
        default=FP32_MIN_COSINE,
        help="minimum cosine in (0, 1] between PyTorch and ONNX outputs (default: "
        f"{FP32_MIN_COSINE})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch and ONNX Runtime threads; 0 uses the libraries' defaults (default: 0)",
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``cdul-export``."""
    parser = _ArgumentParser(
        prog="cdul-export",
        description="Export open_clip models and cdul classifiers to an ONNX model repository, "
        "checking parity with PyTorch before anything is written.",
    )
    parser.add_argument("--version", action="version", version=f"cdul-export {__version__}")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level on stderr (default: WARNING)",
    )
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="{clip,classifier}",
        parser_class=_ArgumentParser,
    )

    clip = sub.add_parser(
        "clip",
        help="export an open_clip model (image.onnx, text.onnx, vocabulary, config.json)",
        description="Export an open_clip model: image and text encoders returning L2-normalized "
        "embeddings, the BPE vocabulary and config.json with preprocessing, tokenizer settings "
        "and the parity figures measured against PyTorch.",
    )
    clip.add_argument(
        "--model",
        required=True,
        help="open_clip model name such as ViT-B-32 or RN50, or hf-hub:ORG/REPO, local-dir:PATH",
    )
    clip.add_argument(
        "--pretrained",
        required=True,
        help="open_clip pretrained tag (downloaded by open_clip), path of a checkpoint file, "
        "'source' for the weights of an hf-hub: or local-dir: model, or 'none' for random "
        "weights (speed tests only; recorded in config.json)",
    )
    clip.add_argument(
        "--model-config",
        type=Path,
        default=None,
        help="open_clip model config JSON for a custom architecture; its file name without "
        ".json must equal --model (default: open_clip's built-in configs)",
    )
    clip.add_argument(
        "--token-dtype",
        choices=["int64", "int32"],
        default="int64",
        help="integer type of the text graph's token input (default: int64)",
    )
    clip.add_argument(
        "--int8-min-cosine",
        type=float,
        default=None,
        help="with --quantize int8, fail when the int8 image cosine against fp32 PyTorch is "
        "below this cosine in (0, 1] (default: record only)",
    )
    clip.add_argument(
        "--fp16",
        action="store_true",
        help="also write image.fp16.onnx (fp16 weights, float32 input and output); needs a CUDA "
        "GPU and onnxruntime-gpu",
    )
    clip.add_argument(
        "--tensorrt",
        action="store_true",
        help="also build image.plan, a TensorRT fp16 engine for batches of 1 to 64; needs a CUDA "
        "GPU and the tensorrt package",
    )
    clip.add_argument(
        "--template",
        action="append",
        default=None,
        help="default prompt template with exactly one {} for the class name, repeatable "
        "(default: 'a photo of a {}.')",
    )
    clip.add_argument(
        "--image-mean",
        type=float,
        nargs=3,
        default=None,
        metavar=("R", "G", "B"),
        help="override the normalization mean of open_clip's preprocessing config "
        "(default: open_clip's value for the model and tag)",
    )
    clip.add_argument(
        "--image-std",
        type=float,
        nargs=3,
        default=None,
        metavar=("R", "G", "B"),
        help="override the normalization standard deviation (default: open_clip's)",
    )
    clip.add_argument(
        "--image-interpolation",
        choices=["bicubic", "bilinear"],
        default=None,
        help="override the resize filter (default: open_clip's)",
    )
    clip.add_argument(
        "--image-resize-mode",
        choices=["shortest", "longest", "squash"],
        default=None,
        help="override the resize mode (default: open_clip's)",
    )
    _add_common(clip)

    classifier = sub.add_parser(
        "classifier",
        help="export a cdul-train fit checkpoint (model.onnx, config.json)",
        description="Export a classifier checkpoint of cdul-train fit: model.onnx maps pixels "
        "to logits; config.json holds class names, preprocessing, training facts and parity.",
    )
    classifier.add_argument(
        "--checkpoint", type=Path, required=True, help="checkpoint file written by cdul-train fit"
    )
    classifier.add_argument(
        "--clip-model",
        type=Path,
        default=None,
        help="for a clip-linear or clip-windows head: the CLIP model folder whose image graph "
        "comes before the head (default: the clip_model setting stored in the checkpoint)",
    )
    classifier.add_argument(
        "--max-abs-logit-diff",
        type=float,
        default=1e-3,
        help="maximum absolute difference between PyTorch and ONNX logits (default: 0.001)",
    )
    _add_common(classifier)
    return parser


def _run_clip(args: argparse.Namespace) -> Path:
    from cdul_export.clip_export import ClipExportOptions, export_clip

    overrides = {
        "mean": tuple(args.image_mean) if args.image_mean else None,
        "std": tuple(args.image_std) if args.image_std else None,
        "interpolation": args.image_interpolation,
        "resize_mode": args.image_resize_mode,
    }
    return export_clip(
        ClipExportOptions(
            model=args.model,
            pretrained=args.pretrained,
            out=args.out,
            model_config=args.model_config,
            overwrite=args.overwrite,
            opset=args.opset,
            token_dtype=args.token_dtype,
            quantize=args.quantize,
            fp16=args.fp16,
            tensorrt=args.tensorrt,
            parity_images=args.parity_images,
            parity_count=args.parity_count,
            parity_batch_sizes=args.parity_batch_sizes,
            min_cosine=args.min_cosine,
            int8_min_cosine=args.int8_min_cosine,
            default_templates=tuple(args.template or ["a photo of a {}."]),
            preprocess_overrides={k: v for k, v in overrides.items() if v is not None},
            threads=args.threads,
        )
    )


def _run_classifier(args: argparse.Namespace) -> Path:
    from cdul_export.classifier_export import ClassifierExportOptions, export_classifier

    return export_classifier(
        ClassifierExportOptions(
            checkpoint=args.checkpoint,
            out=args.out,
            overwrite=args.overwrite,
            clip_model=args.clip_model,
            opset=args.opset,
            quantize=args.quantize,
            parity_images=args.parity_images,
            parity_count=args.parity_count,
            parity_batch_sizes=args.parity_batch_sizes,
            min_cosine=args.min_cosine,
            max_abs_logit_diff=args.max_abs_logit_diff,
            threads=args.threads,
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cdul-export``; returns the exit status (0 ok, 1 parity failure, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = _run_clip(args) if args.command == "clip" else _run_classifier(args)
    except ValueError as err:  # ExportError and invalid values, such as a negative std
        print(f"cdul-export {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as err:  # ParityError and failures of the exporter or quantizer
        print(f"cdul-export {args.command}: error: {err}", file=sys.stderr)
        return EXIT_PARITY
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    parity = {
        k: v
        for k, v in config["export"]["parity"].items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    print(f"wrote {out}")
    print("parity: " + json.dumps(parity))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
