"""Unit checks of the benchmark helpers: FLOP counting, percentiles, profiles, verdicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from cdul_bench.flops import count_onnx_flops
from cdul_bench.measure import measure_rate, percentile
from cdul_bench.report import _verdict
from cdul_bench.server_bench import summarize_collapsed
from onnx import TensorProto, helper, numpy_helper


def _small_graph(path: Path) -> None:
    """Conv 3->4 (3x3, pad 1) on 8x8, Flatten, Gemm 256->10, MatMul 10->5."""
    rng = np.random.default_rng(0)
    weights = {
        "conv_w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "gemm_w": rng.standard_normal((256, 10)).astype(np.float32),
        "matmul_w": rng.standard_normal((10, 5)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["pixels", "conv_w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["conv"], ["flat"]),
        helper.make_node("Gemm", ["flat", "gemm_w"], ["gemm"]),
        helper.make_node("MatMul", ["gemm", "matmul_w"], ["embeddings"]),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", 5])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def test_flops_of_small_graph(tmp_path: Path) -> None:
    path = tmp_path / "small.onnx"
    _small_graph(path)
    counted = count_onnx_flops(path)
    assert counted.by_op["Conv"] == 2 * (4 * 8 * 8) * (3 * 3 * 3)
    assert counted.by_op["Gemm"] == 2 * 10 * 256
    assert counted.by_op["MatMul"] == 2 * 5 * 10
    assert counted.flops == sum(counted.by_op.values())
    assert counted.uncounted == []


def test_percentile_interpolates() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile([7.0], 99) == 7.0


def test_percentile_of_nothing_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)


def test_measure_rate_median_and_spread() -> None:
    seconds = iter([0.5, 1.0, 0.25, 2.0])  # the first is the warm-up run
    measurement = measure_rate("a", "x", lambda: (10.0, next(seconds)), repeats=3)
    assert measurement.values == [10.0, 40.0, 5.0]
    assert measurement.median == 10.0
    assert (measurement.low, measurement.high) == (5.0, 40.0)


def test_measure_rate_rejects_zero_repeats() -> None:
    with pytest.raises(ValueError, match="repeats"):
        measure_rate("a", "x", lambda: (1.0, 1.0), repeats=0)


def test_collapsed_profile_summary(tmp_path: Path) -> None:
    path = tmp_path / "raw.txt"
    path.write_text(
        "run (threading.py:1);_encode_batch (cdul_server/batcher.py:250);run (ort/session.py:9) 6\n"
        "run (threading.py:1);decode_image (cdul_server/decode.py:62);resize (PIL/Image.py:5) 3\n"
        "run (threading.py:1);send (grpc/_server.py:3) 1\n"
        "run (threading.py:1);_worker (concurrent/futures/thread.py:81) 5\n"
    )
    summary = summarize_collapsed(path)
    assert summary["samples"] == 10
    assert summary["idle"] == 5
    assert summary["own"][0] == ("run (ort/session.py:9)", 0.6)
    server = dict(summary["server"])
    assert server["_encode_batch (batcher.py)"] == 0.6
    assert server["decode_image (decode.py)"] == 0.3


def test_verdict_met_and_missed() -> None:
    assert _verdict(0.95, 0.9) == "met"
    assert _verdict(0.45, 0.9).startswith("missed by 50%")
    assert _verdict(0.2, 0.5, higher_is_better=False) == "met"
    assert _verdict(0.8, 0.5, higher_is_better=False) == "missed by 0.30"
    assert _verdict(None, 0.5) == "not measured"
