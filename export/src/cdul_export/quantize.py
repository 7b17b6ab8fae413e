"""int8 variant of a graph: ONNX Runtime dynamic quantization of the weights."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx

_logger = logging.getLogger(__name__)


def inline_identity_initializers(model: onnx.ModelProto) -> int:
    """Replace ``Identity`` nodes on initializers by the initializers themselves.

    The TorchScript exporter stores identical weights once and feeds the other users through
    ``Identity`` nodes (random-init ResNets have many identical folded weights). The quantizer
    needs every Conv and MatMul weight to be an initializer, so such nodes are removed.

    Returns:
        How many nodes were removed.
    """
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    outputs = {out.name for out in graph.output}
    aliases = {
        node.output[0]: node.input[0]
        for node in graph.node
        if node.op_type == "Identity"
        and node.input[0] in initializers
        and node.output[0] not in outputs
    }
    if not aliases:
        return 0
    kept = [
        node
        for node in graph.node
        if not (node.op_type == "Identity" and node.output[0] in aliases)
    ]
    for node in kept:
        for index, name in enumerate(node.input):
            if name in aliases:
                node.input[index] = aliases[name]
    del graph.node[:]
    graph.node.extend(kept)
    return len(aliases)


# Operators whose weights are quantized by default. ONNX Runtime's CPU kernel for the int8
# convolution (ConvInteger) is slower than its fp32 Conv. With convolutions quantized, the
# digits-clip image encoder ran 3.7 times slower than in fp32 (one thread, 350 views a batch).
# Quantizing only the matrix products made it 1.15 times faster. ViT towers and the attention
# pool of ResNet towers spend their time in matrix products.
DEFAULT_OP_TYPES = ("MatMul", "Gemm")


def quantize_int8(source: Path, target: Path, op_types: Sequence[str] = DEFAULT_OP_TYPES) -> None:
    """Write ``target``: ``source`` with int8 weights and dynamically quantized activations.

    Uses ``onnxruntime.quantization.quantize_dynamic`` with signed int8 weights, which runs on
    ONNX Runtime's CPU provider without calibration data. Only nodes of ``op_types`` are
    quantized (see ``DEFAULT_OP_TYPES``); the rest stay fp32.

    Raises:
        RuntimeError: Quantization failed.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(source))
    removed = inline_identity_initializers(model)
    try:
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            prepared = source
            if removed:
                _logger.info("inlined %d Identity nodes on weights before quantizing", removed)
                prepared = Path(scratch) / source.name
                onnx.save(model, str(prepared))
            quantize_dynamic(
                str(prepared),
                str(target),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=list(op_types),
            )
    except Exception as err:  # onnxruntime.quantization raises assorted types
        raise RuntimeError(f"int8 quantization of {source} failed: {err}") from err
    _logger.info(
        "quantized %s to %s (%.1f MB -> %.1f MB)",
        source.name,
        target.name,
        source.stat().st_size / 1e6,
        target.stat().st_size / 1e6,
    )
