"""Gradient alignment: one label step against values computed by hand, schedule, bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cdul_training.gradient_alignment import (
    LabelState,
    classifier_loss,
    gaussian_weight,
    is_update_epoch,
    label_gradient,
)

torch.set_num_threads(1)

LOGITS = np.array([[1.5, -0.5, 0.2], [-2.0, 0.7, 3.0]])
LABELS = np.array([[0.8, 0.1, 0.3], [0.05, 0.6, 0.9]])


def _psi(y: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-((y - 0.5) ** 2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))


def _logit(y: np.ndarray) -> np.ndarray:
    return np.log(y / (1 - y))


def _sigmoid(u: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-u))


def _hand_kl_gradient(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    # L_i = sum_j t_j log(t_j / q_j) with t = y / S, S = sum_j y_j, q = softmax(z), so
    # dL_i/dy_k = (log(t_k / q_k) - L_i) / S.
    q = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    total = labels.sum(axis=1, keepdims=True)
    t = labels / total
    kl = (t * np.log(t / q)).sum(axis=1, keepdims=True)
    return (np.log(t / q) - kl) / total


def test_gaussian_weight_at_center() -> None:
    value = gaussian_weight(torch.tensor([0.5], dtype=torch.float64), sigma=1.0)
    assert float(value) == pytest.approx(1 / math.sqrt(2 * math.pi), abs=1e-12)
    value = gaussian_weight(torch.tensor([0.5], dtype=torch.float64), sigma=0.5)
    assert float(value) == pytest.approx(0.797885, abs=1e-6)
    np.testing.assert_allclose(
        gaussian_weight(torch.tensor(LABELS), sigma=0.3).numpy(), _psi(LABELS, 0.3), atol=1e-12
    )


def test_bce_gradient_is_minus_logit() -> None:
    gradient = label_gradient(torch.tensor(LOGITS), torch.tensor(LABELS), "bce")
    np.testing.assert_allclose(gradient.numpy(), -LOGITS, atol=1e-12)


def test_kl_gradient_matches_hand_formula() -> None:
    gradient = label_gradient(torch.tensor(LOGITS), torch.tensor(LABELS), "kl")
    np.testing.assert_allclose(gradient.numpy(), _hand_kl_gradient(LOGITS, LABELS), atol=1e-10)


def test_bce_step_single_value_by_hand() -> None:
    # y = 0.5, z = 1, label_lr = 1, sigma = 1: psi = 0.398942, dL/dy = -1,
    # u = 0 + 0.398942, y = sigmoid(0.398942) = 0.598434.
    state = LabelState(torch.tensor([[0.5]]), sigma=1.0, label_lr=1.0)
    state.update(torch.tensor([[1.0]]), "bce")
    assert float(state.latent) == pytest.approx(0.3989423, abs=1e-6)
    assert float(state.labels) == pytest.approx(0.5984330, abs=1e-6)


@pytest.mark.parametrize("sigma", [1.0, 0.25])
@pytest.mark.parametrize("label_lr", [0.1, 2.0])
def test_bce_step_matches_hand(sigma: float, label_lr: float) -> None:
    state = LabelState(torch.tensor(LABELS), sigma=sigma, label_lr=label_lr)
    state.update(torch.tensor(LOGITS), "bce")
    expected_u = _logit(LABELS) - label_lr * _psi(LABELS, sigma) * (-LOGITS)
    np.testing.assert_allclose(state.latent.numpy(), expected_u, atol=1e-10)
    np.testing.assert_allclose(state.labels.numpy(), _sigmoid(expected_u), atol=1e-10)


@pytest.mark.parametrize("sigma", [1.0, 0.25])
def test_kl_step_matches_hand(sigma: float) -> None:
    label_lr = 0.5
    state = LabelState(torch.tensor(LABELS), sigma=sigma, label_lr=label_lr)
    state.update(torch.tensor(LOGITS), "kl")
    expected_u = _logit(LABELS) - label_lr * _psi(LABELS, sigma) * _hand_kl_gradient(LOGITS, LABELS)
    np.testing.assert_allclose(state.latent.numpy(), expected_u, atol=1e-10)
    np.testing.assert_allclose(state.labels.numpy(), _sigmoid(expected_u), atol=1e-10)


def test_training_loss_reductions() -> None:
    logits, labels = torch.tensor(LOGITS), torch.tensor(LABELS)
    bce_sum = classifier_loss(logits, labels, "bce", reduction="sum")
    bce_mean = classifier_loss(logits, labels, "bce")
    assert float(bce_mean) == pytest.approx(float(bce_sum) / LOGITS.size)
    q = np.exp(LOGITS) / np.exp(LOGITS).sum(axis=1, keepdims=True)
    t = LABELS / LABELS.sum(axis=1, keepdims=True)
    kl_per_image = (t * np.log(t / q)).sum(axis=1)
    assert float(classifier_loss(logits, labels, "kl")) == pytest.approx(kl_per_image.mean())


def test_labels_stay_inside_bounds() -> None:
    eps = 1e-3
    state = LabelState(torch.tensor([[0.0, 1.0, 0.5]]), label_lr=1e6, eps=eps)
    assert float(state.labels.min()) >= eps - 1e-12
    assert float(state.labels.max()) <= 1 - eps + 1e-12
    state.update(torch.tensor([[50.0, -50.0, 80.0]]), "bce")
    labels = state.labels
    assert float(labels.min()) > 0.0
    assert float(labels.max()) < 1.0
    np.testing.assert_allclose(labels.numpy(), [[1 - eps, eps, 1 - eps]], atol=1e-9)


def test_mask_keeps_unmasked_labels() -> None:
    state = LabelState(torch.tensor(LABELS), label_lr=1.0)
    before = state.labels.clone()
    state.update(torch.tensor(LOGITS), "bce", mask=torch.tensor([False, True]))
    np.testing.assert_array_equal(state.labels[0].numpy(), before[0].numpy())
    assert not torch.allclose(state.labels[1], before[1])


def test_update_stats_report_change() -> None:
    initial = np.array([[0.45, 0.2]])
    logits = np.array([[1.0, -1.0]])
    state = LabelState(torch.tensor(initial), label_lr=1.0)
    stats = state.update(torch.tensor(logits), "bce")
    after = _sigmoid(_logit(initial) + _psi(initial, 1.0) * logits)
    change = np.abs(after - initial)
    assert stats.mean_abs_change == pytest.approx(change.mean(), abs=1e-12)
    assert stats.max_abs_change == pytest.approx(change.max(), abs=1e-12)
    assert stats.mean_abs_from_initial == pytest.approx(change.mean(), abs=1e-12)
    # 0.45 moves above 0.5 (about 0.549) and 0.2 stays below, so one label of two flips.
    assert stats.flipped_from_initial == 0.5


@pytest.mark.parametrize(
    ("epoch", "warmup", "update_every", "expected"),
    [
        (1, 0, 1, True),
        (3, 3, 1, False),
        (4, 3, 1, True),
        (5, 3, 1, True),
        (4, 3, 2, True),
        (5, 3, 2, False),
        (6, 3, 2, True),
        (10, 3, 0, False),
    ],
)
def test_update_schedule(epoch: int, warmup: int, update_every: int, expected: bool) -> None:
    assert is_update_epoch(epoch, warmup, update_every) is expected


def test_state_dict_round_trip() -> None:
    state = LabelState(torch.tensor(LABELS), label_lr=0.3)
    state.update(torch.tensor(LOGITS), "bce")
    other = LabelState(torch.tensor(LABELS), label_lr=0.3)
    other.load_state_dict(state.state_dict())
    np.testing.assert_array_equal(other.labels.numpy(), state.labels.numpy())
    with pytest.raises(ValueError, match="shape"):
        LabelState(torch.tensor(LABELS[:1])).load_state_dict(state.state_dict())
