"""Crash-safe pseudo-label and prediction files: append per batch, fsync, resume.

A JSON Lines output is appended one batch at a time, with one write, a flush and an fsync, so
a process killed at any moment (SIGKILL included) leaves complete lines plus at most one torn
last line. Resuming truncates that torn line and skips the ids of the complete ones, so every
image ends up in the file exactly once. A Parquet output cannot be appended, so the run writes
the same JSON Lines to a journal (`<out>.journal.jsonl`) and converts it into `<out>` at the
end; the journal, while it exists, is the authoritative state of the run.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

_logger = logging.getLogger(__name__)

PSEUDO_LABEL_FORMAT = "cdul-pseudo-labels"
PREDICTION_FORMAT = "cdul-predictions"
FORMAT_VERSION = 1
PARQUET_METADATA_KEY = b"cdul"
HEADER_KEYS_CHECKED_ON_RESUME = (
    "format",
    "version",
    "classes",
    "model",
    "options",
    "optional_keys",
)


class OutputError(ValueError):
    """An output file that cannot be written or resumed; the message names it and the fix."""


def errors_path(out: Path) -> Path:
    """Return the error file of an output: `<out>.errors.jsonl`."""
    return out.with_name(out.name + ".errors.jsonl")


def journal_path(out: Path) -> Path:
    """Return the journal of a Parquet output: `<out>.journal.jsonl`."""
    return out.with_name(out.name + ".journal.jsonl")


class JsonlAppender:
    """Append JSON objects to a file, one durable batch at a time.

    The file is opened (and created) at the first non-empty batch, so a run without failures
    leaves no empty error file behind.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None

    def write_batch(self, objects: Iterable[dict[str, Any]]) -> None:
        """Append one line per object with a single write, then flush and fsync."""
        data = "".join(_dumps(obj) + "\n" for obj in objects).encode("utf-8")
        if not data:
            return
        if self._file is None:
            self._file = self.path.open("ab")
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None


class RecordSink:
    """The records output of a run: JSON Lines appended in place, or Parquet via a journal."""

    def __init__(self, out: Path, file_format: str, appender: JsonlAppender) -> None:
        self.out = out
        self.file_format = file_format
        self._appender = appender

    def write_batch(self, records: Iterable[dict[str, Any]]) -> None:
        """Append the records of one batch durably."""
        self._appender.write_batch(records)

    def close(self, complete: bool) -> None:
        """Close the output; a complete Parquet run converts its journal into `out` now."""
        self._appender.close()
        if complete and self.file_format == "parquet":
            journal = self._appender.path
            header, records = read_jsonl(journal)
            write_parquet(self.out, header, records)
            journal.unlink()
            _fsync_folder(self.out.parent)


def open_output(
    out: Path, file_format: str, header: dict[str, Any], *, resume: bool, overwrite: bool
) -> tuple[RecordSink, set[str]]:
    """Create or resume an output and return its sink and the ids it already contains.

    An empty file at the output path (left by a run that failed before it wrote the header)
    contains no records, so it is replaced like a missing one.

    Raises:
        OutputError: the output's folder does not exist, the output exists without --resume
            or --overwrite, it was written with another header (vocabulary, model or
            options), or it is damaged.
    """
    if file_format not in ("jsonl", "parquet"):
        raise OutputError(f"unknown output format {file_format!r}: use jsonl or parquet")
    check_output_folder(out)
    # Serialized before any file is touched, so a header that is not valid JSON (such as a
    # NaN option) leaves nothing behind.
    header_line = (_dumps(header) + "\n").encode("utf-8")
    target = journal_path(out) if file_format == "parquet" else out
    for path in (target, out):
        if path.is_file() and path.stat().st_size == 0:
            _logger.warning("%s is empty (an earlier run wrote no header): replacing it", path)
            path.unlink()
    existing = [path for path in (target, out) if path.exists()]
    if existing and not (resume or overwrite):
        raise OutputError(
            f"{existing[0]} already exists: pass --resume to continue that run, or --overwrite "
            "to start over"
        )
    if overwrite:
        for path in (out, journal_path(out), errors_path(out)):
            path.unlink(missing_ok=True)
    elif file_format == "parquet" and not target.exists() and out.exists():
        _journal_from_parquet(out, target)
    done: set[str] = set()
    old_header = None
    if target.exists():
        old_header, done = recover_jsonl(target)
    if old_header is None:
        with target.open("wb") as stream:
            stream.write(header_line)
            stream.flush()
            os.fsync(stream.fileno())
        _fsync_folder(target.parent)
    else:
        check_resumable(old_header, header, target)
    return RecordSink(out, file_format, JsonlAppender(target)), done


def check_output_folder(out: Path) -> None:
    """Raise OutputError unless the folder of the output path exists."""
    folder = out.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise OutputError(f"the folder {folder} of --out {out} {what}: create it first")


def check_resumable(old: dict[str, Any], new: dict[str, Any], path: Path) -> None:
    """Raise OutputError when a run with header `new` cannot append to one with `old`."""
    for key in HEADER_KEYS_CHECKED_ON_RESUME:
        if old.get(key) == new.get(key):
            continue
        if key == "classes":
            detail = _class_difference(old.get(key) or [], new.get(key) or [])
            raise OutputError(
                f"{path} was written with another vocabulary ({detail}): resume with the same "
                "--classes file, or write the new vocabulary to a new --out"
            )
        raise OutputError(
            f"{path} was written with {key} {old.get(key)!r}, this run has {new.get(key)!r}: "
            "resume with the same settings, or write to a new --out"
        )


def _class_difference(old: list[str], new: list[str]) -> str:
    if len(old) != len(new):
        return f"{len(old)} classes there, {len(new)} here"
    for index, (a, b) in enumerate(zip(old, new, strict=True)):
        if a != b:
            return f"class {index} is {a!r} there, {b!r} here"
    return "same classes"


def recover_jsonl(path: Path) -> tuple[dict[str, Any] | None, set[str]]:
    """Truncate a torn last line and return the header (None if none is complete) and ids.

    Raises:
        OutputError: a complete line is not a JSON object, or an id appears twice.
    """
    header: dict[str, Any] | None = None
    ids: set[str] = set()
    good_end = 0
    with path.open("rb") as stream:
        for line_number, line in enumerate(stream, start=1):
            if not line.endswith(b"\n"):
                break
            obj = _parse_line(line, path, line_number)
            good_end += len(line)
            if header is None:
                if obj.get("type") != "header":
                    raise OutputError(
                        f"{path}:1 is not a cdul header line: this is not a cdul-label output; "
                        "pick another --out"
                    )
                header = obj
                continue
            record_id = obj.get("id")
            if not isinstance(record_id, str):
                raise OutputError(f"{path}:{line_number}: record has no string 'id'")
            if record_id in ids:
                raise OutputError(
                    f"{path}:{line_number}: id {record_id!r} appears twice: the file was edited "
                    "or written by two runs at once; remove the duplicate line"
                )
            ids.add(record_id)
    size = path.stat().st_size
    if size > good_end:
        _logger.warning(
            "%s ends with a torn line of %d bytes (a run was killed while writing): removed it",
            path,
            size - good_end,
        )
        with path.open("r+b") as stream:
            stream.truncate(good_end)
            stream.flush()
            os.fsync(stream.fileno())
    return header, ids


def _parse_line(line: bytes, path: Path, line_number: int) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise OutputError(
            f"{path}:{line_number} is not valid JSON: the file is damaged; move it away and "
            "start over, or delete that line"
        ) from err
    if not isinstance(obj, dict):
        raise OutputError(f"{path}:{line_number} is not a JSON object")
    return obj


def read_jsonl(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read a cdul JSON Lines file: its header and its records.

    Raises:
        OutputError: a missing header or a line that is not a JSON object.
    """
    header: dict[str, Any] | None = None
    records = []
    with path.open("rb") as stream:
        for line_number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            obj = _parse_line(line, path, line_number)
            if header is None:
                if obj.get("type") != "header":
                    raise OutputError(f"{path}:1 is not a cdul header line")
                header = obj
            else:
                records.append(obj)
    if header is None:
        raise OutputError(f"{path} is empty: expected a header line and records")
    return header, records


def read_label_file(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read a pseudo-label file (JSON Lines, or Parquet by its `.parquet` suffix)."""
    if not path.is_file():
        raise OutputError(f"pseudo-label file {path} not found")
    if path.suffix == ".parquet":
        return read_parquet(path)
    return read_jsonl(path)


def _import_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise OutputError(
            "Parquet needs pyarrow: pip install 'cdul-client[parquet]', or use --format jsonl"
        ) from err
    return pq


def read_parquet(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read a Parquet pseudo-label file: the header from its metadata, and its rows."""
    pq = _import_parquet()
    table = pq.read_table(path)
    metadata = table.schema.metadata or {}
    if PARQUET_METADATA_KEY not in metadata:
        raise OutputError(f"{path} has no 'cdul' header in its key-value metadata")
    header = json.loads(metadata[PARQUET_METADATA_KEY])
    records = [
        {"type": "record", **{k: v for k, v in row.items() if v is not None}}
        for row in table.to_pylist()
    ]
    return header, records


def write_parquet(path: Path, header: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Write records as Parquet columns with the header in the metadata, atomically."""
    pq = _import_parquet()
    import pyarrow as pa

    rows = [{k: v for k, v in record.items() if k != "type"} for record in records]
    table = pa.Table.from_pylist(rows) if rows else pa.table({"id": pa.array([], pa.string())})
    table = table.replace_schema_metadata({PARQUET_METADATA_KEY: json.dumps(header)})
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    with tmp.open("rb") as stream:
        os.fsync(stream.fileno())
    tmp.replace(path)


def _journal_from_parquet(out: Path, journal: Path) -> None:
    header, records = read_parquet(out)
    tmp = journal.with_name(journal.name + ".tmp")
    with tmp.open("wb") as stream:
        stream.write((_dumps(header) + "\n").encode("utf-8"))
        for record in records:
            stream.write((_dumps(record) + "\n").encode("utf-8"))
        stream.flush()
        os.fsync(stream.fileno())
    tmp.replace(journal)
    _fsync_folder(journal.parent)


def iter_error_lines(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the complete lines of an error file."""
    if not path.exists():
        return
    with path.open("rb") as stream:
        for line_number, line in enumerate(stream, start=1):
            if line.endswith(b"\n"):
                yield _parse_line(line, path, line_number)


def open_error_log(out: Path) -> JsonlAppender:
    """Open `<out>.errors.jsonl` for appending, after removing a torn last line."""
    path = errors_path(out)
    if path.exists():
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with path.open("r+b") as stream:
                stream.truncate(end)
    return JsonlAppender(path)


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)


def _fsync_folder(folder: Path) -> None:
    # Makes a created or renamed file's directory entry durable; not possible on every platform.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
