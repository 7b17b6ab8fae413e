"""Unit tests of the CDUL scoring math on small hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cdul_server.scoring import (
    CLIP_TEMPERATURE,
    aggregate,
    aggregate_from_extremes,
    cut_tiles,
    final_pseudo_labels,
    pseudo_labels,
    rescale_extremes_temperature,
    rescale_temperature,
    similarity_scores,
    tile_boxes,
)


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


# --- similarity scores ---------------------------------------------------------------------


def test_similarity_scores_hand_computed() -> None:
    texts = np.eye(2, 3, dtype=np.float32)
    images = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    # cosines [1, 0] and [0, 0]; temperature ln 3 gives e^t = 3, so [3/4, 1/4] and [1/2, 1/2].
    scores = similarity_scores(images, texts, temperature=math.log(3.0))
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, [[0.75, 0.25], [0.5, 0.5]], rtol=1e-6)


def test_similarity_scores_default_temperature_is_clip() -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 8)).astype(np.float32)
    texts = rng.normal(size=(3, 8)).astype(np.float32)
    expected = _softmax(CLIP_TEMPERATURE * (images.astype(np.float64) @ texts.T.astype(np.float64)))
    np.testing.assert_allclose(similarity_scores(images, texts), expected, rtol=1e-4, atol=1e-6)


def test_similarity_scores_keeps_leading_axes() -> None:
    rng = np.random.default_rng(1)
    tiles = rng.normal(size=(2, 9, 5)).astype(np.float32)
    texts = rng.normal(size=(4, 5)).astype(np.float32)
    scores = similarity_scores(tiles, texts, temperature=10.0)
    assert scores.shape == (2, 9, 4)
    np.testing.assert_allclose(scores.sum(axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        scores[1, 3], similarity_scores(tiles[1, 3], texts, temperature=10.0), rtol=1e-6
    )


def test_similarity_scores_single_class_is_one() -> None:
    images = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    texts = np.array([[0.6, 0.8]], dtype=np.float32)
    np.testing.assert_array_equal(similarity_scores(images, texts), np.ones((2, 1)))


def test_similarity_scores_large_temperature_is_stable() -> None:
    texts = np.eye(2, dtype=np.float32)
    images = np.array([[1.0, 0.0]], dtype=np.float32)
    scores = similarity_scores(images, texts, temperature=1e4)
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(scores, [[1.0, 0.0]], atol=1e-12)


@pytest.mark.parametrize(
    ("images", "texts", "temperature", "message"),
    [
        (np.zeros((2, 3)), np.zeros((2, 4)), 1.0, "same embedding size"),
        (np.zeros((2, 3)), np.zeros(3), 1.0, "text_embeddings must be"),
        (np.zeros((2, 3)), np.zeros((0, 3)), 1.0, "text_embeddings must be"),
        (np.zeros((2, 3)), np.zeros((2, 3)), 0.0, "temperature must be positive"),
        (np.zeros((2, 3)), np.zeros((2, 3)), -1.0, "temperature must be positive"),
        (np.zeros((2, 3)), np.zeros((2, 3)), float("nan"), "temperature must be finite"),
    ],
)
def test_similarity_scores_rejects_bad_input(
    images: np.ndarray, texts: np.ndarray, temperature: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        similarity_scores(images, texts, temperature)


# --- temperature rescaling -----------------------------------------------------------------


def test_rescale_temperature_matches_softmax() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(5, 7))
    scores = _softmax(logits / 4.6)
    rescaled = rescale_temperature(scores, 460.0)
    np.testing.assert_allclose(rescaled, _softmax(logits * 100.0), rtol=1e-6, atol=1e-12)


def test_rescale_temperature_factor_one_is_identity() -> None:
    scores = np.array([[0.25, 0.75], [0.5, 0.5]])
    np.testing.assert_allclose(rescale_temperature(scores, 1.0), scores, rtol=1e-12)


def test_rescale_temperature_keeps_float32() -> None:
    scores = np.array([[0.25, 0.75]], dtype=np.float32)
    assert rescale_temperature(scores, 2.0).dtype == np.float32
    # 0.25^2 : 0.75^2 = 1 : 9
    np.testing.assert_allclose(rescale_temperature(scores, 2.0), [[0.1, 0.9]], rtol=1e-6)


@pytest.mark.parametrize(
    ("scores", "factor", "message"),
    [
        (np.array([[0.0, 1.0]]), 2.0, "finite and positive"),
        (np.array([[np.nan, 1.0]]), 2.0, "finite and positive"),
        (np.array([[0.5, 0.5]]), 0.0, "factor must be positive"),
        (np.array([[0.5, 0.5]]), float("inf"), "factor must be finite"),
    ],
)
def test_rescale_temperature_rejects_bad_input(
    scores: np.ndarray, factor: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        rescale_temperature(scores, factor)


def test_rescale_extremes_bound_exact_values() -> None:
    rng = np.random.default_rng(3)
    tile_logits = rng.normal(size=(6, 9, 5))
    factor = 50.0
    tiles = _softmax(tile_logits * 0.2)
    exact = _softmax(tile_logits * 0.2 * factor)
    exact_alpha, exact_beta = exact.max(axis=1), exact.min(axis=1)
    alpha, beta = tiles.max(axis=1), tiles.min(axis=1)

    low_alpha, low_beta = rescale_extremes_temperature(alpha, beta, factor, "alpha")
    high_alpha, high_beta = rescale_extremes_temperature(alpha, beta, factor, "beta")
    assert (low_alpha <= exact_alpha * (1 + 1e-9)).all()
    assert (low_beta <= exact_beta * (1 + 1e-9)).all()
    assert (high_alpha >= exact_alpha * (1 - 1e-9)).all()
    assert (high_beta >= exact_beta * (1 - 1e-9)).all()
    assert (low_alpha >= low_beta).all()
    assert (high_alpha >= high_beta).all()


def test_rescale_extremes_equal_tiles_are_exact() -> None:
    # With identical tiles alpha == beta == the tile row, so both bounds are the exact rescale.
    row = np.array([[0.125, 0.375, 0.5]])
    for normalizer in ("alpha", "beta"):
        alpha, beta = rescale_extremes_temperature(row, row, 3.0, normalizer)
        np.testing.assert_allclose(alpha, rescale_temperature(row, 3.0), rtol=1e-12)
        np.testing.assert_allclose(beta, rescale_temperature(row, 3.0), rtol=1e-12)


def test_rescale_extremes_rejects_unknown_normalizer() -> None:
    row = np.array([[0.5, 0.5]])
    with pytest.raises(ValueError, match="normalizer must be"):
        rescale_extremes_temperature(row, row, 2.0, "global")


# --- tiles ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "grid_size", "expected"),
    [
        (5, 7, 1, [(0, 0, 7, 5)]),
        (4, 6, 2, [(0, 0, 3, 2), (3, 0, 6, 2), (0, 2, 3, 4), (3, 2, 6, 4)]),
        # 7 // 2 = 3 rows and 5 // 2 = 2 columns per tile; the last row and column are left out.
        (7, 5, 2, [(0, 0, 2, 3), (2, 0, 4, 3), (0, 3, 2, 6), (2, 3, 4, 6)]),
        (
            3,
            3,
            3,
            [(x, y, x + 1, y + 1) for y in range(3) for x in range(3)],
        ),
    ],
)
def test_tile_boxes_hand_computed(
    height: int, width: int, grid_size: int, expected: list[tuple[int, int, int, int]]
) -> None:
    assert tile_boxes(height, width, grid_size) == expected


@pytest.mark.parametrize(
    ("height", "width", "grid_size", "message"),
    [
        (2, 10, 3, "smaller than the 3x3 grid"),
        (10, 2, 3, "smaller than the 3x3 grid"),
        (0, 0, 1, "smaller than the 1x1 grid"),
        (10, 10, 0, "grid_size must be at least 1"),
        (10, 10, -2, "grid_size must be at least 1"),
    ],
)
def test_tile_boxes_rejects_bad_sizes(
    height: int, width: int, grid_size: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        tile_boxes(height, width, grid_size)


def test_tile_boxes_rejects_float_grid() -> None:
    with pytest.raises(TypeError, match="grid_size must be an integer"):
        tile_boxes(9, 9, 3.0)  # type: ignore[arg-type]


def test_cut_tiles_hand_computed() -> None:
    image = np.arange(24).reshape(4, 6)
    tiles = cut_tiles(image, 2)
    assert tiles.shape == (4, 2, 3)
    np.testing.assert_array_equal(tiles[0], [[0, 1, 2], [6, 7, 8]])
    np.testing.assert_array_equal(tiles[1], [[3, 4, 5], [9, 10, 11]])
    np.testing.assert_array_equal(tiles[2], [[12, 13, 14], [18, 19, 20]])
    np.testing.assert_array_equal(tiles[3], [[15, 16, 17], [21, 22, 23]])


@pytest.mark.parametrize(("height", "width", "grid_size"), [(7, 11, 3), (9, 9, 3), (5, 4, 1)])
def test_cut_tiles_match_boxes(height: int, width: int, grid_size: int) -> None:
    image = np.random.default_rng(4).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    tiles = cut_tiles(image, grid_size)
    boxes = tile_boxes(height, width, grid_size)
    assert tiles.dtype == np.uint8
    assert tiles.shape == (grid_size**2, height // grid_size, width // grid_size, 3)
    for tile, (x0, y0, x1, y1) in zip(tiles, boxes, strict=True):
        np.testing.assert_array_equal(tile, image[y0:y1, x0:x1])


def test_cut_tiles_single_tile_is_whole_image() -> None:
    image = np.arange(12).reshape(3, 4)
    tiles = cut_tiles(image, 1)
    np.testing.assert_array_equal(tiles, image[None])
    tiles[0, 0, 0] = 99
    assert image[0, 0] == 0


@pytest.mark.parametrize(
    ("shape", "message"),
    [((2, 8, 3), "smaller than the 3x3 grid"), ((8,), "image must be"), ((2, 2, 2, 2), "image")],
)
def test_cut_tiles_rejects_bad_images(shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cut_tiles(np.zeros(shape), 3)


# --- aggregation ---------------------------------------------------------------------------

# One image, three tiles, two classes. The values are exact in binary floating point.
TILES = np.array([[[0.25, 0.75], [0.5, 0.5], [0.125, 0.875]]])


@pytest.mark.parametrize(
    ("threshold", "gamma", "expected"),
    [
        (0.0, [True, True], [0.5, 0.875]),
        # alpha of class 0 equals the threshold, and ">=" keeps alpha.
        (0.5, [True, True], [0.5, 0.875]),
        (0.625, [False, True], [0.125, 0.875]),
        (0.875, [False, True], [0.125, 0.875]),
        (0.9, [False, False], [0.125, 0.5]),
        (1.0, [False, False], [0.125, 0.5]),
    ],
)
def test_aggregate_hand_computed(
    threshold: float, gamma: list[bool], expected: list[float]
) -> None:
    result = aggregate(TILES, threshold)
    np.testing.assert_array_equal(result.alpha, [[0.5, 0.875]])
    np.testing.assert_array_equal(result.beta, [[0.125, 0.5]])
    np.testing.assert_array_equal(result.gamma, [gamma])
    np.testing.assert_array_equal(result.aggregate, [expected])


def test_aggregate_single_tile_is_tile() -> None:
    # n = 1: alpha and beta are the one tile's scores, whatever the threshold.
    tiles = np.array([[[0.25, 0.75]], [[0.5, 0.5]]])
    for threshold in (0.0, 0.3, 0.6, 1.0):
        result = aggregate(tiles, threshold)
        np.testing.assert_array_equal(result.alpha, tiles[:, 0])
        np.testing.assert_array_equal(result.beta, tiles[:, 0])
        np.testing.assert_array_equal(result.aggregate, tiles[:, 0])


def test_aggregate_ties_between_tiles() -> None:
    tiles = np.array([[[0.5, 0.5], [0.5, 0.5], [0.25, 0.75]]])
    result = aggregate(tiles, threshold=0.5)
    np.testing.assert_array_equal(result.alpha, [[0.5, 0.75]])
    np.testing.assert_array_equal(result.beta, [[0.25, 0.5]])
    np.testing.assert_array_equal(result.gamma, [[True, True]])
    np.testing.assert_array_equal(result.aggregate, [[0.5, 0.75]])


def test_aggregate_single_class() -> None:
    tiles = np.ones((3, 9, 1), dtype=np.float32)
    result = aggregate(tiles, threshold=0.5)
    assert result.aggregate.shape == (3, 1)
    assert result.aggregate.dtype == np.float32
    np.testing.assert_array_equal(result.aggregate, 1.0)
    np.testing.assert_array_equal(result.gamma, True)


def test_aggregate_batch_is_per_image() -> None:
    rng = np.random.default_rng(5)
    tiles = _softmax(rng.normal(size=(8, 9, 4)))
    batch = aggregate(tiles, threshold=0.3)
    for i in range(tiles.shape[0]):
        single = aggregate(tiles[i : i + 1], threshold=0.3)
        np.testing.assert_array_equal(batch.aggregate[i], single.aggregate[0])


def test_aggregate_from_extremes_is_aggregate() -> None:
    rng = np.random.default_rng(6)
    tiles = _softmax(rng.normal(size=(4, 9, 3)))
    direct = aggregate(tiles, threshold=0.35)
    extremes = aggregate_from_extremes(tiles.max(axis=1), tiles.min(axis=1), threshold=0.35)
    np.testing.assert_array_equal(direct.aggregate, extremes.aggregate)
    np.testing.assert_array_equal(direct.gamma, extremes.gamma)


@pytest.mark.parametrize(
    ("tiles", "threshold", "error", "message"),
    [
        (np.zeros((2, 3)), 0.0, ValueError, "tile_scores must be"),
        (np.zeros((2, 0, 3)), 0.0, ValueError, "at least one tile"),
        (np.array([[[np.nan, 0.5]]]), 0.0, ValueError, "not finite"),
        (TILES, float("nan"), ValueError, "threshold must be finite"),
        (TILES, "0.5", TypeError, "threshold must be a number"),
        (np.array([[["a", "b"]]]), 0.0, TypeError, "numeric"),
    ],
)
def test_aggregate_rejects_bad_input(
    tiles: np.ndarray, threshold: float, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        aggregate(tiles, threshold)


@pytest.mark.parametrize(
    ("alpha", "beta", "message"),
    [
        (np.zeros((2, 3)), np.zeros((2, 2)), "must both be"),
        (np.zeros(3), np.zeros(3), "must both be"),
        (np.array([[0.25, 0.5]]), np.array([[0.5, 0.25]]), "beta is above alpha for 1 of 2"),
    ],
)
def test_aggregate_from_extremes_rejects_bad_input(
    alpha: np.ndarray, beta: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        aggregate_from_extremes(alpha, beta)


# --- final pseudo labels -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lambda_weight", "expected"),
    [
        (0.0, [0.375, 0.5]),
        (0.5, [0.4375, 0.625]),
        (1.0, [0.5, 0.75]),
    ],
)
def test_final_pseudo_labels_hand_computed(lambda_weight: float, expected: list[float]) -> None:
    global_scores = np.array([[0.25, 0.75]])
    aggregated = np.array([[0.5, 0.25]])
    final = final_pseudo_labels(global_scores, aggregated, lambda_weight)
    np.testing.assert_array_equal(final, [expected])


def test_final_lambda_one_is_maximum() -> None:
    rng = np.random.default_rng(7)
    global_scores, aggregated = rng.random((2, 5, 4))
    final = final_pseudo_labels(global_scores, aggregated, 1.0)
    np.testing.assert_allclose(final, np.maximum(global_scores, aggregated), rtol=1e-12)


@pytest.mark.parametrize(
    ("shape", "lambda_weight", "message"),
    [
        ((2, 3), -0.1, "lambda_weight must be from 0"),
        ((2, 3), 1.5, "lambda_weight must be from 0"),
        ((3,), 0.0, "must both be"),
    ],
)
def test_final_pseudo_labels_rejects_bad_input(
    shape: tuple[int, ...], lambda_weight: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        final_pseudo_labels(np.zeros(shape), np.zeros(shape), lambda_weight)


def test_pseudo_labels_combines_steps() -> None:
    global_scores = np.array([[0.25, 0.75]])
    labels = pseudo_labels(global_scores, TILES, threshold=0.625, lambda_weight=0.0)
    np.testing.assert_array_equal(labels.alpha, [[0.5, 0.875]])
    np.testing.assert_array_equal(labels.beta, [[0.125, 0.5]])
    np.testing.assert_array_equal(labels.aggregate, [[0.125, 0.875]])
    np.testing.assert_array_equal(labels.final, [[0.1875, 0.8125]])
    np.testing.assert_array_equal(labels.global_scores, global_scores)


@pytest.mark.parametrize(
    ("global_shape", "tile_shape"),
    [((2, 2), (1, 3, 2)), ((1, 3), (1, 3, 2)), ((1, 2), (1, 2))],
)
def test_pseudo_labels_rejects_mismatched_shapes(
    global_shape: tuple[int, ...], tile_shape: tuple[int, ...]
) -> None:
    with pytest.raises(ValueError, match="same B and C"):
        pseudo_labels(np.zeros(global_shape), np.zeros(tile_shape))
