"""Export of a ``cdul-train fit`` checkpoint to a classifier folder of the model repository.

The checkpoint keys this module reads are listed in ``docs/formats.md`` ("Classifier
checkpoint"). Image classifiers (ResNets, the small CNN) are traced from PyTorch. A
``clip-linear`` head is appended to the image graph of its CLIP model folder. A
``clip-windows`` classifier becomes one graph of three parts: the window cutting traced from
PyTorch, the CLIP folder's image graph run on every window, and the traced window heads. So
``model.onnx`` always maps pixels to logits.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import compose, helper, numpy_helper
from torch import nn

from cdul_export import __version__
from cdul_export.checks import check_common_options, check_positive, supported_opsets
from cdul_export.onnx_io import export_onnx
from cdul_export.parity import (
    FP32_MIN_COSINE,
    ParityError,
    ParityImage,
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
            f"--checkpoint {checkpoint.path} is a {checkpoint.arch} head: pass --clip-model DIR, "
            "the CLIP model folder whose embeddings it was trained on"
        )
    folder = Path(candidate)
    if not (folder / CONFIG_FILE).is_file():
        raise ExportError(
            f"--clip-model {folder} has no {CONFIG_FILE}: pass the CLIP model folder of the "
            "repository whose embeddings the head was trained on"
        )
    return folder


def _load_clip(
    checkpoint: ClassifierCheckpoint, override: Path | None, session: SessionConfig
) -> ClipModel:
    clip_dir = _clip_folder(checkpoint, override)
    loaded = load_model(clip_dir, session)
    if not isinstance(loaded, ClipModel):
        raise ExportError(
            f"--clip-model {clip_dir} is a {loaded.config['kind']} model, not CLIP: pass the "
            "CLIP model folder whose embeddings the head was trained on"
        )
    return loaded


def _default_opset(model: onnx.ModelProto) -> int | None:
    """Return the version of the default ONNX operator set that ``model`` imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def append_linear_head(image_graph: Path, weight: np.ndarray, bias: np.ndarray, out: Path) -> int:
    """Write ``out``: the CLIP image graph followed by ``logits = embeddings @ weight.T + bias``.

    Returns:
        The opset of the written graph, which is the CLIP image graph's.
    """
    model = onnx.load(str(image_graph))
    graph = model.graph
    if len(graph.output) != 1:
        raise ExportError(f"{image_graph} has {len(graph.output)} outputs, expected 1")
    opset = _default_opset(model)
    if opset is None:
        raise ExportError(f"{image_graph} imports no default ONNX operator set")
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
    return opset


# clip-windows ---------------------------------------------------------------------------------


@dataclass
class WindowClassifier:
    """The three parts of a ``clip-windows`` classifier and the preprocessing of its input."""

    views: nn.Module
    clip: ClipModel
    head: nn.Module
    preprocess: PreprocessConfig

    def reference_logits(self, pixels: np.ndarray) -> np.ndarray:
        """Run the parts one after another: PyTorch views, the CLIP folder's graph, PyTorch heads.

        This is the path that ``cdul-train fit`` trains on, so the composed graph is checked
        against it.
        """
        with torch.inference_mode():
            views = self.views(torch.from_numpy(pixels)).numpy()
            embeddings = self.clip.encode_images(np.ascontiguousarray(views))
            return self.head(torch.from_numpy(embeddings)).numpy()


def _window_preprocess(
    checkpoint: ClassifierCheckpoint, clip: ClipModel, side: int
) -> PreprocessConfig:
    if checkpoint.preprocess is None:
        # cdul-train fit feeds clip-windows squashed, bilinear images of side 3 * s, normalized
        # with the CLIP model's mean and std.
        _logger.info("checkpoint has no preprocess: using %d px with the CLIP mean and std", side)
        return PreprocessConfig(
            size=side,
            mean=clip.preprocess.mean,
            std=clip.preprocess.std,
            interpolation="bilinear",
            resize_mode="squash",
        )
    try:
        preprocess = PreprocessConfig.from_dict(checkpoint.preprocess)
    except (TypeError, ValueError) as err:
        raise ExportError(
            f"--checkpoint {checkpoint.path} has an invalid preprocess: {err}"
        ) from err
    if preprocess.size != side:
        raise ExportError(
            f"--checkpoint {checkpoint.path} has preprocess size {preprocess.size} px, but "
            f"clip-windows on --clip-model {clip.path} (input side {clip.preprocess.size} px) "
            f"takes 3 times that side, {side} px: pass the CLIP model that the head was "
            "trained on"
        )
    return preprocess


def build_window_classifier(checkpoint: ClassifierCheckpoint, clip: ClipModel) -> WindowClassifier:
    """Check a ``clip-windows`` checkpoint against its CLIP model and build the PyTorch parts.

    Raises:
        ExportError: The CLIP input side is odd, the checkpoint's preprocess size is not 3 times
            that side, or the head weights do not fit the CLIP model or the class names.
    """
    from cdul_training.clip_windows import WindowHead, WindowViews, check_view_side, input_side

    view_side = clip.preprocess.size
    try:
        check_view_side(view_side)
    except ValueError as err:
        raise ExportError(f"--clip-model {clip.path}: {err}") from err
    preprocess = _window_preprocess(checkpoint, clip, input_side(view_side))
    weight = checkpoint.state.get("heads.0.0.weight")
    if weight is None or weight.ndim != 2:
        raise ExportError(
            f"--checkpoint {checkpoint.path} (clip-windows) has no 2-d 'heads.0.0.weight': keys "
            f"are {sorted(checkpoint.state)[:5]}"
        )
    hidden, embedding_dim = (int(n) for n in weight.shape)
    if embedding_dim != clip.embedding_dim:
        raise ExportError(
            f"--checkpoint heads take {embedding_dim}-dimensional embeddings but --clip-model "
            f"{clip.path} gives {clip.embedding_dim}: pass the CLIP model used in training"
        )
    head = WindowHead(embedding_dim, len(checkpoint.class_names), hidden)
    _load_state(head, checkpoint)
    return WindowClassifier(WindowViews(view_side).eval(), clip, head, preprocess)


def _clip_image_opset(model: onnx.ModelProto, image_graph: Path, side: int) -> int:
    """Check that the CLIP image graph takes (batch, 3, side, side) and return its opset."""
    graph = model.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise ExportError(
            f"{image_graph} has {len(graph.input)} inputs and {len(graph.output)} outputs, "
            "expected 1 of each: export the CLIP model again with cdul-export clip"
        )
    dims = [
        dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "?")
        for dim in graph.input[0].type.tensor_type.shape.dim
    ]
    fixed = [dim for dim in dims[1:] if isinstance(dim, int)]
    if len(dims) != 4 or (len(fixed) == 3 and fixed != [3, side, side]):
        raise ExportError(
            f"{image_graph} takes pixels of shape {dims}, but the folder's config.json has "
            f"preprocess size {side}: export the CLIP model again with cdul-export clip"
        )
    if isinstance(dims[0], int):
        # The graph runs on batch * N_VIEWS windows, so its batch axis must be dynamic.
        raise ExportError(
            f"{image_graph} takes a fixed batch of {dims[0]}: export the CLIP model again with "
            "cdul-export clip, which makes the batch axis dynamic"
        )
    opset = _default_opset(model)
    low, high = supported_opsets()
    if opset is None or not low <= opset <= high:
        raise ExportError(
            f"{image_graph} uses ONNX opset {opset}, but the window parts take the CLIP graph's "
            f"opset and the installed torch exporter writes opsets {low} to {high}: export the "
            "CLIP model again with an --opset in that range"
        )
    return opset


def compose_window_graph(parts: WindowClassifier, out: Path) -> int:
    """Write ``out``: pixels (batch, 3, 3s, 3s) -> views -> CLIP image graph -> heads -> logits.

    The views and heads are exported from PyTorch with the CLIP graph's opset, and the three
    graphs are joined with ``onnx.compose`` under the name prefixes ``views/``, ``clip/`` and
    ``head/``. The input keeps the name ``pixels`` and the output ``logits``.

    Returns:
        The opset of the written graph, which is the CLIP image graph's.
    """
    from cdul_training.clip_windows import N_VIEWS

    image_graph = parts.clip.path / str(parts.clip.config["files"]["image"])
    side = parts.clip.preprocess.size
    clip_model = onnx.load(str(image_graph))
    opset = _clip_image_opset(clip_model, image_graph, side)
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        views_path = Path(scratch) / "views.onnx"
        head_path = Path(scratch) / "head.onnx"
        export_onnx(
            parts.views,
            torch.zeros(2, 3, 3 * side, 3 * side),
            views_path,
            input_name="pixels",
            output_name="views",
            opset=opset,
        )
        export_onnx(
            parts.head,
            torch.zeros(2 * N_VIEWS, parts.clip.embedding_dim),
            head_path,
            input_name="embeddings",
            output_name="logits",
            opset=opset,
        )
        views_model = onnx.load(str(views_path))
        head_model = onnx.load(str(head_path))

    # merge_models requires equal IR versions, so all three take the highest. The full check
    # below validates the result.
    ir_version = max(model.ir_version for model in (views_model, clip_model, head_model))
    for model in (views_model, clip_model, head_model):
        model.ir_version = ir_version
    # In place, because a copy of a large CLIP graph costs its size in memory again.
    compose.add_prefix(views_model, "views/", rename_inputs=False, inplace=True)
    compose.add_prefix(clip_model, "clip/", inplace=True)
    compose.add_prefix(head_model, "head/", rename_outputs=False, inplace=True)
    clip_input = clip_model.graph.input[0].name
    clip_output = clip_model.graph.output[0].name
    try:
        merged = compose.merge_models(views_model, clip_model, io_map=[("views/views", clip_input)])
        merged = compose.merge_models(
            merged,
            head_model,
            io_map=[(clip_output, "head/embeddings")],
            producer_name="cdul-export",
            producer_version=__version__,
        )
    except (ValueError, onnx.checker.ValidationError) as err:
        raise ExportError(f"cannot join the window parts with {image_graph}: {err}") from err
    _deduplicate_opsets(merged)
    for info in merged.graph.value_info:
        # merge_models keeps the shapes of the joined edges. Their first axis counts views
        # (batch * N_VIEWS), not images, so it gets a name of its own.
        if info.name in ("views/views", clip_output) and info.type.tensor_type.shape.dim:
            info.type.tensor_type.shape.dim[0].dim_param = "views"
    try:
        onnx.checker.check_model(merged, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise RuntimeError(f"ONNX checker rejected the joined window graph: {err}") from err
    onnx.save(merged, str(out))
    _logger.info("composed %s (%.1f MB)", out, out.stat().st_size / 1e6)
    return opset


def _deduplicate_opsets(model: onnx.ModelProto) -> None:
    # merge_models lists the operator sets of both models, so shared domains appear twice.
    versions: dict[str, int] = {}
    for entry in model.opset_import:
        versions.setdefault(entry.domain, int(entry.version))
    del model.opset_import[:]
    model.opset_import.extend(
        helper.make_opsetid(domain, version) for domain, version in versions.items()
    )


# The export -----------------------------------------------------------------------------------


def _write_config(folder: Path, config: dict[str, Any]) -> None:
    text = json.dumps(config, indent=2, ensure_ascii=False, default=str) + "\n"
    (folder / CONFIG_FILE).write_text(text, encoding="utf-8")


def _measure_parity(
    exported: ClassifierModel,
    pixels: np.ndarray,
    reference: np.ndarray,
    images: list[ParityImage],
    options: ClassifierExportOptions,
) -> dict[str, Any]:
    """Compare the exported graph's logits with ``reference`` at each parity batch size.

    Raises:
        ParityError: A figure is beyond its threshold.
    """
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
    return parity


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
    windows: WindowClassifier | None = None
    module: nn.Module | None = None
    if checkpoint.arch == "clip-linear":
        clip = _load_clip(checkpoint, options.clip_model, session)
        head = _head_tensors(checkpoint)
        if head[0].shape[1] != clip.embedding_dim:
            raise ExportError(
                f"--checkpoint head takes {head[0].shape[1]}-dimensional embeddings but "
                f"--clip-model {clip.path} gives {clip.embedding_dim}: pass the CLIP model used "
                "in training"
            )
        preprocess = clip.preprocess
    elif checkpoint.arch == "clip-windows":
        clip = _load_clip(checkpoint, options.clip_model, session)
        windows = build_window_classifier(checkpoint, clip)
        preprocess = windows.preprocess
    else:
        module = _build_image_classifier(checkpoint)
        preprocess = _image_preprocess(checkpoint)
    pixels = preprocess_batch([item.image for item in images], preprocess)

    with staged_folder(out, options.overwrite) as stage:
        # --opset applies to the graphs traced here. A graph built on a CLIP image graph takes
        # the CLIP graph's opset.
        opset = options.opset
        source: dict[str, Any] = {}
        if clip is not None:
            source = {"clip_model": clip.name, "clip_config": clip.config.get("source")}
        if windows is not None:
            opset = compose_window_graph(windows, stage / "model.onnx")
            reference = windows.reference_logits(pixels)
        elif clip is not None and head is not None:
            opset = append_linear_head(
                clip.path / str(clip.config["files"]["image"]), *head, stage / "model.onnx"
            )
            reference = clip.encode_images(pixels) @ head[0].T + head[1]
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
                "opset": opset,
                "dtype": "float32",
                "torch_version": torch.__version__,
                "cdul_export_version": __version__,
            },
        }
        _write_config(stage, config)
        exported = load_staged(stage, session)
        if not isinstance(exported, ClassifierModel):
            raise RuntimeError(f"{stage} loaded as {type(exported).__name__}, expected classifier")
        parity = _measure_parity(exported, pixels, reference, images, options)
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
