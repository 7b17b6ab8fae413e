"""Compare training runs: their curves on one figure and a table of their final figures."""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdul_training.fit import METRICS_FILE, SETTINGS_FILE
from cdul_training.plots import plot_runs

_logger = logging.getLogger(__name__)

# Settings shown in the table next to the results, in this order.
SETTING_COLUMNS = ("arch", "loss", "epochs", "warmup", "update_every", "label_lr", "sigma")


@dataclass
class RunSummary:
    """The final figures of one run folder."""

    name: str
    settings: dict[str, Any]
    history: list[dict[str, Any]]

    def _last(self, key: str) -> float | None:
        for entry in reversed(self.history):
            value = entry.get(key)
            if isinstance(value, int | float) and not math.isnan(value):
                return float(value)
        return None

    def _first(self, key: str) -> float | None:
        for entry in self.history:
            value = entry.get(key)
            if isinstance(value, int | float) and not math.isnan(value):
                return float(value)
        return None

    def figures(self) -> dict[str, float | int | None]:
        """Return the final figures: last epoch, loss, mAPs, best val mAP and its epoch."""
        val = [(e["epoch"], e["val_map"]) for e in self.history if e.get("val_map") is not None]
        best_epoch, best_val = max(val, key=lambda item: item[1]) if val else (None, None)
        return {
            "epoch": int(self.history[-1]["epoch"]) if self.history else None,
            "train_loss": self._last("train_loss"),
            "val_map": self._last("val_map"),
            "best_val_map": best_val,
            "best_epoch": best_epoch,
            "pseudo_label_map_initial": self._first("pseudo_label_map"),
            "pseudo_label_map": self._last("pseudo_label_map"),
        }


def read_run(run_dir: Path) -> RunSummary:
    """Read the settings and metrics of a run folder.

    Raises:
        ValueError: the folder has no metrics.jsonl.
    """
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        raise ValueError(f"{run_dir}: no {METRICS_FILE}; pass run folders of `cdul-train fit`")
    history = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    settings_path = run_dir / SETTINGS_FILE
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    return RunSummary(run_dir.name or str(run_dir), settings, history)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def format_table(runs: Sequence[RunSummary]) -> str:
    """Return a Markdown table with one row a run: settings, then final figures."""
    figure_columns = list(runs[0].figures()) if runs else []
    header = ["run", *SETTING_COLUMNS, *figure_columns]
    rows = [header, ["---"] * len(header)]
    for run in runs:
        figures = run.figures()
        row = [run.name]
        row += [_cell(run.settings.get(name)) for name in SETTING_COLUMNS]
        row += [_cell(figures[name]) for name in figure_columns]
        rows.append(row)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `cdul-train compare`."""
    parser.add_argument("runs", nargs="+", metavar="RUNDIR", help="run folders of cdul-train fit")
    parser.add_argument(
        "--out",
        default="compare.png",
        help="PNG file for the curves of all runs (default compare.png in the current folder)",
    )
    parser.add_argument(
        "--names",
        nargs="+",
        help="legend and table names of the runs, in order (default: the folder names)",
    )


def run(args: argparse.Namespace) -> int:
    """Run `cdul-train compare`: print the table, write the figure."""
    from cdul_training.cli import UsageError

    if args.names and len(args.names) != len(args.runs):
        raise UsageError(f"--names has {len(args.names)} names for {len(args.runs)} runs")
    try:
        runs = [read_run(Path(path)) for path in args.runs]
    except ValueError as err:
        raise UsageError(str(err)) from err
    if args.names:
        for summary, name in zip(runs, args.names, strict=True):
            summary.name = name
    if len({r.name for r in runs}) != len(runs):
        raise UsageError("two runs share a folder name: give them distinct --names")
    out = plot_runs({r.name: r.history for r in runs}, Path(args.out))
    print(format_table(runs))
    print(f"figure: {out}")
    return 0
