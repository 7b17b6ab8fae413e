"""FLOPs per view of an image encoder, counted from its ONNX graph and from PyTorch.

The ONNX count sets the batch axis to 1, runs ONNX shape inference and adds 2 x the
multiply-accumulates of every MatMul, Gemm, Conv and Attention node. Their integer and quantized
forms count the same, so an int8 graph counts the same work as its fp32 source. Element-wise
operations, softmax and normalization are left out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)

_MATMUL_OPS = {"MatMul", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "FusedMatMul"}
_GEMM_OPS = {"Gemm", "QGemm"}
_CONV_OPS = {"Conv", "ConvInteger", "QLinearConv", "FusedConv"}
# Index of the data input and of the weight input of each quantized form.
_INPUT_INDEX = {
    "QLinearMatMul": (0, 3),
    "QLinearConv": (0, 3),
    "QGemm": (0, 3),
}


@dataclass
class FlopCount:
    """Result of counting one graph.

    Attributes:
        flops: 2 x multiply-accumulates per view, summed over the counted nodes.
        by_op: The same split by operator type.
        uncounted: Names of heavy nodes whose shapes inference left unknown.
    """

    flops: float
    by_op: dict[str, float] = field(default_factory=dict)
    uncounted: list[str] = field(default_factory=list)


def _shape(shapes: dict[str, list[int | None]], name: str) -> list[int | None] | None:
    return shapes.get(name)


def _known(shape: Sequence[int | None] | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def _collect_shapes(model: Any) -> dict[str, list[int | None]]:
    shapes: dict[str, list[int | None]] = {}
    graph = model.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        shapes[value.name] = [
            dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_type.shape.dim
        ]
    for initializer in graph.initializer:
        shapes[initializer.name] = list(initializer.dims)
    return shapes


def _node_flops(node: Any, shapes: dict[str, list[int | None]]) -> float | None:
    data_index, weight_index = _INPUT_INDEX.get(node.op_type, (0, 1))
    output = _shape(shapes, node.output[0])
    if node.op_type in _MATMUL_OPS:
        left = _shape(shapes, node.input[data_index])
        if not (_known(output) and _known(left)):
            return None
        return 2.0 * math.prod(output) * left[-1]  # type: ignore[index,arg-type]
    if node.op_type in _GEMM_OPS:
        left = _shape(shapes, node.input[data_index])
        if not (_known(output) and _known(left)):
            return None
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        inner = left[0] if trans_a else left[1]  # type: ignore[index]
        return 2.0 * math.prod(output) * inner  # type: ignore[arg-type]
    if node.op_type in _CONV_OPS:
        weight = _shape(shapes, node.input[weight_index])
        if not (_known(output) and _known(weight)):
            return None
        # weight is (C_out, C_in / group, k...): each output element takes C_in/group x k MACs.
        return 2.0 * math.prod(output) * math.prod(weight[1:])  # type: ignore[arg-type,index]
    if node.op_type == "Attention":
        query = _shape(shapes, node.input[0])
        key = _shape(shapes, node.input[1])
        if not (_known(query) and _known(key)):
            return None
        # Q @ K^T and P @ V, each 2 x (query positions) x (key positions) x (head size) per head.
        if len(query) == 4:  # type: ignore[arg-type]
            batch, heads, q_len, head_size = query  # type: ignore[misc]
            kv_len = key[2]  # type: ignore[index]
            return 4.0 * batch * heads * q_len * kv_len * head_size  # type: ignore[operator]
        batch, q_len, hidden = query  # type: ignore[misc]
        kv_len = key[1]  # type: ignore[index]
        return 4.0 * batch * q_len * kv_len * hidden  # type: ignore[operator]
    return 0.0


def count_onnx_flops(path: Path) -> FlopCount:
    """Count the FLOPs of one batch-1 run of the ONNX graph at ``path``.

    Args:
        path: An image encoder graph whose first input is (batch, 3, S, S).

    Returns:
        The count, with the heavy nodes whose shapes stayed unknown listed in ``uncounted``.
    """
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path), load_external_data=False)
    first_input = model.graph.input[0]
    batch_dim = first_input.type.tensor_type.shape.dim[0]
    batch_dim.Clear()
    batch_dim.dim_value = 1
    # The weights are not needed for shapes; external data stays on disk.
    inferred = shape_inference.infer_shapes(model, data_prop=True)
    shapes = _collect_shapes(inferred)
    nodes = _all_nodes(inferred.graph)
    missing = [node for node in nodes if _node_flops(node, shapes) is None]
    if missing:
        # Static inference loses shapes behind Shape/Reshape chains of the dynamic batch axis
        # (the attention products of torch's exporter), so one real batch-1 run supplies them.
        shapes.update(_run_shapes(path, inferred, missing))
    total = 0.0
    by_op: dict[str, float] = {}
    uncounted: list[str] = []
    for node in nodes:
        flops = _node_flops(node, shapes)
        if flops is None:
            uncounted.append(f"{node.op_type}:{node.name}")
            continue
        if flops:
            by_op[node.op_type] = by_op.get(node.op_type, 0.0) + flops
            total += flops
    if uncounted:
        _logger.warning("%s: %d heavy nodes with unknown shapes", path, len(uncounted))
    return FlopCount(flops=total, by_op=by_op, uncounted=uncounted)


def _run_shapes(path: Path, inferred: Any, nodes: list[Any]) -> dict[str, list[int | None]]:
    """Return the runtime shapes of the inputs and outputs of ``nodes`` on one batch-1 input."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    elem_types = {
        value.name: value.type.tensor_type.elem_type
        for value in [*inferred.graph.value_info, *inferred.graph.input]
    }
    full = onnx.load(str(path))
    batch_dim = full.graph.input[0].type.tensor_type.shape.dim[0]
    batch_dim.Clear()
    batch_dim.dim_value = 1
    existing = {output.name for output in full.graph.output}
    names = []
    for node in nodes:
        for name in [*node.input[:2], node.output[0]]:
            if name and name not in existing and name not in names:
                names.append(name)
    for name in names:
        elem_type = elem_types.get(name) or TensorProto.FLOAT
        full.graph.output.append(helper.make_tensor_value_info(name, elem_type, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        full.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    first = session.get_inputs()[0]
    size = [1, *[dim if isinstance(dim, int) else 1 for dim in first.shape[1:]]]
    feeds = {first.name: np.zeros(size, dtype=np.float32)}
    wanted = [name for name in names if name in {o.name for o in session.get_outputs()}]
    values = session.run(wanted, feeds)
    return {name: list(value.shape) for name, value in zip(wanted, values, strict=True)}


def _all_nodes(graph: Any) -> list[Any]:
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attribute in node.attribute:
            if attribute.g is not None and attribute.g.node:
                nodes.extend(_all_nodes(attribute.g))
    return nodes


def count_torch_flops(module: Any, pixels: Any) -> float:
    """Count FLOPs of ``module(pixels)`` with torch's FlopCounterMode, divided by the batch.

    Gradients stay enabled: under ``no_grad`` an eval-mode ``nn.MultiheadAttention`` takes its
    fused fast path, whose projections FlopCounterMode does not count.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        module(pixels)
    return float(counter.get_total_flops()) / pixels.shape[0]
