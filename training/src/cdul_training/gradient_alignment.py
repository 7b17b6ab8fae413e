"""Gradient alignment: pseudo labels as parameters, refined while the classifier trains.

Each image i and class j has a latent `u_ij = logit(y_ij)`. On an update epoch the labels move
against the gradient of the training loss with respect to the labels, weighted by a Gaussian
density that is largest for the most uncertain labels:

    u <- clamp(u - label_lr * psi(y) * dL/dy, -u_max, u_max),   y = sigmoid(u)

`psi(y) = exp(-(y - 0.5)^2 / (2 sigma^2)) / (sigma * sqrt(2 pi))`.

`dL/dy` is the gradient of the loss summed over images and classes (`reduction="sum"`), so the
gradient of one label is the gradient of that image's own loss term and does not depend on the
batch size or the number of classes. For `bce` it is exactly `-z` (minus the classifier's
logit), and `label_lr * psi(y) * |z|` is the step on the logit scale. The classifier itself
trains on the mean-reduced loss; only the label step uses the sum.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_logger = logging.getLogger(__name__)

LOSSES = ("bce", "kl")
# Smallest distance of a label from 0 and 1; u is clamped to +-logit(1 - eps), about 9.21.
DEFAULT_LABEL_EPS = 1e-4


def classifier_loss(
    logits: torch.Tensor, labels: torch.Tensor, loss: str, reduction: str = "mean"
) -> torch.Tensor:
    """Compute the training loss of `logits` (B, C) against soft pseudo labels (B, C).

    Args:
        logits: classifier outputs before the sigmoid or softmax.
        labels: pseudo labels in (0, 1).
        loss: `bce` (sigmoid outputs against each label) or `kl` (softmax outputs against the
            labels normalized to one distribution per image, KL(target || output)).
        reduction: `mean` averages over images (and over classes for `bce`), which is what the
            network trains on; `sum` adds every term, which is what the label step uses.
    """
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(logits, labels, reduction=reduction)
    if loss == "kl":
        target = labels / labels.sum(dim=1, keepdim=True)
        kl_reduction = "batchmean" if reduction == "mean" else reduction
        return F.kl_div(F.log_softmax(logits, dim=1), target, reduction=kl_reduction)
    raise ValueError(f"unknown loss {loss!r}: use one of {LOSSES}")


def label_gradient(logits: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """Return dL/dy (B, C) of the summed loss with respect to the labels, logits held fixed."""
    y = labels.detach().clone().requires_grad_(True)
    value = classifier_loss(logits.detach().to(y.dtype), y, loss, reduction="sum")
    (gradient,) = torch.autograd.grad(value, y)
    return gradient


def gaussian_weight(labels: torch.Tensor, sigma: float) -> torch.Tensor:
    """Return psi(y), the normal density with mean 0.5 and standard deviation `sigma`."""
    return torch.exp(-((labels - 0.5) ** 2) / (2.0 * sigma**2)) / (sigma * math.sqrt(2.0 * math.pi))


def is_update_epoch(epoch: int, warmup: int, update_every: int) -> bool:
    """Return whether the labels are updated at the end of `epoch` (counted from 1).

    The first `warmup` epochs train the network only; then the labels are updated after epoch
    `warmup + 1` and every `update_every` epochs after it. `update_every == 0` never updates.
    """
    if update_every <= 0 or epoch <= warmup:
        return False
    return (epoch - warmup - 1) % update_every == 0


@dataclass(frozen=True)
class LabelUpdateStats:
    """How much one label update moved the labels (all on the probability scale)."""

    mean_abs_change: float
    max_abs_change: float
    mean_abs_from_initial: float
    flipped_from_initial: float  # fraction of labels on the other side of 0.5 than initially

    def to_dict(self) -> dict[str, float]:
        """Return the statistics as a JSON-ready dict."""
        return {
            "label_mean_abs_change": self.mean_abs_change,
            "label_max_abs_change": self.max_abs_change,
            "label_mean_abs_from_initial": self.mean_abs_from_initial,
            "label_flipped_from_initial": self.flipped_from_initial,
        }


class LabelState:
    """The latent pseudo labels of a corpus (N, C), kept in float64.

    Args:
        initial: initial pseudo labels in [0, 1]; they are clipped to [eps, 1 - eps] so that
            `u = logit(y)` is finite.
        sigma: standard deviation of the Gaussian weight psi.
        label_lr: step size of the label update (see the module docstring for its scale).
        eps: labels stay inside [eps, 1 - eps].
    """

    def __init__(
        self,
        initial: torch.Tensor,
        sigma: float = 1.0,
        label_lr: float = 0.1,
        eps: float = DEFAULT_LABEL_EPS,
    ) -> None:
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        if label_lr < 0:
            raise ValueError(f"label_lr must be >= 0, got {label_lr}")
        if not 0 < eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {eps}")
        self.sigma = sigma
        self.label_lr = label_lr
        self.eps = eps
        self.u_max = math.log((1.0 - eps) / eps)
        initial = initial.to(torch.float64).clamp(eps, 1.0 - eps)
        self.initial = initial.clone()
        self.latent = torch.logit(initial).clamp(-self.u_max, self.u_max)

    @property
    def labels(self) -> torch.Tensor:
        """Current pseudo labels y = sigmoid(u), float64 (N, C), strictly inside (0, 1)."""
        return torch.sigmoid(self.latent)

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """Return the current labels of the images `indices` as float32 (B, C)."""
        return self.labels[indices].to(torch.float32)

    def update(
        self, logits: torch.Tensor, loss: str, mask: torch.Tensor | None = None
    ) -> LabelUpdateStats:
        """Take one label step for every image from the classifier's logits (N, C).

        Args:
            logits: the classifier's logits for every image of the corpus, in corpus order.
            loss: the training loss, `bce` or `kl`.
            mask: optional bool (N,) of images to update; the others keep their labels (used
                when some images produced no logits this epoch).
        """
        before = self.labels
        gradient = label_gradient(logits.to(torch.float64), before, loss)
        step = self.label_lr * gaussian_weight(before, self.sigma) * gradient
        if mask is not None:
            step = step * mask.to(step.dtype).unsqueeze(1)
        self.latent = (self.latent - step).clamp(-self.u_max, self.u_max)
        after = self.labels
        change = (after - before).abs()
        return LabelUpdateStats(
            mean_abs_change=float(change.mean()),
            max_abs_change=float(change.max()) if change.numel() else 0.0,
            mean_abs_from_initial=float((after - self.initial).abs().mean()),
            flipped_from_initial=float(((after > 0.5) != (self.initial > 0.5)).double().mean()),
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Return the tensors needed to resume: latent and initial labels."""
        return {"latent": self.latent.clone(), "initial": self.initial.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the tensors saved by `state_dict`.

        Raises:
            ValueError: the saved shape differs from this corpus.
        """
        if state["latent"].shape != self.latent.shape:
            raise ValueError(
                f"saved labels have shape {tuple(state['latent'].shape)}, this corpus "
                f"{tuple(self.latent.shape)}: resume with the same images and pseudo labels"
            )
        self.latent = state["latent"].to(torch.float64).clone()
        self.initial = state["initial"].to(torch.float64).clone()
