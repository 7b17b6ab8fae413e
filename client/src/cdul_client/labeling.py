"""The batch-labeling loop behind `cdul-label pseudo`, `relabel` and `predict`.

Images are read and sent in batches with a bounded number of calls in flight; the results of
each batch are written durably (see `labelfile`) before the progress bar moves, so the output
on disk always matches what the summary counts.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tqdm import tqdm

from cdul_client.client import LabelerClient
from cdul_client.config import PseudoLabelOptions
from cdul_client.corpus import CorpusImage, ImageReader
from cdul_client.errors import LabelerError
from cdul_client.images import ContentKey, ImageSource
from cdul_client.labelfile import JsonlAppender, RecordSink
from cdul_client.results import Prediction, PredictResponse, PseudoLabelResponse, PseudoLabelResult

_logger = logging.getLogger(__name__)

# A whole-call failure with one of these codes stops the run: the next batches would fail the
# same way, and a rerun with --resume continues where this one stopped.
FATAL_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.CANCELLED,
    }
)
CONTENT_KEY_NOT_FOUND = "content_key_not_found"


class RunStopped(Exception):
    """A whole-call failure that ends the run; what was written so far stays valid."""

    def __init__(self, error: LabelerError) -> None:
        self.error = error
        super().__init__(str(error))


@dataclass
class WorkItem:
    """One image to label: where it is, and its content key when relabeling from the cache."""

    image: CorpusImage
    content_key: str | None = None


@dataclass
class Summary:
    """Counts of one run: written records, failed images, images already in the output."""

    labeled: int = 0
    failed: int = 0
    skipped: int = 0


@dataclass
class _Sent:
    items: list[WorkItem]
    sources: list[ImageSource]


class BatchLabeler:
    """Run batches through the server and write records and errors as they complete.

    Args:
        sink: where records go.
        errors: the error log (`<out>.errors.jsonl`).
        out_dir: the output's folder; record paths are relative to it.
        batch_size: images per call.
        progress: show a tqdm bar on stderr.
    """

    def __init__(
        self,
        sink: RecordSink,
        errors: JsonlAppender,
        out_dir: Path,
        *,
        batch_size: int,
        progress: bool,
    ) -> None:
        self.sink = sink
        self.errors = errors
        self.out_dir = out_dir.absolute()
        self.batch_size = batch_size
        self.progress = progress
        self.summary = Summary()
        self._reader = ImageReader()
        self._bar: tqdm[Any] | None = None

    def run(
        self,
        items: Sequence[WorkItem],
        call_batches: Callable[[Iterable[Sequence[tuple[str, ImageSource]]]], Iterator[Any]],
        to_records: Callable[[list[WorkItem], Any], list[tuple[WorkItem, Any]]],
        make_record: Callable[[WorkItem, Any], dict[str, Any]],
    ) -> Summary:
        """Label `items`; return the counts, or raise RunStopped on a fatal call failure.

        Args:
            items: the images still to label.
            call_batches: sends batches of (id, source) and yields one response or
                LabelerError per batch, in order.
            to_records: pairs each sent item with its result, after any fallback calls.
            make_record: builds the output record of a successful result.
        """
        queued: deque[_Sent] = deque()
        self._bar = tqdm(
            total=len(items),
            unit="img",
            disable=not self.progress,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        answered = 0
        try:
            for outcome in call_batches(self._batches(items, queued)):
                sent = queued.popleft()
                if isinstance(outcome, LabelerError):
                    if outcome.code in FATAL_CODES or answered == 0:
                        raise RunStopped(outcome)
                    _logger.warning("a batch of %d images failed: %s", len(sent.items), outcome)
                    self._fail_batch(sent.items, outcome)
                    continue
                answered += 1
                try:
                    pairs = to_records(sent.items, outcome)
                except LabelerError as error:
                    if error.code in FATAL_CODES:
                        raise RunStopped(error) from error
                    self._fail_batch(sent.items, error)
                    continue
                self._write(pairs, make_record)
        finally:
            self._bar.close()
            self._reader.close()
        return self.summary

    def _batches(
        self, items: Sequence[WorkItem], queued: deque[_Sent]
    ) -> Iterator[list[tuple[str, ImageSource]]]:
        for start in range(0, len(items), self.batch_size):
            sent = _Sent([], [])
            local_errors = []
            for item in items[start : start + self.batch_size]:
                if item.content_key is not None:
                    sent.items.append(item)
                    sent.sources.append(ContentKey(item.content_key))
                    continue
                try:
                    sent.sources.append(self._reader.read(item.image))
                except OSError as err:
                    local_errors.append(_local_error(item, err, self.out_dir))
                    continue
                sent.items.append(item)
            if local_errors:
                self.errors.write_batch(local_errors)
                self._count_failed(len(local_errors))
            if not sent.items:
                continue
            queued.append(sent)
            yield [
                (item.image.id, source)
                for item, source in zip(sent.items, sent.sources, strict=True)
            ]

    def read(self, image: CorpusImage) -> bytes:
        """Return the bytes of a corpus image (for fallbacks that resend the file)."""
        return self._reader.read(image)

    def _write(
        self,
        pairs: list[tuple[WorkItem, Any]],
        make_record: Callable[[WorkItem, Any], dict[str, Any]],
    ) -> None:
        records = []
        errors = []
        for item, result in pairs:
            if isinstance(result, LabelerError):
                errors.append(error_record(item, result, self.out_dir))
            elif result.ok:
                records.append(make_record(item, result))
            else:
                error = result.error()
                assert error is not None  # result.ok is False
                errors.append(error_record(item, error, self.out_dir))
        self.sink.write_batch(records)
        if errors:
            self.errors.write_batch(errors)
        self.summary.labeled += len(records)
        self._count_failed(len(errors))
        if self._bar is not None:
            self._bar.update(len(records))

    def _fail_batch(self, items: list[WorkItem], error: LabelerError) -> None:
        self.errors.write_batch([error_record(item, error, self.out_dir) for item in items])
        self._count_failed(len(items))

    def _count_failed(self, count: int) -> None:
        self.summary.failed += count
        if self._bar is not None:
            self._bar.update(count)
            self._bar.set_postfix(errors=self.summary.failed, refresh=False)


def record_path(image: CorpusImage, out_dir: Path) -> str:
    """Return the record's `path`: relative to the output's folder when the file is inside it,
    else absolute, so that `out_dir / path` finds the file in both cases."""
    absolute = Path(os.path.abspath(image.path))
    try:
        return absolute.relative_to(os.path.abspath(out_dir)).as_posix()
    except ValueError:
        return absolute.as_posix()


def _base_record(item: WorkItem, content_key: str, out_dir: Path) -> dict[str, Any]:
    record: dict[str, Any] = {
        "type": "record",
        "id": item.image.id,
        "path": record_path(item.image, out_dir),
    }
    if item.image.member is not None:
        record["member"] = item.image.member
    record["content_key"] = content_key
    return record


def error_record(item: WorkItem, error: LabelerError, out_dir: Path) -> dict[str, Any]:
    """Build the error file line of one failed image."""
    record: dict[str, Any] = {"id": item.image.id, "path": record_path(item.image, out_dir)}
    if item.image.member is not None:
        record["member"] = item.image.member
    record.update(code=error.code.name, reason=error.reason, message=error.message)
    return record


def _local_error(item: WorkItem, err: OSError, out_dir: Path) -> dict[str, Any]:
    message = f"{err.strerror or err}: {err.filename or item.image.path}"
    error = LabelerError(grpc.StatusCode.NOT_FOUND, message, reason="read_failed")
    return error_record(item, error, out_dir)


def _floats(values: np.ndarray) -> list[Any]:
    # Seven significant digits keep float32 precision and short lines.
    rounded = np.asarray(values, dtype=np.float64)
    return (
        [float(f"{v:.7g}") for v in rounded.ravel().tolist()]
        if rounded.ndim == 1
        else [_floats(row) for row in rounded]
    )


def pseudo_label_record(out_dir: Path) -> Callable[[WorkItem, PseudoLabelResult], dict[str, Any]]:
    """Return the function that builds pseudo-label records for outputs in `out_dir`."""

    def make(item: WorkItem, result: PseudoLabelResult) -> dict[str, Any]:
        record = _base_record(item, result.content_key or item.content_key or "", out_dir)
        record["global"] = _floats(result.global_scores)
        record["aggregate"] = _floats(result.aggregate_scores)
        record["final"] = _floats(result.final_scores)
        if result.tile_scores is not None:
            record["tiles"] = _floats(result.tile_scores)
        if result.embedding is not None:
            record["embedding"] = _floats(result.embedding)
        if result.tile_embeddings is not None:
            record["tile_embeddings"] = _floats(result.tile_embeddings)
        return record

    return make


def prediction_record(out_dir: Path) -> Callable[[WorkItem, Prediction], dict[str, Any]]:
    """Return the function that builds prediction records for outputs in `out_dir`."""

    def make(item: WorkItem, result: Prediction) -> dict[str, Any]:
        record = _base_record(item, result.content_key, out_dir)
        record["scores"] = _floats(result.scores)
        record["labels"] = [
            {"name": label.name, "index": label.index, "score": float(f"{label.score:.7g}")}
            for label in result.labels
        ]
        return record

    return make


def pair_results(
    items: list[WorkItem], results: Sequence[Any], call: str
) -> list[tuple[WorkItem, Any]]:
    """Pair the items of a batch with the server's results, which come in request order.

    Raises:
        RunStopped: the server returned another number of results or other ids.
    """
    if len(results) != len(items) or any(
        result.id != item.image.id for item, result in zip(items, results, strict=False)
    ):
        error = LabelerError(
            grpc.StatusCode.INTERNAL,
            f"{call} returned {len(results)} results for {len(items)} images, or other ids: "
            "the server does not follow the cdul.v1 API",
        )
        raise RunStopped(error)
    return list(zip(items, results, strict=True))


def pseudo_label_pairs(
    labeler: BatchLabeler,
    client: LabelerClient,
    class_names: Sequence[str],
    options: PseudoLabelOptions,
    model: str,
    timeout_s: float,
) -> Callable[[list[WorkItem], PseudoLabelResponse], list[tuple[WorkItem, Any]]]:
    """Return the pairing function of pseudo labeling.

    Images sent by content key that the server no longer has cached are sent again as file
    bytes, in one extra call per batch, before the batch is written.
    """

    def pair(items: list[WorkItem], response: PseudoLabelResponse) -> list[tuple[WorkItem, Any]]:
        pairs = pair_results(items, response.results, "PseudoLabel")
        missing = [
            index
            for index, (item, result) in enumerate(pairs)
            if item.content_key is not None and result.status.reason == CONTENT_KEY_NOT_FOUND
        ]
        if not missing:
            return pairs
        resend: list[tuple[str, ImageSource]] = []
        resent: list[int] = []
        for index in missing:
            item = pairs[index][0]
            try:
                resend.append((item.image.id, labeler.read(item.image)))
            except OSError as err:
                message = f"not cached on the server, and the file cannot be read: {err}"
                pairs[index] = (
                    item,
                    LabelerError(grpc.StatusCode.NOT_FOUND, message, reason="read_failed"),
                )
                continue
            resent.append(index)
        if resend:
            _logger.info("%d images were not cached on the server: sending the files", len(resend))
            fallback = client.pseudo_label(
                resend, class_names, options=options, model=model, timeout_s=timeout_s
            )
            for index, result in zip(resent, fallback.results, strict=True):
                pairs[index] = (pairs[index][0], result)
        return pairs

    return pair


def predict_pairs(items: list[WorkItem], response: PredictResponse) -> list[tuple[WorkItem, Any]]:
    """Pair the items of a predict batch with their predictions."""
    return pair_results(items, response.results, "Predict")
