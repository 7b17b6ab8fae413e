"""Repeated timing with its spread and the machine load around it."""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

_logger = logging.getLogger(__name__)


def load_average() -> float:
    """Return the one-minute load average of the machine."""
    return os.getloadavg()[0]


@dataclass
class Measurement:
    """One figure of the results page: a rate measured over repeated runs.

    Attributes:
        figure: Letter of the figure on the results page ("a" to "f", or "q" for quality).
        label: Short description of the row.
        unit: Unit of ``values``, such as "images/s".
        values: One value per repeat.
        params: Settings that produced the figure (model, precision, batch size, threads ...).
        load_start: One-minute load average before the first repeat.
        load_end: One-minute load average after the last repeat.
        extra: Further results of the same runs, such as latency percentiles.
    """

    figure: str
    label: str
    unit: str
    values: list[float]
    params: dict[str, Any] = field(default_factory=dict)
    load_start: float = 0.0
    load_end: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        """Median over the repeats."""
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        """Smallest value over the repeats."""
        return min(self.values)

    @property
    def high(self) -> float:
        """Largest value over the repeats."""
        return max(self.values)

    def to_dict(self) -> dict[str, Any]:
        """Return the measurement as plain data, with its median and spread."""
        data = asdict(self)
        data.update(median=self.median, low=self.low, high=self.high)
        return data


def measure_rate(
    figure: str,
    label: str,
    run_once: Callable[[], tuple[float, float]],
    *,
    repeats: int,
    warmup: int = 1,
    unit: str = "images/s",
    params: dict[str, Any] | None = None,
) -> Measurement:
    """Run ``run_once`` repeatedly and record items per second of each repeat.

    Args:
        figure: Letter of the figure on the results page.
        label: Short description of the row.
        run_once: Does the measured work once and returns (items processed, seconds taken).
        repeats: Number of timed repeats; at least 1.
        warmup: Number of untimed runs before the timed ones.
        unit: Unit of the rate.
        params: Settings recorded with the figure.

    Returns:
        The measurement with one rate per repeat.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        run_once()
    load_start = load_average()
    values = []
    for _ in range(repeats):
        items, seconds = run_once()
        values.append(items / seconds)
    load_end = load_average()
    result = Measurement(
        figure=figure,
        label=label,
        unit=unit,
        values=values,
        params=dict(params or {}),
        load_start=load_start,
        load_end=load_end,
    )
    _logger.info(
        "%s %s: %.3g %s [%.3g-%.3g], load %.2f -> %.2f",
        figure,
        label,
        result.median,
        unit,
        result.low,
        result.high,
        load_start,
        load_end,
    )
    return result


def timed(fn: Callable[[], Any]) -> float:
    """Return the seconds that one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    """Return the q-th percentile (0-100) of ``values`` by linear interpolation."""
    if not values:
        raise ValueError("percentile of an empty list: measure at least one request")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    weight = position - lower
    return ordered[lower] * (1.0 - weight) + ordered[upper] * weight
