"""Multi-label evaluation: per-class average precision (AP) and its mean (mAP)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MapResult:
    """Mean average precision over the classes that have at least one positive.

    Attributes:
        map: mean of the per-class APs in percent over the classes with a positive; NaN when
            no class has one.
        per_class: (C,) AP in percent per class, NaN for a class without positive.
        skipped: indices of the classes without positive, left out of the mean.
    """

    map: float
    per_class: np.ndarray
    skipped: list[int] = field(default_factory=list)


def average_precision(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Compute the non-interpolated average precision of each class (column).

    AP is `sum_n (R_n - R_{n-1}) * P_n` over the distinct score thresholds in decreasing order,
    the definition of `sklearn.metrics.average_precision_score`. Tied scores form one threshold,
    so their order does not matter.

    Args:
        scores: (N, C) finite scores, higher meaning more likely positive.
        labels: (N, C) ground truth, 0 or 1 (booleans allowed).

    Returns:
        float64 array (C,) in [0, 1], NaN for a class with no positive.

    Raises:
        ValueError: on mismatched or non-2-D shapes, an empty set of images, scores that are
            not finite, or labels other than 0 and 1.
    """
    score_array, label_array = _check_inputs(scores, labels)
    n_images, n_classes = score_array.shape

    # Sort each column by decreasing score; a stable sort keeps ties in image order, and the
    # grouping below makes the order inside a tie irrelevant.
    order = np.argsort(-score_array, axis=0, kind="stable")
    sorted_scores = np.take_along_axis(score_array, order, axis=0)
    sorted_labels = np.take_along_axis(label_array, order, axis=0)
    true_positives = np.cumsum(sorted_labels, axis=0)
    ranks = np.arange(1, n_images + 1, dtype=np.float64)[:, None]
    precision = true_positives / ranks

    # A threshold ends at the last row of each run of equal scores. Every row takes the
    # precision at the end of its run, so all positives of a tie share one precision.
    run_end = np.ones((n_images, n_classes), dtype=bool)
    run_end[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    end_index = np.where(run_end, np.arange(n_images)[:, None], n_images)
    end_index = np.minimum.accumulate(end_index[::-1], axis=0)[::-1]
    precision_at_run_end = np.take_along_axis(precision, end_index, axis=0)

    n_positives = sorted_labels.sum(axis=0)
    summed = (precision_at_run_end * sorted_labels).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = summed / n_positives
    ap[n_positives == 0] = np.nan
    result: np.ndarray = ap
    return result


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> MapResult:
    """Compute per-class AP in percent and their mean over the classes with a positive.

    Args:
        scores: (N, C) finite scores.
        labels: (N, C) ground truth, 0 or 1.

    Raises:
        ValueError: as `average_precision` does.
    """
    per_class = 100.0 * average_precision(scores, labels)
    missing = np.isnan(per_class)
    skipped = [int(i) for i in np.flatnonzero(missing)]
    if skipped:
        _logger.debug(
            "%d of %d classes have no positive and are left out of the mAP: %s",
            len(skipped),
            per_class.size,
            skipped,
        )
    value = float(per_class[~missing].mean()) if (~missing).any() else float("nan")
    return MapResult(map=value, per_class=per_class, skipped=skipped)


def _check_inputs(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    score_array = np.asarray(scores)
    label_array = np.asarray(labels)
    if score_array.ndim != 2 or score_array.shape != label_array.shape:
        raise ValueError(
            f"scores and labels must both be (N, C), got shapes {score_array.shape} and "
            f"{label_array.shape}"
        )
    if score_array.shape[0] == 0:
        raise ValueError("scores and labels have no rows: AP needs at least one image")
    if not (np.issubdtype(score_array.dtype, np.number) or score_array.dtype == np.bool_):
        raise TypeError(f"scores must be numeric, got dtype {score_array.dtype}")
    score_array = score_array.astype(np.float64, copy=False)
    bad = ~np.isfinite(score_array)
    if bad.any():
        raise ValueError(
            f"scores have {int(bad.sum())} values that are not finite (NaN or infinity): "
            "replace them before evaluating"
        )
    if not (np.issubdtype(label_array.dtype, np.number) or label_array.dtype == np.bool_):
        raise TypeError(f"labels must be numeric 0/1, got dtype {label_array.dtype}")
    binary = (label_array == 0) | (label_array == 1)
    if not binary.all():
        first = label_array[~binary][0]
        raise ValueError(
            f"labels must be 0 or 1, got {int((~binary).sum())} other values such as {first!r}: "
            "binarize the ground truth"
        )
    return score_array, label_array.astype(np.float64)
