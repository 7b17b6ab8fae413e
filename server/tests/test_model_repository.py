"""Tests of the model repository loader on a tiny exported repository."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdul_server.model_repository import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_MODEL_REPOSITORY,
    ClassifierModel,
    ClipModel,
    ModelRepositoryError,
    SessionConfig,
    load_model,
    load_model_repository,
)
from cdul_server.preprocess import preprocess_batch

ONE_THREAD = SessionConfig(intra_op_threads=1, inter_op_threads=1)


@pytest.fixture(scope="module")
def repository(tiny_model_repository: Path) -> dict[str, ClipModel | ClassifierModel]:
    return load_model_repository(tiny_model_repository, session=ONE_THREAD)


@pytest.fixture(scope="module")
def photos(shared_data: Path) -> list[Image.Image]:
    files = sorted((shared_data / "coco128" / "images").glob("*.jpg"))[:5]
    return [Image.open(path).convert("RGB") for path in files]


def _copy_model(tiny_model_repository: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / "models" / name
    shutil.copytree(tiny_model_repository / name, target)
    return target


def _edit_config(model_dir: Path, **changes: object) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_repository_loads_both_kinds(repository: dict) -> None:
    assert sorted(repository) == ["tiny-classifier", "tiny-clip"]
    assert isinstance(repository["tiny-clip"], ClipModel)
    assert isinstance(repository["tiny-classifier"], ClassifierModel)


def test_clip_attributes(repository: dict) -> None:
    clip = repository["tiny-clip"]
    assert clip.name == "tiny-clip"
    assert clip.embedding_dim == 32
    assert clip.random_init is True
    assert clip.weights == "none"
    assert clip.precision == "fp32"
    assert clip.preprocess.size == 32
    assert clip.tokenizer.context_length == 77
    assert clip.default_templates == ["a photo of a {}."]
    assert clip.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)


def test_encode_images_shapes_and_norms(repository: dict, photos: list) -> None:
    clip = repository["tiny-clip"]
    pixels = preprocess_batch(photos, clip.preprocess)
    embeddings = clip.encode_images(pixels)
    assert embeddings.shape == (5, 32)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_encode_images_batch_independent(repository: dict, photos: list) -> None:
    clip = repository["tiny-clip"]
    pixels = preprocess_batch(photos, clip.preprocess)
    together = clip.encode_images(pixels)
    alone = np.concatenate([clip.encode_images(pixels[i : i + 1]) for i in range(len(pixels))])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_encode_images_empty_batch(repository: dict) -> None:
    clip = repository["tiny-clip"]
    assert clip.encode_images(np.zeros((0, 3, 32, 32), np.float32)).shape == (0, 32)


def test_encode_images_rejects_wrong_size(repository: dict) -> None:
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        repository["tiny-clip"].encode_images(np.zeros((1, 3, 64, 64), np.float32))


def test_encode_texts_shapes(repository: dict) -> None:
    clip = repository["tiny-clip"]
    embeddings = clip.encode_texts(["a photo of a dog.", "", "🐶" * 200])
    assert embeddings.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_encode_tokens_int32_equals_int64(repository: dict) -> None:
    clip = repository["tiny-clip"]
    tokens = clip.tokenizer(["a photo of a cat.", "a bicycle"])
    np.testing.assert_allclose(
        clip.encode_tokens(tokens.astype(np.int32)), clip.encode_tokens(tokens), atol=1e-6
    )


def test_concurrent_calls_agree(repository: dict, photos: list) -> None:
    clip = repository["tiny-clip"]
    pixels = preprocess_batch(photos, clip.preprocess)
    expected = clip.encode_images(pixels)
    results: list[np.ndarray] = []

    def work() -> None:
        results.append(clip.encode_images(pixels))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4
    for result in results:
        np.testing.assert_allclose(result, expected, atol=1e-6)


def test_classifier_logits(repository: dict, photos: list, coco_class_names: list) -> None:
    classifier = repository["tiny-classifier"]
    assert classifier.class_names == coco_class_names
    logits = classifier.predict_logits(preprocess_batch(photos, classifier.preprocess))
    assert logits.shape == (5, 80)
    assert logits.dtype == np.float32
    assert np.isfinite(logits).all()


def test_int8_precision_loads_quantized_graph(tiny_model_repository: Path, photos: list) -> None:
    session = SessionConfig(intra_op_threads=1, precision="int8")
    quantized = load_model(tiny_model_repository / "tiny-clip", session)
    full = load_model(tiny_model_repository / "tiny-clip", ONE_THREAD)
    assert isinstance(quantized, ClipModel)
    assert isinstance(full, ClipModel)
    assert quantized.precision == "int8"
    pixels = preprocess_batch(photos, full.preprocess)
    cosines = np.sum(quantized.encode_images(pixels) * full.encode_images(pixels), axis=1)
    assert cosines.min() > 0.98


def test_int8_missing_is_an_error(tiny_model_repository: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(tiny_model_repository, tmp_path, "tiny-clip")
    config = json.loads((model_dir / "config.json").read_text())
    del config["files"]["image_int8"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelRepositoryError, match="no int8 graph"):
        load_model(model_dir, SessionConfig(precision="int8"))


def test_unavailable_provider_is_an_error(tiny_model_repository: Path) -> None:
    session = SessionConfig(providers=("NoSuchExecutionProvider", "CPUExecutionProvider"))
    with pytest.raises(ModelRepositoryError, match="NoSuchExecutionProvider"):
        load_model(tiny_model_repository / "tiny-clip", session)


def test_missing_folder_and_config(tmp_path: Path) -> None:
    with pytest.raises(ModelRepositoryError, match="not found"):
        load_model(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelRepositoryError, match=r"config\.json not found"):
        load_model(tmp_path / "empty")


def test_invalid_json_names_file(tmp_path: Path) -> None:
    model_dir = tmp_path / "broken"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(ModelRepositoryError, match="not valid JSON"):
        load_model(model_dir)


def test_wrong_format_version(tiny_model_repository: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(tiny_model_repository, tmp_path, "tiny-clip")
    _edit_config(model_dir, format_version=99)
    with pytest.raises(ModelRepositoryError, match="format_version 99"):
        load_model(model_dir)


def test_missing_graph_file(tiny_model_repository: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(tiny_model_repository, tmp_path, "tiny-clip")
    (model_dir / "text.onnx").unlink()
    with pytest.raises(ModelRepositoryError, match=r"text\.onnx not found"):
        load_model(model_dir)


def test_embedding_dim_mismatch(tiny_model_repository: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(tiny_model_repository, tmp_path, "tiny-clip")
    _edit_config(model_dir, embedding_dim=64)
    with pytest.raises(ModelRepositoryError, match="embedding_dim 64"):
        load_model(model_dir)


def test_class_count_mismatch(tiny_model_repository: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(tiny_model_repository, tmp_path, "tiny-classifier")
    _edit_config(model_dir, class_names=["a", "b"])
    with pytest.raises(ModelRepositoryError, match="2 class names"):
        load_model(model_dir)


def test_unknown_names_listed(tiny_model_repository: Path) -> None:
    with pytest.raises(ModelRepositoryError, match="tiny-clip"):
        load_model_repository(tiny_model_repository, names=["nope"])


def test_names_select_subset(tiny_model_repository: Path) -> None:
    models = load_model_repository(tiny_model_repository, names=["tiny-clip"], session=ONE_THREAD)
    assert list(models) == ["tiny-clip"]


def test_empty_repository(tmp_path: Path) -> None:
    with pytest.raises(ModelRepositoryError, match="no model folder"):
        load_model_repository(tmp_path)


def test_default_repository_location() -> None:
    assert DEFAULT_MODEL_REPOSITORY.name == "models"
    assert DEFAULT_MODEL_REPOSITORY.parent.name == "cdul_server"
    assert DEFAULT_CLIP_MODEL == "digits-clip"


def test_random_init_warning(tiny_model_repository: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="cdul_server.model_repository"):
        load_model(tiny_model_repository / "tiny-clip", ONE_THREAD)
    assert "random weights" in caplog.text
