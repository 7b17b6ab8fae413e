"""Tests of per-class average precision and mAP against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from cdul_training.metrics import average_precision, mean_average_precision


def _sklearn_ap(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.array(
        [
            average_precision_score(labels[:, j], scores[:, j]) if labels[:, j].any() else np.nan
            for j in range(labels.shape[1])
        ]
    )


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("n_levels", [2, 3, 10, None])
def test_average_precision_matches_sklearn(seed: int, n_levels: int | None) -> None:
    rng = np.random.default_rng(seed)
    n_images = int(rng.integers(1, 60))
    n_classes = int(rng.integers(1, 6))
    # Few score levels make many ties; None gives continuous scores.
    if n_levels is None:
        scores = rng.random((n_images, n_classes))
    else:
        scores = rng.integers(0, n_levels, size=(n_images, n_classes)) / n_levels
    labels = (rng.random((n_images, n_classes)) < rng.uniform(0.1, 0.9)).astype(np.uint8)
    labels[0, 0] = 1  # at least one class with a positive

    ours = average_precision(scores, labels)
    expected = _sklearn_ap(scores, labels)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(expected))
    np.testing.assert_allclose(ours[~np.isnan(ours)], expected[~np.isnan(expected)], rtol=1e-12)


def test_average_precision_hand_computed() -> None:
    # Ranking 0.9 (pos), 0.8 (neg), 0.7 (pos): AP = (1/2)(1/1) + (1/2)(2/3) = 5/6.
    scores = np.array([[0.9], [0.8], [0.7]])
    labels = np.array([[1], [0], [1]])
    np.testing.assert_allclose(average_precision(scores, labels), [5 / 6], rtol=1e-12)


def test_average_precision_tie_is_one_threshold() -> None:
    # All tied: one threshold with precision 2/4 whatever the order of the rows.
    scores = np.full((4, 1), 0.5)
    for labels in ([[1], [1], [0], [0]], [[0], [0], [1], [1]]):
        np.testing.assert_allclose(average_precision(scores, np.array(labels)), [0.5])


def test_average_precision_perfect_and_reversed() -> None:
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]])
    labels = np.array([[1, 1], [1, 1], [0, 0]])
    ap = average_precision(scores, labels)
    assert ap[0] == 1.0
    # Reversed: positives at ranks 2 and 3, so (1/2)(1/2) + (1/2)(2/3) = 7/12.
    np.testing.assert_allclose(ap[1], 7 / 12, rtol=1e-12)


def test_mean_average_precision_skips_class_without_positive() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random((20, 4))
    labels = (rng.random((20, 4)) < 0.5).astype(int)
    labels[:, 2] = 0
    labels[0, [0, 1, 3]] = 1

    result = mean_average_precision(scores, labels)
    expected = 100 * _sklearn_ap(scores, labels)
    assert result.skipped == [2]
    assert math.isnan(result.per_class[2])
    np.testing.assert_allclose(result.per_class[[0, 1, 3]], expected[[0, 1, 3]], rtol=1e-12)
    assert result.map == pytest.approx(np.mean(expected[[0, 1, 3]]), rel=1e-12)


def test_mean_average_precision_without_any_positive() -> None:
    result = mean_average_precision(np.zeros((3, 2)), np.zeros((3, 2)))
    assert math.isnan(result.map)
    assert result.skipped == [0, 1]


def test_mean_average_precision_accepts_bool_labels() -> None:
    scores = np.array([[0.9, 0.2], [0.1, 0.8]])
    labels = np.array([[True, False], [False, True]])
    result = mean_average_precision(scores, labels)
    assert result.map == 100.0
    assert result.skipped == []


@pytest.mark.parametrize(
    ("scores", "labels", "error", "message"),
    [
        (np.zeros((3, 2)), np.zeros((3, 3)), ValueError, "must both be"),
        (np.zeros(3), np.zeros(3), ValueError, "must both be"),
        (np.zeros((0, 2)), np.zeros((0, 2)), ValueError, "no rows"),
        (np.array([[np.nan], [0.5]]), np.array([[1], [0]]), ValueError, "not finite"),
        (np.array([[0.1], [0.5]]), np.array([[2], [0]]), ValueError, "labels must be 0 or 1"),
        (np.array([["a"], ["b"]]), np.array([[1], [0]]), TypeError, "scores must be numeric"),
    ],
)
def test_average_precision_rejects_bad_input(
    scores: np.ndarray, labels: np.ndarray, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        average_precision(scores, labels)
