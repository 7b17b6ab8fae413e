"""PNG plots of training runs: loss and mAP per epoch (matplotlib, Agg backend)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

_logger = logging.getLogger(__name__)

# metrics.jsonl keys drawn on the mAP plot, with their legend labels.
MAP_SERIES = {"val_map": "val mAP", "pseudo_label_map": "pseudo-label mAP (train)"}


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    epochs, values = [], []
    for entry in history:
        value = entry.get(key)
        if isinstance(value, int | float) and not math.isnan(value):
            epochs.append(int(entry["epoch"]))
            values.append(float(value))
    return epochs, values


def plot_run(history: Sequence[Mapping[str, Any]], out_dir: Path) -> list[Path]:
    """Write `loss.png` and, when any mAP was measured, `map.png` into `out_dir`.

    Returns:
        the paths written.
    """
    written = []
    figure, axes = plt.subplots(figsize=(6, 4))
    epochs, values = _series(history, "train_loss")
    axes.plot(epochs, values, marker="o")
    axes.set_xlabel("epoch")
    axes.set_ylabel("training loss (mean)")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(out_dir / "loss.png", dpi=100)
    plt.close(figure)
    written.append(out_dir / "loss.png")

    figure, axes = plt.subplots(figsize=(6, 4))
    drawn = False
    for key, label in MAP_SERIES.items():
        epochs, values = _series(history, key)
        if epochs:
            axes.plot(epochs, values, marker="o", label=label)
            drawn = True
    if drawn:
        axes.set_xlabel("epoch")
        axes.set_ylabel("mAP (%)")
        axes.grid(True, alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(out_dir / "map.png", dpi=100)
        written.append(out_dir / "map.png")
    plt.close(figure)
    return written


def plot_runs(runs: Mapping[str, Sequence[Mapping[str, Any]]], out: Path) -> Path:
    """Draw the loss and mAP curves of several runs on one figure (two panels) at `out`."""
    figure, (loss_axes, map_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, history in runs.items():
        epochs, values = _series(history, "train_loss")
        loss_axes.plot(epochs, values, marker=".", label=name)
        for key, label in MAP_SERIES.items():
            epochs, values = _series(history, key)
            if epochs:
                style = "-" if key == "val_map" else "--"
                map_axes.plot(epochs, values, style, marker=".", label=f"{name}: {label}")
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("training loss (mean)")
    loss_axes.grid(True, alpha=0.3)
    loss_axes.legend(fontsize="small")
    map_axes.set_xlabel("epoch")
    map_axes.set_ylabel("mAP (%)")
    map_axes.grid(True, alpha=0.3)
    if map_axes.lines:
        map_axes.legend(fontsize="small")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
