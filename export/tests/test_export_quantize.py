"""int8 quantization of exported graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from cdul_export.quantize import inline_identity_initializers, quantize_int8


def _shared_weight_graph() -> onnx.ModelProto:
    weight = np.random.RandomState(0).randn(256, 128).astype(np.float32)
    nodes = [
        helper.make_node("Identity", ["w"], ["w_alias"]),
        helper.make_node("MatMul", ["x", "w"], ["a"]),
        helper.make_node("MatMul", ["x", "w_alias"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 128])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_identity_on_weight_inlined() -> None:
    model = _shared_weight_graph()
    assert inline_identity_initializers(model) == 1
    assert [node.op_type for node in model.graph.node] == ["MatMul", "MatMul", "Add"]
    assert model.graph.node[1].input[1] == "w"
    onnx.checker.check_model(model)


def test_quantized_graph_close_to_fp32(tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    target = tmp_path / "model.int8.onnx"
    onnx.save(_shared_weight_graph(), str(source))
    quantize_int8(source, target)
    x = np.random.RandomState(1).randn(5, 256).astype(np.float32)
    full = ort.InferenceSession(str(source)).run(None, {"x": x})[0]
    quantized = ort.InferenceSession(str(target)).run(None, {"x": x})[0]
    assert target.stat().st_size < source.stat().st_size
    cosines = np.sum(full * quantized, axis=1) / (
        np.linalg.norm(full, axis=1) * np.linalg.norm(quantized, axis=1)
    )
    assert cosines.min() > 0.99
    assert sorted(tmp_path.iterdir()) == sorted([source, target])


def _conv_and_matmul_graph() -> onnx.ModelProto:
    rng = np.random.RandomState(2)
    nodes = [
        helper.make_node("Conv", ["x", "k"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("MatMul", ["f", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        [
            numpy_helper.from_array(rng.randn(4, 3, 3, 3).astype(np.float32), "k"),
            numpy_helper.from_array(rng.randn(256, 16).astype(np.float32), "w"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_default_quantizes_matrix_products_only(tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    onnx.save(_conv_and_matmul_graph(), str(source))
    quantize_int8(source, tmp_path / "default.onnx")
    default_ops = {node.op_type for node in onnx.load(str(tmp_path / "default.onnx")).graph.node}
    assert "Conv" in default_ops
    assert "ConvInteger" not in default_ops
    assert "MatMulInteger" in default_ops
    quantize_int8(source, tmp_path / "all.onnx", op_types=("Conv", "MatMul"))
    all_ops = {node.op_type for node in onnx.load(str(tmp_path / "all.onnx")).graph.node}
    assert "ConvInteger" in all_ops
    assert "Conv" not in all_ops
