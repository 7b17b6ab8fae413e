"""Export of a ``cdul-train fit`` checkpoint to a classifier folder of the model repository.

The checkpoint keys this module reads are listed in ``docs/formats.md`` ("Classifier
checkpoint"). Image classifiers (ResNets, the small CNN) are traced from PyTorch. A
``clip-linear`` head is appended to the image graph of its CLIP model folder, so
``model.onnx`` always maps pixels to logits.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from cdul_export import __version__
from cdul_export.checks import check_common_options, check_positive
from cdul_export.onnx_io import export_onnx
from cdul_export.parity import (
    FP32_MIN_COSINE,
    ParityError,
    check_min,
    load_parity_images,
    row_cosines,
    run_in_batches,
    tile_batch,
)
from cdul_export.quantize import quantize_int8
from cdul_export.staging import ExportError, check_output_folder, load_staged, staged_folder
from cdul_server.model_repository import (
    CONFIG_FILE,
    FORMAT_VERSION,
    ClassifierModel,
    ClipModel,
    SessionConfig,
    load_model,
)
from cdul_server.preprocess import PreprocessConfig, preprocess_batch

_logger = logging.getLogger(__name__)

STATE_KEYS = ("model", "model_state", "model_state_dict", "state_dict")
SETTINGS_KEYS = ("settings", "config", "args", "hparams")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_ABS_LOGIT_DIFF = 1e-3
TRAINING_FACT_KEYS = (
    "format",
    "format_version",
    "epoch",
    "activation",
    "created_by",
    "best",
    "world_size",
    "num_classes",
)


@dataclass
class ClassifierExportOptions:
    """Everything ``cdul-export classifier`` takes; see its ``--help``."""

    checkpoint: Path
    out: Path
    overwrite: bool = False
    clip_model: Path | None = None
    opset: int = 17
    quantize: str | None = None
    parity_images: Path | None = None
    parity_count: int = 8
    parity_batch_sizes: tuple[int, ...] = (1, 2, 7)
    min_cosine: float = FP32_MIN_COSINE
    max_abs_logit_diff: float = DEFAULT_MAX_ABS_LOGIT_DIFF
    threads: int = 0


@dataclass
class ClassifierCheckpoint:
    """The parts of a training checkpoint that an export needs."""

    path: Path
    arch: str
    class_names: list[str]
    state: dict[str, torch.Tensor]
    preprocess: dict[str, Any] | None
    image_size: int | None
    embedding_dim: int | None
    clip: dict[str, Any] | None
    settings: dict[str, Any]
    facts: dict[str, Any]


def _lookup(raw: Mapping[str, Any], settings: Mapping[str, Any], key: str) -> Any:
    if raw.get(key) is not None:
        return raw[key]
    return settings.get(key)


def read_checkpoint(path: Path) -> ClassifierCheckpoint:
    """Read a classifier checkpoint saved with ``torch.save``.

    Raises:
        ExportError: The file is missing, not a checkpoint, or lacks a required key.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"--checkpoint {path} not found: pass a checkpoint of cdul-train fit")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises pickle, zip and runtime errors
        raise ExportError(f"--checkpoint {path} cannot be read by torch.load: {err}") from err
    if not isinstance(raw, dict):
        raise ExportError(f"--checkpoint {path} contains a {type(raw).__name__}, expected a dict")
    settings: dict[str, Any] = {}
    for key in SETTINGS_KEYS:
        if isinstance(raw.get(key), dict):
            settings = dict(raw[key])
            break
    state = next((raw[k] for k in STATE_KEYS if isinstance(raw.get(k), dict)), None)
    if state is None:
        raise ExportError(
            f"--checkpoint {path} has no state dict under any of {list(STATE_KEYS)}: "
            f"keys are {sorted(raw)[:12]}"
        )
    state = {
        k.removeprefix("module.").removeprefix("_orig_mod."): v
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    }
    arch = _lookup(raw, settings, "arch")
    class_names = _lookup(raw, settings, "class_names") or _lookup(raw, settings, "classes")
    if not isinstance(arch, str):
        raise ExportError(f"--checkpoint {path} names no 'arch' (top level or in 'settings')")
    if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names):
        raise ExportError(
            f"--checkpoint {path} has no 'class_names' list of strings (top level or in 'settings')"
        )
    if not class_names or len(set(class_names)) != len(class_names):
        raise ExportError(f"--checkpoint {path}: class_names must be non-empty and unique")
    image_size = _lookup(raw, settings, "image_size")
    embedding_dim = _lookup(raw, settings, "embedding_dim")
    facts = {k: raw[k] for k in TRAINING_FACT_KEYS if k in raw and _is_json(raw[k])}
    return ClassifierCheckpoint(
        path=path,
        arch=arch,
        class_names=list(class_names),
        state=state,
        preprocess=raw.get("preprocess") if isinstance(raw.get("preprocess"), dict) else None,
        image_size=int(image_size) if image_size is not None else None,
        embedding_dim=int(embedding_dim) if embedding_dim is not None else None,
        clip=raw.get("clip") if isinstance(raw.get("clip"), dict) else None,
        settings={k: v for k, v in settings.items() if _is_json(v)},
        facts=facts,
    )


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _load_state(model: nn.Module, checkpoint: ClassifierCheckpoint) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in checkpoint.state]
    unexpected = [k for k in checkpoint.state if k not in expected]
    shapes = [
        f"{k} {tuple(checkpoint.state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in checkpoint.state and tuple(checkpoint.state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        raise ExportError(
            f"--checkpoint {checkpoint.path} does not fit arch {checkpoint.arch} with "
            f"{len(checkpoint.class_names)} classes: {len(missing)} missing keys (first "
            f"{missing[:5]}), {len(unexpected)} unexpected keys (first {unexpected[:5]}), "
            f"{len(shapes)} shape mismatches (first {shapes[:5]}, checkpoint vs model)"
        )
    model.load_state_dict(checkpoint.state, strict=True)
    model.eval()


def _image_preprocess(checkpoint: ClassifierCheckpoint) -> PreprocessConfig:
    if checkpoint.preprocess:
        return PreprocessConfig.from_dict(checkpoint.preprocess)
    from cdul_training.classifiers import DEFAULT_IMAGE_SIZE, SMALL_CNNS

    size = checkpoint.image_size or DEFAULT_IMAGE_SIZE.get(checkpoint.arch)
    if size is None:
        raise ExportError(
            f"--checkpoint {checkpoint.path} names no image_size for {checkpoint.arch}"
        )
    # The training image loader squashes with bilinear resampling; the small CNNs use 0.5/0.5.
    small = checkpoint.arch in SMALL_CNNS
    return PreprocessConfig(
        size=int(size),
        mean=(0.5, 0.5, 0.5) if small else IMAGENET_MEAN,
        std=(0.5, 0.5, 0.5) if small else IMAGENET_STD,
        interpolation="bilinear",
        resize_mode="squash",
    )


def _build_image_classifier(checkpoint: ClassifierCheckpoint) -> nn.Module:
    from cdul_training.classifiers import build_classifier

    try:
        model = build_classifier(checkpoint.arch, len(checkpoint.class_names))
    except ValueError as err:
        raise ExportError(f"--checkpoint {checkpoint.path}: {err}") from err
    _load_state(model, checkpoint)
    return model


def _head_tensors(checkpoint: ClassifierCheckpoint) -> tuple[np.ndarray, np.ndarray]:
    from cdul_training.classifiers import LinearHead

    weight = checkpoint.state.get("head.weight")
    if weight is None or weight.ndim != 2:
        raise ExportError(
            f"--checkpoint {checkpoint.path} (clip-linear) has no 2-d 'head.weight': keys are "
            f"{sorted(checkpoint.state)[:5]}"
        )
    head = LinearHead(int(weight.shape[1]), len(checkpoint.class_names))
    _load_state(head, checkpoint)
    return (
        head.head.weight.detach().numpy().astype(np.float32),
        head.head.bias.detach().numpy().astype(np.float32),
    )


def _clip_folder(checkpoint: ClassifierCheckpoint, override: Path | None) -> Path:
    candidate = override or checkpoint.settings.get("clip_model")
    if not candidate:
        raise ExportError(
            f"--checkpoint {checkpoint.path} is a clip-linear head: pass --clip-model DIR, the "
            "CLIP model folder whose embeddings it was trained on"
        )
    folder = Path(candidate)
    if not (folder / CONFIG_FILE).is_file():
        raise ExportError(
            f"--clip-model {folder} has no {CONFIG_FILE}: pass the CLIP model folder of the "
            "repository whose embeddings the head was trained on"
        )
    return folder


def append_linear_head(image_graph: Path, weight: np.ndarray, bias: np.ndarray, out: Path) -> None:
    """Write ``out``: the CLIP image graph followed by ``logits = embeddings @ weight.T + bias``."""
    model = onnx.load(str(image_graph))
    graph = model.graph
    if len(graph.output) != 1:
        raise ExportError(f"{image_graph} has {len(graph.output)} outputs, expected 1")
    embeddings = graph.output[0].name
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.ascontiguousarray(weight.T), "head_weight_t"),
            numpy_helper.from_array(bias, "head_bias"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("MatMul", [embeddings, "head_weight_t"], ["head_matmul"]),
            helper.make_node("Add", ["head_matmul", "head_bias"], ["logits"]),
        ]
    )
    del graph.output[:]
    graph.output.append(
        helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", weight.shape[0]])
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


def _write_config(folder: Path, config: dict[str, Any]) -> None:
    text = json.dumps(config, indent=2, ensure_ascii=False, default=str) + "\n"
    (folder / CONFIG_FILE).write_text(text, encoding="utf-8")


def export_classifier(options: ClassifierExportOptions) -> Path:
    """Export a classifier checkpoint to ``options.out`` and return the folder.

    Raises:
        ExportError: Invalid input; the message names the value and the fix.
        ParityError: The ONNX logits differ from PyTorch's beyond the tolerance.
    """
    if options.quantize not in (None, "int8"):
        raise ExportError(f"--quantize {options.quantize!r} is invalid: use int8")
    check_common_options(
        opset=options.opset,
        parity_count=options.parity_count,
        parity_batch_sizes=options.parity_batch_sizes,
        min_cosine=options.min_cosine,
        threads=options.threads,
    )
    check_positive("--max-abs-logit-diff", options.max_abs_logit_diff)
    out = check_output_folder(options.out, options.overwrite)
    checkpoint = read_checkpoint(options.checkpoint)
    images = load_parity_images(options.parity_images, options.parity_count)
    if options.threads > 0:
        torch.set_num_threads(options.threads)
    session = SessionConfig(intra_op_threads=options.threads)
    clip: ClipModel | None = None
    head: tuple[np.ndarray, np.ndarray] | None = None
    module: nn.Module | None = None
    if checkpoint.arch == "clip-linear":
        clip_dir = _clip_folder(checkpoint, options.clip_model)
        loaded = load_model(clip_dir, session)
        if not isinstance(loaded, ClipModel):
            raise ExportError(
                f"--clip-model {clip_dir} is a {loaded.config['kind']} model, not CLIP"
            )
        clip = loaded
        head = _head_tensors(checkpoint)
        if head[0].shape[1] != clip.embedding_dim:
            raise ExportError(
                f"--checkpoint head takes {head[0].shape[1]}-dimensional embeddings but "
                f"--clip-model {clip_dir} gives {clip.embedding_dim}: pass the CLIP model used in "
                "training"
            )
        preprocess = clip.preprocess
    else:
        module = _build_image_classifier(checkpoint)
        preprocess = _image_preprocess(checkpoint)
    pixels = preprocess_batch([item.image for item in images], preprocess)

    with staged_folder(out, options.overwrite) as stage:
        if clip is not None and head is not None:
            append_linear_head(
                clip.path / str(clip.config["files"]["image"]), *head, stage / "model.onnx"
            )
            reference = clip.encode_images(pixels) @ head[0].T + head[1]
            source: dict[str, Any] = {
                "clip_model": clip.name,
                "clip_config": clip.config.get("source"),
            }
        else:
            if module is None:
                raise RuntimeError("no PyTorch classifier was built for an image arch")
            export_onnx(
                module,
                torch.from_numpy(tile_batch(pixels, 2).copy()),
                stage / "model.onnx",
                input_name="pixels",
                output_name="logits",
                opset=options.opset,
            )
            with torch.inference_mode():
                reference = module(torch.from_numpy(pixels)).numpy()
            source = {}
        files = {"model": "model.onnx"}
        config: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "kind": "classifier",
            "name": out.name,
            "class_names": checkpoint.class_names,
            "preprocess": preprocess.to_dict(),
            "files": files,
            "training": {
                "arch": checkpoint.arch,
                "checkpoint_file": checkpoint.path.name,
                **checkpoint.facts,
                **({"clip": checkpoint.clip} if checkpoint.clip else {}),
                **source,
                "settings": checkpoint.settings,
            },
            "export": {
                "opset": options.opset,
                "dtype": "float32",
                "torch_version": torch.__version__,
                "cdul_export_version": __version__,
            },
        }
        _write_config(stage, config)
        exported = load_staged(stage, session)
        if not isinstance(exported, ClassifierModel):
            raise RuntimeError(f"{stage} loaded as {type(exported).__name__}, expected classifier")
        diffs: list[float] = []
        cosines: list[float] = []
        for batch_size in options.parity_batch_sizes:
            count = max(len(pixels), batch_size)
            logits = run_in_batches(exported.predict_logits, tile_batch(pixels, count), batch_size)
            expected = tile_batch(reference, count)
            diffs.append(float(np.abs(logits - expected).max()))
            cosines.extend(row_cosines(logits, expected).tolist())
        parity: dict[str, Any] = {
            "max_abs_logit_diff": round(max(diffs), 9),
            "min_cosine": round(min(cosines), 9),
            "n_images": len(images),
            "batch_sizes": list(options.parity_batch_sizes),
            "images": [item.name for item in images],
            "thresholds": {
                "min_cosine": options.min_cosine,
                "max_abs_logit_diff": options.max_abs_logit_diff,
            },
        }
        _logger.info("classifier parity: %s", parity)
        check_min("min_cosine", parity["min_cosine"], options.min_cosine)
        if not parity["max_abs_logit_diff"] <= options.max_abs_logit_diff:
            raise ParityError(
                "max_abs_logit_diff (must be at most the threshold)",
                parity["max_abs_logit_diff"],
                options.max_abs_logit_diff,
            )
        if options.quantize == "int8":
            quantize_int8(stage / "model.onnx", stage / "model.int8.onnx")
            files["model_int8"] = "model.int8.onnx"
            _write_config(stage, config)
            quantized = load_staged(
                stage, SessionConfig(intra_op_threads=options.threads, precision="int8")
            )
            if not isinstance(quantized, ClassifierModel):
                raise RuntimeError(f"{stage} loaded as {type(quantized).__name__}")
            int8_logits = quantized.predict_logits(pixels)
            parity["int8_max_abs_logit_diff"] = round(
                float(np.abs(int8_logits - reference).max()), 7
            )
            parity["int8_min_cosine"] = round(float(row_cosines(int8_logits, reference).min()), 7)
        config["export"]["parity"] = parity
        _write_config(stage, config)
    return out
