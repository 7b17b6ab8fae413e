"""Tests of the digit-scenes corpus: split, distribution, rendering and the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdul_training import scenes
from cdul_training.cli import UsageError

torch.set_num_threads(1)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    scenes.add_arguments(parser)
    return parser.parse_args(argv)


def test_scan_split_disjoint_and_complete() -> None:
    train, train_labels = scenes.scan_split("train")
    test, test_labels = scenes.scan_split("test")
    index = scenes._split_indices()
    assert len(set(index["train"]) & set(index["test"])) == 0
    assert len(train) + len(test) == 1797
    assert len(test) == round(0.25 * 1797)
    assert set(train_labels.tolist()) == set(range(10))
    assert set(test_labels.tolist()) == set(range(10))
    assert train.min() >= 0.0
    assert train.max() == pytest.approx(1.0)


def test_scan_split_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown split 'val'"):
        scenes.scan_split("val")


def test_generate_split_deterministic_by_seed() -> None:
    first, first_labels = scenes.generate_split("train", 70, 64, seed=3)
    second, second_labels = scenes.generate_split("train", 70, 64, seed=3)
    other, _ = scenes.generate_split("train", 70, 64, seed=4)
    assert np.array_equal(first, second)
    assert first_labels == second_labels
    assert not np.array_equal(first, other)


def test_generate_split_label_sets_in_range() -> None:
    images, label_sets = scenes.generate_split("test", 200, 96, seed=0)
    assert images.shape == (200, 96, 96)
    assert images.dtype == np.uint8
    sizes = [len(labels) for labels in label_sets]
    assert min(sizes) >= 1
    assert max(sizes) <= 4
    assert all(name in scenes.CLASS_NAMES for labels in label_sets for name in labels)
    # With 1 to 4 digits uniform and repeats possible, some canvases carry 4 distinct classes.
    assert sizes.count(4) > 0
    assert sizes.count(1) > 0


def test_sample_layout_follows_distribution() -> None:
    generator = torch.Generator().manual_seed(0)
    layout = scenes.sample_layout(4000, 96, 100, generator)
    counts = layout.present.sum(dim=1)
    sides = layout.boxes[..., 2][layout.present]
    x0 = layout.boxes[..., 0][layout.present]
    assert set(counts.tolist()) == {1, 2, 3, 4}
    assert float(sides.min()) == 12.0
    assert float(sides.max()) == 72.0
    assert float((x0 + sides).max()) <= 96.0
    assert float(x0.min()) == 0.0
    for count in range(1, 5):
        assert abs(float((counts == count).float().mean()) - 0.25) < 0.03


def _one_digit_layout(x0: float, y0: float, side: float) -> scenes.SceneLayout:
    return scenes.SceneLayout(
        scan_index=torch.zeros(1, 1, dtype=torch.long),
        present=torch.ones(1, 1, dtype=torch.bool),
        boxes=torch.tensor([[[x0, y0, side]]]),
        ink=torch.ones(1, 1),
        background=torch.zeros(1),
        noise_std=torch.zeros(1),
    )


@pytest.mark.parametrize(
    ("x0", "expected_visible"),
    [(0.0, 1.0), (-16.0, None), (40.0, 0.0)],
)
def test_render_visible_fraction(x0: float, expected_visible: float | None) -> None:
    scan = torch.ones(1, 8, 8)
    layout = _one_digit_layout(x0, 0.0, 32.0)
    window = torch.tensor([[0.0, 0.0, 32.0]])
    image, visible = scenes.render(layout, scan, window, 32, torch.Generator().manual_seed(0))
    assert image.shape == (1, 32, 32)
    if expected_visible is None:
        # Half of the digit is left of the window; bilinear edges blur it by a fraction.
        assert 0.4 < float(visible[0, 0]) < 0.6
    else:
        assert float(visible[0, 0]) == pytest.approx(expected_visible, abs=0.05)


def test_render_later_digit_occludes_earlier() -> None:
    layout = scenes.SceneLayout(
        scan_index=torch.zeros(1, 2, dtype=torch.long),
        present=torch.ones(1, 2, dtype=torch.bool),
        boxes=torch.tensor([[[0.0, 0.0, 32.0], [0.0, 0.0, 32.0]]]),
        ink=torch.tensor([[1.0, 0.5]]),
        background=torch.zeros(1),
        noise_std=torch.zeros(1),
    )
    scan = torch.ones(1, 8, 8)
    window = torch.tensor([[0.0, 0.0, 32.0]])
    image, visible = scenes.render(layout, scan, window, 32, torch.Generator().manual_seed(0))
    assert float(image[0, 16, 16]) == pytest.approx(0.5)
    assert float(visible[0, 0]) < 0.05
    assert float(visible[0, 1]) == pytest.approx(1.0, abs=0.05)


def test_scenes_command_writes_corpus(tmp_path: Path) -> None:
    out = tmp_path / "scenes"
    args = _parse(["--out", str(out), "--n-train", "5", "--n-test", "3", "--side", "64"])
    assert scenes.run(args) == 0
    ground_truth = json.loads((out / "train-labels.json").read_text())
    assert ground_truth["classes"] == list(scenes.CLASS_NAMES)
    assert sorted(ground_truth["labels"]) == [f"{i:06d}.png" for i in range(5)]
    assert len(json.loads((out / "test-labels.json").read_text())["labels"]) == 3
    with Image.open(out / "train" / "000000.png") as image:
        assert image.size == (64, 64)
    settings = json.loads((out / "scenes.json").read_text())
    assert settings["side"] == 64
    _, ids, labels = scenes.read_ground_truth(out / "test-labels.json")
    assert labels.shape == (3, 10)
    assert labels.sum(axis=1).min() >= 1
    assert ids == ["000000.png", "000001.png", "000002.png"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--side", "32"], "--side 32"),
        (["--n-train", "-1"], "--n-train -1"),
        (["--max-digits", "5"], "--max-digits 5"),
    ],
)
def test_scenes_command_rejects_bad_values(tmp_path: Path, argv: list[str], message: str) -> None:
    args = _parse(["--out", str(tmp_path / "out"), *argv])
    with pytest.raises(UsageError, match=message):
        scenes.run(args)


def test_read_ground_truth_rejects_unknown_id(tmp_path: Path) -> None:
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"classes": ["one"], "labels": {"a.png": ["one"]}}))
    classes, ids, labels = scenes.read_ground_truth(path)
    assert classes == ["one"]
    assert ids == ["a.png"]
    assert labels.tolist() == [[1]]
    with pytest.raises(ValueError, match=r"'b\.png' is not in"):
        scenes.read_ground_truth(path, ["b.png"])
