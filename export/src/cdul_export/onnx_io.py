"""ONNX export of a PyTorch module with a dynamic batch axis."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
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
    input_axes: dict[int, str] | None = None,
) -> None:
    """Export ``module`` (one input, one output) with the batch axis dynamic, then check it.

    ``input_axes`` names further dynamic axes of the input, such as ``{1: "sequence"}``.

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
        failure: Exception | None = None
        with _captured_stdout() as captured:
            try:
                torch.onnx.export(
                    module,
                    (sample,),
                    str(path),
                    input_names=[input_name],
                    output_names=[output_name],
                    dynamic_axes={
                        input_name: {0: "batch", **(input_axes or {})},
                        output_name: {0: "batch"},
                    },
                    opset_version=opset,
                    do_constant_folding=True,
                    dynamo=False,
                )
            except Exception as err:  # the exporter raises many types; report them as one
                failure = err
    if captured and captured[0].strip():
        _logger.debug("output of the ONNX exporter:\n%s", captured[0])
    if failure is not None:
        first_line = (str(failure).strip().splitlines() or [type(failure).__name__])[0]
        raise RuntimeError(
            f"ONNX export to {path.name} with opset {opset} failed: {first_line} (the "
            "exporter's full output is logged at DEBUG level)"
        ) from failure
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as err:
        raise RuntimeError(f"ONNX checker rejected {path}: {err}") from err
    _logger.info("exported %s (%.1f MB)", path, path.stat().st_size / 1e6)


@contextmanager
def _captured_stdout() -> Iterator[list[str]]:
    """Redirect file descriptor 1 to a temporary file and yield a list that gets its text.

    torch's TorchScript exporter prints the whole TorchScript graph to stdout from C++ when
    an export fails (torch 2.14 turns its ONNX log on for every export), so redirecting
    ``sys.stdout`` is not enough.
    """
    text: list[str] = []
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield text
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            text.append(sink.read().decode("utf-8", errors="replace"))
