"""Dynamic batching: batch sizes, the queue delay, splitting, the bounded queue, failures."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cdul_server.batcher import DynamicBatcher
from cdul_server.errors import QueueFullError


class RecordingEncoder:
    """Returns each row's sum (so rows can be checked) and records batch sizes."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[int] = []
        self.delay_s = delay_s
        self.lock = threading.Lock()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        with self.lock:
            self.batches.append(len(pixels))
        time.sleep(self.delay_s)
        return pixels.reshape(len(pixels), -1).sum(axis=1, keepdims=True) * np.ones((1, 2))


def _rows(start: int, count: int) -> np.ndarray:
    return np.arange(start, start + count, dtype=np.float32).reshape(count, 1)


def test_concurrent_submissions_share_batches() -> None:
    encoder = RecordingEncoder()
    batcher = DynamicBatcher(
        "test", encoder, max_batch_size=16, max_queue_delay_s=0.2, max_queue_views=100
    )
    try:
        futures = [batcher.submit(_rows(10 * i, 4)) for i in range(4)]
        results = [future.result(timeout=5) for future in futures]
    finally:
        batcher.close()
    assert encoder.batches == [16]
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result[:, 0], np.arange(10 * i, 10 * i + 4))


def test_large_submission_split_across_batches() -> None:
    encoder = RecordingEncoder()
    batcher = DynamicBatcher(
        "test", encoder, max_batch_size=4, max_queue_delay_s=0.0, max_queue_views=100
    )
    try:
        result = batcher.submit(_rows(0, 10)).result(timeout=5)
    finally:
        batcher.close()
    assert max(encoder.batches) <= 4
    assert sum(encoder.batches) == 10
    np.testing.assert_array_equal(result[:, 0], np.arange(10))


def test_partial_batch_waits_at_most_delay() -> None:
    encoder = RecordingEncoder()
    batcher = DynamicBatcher(
        "test", encoder, max_batch_size=64, max_queue_delay_s=0.15, max_queue_views=100
    )
    try:
        started = time.monotonic()
        batcher.submit(_rows(0, 1)).result(timeout=5)
        waited = time.monotonic() - started
    finally:
        batcher.close()
    assert 0.1 <= waited < 2.0
    assert encoder.batches == [1]


def test_admission_bounded_queue() -> None:
    batcher = DynamicBatcher(
        "test", RecordingEncoder(), max_batch_size=4, max_queue_delay_s=0.0, max_queue_views=10
    )
    try:
        first = batcher.admit(8)
        assert batcher.queue_depth == 8
        with pytest.raises(QueueFullError) as caught:
            batcher.admit(3)
        assert "--max-queue-views" in caught.value.message
        first.release(8)
        assert batcher.queue_depth == 0
        with pytest.raises(QueueFullError) as caught:
            batcher.admit(11)
        assert "at most 10" in caught.value.message
        with batcher.admit(10) as admission:
            assert batcher.queue_depth == 10
            batcher.submit(_rows(0, 4), admission).result(timeout=5)
            assert batcher.queue_depth == 6
        assert batcher.queue_depth == 0
    finally:
        batcher.close()


def test_encoder_failure_fails_only_its_batch() -> None:
    calls = []

    def flaky(pixels: np.ndarray) -> np.ndarray:
        calls.append(len(pixels))
        if len(calls) == 1:
            raise RuntimeError("encoder broke")
        return np.zeros((len(pixels), 2))

    batcher = DynamicBatcher(
        "test", flaky, max_batch_size=8, max_queue_delay_s=0.0, max_queue_views=100
    )
    try:
        with pytest.raises(RuntimeError, match="encoder broke"):
            batcher.submit(_rows(0, 2)).result(timeout=5)
        assert batcher.submit(_rows(0, 2)).result(timeout=5).shape == (2, 2)
    finally:
        batcher.close()


def test_close_encodes_queued_work_then_rejects() -> None:
    encoder = RecordingEncoder(delay_s=0.05)
    batcher = DynamicBatcher(
        "test", encoder, max_batch_size=2, max_queue_delay_s=1.0, max_queue_views=100
    )
    futures = [batcher.submit(_rows(i, 1)) for i in range(5)]
    batcher.close(timeout_s=5)
    assert all(future.result(timeout=0).shape == (1, 2) for future in futures)
    with pytest.raises(QueueFullError):
        batcher.submit(_rows(0, 1))
