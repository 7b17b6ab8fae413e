"""Checks of export options that run before anything is loaded, exported or written."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from cdul_export.staging import ExportError

_logger = logging.getLogger(__name__)

# The opsets of torch's TorchScript-based ONNX exporter (``dynamo=False``), which
# ``onnx_io.export_onnx`` uses. The fallbacks are the values of torch 2.14.
_FALLBACK_MIN_OPSET = 7
_FALLBACK_MAX_OPSET = 20


def supported_opsets() -> tuple[int, int]:
    """Return the lowest and highest opset that the installed TorchScript exporter accepts."""
    try:
        from torch.onnx import _constants
    except ImportError:
        return _FALLBACK_MIN_OPSET, _FALLBACK_MAX_OPSET
    low = getattr(_constants, "ONNX_MIN_OPSET", _FALLBACK_MIN_OPSET)
    high = getattr(
        _constants,
        "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET",
        getattr(_constants, "ONNX_MAX_OPSET", _FALLBACK_MAX_OPSET),
    )
    return int(low), int(high)


def check_opset(opset: int) -> None:
    """Raise ExportError unless the installed exporter supports ``opset``."""
    low, high = supported_opsets()
    if not low <= opset <= high:
        raise ExportError(
            f"--opset {opset} is not supported by the installed torch ONNX exporter: use an "
            f"opset from {low} to {high} (default: 17)"
        )


def check_cosine(option: str, value: float | None) -> None:
    """Raise ExportError unless ``value`` is None or a cosine in (0, 1]."""
    if value is not None and not 0.0 < value <= 1.0:
        raise ExportError(f"{option} {value} is not a cosine in (0, 1]: use a value such as 0.999")


def check_common_options(
    *,
    opset: int,
    parity_count: int,
    parity_batch_sizes: Sequence[int],
    min_cosine: float,
    threads: int,
) -> None:
    """Check the options that ``cdul-export clip`` and ``cdul-export classifier`` share.

    Raises:
        ExportError: an option is out of range; the message names it and the valid range.
    """
    check_opset(opset)
    check_cosine("--min-cosine", min_cosine)
    if parity_count < 1:
        raise ExportError(f"--parity-count must be at least 1, got {parity_count}")
    if not parity_batch_sizes or any(size < 1 for size in parity_batch_sizes):
        raise ExportError(
            f"--parity-batch-sizes {','.join(map(str, parity_batch_sizes)) or '(empty)'} must "
            "be positive integers, such as 1,2,7"
        )
    if threads < 0:
        raise ExportError(f"--threads must be >= 0 (0 uses the libraries' defaults), got {threads}")


def check_positive(option: str, value: float) -> None:
    """Raise ExportError unless ``value`` is a finite number > 0."""
    if not (math.isfinite(value) and value > 0):
        raise ExportError(f"{option} must be a finite number > 0, got {value}")


def check_templates(templates: Sequence[str]) -> None:
    """Raise ExportError unless there is a template and each has exactly one "{}"."""
    if not templates:
        raise ExportError("no --template given: pass at least one, such as 'a photo of a {}.'")
    for template in templates:
        if template.count("{}") != 1:
            raise ExportError(
                f"--template {template!r} must contain exactly one {{}} for the class name, "
                "such as 'a photo of a {}.'"
            )


def check_finite(option: str, values: Sequence[float] | None, *, positive: bool) -> None:
    """Raise ExportError unless every value is finite (and > 0 when ``positive``)."""
    if values is None:
        return
    for value in values:
        if not math.isfinite(value) or (positive and value <= 0):
            need = "finite numbers > 0" if positive else "finite numbers"
            raise ExportError(f"{option} {' '.join(map(str, values))} must be {need}")
