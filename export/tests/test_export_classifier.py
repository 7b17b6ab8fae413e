"""Export of cdul-train fit checkpoints: small CNN, clip-linear head, bad checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cdul_export.classifier_export import (
    ClassifierExportOptions,
    export_classifier,
    read_checkpoint,
)
from cdul_export.parity import ParityError, load_parity_images
from cdul_export.staging import ExportError
from cdul_server.model_repository import ClassifierModel, ClipModel, SessionConfig, load_model
from cdul_server.preprocess import PreprocessConfig, preprocess_batch
from cdul_training.classifiers import LinearHead, SmallCNN, build_classifier

THREADS = 2
CLASSES = ["zero", "one", "two", "three", "four"]
SMALL_PREPROCESS = {
    "size": 64,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "interpolation": "bilinear",
    "resize_mode": "squash",
    "fill_color": 0,
}


@pytest.fixture(scope="module", autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="module")
def coco_images(shared_data: Path) -> Path:
    return shared_data / "coco128" / "images"


def _fit_checkpoint(path: Path, model: torch.nn.Module, arch: str, **extra: object) -> Path:
    # The layout cdul-train fit writes (see docs/formats.md, "Classifier checkpoint").
    checkpoint = {
        "format": "cdul-classifier-checkpoint",
        "format_version": 1,
        "arch": arch,
        "num_classes": len(CLASSES),
        "class_names": CLASSES,
        "image_size": 64,
        "preprocess": SMALL_PREPROCESS,
        "activation": "sigmoid",
        "embedding_dim": None,
        "clip": None,
        "epoch": 3,
        "settings": {"arch": arch, "loss": "bce", "epochs": 3, "seed": 0, "lr": 0.001},
        "model": model.state_dict(),
        "optimizer": {"state": {}, "param_groups": []},
    }
    checkpoint.update(extra)
    torch.save(checkpoint, path)
    return path


def _options(checkpoint: Path, out: Path, coco_images: Path, **changes: object):
    values: dict = {
        "checkpoint": checkpoint,
        "out": out,
        "parity_images": coco_images,
        "parity_count": 8,
        "parity_batch_sizes": (1, 2, 7, 33),
        "threads": THREADS,
    }
    values.update(changes)
    return ClassifierExportOptions(**values)


def test_small_cnn_export_matches_torch(tmp_path: Path, coco_images: Path) -> None:
    torch.manual_seed(0)
    model = SmallCNN(len(CLASSES)).eval()
    checkpoint = _fit_checkpoint(tmp_path / "run.pt", model, "small-cnn")
    folder = export_classifier(
        _options(checkpoint, tmp_path / "models" / "digits", coco_images, quantize="int8")
    )
    config = json.loads((folder / "config.json").read_text())
    assert config["kind"] == "classifier"
    assert config["class_names"] == CLASSES
    assert config["preprocess"] == SMALL_PREPROCESS
    assert config["training"]["arch"] == "small-cnn"
    assert config["training"]["epoch"] == 3
    assert config["training"]["settings"]["loss"] == "bce"
    assert config["files"] == {"model": "model.onnx", "model_int8": "model.int8.onnx"}
    parity = config["export"]["parity"]
    assert parity["min_cosine"] >= 0.9999
    assert parity["max_abs_logit_diff"] <= 1e-3
    assert parity["batch_sizes"] == [1, 2, 7, 33]
    assert "int8_min_cosine" in parity

    classifier = load_model(folder, SessionConfig(intra_op_threads=THREADS))
    assert isinstance(classifier, ClassifierModel)
    images = [item.image for item in load_parity_images(coco_images, 5)]
    pixels = preprocess_batch(images, classifier.preprocess)
    with torch.inference_mode():
        expected = model(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(classifier.predict_logits(pixels), expected, atol=1e-4)


def test_read_checkpoint_tolerates_layouts(tmp_path: Path) -> None:
    model = SmallCNN(len(CLASSES))
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "other.pt"
    torch.save(
        {
            "model_state": state,
            "settings": {"arch": "small-cnn", "class_names": CLASSES, "image_size": 48},
        },
        path,
    )
    checkpoint = read_checkpoint(path)
    assert checkpoint.arch == "small-cnn"
    assert checkpoint.class_names == CLASSES
    assert checkpoint.image_size == 48
    assert set(checkpoint.state) == set(model.state_dict())


def test_checkpoint_with_wrong_class_count(tmp_path: Path, coco_images: Path) -> None:
    model = SmallCNN(len(CLASSES) + 2)
    checkpoint = _fit_checkpoint(tmp_path / "run.pt", model, "small-cnn")
    with pytest.raises(ExportError, match=r"head\.weight \(7, 128\) vs \(5, 128\)"):
        export_classifier(_options(checkpoint, tmp_path / "out", coco_images))
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_other_arch_lists_keys(tmp_path: Path, coco_images: Path) -> None:
    model = build_classifier("small-cnn", len(CLASSES))
    checkpoint = _fit_checkpoint(tmp_path / "run.pt", model, "resnet50")
    with pytest.raises(ExportError, match="missing keys") as info:
        export_classifier(_options(checkpoint, tmp_path / "out", coco_images))
    message = str(info.value)
    assert "conv1.weight" in message
    assert "features.0.weight" in message


def test_checkpoint_without_class_names(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    torch.save({"arch": "small-cnn", "model": SmallCNN(2).state_dict()}, path)
    with pytest.raises(ExportError, match="class_names"):
        read_checkpoint(path)


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not found"):
        read_checkpoint(tmp_path / "absent.pt")


def test_parity_failure_leaves_nothing(
    tmp_path: Path, coco_images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No export meets a negative tolerance. The option check that rejects it up front is
    # bypassed, so that the parity check itself fails.
    monkeypatch.setattr("cdul_export.classifier_export.check_positive", lambda *args: None)
    checkpoint = _fit_checkpoint(tmp_path / "run.pt", SmallCNN(len(CLASSES)), "small-cnn")
    out = tmp_path / "models" / "c"
    with pytest.raises(ParityError, match="max_abs_logit_diff"):
        export_classifier(_options(checkpoint, out, coco_images, max_abs_logit_diff=-1.0))
    assert not out.exists()
    assert not out.parent.exists()


def test_existing_output_rejected(tmp_path: Path, coco_images: Path) -> None:
    checkpoint = _fit_checkpoint(tmp_path / "run.pt", SmallCNN(len(CLASSES)), "small-cnn")
    (tmp_path / "out").mkdir()
    with pytest.raises(ExportError, match="--overwrite"):
        export_classifier(_options(checkpoint, tmp_path / "out", coco_images))


def test_clip_linear_head_on_clip_graph(
    tmp_path: Path, coco_images: Path, tiny_model_repository: Path
) -> None:
    clip_dir = tiny_model_repository / "tiny-clip"
    torch.manual_seed(0)
    head = LinearHead(32, len(CLASSES)).eval()
    checkpoint = _fit_checkpoint(
        tmp_path / "head.pt",
        head,
        "clip-linear",
        image_size=None,
        preprocess=None,
        embedding_dim=32,
        clip={"model": "tiny-clip", "embedding_dim": 32},
    )
    folder = export_classifier(
        _options(checkpoint, tmp_path / "models" / "linear", coco_images, clip_model=clip_dir)
    )
    config = json.loads((folder / "config.json").read_text())
    clip = load_model(clip_dir, SessionConfig(intra_op_threads=THREADS))
    assert isinstance(clip, ClipModel)
    assert config["preprocess"] == clip.preprocess.to_dict()
    assert config["training"]["clip_model"] == "tiny-clip"
    classifier = load_model(folder, SessionConfig(intra_op_threads=THREADS))
    assert isinstance(classifier, ClassifierModel)
    images = [item.image for item in load_parity_images(coco_images, 6)]
    pixels = preprocess_batch(images, clip.preprocess)
    with torch.inference_mode():
        expected = head(torch.from_numpy(clip.encode_images(pixels))).numpy()
    np.testing.assert_allclose(classifier.predict_logits(pixels), expected, atol=1e-4)


def test_clip_linear_without_clip_model(tmp_path: Path, coco_images: Path) -> None:
    checkpoint = _fit_checkpoint(tmp_path / "head.pt", LinearHead(32, len(CLASSES)), "clip-linear")
    with pytest.raises(ExportError, match="--clip-model"):
        export_classifier(_options(checkpoint, tmp_path / "out", coco_images))


def test_default_preprocess_without_record(tmp_path: Path, coco_images: Path) -> None:
    checkpoint = _fit_checkpoint(
        tmp_path / "run.pt", SmallCNN(len(CLASSES)), "small-cnn", preprocess=None, image_size=40
    )
    folder = export_classifier(
        _options(checkpoint, tmp_path / "c", coco_images, parity_batch_sizes=(4,))
    )
    preprocess = PreprocessConfig.from_dict(
        json.loads((folder / "config.json").read_text())["preprocess"]
    )
    assert preprocess == PreprocessConfig(
        40, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", "squash"
    )


@pytest.mark.slow
def test_resnet50_export(tmp_path: Path, coco_images: Path) -> None:
    model = build_classifier("resnet50", len(CLASSES)).eval()
    checkpoint = _fit_checkpoint(
        tmp_path / "r50.pt", model, "resnet50", image_size=224, preprocess=None
    )
    folder = export_classifier(
        _options(checkpoint, tmp_path / "r50", coco_images, parity_batch_sizes=(1, 7))
    )
    parity = json.loads((folder / "config.json").read_text())["export"]["parity"]
    assert parity["min_cosine"] >= 0.9999
