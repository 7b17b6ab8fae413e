"""Classifier architectures: output shapes, ResNet weight files, checkpoint reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from cdul_training.classifiers import build_classifier, load_classifier
from cdul_training.cli import main
from cdul_training.synthetic import make_corpus

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("arch", "inputs"),
    [
        ("small-cnn", torch.zeros(2, 3, 32, 32)),
        ("resnet50", torch.zeros(2, 3, 32, 32)),
        ("clip-linear", torch.zeros(2, 10)),
    ],
)
def test_classifier_output_shape(arch: str, inputs: torch.Tensor) -> None:
    model = build_classifier(arch, 7, embedding_dim=10).eval()
    with torch.no_grad():
        assert model(inputs).shape == (2, 7)


def test_resnet_loads_weight_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = torchvision.models.resnet50(weights=None)
    path = tmp_path / "resnet50.pt"
    torch.save(source.state_dict(), path)
    model = build_classifier("resnet50", 3, weights=str(path))
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 3


def test_resnet_rejects_wrong_weights(tmp_path: Path) -> None:
    path = tmp_path / "small.pt"
    torch.save(build_classifier("small-cnn", 3).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit this ResNet"):
        build_classifier("resnet50", 3, weights=str(path))
    with pytest.raises(ValueError, match="file not found"):
        build_classifier("resnet101", 3, weights=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="applies to ResNets only"):
        build_classifier("small-cnn", 3, weights="imagenet")


def test_checkpoint_reloads_trained_model(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "train", 24, image_size=16, seed=7)
    out = tmp_path / "run"
    argv = ["--log-level", "WARNING", "fit", "--images", str(corpus.images)]
    argv += ["--pseudo-labels", str(corpus.pseudo_labels), "--out", str(out)]
    argv += ["--image-size", "16", "--epochs", "1", "--threads", "1"]
    assert main(argv) == 0
    model, checkpoint = load_classifier(out / "final.pt")
    assert checkpoint["class_names"] == corpus.classes
    assert not model.training
    torch.manual_seed(0)  # the run's seed, so this is the network before training
    untrained = build_classifier("small-cnn", len(corpus.classes)).eval()
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(model(pixels), untrained(pixels))
    for key, tensor in checkpoint["model"].items():
        torch.testing.assert_close(model.state_dict()[key], tensor, msg=key)
    with pytest.raises(ValueError, match="not a cdul-classifier-checkpoint"):
        torch.save({"model": {}}, tmp_path / "other.pt")
        load_classifier(tmp_path / "other.pt")
