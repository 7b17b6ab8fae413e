"""Train a multi-label classifier on pseudo labels and refine them with gradient alignment.

The classifier trains on the pseudo labels as soft targets. After the first `--warmup` epochs,
every `--update-every` epochs the pseudo labels take one gradient-alignment step (see
`cdul_training.gradient_alignment`) computed from the logits that the network produced for
each image during that epoch. Runs under `torchrun` with DistributedDataParallel as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from cdul_training import __version__
from cdul_training.classifiers import (
    ARCHS,
    CHECKPOINT_FORMAT,
    DEFAULT_IMAGE_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SMALL_CNNS,
    build_classifier,
)
from cdul_training.clip_windows import embed_windows, input_side
from cdul_training.datasets import (
    AUGMENTATIONS,
    EmbeddingDataset,
    ImageDataset,
    list_images,
    match_records,
)
from cdul_training.distributed import (
    DEVICES,
    DistributedContext,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
    shutdown,
)
from cdul_training.gradient_alignment import (
    DEFAULT_LABEL_EPS,
    LOSSES,
    LabelState,
    classifier_loss,
    is_update_epoch,
)
from cdul_training.metrics import mean_average_precision
from cdul_training.plots import plot_run
from cdul_training.records import (
    PseudoLabelFile,
    RecordError,
    ground_truth_matrix,
    read_ground_truth,
    read_pseudo_labels,
    write_pseudo_labels,
)

_logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
FINAL_CHECKPOINT = "final.pt"
METRICS_FILE = "metrics.jsonl"
SETTINGS_FILE = "settings.json"
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("cosine", "constant")
# Options that change how a run executes but not its result, so `--resume` may change them.
RUNTIME_OPTIONS = ("threads", "workers", "device")
# Peak learning rate by arch: a linear head on unit-norm embeddings needs larger steps.
DEFAULT_LR = {"clip-linear": 0.1, "clip-windows": 3e-3, "default": 1e-3}
# Label step size by loss. The kl gradient of a label is taken after normalizing the labels of an
# image to one distribution, so it has no part that moves all labels of an image alike and
# tolerates larger steps than bce. docs/training.md gives the measurements behind these values.
DEFAULT_LABEL_LR = {"bce": 0.1, "kl": 0.3}


@dataclass
class FitConfig:
    """Settings of one training run, written to `settings.json` and into every checkpoint."""

    images: str | None
    pseudo_labels: list[str]
    out: str
    arch: str = "small-cnn"
    weights: str = "none"
    loss: str = "bce"
    epochs: int = 20
    warmup: int = 5
    update_every: int = 1
    sigma: float = 1.0
    label_lr: float | None = None  # None: DEFAULT_LABEL_LR of the loss
    label_eps: float = DEFAULT_LABEL_EPS
    batch_size: int = 32
    lr: float | None = None  # None: DEFAULT_LR of the arch
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    lr_schedule: str = "cosine"
    image_size: int | None = None
    augment: str = "none"
    seed: int = 0
    threads: int = 0
    workers: int = 0
    device: str = "auto"
    val_images: str | None = None
    val_labels: str | None = None
    val_pseudo_labels: str | None = None
    train_labels: str | None = None
    clip_model: str | None = None

    def validate(self) -> None:
        """Check every value, naming the bad one and the fix.

        Raises:
            ValueError: the first invalid setting.
        """
        choices = {
            "arch": ARCHS,
            "loss": LOSSES,
            "optimizer": OPTIMIZERS,
            "lr_schedule": LR_SCHEDULES,
            "augment": AUGMENTATIONS,
            "device": DEVICES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{_flag(name)} {getattr(self, name)!r}: use one of {allowed}")
        minimum = {"epochs": 1, "batch_size": 1, "warmup": 0, "update_every": 0, "threads": 0}
        minimum |= {"workers": 0}
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise ValueError(f"--{_flag(name)} {getattr(self, name)}: must be >= {low}")
        if self.label_lr is None:
            self.label_lr = DEFAULT_LABEL_LR[self.loss]
        if self.lr is None:
            self.lr = DEFAULT_LR.get(self.arch, DEFAULT_LR["default"])
        for name in ("sigma", "lr", "label_lr", "weight_decay"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"--{_flag(name)} {getattr(self, name)}: must be a finite number")
        for name in ("sigma", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{_flag(name)} {getattr(self, name)}: must be positive")
        for name in ("label_lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{_flag(name)} {getattr(self, name)}: must be >= 0")
        if not 0 < self.label_eps < 0.5:
            raise ValueError(f"--label-eps {self.label_eps}: must be in (0, 0.5)")
        if self.image_size is not None and self.image_size < 16:
            raise ValueError(f"--image-size {self.image_size}: must be at least 16 pixels")
        if self.arch != "clip-linear" and not self.images:
            raise ValueError(f"--images is required for --arch {self.arch}")
        if (self.val_images or self.val_pseudo_labels) and not self.val_labels:
            raise ValueError("a validation set needs --val-labels (its ground truth)")
        if self.val_labels and self.arch == "clip-linear" and not self.val_pseudo_labels:
            raise ValueError(
                "clip-linear validates on --val-pseudo-labels (records with embeddings)"
            )
        if self.val_labels and self.arch != "clip-linear" and not self.val_images:
            raise ValueError("--val-labels needs --val-images")
        if self.weights != "none" and not self.arch.startswith("resnet"):
            raise ValueError(
                f"--weights {self.weights!r} applies to ResNets only; use 'none' with {self.arch}"
            )
        if self.arch == "clip-windows":
            if not self.clip_model:
                raise ValueError(
                    "--arch clip-windows embeds the images with a CLIP model: pass --clip-model "
                    "DIR, a CLIP folder of a model repository (the one that labeled the corpus)"
                )
            if self.augment != "none":
                raise ValueError(
                    f"--augment {self.augment}: clip-windows embeds each image once, so it "
                    "trains without augmentation; use --augment none"
                )


def _flag(name: str) -> str:
    return name.replace("_", "-")


@dataclass
class FitResult:
    """Result of a finished run: the run folder and the per-epoch metrics."""

    run_dir: Path
    history: list[dict[str, Any]]
    labels: np.ndarray
    ids: list[str] = field(default_factory=list)


@dataclass
class _Corpus:
    pseudo: PseudoLabelFile
    dataset: Dataset
    train_truth: np.ndarray | None
    val_dataset: Dataset | None
    val_truth: np.ndarray | None
    image_size: int | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    embedding_dim: int | None
    clip: dict[str, Any] | None


def _preprocess_for(config: FitConfig) -> tuple[int | None, Any, Any, dict[str, Any] | None]:
    """Return (image size, mean, std, CLIP model config) of the run's inputs."""
    clip_config = None
    if config.clip_model:
        folder = Path(config.clip_model)
        path = folder / "config.json"
        if not folder.is_dir():
            raise RecordError(
                f"--clip-model {config.clip_model}: not a folder; pass the CLIP folder of a "
                "model repository"
            )
        if not path.is_file():
            raise RecordError(f"--clip-model {config.clip_model}: no config.json in that folder")
        try:
            clip_config = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise RecordError(f"{path}: invalid JSON ({err})") from None
        preprocess = clip_config.get("preprocess") if isinstance(clip_config, dict) else None
        missing = [
            key
            for key in ("size", "mean", "std")
            if not isinstance(preprocess, dict) or key not in preprocess
        ]
        if missing:
            raise RecordError(
                f"{path}: missing preprocess {', '.join(missing)}; pass the CLIP folder of a "
                "model repository, whose config.json cdul-export wrote"
            )
    if config.arch == "clip-linear":
        if clip_config is None:
            return None, None, None, None
        pre = clip_config["preprocess"]
        return int(pre["size"]), tuple(pre["mean"]), tuple(pre["std"]), clip_config
    if config.arch == "clip-windows":
        if clip_config is None:
            raise RecordError("--arch clip-windows needs --clip-model")
        pre = clip_config["preprocess"]
        try:
            side = input_side(int(pre["size"]))
        except ValueError as err:
            raise RecordError(f"--clip-model {config.clip_model}: {err}") from err
        if config.image_size is not None and config.image_size != side:
            raise RecordError(
                f"--image-size {config.image_size}: clip-windows takes 3 times the CLIP input "
                f"side of --clip-model, {side} px; leave --image-size out"
            )
        return side, tuple(pre["mean"]), tuple(pre["std"]), clip_config
    size = config.image_size or DEFAULT_IMAGE_SIZE[config.arch]
    if config.arch in SMALL_CNNS:
        return size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), clip_config
    return size, IMAGENET_MEAN, IMAGENET_STD, clip_config


def load_corpus(config: FitConfig) -> _Corpus:
    """Read and check every input before training starts.

    Raises:
        RecordError: the first offending file, record or image.
    """
    pseudo = read_pseudo_labels([Path(p) for p in config.pseudo_labels])
    if not pseudo.records:
        raise RecordError(f"{config.pseudo_labels[0]}: no records, nothing to train on")
    image_size, mean, std, clip_config = _preprocess_for(config)
    embedding_dim = None
    clip = None
    val_dataset: Dataset | None = None
    val_truth = None
    if config.arch == "clip-linear":
        embeddings = pseudo.embeddings()
        embedding_dim = int(embeddings.shape[1])
        if config.images:
            match_records(list_images(Path(config.images)), pseudo)
        dataset: Dataset = EmbeddingDataset(embeddings)
        clip = {"model": pseudo.header.get("model"), "embedding_dim": embedding_dim}
        clip["model_config"] = clip_config
        if config.val_pseudo_labels:
            val = read_pseudo_labels(Path(config.val_pseudo_labels))
            if val.classes != pseudo.classes:
                raise RecordError(
                    f"--val-pseudo-labels classes {val.classes} differ from the training "
                    f"classes {pseudo.classes}: label both with the same class list"
                )
            val_dataset = EmbeddingDataset(val.embeddings())
            val_truth = _truth(config.val_labels, pseudo.classes, val.ids, "--val-labels")
    elif config.arch == "clip-windows":
        dataset, val_dataset, val_truth, clip = _embed_corpus(config, pseudo, image_size, mean, std)
        embedding_dim = int(clip["embedding_dim"])
        clip["model_config"] = clip_config
    else:
        if image_size is None or mean is None or std is None:
            raise RuntimeError(f"no preprocessing settings for --arch {config.arch}")
        paths = match_records(list_images(Path(config.images or "")), pseudo)
        dataset = ImageDataset(paths, image_size, mean, std, config.augment, config.seed)
        if config.val_images:
            val_images = list_images(Path(config.val_images))
            val_dataset = ImageDataset(list(val_images.values()), image_size, mean, std)
            val_truth = _truth(config.val_labels, pseudo.classes, list(val_images), "--val-labels")
    train_truth = None
    if config.train_labels:
        train_truth = _truth(config.train_labels, pseudo.classes, pseudo.ids, "--train-labels")
    return _Corpus(
        pseudo,
        dataset,
        train_truth,
        val_dataset,
        val_truth,
        image_size,
        mean,
        std,
        embedding_dim,
        clip,
    )


def _embed_corpus(
    config: FitConfig, pseudo: PseudoLabelFile, image_size: Any, mean: Any, std: Any
) -> tuple[Dataset, Dataset | None, np.ndarray | None, dict[str, Any]]:
    """Embed the windows of the training and validation images with the frozen CLIP model."""
    from cdul_server.model_repository import (
        ClipModel,
        ModelRepositoryError,
        SessionConfig,
        load_model,
    )

    folder = Path(config.clip_model or "")
    try:
        clip = load_model(folder, SessionConfig(intra_op_threads=config.threads))
    except ModelRepositoryError as err:
        raise RecordError(f"--clip-model {folder}: {err}") from err
    if not isinstance(clip, ClipModel):
        raise RecordError(
            f"--clip-model {folder} is a {clip.config.get('kind')} model: pass a CLIP folder"
        )
    paths = match_records(list_images(Path(config.images or "")), pseudo)
    images = ImageDataset(paths, image_size, mean, std)
    dataset: Dataset = EmbeddingDataset(embed_windows(clip, images, set_name="training images"))
    val_dataset: Dataset | None = None
    val_truth = None
    if config.val_images:
        val_images = list_images(Path(config.val_images))
        val_pixels = ImageDataset(list(val_images.values()), image_size, mean, std)
        val_dataset = EmbeddingDataset(
            embed_windows(clip, val_pixels, set_name="validation images")
        )
        val_truth = _truth(config.val_labels, pseudo.classes, list(val_images), "--val-labels")
    return (
        dataset,
        val_dataset,
        val_truth,
        {"model": clip.name, "embedding_dim": clip.embedding_dim},
    )


def _truth(path: str | None, classes: list[str], ids: list[str], what: str) -> np.ndarray:
    gt_classes, gt_labels = read_ground_truth(Path(path or ""))
    return ground_truth_matrix(classes, ids, gt_classes, gt_labels, what=f"{what} {path}")


def _make_optimizer(config: FitConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    lr = config.lr if config.lr is not None else DEFAULT_LR["default"]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=0.9, weight_decay=config.weight_decay, nesterov=True
        )
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)


def _make_scheduler(
    config: FitConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, config.epochs * steps_per_epoch)
    if config.lr_schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    )


def _scores(logits: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-class scores of a classifier trained with `loss`: sigmoid for bce, softmax for kl."""
    return torch.softmax(logits, dim=1) if loss == "kl" else torch.sigmoid(logits)


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    loss: str,
    workers: int = 0,
) -> np.ndarray:
    """Return the classifier's per-class scores (N, C) on `dataset`, in dataset order."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    out = []
    for inputs, _ in loader:
        out.append(_scores(model(inputs.to(device)), loss).cpu())
    model.train(was_training)
    return torch.cat(out).numpy().astype(np.float64)


def _map_or_none(scores: np.ndarray, truth: np.ndarray | None) -> float | None:
    if truth is None:
        return None
    result = mean_average_precision(scores, truth)
    return None if math.isnan(result.map) else float(result.map)


class _Trainer:
    """The state of one run on one process: model, optimizer, labels, history."""

    def __init__(self, config: FitConfig, context: DistributedContext) -> None:
        self.config = config
        self.context = context
        self.run_dir = Path(config.out)
        self.corpus = load_corpus(config)
        pseudo = self.corpus.pseudo
        torch.manual_seed(config.seed)
        model = build_classifier(
            config.arch, len(pseudo.classes), config.weights, self.corpus.embedding_dim
        ).to(context.device)
        self.model = model
        self.ddp_model: nn.Module = (
            DistributedDataParallel(model, device_ids=None) if context.distributed else model
        )
        self.sampler: DistributedSampler[int] = DistributedSampler(
            self.corpus.dataset,
            num_replicas=context.world_size,
            rank=context.rank,
            shuffle=True,
            seed=config.seed,
        )
        self.loader = DataLoader(
            self.corpus.dataset,
            batch_size=config.batch_size,
            sampler=self.sampler,
            num_workers=config.workers,
        )
        self.optimizer = _make_optimizer(config, model)
        self.scheduler = _make_scheduler(config, self.optimizer, len(self.loader))
        self.labels = LabelState(
            torch.from_numpy(pseudo.labels("final")),
            sigma=config.sigma,
            label_lr=DEFAULT_LABEL_LR[config.loss] if config.label_lr is None else config.label_lr,
            eps=config.label_eps,
        )
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"epoch": 0, "val_map": None}
        self.epoch = 0

    # The run folder -------------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any]:
        """Return everything a resume or an export needs, as torch-serializable objects."""
        corpus = self.corpus
        preprocess = None
        if corpus.image_size is not None and corpus.mean is not None and corpus.std is not None:
            preprocess = {
                "size": corpus.image_size,
                "mean": list(corpus.mean),
                "std": list(corpus.std),
                "interpolation": "bilinear",
                "resize_mode": "squash",
                "fill_color": 0,
            }
            if (
                self.config.arch == "clip-linear"
                and corpus.clip
                and corpus.clip.get("model_config")
            ):
                preprocess = dict(corpus.clip["model_config"]["preprocess"])
        return {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "arch": self.config.arch,
            "num_classes": len(corpus.pseudo.classes),
            "class_names": list(corpus.pseudo.classes),
            "image_size": corpus.image_size,
            "preprocess": preprocess,
            "activation": "softmax" if self.config.loss == "kl" else "sigmoid",
            "embedding_dim": corpus.embedding_dim,
            "clip": corpus.clip,
            "epoch": self.epoch,
            "settings": dataclasses.asdict(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "pseudo_labels": {
                "ids": corpus.pseudo.ids,
                "labels": self.labels.labels.to(torch.float32),
                **self.labels.state_dict(),
            },
            "rng": {"torch": torch.get_rng_state()},
            "history": self.history,
            "best": self.best,
            "world_size": self.context.world_size,
            "created_by": f"cdul-train {__version__}",
            "torch_version": str(torch.__version__),
        }

    def save(self, name: str) -> None:
        """Write the checkpoint under `name` in the run folder, atomically."""
        path = self.run_dir / name
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.checkpoint(), tmp)
        tmp.replace(path)

    def resume(self) -> None:
        """Restore the state of `last.pt` in the run folder."""
        path = self.run_dir / LAST_CHECKPOINT
        state = torch.load(path, map_location=self.context.device, weights_only=True)
        if state["pseudo_labels"]["ids"] != self.corpus.pseudo.ids:
            raise RecordError(
                f"{path}: the checkpoint's image ids differ from --pseudo-labels: resume with "
                "the same pseudo-label file"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.labels.load_state_dict(
            {k: v.cpu() for k, v in state["pseudo_labels"].items() if k in ("latent", "initial")}
        )
        torch.set_rng_state(state["rng"]["torch"].cpu())
        self.history = list(state["history"])
        self.best = dict(state["best"])
        self.epoch = int(state["epoch"])
        _logger.info("resumed %s at epoch %d of %d", self.run_dir, self.epoch, self.config.epochs)

    def write_metrics(self) -> None:
        """Rewrite metrics.jsonl and the plots from the history."""
        lines = "".join(json.dumps(entry) + "\n" for entry in self.history)
        (self.run_dir / METRICS_FILE).write_text(lines, encoding="utf-8")
        plot_run(self.history, self.run_dir)

    def write_refined_labels(self) -> Path:
        """Write the refined pseudo labels in the input's record format; return the path."""
        pseudo = self.corpus.pseudo
        suffix = ".parquet" if self.config.pseudo_labels[0].endswith(".parquet") else ".jsonl"
        path = self.run_dir / f"pseudo_labels.refined{suffix}"
        header = dict(pseudo.header)
        header["refined_by"] = {"run": self.run_dir.name, "epoch": self.epoch}
        refined = self.labels.labels.numpy()
        records = []
        for record, labels in zip(pseudo.records, refined, strict=True):
            out = dict(record)
            out["initial"] = record["final"]
            out["final"] = [float(v) for v in labels]
            records.append(out)
        write_pseudo_labels(path, header, records)
        return path

    # Training ---------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """Return val mAP and pseudo-label mAP (percent, None where no ground truth)."""
        corpus = self.corpus
        entry: dict[str, Any] = {}
        if corpus.val_dataset is not None:
            scores = predict(
                self.model,
                corpus.val_dataset,
                self.config.batch_size,
                self.context.device,
                self.config.loss,
                self.config.workers,
            )
            entry["val_map"] = _map_or_none(scores, corpus.val_truth)
        if corpus.train_truth is not None:
            labels = self.labels.labels.numpy()
            entry["pseudo_label_map"] = _map_or_none(labels, corpus.train_truth)
        return entry

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """Run one epoch; on an update epoch, take the label step at its end."""
        config, context = self.config, self.context
        update = is_update_epoch(epoch, config.warmup, config.update_every)
        self.sampler.set_epoch(epoch)
        self.corpus.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
        self.ddp_model.train()
        n_images, n_classes = self.labels.latent.shape
        logit_sum = torch.zeros((n_images, n_classes), dtype=torch.float64, device=context.device)
        seen = torch.zeros(n_images, dtype=torch.float64, device=context.device)
        totals = torch.zeros(2, dtype=torch.float64, device=context.device)
        lr = self.optimizer.param_groups[0]["lr"]
        started = time.perf_counter()
        for inputs, indices in self.loader:
            inputs = inputs.to(context.device, non_blocking=True)
            targets = self.labels.batch(indices).to(context.device)
            logits = self.ddp_model(inputs)
            loss = classifier_loss(logits, targets, config.loss)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            totals[0] += float(loss.detach()) * len(indices)
            totals[1] += len(indices)
            if update:
                index = indices.to(context.device)
                logit_sum.index_add_(0, index, logits.detach().to(torch.float64))
                seen.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
        all_reduce_sum(totals, context)
        entry: dict[str, Any] = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": float(totals[0] / totals[1]),
            "label_update": update,
        }
        if update:
            # The sampler pads the last shard with repeated images, so average their logits.
            all_reduce_sum(logit_sum, context)
            all_reduce_sum(seen, context)
            mean_logits = (logit_sum / seen.clamp(min=1).unsqueeze(1)).cpu()
            stats = self.labels.update(mean_logits, config.loss, mask=(seen > 0).cpu())
            entry |= stats.to_dict()
        entry["time_s"] = round(time.perf_counter() - started, 3)
        return entry

    def run(self, epoch_callback: Callable[[int], None] | None = None) -> None:
        """Train from `self.epoch + 1` to the last epoch, writing the run folder on rank 0."""
        config, context = self.config, self.context
        if self.epoch == 0:
            entry = {"epoch": 0, "train_loss": None, "label_update": False}
            entry |= self.evaluate() if context.is_main else {}
            self.history.append(entry)
            if context.is_main:
                self.write_metrics()
        for epoch in range(self.epoch + 1, config.epochs + 1):
            entry = self.train_epoch(epoch)
            self.epoch = epoch
            if context.is_main:
                entry |= self.evaluate()
                self.history.append(entry)
                _logger.info("epoch %d: %s", epoch, _summary(entry))
                self._save_epoch(entry)
            barrier(context)
            if epoch_callback is not None:
                epoch_callback(epoch)
        if context.is_main:
            self.save(FINAL_CHECKPOINT)
            if self.best["epoch"] == 0 or self.best["val_map"] is None:
                self.save(BEST_CHECKPOINT)
            path = self.write_refined_labels()
            self.write_metrics()
            _logger.info("wrote %s and the checkpoints in %s", path.name, self.run_dir)
        barrier(context)

    def _save_epoch(self, entry: dict[str, Any]) -> None:
        val_map = entry.get("val_map")
        improved = val_map is not None and (
            self.best["val_map"] is None or val_map > self.best["val_map"]
        )
        if improved:
            self.best = {"epoch": entry["epoch"], "val_map": val_map}
        # NOTE: without a validation set the best checkpoint is the last epoch's.
        self.save(LAST_CHECKPOINT)
        if improved:
            self.save(BEST_CHECKPOINT)
        self.write_metrics()


def _summary(entry: dict[str, Any]) -> str:
    keys = ("train_loss", "val_map", "pseudo_label_map", "label_mean_abs_change")
    parts = [f"{k}={entry[k]:.4g}" for k in keys if isinstance(entry.get(k), float)]
    return " ".join(parts)


def train(
    config: FitConfig,
    *,
    resume: bool = False,
    epoch_callback: Callable[[int], None] | None = None,
) -> FitResult:
    """Train one run and write its folder; see the module docstring.

    Args:
        config: the run's settings; `config.out` is the run folder.
        resume: continue from `last.pt` in the run folder instead of starting over.
        epoch_callback: called with the epoch number after each epoch is saved.

    Raises:
        RecordError: bad input, found before training starts.
        ValueError: a bad setting.
    """
    config.validate()
    context = init_distributed(config.device)
    try:
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        run_dir = Path(config.out)
        if context.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        barrier(context)
        trainer = _Trainer(config, context)
        if resume:
            trainer.resume()
        elif context.is_main:
            settings = dataclasses.asdict(config) | {"world_size": context.world_size}
            settings["created_by"] = f"cdul-train {__version__}"
            (run_dir / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        _logger.info("settings: %s", json.dumps(dataclasses.asdict(config)))
        trainer.run(epoch_callback)
        history = broadcast_object(trainer.history, context)
        assert isinstance(history, list)
        return FitResult(run_dir, history, trainer.labels.labels.numpy(), trainer.corpus.pseudo.ids)
    finally:
        shutdown(context)


def load_settings(run_dir: Path) -> FitConfig:
    """Return the settings of the run in `run_dir`.

    Raises:
        RecordError: no run there.
    """
    path = run_dir / SETTINGS_FILE
    if not path.is_file() or not (run_dir / LAST_CHECKPOINT).is_file():
        raise RecordError(
            f"--resume {run_dir}: no {SETTINGS_FILE} and {LAST_CHECKPOINT} there; pass the run "
            "folder of a run that finished at least one epoch"
        )
    saved = json.loads(path.read_text(encoding="utf-8"))
    names = {f.name for f in dataclasses.fields(FitConfig)}
    return FitConfig(**{k: v for k, v in saved.items() if k in names})


# Command line ---------------------------------------------------------------------------------

_DEFAULTS = FitConfig(images=None, pseudo_labels=[], out="")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `cdul-train fit`."""
    d = _DEFAULTS
    inputs = parser.add_argument_group("inputs and outputs")
    inputs.add_argument(
        "--images",
        help="training images: a folder (searched recursively; id = path relative to it) or a "
        "text file with one path a line (id = the line); optional for clip-linear",
    )
    inputs.add_argument(
        "--pseudo-labels",
        nargs="+",
        metavar="FILE",
        help="pseudo-label file(s) of the training images, JSON Lines or .parquet; several "
        "files are shards of one corpus and must share the class list",
    )
    inputs.add_argument("--out", help="run folder to write (created if missing)")
    inputs.add_argument(
        "--resume",
        metavar="RUNDIR",
        help="continue the interrupted run in RUNDIR from its last epoch with its saved "
        "settings; only --threads, --workers and --device may differ",
    )
    inputs.add_argument("--val-images", help="validation images (folder or list), for val mAP")
    inputs.add_argument(
        "--val-labels", help="ground truth of the validation images (docs/formats.md)"
    )
    inputs.add_argument(
        "--val-pseudo-labels",
        help="clip-linear only: records of the validation images carrying 'embedding'",
    )
    inputs.add_argument(
        "--train-labels",
        help="ground truth of the training images, used only to report pseudo-label mAP",
    )
    inputs.add_argument(
        "--clip-model",
        help="folder of the CLIP model that labeled the corpus (its config.json is stored in "
        "the checkpoint; clip-linear takes its preprocessing from it; clip-windows embeds the "
        "images with it and needs it)",
    )

    model = parser.add_argument_group("model and loss")
    model.add_argument("--arch", choices=ARCHS, help=f"classifier (default {d.arch})")
    model.add_argument(
        "--weights",
        help="ResNet weights: none (random init), imagenet (torchvision download) or a state "
        f"dict PATH (default {d.weights})",
    )
    model.add_argument(
        "--loss",
        choices=LOSSES,
        help="bce: sigmoid outputs vs soft labels; kl: softmax outputs vs labels normalized to "
        f"a distribution (default {d.loss})",
    )
    model.add_argument(
        "--image-size",
        type=int,
        help="input side in pixels; images are resized (squashed) to it (default 448 for "
        "ResNets, 64 for small-cnn and cnn-maxavg; clip-linear takes none; clip-windows takes "
        "3 times the CLIP input side)",
    )
    model.add_argument(
        "--augment",
        choices=AUGMENTATIONS,
        help="training views: random resized crop (60-100%% of the area) and/or horizontal "
        f"flip (default {d.augment})",
    )

    alignment = parser.add_argument_group("gradient alignment")
    alignment.add_argument(
        "--warmup", type=int, help=f"epochs of network-only training first (default {d.warmup})"
    )
    alignment.add_argument(
        "--update-every",
        type=int,
        help="update the labels after every N-th epoch once warm-up is over; 0 = never, the "
        f"control run (default {d.update_every})",
    )
    alignment.add_argument(
        "--sigma",
        type=float,
        help=f"standard deviation of the Gaussian weight psi around 0.5 (default {d.sigma})",
    )
    alignment.add_argument(
        "--label-lr",
        type=float,
        help="label step size: u -= label_lr * psi(y) * dL/dy with the summed loss, so for bce "
        "a label moves label_lr * psi * |logit| on the logit scale (default "
        f"{DEFAULT_LABEL_LR['bce']} for bce, {DEFAULT_LABEL_LR['kl']} for kl)",
    )
    alignment.add_argument(
        "--label-eps",
        type=float,
        help=f"labels stay inside [eps, 1 - eps] (default {d.label_eps})",
    )

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--epochs", type=int, help=f"training epochs (default {d.epochs})")
    optim.add_argument(
        "--batch-size",
        type=int,
        help=f"images per step and process (default {d.batch_size})",
    )
    optim.add_argument(
        "--lr",
        type=float,
        help=f"peak learning rate (default {DEFAULT_LR['clip-linear']} for clip-linear, "
        f"{DEFAULT_LR['clip-windows']} for clip-windows, {DEFAULT_LR['default']} otherwise)",
    )
    optim.add_argument(
        "--weight-decay", type=float, help=f"weight decay (default {d.weight_decay})"
    )
    optim.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help=f"adamw or sgd (momentum 0.9, Nesterov) (default {d.optimizer})",
    )
    optim.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        help=f"cosine decay to 0 over all steps, or constant (default {d.lr_schedule})",
    )
    optim.add_argument("--seed", type=int, help=f"seed of init, order and views (default {d.seed})")

    runtime = parser.add_argument_group("runtime")
    runtime.add_argument(
        "--threads", type=int, help="torch CPU threads; 0 = torch's default (default 0)"
    )
    runtime.add_argument(
        "--workers", type=int, help="data loader worker processes; 0 = in-process (default 0)"
    )
    runtime.add_argument(
        "--device",
        choices=DEVICES,
        help="auto uses CUDA when present; cuda fails when absent (default auto)",
    )


def config_from_args(args: argparse.Namespace) -> tuple[FitConfig, bool]:
    """Build the run settings from parsed options; returns (config, resume).

    Raises:
        UsageError: a missing or conflicting option.
    """
    from cdul_training.cli import UsageError

    names = [f.name for f in dataclasses.fields(FitConfig)]
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if args.resume:
        saved = load_settings(Path(args.resume))
        if "out" in given and Path(given["out"]).resolve() != Path(args.resume).resolve():
            raise UsageError(
                f"--out {given['out']} differs from --resume {args.resume}: drop --out"
            )
        given.pop("out", None)
        for name, value in given.items():
            if name not in RUNTIME_OPTIONS and value != getattr(saved, name):
                raise UsageError(
                    f"--{_flag(name)} {value!r} differs from the run's {getattr(saved, name)!r}: "
                    "a resumed run keeps its settings; drop the option or start a new run"
                )
        config = dataclasses.replace(saved, **{k: given[k] for k in RUNTIME_OPTIONS if k in given})
        config.out = str(Path(args.resume))
        return config, True
    for required in ("pseudo_labels", "out"):
        if required not in given:
            raise UsageError(f"--{_flag(required)} is required (or --resume RUNDIR)")
    config = dataclasses.replace(_DEFAULTS, **given)
    return config, False


def run(args: argparse.Namespace) -> int:
    """Run `cdul-train fit`; bad input exits 2 before training starts."""
    from cdul_training.cli import UsageError

    try:
        config, resume = config_from_args(args)
        config.validate()
        result = train(config, resume=resume)
    except RecordError as err:
        raise UsageError(str(err)) from err
    except ValueError as err:
        raise UsageError(str(err)) from err
    last = result.history[-1] if result.history else {}
    print(f"run folder: {result.run_dir}")
    print(f"epochs: {last.get('epoch')}  final: {_summary(last)}")
    return 0
