"""Read and write pseudo-label files (JSON Lines or Parquet) and ground-truth files."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_logger = logging.getLogger(__name__)

FORMAT_NAME = "cdul-pseudo-labels"
FORMAT_VERSION = 1
PARQUET_METADATA_KEY = b"cdul"
_SCORE_FIELDS = ("global", "aggregate", "final")


class RecordError(ValueError):
    """An invalid pseudo-label or ground-truth file. The message names the file and record."""


@dataclass
class PseudoLabelFile:
    """The header and records of one or more pseudo-label files over the same classes.

    Attributes:
        header: the header object of the first file.
        classes: class names in the order of every score list.
        records: one dict a record, in file order, each with at least `id` and `final`.
    """

    header: dict[str, Any]
    classes: list[str]
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        """Image ids in record order."""
        return [record["id"] for record in self.records]

    def labels(self, key: str = "final") -> np.ndarray:
        """Return the score lists under `key` as a float64 array (N, C)."""
        return np.asarray([record[key] for record in self.records], dtype=np.float64).reshape(
            len(self.records), len(self.classes)
        )

    def embeddings(self) -> np.ndarray:
        """Return the whole-image embeddings as float32 (N, D).

        Raises:
            RecordError: a record has no `embedding` or its length differs from the first one.
        """
        if not self.records:
            return np.zeros((0, 0), dtype=np.float32)
        dim = None
        for record in self.records:
            embedding = record.get("embedding")
            if embedding is None:
                raise RecordError(
                    f"record {record['id']!r} has no 'embedding': label the corpus with "
                    "embeddings included (clip-linear trains on them)"
                )
            if dim is None:
                dim = len(embedding)
            elif len(embedding) != dim:
                raise RecordError(
                    f"record {record['id']!r} has an embedding of length {len(embedding)}, "
                    f"expected {dim} like the first record: use one CLIP model for the file"
                )
        return np.asarray([r["embedding"] for r in self.records], dtype=np.float32)


def read_pseudo_labels(paths: Path | Sequence[Path]) -> PseudoLabelFile:
    """Read one pseudo-label file, or several shards of one corpus, and validate them.

    A path ending in `.parquet` is read with pyarrow; anything else as JSON Lines. Every
    shard must have the same `classes` in its header, ids must be unique across shards, and
    every score list must have one number in [0, 1] per class.

    Raises:
        RecordError: the first offending file, line or image id, with the fix.
    """
    path_list = [paths] if isinstance(paths, Path) else list(paths)
    if not path_list:
        raise RecordError("no pseudo-label file given: pass at least one file")
    merged: PseudoLabelFile | None = None
    seen: dict[str, Path] = {}
    for path in path_list:
        if not path.is_file():
            raise RecordError(f"pseudo-label file not found: {path}")
        part = _read_parquet(path) if path.suffix == ".parquet" else _read_jsonl(path)
        if merged is None:
            merged = PseudoLabelFile(header=part.header, classes=part.classes)
        elif part.classes != merged.classes:
            raise RecordError(
                f"{path}: header classes {part.classes} differ from {merged.classes} in "
                f"{path_list[0]}: label every shard with the same class list and order"
            )
        for record in part.records:
            if record["id"] in seen:
                raise RecordError(
                    f"{path}: image id {record['id']!r} is already in {seen[record['id']]}: "
                    "ids must be unique across the corpus"
                )
            seen[record["id"]] = path
            merged.records.append(record)
    assert merged is not None  # path_list is not empty
    _logger.info(
        "read %d pseudo-label records over %d classes from %d file(s)",
        len(merged.records),
        len(merged.classes),
        len(path_list),
    )
    return merged


def _check_header(header: Any, where: str) -> list[str]:
    if not isinstance(header, dict) or header.get("type") != "header":
        raise RecordError(f"{where}: the first line must be the header object with type 'header'")
    if header.get("format") != FORMAT_NAME:
        raise RecordError(
            f"{where}: header format is {header.get('format')!r}, expected {FORMAT_NAME!r}"
        )
    if header.get("version") != FORMAT_VERSION:
        raise RecordError(
            f"{where}: header version {header.get('version')!r} is not supported, "
            f"expected {FORMAT_VERSION}"
        )
    classes = header.get("classes")
    if (
        not isinstance(classes, list)
        or not classes
        or not all(isinstance(name, str) for name in classes)
    ):
        raise RecordError(f"{where}: header 'classes' must be a non-empty list of class names")
    if len(set(classes)) != len(classes):
        raise RecordError(f"{where}: header 'classes' contains a duplicate name: {classes}")
    return list(classes)


def _check_record(record: Any, classes: list[str], where: str) -> dict[str, Any]:
    if not isinstance(record, dict) or record.get("type", "record") != "record":
        raise RecordError(f"{where}: expected a record object with type 'record'")
    image_id = record.get("id")
    if not isinstance(image_id, str) or not image_id:
        raise RecordError(f"{where}: record has no string 'id'")
    record_classes = record.get("classes")
    if record_classes is not None and list(record_classes) != classes:
        raise RecordError(
            f"{where}: image {image_id!r} lists classes {record_classes} in another order than "
            f"the header {classes}: relabel the file with one class order"
        )
    if "final" not in record:
        raise RecordError(f"{where}: image {image_id!r} has no 'final' pseudo label")
    for key in _SCORE_FIELDS:
        if key in record:
            _check_scores(record[key], key, image_id, len(classes), where)
    return record


def _check_scores(values: Any, key: str, image_id: str, n_classes: int, where: str) -> None:
    if not isinstance(values, list) or len(values) != n_classes:
        length = len(values) if isinstance(values, list) else type(values).__name__
        raise RecordError(
            f"{where}: image {image_id!r} has '{key}' of length {length}, expected one score "
            f"per class ({n_classes}) in the header's class order"
        )
    for j, value in enumerate(values):
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or math.isnan(value)
            or not 0.0 <= value <= 1.0
        ):
            raise RecordError(
                f"{where}: image {image_id!r} has '{key}'[{j}] = {value!r}, outside [0, 1] or "
                "NaN: pseudo labels must be probabilities"
            )


def _read_jsonl(path: Path) -> PseudoLabelFile:
    records: list[dict[str, Any]] = []
    classes: list[str] = []
    header: dict[str, Any] = {}
    with path.open(encoding="utf-8") as stream:
        for line_number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise RecordError(f"{where}: invalid JSON ({err.msg})") from err
            if not header:
                classes = _check_header(obj, where)
                header = obj
                continue
            records.append(_check_record(obj, classes, where))
    if not header:
        raise RecordError(f"{path}: empty file, expected a header line and records")
    return PseudoLabelFile(header=header, classes=classes, records=records)


def _read_parquet(path: Path) -> PseudoLabelFile:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise RecordError(
            f"{path}: reading Parquet needs pyarrow: pip install 'pyarrow>=15', or use JSON Lines"
        ) from err
    table = pq.read_table(path)
    metadata = table.schema.metadata or {}
    if PARQUET_METADATA_KEY not in metadata:
        raise RecordError(f"{path}: no 'cdul' header in the Parquet key-value metadata")
    header = json.loads(metadata[PARQUET_METADATA_KEY])
    classes = _check_header(header, str(path))
    records = []
    for row_number, row in enumerate(table.to_pylist()):
        row = {key: value for key, value in row.items() if value is not None}
        records.append(_check_record(row, classes, f"{path}: row {row_number}"))
    return PseudoLabelFile(header=header, classes=classes, records=records)


def write_pseudo_labels(
    path: Path, header: dict[str, Any], records: Iterable[dict[str, Any]]
) -> None:
    """Write a pseudo-label file: JSON Lines, or Parquet when `path` ends in `.parquet`.

    The file is written to a temporary name next to `path` and renamed, so a reader never sees
    half a file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    records = list(records)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [{k: v for k, v in r.items() if k != "type"} for r in records]
        table = pa.Table.from_pylist(rows)
        table = table.replace_schema_metadata({PARQUET_METADATA_KEY: json.dumps(header)})
        pq.write_table(table, tmp)
    else:
        with tmp.open("w", encoding="utf-8") as stream:
            stream.write(json.dumps(header) + "\n")
            for record in records:
                stream.write(json.dumps(record) + "\n")
    tmp.replace(path)


def read_ground_truth(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    """Read a ground-truth file: `{"classes": [...], "labels": {id: [class, ...]}}`.

    A plain mapping from id to class list is accepted too, with `classes.json` (a list of names)
    next to it, which is how the COCO-128 sample ships.

    Raises:
        RecordError: missing file, bad structure, or a class that is not in `classes`.
    """
    if not path.is_file():
        raise RecordError(f"ground-truth file not found: {path}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RecordError(f"{path}: invalid JSON ({err.msg})") from err
    if isinstance(obj, dict) and "classes" in obj and "labels" in obj:
        classes, labels = obj["classes"], obj["labels"]
    elif isinstance(obj, dict):
        classes_path = path.with_name("classes.json")
        if not classes_path.is_file():
            raise RecordError(
                f"{path}: expected {{'classes': [...], 'labels': {{...}}}}, or a plain mapping "
                f"with classes.json next to it"
            )
        classes, labels = json.loads(classes_path.read_text(encoding="utf-8")), obj
    else:
        raise RecordError(f"{path}: expected a JSON object with 'classes' and 'labels'")
    known = set(classes)
    for image_id, names in labels.items():
        unknown = [name for name in names if name not in known]
        if unknown:
            raise RecordError(f"{path}: image {image_id!r} has unknown classes {unknown}")
    return list(classes), {str(k): list(v) for k, v in labels.items()}


def ground_truth_matrix(
    classes: Sequence[str],
    ids: Sequence[str],
    gt_classes: Sequence[str],
    gt_labels: dict[str, list[str]],
    what: str = "ground truth",
) -> np.ndarray:
    """Return the {0, 1} matrix (N, C) of `gt_labels` for `ids`, in the order of `classes`.

    Raises:
        RecordError: an id has no ground truth, or the class sets differ.
    """
    if set(gt_classes) != set(classes):
        missing = sorted(set(classes) - set(gt_classes))
        extra = sorted(set(gt_classes) - set(classes))
        raise RecordError(
            f"{what} classes differ from the pseudo-label classes (missing {missing}, "
            f"extra {extra}): use ground truth over the same classes"
        )
    column = {name: j for j, name in enumerate(classes)}
    matrix = np.zeros((len(ids), len(classes)), dtype=np.int64)
    for i, image_id in enumerate(ids):
        if image_id not in gt_labels:
            raise RecordError(f"{what} has no entry for image {image_id!r}")
        for name in gt_labels[image_id]:
            matrix[i, column[name]] = 1
    return matrix
