"""Tests of the model repository loader on a tiny exported repository."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import onnx
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
    trimmed_length,
)
from cdul_server.preprocess import preprocess_batch

ONE_THREAD = SessionConfig(intra_op_threads=1, inter_op_threads=1)
EOT = 49407
# 26 tokens: longer than the other prompts of these tests, shorter than the 77-token context.
LONG_PROMPT = (
    "a photo of a person riding a red bicycle past a fire hydrant and a traffic light on a wet "
    "street at dusk"
)


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


def _edit_tokenizer_config(model_dir: Path, **changes: object) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config["tokenizer"].pop(key, None)
        else:
            config["tokenizer"][key] = value
    path.write_text(json.dumps(config))


class _RecordingSession:
    """An ONNX Runtime session wrapper that records the shape of every input it is fed."""

    def __init__(self, session: object) -> None:
        self._session = session
        self.shapes: list[tuple[int, ...]] = []

    def run(self, output_names: object, feed: dict[str, np.ndarray]) -> object:
        self.shapes.extend(value.shape for value in feed.values())
        return self._session.run(output_names, feed)  # type: ignore[attr-defined]


def _record_text_inputs(clip: ClipModel) -> list[tuple[int, ...]]:
    recorder = _RecordingSession(clip._text)
    clip._text = recorder  # type: ignore[assignment]
    return recorder.shapes


def _eot_end(tokens: np.ndarray, row: int) -> int:
    return int(np.argmax(tokens[row] == EOT)) + 1


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


def test_trimmed_length_covers_every_eot() -> None:
    tokens = np.zeros((3, 10), np.int64)
    tokens[0, :3] = [49406, 320, EOT]
    tokens[1, :6] = [49406, 320, 1929, 539, 320, EOT]
    tokens[2, :2] = [49406, EOT]
    assert trimmed_length(tokens, EOT) == 6
    assert trimmed_length(tokens[[0, 2]], EOT) == 3


def test_trimmed_length_row_without_eot() -> None:
    tokens = np.zeros((2, 10), np.int64)
    tokens[0, :3] = [49406, 320, EOT]
    tokens[1, :3] = [49406, 320, 1929]
    assert trimmed_length(tokens, EOT) == 10


def test_exported_tiny_clip_trims(repository: dict) -> None:
    clip = repository["tiny-clip"]
    assert clip.trim_padding is True
    assert clip.config["tokenizer"]["trim_padding"] is True


def test_trimmed_equals_full_length(repository: dict) -> None:
    clip = repository["tiny-clip"]
    prompts = ["a photo of a dog.", "", "a bicycle", LONG_PROMPT, "🐶" * 200]
    tokens = clip.tokenizer(prompts)
    full = clip.encode_tokens(tokens, trim_padding=False)
    np.testing.assert_allclose(clip.encode_tokens(tokens, trim_padding=True), full, atol=1e-5)
    for row in range(len(prompts)):
        alone = clip.encode_tokens(tokens[row : row + 1], trim_padding=True)
        np.testing.assert_allclose(alone, full[row : row + 1], atol=1e-5)


def test_batch_trims_to_longest_prompt(tiny_model_repository: Path) -> None:
    clip = load_model(tiny_model_repository / "tiny-clip", ONE_THREAD)
    assert isinstance(clip, ClipModel)
    shapes = _record_text_inputs(clip)
    prompts = ["a dog", LONG_PROMPT, "a cat"]
    tokens = clip.tokenizer(prompts)
    longest = _eot_end(tokens, 1)
    assert _eot_end(tokens, 0) < longest < 77
    embeddings = clip.encode_texts(prompts)
    clip.encode_texts(["a dog", "a cat"])
    clip.encode_texts(["🐶" * 200, "a dog"])
    assert shapes == [(3, longest), (2, _eot_end(tokens, 0)), (2, 77)]
    full = clip.encode_tokens(tokens, trim_padding=False)
    np.testing.assert_allclose(embeddings, full, atol=1e-5)
    assert shapes[-1] == (3, 77)


def test_model_without_flag_gets_full_length(tiny_model_repository: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(tiny_model_repository, tmp_path, "tiny-clip")
    _edit_tokenizer_config(model_dir, trim_padding=None)
    clip = load_model(model_dir, ONE_THREAD)
    assert isinstance(clip, ClipModel)
    assert clip.trim_padding is False
    shapes = _record_text_inputs(clip)
    clip.encode_texts(["a dog", "a cat"])
    assert shapes == [(2, 77)]


def test_flag_false_gets_full_length(tiny_model_repository: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(tiny_model_repository, tmp_path, "tiny-clip")
    _edit_tokenizer_config(model_dir, trim_padding=False)
    clip = load_model(model_dir, ONE_THREAD)
    assert isinstance(clip, ClipModel)
    shapes = _record_text_inputs(clip)
    tokens = clip.tokenizer(["a dog"])
    clip.encode_tokens(tokens)
    clip.encode_tokens(tokens, trim_padding=True)
    assert shapes == [(1, 77), (1, _eot_end(tokens, 0))]


def test_shipped_digits_clip_trims_padding() -> None:
    clip = load_model(DEFAULT_MODEL_REPOSITORY / DEFAULT_CLIP_MODEL, ONE_THREAD)
    assert isinstance(clip, ClipModel)
    assert clip.config["tokenizer"]["trim_padding"] is True
    assert clip.trim_padding is True
    shapes = _record_text_inputs(clip)
    prompts = ["a photo of the digit seven.", "seven"]
    embeddings = clip.encode_texts(prompts)
    assert embeddings.shape == (2, 64)
    tokens = clip.tokenizer(prompts)
    assert shapes == [(2, _eot_end(tokens, 0))]
    full = clip.encode_tokens(tokens, trim_padding=False)
    assert shapes[-1] == (2, 16)
    np.testing.assert_allclose(embeddings, full, atol=1e-5)


def _fix_text_length(model_dir: Path, length: int) -> None:
    """Rewrite text.onnx so that its token input has a fixed length, as older exports had."""
    path = model_dir / "text.onnx"
    graph = onnx.load(str(path))
    dim = graph.graph.input[0].type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_value = length
    onnx.save(graph, str(path))


def test_trim_padding_on_fixed_length_graph(tmp_path: Path) -> None:
    model_dir = tmp_path / "models" / DEFAULT_CLIP_MODEL
    shutil.copytree(DEFAULT_MODEL_REPOSITORY / DEFAULT_CLIP_MODEL, model_dir)
    _fix_text_length(model_dir, 16)
    with pytest.raises(ModelRepositoryError, match=r"text\.onnx takes exactly 16 tokens"):
        load_model(model_dir)
    _edit_tokenizer_config(model_dir, trim_padding=False)
    clip = load_model(model_dir, ONE_THREAD)
    assert isinstance(clip, ClipModel)
    shapes = _record_text_inputs(clip)
    clip.encode_texts(["seven"])
    assert shapes == [(1, 16)]
    with pytest.raises(ValueError, match="takes exactly 16 tokens"):
        clip.encode_tokens(clip.tokenizer(["seven"]), trim_padding=True)


def test_trim_padding_must_be_boolean(tiny_model_repository: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(tiny_model_repository, tmp_path, "tiny-clip")
    _edit_tokenizer_config(model_dir, trim_padding="yes")
    with pytest.raises(ModelRepositoryError, match="trim_padding must be true or false"):
        load_model(model_dir)


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
