"""Context buckets and rendezvous sharding."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import pytest

from omega.v1 import patterns_pb2
from omega_protocol import BUCKET_COUNT, ContextBucket, bucket_from_timestamp, shard_for


def ms(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp() * 1000)


def test_buckets_from_time() -> None:
    saturday_evening = bucket_from_timestamp(ms(2026, 11, 21, 20, 0))
    assert saturday_evening.name == "evening/weekend"
    assert bucket_from_timestamp(ms(2026, 11, 23, 8, 30)).name == "morning/weekday"
    assert bucket_from_timestamp(ms(2026, 11, 23, 23, 30)).name == "night/weekday"
    # The device's offset moves a UTC evening into a local night.
    assert bucket_from_timestamp(ms(2026, 11, 23, 20, 0), 180).name == "night/weekday"


def test_bucket_index_round_trip() -> None:
    names = {ContextBucket.from_index(i).name for i in range(BUCKET_COUNT)}
    assert len(names) == BUCKET_COUNT
    for i in range(BUCKET_COUNT):
        assert ContextBucket.from_index(i).index == i
    with pytest.raises(ValueError):
        ContextBucket.from_index(BUCKET_COUNT)
    with pytest.raises(ValueError):
        ContextBucket(patterns_pb2.TIME_SLOT_UNSPECIFIED, patterns_pb2.DAY_TYPE_WEEKDAY)


def test_rendezvous_is_stable_and_balanced() -> None:
    shards = ["a", "b", "c"]
    owners = [shard_for(f"tv-{i}", shards) for i in range(3000)]
    assert min(Counter(owners).values()) > 900
    # Removing shard "c" moves only the devices that were on "c".
    moved = [o != shard_for(f"tv-{i}", ["a", "b"]) for i, o in enumerate(owners) if o != "c"]
    assert not any(moved)
    assert shard_for("x", ["b", "a"]) == shard_for("x", ["a", "b"])
    with pytest.raises(ValueError):
        shard_for("x", [])
