"""ONNX export of a PyTorch module with a dynamic batch axis."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

_logger = logging.getLogger(__name__)


def export_onnx(
    module: nn.Module,
    sample: torch.Tensor,
    path: Path,
    *,
    input_name: str,
    output_name: str,
    opset: int = 17,
) -> None:
    """Export ``module`` (one input, one output) with the batch axis dynamic, then check it.

    The TorchScript-based exporter (``dynamo=False``) is used: it traces the open_clip towers
    and torchvision classifiers of this project without graph breaks.

    Raises:
        RuntimeError: The export or the ONNX checker failed.
    """
    module.eval()
    with warnings.catch_warnings():
        # The tracer warns about Python control flow on shapes, which is constant per model.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        try:
            torch.onnx.export(
                module,
                (sample,),
                str(path),
                input_names=[input_name],
                output_names=[output_name],
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        except Exception as err:  # the exporter raises many types; report them as one
            raise RuntimeError(f"ONNX export to {path} failed: {err}") from err
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as err:
        raise RuntimeError(f"ONNX checker rejected {path}: {err}") from err
    _logger.info("exported %s (%.1f MB)", path, path.stat().st_size / 1e6)
