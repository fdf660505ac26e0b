"""What a fleet run measures, in a form worker processes can ship and the parent can merge.

Latency is in microseconds from each sync's *scheduled* time to its answer (open loop: a
server that falls behind shows its queueing here instead of slowing the senders down). The
whole run's latencies go to one HDR histogram (3 significant digits); each time window of the
run (by scheduled time) has its own (2 digits) for the plots. Counters: scheduled, ok and
failed syncs (failures by gRPC status name, plus ``NOT_SENT`` when the run ended before the
sender reached a sync and ``UNFINISHED`` when no answer came before the end), redirects,
duplicates, bytes up and down. Syncs sent malformed on purpose and refused with
INVALID_ARGUMENT are ``refused`` (as expected: neither ok nor a failure of the service, so
ok + failed + refused == scheduled); ``device_faults`` counts the device-behaviour faults
(malformed sent / refused / accepted, factory resets and resumptions, churn). Histograms
travel as HdrHistogram's compressed base64 encoding.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]  # ships no stubs

__all__ = [
    "LATENCY_BUCKETS_SECONDS",
    "LATENCY_MAX_US",
    "Recorder",
    "latency_histogram",
    "percentiles_ms",
]

LATENCY_MAX_US = 3_600_000_000
"""Highest latency an HDR histogram tracks: one hour, in microseconds."""
_BYTES_MAX = 1 << 30

LATENCY_BUCKETS_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds of the live (Prometheus) latency histogram's buckets; one more: above."""

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def latency_histogram(digits: int = 3) -> Any:
    """An empty latency histogram (1 us .. 1 h) with ``digits`` significant digits."""
    return HdrHistogram(1, LATENCY_MAX_US, digits)


def percentiles_ms(hist: Any) -> dict[str, float]:
    """p50, p90, p99, p99.9, max and mean of a latency histogram, in ms (0 when empty)."""
    if hist.get_total_count() == 0:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "p99_9": 0.0, "max": 0.0, "mean": 0.0}
    out = {
        ("p99_9" if p == 99.9 else f"p{p:g}"): hist.get_value_at_percentile(p) / 1000.0
        for p in PERCENTILES
    }
    out["max"] = hist.get_max_value() / 1000.0
    out["mean"] = float(hist.get_mean_value()) / 1000.0
    return out


def _encode(hist: Any) -> str:
    return bytes(hist.encode()).decode("ascii")


def _decode(text: str) -> Any:
    return HdrHistogram.decode(text.encode("ascii"))


class Recorder:
    """One worker's (or the merged run's) measurements.

    Args:
        window_seconds: width of a time window of the series, in wall seconds.
        windows: number of windows (syncs past the last one count in the last one).
    """

    def __init__(self, window_seconds: float, windows: int) -> None:
        self.window_seconds = window_seconds
        self.windows = windows
        self.latency = latency_histogram(3)
        self.request_bytes = HdrHistogram(1, _BYTES_MAX, 2)
        self.send_lag = latency_histogram(2)
        self.window_latency = [latency_histogram(2) for _ in range(windows)]
        self.scheduled = [0] * windows
        self.ok = [0] * windows
        self.failed = [0] * windows
        self.completed = [0] * windows  # by completion time (throughput)
        self.bytes_up = [0] * windows
        self.bytes_down = [0] * windows
        self.errors: Counter[str] = Counter()
        self.window_errors: dict[str, list[int]] = {}
        self.redirects = 0
        self.duplicates = 0
        self.refused = [0] * windows  # malformed on purpose, refused as expected
        self.device_faults: Counter[str] = Counter()
        # live export only (not merged): answered syncs per latency bucket and their sum
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS_SECONDS) + 1)
        self.latency_sum = 0.0

    def window(self, t: float) -> int:
        """The window of wall second ``t`` of the run."""
        return min(max(int(t / self.window_seconds), 0), self.windows - 1)

    def schedule(self, times: list[float] | Any) -> None:
        """Count syncs scheduled at wall seconds ``times``."""
        for t in times:
            self.scheduled[self.window(float(t))] += 1

    def record_ok(
        self, scheduled_at: float, done_at: float, bytes_up: int, bytes_down: int, dup: bool
    ) -> None:
        """An answered sync (times in wall seconds of the run)."""
        w = self.window(scheduled_at)
        us = max(1, min(LATENCY_MAX_US, round((done_at - scheduled_at) * 1e6)))
        self.latency.record_value(us)
        self.window_latency[w].record_value(us)
        self.request_bytes.record_value(max(1, bytes_up))
        self.ok[w] += 1
        self.completed[self.window(done_at)] += 1
        self.bytes_up[w] += bytes_up
        self.bytes_down[w] += bytes_down
        self.duplicates += int(dup)
        seconds = us / 1e6
        self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS_SECONDS, seconds)] += 1
        self.latency_sum += seconds

    def record_failure(
        self, scheduled_at: float, status: str, bytes_up: int = 0, count: int = 1
    ) -> None:
        """``count`` syncs that got no usable answer, by status name."""
        w = self.window(scheduled_at)
        self.failed[w] += count
        self.bytes_up[w] += bytes_up
        self.errors[status] += count
        self.window_errors.setdefault(status, [0] * self.windows)[w] += count

    def record_refused(self, scheduled_at: float, bytes_up: int) -> None:
        """A malformed sync refused with INVALID_ARGUMENT, as expected."""
        w = self.window(scheduled_at)
        self.refused[w] += 1
        self.bytes_up[w] += bytes_up

    def record_lag(self, seconds: float) -> None:
        """How late the sender started a sync after its scheduled time."""
        self.send_lag.record_value(max(1, min(LATENCY_MAX_US, round(seconds * 1e6))))

    @property
    def total_scheduled(self) -> int:
        """Syncs scheduled."""
        return sum(self.scheduled)

    @property
    def total_ok(self) -> int:
        """Syncs answered."""
        return sum(self.ok)

    @property
    def total_failed(self) -> int:
        """Syncs that failed (any status)."""
        return sum(self.failed)

    @property
    def total_refused(self) -> int:
        """Malformed syncs refused as expected."""
        return sum(self.refused)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (histograms encoded) for `from_dict` and `merge`."""
        return {
            "window_seconds": self.window_seconds,
            "windows": self.windows,
            "latency": _encode(self.latency),
            "request_bytes": _encode(self.request_bytes),
            "send_lag": _encode(self.send_lag),
            "window_latency": [_encode(h) for h in self.window_latency],
            "scheduled": self.scheduled,
            "ok": self.ok,
            "failed": self.failed,
            "completed": self.completed,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "errors": dict(self.errors),
            "window_errors": self.window_errors,
            "redirects": self.redirects,
            "duplicates": self.duplicates,
            "refused": self.refused,
            "device_faults": dict(self.device_faults),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recorder:
        """Inverse of `to_dict`."""
        rec = cls(float(data["window_seconds"]), int(data["windows"]))
        rec.merge(data)
        return rec

    def merge(self, data: dict[str, Any]) -> None:
        """Add another recorder's `to_dict` (same windows) into this one.

        Raises:
            ValueError: the windows differ.
        """
        if int(data["windows"]) != self.windows or not math.isclose(
            float(data["window_seconds"]), self.window_seconds
        ):
            raise ValueError("recorders with different windows cannot be merged")
        self.latency.add(_decode(data["latency"]))
        self.request_bytes.add(_decode(data["request_bytes"]))
        self.send_lag.add(_decode(data["send_lag"]))
        for mine, theirs in zip(self.window_latency, data["window_latency"], strict=True):
            mine.add(_decode(theirs))
        for name in ("scheduled", "ok", "failed", "completed", "bytes_up", "bytes_down"):
            mine_list: list[int] = getattr(self, name)
            for i, v in enumerate(data[name]):
                mine_list[i] += int(v)
        self.errors.update({k: int(v) for k, v in data["errors"].items()})
        for status, counts in data["window_errors"].items():
            row = self.window_errors.setdefault(status, [0] * self.windows)
            for i, v in enumerate(counts):
                row[i] += int(v)
        self.redirects += int(data["redirects"])
        self.duplicates += int(data["duplicates"])
        for i, v in enumerate(data.get("refused", ())):
            self.refused[i] += int(v)
        self.device_faults.update({k: int(v) for k, v in data.get("device_faults", {}).items()})
