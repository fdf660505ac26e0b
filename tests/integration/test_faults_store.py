"""The shard's store paths, each verified with SQL on the shard's database.

What `ShardStore.apply_delta` does to ``device_patterns`` for a delta's ``updated``
(PatternUpdate: success rate, additional samples, optional new embedding) and ``removed``
entries, and for a pattern whose success rate falls below the quality threshold
(``min_success_rate`` 0.7: its row is deleted, whichever way the low rate arrives). The
``added`` path and the threshold on a first upload are covered by test_constellation.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
import grpc
import numpy as np
import pytest

from omega.v1 import federation_pb2, federation_pb2_grpc, patterns_pb2, sync_pb2, sync_pb2_grpc
from omega_constellation.server import RunningServer
from omega_protocol import encode_embedding, encode_payload

from .test_constellation import pattern, unit

pytestmark = pytest.mark.integration


def update(
    pid: str,
    rate: float,
    samples: int,
    updated_at_ms: int = 5_000,
    embedding_seed: int | None = None,
) -> patterns_pb2.PatternUpdate:
    u = patterns_pb2.PatternUpdate(
        pattern_id=pid,
        success_rate=rate,
        additional_samples=samples,
        updated_at_ms=updated_at_ms,
    )
    if embedding_seed is not None:
        u.embedding.CopyFrom(encode_embedding(unit(embedding_seed)))
    return u


def delta(
    device: str,
    version: int,
    *,
    added: Sequence[patterns_pb2.ViewingPattern] = (),
    updated: Sequence[patterns_pb2.PatternUpdate] = (),
    removed: Sequence[str] = (),
) -> sync_pb2.SyncPatternsRequest:
    message = patterns_pb2.PatternDelta(
        added=list(added),
        updated=list(updated),
        removed=list(removed),
        local_version=version,
        base_version=version - 1,
    )
    return sync_pb2.SyncPatternsRequest(
        device_id=device, local_version=version, delta=encode_payload(message)
    )


async def rows(dsn: str, device: str) -> dict[str, dict[str, Any]]:
    """The device's ``device_patterns`` rows by pattern id, and its ``pattern_count``."""
    conn = await asyncpg.connect(dsn)
    try:
        found = await conn.fetch(
            "SELECT pattern_id, success_rate, sample_count, embedding, embedding_scale, version,"
            " updated_at_ms, stored_at_ms FROM device_patterns WHERE device_id = $1",
            device,
        )
        count = await conn.fetchval(
            "SELECT pattern_count FROM devices WHERE device_id = $1", device
        )
    finally:
        await conn.close()
    out = {r["pattern_id"]: dict(r) for r in found}
    assert count == len(out), f"devices.pattern_count {count} != {len(out)} rows"
    return out


async def test_updated_path_sets_the_rate_and_adds_the_samples(
    stub: sync_pb2_grpc.ConstellationSyncStub, database_url: str
) -> None:
    await stub.SyncPatterns(delta("tv-u", 1, added=[pattern("p1", rate=0.9, seed=1)]))
    before = (await rows(database_url, "tv-u"))["p1"]
    assert (before["sample_count"], before["version"]) == (5, 1)

    answer = await stub.SyncPatterns(delta("tv-u", 2, updated=[update("p1", 0.8, 3)]))
    assert answer.acknowledged_version == 2 and answer.patterns_stored == 1
    row = (await rows(database_url, "tv-u"))["p1"]
    assert row["sample_count"] == 5 + 3
    assert row["success_rate"] == pytest.approx(0.8)
    assert (row["version"], row["updated_at_ms"]) == (2, 5_000)
    assert row["stored_at_ms"] >= before["stored_at_ms"]  # the export sees it again
    # No embedding in the update: the stored one is kept, byte for byte.
    assert bytes(row["embedding"]) == bytes(before["embedding"])
    assert row["embedding_scale"] == before["embedding_scale"]

    # An update with a new embedding replaces it; a retry of that delta is applied once.
    moved = delta("tv-u", 3, updated=[update("p1", 0.75, 2, 6_000, embedding_seed=2)])
    await stub.SyncPatterns(moved)
    again = await stub.SyncPatterns(moved)
    assert again.duplicate and again.acknowledged_version == 3
    row = (await rows(database_url, "tv-u"))["p1"]
    assert row["sample_count"] == 5 + 3 + 2
    assert row["success_rate"] == pytest.approx(0.75)
    stored = np.frombuffer(row["embedding"], dtype=np.int8) * row["embedding_scale"]
    assert float(stored @ unit(2)) / float(np.linalg.norm(stored)) > 0.99


async def test_removed_path_deletes_only_the_named_rows(
    stub: sync_pb2_grpc.ConstellationSyncStub, database_url: str
) -> None:
    await stub.SyncPatterns(
        delta("tv-r", 1, added=[pattern("keep", seed=1), pattern("drop", seed=2)])
    )
    await stub.SyncPatterns(delta("tv-other", 1, added=[pattern("drop", seed=3)]))
    assert set(await rows(database_url, "tv-r")) == {"keep", "drop"}

    answer = await stub.SyncPatterns(delta("tv-r", 2, removed=["drop", "never-sent"]))
    assert answer.acknowledged_version == 2 and answer.patterns_stored == 1
    assert set(await rows(database_url, "tv-r")) == {"keep"}
    assert set(await rows(database_url, "tv-other")) == {"drop"}  # another device's row
    # A removal retried (the same version) changes nothing more.
    again = await stub.SyncPatterns(delta("tv-r", 2, removed=["drop", "never-sent"]))
    assert again.duplicate and set(await rows(database_url, "tv-r")) == {"keep"}


async def test_pattern_falling_below_the_threshold_is_deleted(
    stub: sync_pb2_grpc.ConstellationSyncStub, database_url: str
) -> None:
    await stub.SyncPatterns(
        delta(
            "tv-q",
            1,
            added=[pattern("by-update", rate=0.9, seed=1), pattern("by-upload", rate=0.9, seed=2)],
        )
    )
    assert set(await rows(database_url, "tv-q")) == {"by-update", "by-upload"}

    # Statistics alone: the success rate drops to 0.65 < 0.7.
    answer = await stub.SyncPatterns(delta("tv-q", 2, updated=[update("by-update", 0.65, 2)]))
    assert answer.patterns_stored == 1
    assert set(await rows(database_url, "tv-q")) == {"by-upload"}
    # The full pattern again, now at 0.5 (an abandoned viewing moved its embedding).
    await stub.SyncPatterns(delta("tv-q", 3, added=[pattern("by-upload", rate=0.5, seed=4)]))
    assert await rows(database_url, "tv-q") == {}

    # An update of a pattern the shard no longer holds matches no row, even above the
    # threshold again: the device sends the full pattern when its embedding moves (a
    # success), and that upload stores it again with its whole sample count.
    await stub.SyncPatterns(delta("tv-q", 4, updated=[update("by-update", 0.75, 1)]))
    assert await rows(database_url, "tv-q") == {}
    back = pattern("by-update", rate=0.75, seed=5)
    back.sample_count = 8
    await stub.SyncPatterns(delta("tv-q", 5, added=[back]))
    row = (await rows(database_url, "tv-q"))["by-update"]
    assert (row["sample_count"], row["version"]) == (8, 5)


@pytest.mark.parametrize(("successes", "failures"), [(6, 2), (13, 5)], ids=["7 of 10", "14 of 20"])
async def test_rate_exactly_at_the_threshold_is_stored_and_exported(
    stub: sync_pb2_grpc.ConstellationSyncStub,
    shard: RunningServer,
    database_url: str,
    successes: int,
    failures: int,
) -> None:
    """A brain's Laplace-smoothed rate (s + 1) / (s + f + 2) is often exactly 0.7; on the wire
    it is a float32 just below 0.7 (0.69999999), which must not count as "below 0.7"."""
    rate = (successes + 1) / (successes + failures + 2)
    assert rate == 0.7
    await stub.SyncPatterns(delta("tv-t", 1, added=[pattern("at", rate=rate)]))
    await stub.SyncPatterns(delta("tv-t2", 1, added=[pattern("p", rate=0.9)]))
    await stub.SyncPatterns(delta("tv-t2", 2, updated=[update("p", rate, 1)]))
    assert set(await rows(database_url, "tv-t")) == {"at"}
    assert set(await rows(database_url, "tv-t2")) == {"p"}
    # The export's threshold compares the same way (a worker running at 0.7).
    async with grpc.aio.insecure_channel(f"127.0.0.1:{shard.federation_port}") as channel:
        call = federation_pb2_grpc.FederationStub(channel).ExportPatterns(
            federation_pb2.ExportPatternsRequest(min_success_rate=rate, batch_size=10)
        )
        exported = {p.pattern.pattern_id async for batch in call for p in batch.patterns}
    assert exported == {"at", "p"}
