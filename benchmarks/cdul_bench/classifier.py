"""(e) A classifier of ``cdul-train fit`` (random init) in PyTorch eager mode and in ONNX.

The eager model is built by ``cdul_training.classifiers.build_classifier``, saved as a training
checkpoint and exported with ``cdul-export classifier``, so the ONNX side is the real export
and the folder it writes serves ``Predict``.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .measure import Measurement, measure_rate

_logger = logging.getLogger(__name__)

EXPORT_TIMEOUT_S = 900


def build_classifier(arch: str, num_classes: int) -> Any:
    """Return a classifier of ``cdul-train fit`` with random weights, in eval mode."""
    import torch

    from cdul_training.classifiers import build_classifier as build

    torch.manual_seed(0)
    return build(arch, num_classes, "none").eval()


def export_classifier(
    module: Any,
    out_dir: Path,
    class_names: Sequence[str],
    *,
    arch: str,
    size: int,
    threads: int,
    reuse: bool = False,
) -> str:
    """Save ``module`` as a training checkpoint and export it with ``cdul-export classifier``.

    Args:
        module: The eager classifier.
        out_dir: Classifier folder to write.
        class_names: Its class names.
        arch: Architecture name stored in the checkpoint.
        size: Input side in pixels.
        threads: torch threads of the export.
        reuse: Keep an existing ``out_dir`` and only return the command that wrote it.

    Returns:
        The export command line.

    Raises:
        RuntimeError: The export failed.
    """
    import torch

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir.parent / f"{out_dir.name}.pt"
    torch.save(
        {
            "arch": arch,
            "class_names": list(class_names),
            "image_size": size,
            "model": module.state_dict(),
        },
        checkpoint,
    )
    script = Path(sys.executable).with_name("cdul-export")
    base = [str(script)] if script.is_file() else [sys.executable, "-m", "cdul_export.cli"]
    command = [
        *base,
        "classifier",
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out_dir),
        "--threads",
        str(threads),
    ]
    if reuse and (out_dir / "config.json").is_file():
        return " ".join(command[1:])
    done = subprocess.run(command, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(
            f"cdul-export classifier exited {done.returncode}: {done.stderr[-1500:]}"
        )
    return " ".join(command[1:])


def measure_classifier(
    module: Any,
    model_dir: Path,
    pixels: np.ndarray,
    *,
    arch: str,
    batch_size: int,
    threads: int,
    repeats: int,
) -> list[Measurement]:
    """Measure images per second of PyTorch eager and of ONNX Runtime on the same pixels.

    Args:
        module: The eager model.
        model_dir: Its exported classifier folder.
        pixels: float32 (N, 3, S, S) inputs, shared by both runtimes.
        arch: Architecture name for the results page.
        batch_size: Images per forward pass.
        threads: torch and ONNX Runtime intra-op threads.
        repeats: Timed repeats over ``pixels``.

    Returns:
        The eager measurement, then the ONNX Runtime one, whose ``extra`` contains the largest
        absolute logit difference between the two.
    """
    import torch

    from cdul_server.model_repository import SessionConfig, load_model

    batches = [pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size)]
    params = {
        "model": f"{arch} (random init)",
        "image size": f"{pixels.shape[2]}x{pixels.shape[3]}",
        "batch size": batch_size,
        "precision": "fp32",
        "threads": threads,
        "images per repeat": len(pixels),
    }
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tensors = [torch.from_numpy(batch) for batch in batches]

        def run_eager() -> tuple[float, float]:
            start = time.perf_counter()
            with torch.no_grad():
                for tensor in tensors:
                    module(tensor)
            return len(pixels), time.perf_counter() - start

        eager = measure_rate(
            "e",
            f"{arch} PyTorch eager",
            run_eager,
            repeats=repeats,
            params={**params, "runtime": f"torch {torch.__version__} eager, no_grad"},
        )
        with torch.no_grad():
            eager_logits = module(tensors[0]).numpy()
    finally:
        torch.set_num_threads(previous_threads)

    model = load_model(model_dir, SessionConfig(intra_op_threads=threads, inter_op_threads=1))

    def run_onnx() -> tuple[float, float]:
        start = time.perf_counter()
        for batch in batches:
            model.predict_logits(batch)  # type: ignore[union-attr]
        return len(pixels), time.perf_counter() - start

    import onnxruntime

    onnx_result = measure_rate(
        "e",
        f"{arch} ONNX Runtime",
        run_onnx,
        repeats=repeats,
        params={**params, "runtime": f"onnxruntime {onnxruntime.__version__} CPU, via load_model"},
    )
    onnx_logits = model.predict_logits(batches[0])  # type: ignore[union-attr]
    onnx_result.extra["max_abs_logit_diff"] = float(np.max(np.abs(onnx_logits - eager_logits)))
    return [eager, onnx_result]
