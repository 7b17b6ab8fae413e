"""Export of open_clip models: parity with PyTorch, config.json facts, int8, bad input."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from cdul_export.clip_export import ClipExportOptions, export_clip, open_clip_transform
from cdul_export.gpu import missing_for_fp16, missing_for_tensorrt
from cdul_export.parity import PARITY_PROMPTS, ParityError, load_parity_images, row_cosines
from cdul_export.staging import ExportError
from cdul_server.model_repository import ClipModel, SessionConfig, load_model, load_model_repository
from cdul_server.preprocess import preprocess_batch

REPO_ROOT = Path(__file__).resolve().parents[2]
DIGITS_CONFIG = (
    REPO_ROOT / "training" / "src" / "cdul_training" / "model_configs" / "digits-clip.json"
)
ALL_BATCH_SIZES = (1, 2, 7, 33)
# Large models run a few prompts and images to stay within the default test time.
FEW_PROMPTS = (
    PARITY_PROMPTS[0],
    PARITY_PROMPTS[10],
    PARITY_PROMPTS[13],
    PARITY_PROMPTS[19],
    PARITY_PROMPTS[20],
)
THREADS = 2


@pytest.fixture(scope="module", autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="module")
def coco_images(shared_data: Path) -> Path:
    return shared_data / "coco128" / "images"


def _options(out: Path, coco_images: Path, **changes: object) -> ClipExportOptions:
    values: dict = {
        "model": "digits-clip",
        "pretrained": "none",
        "out": out,
        "model_config": DIGITS_CONFIG,
        "parity_images": coco_images,
        "parity_count": 8,
        "parity_batch_sizes": ALL_BATCH_SIZES,
        "threads": THREADS,
    }
    values.update(changes)
    return ClipExportOptions(**values)


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir()) if folder.parent.exists() else []


def _digits_variant(folder: Path, name: str, **text_changes: object) -> Path:
    """Write the digits-clip architecture with changed text_cfg values as ``name``.json."""
    config = json.loads(DIGITS_CONFIG.read_text())
    config["text_cfg"].update(text_changes)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def _text_input_dims(folder: Path) -> list[int | str]:
    import onnx

    graph = onnx.load(str(folder / "text.onnx"))
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    return [dim.dim_param or dim.dim_value for dim in dims]


def _assert_trimmed_matches_full(folder: Path, prompts: tuple[str, ...]) -> None:
    clip = load_model(folder, SessionConfig(intra_op_threads=THREADS))
    assert isinstance(clip, ClipModel)
    tokens = clip.tokenizer(list(prompts))
    full = clip.encode_tokens(tokens, trim_padding=False)
    np.testing.assert_allclose(clip.encode_tokens(tokens, trim_padding=True), full, atol=1e-5)
    for row in range(len(prompts)):
        alone = clip.encode_tokens(tokens[row : row + 1], trim_padding=True)
        np.testing.assert_allclose(alone, full[row : row + 1], atol=1e-5)


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory: pytest.TempPathFactory, coco_images: Path) -> Path:
    root = tmp_path_factory.mktemp("digits")
    torch.manual_seed(1)
    return export_clip(_options(root / "digits-clip", coco_images, quantize="int8"))


@pytest.mark.parametrize("token_dtype", ["int64", "int32"])
def test_small_model_parity_all_batch_sizes(
    tmp_path: Path, coco_images: Path, digits_export: Path, token_dtype: str
) -> None:
    if token_dtype == "int64":
        folder = digits_export
    else:
        folder = export_clip(_options(tmp_path / "digits-int32", coco_images, token_dtype="int32"))
    parity = _config(folder)["export"]["parity"]
    assert parity["batch_sizes"] == list(ALL_BATCH_SIZES)
    assert parity["token_dtypes"][0] == token_dtype
    assert parity["image_min_cosine"] >= 0.9999
    assert parity["text_min_cosine"] >= 0.9999
    assert parity["preprocess_max_mean_abs_diff"] <= 0.01
    assert parity["preprocess_min_cosine"] >= 0.999
    assert parity["tokenizer_mismatches"] == 0
    assert parity["n_images"] == 8
    assert parity["images"][0] == "000000000009.jpg"


def test_text_graph_input_type(tmp_path: Path, coco_images: Path, digits_export: Path) -> None:
    import onnx

    graph = onnx.load(str(digits_export / "text.onnx"))
    assert graph.graph.input[0].name == "tokens"
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    batch = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch"
    assert _text_input_dims(digits_export) == ["batch", "sequence"]


def test_trimmed_text_parity_recorded(digits_export: Path) -> None:
    config = _config(digits_export)
    parity = config["export"]["parity"]
    assert config["tokenizer"]["trim_padding"] is True
    assert parity["text_trimmed_min_cosine"] >= 0.9999
    assert parity["text_trimmed_max_abs_diff"] < 1e-5
    # The empty prompt is two tokens: start and end of text.
    assert parity["text_trimmed_min_length"] == 2


def test_trimmed_tokens_match_full_length(digits_export: Path) -> None:
    _assert_trimmed_matches_full(digits_export, PARITY_PROMPTS)


@pytest.mark.parametrize(
    ("name", "text_changes"),
    [("digits-last-pool", {"pool_type": "last"}), ("digits-no-causal", {"no_causal_mask": True})],
)
def test_untrimmable_tower_exports_full_length(
    tmp_path: Path, coco_images: Path, name: str, text_changes: dict
) -> None:
    model_config = _digits_variant(tmp_path, name, **text_changes)
    folder = export_clip(
        _options(
            tmp_path / name,
            coco_images,
            model=name,
            model_config=model_config,
            parity_batch_sizes=(1, 7),
        )
    )
    config = _config(folder)
    parity = config["export"]["parity"]
    assert config["tokenizer"]["trim_padding"] is False
    assert parity["text_min_cosine"] >= 0.9999
    assert parity["text_trimmed_min_cosine"] < 0.9999
    clip = load_model(folder, SessionConfig(intra_op_threads=THREADS))
    assert isinstance(clip, ClipModel)
    assert clip.trim_padding is False


def test_dynamic_export_failure_falls_back(
    tmp_path: Path, coco_images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Untraceable(torch.nn.Module):
        def __init__(self, model: object) -> None:
            super().__init__()

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("simulated tracing failure")

    monkeypatch.setattr("cdul_export.clip_export._TrimmableTextEncoder", Untraceable)
    folder = export_clip(_options(tmp_path / "static", coco_images, parity_batch_sizes=(2,)))
    config = _config(folder)
    assert _text_input_dims(folder) == ["batch", 16]
    assert config["tokenizer"]["trim_padding"] is False
    assert config["export"]["parity"]["text_min_cosine"] >= 0.9999
    assert "text_trimmed_min_cosine" not in config["export"]["parity"]


def test_graph_failing_on_trimmed_tokens(
    tmp_path: Path, coco_images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without separate key and value tensors the exporter writes the sample's sequence length
    # into the attention reshapes, so the graph fails on any other length.
    monkeypatch.setattr(
        "cdul_export.clip_export._separate_attention_inputs",
        lambda model: contextlib.nullcontext(),
    )
    folder = export_clip(_options(tmp_path / "fixed", coco_images, parity_batch_sizes=(2,)))
    config = _config(folder)
    parity = config["export"]["parity"]
    assert config["tokenizer"]["trim_padding"] is False
    assert parity["text_min_cosine"] >= 0.9999
    assert "Reshape" in parity["text_trimmed_error"]
    assert "text_trimmed_min_cosine" not in parity


def test_long_parity_prompts_leave_trimming_off(tmp_path: Path, coco_images: Path) -> None:
    long_prompt = PARITY_PROMPTS[20]
    folder = export_clip(
        _options(
            tmp_path / "long",
            coco_images,
            parity_prompts=(long_prompt, long_prompt.upper()),
            parity_batch_sizes=(2,),
        )
    )
    config = _config(folder)
    assert config["export"]["parity"]["text_trimmed_min_length"] == 16
    assert config["tokenizer"]["trim_padding"] is False


def test_config_records_facts(digits_export: Path) -> None:
    config = _config(digits_export)
    assert config["format_version"] == 1
    assert config["kind"] == "clip"
    assert config["name"] == "digits-clip"
    assert config["source"] == {"model": "digits-clip", "pretrained": "none", "random_init": True}
    assert config["embedding_dim"] == 64
    assert config["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)
    assert config["preprocess"] == {
        "size": 32,
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        "fill_color": 0,
    }
    tokenizer = config["tokenizer"]
    assert tokenizer["context_length"] == 16
    assert tokenizer["sot_token_id"] == 49406
    assert tokenizer["eot_token_id"] == 49407
    assert tokenizer["vocab_file"] == "vocab.txt.gz"
    assert config["files"] == {
        "image": "image.onnx",
        "text": "text.onnx",
        "image_int8": "image.int8.onnx",
    }
    assert config["export"]["opset"] == 17
    assert config["export"]["dtype"] == "float32"
    assert config["export"]["open_clip_version"] == open_clip.__version__
    for name in ("image.onnx", "text.onnx", "image.int8.onnx", "vocab.txt.gz"):
        assert (digits_export / name).is_file()


def test_int8_cosine_recorded_and_loadable(digits_export: Path, coco_images: Path) -> None:
    parity = _config(digits_export)["export"]["parity"]
    assert 0.9 < parity["image_int8_min_cosine"] <= 1.0
    assert parity["image_int8_mean_cosine"] >= parity["image_int8_min_cosine"]
    quantized = load_model(digits_export, SessionConfig(precision="int8", intra_op_threads=THREADS))
    full = load_model(digits_export, SessionConfig(intra_op_threads=THREADS))
    assert isinstance(quantized, ClipModel)
    assert isinstance(full, ClipModel)
    images = [item.image for item in load_parity_images(coco_images, 8)]
    pixels = preprocess_batch(images, full.preprocess)
    cosines = row_cosines(quantized.encode_images(pixels), full.encode_images(pixels))
    assert cosines.min() == pytest.approx(parity["image_int8_min_cosine_vs_onnx_fp32"], abs=1e-4)


def test_checkpoint_path_gives_same_embeddings(tmp_path: Path, coco_images: Path) -> None:
    open_clip.add_model_config(DIGITS_CONFIG)
    torch.manual_seed(7)
    model = open_clip.create_model("digits-clip", pretrained=None).eval()
    checkpoint = tmp_path / "digits.pt"
    torch.save({"state_dict": model.state_dict(), "model": "digits-clip"}, checkpoint)
    folder = export_clip(
        _options(
            tmp_path / "from-file", coco_images, pretrained=str(checkpoint), parity_batch_sizes=(2,)
        )
    )
    config = _config(folder)
    assert config["source"]["random_init"] is False
    assert config["source"]["pretrained"] == "digits.pt"
    clip = load_model(folder, SessionConfig(intra_op_threads=THREADS))
    assert isinstance(clip, ClipModel)
    images = [item.image for item in load_parity_images(coco_images, 4)]
    transform = open_clip_transform(clip.preprocess)
    with torch.inference_mode():
        expected = F.normalize(
            model.encode_image(torch.stack([transform(i) for i in images])), dim=-1
        )
        expected_text = F.normalize(
            model.encode_text(
                open_clip.get_tokenizer("digits-clip")(["a photo of the digit seven"])
            ),
            dim=-1,
        )
    actual = clip.encode_images(preprocess_batch(images, clip.preprocess))
    assert row_cosines(actual, expected.numpy()).min() >= 0.9999
    actual_text = clip.encode_texts(["a photo of the digit seven"])
    assert row_cosines(actual_text, expected_text.numpy()).min() >= 0.9999


def _allow_unreachable_cosine(monkeypatch: pytest.MonkeyPatch) -> None:
    # No export reaches a cosine of 1.5. The option check that rejects it up front is
    # bypassed, so that the parity check itself fails.
    monkeypatch.setattr("cdul_export.clip_export.check_common_options", lambda **kwargs: None)


def test_failed_parity_leaves_nothing(
    tmp_path: Path, coco_images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _allow_unreachable_cosine(monkeypatch)
    out = tmp_path / "repo" / "broken"
    with pytest.raises(ParityError, match=r"image_min_cosine = .* below the threshold 1\.5"):
        export_clip(_options(out, coco_images, min_cosine=1.5, parity_batch_sizes=(2,)))
    assert not out.exists()
    assert not out.parent.exists()


def test_existing_folder_rejected_then_overwritten(
    tmp_path: Path, coco_images: Path, digits_export: Path
) -> None:
    out = tmp_path / "repo" / "digits-clip"
    shutil.copytree(digits_export, out)
    (out / "stale.txt").write_text("old")
    with pytest.raises(ExportError, match="--overwrite"):
        export_clip(_options(out, coco_images, parity_batch_sizes=(2,)))
    assert (out / "stale.txt").exists()
    export_clip(_options(out, coco_images, parity_batch_sizes=(2,), overwrite=True))
    assert not (out / "stale.txt").exists()
    assert (out / "image.onnx").is_file()
    assert _siblings(out) == ["digits-clip"]


def test_failed_overwrite_keeps_old_folder(
    tmp_path: Path, coco_images: Path, digits_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _allow_unreachable_cosine(monkeypatch)
    out = tmp_path / "repo" / "digits-clip"
    shutil.copytree(digits_export, out)
    with pytest.raises(ParityError):
        export_clip(
            _options(out, coco_images, overwrite=True, min_cosine=1.5, parity_batch_sizes=(2,))
        )
    assert _config(out) == _config(digits_export)
    assert _siblings(out) == ["digits-clip"]


def test_unknown_model_lists_close_matches(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="ViT-B-32") as info:
        export_clip(ClipExportOptions(model="ViT-B-23", pretrained="none", out=tmp_path / "x"))
    assert "close matches" in str(info.value)
    assert not (tmp_path / "x").exists()


def test_unknown_pretrained_lists_tags(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="openai"):
        export_clip(ClipExportOptions(model="RN50", pretrained="no-such-tag", out=tmp_path / "x"))


def test_mismatched_checkpoint_lists_keys(tmp_path: Path, coco_images: Path) -> None:
    state = open_clip.create_model("RN50", pretrained=None, pretrained_text=False).state_dict()
    checkpoint = tmp_path / "rn50.pt"
    torch.save({"state_dict": state}, checkpoint)
    with pytest.raises(ExportError, match="does not fit digits-clip") as info:
        export_clip(_options(tmp_path / "x", coco_images, pretrained=str(checkpoint)))
    message = str(info.value)
    assert "shape mismatches" in message
    assert "visual." in message
    assert not (tmp_path / "x").exists()


def test_model_config_name_must_match(tmp_path: Path, coco_images: Path) -> None:
    with pytest.raises(ExportError, match="differs from the model config file name"):
        export_clip(_options(tmp_path / "x", coco_images, model="other-name"))


@pytest.mark.skipif(not missing_for_fp16(), reason="this machine can export fp16")
def test_fp16_without_gpu_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"--fp16 needs .*CUDA"):
        export_clip(
            ClipExportOptions(model="ViT-B-32", pretrained="none", out=tmp_path / "x", fp16=True)
        )
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not missing_for_tensorrt(), reason="this machine can build TensorRT engines")
def test_tensorrt_without_gpu_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"--tensorrt needs .*tensorrt"):
        export_clip(
            ClipExportOptions(
                model="ViT-B-32", pretrained="none", out=tmp_path / "x", tensorrt=True
            )
        )


@pytest.mark.parametrize("model_name", ["ViT-B-32", "RN50"])
def test_large_model_export_and_parity(tmp_path: Path, coco_images: Path, model_name: str) -> None:
    torch.manual_seed(0)
    folder = export_clip(
        ClipExportOptions(
            model=model_name,
            pretrained="none",
            out=tmp_path / "models" / model_name.lower(),
            parity_images=coco_images,
            parity_count=3,
            parity_batch_sizes=(1, 7),
            parity_prompts=FEW_PROMPTS,
            threads=THREADS,
        )
    )
    config = _config(folder)
    parity = config["export"]["parity"]
    assert parity["image_min_cosine"] >= 0.9999
    assert parity["text_min_cosine"] >= 0.9999
    assert parity["preprocess_max_mean_abs_diff"] <= 0.01
    assert parity["preprocess_min_cosine"] >= 0.999
    assert config["embedding_dim"] == (512 if model_name == "ViT-B-32" else 1024)
    assert config["preprocess"]["size"] == 224
    models = load_model_repository(folder.parent, session=SessionConfig(intra_op_threads=THREADS))
    clip = models[model_name.lower()]
    assert isinstance(clip, ClipModel)
    assert clip.encode_texts(["a photo of a dog."]).shape == (1, config["embedding_dim"])
    assert config["tokenizer"]["trim_padding"] is True
    assert parity["text_trimmed_min_cosine"] >= 0.9999
    _assert_trimmed_matches_full(folder, FEW_PROMPTS)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["ViT-B-32", "RN50"])
def test_large_model_all_batch_sizes_and_int8(
    tmp_path: Path, coco_images: Path, model_name: str
) -> None:
    folder = export_clip(
        ClipExportOptions(
            model=model_name,
            pretrained="none",
            out=tmp_path / model_name,
            parity_images=coco_images,
            parity_count=8,
            parity_batch_sizes=ALL_BATCH_SIZES,
            quantize="int8",
            threads=THREADS,
        )
    )
    parity = _config(folder)["export"]["parity"]
    assert parity["image_min_cosine"] >= 0.9999
    assert parity["text_min_cosine"] >= 0.9999
    assert parity["image_int8_min_cosine"] > 0.9


@pytest.mark.gpu
def test_fp16_export_on_gpu(tmp_path: Path, coco_images: Path) -> None:
    folder = export_clip(
        _options(tmp_path / "fp16", coco_images, fp16=True, parity_batch_sizes=(1, 7))
    )
    config = _config(folder)
    assert config["files"]["image_fp16"] == "image.fp16.onnx"
    assert config["export"]["parity"]["image_fp16_min_cosine"] >= 0.99
    clip = load_model(folder, SessionConfig(providers=("CUDAExecutionProvider",), precision="fp16"))
    assert isinstance(clip, ClipModel)
    pixels = np.zeros((2, 3, 32, 32), np.float32)
    assert clip.encode_images(pixels).shape == (2, 64)


@pytest.mark.trt
def test_tensorrt_engine_on_gpu(tmp_path: Path, coco_images: Path) -> None:
    folder = export_clip(
        _options(tmp_path / "trt", coco_images, tensorrt=True, parity_batch_sizes=(1, 7))
    )
    config = _config(folder)
    assert (folder / "image.plan").is_file()
    assert config["export"]["parity"]["image_tensorrt_min_cosine"] >= 0.99
