"""Export of cdul-train fit checkpoints: small CNN, clip-linear, clip-windows, bad checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cdul_export.classifier_export import (
    ClassifierExportOptions,
    export_classifier,
    read_checkpoint,
)
from cdul_export.cli import main
from cdul_export.parity import ParityError, load_parity_images
from cdul_export.staging import ExportError
from cdul_server.model_repository import ClassifierModel, ClipModel, SessionConfig, load_model
from cdul_server.preprocess import PreprocessConfig, preprocess_batch
from cdul_training.classifiers import LinearHead, SmallCNN, build_classifier
from cdul_training.clip_windows import WindowViews

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


def _options(
    checkpoint: Path, out: Path, coco_images: Path, **changes: object
) -> ClassifierExportOptions:
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


def _windows_checkpoint(
    path: Path, clip_dir: Path, head: torch.nn.Module | None = None, **extra: object
) -> Path:
    # The layout that cdul-train fit writes for clip-windows, whose input side is 3 times the
    # CLIP input side.
    clip_config = json.loads((clip_dir / "config.json").read_text())
    clip_preprocess = clip_config["preprocess"]
    side = 3 * clip_preprocess["size"]
    if head is None:
        torch.manual_seed(0)
        head = build_classifier("clip-windows", len(CLASSES), embedding_dim=32).eval()
    values: dict[str, object] = {
        "image_size": side,
        "preprocess": {
            "size": side,
            "mean": clip_preprocess["mean"],
            "std": clip_preprocess["std"],
            "interpolation": "bilinear",
            "resize_mode": "squash",
            "fill_color": 0,
        },
        "embedding_dim": 32,
        "clip": {"model": clip_dir.name, "embedding_dim": 32, "model_config": clip_config},
        "settings": {
            "arch": "clip-windows",
            "loss": "bce",
            "epochs": 3,
            "seed": 0,
            "lr": 0.003,
            "clip_model": str(clip_dir),
        },
    }
    values.update(extra)
    return _fit_checkpoint(path, head, "clip-windows", **values)


def _windows_reference(clip: ClipModel, head: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        views = WindowViews(clip.preprocess.size)(torch.from_numpy(pixels)).numpy()
        return head(torch.from_numpy(clip.encode_images(views))).numpy()


def _clip_with_side(source: Path, target: Path, side: int) -> Path:
    # A copy of a CLIP folder whose config.json states another input side. The graphs are the
    # same files.
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config["preprocess"]["size"] = side
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_clip_windows_export_matches_reference(
    tmp_path: Path, coco_images: Path, tiny_model_repository: Path
) -> None:
    clip_dir = tiny_model_repository / "tiny-clip"
    clip = load_model(clip_dir, SessionConfig(intra_op_threads=THREADS))
    assert isinstance(clip, ClipModel)
    assert clip.preprocess.size % 2 == 0
    side = 3 * clip.preprocess.size
    torch.manual_seed(0)
    head = build_classifier("clip-windows", len(CLASSES), embedding_dim=32).eval()
    checkpoint = _windows_checkpoint(tmp_path / "windows.pt", clip_dir, head)
    # The CLIP folder comes from the checkpoint's settings["clip_model"].
    folder = export_classifier(
        _options(checkpoint, tmp_path / "models" / "windows", coco_images, quantize="int8")
    )

    config = json.loads((folder / "config.json").read_text())
    assert config["kind"] == "classifier"
    assert config["class_names"] == CLASSES
    assert config["preprocess"]["size"] == side
    assert config["preprocess"]["mean"] == list(clip.preprocess.mean)
    assert config["preprocess"]["resize_mode"] == "squash"
    assert config["training"]["arch"] == "clip-windows"
    assert config["training"]["clip_model"] == "tiny-clip"
    assert config["files"] == {"model": "model.onnx", "model_int8": "model.int8.onnx"}
    assert config["export"]["opset"] == 17
    parity = config["export"]["parity"]
    assert parity["min_cosine"] >= 0.9999
    assert parity["max_abs_logit_diff"] <= 1e-3
    assert parity["batch_sizes"] == [1, 2, 7, 33]
    assert parity["n_images"] == 8
    assert "int8_min_cosine" in parity
    assert "int8_max_abs_logit_diff" in parity

    graph = onnx.load(str(folder / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["pixels"]
    assert [o.name for o in graph.output] == ["logits"]
    input_dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert input_dims == ["batch", 3, side, side]

    classifier = load_model(folder, SessionConfig(intra_op_threads=THREADS))
    assert isinstance(classifier, ClassifierModel)
    images = [item.image for item in load_parity_images(coco_images, 3)]
    pixels = preprocess_batch(images, classifier.preprocess)
    assert pixels.shape == (3, 3, side, side)
    expected = _windows_reference(clip, head, pixels)
    np.testing.assert_allclose(classifier.predict_logits(pixels), expected, atol=1e-4)

    quantized = load_model(folder, SessionConfig(intra_op_threads=THREADS, precision="int8"))
    assert isinstance(quantized, ClassifierModel)
    assert quantized.precision == "int8"
    int8_logits = quantized.predict_logits(pixels)
    assert int8_logits.shape == (3, len(CLASSES))
    assert np.isfinite(int8_logits).all()


def test_clip_windows_cli_with_clip_model(
    tmp_path: Path, coco_images: Path, tiny_model_repository: Path
) -> None:
    clip_dir = tiny_model_repository / "tiny-clip"
    settings = {"arch": "clip-windows", "loss": "bce", "clip_model": None}
    checkpoint = _windows_checkpoint(tmp_path / "windows.pt", clip_dir, settings=settings)
    out = tmp_path / "models" / "windows"
    code = main(
        [
            "classifier",
            "--checkpoint",
            str(checkpoint),
            "--clip-model",
            str(clip_dir),
            "--out",
            str(out),
            "--parity-images",
            str(coco_images),
            "--parity-count",
            "3",
            "--parity-batch-sizes",
            "1,3",
            "--threads",
            str(THREADS),
        ]
    )
    assert code == 0
    assert isinstance(load_model(out, SessionConfig(intra_op_threads=THREADS)), ClassifierModel)


def test_clip_windows_odd_clip_side(
    tmp_path: Path, coco_images: Path, tiny_model_repository: Path
) -> None:
    clip_dir = _clip_with_side(tiny_model_repository / "tiny-clip", tmp_path / "odd-clip", 33)
    checkpoint = _windows_checkpoint(tmp_path / "windows.pt", clip_dir)
    with pytest.raises(ExportError, match="even input side; this one takes 33 px"):
        export_classifier(_options(checkpoint, tmp_path / "out", coco_images))
    assert not (tmp_path / "out").exists()


def test_clip_windows_clip_graph_of_other_side(
    tmp_path: Path, coco_images: Path, tiny_model_repository: Path
) -> None:
    # config.json states 30 px, while the image graph takes 32 px.
    clip_dir = _clip_with_side(tiny_model_repository / "tiny-clip", tmp_path / "clip-30", 30)
    checkpoint = _windows_checkpoint(tmp_path / "windows.pt", clip_dir)
    with pytest.raises(ExportError, match=r"shape \['batch', 3, 32, 32\].* preprocess size 30"):
        export_classifier(_options(checkpoint, tmp_path / "models" / "out", coco_images))
    assert not (tmp_path / "models").exists()


def test_clip_windows_preprocess_not_three_sides(
    tmp_path: Path, coco_images: Path, tiny_model_repository: Path
) -> None:
    clip_dir = tiny_model_repository / "tiny-clip"
    preprocess = dict(SMALL_PREPROCESS)
    checkpoint = _windows_checkpoint(tmp_path / "windows.pt", clip_dir, preprocess=preprocess)
    with pytest.raises(ExportError, match=r"preprocess size 64 px.* 96 px") as info:
        export_classifier(_options(checkpoint, tmp_path / "out", coco_images))
    assert "input side 32 px" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_clip_windows_without_clip_model(
    tmp_path: Path, coco_images: Path, tiny_model_repository: Path
) -> None:
    settings = {"arch": "clip-windows", "loss": "bce", "clip_model": None}
    checkpoint = _windows_checkpoint(
        tmp_path / "windows.pt", tiny_model_repository / "tiny-clip", settings=settings
    )
    with pytest.raises(ExportError, match="clip-windows head: pass --clip-model DIR"):
        export_classifier(_options(checkpoint, tmp_path / "out", coco_images))
    absent = tmp_path / "absent-clip"
    with pytest.raises(ExportError, match=r"absent-clip has no config\.json"):
        export_classifier(_options(checkpoint, tmp_path / "out", coco_images, clip_model=absent))
    assert not (tmp_path / "out").exists()


def test_clip_windows_wrong_embedding_size(
    tmp_path: Path, coco_images: Path, tiny_model_repository: Path
) -> None:
    head = build_classifier("clip-windows", len(CLASSES), embedding_dim=16)
    checkpoint = _windows_checkpoint(
        tmp_path / "windows.pt", tiny_model_repository / "tiny-clip", head
    )
    with pytest.raises(ExportError, match=r"16-dimensional embeddings .* gives 32"):
        export_classifier(_options(checkpoint, tmp_path / "out", coco_images))
