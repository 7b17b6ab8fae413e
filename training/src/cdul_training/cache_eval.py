"""Pseudo-label mAP of a score cache: global scores, aggregate and final pseudo labels.

The cache is a `.npz` file of (N, C) arrays: `global_scores` (the whole-image scores),
`alpha` and `beta` (per class, the maximum and minimum over the tile scores) and `labels`
(0 or 1). Optional arrays are `classes` (C names) and `ids` (N image ids). mAP is the mean of
the non-interpolated AP, in percent, over the classes with a positive.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cdul_server.scoring import (
    aggregate_from_extremes,
    final_pseudo_labels,
    rescale_extremes_temperature,
    rescale_temperature,
)
from cdul_training.cli import UsageError
from cdul_training.metrics import MapResult, mean_average_precision

_logger = logging.getLogger(__name__)

DEFAULT_THRESHOLDS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_LAMBDAS = (0.0, 0.5, 1.0)
SCORE_ARRAYS = ("global_scores", "alpha", "beta")
REQUIRED_ARRAYS = (*SCORE_ARRAYS, "labels")


@dataclass(frozen=True)
class ScoreCache:
    """The validated arrays of a score cache, scores as float64."""

    global_scores: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    labels: np.ndarray
    classes: list[str]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `cdul-train evaluate-cache`."""
    parser.add_argument(
        "--cache",
        type=Path,
        required=True,
        metavar="FILE",
        help="the .npz score cache with global_scores, alpha, beta and labels (required)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object instead of tables (default: tables)",
    )
    parser.add_argument(
        "--per-class",
        action="store_true",
        help=(
            "also print the AP of each class in percent: in the JSON for every threshold and "
            "lambda, in the tables at the first threshold with lambda 0 (default: off)"
        ),
    )
    parser.add_argument(
        "--temperature-factor",
        type=float,
        default=1.0,
        metavar="K",
        help=(
            "rescale every score row to K times its temperature with softmax(K * log(scores)) "
            "before aggregating; 1 keeps the cached scores (default 1)"
        ),
    )
    parser.add_argument(
        "--tile-normalizer",
        choices=("alpha", "beta"),
        default="alpha",
        help=(
            "with --temperature-factor, the row whose rescaled sum divides alpha and beta: the "
            "cache lacks the tile rows, so 'alpha' gives lower and 'beta' upper bounds of the "
            "rescaled tile scores; the global scores are rescaled exactly (default alpha)"
        ),
    )
    parser.add_argument(
        "--thresholds",
        default=",".join(_format_key(t) for t in DEFAULT_THRESHOLDS),
        metavar="LIST",
        help="comma-separated aggregation thresholds, scores from 0 to 1 (default %(default)s)",
    )
    parser.add_argument(
        "--lambdas",
        default=",".join(_format_key(w) for w in DEFAULT_LAMBDAS),
        metavar="LIST",
        help=(
            "comma-separated lambda weights of the final pseudo label, from 0 to 1, evaluated "
            "at threshold 0 (default %(default)s)"
        ),
    )


def run(args: argparse.Namespace) -> int:
    """Evaluate the cache, print the report and return the exit status 0."""
    thresholds = _parse_list(args.thresholds, "--thresholds")
    lambdas = _parse_list(args.lambdas, "--lambdas")
    factor = args.temperature_factor
    if not (math.isfinite(factor) and factor > 0):
        raise UsageError(f"--temperature-factor must be a finite positive number, got {factor}")

    cache = load_cache(args.cache)
    if factor != 1.0:
        cache = _rescale(cache, factor, args.tile_normalizer)
    report = evaluate(cache, thresholds, lambdas, per_class=args.per_class)
    if report["skipped_classes"]:
        _logger.warning(
            "classes without positive, left out of every mAP: %s",
            ", ".join(report["skipped_classes"]),
        )
    report["temperature_factor"] = factor
    report["tile_normalizer"] = args.tile_normalizer if factor != 1.0 else None
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report, cache.classes, args.cache))
    return 0


def load_cache(path: Path) -> ScoreCache:
    """Read and validate a score cache.

    Raises:
        UsageError: when the file cannot be read, an array is missing, shapes differ, a score
            is not finite, beta exceeds alpha, a label is not 0 or 1, or no label is positive.
    """
    arrays = _read_npz(path)

    missing = [name for name in REQUIRED_ARRAYS if name not in arrays]
    if missing:
        raise UsageError(
            f"cache file {path} is missing the array(s) {', '.join(missing)}; it has "
            f"{', '.join(sorted(arrays)) or 'no arrays'}"
        )

    scores = {name: _check_scores(arrays[name], name, path) for name in SCORE_ARRAYS}
    shape = scores["global_scores"].shape
    for name in (*SCORE_ARRAYS[1:], "labels"):
        if arrays[name].shape != shape:
            raise UsageError(
                f"array {name} in {path} has shape {arrays[name].shape} but global_scores has "
                f"{shape}: every array must be (images, classes)"
            )
    if shape[0] == 0 or shape[1] == 0:
        raise UsageError(f"array global_scores in {path} is empty (shape {shape})")

    inverted = scores["beta"] > scores["alpha"]
    if inverted.any():
        raise UsageError(
            f"array beta in {path} is above alpha for {int(inverted.sum())} (image, class) "
            "pairs: alpha must be the per-class maximum and beta the minimum over the tiles"
        )
    labels = _check_labels(arrays["labels"], path)
    classes = _read_classes(arrays.get("classes"), shape[1], path)
    if "ids" in arrays and arrays["ids"].shape != (shape[0],):
        raise UsageError(
            f"array ids in {path} has shape {arrays['ids'].shape}, expected ({shape[0]},)"
        )
    return ScoreCache(
        global_scores=scores["global_scores"],
        alpha=scores["alpha"],
        beta=scores["beta"],
        labels=labels,
        classes=classes,
    )


def evaluate(
    cache: ScoreCache,
    thresholds: list[float],
    lambdas: list[float],
    per_class: bool = False,
) -> dict[str, Any]:
    """Compute the mAP of the global scores, the aggregate and the final pseudo labels.

    Returns:
        The report: `n_images`, `global`, `aggregate` and `final` (keyed by threshold, final
        with lambda 0), `final_lambda` (keyed by lambda, at threshold 0), `alpha_fraction` (the
        fraction of (image, class) pairs whose alpha reaches each threshold, so gamma = 1 and
        the aggregate takes alpha), `skipped_classes` (names of classes without positive, left
        out of every mean), and with `per_class` the per-class APs under `per_class`.
    """
    global_map = mean_average_precision(cache.global_scores, cache.labels)
    results: dict[str, dict[str, MapResult]] = {"aggregate": {}, "final": {}, "final_lambda": {}}
    alpha_fraction: dict[str, float] = {}
    for threshold in thresholds:
        key = _format_key(threshold)
        aggregation = aggregate_from_extremes(cache.alpha, cache.beta, threshold)
        alpha_fraction[key] = float(aggregation.gamma.mean())
        results["aggregate"][key] = mean_average_precision(aggregation.aggregate, cache.labels)
        final = final_pseudo_labels(cache.global_scores, aggregation.aggregate, 0.0)
        results["final"][key] = mean_average_precision(final, cache.labels)

    at_zero = aggregate_from_extremes(cache.alpha, cache.beta, 0.0).aggregate
    for weight in lambdas:
        final = final_pseudo_labels(cache.global_scores, at_zero, weight)
        results["final_lambda"][_format_key(weight)] = mean_average_precision(final, cache.labels)

    report: dict[str, Any] = {
        "n_images": int(cache.labels.shape[0]),
        "global": global_map.map,
        **{name: {key: r.map for key, r in table.items()} for name, table in results.items()},
        "alpha_fraction": alpha_fraction,
        "skipped_classes": [cache.classes[i] for i in global_map.skipped],
    }
    if per_class:
        report["per_class"] = {
            "global": _per_class(global_map, cache.classes),
            **{
                name: {key: _per_class(r, cache.classes) for key, r in table.items()}
                for name, table in results.items()
            },
        }
    return report


def format_report(report: dict[str, Any], classes: list[str], path: Path) -> str:
    """Lay the report out as plain-text tables, mAP and AP in percent."""
    lines = [
        f"cache {path}: {report['n_images']} images, {len(classes)} classes, "
        f"temperature factor {report['temperature_factor']:g}",
    ]
    if report["tile_normalizer"] is not None:
        lines.append(
            f"alpha and beta rescaled with the {report['tile_normalizer']} normalizer: "
            + ("lower" if report["tile_normalizer"] == "alpha" else "upper")
            + " bounds of the exact rescaled tile scores"
        )
    if report["skipped_classes"]:
        lines.append(
            "classes without positive, left out of every mAP: "
            + ", ".join(report["skipped_classes"])
        )
    lines += [
        f"global scores mAP: {report['global']:.2f}",
        "",
        "threshold  alpha fraction  aggregate mAP  final mAP (lambda 0)",
    ]
    for key in report["aggregate"]:
        lines.append(
            f"{key:<9}  {report['alpha_fraction'][key]:>14.3f}  "
            f"{report['aggregate'][key]:>13.2f}  {report['final'][key]:>20.2f}"
        )
    lines += ["", "lambda  final mAP (threshold 0)"]
    for key, value in report["final_lambda"].items():
        lines.append(f"{key:<6}  {value:>24.2f}")
    lines += [
        "",
        "alpha fraction: share of (image, class) pairs with alpha >= threshold (gamma = 1); "
        "the others take beta.",
    ]

    if "per_class" in report:
        per_class = report["per_class"]
        threshold_key = next(iter(report["aggregate"]))
        width = max(len(name) for name in classes)
        lines += [
            "",
            f"per-class AP at threshold {threshold_key}, lambda 0",
            f"{'class':<{width}}  global  aggregate   final",
        ]
        for name in classes:
            lines.append(
                f"{name:<{width}}  {per_class['global'][name]:>6.2f}  "
                f"{per_class['aggregate'][threshold_key][name]:>9.2f}  "
                f"{per_class['final'][threshold_key][name]:>6.2f}"
            )
    return "\n".join(lines)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError as err:
        raise UsageError(f"cache file {path} not found: pass an existing .npz file") from err
    except (OSError, ValueError, EOFError) as err:
        # numpy's message for a file that is not an array archive suggests allow_pickle=True,
        # which would run code from the file; this message names the expected format instead.
        raise UsageError(
            f"cannot read cache file {path}: it is not a NumPy .npz archive of arrays "
            "(write one with numpy.savez)"
        ) from err
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise UsageError(
            f"cache file {path} is a single .npy array, expected an .npz archive of arrays"
        )
    try:
        with loaded:
            return {name: loaded[name] for name in loaded.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise UsageError(f"cannot read the arrays of cache file {path}: {err}") from err


def _check_scores(values: np.ndarray, name: str, path: Path) -> np.ndarray:
    if values.ndim != 2:
        raise UsageError(
            f"array {name} in {path} has shape {values.shape}: expected (images, classes)"
        )
    if not np.issubdtype(values.dtype, np.number) or np.iscomplexobj(values):
        raise UsageError(f"array {name} in {path} has dtype {values.dtype}: expected floats")
    scores = values.astype(np.float64)
    bad = ~np.isfinite(scores)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise UsageError(
            f"array {name} in {path} has {int(bad.sum())} NaN or infinite values (first in "
            f"row {int(rows[0])}): recompute or drop those images"
        )
    return scores


def _check_labels(values: np.ndarray, path: Path) -> np.ndarray:
    if not (np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_):
        raise UsageError(f"array labels in {path} has dtype {values.dtype}: expected 0/1 integers")
    binary = (values == 0) | (values == 1)
    if not binary.all():
        raise UsageError(
            f"array labels in {path} has {int((~binary).sum())} values other than 0 and 1 "
            f"(such as {values[~binary][0]!r}): binarize the ground truth"
        )
    if not values.any():
        raise UsageError(
            f"array labels in {path} has no positive: mAP needs at least one positive label"
        )
    return values.astype(np.uint8)


def _read_classes(values: np.ndarray | None, n_classes: int, path: Path) -> list[str]:
    if values is None:
        return [f"class_{i}" for i in range(n_classes)]
    if values.shape != (n_classes,):
        raise UsageError(
            f"array classes in {path} has shape {values.shape}, expected ({n_classes},), one "
            "name per score column"
        )
    names = [str(name) for name in values]
    if len(set(names)) != len(names):
        raise UsageError(f"array classes in {path} has duplicate names: {names}")
    return names


def _rescale(cache: ScoreCache, factor: float, normalizer: str) -> ScoreCache:
    """Rescale the cached scores to `factor` times their temperature.

    The global rows are rescaled exactly. The cache keeps only alpha and beta, not the tile
    rows, so those are bounds: see `rescale_extremes_temperature`.
    """
    try:
        global_scores = rescale_temperature(cache.global_scores, factor)
        alpha, beta = rescale_extremes_temperature(cache.alpha, cache.beta, factor, normalizer)
    except ValueError as err:
        raise UsageError(
            f"cannot rescale the scores by --temperature-factor {factor:g}: {err}"
        ) from err
    _logger.info(
        "rescaled the scores by temperature factor %g, alpha and beta divided by the %s row sum",
        factor,
        normalizer,
    )
    return ScoreCache(
        global_scores=global_scores,
        alpha=alpha,
        beta=beta,
        labels=cache.labels,
        classes=cache.classes,
    )


def _parse_list(text: str, option: str) -> list[float]:
    values: list[float] = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise UsageError(
                f"{option} must be comma-separated numbers, got {item.strip()!r} in {text!r}"
            ) from None
        if not 0.0 <= value <= 1.0:
            raise UsageError(f"{option} values must be from 0 to 1, got {value:g}")
        values.append(value)
    keys = [_format_key(value) for value in values]
    if len(set(keys)) != len(keys):
        raise UsageError(f"{option} has a repeated value: {text!r}")
    return values


def _format_key(value: float) -> str:
    """Format a threshold or lambda as its JSON key: 0, 0.05, 0.1, 1."""
    return format(value, "g")


def _per_class(result: MapResult, classes: list[str]) -> dict[str, float | None]:
    """Map class names to AP in percent; None (JSON null) for a class without positive."""
    return {
        name: None if math.isnan(value) else float(value)
        for name, value in zip(classes, result.per_class, strict=True)
    }
