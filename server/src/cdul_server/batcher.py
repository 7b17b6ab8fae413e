"""Dynamic batching: views from concurrent requests share encoder batches.

A request first reserves room for all of its views with :meth:`DynamicBatcher.admit`, which
raises :class:`QueueFullError` when the bounded queue has no room, so a request is rejected
before any of its work starts. Decode workers then :meth:`~DynamicBatcher.submit` each image's
preprocessed views. One encoder thread per batcher takes up to ``max_batch_size`` views from
the front of the queue, waiting at most ``max_queue_delay_s`` after the oldest queued view
arrived, runs the encoder once and scatters the rows back to each submission's future. A
submission larger than the room left in a batch is split across batches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from cdul_server.errors import QueueFullError

_logger = logging.getLogger(__name__)

Encoder = Callable[[np.ndarray], np.ndarray]


class BatchObserver(Protocol):
    """Receives batcher measurements (the metrics module implements it)."""

    def batch_encoded(self, views: int, seconds: float) -> None: ...

    def queue_depth(self, views: int) -> None: ...


class Admission:
    """Room reserved in a batcher's queue for one request's views.

    Use as a context manager: leaving it returns whatever room the request did not use.
    """

    def __init__(self, batcher: DynamicBatcher, views: int) -> None:
        self._batcher = batcher
        self._remaining = views
        self._lock = threading.Lock()

    def release(self, views: int) -> None:
        """Return room for ``views`` views that are encoded or will not be submitted."""
        with self._lock:
            views = min(views, self._remaining)
            self._remaining -= views
        if views:
            self._batcher._release(views)

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release(self._remaining)


@dataclass
class _Submission:
    pixels: np.ndarray
    future: Future[np.ndarray]
    admission: Admission | None
    enqueued: float
    cancelled: threading.Event | None = None
    taken: int = 0
    filled: int = 0
    output: np.ndarray | None = None
    failed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def rows(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def is_cancelled(self) -> bool:
        return self.cancelled is not None and self.cancelled.is_set()


class DynamicBatcher:
    """Batches encoder inputs across requests; see the module docstring.

    Args:
        name: Model name, used in thread names and log messages.
        encode: Runs the encoder on a (N, ...) float32 batch and returns (N, D) rows.
        max_batch_size: Most views per encoder call.
        max_queue_delay_s: Longest time the oldest queued view waits for a fuller batch.
        max_queue_views: Views that admitted, unfinished requests may hold in the queue.
        max_buffered_views: Preprocessed views held in memory waiting for the encoder;
            ``submit`` blocks while the buffer is full. Defaults to 4 batches.
        observer: Receives batch sizes, encoder times and the queue depth.
    """

    def __init__(
        self,
        name: str,
        encode: Encoder,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_views: int,
        max_buffered_views: int | None = None,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_queue_delay_s < 0:
            raise ValueError(f"max_queue_delay_s must not be negative, got {max_queue_delay_s}")
        if max_queue_views < 1:
            raise ValueError(f"max_queue_views must be at least 1, got {max_queue_views}")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_views = max_queue_views
        self.max_buffered_views = max_buffered_views or 4 * max_batch_size
        self._encode = encode
        self._observer = observer
        self._cond = threading.Condition()
        self._queue: deque[_Submission] = deque()
        self._queued_rows = 0
        self._admitted = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"encoder-{name}", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        """Views admitted to the queue and not yet encoded or released."""
        with self._cond:
            return self._admitted

    def admit(self, views: int) -> Admission:
        """Reserve room for a request's views.

        Raises:
            QueueFullError: The queue cannot take ``views`` more views now, or ever.
        """
        with self._cond:
            if self._closed:
                raise QueueFullError(f"the {self.name} encoder queue is closed")
            if views > self.max_queue_views:
                raise QueueFullError(
                    f"the request needs {views} encoder views but the queue holds at most "
                    f"{self.max_queue_views} views (--max-queue-views): send fewer images or a "
                    "smaller grid per request"
                )
            if self._admitted + views > self.max_queue_views:
                raise QueueFullError(
                    f"the {self.name} encoder queue is full ({self._admitted} of "
                    f"{self.max_queue_views} views queued, --max-queue-views): retry with backoff"
                )
            self._admitted += views
            depth = self._admitted
        self._report_depth(depth)
        return Admission(self, views)

    def _release(self, views: int) -> None:
        with self._cond:
            self._admitted -= views
            depth = self._admitted
        self._report_depth(depth)

    def _report_depth(self, depth: int) -> None:
        if self._observer is not None:
            self._observer.queue_depth(depth)

    def submit(
        self,
        pixels: np.ndarray,
        admission: Admission | None = None,
        timeout_s: float | None = None,
        cancelled: threading.Event | None = None,
    ) -> Future[np.ndarray]:
        """Queue views for encoding; the future's result has one output row per input row.

        Blocks while the buffer of preprocessed views is full, at most ``timeout_s`` seconds.
        Views not yet encoded when ``cancelled`` is set are dropped, and the future raises
        ``concurrent.futures.CancelledError``.

        Raises:
            QueueFullError: The batcher is closed.
            TimeoutError: The buffer stayed full for ``timeout_s`` seconds.
        """
        future: Future[np.ndarray] = Future()
        future.set_running_or_notify_cancel()
        if pixels.shape[0] == 0:
            future.set_result(np.zeros((0, 0), dtype=np.float32))
            return future
        rows = int(pixels.shape[0])
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            # A submission larger than the buffer is accepted once the buffer is empty.
            while (
                not self._closed
                and self._queued_rows > 0
                and self._queued_rows + rows > self.max_buffered_views
            ):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"the {self.name} encoder buffer stayed full")
                self._cond.wait(remaining)
            if self._closed:
                raise QueueFullError(f"the {self.name} encoder queue is closed")
            self._queue.append(
                _Submission(
                    pixels=pixels,
                    future=future,
                    admission=admission,
                    enqueued=time.monotonic(),
                    cancelled=cancelled,
                )
            )
            self._queued_rows += rows
            self._cond.notify_all()
        return future

    def close(self, timeout_s: float | None = None) -> None:
        """Stop taking submissions, encode what is queued, and stop the encoder thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                deadline = self._queue[0].enqueued + self.max_queue_delay_s
                while self._queued_rows < self.max_batch_size and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                dropped = self._drop_cancelled_locked()
                batch = self._take_locked()
                self._cond.notify_all()
            for item in dropped:
                self._fail(item, CancelledError())
            self._encode_batch(batch)

    def _drop_cancelled_locked(self) -> list[_Submission]:
        """Remove the queued submissions of cancelled requests, so none of them is encoded."""
        dropped = [item for item in self._queue if item.is_cancelled]
        if dropped:
            self._queue = deque(item for item in self._queue if not item.is_cancelled)
            self._queued_rows -= sum(item.rows - item.taken for item in dropped)
        return dropped

    def _take_locked(self) -> list[tuple[_Submission, int, int]]:
        batch: list[tuple[_Submission, int, int]] = []
        room = self.max_batch_size
        while self._queue and room > 0:
            item = self._queue[0]
            start = item.taken
            stop = min(item.rows, start + room)
            batch.append((item, start, stop))
            item.taken = stop
            room -= stop - start
            self._queued_rows -= stop - start
            if item.taken == item.rows:
                self._queue.popleft()
        return batch

    def _encode_batch(self, batch: list[tuple[_Submission, int, int]]) -> None:
        live = [
            (item, start, stop)
            for item, start, stop in batch
            if not item.failed and not item.is_cancelled
        ]
        for item in {id(item): item for item, _, _ in batch if item.is_cancelled}.values():
            self._fail(item, CancelledError())
        if not live:
            return
        pixels = (
            live[0][0].pixels[live[0][1] : live[0][2]]
            if len(live) == 1
            else np.concatenate([item.pixels[start:stop] for item, start, stop in live])
        )
        started = time.perf_counter()
        try:
            embeddings = np.asarray(self._encode(pixels))
        except Exception as err:  # an encoder failure fails the requests in this batch only
            _logger.error(
                "encoder %s failed on a batch of %d views", self.name, len(pixels), exc_info=err
            )
            for item, _, _ in live:
                self._fail(item, err)
            return
        seconds = time.perf_counter() - started
        if self._observer is not None:
            self._observer.batch_encoded(len(pixels), seconds)
        offset = 0
        for item, start, stop in live:
            count = stop - start
            rows = embeddings[offset : offset + count]
            offset += count
            with item.lock:
                if item.output is None:
                    item.output = np.empty((item.rows, *rows.shape[1:]), dtype=rows.dtype)
                item.output[start:stop] = rows
                item.filled += count
                complete = item.filled == item.rows
            if item.admission is not None:
                item.admission.release(count)
            if complete and not item.future.done():
                item.future.set_result(item.output)

    def _fail(self, item: _Submission, err: Exception) -> None:
        item.failed = True
        if item.admission is not None:
            item.admission.release(item.rows - item.filled)
        if not item.future.done():
            item.future.set_exception(err)
