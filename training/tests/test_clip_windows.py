"""`clip-windows`: the window cutting, the multiple-instance head and `cdul-train fit` with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from cdul_training.classifiers import build_classifier, load_classifier
from cdul_training.cli import main
from cdul_training.clip_windows import (
    N_VIEWS,
    WindowHead,
    WindowViews,
    check_view_side,
    embed_windows,
    input_side,
    views_per_scale,
)
from cdul_training.synthetic import make_corpus

torch.set_num_threads(1)


def test_views_per_scale_and_input_side() -> None:
    assert views_per_scale() == (1, 9, 25)
    assert N_VIEWS == 35
    assert input_side(32) == 96
    with pytest.raises(ValueError, match="even input side"):
        check_view_side(33)


def test_window_views_cut_the_expected_windows() -> None:
    side = 8
    pixels = torch.randn(2, 3, 3 * side, 3 * side)
    views = WindowViews(side)(pixels).reshape(2, N_VIEWS, 3, side, side)
    # First the whole image averaged 3 x 3, then windows of 2/3 of the side averaged 2 x 2 at a
    # stride of side / 2, then windows of the CLIP side at the same stride.
    torch.testing.assert_close(views[:, 0], F.avg_pool2d(pixels, 3))
    torch.testing.assert_close(views[:, 1], F.avg_pool2d(pixels[:, :, :16, :16], 2))
    torch.testing.assert_close(views[:, 9], F.avg_pool2d(pixels[:, :, 8:24, 8:24], 2))
    torch.testing.assert_close(views[:, 10], pixels[:, :, :8, :8])
    torch.testing.assert_close(views[:, 11], pixels[:, :, :8, 4:12])
    torch.testing.assert_close(views[:, 34], pixels[:, :, 16:24, 16:24])


def test_window_head_takes_the_strongest_window_per_scale() -> None:
    torch.manual_seed(0)
    head = WindowHead(embedding_dim=6, num_classes=4)
    embeddings = torch.randn(3, N_VIEWS, 6)
    logits = head(embeddings)
    assert logits.shape == (3, 4)
    # Shuffling the windows within a scale leaves the logits unchanged ...
    order = torch.cat([torch.tensor([0]), 1 + torch.randperm(9), 10 + torch.randperm(25)])
    torch.testing.assert_close(head(embeddings[:, order]), logits)
    # ... and the flat layout of the exported graph gives the same logits.
    torch.testing.assert_close(head(embeddings.reshape(-1, 6)), logits)
    # Moving a window to another scale changes them.
    swapped = embeddings.clone()
    swapped[:, [0, 20]] = embeddings[:, [20, 0]]
    assert not torch.allclose(head(swapped), logits)


def test_build_classifier_needs_the_embedding_size() -> None:
    assert isinstance(build_classifier("clip-windows", 3, embedding_dim=8), WindowHead)
    with pytest.raises(ValueError, match="embedding size"):
        build_classifier("clip-windows", 3)
    with pytest.raises(ValueError, match="ResNets only"):
        build_classifier("clip-windows", 3, weights="imagenet", embedding_dim=8)


def _clip_dir(tiny_model_repository: Path) -> Path:
    return tiny_model_repository / "tiny-clip"


def test_embed_windows_matches_encoding_each_view(tiny_model_repository: Path) -> None:
    from cdul_server.model_repository import ClipModel, SessionConfig, load_model

    clip = load_model(_clip_dir(tiny_model_repository), SessionConfig(intra_op_threads=1))
    assert isinstance(clip, ClipModel)
    side = clip.preprocess.size
    items = [(torch.randn(3, 3 * side, 3 * side), i) for i in range(3)]
    embedded = embed_windows(clip, items, batch_size=2)
    assert embedded.shape == (3, N_VIEWS, clip.embedding_dim)
    last_views = WindowViews(side)(items[2][0][None]).numpy()
    np.testing.assert_allclose(embedded[2], clip.encode_images(last_views), atol=1e-5)


def _fit_argv(tmp_path: Path, clip_dir: Path, *extra: str) -> tuple[list[str], Path]:
    train_set = make_corpus(tmp_path / "train", 48, image_size=24, seed=4)
    val_set = make_corpus(tmp_path / "val", 24, image_size=24, seed=5)
    out = tmp_path / "run"
    argv = ["--log-level", "WARNING", "fit", "--arch", "clip-windows"]
    argv += ["--images", str(train_set.images), "--pseudo-labels", str(train_set.pseudo_labels)]
    argv += ["--val-images", str(val_set.images), "--val-labels", str(val_set.ground_truth)]
    argv += ["--train-labels", str(train_set.ground_truth), "--out", str(out)]
    argv += ["--clip-model", str(clip_dir), "--epochs", "4", "--warmup", "1", "--threads", "1"]
    return [*argv, *extra], out


def test_fit_clip_windows_trains_on_window_embeddings(
    tiny_model_repository: Path, tmp_path: Path
) -> None:
    clip_dir = _clip_dir(tiny_model_repository)
    argv, out = _fit_argv(tmp_path, clip_dir, "--batch-size", "8")
    assert main(argv) == 0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 5
    losses = [entry["train_loss"] for entry in history[1:]]
    assert losses[-1] < losses[0]
    assert any(entry["label_update"] for entry in history)
    model, checkpoint = load_classifier(out / "final.pt")
    assert isinstance(model, WindowHead)
    clip_config = json.loads((clip_dir / "config.json").read_text())
    side = clip_config["preprocess"]["size"]
    assert checkpoint["arch"] == "clip-windows"
    assert checkpoint["embedding_dim"] == clip_config["embedding_dim"]
    assert checkpoint["settings"]["clip_model"] == str(clip_dir)
    assert checkpoint["clip"]["model"] == "tiny-clip"
    assert checkpoint["preprocess"]["size"] == 3 * side
    assert checkpoint["preprocess"]["mean"] == clip_config["preprocess"]["mean"]
    assert (out / "pseudo_labels.refined.jsonl").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--augment", "flip"), "--augment flip"),
        (("--image-size", "64"), "--image-size 64"),
        (("--weights", "imagenet"), "applies to ResNets only"),
    ],
)
def test_fit_clip_windows_bad_options_exit_2(
    tiny_model_repository: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...],
    message: str,
) -> None:
    argv, _ = _fit_argv(tmp_path, _clip_dir(tiny_model_repository), *extra)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_fit_clip_windows_needs_a_clip_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, _ = _fit_argv(tmp_path, tmp_path / "none")
    index = argv.index("--clip-model")
    del argv[index : index + 2]
    assert main(argv) == 2
    assert "--clip-model DIR" in capsys.readouterr().err
