"""Typed results of the cdul calls, with numpy arrays and the class names they follow."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import grpc
import numpy as np

from cdul_client.errors import LabelerError

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageOutcome:
    """The per-image status that every result carries.

    Attributes:
        code: OK, or the status of this image alone (INVALID_ARGUMENT for an image that does
            not decode, NOT_FOUND for an unknown content key, ...).
        message: what went wrong, empty when code is OK.
        reason: machine-readable reason such as "decode_failed"; empty when code is OK.
    """

    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""
    reason: str = ""


@dataclass(frozen=True)
class PseudoLabelResult:
    """Pseudo labels of one image. Score arrays are empty when the image failed.

    Attributes:
        id: the caller's image id.
        content_key: SHA-256 of the image bytes; send it as `ContentKey` to relabel.
        class_names: the class order of every score vector.
        global_scores: (C,) softmax over classes of the whole-image view.
        aggregate_scores: (C,) global-local aggregation of the tile scores.
        final_scores: (C,) the initial pseudo label.
        tile_scores: (grid_size^2, C), row-major over the grid, when requested.
        embedding: (D,) whole-image embedding, when requested.
        tile_embeddings: (grid_size^2, D), when requested.
        cache_hit: True when the server did not run the image encoder for this image.
        width: decoded width in pixels, after EXIF orientation.
        height: decoded height in pixels.
        status: OK or why this image failed.
    """

    id: str
    content_key: str
    class_names: tuple[str, ...]
    global_scores: np.ndarray
    aggregate_scores: np.ndarray
    final_scores: np.ndarray
    tile_scores: np.ndarray | None = None
    embedding: np.ndarray | None = None
    tile_embeddings: np.ndarray | None = None
    cache_hit: bool = False
    width: int = 0
    height: int = 0
    status: ImageOutcome = field(default_factory=ImageOutcome)

    @property
    def ok(self) -> bool:
        """Whether this image was labeled."""
        return self.status.code == grpc.StatusCode.OK

    def error(self) -> LabelerError | None:
        """Return this image's failure as a LabelerError, or None when it was labeled."""
        return _outcome_error(self.status, self.id)

    def raise_for_status(self) -> PseudoLabelResult:
        """Return self, or raise this image's LabelerError when it failed."""
        error = self.error()
        if error is not None:
            raise error
        return self


@dataclass(frozen=True)
class PseudoLabelResponse:
    """The results of one pseudo-label call, one per image, in request order."""

    model: str
    class_names: tuple[str, ...]
    results: list[PseudoLabelResult]
    request_id: str = ""


@dataclass(frozen=True)
class Label:
    """One selected label of a prediction."""

    name: str
    index: int
    score: float


@dataclass(frozen=True)
class Prediction:
    """Classifier scores of one image.

    Attributes:
        id: the caller's image id.
        content_key: SHA-256 of the image bytes.
        class_names: the classifier's classes, the order of `scores`.
        scores: (C,) sigmoid of the classifier's logits; empty when the image failed.
        labels: the labels selected by top_k and threshold, best first.
        status: OK or why this image failed.
    """

    id: str
    content_key: str
    class_names: tuple[str, ...]
    scores: np.ndarray
    labels: list[Label]
    status: ImageOutcome = field(default_factory=ImageOutcome)

    @property
    def ok(self) -> bool:
        """Whether this image was scored."""
        return self.status.code == grpc.StatusCode.OK

    def error(self) -> LabelerError | None:
        """Return this image's failure as a LabelerError, or None when it was scored."""
        return _outcome_error(self.status, self.id)

    def raise_for_status(self) -> Prediction:
        """Return self, or raise this image's LabelerError when it failed."""
        error = self.error()
        if error is not None:
            raise error
        return self


@dataclass(frozen=True)
class PredictResponse:
    """The results of one predict call, one per image, in request order."""

    model: str
    class_names: tuple[str, ...]
    results: list[Prediction]
    request_id: str = ""


@dataclass(frozen=True)
class CropHit:
    """One cached view that matches a text query.

    Attributes:
        content_key: the image's content key.
        image_id: the id the image had in the request that put it in the cache.
        tile_index: -1 for the whole image, else row * grid_size + col.
        grid_size: the grid the tile belongs to.
        row: tile row.
        col: tile column.
        box: (x0, y0, x1, y1) pixels of the view in the decoded image, x1 and y1 exclusive.
        score: cosine similarity between the view and the text.
    """

    content_key: str
    image_id: str
    tile_index: int
    grid_size: int
    row: int
    col: int
    box: tuple[int, int, int, int]
    score: float


@dataclass(frozen=True)
class PreprocessInfo:
    """The preprocessing of a model: input size in pixels, normalization, resize."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    resize_mode: str


@dataclass(frozen=True)
class ModelInfo:
    """What the server says about one model.

    Attributes:
        name: the model name that requests use.
        kind: "clip" or "classifier".
        embedding_dim: embedding size of a CLIP model, 0 for classifiers.
        logit_scale: the CLIP temperature exp(logit_scale).
        class_names: the classifier's classes; empty for CLIP models.
        preprocess: input size and normalization.
        weights: where the weights came from, such as "openai" or "none".
        is_default: the server's default model of its kind.
        precision: "fp32", "int8" or "fp16".
        default_templates: the templates used when a request gives none.
    """

    name: str
    kind: str
    embedding_dim: int
    logit_scale: float
    class_names: tuple[str, ...]
    preprocess: PreprocessInfo
    weights: str
    is_default: bool
    precision: str
    default_templates: tuple[str, ...]


def _outcome_error(status: ImageOutcome, image_id: str) -> LabelerError | None:
    if status.code == grpc.StatusCode.OK:
        return None
    return LabelerError(status.code, status.message, image_id=image_id, reason=status.reason)
