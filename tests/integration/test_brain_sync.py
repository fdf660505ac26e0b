"""The TV brain syncing over real gRPC with a shard backed by a real Postgres."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import numpy as np
import pytest

from omega_brain import Brain, BrainConfig, CatalogIndex, GrpcTransport, ViewingEvent, fetch_catalog
from omega_constellation.server import RunningServer

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
