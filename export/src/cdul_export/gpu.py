"""GPU variants of an image encoder: an fp16 ONNX graph and a TensorRT engine.

Both need a CUDA GPU; the TensorRT engine also needs the ``tensorrt`` package (the
``cdul-export[tensorrt]`` extra). Without them the options fail before any work starts.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cdul_export.onnx_io import export_onnx
from cdul_export.parity import row_cosines
from cdul_export.staging import ExportError

_logger = logging.getLogger(__name__)

TENSORRT_MAX_BATCH = 64
TENSORRT_OPT_BATCH = 16


def missing_for_fp16() -> list[str]:
    """Return what an fp16 export needs and this machine lacks (empty when nothing)."""
    import onnxruntime as ort

    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU visible to PyTorch (torch.cuda.is_available() is False)")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        missing.append("onnxruntime-gpu with CUDAExecutionProvider (pip install onnxruntime-gpu)")
    return missing


def missing_for_tensorrt() -> list[str]:
    """Return what a TensorRT engine build needs and this machine lacks."""
    missing = []
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        missing.append("the tensorrt Python package (pip install 'cdul-export[tensorrt]')")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU visible to PyTorch (torch.cuda.is_available() is False)")
    return missing


def check_gpu_options(*, fp16: bool, tensorrt: bool) -> None:
    """Raise ExportError at once when --fp16 or --tensorrt cannot run on this machine."""
    if fp16:
        missing = missing_for_fp16()
        if missing:
            raise ExportError(f"--fp16 needs {' and '.join(missing)}; run it on a GPU machine")
    if tensorrt:
        missing = missing_for_tensorrt()
        if missing:
            raise ExportError(f"--tensorrt needs {' and '.join(missing)}; run it on a GPU machine")


class _Fp16ImageEncoder(nn.Module):
    """fp16 weights and arithmetic, float32 pixels in and float32 embeddings out."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.model.encode_image(pixels.half())
        return F.normalize(features.float(), dim=-1)


def export_fp16_image(
    model: nn.Module,
    size: int,
    path: Path,
    opset: int,
    pixels: np.ndarray,
    torch_images: np.ndarray,
) -> dict[str, Any]:
    """Export the image tower in fp16 on the GPU and measure it against fp32 PyTorch.

    Returns:
        ``image_fp16_min_cosine`` and ``image_fp16_mean_cosine`` for the parity record.
    """
    import onnxruntime as ort

    half = copy.deepcopy(model).cuda().half().eval()
    export_onnx(
        _Fp16ImageEncoder(half),
        torch.randn(2, 3, size, size, device="cuda"),
        path,
        input_name="pixels",
        output_name="embeddings",
        opset=opset,
    )
    del half
    torch.cuda.empty_cache()
    session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
    if "CUDAExecutionProvider" not in session.get_providers():
        raise RuntimeError(f"CUDAExecutionProvider failed to initialize for {path}")
    (embeddings,) = session.run(None, {"pixels": pixels.astype(np.float32)})
    cosines = row_cosines(np.asarray(embeddings, dtype=np.float32), torch_images)
    return {
        "image_fp16_min_cosine": round(float(cosines.min()), 7),
        "image_fp16_mean_cosine": round(float(cosines.mean()), 7),
    }


def build_tensorrt_engine(
    onnx_path: Path,
    plan_path: Path,
    size: int,
    pixels: np.ndarray,
    torch_images: np.ndarray,
    max_batch: int = TENSORRT_MAX_BATCH,
) -> dict[str, Any]:
    """Build a serialized TensorRT engine (fp16 allowed) from the fp32 image graph and check it.

    The engine takes batches of 1 to ``max_batch`` images; it is tied to the GPU model and
    TensorRT version that built it.

    Returns:
        ``image_tensorrt_min_cosine`` and the engine facts for the parity record.

    Raises:
        RuntimeError: Parsing or building failed; the message lists TensorRT's parser errors.
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors[:5]}")
    builder_config = builder.create_builder_config()
    builder_config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    opt = min(TENSORRT_OPT_BATCH, max_batch)
    profile.set_shape(
        "pixels", (1, 3, size, size), (opt, 3, size, size), (max_batch, 3, size, size)
    )
    builder_config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}; see its log")
    plan = bytes(serialized)
    plan_path.write_bytes(plan)

    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    batch = torch.from_numpy(pixels[:max_batch].astype(np.float32)).cuda().contiguous()
    out = torch.empty((len(batch), torch_images.shape[1]), dtype=torch.float32, device="cuda")
    context.set_input_shape("pixels", tuple(batch.shape))
    context.set_tensor_address("pixels", batch.data_ptr())
    context.set_tensor_address("embeddings", out.data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT engine execution failed")
    stream.synchronize()
    cosines = row_cosines(out.cpu().numpy(), torch_images[: len(batch)])
    return {
        "image_tensorrt_min_cosine": round(float(cosines.min()), 7),
        "tensorrt": {
            "version": trt.__version__,
            "gpu": torch.cuda.get_device_name(0),
            "precision": "fp16",
            "batch_range": [1, max_batch],
        },
    }
