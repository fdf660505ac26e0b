"""The TV brain syncing over real gRPC with a shard backed by a real Postgres."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest

from omega_brain import (
    Brain,
    BrainConfig,
    CatalogIndex,
    GrpcTransport,
    SyncResult,
    ViewingEvent,
    fetch_catalog,
)
from omega_constellation.server import RunningServer
from omega_protocol import shard_for

pytestmark = pytest.mark.integration

EVENING = 1_795_300_000_000  # a Tuesday, 19:06 UTC


async def test_brain_sync_lands_in_postgres_and_retries_are_idempotent(
    shard: RunningServer, database_url: str, tmp_path: Path
) -> None:
    transport = GrpcTransport(f"127.0.0.1:{shard.port}", plaintext=True)
    try:
        fetched = await asyncio.to_thread(fetch_catalog, transport)
        assert len(fetched.content_ids) == 50
        catalog = CatalogIndex(fetched.content_ids, fetched.embeddings)
        now = [EVENING / 1000 + 3600.0]
        brain = Brain(
            "tv-living-room",
            BrainConfig(store_path=tmp_path / "brain.sqlite"),
            transport=transport,
            catalog=catalog,
            clock=lambda: now[0],
        )
        for i, content in enumerate(["c0001", "c0002", "c0003"]):
            brain.observe(ViewingEvent(content, EVENING + i * 60_000, completion=1.0))
        result = await asyncio.to_thread(brain.sync)
        assert result.ok, result.error
        assert result.acknowledged_version == 3 and result.server_pattern_count == 1
        assert 0 < result.bytes_up <= 1024  # one viewing session: <= 1 KB up
        # The shard asked for a pause (its pace: 300 s +-20%); an earlier call sends nothing.
        pause_ms = result.next_sync_at_ms - round(now[0] * 1000)
        assert 240_000 <= pause_ms <= 360_000
        early = await asyncio.to_thread(brain.sync)
        assert early.paced and not early.ok and early.attempts == 0 and early.bytes_up == 0
        assert brain.stats().syncs_failed == 0  # a paced call is not a failure
        now[0] += pause_ms / 1000
        again = await asyncio.to_thread(brain.sync)  # due, nothing new: a pull-only sync
        assert again.ok and again.patterns_sent == 0 and not again.paced
        recs = brain.recommend(5, timestamp_ms=EVENING)
        assert len(recs) == 5 and not {"c0001", "c0002", "c0003"} & {r.content_id for r in recs}
        brain.close()
    finally:
        transport.close()

    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT sample_count, success_rate, version, embedding, embedding_scale"
            " FROM device_patterns"
            " WHERE device_id = 'tv-living-room'"
        )
        views = await conn.fetchval("SELECT sum(views) FROM content_views")
    finally:
        await conn.close()
    assert [(r["sample_count"], r["version"]) for r in rows] == [(3, 3)]
    assert rows[0]["success_rate"] == pytest.approx((3 + 1) / (3 + 2))  # Laplace-smoothed
    assert views == 3
    # The stored embedding is the brain's pattern: the direction of the watched items' mean.
    stored = np.frombuffer(rows[0]["embedding"], dtype=np.int8) * rows[0]["embedding_scale"]
    mean = np.mean([catalog.embedding_of(c) for c in ("c0001", "c0002", "c0003")], axis=0)
    cosine = float(stored @ mean) / float(np.linalg.norm(stored) * np.linalg.norm(mean))
    assert cosine > 0.9


async def test_brain_sync_reports_failure_when_the_shard_is_down(tmp_path: Path) -> None:
    from tests.integration.conftest import write_catalog

    ids, emb = write_catalog(tmp_path / "c.npz", n=10)
    transport = GrpcTransport("127.0.0.1:1", plaintext=True)  # nothing listens on port 1
    try:
        brain = Brain(
            "tv-offline",
            BrainConfig(
                store_path=tmp_path / "b.sqlite",
                max_attempts=2,
                base_backoff_seconds=0.01,
                timeout_seconds=0.5,
            ),
            transport=transport,
            catalog=CatalogIndex(ids, emb),
        )
        brain.observe(ViewingEvent(ids[0], EVENING, completion=1.0))
        result = await asyncio.to_thread(brain.sync)
        assert not result.ok and result.attempts == 2 and "UNAVAILABLE" in (result.error or "")
        assert result.acknowledged_version == 0  # nothing advanced: the delta is kept
        brain.close()
    finally:
        transport.close()


async def _device_rows(url: str, device: str) -> tuple[dict[str, tuple[int, bytes]], int, int]:
    """``({pattern_id: (sample_count, embedding)}, summed content views, model updates)``
    that a shard's database holds for ``device``."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT pattern_id, sample_count, embedding FROM device_patterns WHERE device_id = $1",
            device,
        )
        views = await conn.fetchval("SELECT coalesce(sum(views), 0) FROM content_views")
        updates = await conn.fetchval(
            "SELECT count(*) FROM model_updates WHERE device_id = $1", device
        )
    finally:
        await conn.close()
    patterns = {r["pattern_id"]: (int(r["sample_count"]), bytes(r["embedding"])) for r in rows}
    return patterns, int(views), int(updates)


async def test_a_device_moved_to_an_added_shard_sends_it_every_pattern(
    start_shard: Any, make_database: Any, database_url: str, tmp_path: Path
) -> None:
    # shard-0 serves alone; then shard-1 is added (its own database) and shard-0's replicas
    # switch to the two-shard map. A device the new map gives to shard-1 is redirected by
    # shard-0; re-pointed at shard-1 (a new brain on the same store, as firmware does), it
    # sends shard-1 every pattern shard-0 held, not only the changes since shard-0's ack.
    from tests.integration.conftest import write_catalog

    catalog_path = tmp_path / "catalog.npz"
    ids, emb = write_catalog(catalog_path)
    catalog = CatalogIndex(ids, emb)
    both = ["shard-0", "shard-1"]
    device = next(f"tv-{i}" for i in range(1000) if shard_for(f"tv-{i}", both) == "shard-1")
    solo = await start_shard(
        database_url=database_url,
        shard_id="shard-0",
        shard_ids=["shard-0"],
        catalog_path=catalog_path,
    )
    cfg = BrainConfig(store_path=tmp_path / "brain.sqlite", honour_sync_pace=False)

    async def synced(port: int) -> SyncResult:
        transport = GrpcTransport(f"127.0.0.1:{port}", plaintext=True)
        try:
            with Brain(device, cfg, transport=transport, catalog=catalog) as brain:
                return await asyncio.to_thread(brain.sync)
        finally:
            transport.close()

    morning = EVENING + 13 * 3600_000  # Wednesday 08:06 UTC
    with Brain(device, cfg, catalog=catalog) as brain:
        for i, content in enumerate(["c0001", "c0002", "c0003"]):
            brain.observe(ViewingEvent(content, EVENING + i * 60_000, completion=1.0))
        for i, content in enumerate(["c0010", "c0011", "c0012"]):
            brain.observe(ViewingEvent(content, morning + i * 60_000, completion=1.0))
    first = await synced(solo.port)
    assert first.ok and first.patterns_sent == 2 and first.server_pattern_count == 2, first
    held_by_shard_0, views_0, _ = await _device_rows(database_url, device)
    assert len(held_by_shard_0) == 2 and views_0 == 6
    with Brain(device, cfg, catalog=catalog) as brain:  # a viewing shard-0 never sees
        brain.observe(ViewingEvent("c0020", morning + 3 * 60_000, completion=0.5))

    shard_1_url = await make_database()
    switched = await start_shard(
        database_url=database_url, shard_id="shard-0", shard_ids=both, catalog_path=catalog_path
    )
    added = await start_shard(
        database_url=shard_1_url, shard_id="shard-1", shard_ids=both, catalog_path=catalog_path
    )
    redirected = await synced(switched.port)
    assert not redirected.ok and redirected.redirect_shard_id == "shard-1"

    accepted = await synced(added.port)  # after the restart: pull, then everything
    assert accepted.ok, accepted.error
    assert accepted.patterns_sent == 2 and accepted.server_pattern_count == 2
    held_by_shard_1, views_1, updates_1 = await _device_rows(shard_1_url, device)
    assert held_by_shard_1.keys() == held_by_shard_0.keys()
    # The evening pattern did not change since shard-0 acknowledged it: the very same row.
    unchanged = [p for p in held_by_shard_0 if held_by_shard_0[p] == held_by_shard_1[p]]
    assert len(unchanged) == 1
    changed = next(p for p in held_by_shard_1 if p not in unchanged)
    assert held_by_shard_1[changed][0] == held_by_shard_0[changed][0] + 1  # the neutral one
    assert views_1 == 1  # only the view shard-0 never counted
    assert updates_1 == 1  # the model update too, as after a factory reset
    assert (await _device_rows(database_url, device))[1] == 6  # shard-0 untouched
    again = await synced(added.port)
    assert again.ok and again.patterns_sent == 0
    with Brain(device, cfg, catalog=catalog) as brain:
        stats = brain.stats()
        assert (stats.syncs_ok, stats.syncs_redirected) == (3, 1)
