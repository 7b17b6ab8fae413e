"""Export of an open_clip model to a CLIP folder of the model repository.

The folder contains ``image.onnx`` and ``text.onnx`` (L2-normalized embeddings, dynamic batch;
the text graph also has a dynamic sequence axis where the exporter manages it), the BPE
vocabulary, and ``config.json`` (see ``docs/formats.md``). Before the folder appears, the
export loads it with the server's own loader, tokenizer and preprocessing and compares the
results with PyTorch on real photographs and fixed prompts; a failed check leaves nothing.
"""

from __future__ import annotations

import difflib
import json
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException
from torch import nn

from cdul_export import __version__
from cdul_export.checks import check_common_options, check_cosine, check_finite, check_templates
from cdul_export.gpu import build_tensorrt_engine, check_gpu_options, export_fp16_image
from cdul_export.onnx_io import export_onnx
from cdul_export.parity import (
    FP32_MIN_COSINE,
    GPU_MIN_COSINE,
    PARITY_PROMPTS,
    PREPROCESS_MAX_MEAN_ABS_DIFF,
    PREPROCESS_MIN_COSINE,
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
    ClipModel,
    SessionConfig,
    trimmed_length,
)
from cdul_server.preprocess import PreprocessConfig, preprocess_batch

_logger = logging.getLogger(__name__)

VOCAB_FILE = "vocab.txt.gz"
TOKEN_DTYPES = {"int64": torch.int64, "int32": torch.int32}
SCHEMA_PREFIXES = ("hf-hub:", "local-dir:")


@dataclass
class ClipExportOptions:
    """Everything ``cdul-export clip`` takes; see ``cdul-export clip --help`` for each option."""

    model: str
    pretrained: str
    out: Path
    model_config: Path | None = None
    overwrite: bool = False
    opset: int = 17
    token_dtype: str = "int64"
    quantize: str | None = None
    fp16: bool = False
    tensorrt: bool = False
    parity_images: Path | None = None
    parity_count: int = 8
    parity_batch_sizes: tuple[int, ...] = (1, 2, 7)
    parity_prompts: tuple[str, ...] = PARITY_PROMPTS
    min_cosine: float = FP32_MIN_COSINE
    int8_min_cosine: float | None = None
    default_templates: tuple[str, ...] = ("a photo of a {}.",)
    preprocess_overrides: dict[str, Any] = field(default_factory=dict)
    threads: int = 0


class _ImageEncoder(nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(pixels), dim=-1)


class _TextEncoder(nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(tokens.long()), dim=-1)


class _TrimmableTextEncoder(nn.Module):
    """The text tower for a graph that takes tokens (N, L) for any L up to the context length.

    ``CLIP.encode_text`` of open_clip 3.3 adds all ``context_length`` positional embeddings and
    the full causal mask, so it accepts only full-length tokens. For that class this module
    repeats its steps with both cut to the input length. The parity check compares the graph
    on full-length tokens with ``encode_text`` itself. Other classes (``CustomTextCLIP``, CoCa)
    run their own ``encode_text``, and the trimmed parity check shows whether their graph works
    on shorter tokens.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        from open_clip.model import CLIP

        self.model = model
        self.cut_to_input = isinstance(model, CLIP)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        text = tokens.long()
        model = self.model
        if not self.cut_to_input:
            return F.normalize(model.encode_text(text), dim=-1)
        length = text.shape[1]
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(text).to(cast_dtype)
        x = x + model.positional_embedding[:length].to(cast_dtype)
        mask = None if model.attn_mask is None else model.attn_mask[:length, :length]
        x = model.transformer(x, attn_mask=mask)
        x = model.ln_final(x)
        x = text_global_pool(
            x, text, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None)
        )
        if isinstance(model.text_projection, nn.Linear):
            x = model.text_projection(x)
        elif model.text_projection is not None:
            x = x @ model.text_projection
        return F.normalize(x, dim=-1)


def export_text_graph(model: Any, sample_tokens: torch.Tensor, path: Path, opset: int) -> bool:
    """Export the text tower to ``path`` with dynamic batch and sequence axes.

    When that export fails, the graph is exported for ``sample_tokens.shape[1]`` tokens per
    prompt, with only the batch axis dynamic.

    Returns:
        Whether the sequence axis is dynamic.

    Raises:
        RuntimeError: The fallback export failed too.
    """
    try:
        with _separate_attention_inputs(model):
            export_onnx(
                _TrimmableTextEncoder(model),
                sample_tokens,
                path,
                input_name="tokens",
                output_name="embeddings",
                opset=opset,
                input_axes={1: "sequence"},
            )
        return True
    except RuntimeError as err:
        _logger.warning(
            "exporting the text graph with a dynamic sequence axis failed (%s). Exporting it "
            "for %d tokens per prompt instead, so the server always feeds full-length tokens",
            err,
            sample_tokens.shape[1],
        )
    path.unlink(missing_ok=True)
    export_onnx(
        _TextEncoder(model),
        sample_tokens,
        path,
        input_name="tokens",
        output_name="embeddings",
        opset=opset,
    )
    return False


@contextmanager
def _separate_attention_inputs(model: nn.Module) -> Iterator[None]:
    """Make every ``nn.MultiheadAttention`` of ``model`` get key and value as tensors of their own.

    For self-attention (query, key and value one tensor object) torch 2.14 projects the three
    with one matmul and an unflatten. The TorchScript exporter then writes the sample's sequence
    length as a constant into the key and value reshapes, so the graph fails on other lengths.
    Given views, which are other objects with the same values, torch projects each with its
    third of the same weights, and the length stays a function of the input shape.
    """

    def use_views(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if len(args) < 3:  # query, key and value passed by keyword: left as they are
            return None
        query, key, value, *rest = args
        return (query, key.view_as(key), value.view_as(value), *rest)

    handles = [
        module.register_forward_pre_hook(use_views)
        for module in model.modules()
        if isinstance(module, nn.MultiheadAttention)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def register_model_config(path: Path) -> str:
    """Add an open_clip model config file to open_clip's registry; return its model name.

    Raises:
        ExportError: The file is missing or not an open_clip model config.
    """
    import open_clip

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"--model-config {path} not found: pass an open_clip model config JSON")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"--model-config {path} is not valid JSON: {err}") from err
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in config]
    if missing:
        raise ExportError(
            f"--model-config {path} lacks {missing}: an open_clip model config has embed_dim, "
            "vision_cfg and text_cfg"
        )
    open_clip.add_model_config(path)
    return path.stem


def resolve_model_name(name: str, model_config: Path | None = None) -> str:
    """Return the model name after checking that open_clip has a config for it.

    ``model_config`` is registered with open_clip first.

    Raises:
        ExportError: The name is unknown; the message lists close matches.
    """
    import open_clip

    if model_config is not None:
        registered = register_model_config(model_config)
        if registered != name:
            raise ExportError(
                f"--model {name!r} differs from the model config file name {registered!r}: "
                f"pass --model {registered} or rename the file to {name}.json"
            )
    if name.startswith(SCHEMA_PREFIXES):
        return name
    known = open_clip.list_models()
    if name in known:
        return name
    lowered = {k.lower(): k for k in known}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=5, cutoff=0.6)
    hint = ", ".join(lowered[c] for c in close) if close else "none; see open_clip.list_models()"
    raise ExportError(
        f"unknown open_clip model {name!r}: close matches are {hint}; or pass --model-config FILE "
        "for a custom architecture"
    )


def _state_dict_mismatch(model: nn.Module, path: Path) -> str:
    from open_clip.factory import load_state_dict

    state = load_state_dict(str(path), device="cpu", weights_only=True)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    return (
        f"{len(missing)} missing keys (first {missing[:5]}), {len(unexpected)} unexpected keys "
        f"(first {unexpected[:5]}), {len(shapes)} shape mismatches (first {shapes[:5]}, "
        "checkpoint vs model)"
    )


def create_clip_model(
    name: str, pretrained: str, preprocess_overrides: dict[str, Any] | None = None
) -> tuple[Any, dict[str, Any]]:
    """Build the open_clip model with the requested weights.

    Args:
        name: An open_clip model name (already checked by :func:`resolve_model_name`).
        pretrained: An open_clip pretrained tag, the path of a checkpoint, or ``none``.
        preprocess_overrides: Preprocessing values that replace open_clip's.

    Returns:
        The model in eval mode and the ``source`` object of ``config.json``.

    Raises:
        ExportError: The tag is unknown, the download failed, or the checkpoint does not fit.
    """
    import open_clip

    force = {k: v for k, v in (preprocess_overrides or {}).items() if v is not None} or None
    source: dict[str, Any] = {"model": name, "pretrained": pretrained, "random_init": False}
    if pretrained.lower() == "none":
        # load_weights=False: an hf-hub or local-dir source would otherwise load its weights;
        # pretrained_text=False: no Hugging Face text tower download for a random-init export.
        model = open_clip.create_model(
            name,
            pretrained=None,
            load_weights=False,
            pretrained_text=False,
            force_preprocess_cfg=force,
        )
        source.update(pretrained="none", random_init=True)
    elif name.startswith(SCHEMA_PREFIXES):
        if pretrained != "source":
            raise ExportError(
                f"--pretrained {pretrained!r} does not apply to --model {name}, whose weights "
                "come from that source: pass --pretrained source, or none for random weights"
            )
        try:
            model = open_clip.create_model(
                name, force_preprocess_cfg=force, require_pretrained=True
            )
        except (RuntimeError, OSError, ValueError) as err:
            raise ExportError(f"cannot load the weights of {name}: {err}") from err
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        path = Path(pretrained)
        if pretrained in tags:
            try:
                model = open_clip.create_model(
                    name, pretrained=pretrained, force_preprocess_cfg=force
                )
            except RuntimeError as err:
                raise ExportError(
                    f"cannot load open_clip weights {name}/{pretrained}: {err}; without a network, "
                    "pass the downloaded checkpoint file as --pretrained PATH"
                ) from err
        elif path.is_file():
            model = open_clip.create_model(
                name, pretrained=None, pretrained_text=False, force_preprocess_cfg=force
            )
            try:
                open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
            except (RuntimeError, AssertionError, KeyError, ValueError) as err:
                # open_clip reports mismatches as RuntimeError (load_state_dict) or with
                # assert (position embedding resizing); both mean the file does not fit.
                raise ExportError(
                    f"checkpoint {path} does not fit {name}: {_state_dict_mismatch(model, path)}"
                ) from err
            source.update(pretrained=str(path.name), checkpoint_file=str(path.name))
        else:
            raise ExportError(
                f"--pretrained {pretrained!r} is neither a pretrained tag of {name} "
                f"(known tags: {tags or 'none'}) nor an existing file, nor 'none'"
            )
    model.eval()
    return model, source


def _tokenizer_settings(name: str) -> tuple[Any, dict[str, Any], Path]:
    """Return open_clip's tokenizer for the model, the cdul tokenizer settings and vocab path."""
    import open_clip
    from open_clip import tokenizer as oc_tokenizer

    reference = open_clip.get_tokenizer(name)
    if not isinstance(reference, oc_tokenizer.SimpleTokenizer):
        raise ExportError(
            f"model {name} uses the tokenizer {type(reference).__name__}; cdul serves only the "
            "CLIP BPE tokenizer (SimpleTokenizer)"
        )
    if reference.reduction_fn is not None:
        raise ExportError(f"model {name} tokenizes with a reduction mask; cdul supports truncation")
    clean_modes = {oc_tokenizer._clean_lower: "lower", oc_tokenizer._clean_whitespace: "whitespace"}
    clean = clean_modes.get(reference.clean_fn)
    if clean is None:
        raise ExportError(f"model {name} uses a text cleaning mode cdul does not implement")
    config = open_clip.get_model_config(name) if not name.startswith(SCHEMA_PREFIXES) else None
    kwargs = ((config or {}).get("text_cfg") or {}).get("tokenizer_kwargs") or {}
    vocab = Path(kwargs.get("bpe_path") or oc_tokenizer.default_bpe())
    decoder = reference.decoder
    settings = {
        "kind": "clip-bpe",
        "vocab_file": VOCAB_FILE,
        "context_length": int(reference.context_length),
        "sot_token_id": int(reference.sot_token_id),
        "eot_token_id": int(reference.eot_token_id),
        "clean": clean,
        "reduction": None,
        "additional_special_tokens": [decoder[i] for i in reference.all_special_ids[2:]],
    }
    return reference, settings, vocab


def _preprocess_from_open_clip(model: nn.Module) -> PreprocessConfig:
    import open_clip

    cfg = dict(open_clip.get_model_preprocess_cfg(model))
    size = cfg.get("size", 224)
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            raise ExportError(f"model input size {size} is not square: cdul serves square inputs")
        size = size[0]
    interpolation = cfg.get("interpolation", "bicubic")
    # open_clip's inference transform treats 'random' as bicubic.
    interpolation = "bicubic" if interpolation == "random" else interpolation
    return PreprocessConfig(
        size=int(size),
        mean=tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        std=tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
        interpolation=str(interpolation),
        resize_mode=str(cfg.get("resize_mode", "shortest")),
        fill_color=int(cfg.get("fill_color", 0)),
    )


def open_clip_transform(preprocess: PreprocessConfig) -> Any:
    """Return open_clip's own inference transform for these preprocessing parameters."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = PreprocessCfg(
        size=preprocess.size,
        mean=preprocess.mean,
        std=preprocess.std,
        interpolation=preprocess.interpolation,
        resize_mode=preprocess.resize_mode,
        fill_color=preprocess.fill_color,
    )
    return image_transform_v2(cfg, is_train=False)


def _torch_embeddings(encoder: nn.Module, inputs: torch.Tensor, batch: int = 16) -> np.ndarray:
    with torch.inference_mode():
        parts = [encoder(inputs[i : i + batch]) for i in range(0, len(inputs), batch)]
    return torch.cat(parts).float().numpy()


def batched_cosines(
    encode: Callable[[np.ndarray], np.ndarray],
    inputs: np.ndarray,
    expected: np.ndarray,
    batch_sizes: Sequence[int],
) -> tuple[np.ndarray, list[float], float]:
    """Run ``encode`` at each batch size and compare every output row with ``expected``.

    At the largest batch size every input row goes through, repeated cyclically to fill at
    least one full batch. Each smaller size runs one batch of that many rows, so a check on a
    large model costs only a few batches.

    Returns:
        The outputs of the first ``len(inputs)`` rows at the largest batch size, the cosines of
        all rows compared, and the maximum absolute difference of any element.
    """
    largest = max(batch_sizes)
    full = np.empty((0,))
    cosines: list[float] = []
    max_abs_diff = 0.0
    for batch_size in sorted(set(batch_sizes), reverse=True):
        count = max(len(inputs), batch_size) if batch_size == largest else batch_size
        outputs = run_in_batches(encode, tile_batch(inputs, count), batch_size)
        reference = tile_batch(expected, count)
        cosines.extend(row_cosines(outputs, reference).tolist())
        max_abs_diff = max(max_abs_diff, float(np.abs(outputs - reference).max()))
        if batch_size == largest:
            full = outputs[: len(inputs)]
    return full, cosines, max_abs_diff


def measure_clip_parity(
    model: Any,
    clip: ClipModel,
    reference_tokenizer: Any,
    images: Sequence[ParityImage],
    prompts: Sequence[str],
    batch_sizes: Sequence[int],
    trimmed: bool = False,
) -> dict[str, Any]:
    """Compare the exported folder, loaded by the server's loader, with PyTorch.

    With ``trimmed``, the text graph also runs on each batch cut after the end-of-text token of
    its longest prompt (the server's ``encode_tokens(..., trim_padding=True)``, at batch size 1
    too), compared with PyTorch on full-length tokens.

    Returns:
        The ``export.parity`` object of ``config.json``, plus the PyTorch and ONNX image
        embeddings and the pixels under the private keys ``_torch_images``, ``_onnx_images``
        and ``_pixels``.
    """
    transform = open_clip_transform(clip.preprocess)
    reference_pixels = torch.stack([transform(item.image) for item in images])
    torch_images = _torch_embeddings(_ImageEncoder(model), reference_pixels)
    pixels = reference_pixels.numpy()
    onnx_images, image_cosines, image_max_abs_diff = batched_cosines(
        clip.encode_images, pixels, torch_images, batch_sizes
    )

    ours = preprocess_batch([item.image for item in images], clip.preprocess)
    mean_abs_diff = np.abs(ours - pixels).mean(axis=(1, 2, 3))
    preprocess_cosines = row_cosines(
        run_in_batches(clip.encode_images, ours, max(batch_sizes)), onnx_images
    )

    reference_tokens = reference_tokenizer(list(prompts)).numpy()
    our_tokens = clip.tokenizer(list(prompts))
    token_mismatches = int(np.sum(np.any(reference_tokens != our_tokens, axis=1)))
    torch_texts = _torch_embeddings(_TextEncoder(model), torch.from_numpy(reference_tokens))
    graph_dtype = np.dtype(clip.token_dtype)
    _, text_cosines, text_max_abs_diff = batched_cosines(
        clip.encode_tokens, our_tokens.astype(graph_dtype), torch_texts, batch_sizes
    )
    # The loader converts tokens of the other integer type to the graph's; check one batch.
    other_dtype = np.dtype(np.int32 if graph_dtype == np.int64 else np.int64)
    rows = min(batch_sizes)
    other = clip.encode_tokens(tile_batch(our_tokens, rows).astype(other_dtype))
    text_cosines.extend(row_cosines(other, tile_batch(torch_texts, rows)).tolist())
    trim_figures = (
        _trimmed_text_parity(clip, our_tokens.astype(graph_dtype), torch_texts, batch_sizes)
        if trimmed
        else {}
    )

    return {
        "image_min_cosine": round(float(min(image_cosines)), 9),
        "text_min_cosine": round(float(min(text_cosines)), 9),
        "image_max_abs_diff": float(f"{image_max_abs_diff:.3g}"),
        "text_max_abs_diff": float(f"{text_max_abs_diff:.3g}"),
        **trim_figures,
        "preprocess_max_mean_abs_diff": round(float(mean_abs_diff.max()), 9),
        "preprocess_min_cosine": round(float(preprocess_cosines.min()), 9),
        "tokenizer_mismatches": token_mismatches,
        "n_images": len(images),
        "n_prompts": len(prompts),
        "batch_sizes": sorted(set(batch_sizes)),
        "token_dtypes": [str(graph_dtype), str(other_dtype)],
        "images": [item.name for item in images],
        "_torch_images": torch_images,
        "_onnx_images": onnx_images,
        "_pixels": pixels,
    }


def _trimmed_text_parity(
    clip: ClipModel, tokens: np.ndarray, expected: np.ndarray, batch_sizes: Sequence[int]
) -> dict[str, Any]:
    def encode_trimmed(batch: np.ndarray) -> np.ndarray:
        return clip.encode_tokens(batch, trim_padding=True)

    eot = clip.tokenizer.eot_token_id
    try:
        _, cosines, max_abs_diff = batched_cosines(
            encode_trimmed, tokens, expected, sorted({1, *batch_sizes})
        )
    except (Fail, InvalidArgument, RuntimeException) as err:
        # A graph that kept a fixed length somewhere inside fails on shorter inputs.
        _logger.warning("the text graph failed on trimmed tokens: %s", err)
        return {"text_trimmed_error": str(err).strip().splitlines()[0][:200]}
    return {
        "text_trimmed_min_cosine": round(float(min(cosines)), 9),
        "text_trimmed_max_abs_diff": float(f"{max_abs_diff:.3g}"),
        "text_trimmed_min_length": min(trimmed_length(row[None], eot) for row in tokens),
    }


def allows_trimming(parity: dict[str, Any], context_length: int, min_cosine: float) -> bool:
    """Decide ``tokenizer.trim_padding`` from the figures of :func:`measure_clip_parity`.

    Trimming is allowed when the trimmed text embeddings reach ``min_cosine`` and at least one
    parity prompt was shorter than the context, so that the check cut some padding.
    """
    cosine = parity.get("text_trimmed_min_cosine")
    if cosine is None:  # a graph of fixed length, or one that failed on trimmed tokens
        return False
    if parity["text_trimmed_min_length"] >= context_length:
        _logger.warning(
            "every parity prompt fills the %d-token context, so trimming was not checked and "
            "stays off: add short prompts to the parity prompts",
            context_length,
        )
        return False
    if cosine < min_cosine:
        _logger.warning(
            "the text graph gives other embeddings on tokens cut after the end-of-text token "
            "(min cosine %.6f, below %s), as a tower does that pools another position or "
            "attends to padding: trim_padding stays false, so the server feeds it full-length "
            "tokens",
            cosine,
            min_cosine,
        )
        return False
    return True


def check_clip_parity(parity: dict[str, Any], min_cosine: float) -> None:
    """Raise ParityError for the first figure outside its tolerance."""
    if parity["tokenizer_mismatches"]:
        raise ParityError(
            "tokenizer_mismatches (prompts with other ids than open_clip)",
            float(parity["tokenizer_mismatches"]),
            0.0,
        )
    check_min("image_min_cosine", parity["image_min_cosine"], min_cosine)
    check_min("text_min_cosine", parity["text_min_cosine"], min_cosine)
    check_min("preprocess_min_cosine", parity["preprocess_min_cosine"], PREPROCESS_MIN_COSINE)
    diff = parity["preprocess_max_mean_abs_diff"]
    if not diff <= PREPROCESS_MAX_MEAN_ABS_DIFF:
        raise ParityError(
            "preprocess_max_mean_abs_diff (must be at most the threshold)",
            diff,
            PREPROCESS_MAX_MEAN_ABS_DIFF,
        )


def _write_config(folder: Path, config: dict[str, Any]) -> None:
    public = json.loads(json.dumps(config, default=str))
    (folder / CONFIG_FILE).write_text(
        json.dumps(public, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def export_clip(options: ClipExportOptions) -> Path:
    """Export an open_clip model to ``options.out`` and return the folder.

    Raises:
        ExportError: Invalid input (unknown model, tag or file, existing folder, missing GPU).
        ParityError: A parity figure is outside its tolerance; nothing is written.
    """
    import open_clip

    if options.token_dtype not in TOKEN_DTYPES:
        raise ExportError(f"--token-dtype {options.token_dtype!r} is invalid: use int64 or int32")
    if options.quantize not in (None, "int8"):
        raise ExportError(f"--quantize {options.quantize!r} is invalid: use int8")
    check_common_options(
        opset=options.opset,
        parity_count=options.parity_count,
        parity_batch_sizes=options.parity_batch_sizes,
        min_cosine=options.min_cosine,
        threads=options.threads,
    )
    check_cosine("--int8-min-cosine", options.int8_min_cosine)
    check_templates(options.default_templates)
    check_finite("--image-mean", options.preprocess_overrides.get("mean"), positive=False)
    check_finite("--image-std", options.preprocess_overrides.get("std"), positive=True)
    check_gpu_options(fp16=options.fp16, tensorrt=options.tensorrt)
    out = check_output_folder(options.out, options.overwrite)
    name = resolve_model_name(options.model, options.model_config)
    images = load_parity_images(options.parity_images, options.parity_count)
    if options.threads > 0:
        torch.set_num_threads(options.threads)

    model, source = create_clip_model(name, options.pretrained, options.preprocess_overrides)
    reference_tokenizer, tokenizer_settings, vocab_path = _tokenizer_settings(name)
    preprocess = _preprocess_from_open_clip(model)
    size = preprocess.size
    with torch.inference_mode():
        probe = model.encode_image(torch.zeros(1, 3, size, size))
    embedding_dim = int(probe.shape[-1])
    logit_scale = float(model.logit_scale.detach().exp().item())

    with staged_folder(out, options.overwrite) as stage:
        shutil.copyfile(vocab_path, stage / VOCAB_FILE)
        export_onnx(
            _ImageEncoder(model),
            torch.randn(2, 3, size, size),
            stage / "image.onnx",
            input_name="pixels",
            output_name="embeddings",
            opset=options.opset,
        )
        token_dtype = TOKEN_DTYPES[options.token_dtype]
        sample_tokens = torch.from_numpy(
            reference_tokenizer(["a photo of a dog.", "an example prompt"]).numpy()
        ).to(token_dtype)
        text_dynamic = export_text_graph(model, sample_tokens, stage / "text.onnx", options.opset)
        # Loaded with trimming off, so the first parity figures come from full-length tokens.
        tokenizer_settings["trim_padding"] = False
        files = {"image": "image.onnx", "text": "text.onnx"}
        config: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "kind": "clip",
            "name": out.name,
            "source": source,
            "embedding_dim": embedding_dim,
            "logit_scale": logit_scale,
            "default_templates": list(options.default_templates),
            "preprocess": preprocess.to_dict(),
            "tokenizer": tokenizer_settings,
            "files": files,
            "export": {
                "opset": options.opset,
                "dtype": "float32",
                "token_dtype": options.token_dtype,
                "exporter": "torch.onnx (TorchScript)",
                "torch_version": torch.__version__,
                "open_clip_version": open_clip.__version__,
                "cdul_export_version": __version__,
            },
        }
        _write_config(stage, config)
        session = SessionConfig(intra_op_threads=options.threads)
        clip = load_staged(stage, session)
        if not isinstance(clip, ClipModel):
            raise RuntimeError(f"{stage} loaded as {type(clip).__name__}, expected a CLIP model")
        parity = measure_clip_parity(
            model,
            clip,
            reference_tokenizer,
            images,
            options.parity_prompts,
            options.parity_batch_sizes,
            trimmed=text_dynamic,
        )
        torch_images = parity.pop("_torch_images")
        onnx_images = parity.pop("_onnx_images")
        pixels = parity.pop("_pixels")
        _logger.info("parity of %s: %s", name, parity)
        check_clip_parity(parity, options.min_cosine)
        tokenizer_settings["trim_padding"] = allows_trimming(
            parity, tokenizer_settings["context_length"], options.min_cosine
        )
        parity["thresholds"] = {
            "min_cosine": options.min_cosine,
            "preprocess_max_mean_abs_diff": PREPROCESS_MAX_MEAN_ABS_DIFF,
            "preprocess_min_cosine": PREPROCESS_MIN_COSINE,
        }

        if options.quantize == "int8":
            quantize_int8(stage / "image.onnx", stage / "image.int8.onnx")
            files["image_int8"] = "image.int8.onnx"
            _write_config(stage, config)
            quantized = load_staged(
                stage, SessionConfig(intra_op_threads=options.threads, precision="int8")
            )
            if not isinstance(quantized, ClipModel):
                raise RuntimeError(f"{stage} loaded as {type(quantized).__name__}, expected CLIP")
            int8_images = quantized.encode_images(pixels)
            parity["image_int8_min_cosine"] = round(
                float(row_cosines(int8_images, torch_images).min()), 7
            )
            parity["image_int8_mean_cosine"] = round(
                float(row_cosines(int8_images, torch_images).mean()), 7
            )
            parity["image_int8_min_cosine_vs_onnx_fp32"] = round(
                float(row_cosines(int8_images, onnx_images).min()), 7
            )
            if options.int8_min_cosine is not None:
                check_min(
                    "image_int8_min_cosine",
                    parity["image_int8_min_cosine"],
                    options.int8_min_cosine,
                )

        if options.fp16:
            files["image_fp16"] = "image.fp16.onnx"
            parity.update(
                export_fp16_image(
                    model, size, stage / "image.fp16.onnx", options.opset, pixels, torch_images
                )
            )
            check_min("image_fp16_min_cosine", parity["image_fp16_min_cosine"], GPU_MIN_COSINE)
        if options.tensorrt:
            files["image_tensorrt"] = "image.plan"
            parity.update(
                build_tensorrt_engine(
                    stage / "image.onnx", stage / "image.plan", size, pixels, torch_images
                )
            )
            check_min(
                "image_tensorrt_min_cosine", parity["image_tensorrt_min_cosine"], GPU_MIN_COSINE
            )
        config["export"]["parity"] = parity
        _write_config(stage, config)
    return out
