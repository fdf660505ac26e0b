"""Context buckets: the (time slot, day type) a viewing happened in.

A device learns one pattern per bucket; the federation worker groups patterns by bucket and
codebook centroid. Buckets are numbered 0..7 as ``(time_slot - 1) * 2 + (day_type - 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from omega.v1 import patterns_pb2

__all__ = [
    "BUCKET_COUNT",
    "ContextBucket",
    "bucket_from_context",
    "bucket_from_timestamp",
    "pattern_context",
]

BUCKET_COUNT = 8

_SLOT_NAMES: dict[int, str] = {
    patterns_pb2.TIME_SLOT_MORNING: "morning",
    patterns_pb2.TIME_SLOT_AFTERNOON: "afternoon",
    patterns_pb2.TIME_SLOT_EVENING: "evening",
    patterns_pb2.TIME_SLOT_NIGHT: "night",
}
_DAY_NAMES: dict[int, str] = {
    patterns_pb2.DAY_TYPE_WEEKDAY: "weekday",
    patterns_pb2.DAY_TYPE_WEEKEND: "weekend",
}


@dataclass(frozen=True, slots=True, order=True)
class ContextBucket:
    """A (time slot, day type) pair; `time_slot` and `day_type` are omega.v1 enum values."""

    time_slot: int
    day_type: int

    def __post_init__(self) -> None:
        if self.time_slot not in _SLOT_NAMES or self.day_type not in _DAY_NAMES:
            raise ValueError(f"invalid context bucket ({self.time_slot}, {self.day_type})")

    @property
    def index(self) -> int:
        """Bucket number in [0, BUCKET_COUNT)."""
        return (self.time_slot - 1) * 2 + (self.day_type - 1)

    @property
    def name(self) -> str:
        """Readable key such as ``"evening/weekend"``."""
        return f"{_SLOT_NAMES[self.time_slot]}/{_DAY_NAMES[self.day_type]}"

    @classmethod
    def from_index(cls, index: int) -> ContextBucket:
        """Inverse of `index`. Raises ValueError outside [0, BUCKET_COUNT)."""
        if not 0 <= index < BUCKET_COUNT:
            raise ValueError(f"bucket index {index} outside [0, {BUCKET_COUNT})")
        return cls(time_slot=index // 2 + 1, day_type=index % 2 + 1)

    def to_proto(self) -> patterns_pb2.PatternContext:
        """The bucket as an `omega.v1.PatternContext`."""
        return pattern_context(self.time_slot, self.day_type)


def bucket_from_timestamp(timestamp_ms: int, utc_offset_minutes: int = 0) -> ContextBucket:
    """The bucket of a viewing that started at ``timestamp_ms`` (ms since epoch, UTC).

    Args:
        timestamp_ms: start time in milliseconds since the Unix epoch.
        utc_offset_minutes: the device's local offset from UTC, in minutes.
    """
    local = datetime.fromtimestamp(timestamp_ms / 1000.0, tz=UTC) + timedelta(
        minutes=utc_offset_minutes
    )
    hour = local.hour
    if 5 <= hour < 12:
        slot: int = patterns_pb2.TIME_SLOT_MORNING
    elif 12 <= hour < 17:
        slot = patterns_pb2.TIME_SLOT_AFTERNOON
    elif 17 <= hour < 22:
        slot = patterns_pb2.TIME_SLOT_EVENING
    else:
        slot = patterns_pb2.TIME_SLOT_NIGHT
    day = patterns_pb2.DAY_TYPE_WEEKEND if local.weekday() >= 5 else patterns_pb2.DAY_TYPE_WEEKDAY
    return ContextBucket(time_slot=slot, day_type=day)


def pattern_context(
    time_slot: int, day_type: int, content_type: str = "", genre_hints: Sequence[str] = ()
) -> patterns_pb2.PatternContext:
    """An `omega.v1.PatternContext` from plain enum numbers (as stored in databases)."""
    return patterns_pb2.PatternContext(
        time_slot=patterns_pb2.TimeSlot.ValueType(time_slot),
        day_type=patterns_pb2.DayType.ValueType(day_type),
        content_type=content_type,
        genre_hints=list(genre_hints),
    )


def bucket_from_context(context: patterns_pb2.PatternContext) -> ContextBucket:
    """The bucket of a wire `PatternContext`. Raises ValueError for unspecified fields."""
    return ContextBucket(time_slot=context.time_slot, day_type=context.day_type)
