"""Pseudo-label and ground-truth files: round trips and the errors on bad records."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cdul_training.records import (
    RecordError,
    ground_truth_matrix,
    read_ground_truth,
    read_pseudo_labels,
    write_pseudo_labels,
)

HEADER = {
    "type": "header",
    "format": "cdul-pseudo-labels",
    "version": 1,
    "classes": ["cat", "dog"],
    "model": "digits-clip",
    "options": {"grid_size": 3},
    "created_by": "test",
}


def _record(image_id: str, final: list[Any], **extra: Any) -> dict[str, Any]:
    return {"type": "record", "id": image_id, "path": f"images/{image_id}", "final": final, **extra}


def _write_jsonl(path: Path, header: dict[str, Any], records: list[dict[str, Any]]) -> Path:
    lines = [json.dumps(header)] + [json.dumps(r, allow_nan=True) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_round_trip(tmp_path: Path) -> None:
    records = [
        _record("a.png", [0.1, 0.9], embedding=[0.6, 0.8]),
        _record("b.png", [0.7, 0.2], embedding=[1.0, 0.0]),
    ]
    write_pseudo_labels(tmp_path / "p.jsonl", HEADER, records)
    read = read_pseudo_labels(tmp_path / "p.jsonl")
    assert read.classes == ["cat", "dog"]
    assert read.ids == ["a.png", "b.png"]
    np.testing.assert_array_equal(read.labels(), [[0.1, 0.9], [0.7, 0.2]])
    np.testing.assert_allclose(read.embeddings(), [[0.6, 0.8], [1.0, 0.0]])
    assert read.header["model"] == "digits-clip"


def test_parquet_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    records = [_record("a.png", [0.1, 0.9], tiles=[[0.2, 0.8]]), _record("b.png", [0.7, 0.2])]
    write_pseudo_labels(tmp_path / "p.parquet", HEADER, records)
    read = read_pseudo_labels(tmp_path / "p.parquet")
    assert read.classes == ["cat", "dog"]
    assert read.ids == ["a.png", "b.png"]
    np.testing.assert_allclose(read.labels(), [[0.1, 0.9], [0.7, 0.2]])
    assert read.records[0]["tiles"] == [[0.2, 0.8]]
    assert "tiles" not in read.records[1]


def test_shards_merge_in_order(tmp_path: Path) -> None:
    first = _write_jsonl(tmp_path / "s0.jsonl", HEADER, [_record("a.png", [0.1, 0.9])])
    second = _write_jsonl(tmp_path / "s1.jsonl", HEADER, [_record("b.png", [0.3, 0.4])])
    read = read_pseudo_labels([first, second])
    assert read.ids == ["a.png", "b.png"]


@pytest.mark.parametrize(
    ("final", "message"),
    [
        ([0.1, 1.5], r"'final'\[1\] = 1.5, outside \[0, 1\] or NaN"),
        ([-0.01, 0.5], r"'final'\[0\] = -0.01, outside"),
        ([math.nan, 0.5], r"'final'\[0\] = nan"),
        ([0.5], "length 1, expected one score per class"),
        (["high", 0.5], r"'final'\[0\] = 'high'"),
    ],
)
def test_bad_label_names_image(tmp_path: Path, final: list[Any], message: str) -> None:
    path = _write_jsonl(
        tmp_path / "p.jsonl", HEADER, [_record("ok.png", [0.2, 0.3]), _record("bad.png", final)]
    )
    with pytest.raises(RecordError, match=message) as info:
        read_pseudo_labels(path)
    assert "'bad.png'" in str(info.value)
    assert "p.jsonl:3" in str(info.value)


def test_class_order_differs_between_shards(tmp_path: Path) -> None:
    swapped = HEADER | {"classes": ["dog", "cat"]}
    first = _write_jsonl(tmp_path / "s0.jsonl", HEADER, [_record("a.png", [0.1, 0.9])])
    second = _write_jsonl(tmp_path / "s1.jsonl", swapped, [_record("b.png", [0.3, 0.4])])
    with pytest.raises(RecordError, match="same class list and order"):
        read_pseudo_labels([first, second])


def test_record_class_order_differs(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "p.jsonl", HEADER, [_record("x.png", [0.1, 0.9], classes=["dog", "cat"])]
    )
    with pytest.raises(RecordError, match=r"image 'x.png' lists classes"):
        read_pseudo_labels(path)


def test_duplicate_id_across_shards(tmp_path: Path) -> None:
    first = _write_jsonl(tmp_path / "s0.jsonl", HEADER, [_record("a.png", [0.1, 0.9])])
    second = _write_jsonl(tmp_path / "s1.jsonl", HEADER, [_record("a.png", [0.3, 0.4])])
    with pytest.raises(RecordError, match=r"'a\.png' is already in"):
        read_pseudo_labels([first, second])


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"type": "record", "id": "a"}, "first line must be the header"),
        (HEADER | {"format": "other"}, "header format is 'other'"),
        (HEADER | {"version": 2}, "version 2 is not supported"),
        (HEADER | {"classes": []}, "non-empty list"),
        (HEADER | {"classes": ["a", "a"]}, "duplicate"),
    ],
)
def test_bad_header(tmp_path: Path, header: dict[str, Any], message: str) -> None:
    path = _write_jsonl(tmp_path / "p.jsonl", header, [_record("a.png", [0.1, 0.9])])
    with pytest.raises(RecordError, match=message):
        read_pseudo_labels(path)


def test_missing_embedding_names_image(tmp_path: Path) -> None:
    records = [_record("a.png", [0.1, 0.9], embedding=[1.0]), _record("b.png", [0.1, 0.9])]
    path = _write_jsonl(tmp_path / "p.jsonl", HEADER, records)
    with pytest.raises(RecordError, match=r"'b\.png' has no 'embedding'"):
        read_pseudo_labels(path).embeddings()


def test_ground_truth_both_layouts(tmp_path: Path, shared_data: Path) -> None:
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"classes": ["cat", "dog"], "labels": {"a": ["dog"], "b": []}}))
    classes, labels = read_ground_truth(path)
    matrix = ground_truth_matrix(["dog", "cat"], ["b", "a"], classes, labels)
    np.testing.assert_array_equal(matrix, [[0, 0], [1, 0]])

    coco_classes, coco_labels = read_ground_truth(shared_data / "coco128" / "labels.json")
    assert len(coco_classes) == 80
    assert len(coco_labels) > 100


def test_ground_truth_errors(tmp_path: Path) -> None:
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"classes": ["cat", "dog"], "labels": {"a": ["bird"]}}))
    with pytest.raises(RecordError, match=r"'a' has unknown classes \['bird'\]"):
        read_ground_truth(path)
    path.write_text(json.dumps({"classes": ["cat", "dog"], "labels": {"a": ["dog"]}}))
    classes, labels = read_ground_truth(path)
    with pytest.raises(RecordError, match="no entry for image 'b'"):
        ground_truth_matrix(classes, ["a", "b"], classes, labels)
    with pytest.raises(RecordError, match=r"missing \['cow'\]"):
        ground_truth_matrix(["cat", "cow"], ["a"], classes, labels)
