"""CDUL scoring: class scores from CLIP embeddings, image tiles, aggregation and pseudo labels.

Every function is vectorized over a batch of images and uses numpy only. The method, per image
and class j, with tile scores `l_kj` over the n x n tiles k and global scores `g_j`:

- `alpha_j = max_k l_kj`, `beta_j = min_k l_kj`,
- `gamma_j = 1 if alpha_j >= threshold else 0`,
- `a_j = gamma_j * alpha_j + (1 - gamma_j) * beta_j` (the aggregate),
- `y0_j = (g_j + a_j + lambda * |g_j - a_j|) / 2` (the final pseudo label).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

_logger = logging.getLogger(__name__)

# exp(logit_scale) of the OpenAI CLIP models, the multiplier of CLIP's zero-shot classifier.
CLIP_TEMPERATURE = 100.0


@dataclass(frozen=True)
class Aggregation:
    """Aggregated local similarities of a batch, each array (B, C).

    Attributes:
        alpha: per class, the maximum over the tiles of the tile scores.
        beta: per class, the minimum over the tiles of the tile scores.
        gamma: boolean, True where `alpha >= threshold`, so the aggregate takes alpha.
        aggregate: alpha where gamma is True, else beta.
    """

    alpha: np.ndarray
    beta: np.ndarray
    gamma: np.ndarray
    aggregate: np.ndarray


@dataclass(frozen=True)
class PseudoLabels:
    """Initial CDUL pseudo labels of a batch and the scores they come from, each array (B, C).

    Attributes:
        global_scores: the whole-image scores.
        aggregate: the aggregated tile scores.
        final: the initial pseudo labels, `(g + a + lambda * |g - a|) / 2`.
        alpha: per class, the maximum over the tiles.
        beta: per class, the minimum over the tiles.
    """

    global_scores: np.ndarray
    aggregate: np.ndarray
    final: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray


def similarity_scores(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    temperature: float = CLIP_TEMPERATURE,
) -> np.ndarray:
    """Compute the softmax over classes of `temperature * cosine` for each image embedding.

    Args:
        image_embeddings: (..., D) L2-normalized image embeddings with any leading axes, such as
            (B, D) for whole images or (B, K, D) for tiles.
        text_embeddings: (C, D) L2-normalized class embeddings.
        temperature: multiplier of the cosine, `exp(logit_scale)` of the CLIP model (about 100
            for OpenAI CLIP). The embeddings are not normalized again here.

    Returns:
        float32 array (..., C) whose last axis sums to 1.

    Raises:
        ValueError: on mismatched embedding sizes, a text matrix that is not 2-D, or a
            temperature that is not a finite positive number.
    """
    images = _as_float_array(image_embeddings, "image_embeddings", dtype=np.float32)
    texts = _as_float_array(text_embeddings, "text_embeddings", dtype=np.float32)
    if texts.ndim != 2 or texts.shape[0] < 1:
        raise ValueError(
            f"text_embeddings must be (C, D) with C >= 1, got shape {texts.shape}: "
            "stack one embedding per class"
        )
    if images.ndim < 1 or images.shape[-1] != texts.shape[1]:
        raise ValueError(
            f"image_embeddings (shape {images.shape}) and text_embeddings (shape {texts.shape}) "
            "must have the same embedding size D on their last axis: use one CLIP model for both"
        )
    temperature = _check_finite_positive(temperature, "temperature")
    logits = (images @ texts.T) * np.float32(temperature)
    return _softmax(logits).astype(np.float32, copy=False)


def rescale_temperature(scores: np.ndarray, factor: float) -> np.ndarray:
    """Rescale softmax score rows to another temperature: `softmax(factor * log(scores))` per row.

    For `scores = softmax(t * z)` the result is `softmax(factor * t * z)`, because the per-row
    normalizer of the input becomes a constant that the softmax cancels. This turns scores made
    at one temperature into scores at `factor` times that temperature without the embeddings.

    Args:
        scores: (..., C) positive scores, each row along the last axis a softmax output.
        factor: the ratio of the new temperature to the old one; 1 returns the rows unchanged.

    Returns:
        Array of the same shape and floating dtype whose last axis sums to 1.

    Raises:
        ValueError: on a score that is not finite and positive, or a factor that is not a
            finite positive number.
    """
    values = _as_float_array(scores, "scores")
    factor = _check_finite_positive(factor, "factor")
    if values.ndim < 1 or values.shape[-1] < 1:
        raise ValueError(
            f"scores must have at least one class on the last axis, got {values.shape}"
        )
    logits = factor * np.log(_check_positive(values, "scores").astype(np.float64))
    return _softmax(logits).astype(values.dtype, copy=False)


def rescale_extremes_temperature(
    alpha: np.ndarray, beta: np.ndarray, factor: float, normalizer: str = "alpha"
) -> tuple[np.ndarray, np.ndarray]:
    """Rescale per-class tile maxima and minima to `factor` times their temperature, in bounds.

    The exact rescaled maximum of class j is `alpha_j**factor / S_k` for the tile k that has
    the maximum, where `S_k` sums `p_ki**factor` over the classes i of that tile's score row.
    Without the tile rows `S_k` is unknown, but it lies between `sum_i beta_i**factor` and
    `sum_i alpha_i**factor`. Both outputs are divided by one of these two sums per image:
    `"alpha"` gives lower bounds of the exact rescaled alpha and beta, `"beta"` gives upper
    bounds, which can exceed 1. One shared divisor keeps `alpha >= beta`.

    Args:
        alpha: (B, C) per class, the maximum over the tiles of softmax tile scores.
        beta: (B, C) per class, the minimum over the tiles.
        factor: the ratio of the new temperature to the old one.
        normalizer: `"alpha"` or `"beta"`, the row whose sum of powers divides both outputs.

    Returns:
        The rescaled (alpha, beta), each (B, C) in the floating dtype of the inputs.

    Raises:
        ValueError: on mismatched shapes, scores that are not finite and positive, a factor
            that is not a finite positive number, or an unknown normalizer.
    """
    if normalizer not in ("alpha", "beta"):
        raise ValueError(f"normalizer must be 'alpha' or 'beta', got {normalizer!r}")
    maxima = _as_float_array(alpha, "alpha")
    minima = _as_float_array(beta, "beta")
    if maxima.ndim != 2 or maxima.shape != minima.shape:
        raise ValueError(
            f"alpha and beta must both be (B, C), got shapes {maxima.shape} and {minima.shape}"
        )
    factor = _check_finite_positive(factor, "factor")
    log_alpha = factor * np.log(_check_positive(maxima, "alpha").astype(np.float64))
    log_beta = factor * np.log(_check_positive(minima, "beta").astype(np.float64))
    reference = log_alpha if normalizer == "alpha" else log_beta
    shift = reference.max(axis=-1, keepdims=True)
    log_divisor = shift + np.log(np.exp(reference - shift).sum(axis=-1, keepdims=True))
    dtype = np.result_type(maxima, minima)
    return (
        np.exp(log_alpha - log_divisor).astype(dtype, copy=False),
        np.exp(log_beta - log_divisor).astype(dtype, copy=False),
    )


def tile_boxes(height: int, width: int, grid_size: int) -> list[tuple[int, int, int, int]]:
    """List the `(x0, y0, x1, y1)` pixel boxes of the n x n grid of tiles, row-major.

    Each tile is `height // n` by `width // n` pixels and the tiles do not overlap. The last
    `height % n` rows and `width % n` columns of the image belong to no tile.

    Args:
        height: image height in pixels.
        width: image width in pixels.
        grid_size: n, the number of tiles along each side.

    Raises:
        ValueError: when grid_size < 1, or when height or width is smaller than grid_size, so
            a tile would have no pixel.
    """
    n = _check_int(grid_size, "grid_size")
    h = _check_int(height, "height")
    w = _check_int(width, "width")
    if n < 1:
        raise ValueError(f"grid_size must be at least 1, got {n}")
    if h < n or w < n:
        raise ValueError(
            f"image of {w}x{h} pixels (width x height) is smaller than the {n}x{n} grid: every "
            f"side needs at least {n} pixels, so use a smaller grid_size or a larger image"
        )
    tile_h = h // n
    tile_w = w // n
    return [
        (col * tile_w, row * tile_h, (col + 1) * tile_w, (row + 1) * tile_h)
        for row in range(n)
        for col in range(n)
    ]


def cut_tiles(image: np.ndarray, grid_size: int) -> np.ndarray:
    """Cut an image array into its n x n tiles, in the order of `tile_boxes`.

    Args:
        image: (H, W) or (H, W, channels) pixel array.
        grid_size: n, the number of tiles along each side.

    Returns:
        A new array (n * n, H // n, W // n[, channels]) of the same dtype.

    Raises:
        ValueError: when the image is not 2-D or 3-D, or is smaller than n pixels on a side.
    """
    pixels = np.asarray(image)
    if pixels.ndim not in (2, 3):
        raise ValueError(
            f"image must be (H, W) or (H, W, channels), got shape {pixels.shape}: "
            "cut one image at a time"
        )
    height, width = pixels.shape[:2]
    tile_boxes(height, width, grid_size)  # validates the sizes
    n = int(grid_size)
    tile_h = height // n
    tile_w = width // n
    rest = pixels.shape[2:]
    grid = pixels[: n * tile_h, : n * tile_w].reshape(n, tile_h, n, tile_w, *rest)
    # (row, y, col, x, ...) -> (row, col, y, x, ...) gives the tiles in row-major order.
    return np.array(grid.swapaxes(1, 2)).reshape(n * n, tile_h, tile_w, *rest)


def aggregate_from_extremes(
    alpha: np.ndarray, beta: np.ndarray, threshold: float = 0.0
) -> Aggregation:
    """Aggregate local similarities from their per-class maximum and minimum over the tiles.

    `gamma = alpha >= threshold`, and the aggregate is alpha where gamma holds, else beta. A
    threshold of 0 therefore always selects alpha, and a threshold above every alpha always
    selects beta.

    Args:
        alpha: (B, C) per class, the maximum over the tiles of the tile scores.
        beta: (B, C) per class, the minimum over the tiles of the tile scores.
        threshold: score that alpha must reach for the aggregate to take alpha.

    Raises:
        ValueError: on mismatched shapes, values that are not finite, beta above alpha, or a
            threshold that is not finite.
    """
    maxima = _as_float_array(alpha, "alpha")
    minima = _as_float_array(beta, "beta")
    if maxima.ndim != 2 or maxima.shape != minima.shape:
        raise ValueError(
            f"alpha and beta must both be (B, C), got shapes {maxima.shape} and {minima.shape}"
        )
    _check_all_finite(maxima, "alpha")
    _check_all_finite(minima, "beta")
    inverted = minima > maxima
    if inverted.any():
        raise ValueError(
            f"beta is above alpha for {int(inverted.sum())} of {inverted.size} (image, class) "
            "pairs: alpha must be the maximum and beta the minimum over the tiles"
        )
    threshold = _check_finite(threshold, "threshold")
    gamma = maxima >= threshold
    dtype = np.result_type(maxima, minima)
    return Aggregation(
        alpha=maxima,
        beta=minima,
        gamma=gamma,
        aggregate=np.where(gamma, maxima, minima).astype(dtype, copy=False),
    )


def aggregate(tile_scores: np.ndarray, threshold: float = 0.0) -> Aggregation:
    """Aggregate the tile scores of a batch per class, as `aggregate_from_extremes` states.

    Args:
        tile_scores: (B, K, C) scores of the K tiles of each of B images.
        threshold: score that alpha must reach for the aggregate to take alpha.

    Raises:
        ValueError: when tile_scores is not (B, K, C) with K >= 1, contains values that are not
            finite, or the threshold is not finite.
    """
    tiles = _as_float_array(tile_scores, "tile_scores")
    if tiles.ndim != 3 or tiles.shape[1] < 1:
        raise ValueError(
            f"tile_scores must be (B, K, C) with at least one tile, got shape {tiles.shape}"
        )
    _check_all_finite(tiles, "tile_scores")
    return aggregate_from_extremes(tiles.max(axis=1), tiles.min(axis=1), threshold)


def final_pseudo_labels(
    global_scores: np.ndarray, aggregate: np.ndarray, lambda_weight: float = 0.0
) -> np.ndarray:
    """Combine global and aggregated scores into the initial pseudo labels.

    `y0 = (g + a + lambda * |g - a|) / 2`: lambda 0 gives the mean of the two and lambda 1 their
    maximum.

    Args:
        global_scores: (B, C) whole-image scores.
        aggregate: (B, C) aggregated tile scores.
        lambda_weight: lambda, from 0 to 1.

    Returns:
        Array (B, C) in the floating dtype of the inputs.

    Raises:
        ValueError: on mismatched shapes, values that are not finite, or lambda outside [0, 1].
    """
    whole = _as_float_array(global_scores, "global_scores")
    local = _as_float_array(aggregate, "aggregate")
    if whole.ndim != 2 or whole.shape != local.shape:
        raise ValueError(
            f"global_scores and aggregate must both be (B, C), got shapes {whole.shape} and "
            f"{local.shape}"
        )
    _check_all_finite(whole, "global_scores")
    _check_all_finite(local, "aggregate")
    weight = _check_finite(lambda_weight, "lambda_weight")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(
            f"lambda_weight must be from 0 (mean) to 1 (maximum), got {lambda_weight!r}"
        )
    dtype = np.result_type(whole, local)
    return ((whole + local + weight * np.abs(whole - local)) / 2).astype(dtype, copy=False)


def pseudo_labels(
    global_scores: np.ndarray,
    tile_scores: np.ndarray,
    threshold: float = 0.0,
    lambda_weight: float = 0.0,
) -> PseudoLabels:
    """Compute the CDUL initial pseudo labels of a batch from its global and tile scores.

    Args:
        global_scores: (B, C) whole-image scores.
        tile_scores: (B, K, C) scores of the K tiles of each image.
        threshold: score that alpha must reach for the aggregate to take alpha.
        lambda_weight: lambda of the final pseudo label, from 0 to 1.

    Raises:
        ValueError: when the batch size or the class count of the two inputs differ, or on any
            error of `aggregate` and `final_pseudo_labels`.
    """
    whole = _as_float_array(global_scores, "global_scores")
    tiles = _as_float_array(tile_scores, "tile_scores")
    if whole.ndim != 2 or tiles.ndim != 3 or whole.shape != (tiles.shape[0], tiles.shape[2]):
        raise ValueError(
            f"global_scores must be (B, C) and tile_scores (B, K, C) with the same B and C, got "
            f"shapes {whole.shape} and {tiles.shape}"
        )
    aggregation = aggregate(tiles, threshold)
    final = final_pseudo_labels(whole, aggregation.aggregate, lambda_weight)
    return PseudoLabels(
        global_scores=whole,
        aggregate=aggregation.aggregate,
        final=final,
        alpha=aggregation.alpha,
        beta=aggregation.beta,
    )


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    result: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
    return result


def _as_float_array(
    values: np.ndarray, name: str, dtype: type[np.floating] | None = None
) -> np.ndarray:
    """Return `values` as a floating array; integers and booleans become float64."""
    array = np.asarray(values)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise TypeError(f"{name} must be a numeric array, got dtype {array.dtype}")
    if np.iscomplexobj(array):
        raise TypeError(f"{name} must be real, got dtype {array.dtype}")
    if dtype is not None:
        return array.astype(dtype, copy=False)
    if not np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float64)
    return array


def _check_all_finite(array: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        raise ValueError(
            f"{name} has {int(bad.sum())} values that are not finite (NaN or infinity) of "
            f"{array.size}: fix the scores before aggregating"
        )


def _check_positive(array: np.ndarray, name: str) -> np.ndarray:
    bad = ~(np.isfinite(array) & (array > 0))
    if bad.any():
        raise ValueError(
            f"{name} must be finite and positive to take its log, but {int(bad.sum())} of "
            f"{array.size} values are not (such as {array[bad][0]!r}): pass softmax outputs"
        )
    return array


def _check_finite(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise TypeError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


def _check_finite_positive(value: float, name: str) -> float:
    number = _check_finite(value, name)
    if number <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return number


def _check_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return int(value)
