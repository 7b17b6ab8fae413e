"""Build request messages and turn response messages into result dataclasses."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cdul_client.config import PseudoLabelOptions
from cdul_client.errors import status_code_from_number
from cdul_client.results import (
    CropHit,
    ImageOutcome,
    Label,
    ModelInfo,
    Prediction,
    PredictResponse,
    PreprocessInfo,
    PseudoLabelResponse,
    PseudoLabelResult,
)
from cdul_proto.v1 import labeler_pb2

_GLOBAL_VIEWS = {
    "center_crop": labeler_pb2.GLOBAL_VIEW_CENTER_CROP,
    "squash": labeler_pb2.GLOBAL_VIEW_SQUASH,
    "pad": labeler_pb2.GLOBAL_VIEW_PAD,
}


def check_class_names(class_names: Sequence[str]) -> list[str]:
    """Return the class names, raising ValueError on an empty, blank or duplicate name."""
    if isinstance(class_names, str):
        raise TypeError(f"class_names must be a sequence of names, got the string {class_names!r}")
    names = list(class_names)
    if not names:
        raise ValueError("class_names is empty: pass at least one class name")
    seen: set[str] = set()
    for name in names:
        key = name.strip()
        if not key:
            raise ValueError(f"class_names contains a blank name at index {names.index(name)}")
        if key in seen:
            raise ValueError(f"class_names contains {name!r} twice: class names must be unique")
        seen.add(key)
    return names


def pseudo_label_request(
    images: Sequence[labeler_pb2.Image],
    class_names: Sequence[str],
    options: PseudoLabelOptions,
    model: str,
    request_id: str,
) -> labeler_pb2.PseudoLabelRequest:
    """Build a PseudoLabelRequest."""
    proto_options = labeler_pb2.PseudoLabelOptions(
        grid_size=options.grid_size,
        global_view=_GLOBAL_VIEWS[options.global_view],
        return_tile_scores=options.return_tile_scores,
        return_embeddings=options.return_embeddings,
    )
    if options.threshold is not None:
        proto_options.threshold = options.threshold
    if options.lambda_weight is not None:
        proto_options.lambda_weight = options.lambda_weight
    if options.temperature is not None:
        proto_options.temperature = options.temperature
    return labeler_pb2.PseudoLabelRequest(
        model=model,
        images=list(images),
        vocabulary=labeler_pb2.Vocabulary(
            class_names=check_class_names(class_names), templates=list(options.templates)
        ),
        options=proto_options,
        request_id=request_id,
    )


def predict_request(
    images: Sequence[labeler_pb2.Image],
    model: str,
    top_k: int,
    threshold: float | None,
    request_id: str,
) -> labeler_pb2.PredictRequest:
    """Build a PredictRequest."""
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    options = labeler_pb2.PredictOptions(top_k=top_k)
    if threshold is not None:
        options.threshold = threshold
    return labeler_pb2.PredictRequest(
        model=model, images=list(images), options=options, request_id=request_id
    )


def _outcome(status: labeler_pb2.ImageStatus) -> ImageOutcome:
    return ImageOutcome(
        code=status_code_from_number(status.code), message=status.message, reason=status.reason
    )


def _vector(values: Sequence[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def _matrix(matrix: labeler_pb2.FloatMatrix) -> np.ndarray | None:
    if matrix.rows == 0 and not matrix.values:
        return None
    array = np.asarray(matrix.values, dtype=np.float32)
    if array.size != matrix.rows * matrix.cols:
        raise ValueError(
            f"server sent a {matrix.rows} x {matrix.cols} matrix with {array.size} values"
        )
    return array.reshape(matrix.rows, matrix.cols)


def pseudo_label_response(message: labeler_pb2.PseudoLabelResponse) -> PseudoLabelResponse:
    """Convert a PseudoLabelResponse message."""
    class_names = tuple(message.class_names)
    results = [
        PseudoLabelResult(
            id=result.id,
            content_key=result.content_key,
            class_names=class_names,
            global_scores=_vector(result.global_scores),
            aggregate_scores=_vector(result.aggregate_scores),
            final_scores=_vector(result.final_scores),
            tile_scores=_matrix(result.tile_scores),
            embedding=_vector(result.embedding) if len(result.embedding) else None,
            tile_embeddings=_matrix(result.tile_embeddings),
            cache_hit=result.cache_hit,
            width=result.width,
            height=result.height,
            status=_outcome(result.status),
        )
        for result in message.results
    ]
    return PseudoLabelResponse(
        model=message.model,
        class_names=class_names,
        results=results,
        request_id=message.request_id,
    )


def predict_response(message: labeler_pb2.PredictResponse) -> PredictResponse:
    """Convert a PredictResponse message."""
    class_names = tuple(message.class_names)
    results = [
        Prediction(
            id=result.id,
            content_key=result.content_key,
            class_names=class_names,
            scores=_vector(result.scores),
            labels=[Label(name=x.name, index=x.index, score=x.score) for x in result.labels],
            status=_outcome(result.status),
        )
        for result in message.results
    ]
    return PredictResponse(
        model=message.model,
        class_names=class_names,
        results=results,
        request_id=message.request_id,
    )


def crop_hits(message: labeler_pb2.SearchCropsResponse) -> list[CropHit]:
    """Convert the hits of a SearchCropsResponse message."""
    return [
        CropHit(
            content_key=hit.content_key,
            image_id=hit.image_id,
            tile_index=hit.tile_index,
            grid_size=hit.grid_size,
            row=hit.row,
            col=hit.col,
            box=(hit.box.x0, hit.box.y0, hit.box.x1, hit.box.y1),
            score=hit.score,
        )
        for hit in message.hits
    ]


def model_info(message: labeler_pb2.ModelInfo) -> ModelInfo:
    """Convert a ModelInfo message."""
    preprocess = message.preprocess
    return ModelInfo(
        name=message.name,
        kind=message.kind,
        embedding_dim=message.embedding_dim,
        logit_scale=message.logit_scale,
        class_names=tuple(message.class_names),
        preprocess=PreprocessInfo(
            size=preprocess.size,
            mean=tuple(preprocess.mean),
            std=tuple(preprocess.std),
            interpolation=preprocess.interpolation,
            resize_mode=preprocess.resize_mode,
        ),
        weights=message.weights,
        is_default=message.is_default,
        precision=message.precision,
        default_templates=tuple(message.default_templates),
    )
