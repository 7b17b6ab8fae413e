"""cdul-client: sync and asyncio clients and the batch-labeling command line for cdul."""

from __future__ import annotations

from cdul_client.aio import AsyncLabelerClient
from cdul_client.client import LabelerClient
from cdul_client.config import (
    DEFAULT_TIMEOUT_S,
    ChannelConfig,
    PseudoLabelOptions,
    RetryConfig,
    TlsConfig,
)
from cdul_client.errors import LabelerError
from cdul_client.images import ContentKey, ImageInput, ImageSource, content_key
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

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "AsyncLabelerClient",
    "ChannelConfig",
    "ContentKey",
    "CropHit",
    "ImageInput",
    "ImageOutcome",
    "ImageSource",
    "Label",
    "LabelerClient",
    "LabelerError",
    "ModelInfo",
    "PredictResponse",
    "Prediction",
    "PreprocessInfo",
    "PseudoLabelOptions",
    "PseudoLabelResponse",
    "PseudoLabelResult",
    "RetryConfig",
    "TlsConfig",
    "__version__",
    "content_key",
]
