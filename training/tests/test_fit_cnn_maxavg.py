"""The small CNNs with global max+avg pooling: shapes, pooling, fit, reload and ONNX export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cdul_training.classifiers import SMALL_CNNS, SmallCNN, build_classifier, load_classifier
from cdul_training.cli import main
from cdul_training.synthetic import make_corpus

torch.set_num_threads(1)


@pytest.mark.parametrize("arch", sorted(SMALL_CNNS))
def test_small_cnn_output_shape(arch: str) -> None:
    model = build_classifier(arch, 7).eval()
    with torch.no_grad():
        assert model(torch.zeros(3, 3, 48, 48)).shape == (3, 7)
    width, pooling = SMALL_CNNS[arch]
    assert model.head.in_features == 4 * width * (2 if pooling == "max+avg" else 1)


def test_max_pooling_responds_to_one_small_spot() -> None:
    # Only a max over positions keeps a feature that fires at one place as strong as it is
    # there, so the max+avg head gets a channel maximum above the channel mean.
    torch.manual_seed(0)
    model = SmallCNN(4, width=8, pooling="max+avg").eval()
    pixels = torch.zeros(1, 3, 64, 64)
    pixels[:, :, 30:36, 30:36] = 1.0
    with torch.no_grad():
        features = model.features(pixels)
    maxima = torch.amax(features, dim=(2, 3))
    means = features.mean(dim=(2, 3))
    assert bool((maxima > means + 1e-6).any())


def test_small_cnn_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="unknown pooling"):
        SmallCNN(3, pooling="min")
    with pytest.raises(ValueError, match="width 0"):
        SmallCNN(3, width=0)
    with pytest.raises(ValueError, match="applies to ResNets only"):
        build_classifier("cnn-maxavg", 3, weights="imagenet")


def test_fit_reload_and_export_cnn_maxavg(tmp_path: Path, shared_data: Path) -> None:
    from cdul_export.classifier_export import ClassifierExportOptions, export_classifier

    corpus = make_corpus(tmp_path / "train", 24, image_size=16, seed=3)
    out = tmp_path / "run"
    argv = ["--log-level", "WARNING", "fit", "--images", str(corpus.images)]
    argv += ["--pseudo-labels", str(corpus.pseudo_labels), "--out", str(out)]
    argv += ["--arch", "cnn-maxavg", "--image-size", "16", "--epochs", "1", "--threads", "1"]
    assert main(argv) == 0
    model, checkpoint = load_classifier(out / "final.pt")
    assert checkpoint["arch"] == "cnn-maxavg"
    assert checkpoint["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert isinstance(model, SmallCNN) and model.pooling == "max+avg"
    folder = export_classifier(
        ClassifierExportOptions(
            checkpoint=out / "final.pt",
            out=tmp_path / "models" / "digits",
            parity_images=shared_data / "coco128" / "images",
            parity_count=4,
            parity_batch_sizes=(1, 3),
            threads=1,
        )
    )
    assert (folder / "model.onnx").is_file()

    config = json.loads((folder / "config.json").read_text())
    assert config["training"]["arch"] == "cnn-maxavg"
    assert config["export"]["parity"]["min_cosine"] >= 0.9999
    assert np.isfinite(config["export"]["parity"]["max_abs_logit_diff"])
