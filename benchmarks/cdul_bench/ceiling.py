"""The machine's fp32 matrix-multiply ceiling, measured with three BLAS-like kernels.

The utilization of an encoder is its achieved FLOP/s over the best of these rates, so the
library and the matrix shape that multiply fastest set the ceiling.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .measure import Measurement, measure_rate, timed

_logger = logging.getLogger(__name__)


def _flops(size: int) -> float:
    return 2.0 * size**3


def numpy_matmul(size: int, threads: int, repeats: int) -> Measurement:
    """Measure GFLOP/s of a float32 ``size x size`` product with numpy's BLAS.

    Args:
        size: Side of the square matrices.
        threads: BLAS threads, set through threadpoolctl when it is installed.
        repeats: Timed repeats.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None

    def run_once() -> tuple[float, float]:
        return _flops(size) / 1e9, timed(lambda: a @ b)

    params = {"library": "numpy BLAS", "size": size, "threads": threads, "dtype": "float32"}
    if threadpool_limits is None:
        params["threads"] = "library default"
        return measure_rate(
            "f", "numpy matmul", run_once, repeats=repeats, unit="GFLOP/s", params=params
        )
    with threadpool_limits(limits=threads, user_api="blas"):
        return measure_rate(
            "f", "numpy matmul", run_once, repeats=repeats, unit="GFLOP/s", params=params
        )


def torch_matmul(size: int, threads: int, repeats: int) -> Measurement:
    """Measure GFLOP/s of a float32 ``size x size`` product with torch (MKL on x86)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=generator)
        b = torch.randn(size, size, generator=generator)

        def run_once() -> tuple[float, float]:
            return _flops(size) / 1e9, timed(lambda: torch.mm(a, b))

        params = {"library": "torch.mm", "size": size, "threads": threads, "dtype": "float32"}
        return measure_rate(
            "f", "torch matmul", run_once, repeats=repeats, unit="GFLOP/s", params=params
        )
    finally:
        torch.set_num_threads(previous)


def onnxruntime_matmul(
    size: int, threads: int, repeats: int, shape: tuple[int, int, int] | None = None
) -> Measurement:
    """Measure GFLOP/s of a float32 MatMul node in ONNX Runtime (MLAS).

    Args:
        size: Side of the square matrices, unless ``shape`` is given.
        threads: ONNX Runtime intra-op threads.
        repeats: Timed repeats.
        shape: (M, K, N) of an (M, K) x (K, N) product, to measure a model's own shapes.
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    m, k, n = shape or (size, size, size)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [k, n]),
        ],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "matmul.onnx"
        onnx.save(model, path)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {
        "a": rng.standard_normal((m, k), dtype=np.float32),
        "b": rng.standard_normal((k, n), dtype=np.float32),
    }
    flops = 2.0 * m * k * n

    def run_once() -> tuple[float, float]:
        return flops / 1e9, timed(lambda: session.run(None, feeds))

    params: dict[str, object] = {
        "library": "onnxruntime MatMul",
        "threads": threads,
        "dtype": "float32",
    }
    if shape:
        params["shape"] = f"{m}x{k} @ {k}x{n}"
    else:
        params["size"] = size
    label = f"onnxruntime matmul {params.get('shape', size)}"
    return measure_rate("f", label, run_once, repeats=repeats, unit="GFLOP/s", params=params)


def measure_ceiling(
    size: int, threads: int, repeats: int, shapes: Sequence[tuple[int, int, int]] = ()
) -> list[Measurement]:
    """Measure the fp32 matrix-multiply rate of numpy, torch and ONNX Runtime.

    Args:
        size: Side of the square matrices of the ceiling.
        threads: Threads of each library.
        repeats: Timed repeats.
        shapes: Further (M, K, N) products to run in ONNX Runtime, such as an encoder's own
            shapes. The ceiling is the best rate of all of them.
    """
    results = [
        numpy_matmul(size, threads, repeats),
        torch_matmul(size, threads, repeats),
        onnxruntime_matmul(size, threads, repeats),
    ]
    for shape in shapes:
        results.append(onnxruntime_matmul(size, threads, repeats, shape=shape))
    return results
