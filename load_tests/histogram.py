"""A small HDR-style (log-linear) latency histogram: fixed relative precision, mergeable, cheap to fill.

The layout is HdrHistogram's: values are non-negative integers (``perf`` records nanoseconds), kept
in buckets whose width doubles from one power of two to the next, each split into ``2**k`` linear
sub-buckets, where ``2**k >= 2 * 10**significant_digits``. Any recorded value is therefore known to
within one part in ``10**significant_digits`` (3 digits: 0.1 %) over the whole range, from one unit
to ``highest`` (one hour in ns by default), in a few tens of thousands of counters.

* :meth:`Histogram.record` adds one value; :meth:`Histogram.record_many` adds a numpy array at once
  (what the load generator does at the end of each measurement window).
* :meth:`Histogram.percentile` answers like HdrHistogram's ``getValueAtPercentile``: the highest
  value equivalent (same bucket) to the value at that rank, so it never under-reports; ``min``,
  ``max``, ``mean`` and ``count`` are exact (kept beside the buckets).
* :meth:`Histogram.merge` adds another histogram with the same layout (windows into a run, runs into
  a sweep); :meth:`to_dict` / :meth:`from_dict` carry it through JSON (only non-empty buckets).

Values above ``highest`` are clamped to it and counted in ``saturated``; negative values are an error.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["Histogram"]

ONE_HOUR_NS = 3_600 * 10**9


class Histogram:
    """Log-linear histogram of non-negative integers with ``significant_digits`` of precision."""

    def __init__(self, highest: int = ONE_HOUR_NS, significant_digits: int = 3) -> None:
        if not 1 <= significant_digits <= 5:
            raise ValueError(f"significant_digits must be 1..5, got {significant_digits}")
        if highest < 2:
            raise ValueError(f"highest must be >= 2, got {highest}")
        self.highest = int(highest)
        self.significant_digits = significant_digits
        # Sub-buckets per bucket: the smallest power of two >= 2 * 10**digits (2048 for 3 digits).
        self._sub_magnitude = math.ceil(math.log2(2 * 10**significant_digits))
        self._sub_count = 1 << self._sub_magnitude
        self._half_magnitude = self._sub_magnitude - 1
        self._half_count = self._sub_count >> 1
        self._sub_mask = self._sub_count - 1
        # Buckets needed so that highest fits: bucket b covers [0, sub_count << b).
        buckets = 1
        while (self._sub_count << (buckets - 1)) <= self.highest:
            buckets += 1
        self._bucket_count = buckets
        self._counts = np.zeros((buckets + 1) * self._half_count, dtype=np.int64)
        self.count = 0
        self.total = 0  # exact sum of recorded values (for the mean)
        self.min: int | None = None
        self.max: int | None = None
        self.saturated = 0  # values clamped to ``highest``

    # -- layout -------------------------------------------------------------------------------

    def _index(self, value: int) -> int:
        bucket = (value | self._sub_mask).bit_length() - self._half_magnitude - 1
        sub = value >> bucket
        return ((bucket + 1) << self._half_magnitude) + (sub - self._half_count)

    def _indices(self, values: np.ndarray) -> np.ndarray:
        v = values.astype(np.int64, copy=False)
        # bit_length(v | mask) without Python ints: frexp's exponent, exact for values below 2**53.
        _, exponent = np.frexp((v | self._sub_mask).astype(np.float64))
        bucket = exponent.astype(np.int64) - self._half_magnitude - 1
        sub = v >> bucket
        return ((bucket + 1) << self._half_magnitude) + (sub - self._half_count)

    def _lowest_at(self, index: int) -> int:
        bucket = (index >> self._half_magnitude) - 1
        sub = (index & (self._half_count - 1)) + self._half_count
        if bucket < 0:
            sub -= self._half_count
            bucket = 0
        return sub << bucket

    def _width_at(self, index: int) -> int:
        bucket = max((index >> self._half_magnitude) - 1, 0)
        return 1 << bucket

    def lowest_equivalent(self, value: int) -> int:
        """The smallest value that falls in the same counter as ``value``."""
        return self._lowest_at(self._index(int(value)))

    def highest_equivalent(self, value: int) -> int:
        """The largest value that falls in the same counter as ``value``."""
        index = self._index(int(value))
        return self._lowest_at(index) + self._width_at(index) - 1

    # -- recording ----------------------------------------------------------------------------

    def record(self, value: int, count: int = 1) -> None:
        """Add ``count`` occurrences of ``value`` (an integer >= 0)."""
        value = int(value)
        if value < 0:
            raise ValueError(f"cannot record a negative value ({value})")
        if value > self.highest:
            value = self.highest
            self.saturated += count
        self._counts[self._index(value)] += count
        self.count += count
        self.total += value * count
        self.min = value if self.min is None else min(self.min, value)
        self.max = value if self.max is None else max(self.max, value)

    def record_many(self, values: Iterable[int] | np.ndarray) -> None:
        """Add every value of an array (or iterable) of non-negative integers."""
        v = np.asarray(values if isinstance(values, np.ndarray) else list(values))
        if v.size == 0:
            return
        v = np.rint(v).astype(np.int64) if v.dtype.kind == "f" else v.astype(np.int64)
        v = v.reshape(-1)
        if int(v.min()) < 0:
            raise ValueError(f"cannot record a negative value ({int(v.min())})")
        over = v > self.highest
        if over.any():
            self.saturated += int(over.sum())
            v = np.minimum(v, self.highest)
        self._counts += np.bincount(self._indices(v), minlength=self._counts.size)
        self.count += int(v.size)
        self.total += int(v.sum())
        lo, hi = int(v.min()), int(v.max())
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)

    def _check_layout(self, other: Histogram) -> None:
        if (other.highest, other.significant_digits) != (self.highest, self.significant_digits):
            raise ValueError(
                f"cannot merge a histogram (highest={other.highest}, digits={other.significant_digits}) "
                f"into one with highest={self.highest}, digits={self.significant_digits}"
            )

    def merge(self, other: Histogram) -> Histogram:
        """Add every value of ``other`` (same ``highest`` and ``significant_digits``); returns self."""
        self._check_layout(other)
        self._counts += other._counts
        self.count += other.count
        self.total += other.total
        self.saturated += other.saturated
        if other.min is not None:
            self.min = other.min if self.min is None else min(self.min, other.min)
        if other.max is not None:
            self.max = other.max if self.max is None else max(self.max, other.max)
        return self

    @classmethod
    def merged(
        cls, histograms: Iterable[Histogram], highest: int = ONE_HOUR_NS, significant_digits: int = 3
    ) -> Histogram:
        out = cls(highest, significant_digits)
        for h in histograms:
            out.merge(h)
        return out

    def copy(self) -> Histogram:
        return Histogram(self.highest, self.significant_digits).merge(self)

    def reset(self) -> None:
        self._counts[:] = 0
        self.count = self.total = self.saturated = 0
        self.min = self.max = None

    # -- queries ------------------------------------------------------------------------------

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def percentile(self, p: float) -> int | None:
        """The value at percentile ``p`` (0..100): the highest value equivalent to the value at
        rank ``ceil(p/100 * count)`` (at least 1); ``max`` for 100, None when empty."""
        if not 0 <= p <= 100:
            raise ValueError(f"percentile must be in [0, 100], got {p}")
        if self.count == 0:
            return None
        rank = max(1, math.ceil(p / 100.0 * self.count - 1e-9))
        cumulative = np.cumsum(self._counts)
        index = int(np.searchsorted(cumulative, rank, side="left"))
        value = self._lowest_at(index) + self._width_at(index) - 1
        assert self.max is not None and self.min is not None
        return max(min(value, self.max), self.min)

    def percentiles(self, ps: Iterable[float]) -> dict[float, int | None]:
        return {p: self.percentile(p) for p in ps}

    def distribution(self, points: Iterable[float] = (50, 75, 90, 95, 99, 99.9, 99.99, 100)) -> list[list[float]]:
        """``[[percentile, value], ...]``: a compact summary of the shape of the distribution."""
        return [[p, float(v)] for p, v in self.percentiles(points).items() if v is not None]

    # -- serialization ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: layout, exact summaries, and the non-empty counters as one compact string
        ``"index:count,index:count,..."`` (:meth:`from_dict` also takes a list of ``[index, count]``)."""
        nz = np.flatnonzero(self._counts)
        return {
            "highest": self.highest,
            "significant_digits": self.significant_digits,
            "count": self.count,
            "total": self.total,
            "min": self.min,
            "max": self.max,
            "saturated": self.saturated,
            "counts": ",".join(f"{int(i)}:{int(self._counts[i])}" for i in nz),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Histogram:
        h = cls(int(data["highest"]), int(data["significant_digits"]))
        counts = data["counts"]
        pairs = [item.split(":") for item in counts.split(",") if item] if isinstance(counts, str) else counts
        for index, count in pairs:
            h._counts[int(index)] += int(count)
        h.count = int(data["count"])
        h.total = int(data["total"])
        h.min = None if data["min"] is None else int(data["min"])
        h.max = None if data["max"] is None else int(data["max"])
        h.saturated = int(data.get("saturated", 0))
        if int(h._counts.sum()) != h.count:
            raise ValueError(f"histogram counters add up to {int(h._counts.sum())}, count says {h.count}")
        return h

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"Histogram(count={self.count}, min={self.min}, max={self.max}, digits={self.significant_digits})"
