"""(a) The image encoder alone on ONNX Runtime, fed with pre-made view batches."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from .measure import Measurement, measure_rate

_logger = logging.getLogger(__name__)


def measure_encoder(
    model_dir: Path,
    views: np.ndarray,
    *,
    precision: str,
    batch_size: int,
    threads: int,
    grid_size: int,
    repeats: int,
) -> Measurement:
    """Measure views and images per second of ``ClipModel.encode_images`` over ``views``.

    Args:
        model_dir: A CLIP folder of the model repository.
        views: float32 (N, 3, S, S) pre-made views; cut into batches of ``batch_size``.
        precision: Image graph to load: "fp32" or "int8".
        batch_size: Views per encoder call.
        threads: ONNX Runtime intra-op threads.
        grid_size: Tiles per side, to convert views into images (1 + grid_size**2 views each).
        repeats: Timed repeats over ``views``.

    Returns:
        The rate in images per second; ``extra["views_per_s"]`` contains the views per second.
    """
    from cdul_server.model_repository import SessionConfig, load_model

    model = load_model(
        model_dir,
        SessionConfig(intra_op_threads=threads, inter_op_threads=1, precision=precision),
    )
    batches = [views[i : i + batch_size] for i in range(0, len(views), batch_size)]
    views_per_image = 1 + grid_size**2

    def run_once() -> tuple[float, float]:
        start = time.perf_counter()
        for batch in batches:
            model.encode_images(batch)  # type: ignore[union-attr]
        return len(views) / views_per_image, time.perf_counter() - start

    result = measure_rate(
        "a",
        f"{model_dir.name} {precision} encoder, batch {batch_size}",
        run_once,
        repeats=repeats,
        params={
            "model": model_dir.name,
            "precision": precision,
            "batch size": batch_size,
            "threads": threads,
            "image size": f"{views.shape[2]}x{views.shape[3]}",
            "grid": f"{grid_size}x{grid_size}",
            "views per repeat": len(views),
        },
    )
    result.extra["views_per_s"] = [value * views_per_image for value in result.values]
    return result


def profile_encoder_ops(
    model_dir: Path, views: np.ndarray, *, precision: str, batch_size: int, threads: int
) -> dict[str, float]:
    """Return each operator type's share (0-1) of the encoder's time, from ORT's profiler."""
    import onnxruntime as ort

    config = json.loads((model_dir / "config.json").read_text())
    key = "image" if precision == "fp32" else f"image_{precision}"
    graph = model_dir / config["files"][key]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory() as folder:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "ort")
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        batch = views[:batch_size]
        for _ in range(3):
            session.run(None, {name: batch})
        profile_path = session.end_profiling()
        events = json.loads(Path(profile_path).read_text())
    totals: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            totals[event.get("args", {}).get("op_name", "?")] += float(event.get("dur", 0))
    overall = sum(totals.values()) or 1.0
    return dict(sorted(((op, t / overall) for op, t in totals.items()), key=lambda kv: -kv[1]))
