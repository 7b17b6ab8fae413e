"""Loading of the model repository: one folder per model with ``config.json`` and ONNX graphs.

The layout and the keys of ``config.json`` are specified in ``docs/formats.md``. ``cdul-export``
writes the folders. This module reads them with ONNX Runtime and checks them at load, so a
server does not start on a folder it cannot serve.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from cdul_server.preprocess import PreprocessConfig
from cdul_server.tokenizer import ClipTokenizer

_logger = logging.getLogger(__name__)

DEFAULT_MODEL_REPOSITORY = Path(__file__).resolve().parent / "models"
DEFAULT_CLIP_MODEL = "digits-clip"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "int8", "fp16")
DEFAULT_TEMPLATES = ["a photo of a {}."]
_TOKEN_DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


class ModelRepositoryError(ValueError):
    """A model folder or its ``config.json`` is missing, invalid or cannot be served."""


@dataclass(frozen=True)
class SessionConfig:
    """ONNX Runtime session settings shared by every model of a repository.

    Attributes:
        providers: ONNX Runtime execution providers in order of preference. Each must be
            available in the installed onnxruntime; there is no fallback to the CPU.
        intra_op_threads: Threads inside one operator; 0 lets ONNX Runtime choose.
        inter_op_threads: Threads across independent operators; 0 lets ONNX Runtime choose.
        precision: Which image graph to load: ``fp32``, ``int8`` or ``fp16``.
    """

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if not self.providers:
            raise ModelRepositoryError("SessionConfig.providers is empty: name at least one")
        if self.precision not in PRECISIONS:
            raise ModelRepositoryError(
                f"precision {self.precision!r} is not supported: use one of {list(PRECISIONS)}"
            )
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ModelRepositoryError(
                f"thread counts must be 0 (automatic) or positive, got intra "
                f"{self.intra_op_threads} and inter {self.inter_op_threads}"
            )


def create_session(path: Path, session: SessionConfig) -> ort.InferenceSession:
    """Open one ONNX graph with the requested execution providers.

    Raises:
        ModelRepositoryError: The file is missing or invalid, or a provider is unavailable.
    """
    available = ort.get_available_providers()
    missing = [name for name in session.providers if name not in available]
    if missing:
        raise ModelRepositoryError(
            f"execution provider(s) {missing} requested for {path} are not available in this "
            f"onnxruntime (available: {available}): install onnxruntime-gpu and the CUDA/TensorRT "
            "libraries, or request CPUExecutionProvider"
        )
    if not path.is_file():
        raise ModelRepositoryError(f"{path} not found: export the model again with cdul-export")
    options = ort.SessionOptions()
    options.intra_op_num_threads = session.intra_op_threads
    options.inter_op_num_threads = session.inter_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        result = ort.InferenceSession(
            str(path), sess_options=options, providers=list(session.providers)
        )
    except Exception as err:  # onnxruntime raises its own exception types for invalid graphs
        raise ModelRepositoryError(f"cannot load {path}: {err}") from err
    # ONNX Runtime may drop a provider that fails to initialize and continue on the others.
    dropped = [name for name in session.providers if name not in result.get_providers()]
    if dropped:
        raise ModelRepositoryError(
            f"execution provider(s) {dropped} failed to initialize for {path} (active: "
            f"{result.get_providers()}): check the GPU driver and libraries, or request "
            "CPUExecutionProvider"
        )
    return result


def _require(config: dict[str, Any], key: str, path: Path) -> Any:
    if key not in config:
        raise ModelRepositoryError(
            f"{path} has no {key!r}: export the model again with cdul-export"
        )
    return config[key]


def read_config(model_dir: Path) -> dict[str, Any]:
    """Read and check the common keys of a model folder's ``config.json``.

    Raises:
        ModelRepositoryError: The folder or file is missing, not JSON, or of another format.
    """
    path = Path(model_dir) / CONFIG_FILE
    if not Path(model_dir).is_dir():
        raise ModelRepositoryError(f"model folder {model_dir} not found: check the path")
    if not path.is_file():
        raise ModelRepositoryError(
            f"{path} not found: a model folder needs the config.json that cdul-export writes"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelRepositoryError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ModelRepositoryError(
            f"{path} must contain a JSON object, got {type(config).__name__}"
        )
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelRepositoryError(
            f"{path} has format_version {version!r}; this server reads version {FORMAT_VERSION}: "
            "export the model again with a matching cdul-export"
        )
    kind = _require(config, "kind", path)
    if kind not in ("clip", "classifier"):
        raise ModelRepositoryError(f"{path} has kind {kind!r}: expected 'clip' or 'classifier'")
    return config


def _graph_file(config: dict[str, Any], key: str, model_dir: Path, precision: str) -> Path:
    files = _require(config, "files", model_dir / CONFIG_FILE)
    file_key = key if precision == "fp32" else f"{key}_{precision}"
    if file_key not in files:
        raise ModelRepositoryError(
            f"{model_dir / CONFIG_FILE} lists no {precision} graph ({file_key!r} in 'files'): "
            f"export it (cdul-export {'--fp16' if precision == 'fp16' else '--quantize int8'}) "
            "or use precision fp32"
        )
    return model_dir / str(files[file_key])


def _preprocess(config: dict[str, Any], model_dir: Path) -> PreprocessConfig:
    try:
        return PreprocessConfig.from_dict(_require(config, "preprocess", model_dir / CONFIG_FILE))
    except ModelRepositoryError:
        raise
    except (TypeError, ValueError) as err:
        raise ModelRepositoryError(f"{model_dir / CONFIG_FILE}: {err}") from err


def _check_pixels(pixels: np.ndarray, size: int, name: str) -> np.ndarray:
    if not isinstance(pixels, np.ndarray):
        raise TypeError(f"pixels must be a numpy array, got {type(pixels).__name__}")
    if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size):
        raise ValueError(
            f"model {name} expects pixels of shape (N, 3, {size}, {size}), got {pixels.shape}: "
            "preprocess the images with the model's preprocess config"
        )
    return np.ascontiguousarray(pixels, dtype=np.float32)


def trimmed_length(tokens: np.ndarray, eot_token_id: int) -> int:
    """Return how many leading positions of a (N, L) batch cover every row's end-of-text token.

    A row without the end-of-text token counts as L long, so such a batch is not trimmed.
    """
    is_eot = tokens == eot_token_id
    ends = np.where(is_eot.any(axis=1), is_eot.argmax(axis=1) + 1, tokens.shape[1])
    return int(ends.max())


def _trim_padding_setting(
    config: dict[str, Any], config_path: Path, text_path: Path, text_length: int | None
) -> bool:
    """Read ``tokenizer.trim_padding`` (false when absent) and check that the graph allows it."""
    value = config["tokenizer"].get("trim_padding", False)
    if not isinstance(value, bool):
        raise ModelRepositoryError(
            f"{config_path}: tokenizer.trim_padding must be true or false, got {value!r}"
        )
    if value and text_length is not None:
        raise ModelRepositoryError(
            f"{config_path} sets tokenizer.trim_padding, but {text_path.name} takes exactly "
            f"{text_length} tokens per prompt: export the model again or set it to false"
        )
    return value


class ClipModel:
    """A CLIP model of the repository: image and text encoders plus tokenizer.

    Both encoders return L2-normalized float32 embeddings. Methods are safe to call from
    several threads at once, because ONNX Runtime sessions are. ``trim_padding`` is
    ``tokenizer.trim_padding`` of ``config.json``: the export sets it only after checking that
    the text graph gives the same embeddings on tokens cut after the end-of-text token.
    """

    def __init__(self, model_dir: Path, config: dict[str, Any], session: SessionConfig) -> None:
        """Load the graphs and the tokenizer named in ``config``.

        Raises:
            ModelRepositoryError: A file is missing or the graphs do not fit the config.
        """
        self.path = Path(model_dir)
        self.name = self.path.name
        self.config = config
        config_path = self.path / CONFIG_FILE
        self.preprocess = _preprocess(config, self.path)
        try:
            self.tokenizer = ClipTokenizer.from_config(
                _require(config, "tokenizer", config_path), self.path
            )
        except ModelRepositoryError:
            raise
        except (TypeError, ValueError) as err:
            raise ModelRepositoryError(f"{config_path}: {err}") from err
        self.embedding_dim = int(_require(config, "embedding_dim", config_path))
        self.logit_scale = float(_require(config, "logit_scale", config_path))
        source = config.get("source", {})
        self.random_init = bool(source.get("random_init", False))
        self.weights = str(source.get("pretrained", "unknown"))
        self.default_templates = list(config.get("default_templates") or DEFAULT_TEMPLATES)
        self.precision = session.precision
        self._image = create_session(
            _graph_file(config, "image", self.path, session.precision), session
        )
        # Only the image encoder has quantized variants; the text encoder runs once per
        # vocabulary and its embeddings are cached.
        text_path = _graph_file(config, "text", self.path, "fp32")
        self._text = create_session(text_path, session)
        self._image_input = self._image.get_inputs()[0].name
        text_input = self._text.get_inputs()[0]
        self._text_input = text_input.name
        if text_input.type not in _TOKEN_DTYPES:
            raise ModelRepositoryError(
                f"{self.path / 'text.onnx'} takes {text_input.type} tokens: expected int64 or int32"
            )
        self.token_dtype = _TOKEN_DTYPES[text_input.type]
        # ONNX Runtime reports a fixed axis length as an int and a dynamic axis as a name or None.
        length = text_input.shape[1] if len(text_input.shape) == 2 else None
        self._text_length: int | None = length if isinstance(length, int) else None
        self.trim_padding = _trim_padding_setting(config, config_path, text_path, self._text_length)
        for label, graph in (("image", self._image), ("text", self._text)):
            width = graph.get_outputs()[0].shape[-1]
            if isinstance(width, int) and width != self.embedding_dim:
                raise ModelRepositoryError(
                    f"{label} graph of {self.path} returns {width}-dimensional embeddings but "
                    f"config.json says embedding_dim {self.embedding_dim}: export it again"
                )
        if self.random_init:
            _logger.warning(
                "model %s has random weights (exported with --pretrained none): its scores "
                "carry no meaning; use it for speed tests only",
                self.name,
            )

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """Embed preprocessed images.

        Args:
            pixels: float32 array (N, 3, S, S) from :func:`cdul_server.preprocess.preprocess_batch`.

        Returns:
            float32 array (N, D) of L2-normalized embeddings.
        """
        pixels = _check_pixels(pixels, self.preprocess.size, self.name)
        if len(pixels) == 0:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        (embeddings,) = self._image.run(None, {self._image_input: pixels})
        return np.asarray(embeddings, dtype=np.float32)

    def encode_tokens(self, tokens: np.ndarray, *, trim_padding: bool | None = None) -> np.ndarray:
        """Embed token ids (N, context_length) of int64 or int32; returns float32 (N, D).

        Args:
            tokens: Token ids as the tokenizer returns them.
            trim_padding: Feed the text graph only the positions up to and including the
                end-of-text token of the batch's longest prompt (:func:`trimmed_length`).
                None follows ``self.trim_padding``.

        Raises:
            ValueError: The tokens have the wrong shape, or trimming is requested but the
                text graph has a fixed sequence length.
        """
        if not isinstance(tokens, np.ndarray) or tokens.dtype.kind not in "iu":
            raise TypeError(f"tokens must be an integer numpy array, got {tokens!r:.80}")
        if tokens.ndim != 2 or tokens.shape[1] != self.tokenizer.context_length:
            raise ValueError(
                f"model {self.name} expects tokens of shape (N, {self.tokenizer.context_length}),"
                f" got {tokens.shape}"
            )
        if len(tokens) == 0:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        trim = self.trim_padding if trim_padding is None else trim_padding
        if trim:
            if self._text_length is not None:
                raise ValueError(
                    f"the text graph of model {self.name} takes exactly {self._text_length} "
                    "tokens per prompt, so its input cannot be trimmed: export it again"
                )
            tokens = tokens[:, : trimmed_length(tokens, self.tokenizer.eot_token_id)]
        feed = np.ascontiguousarray(tokens, dtype=self.token_dtype)
        (embeddings,) = self._text.run(None, {self._text_input: feed})
        return np.asarray(embeddings, dtype=np.float32)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Tokenize and embed texts; returns float32 (N, D) of L2-normalized embeddings."""
        return self.encode_tokens(self.tokenizer(list(texts)))

    def __repr__(self) -> str:
        return (
            f"ClipModel(name={self.name!r}, dim={self.embedding_dim}, precision={self.precision!r})"
        )


class ClassifierModel:
    """A trained multi-label classifier of the repository: pixels to logits."""

    def __init__(self, model_dir: Path, config: dict[str, Any], session: SessionConfig) -> None:
        """Load the graph named in ``config``.

        Raises:
            ModelRepositoryError: A file is missing or the graph does not fit the config.
        """
        self.path = Path(model_dir)
        self.name = self.path.name
        self.config = config
        config_path = self.path / CONFIG_FILE
        names = _require(config, "class_names", config_path)
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ModelRepositoryError(
                f"{config_path}: class_names must be a non-empty string list"
            )
        if len(set(names)) != len(names):
            raise ModelRepositoryError(f"{config_path}: class_names contains duplicates")
        self.class_names: list[str] = names
        self.preprocess = _preprocess(config, self.path)
        precision = session.precision
        if precision != "fp32" and f"model_{precision}" not in config.get("files", {}):
            # The precision setting targets the CLIP image encoders; a classifier exported
            # without that variant is served in fp32.
            _logger.warning(
                "classifier %s has no %s graph; loading its fp32 graph", self.name, precision
            )
            precision = "fp32"
        self.precision = precision
        self._session = create_session(_graph_file(config, "model", self.path, precision), session)
        self._input = self._session.get_inputs()[0].name
        width = self._session.get_outputs()[0].shape[-1]
        if isinstance(width, int) and width != len(names):
            raise ModelRepositoryError(
                f"graph of {self.path} returns {width} logits but config.json lists "
                f"{len(names)} class names: export it again"
            )

    def predict_logits(self, pixels: np.ndarray) -> np.ndarray:
        """Return float32 logits (N, C) for preprocessed pixels (N, 3, S, S)."""
        pixels = _check_pixels(pixels, self.preprocess.size, self.name)
        if len(pixels) == 0:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        (logits,) = self._session.run(None, {self._input: pixels})
        return np.asarray(logits, dtype=np.float32)

    def __repr__(self) -> str:
        return f"ClassifierModel(name={self.name!r}, classes={len(self.class_names)})"


def load_model(
    model_dir: Path, session: SessionConfig | None = None
) -> ClipModel | ClassifierModel:
    """Load one model folder.

    Raises:
        ModelRepositoryError: The folder cannot be served; the message names the file and fix.
    """
    session = session or SessionConfig()
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    if config["kind"] == "clip":
        model: ClipModel | ClassifierModel = ClipModel(model_dir, config, session)
    else:
        model = ClassifierModel(model_dir, config, session)
    _logger.info("loaded %r from %s", model, model_dir)
    return model


def list_model_dirs(root: Path) -> list[Path]:
    """Return the model folders (sub-folders with a ``config.json``) of a repository, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise ModelRepositoryError(f"model repository {root} not found: check the --models path")
    return sorted(
        child
        for child in root.iterdir()
        if child.is_dir() and not child.name.startswith(".") and (child / CONFIG_FILE).is_file()
    )


def load_model_repository(
    root: Path, names: Sequence[str] | None = None, session: SessionConfig | None = None
) -> dict[str, ClipModel | ClassifierModel]:
    """Load the models of a repository.

    Args:
        root: The repository folder, holding one folder per model.
        names: Model folder names to load; all models when None.
        session: ONNX Runtime settings shared by every model.

    Returns:
        Models by name, in name order.

    Raises:
        ModelRepositoryError: The repository is empty, a requested name is missing, or a model
            cannot be loaded.
    """
    dirs = {path.name: path for path in list_model_dirs(root)}
    if not dirs:
        raise ModelRepositoryError(
            f"model repository {root} contains no model folder with a config.json: "
            "export one with cdul-export"
        )
    if names is not None:
        unknown = [name for name in names if name not in dirs]
        if unknown:
            raise ModelRepositoryError(
                f"model(s) {unknown} not found in {root}: available are {sorted(dirs)}"
            )
        selected = [name for name in dirs if name in set(names)]
    else:
        selected = list(dirs)
    return {name: load_model(dirs[name], session) for name in selected}
