"""Tests of the digits-clip model repository that ships inside cdul-server."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdul_server.model_repository import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_MODEL_REPOSITORY,
    ClipModel,
    SessionConfig,
    load_model_repository,
)
from cdul_training import digits_clip, scenes
from cdul_training.cli import main

SHIPPED = DEFAULT_MODEL_REPOSITORY / DEFAULT_CLIP_MODEL
MAX_REPOSITORY_BYTES = 10 * 1000 * 1000


def test_shipped_repository_within_size_limit() -> None:
    files = [path for path in SHIPPED.rglob("*") if path.is_file()]
    assert files, f"no files in {SHIPPED}"
    assert sum(path.stat().st_size for path in files) <= MAX_REPOSITORY_BYTES


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_shipped_model_zero_shot_accuracy(precision: str) -> None:
    session = SessionConfig(intra_op_threads=1, inter_op_threads=1, precision=precision)
    models = load_model_repository(DEFAULT_MODEL_REPOSITORY, [DEFAULT_CLIP_MODEL], session)
    model = models[DEFAULT_CLIP_MODEL]
    assert isinstance(model, ClipModel)
    assert model.default_templates == [digits_clip.DEFAULT_TEMPLATE]
    assert not model.random_init
    assert digits_clip.onnx_zero_shot_accuracy(model) >= 95.0


def test_cli_dispatches_scenes(tmp_path: Path) -> None:
    out = tmp_path / "scenes"
    status = main(["scenes", "--out", str(out), "--n-train", "2", "--n-test", "1"])
    assert status == 0
    assert (out / "train" / "000001.png").is_file()
    assert main(["scenes", "--out", str(out), "--side", "10"]) == 2


def test_shipped_model_scores_tiny_corpus(tmp_path: Path) -> None:
    corpus = tmp_path / "scenes"
    scenes.write_scenes(scenes.ScenesConfig(out=str(corpus), n_train=8, n_test=0, side=96, seed=0))
    session = SessionConfig(intra_op_threads=1, inter_op_threads=1)
    model = load_model_repository(DEFAULT_MODEL_REPOSITORY, [DEFAULT_CLIP_MODEL], session)[
        DEFAULT_CLIP_MODEL
    ]
    result = digits_clip.onnx_scene_pseudo_label_map(model, corpus, "train", batch_size=20)
    assert result["n_images"] == 8
    for key in ("global", "aggregate", "final"):
        assert 0.0 < result[key] <= 100.0
