"""Fault: a sync the shard applied whose every reply was lost (retries exhausted).

The shard commits the delta; the device never learns it (each attempt's reply is lost: a
replica killed right after its commit and not back within the retry budget, a network cut).
If the device syncs again before observing anything new, the same local version is a
duplicate and is acknowledged: nothing is applied twice. If it observed more viewings first,
the brain first sends the unconfirmed request again unchanged (kept in its store: a
duplicate for the shard), books it, and only then numbers the newer changes, so the views
and "additional samples" of the lost send are not applied twice.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import grpc
import pytest

from omega.v1 import sync_pb2
from omega_brain import Brain, BrainConfig, CatalogIndex, GrpcTransport, ViewingEvent, fetch_catalog
from omega_brain.errors import SyncError
from omega_constellation.server import RunningServer

from .fault_support import EPOCH_MS

pytestmark = pytest.mark.integration


class LosesReplies:
    """A transport whose SyncPatterns reaches the shard but, while ``lose``, loses the reply."""

    def __init__(self, inner: GrpcTransport) -> None:
        self.inner = inner
        self.lose = False

    def sync_patterns(
        self, request: sync_pb2.SyncPatternsRequest, timeout: float
    ) -> sync_pb2.SyncPatternsResponse:
        response = self.inner.sync_patterns(request, timeout)  # applied on the shard
        if self.lose:
            raise SyncError("reply lost", code=grpc.StatusCode.UNAVAILABLE, retryable=True)
        return response

    def fetch_embeddings(
        self, request: sync_pb2.FetchEmbeddingsRequest, timeout: float
    ) -> sync_pb2.FetchEmbeddingsResponse:
        return self.inner.fetch_embeddings(request, timeout)

    def fetch_model(
        self, request: sync_pb2.FetchModelRequest, timeout: float
    ) -> sync_pb2.FetchModelResponse:
        return self.inner.fetch_model(request, timeout)

    def forget_device(
        self, request: sync_pb2.ForgetDeviceRequest, timeout: float
    ) -> sync_pb2.ForgetDeviceResponse:
        return self.inner.forget_device(request, timeout)


async def server_counts(dsn: str, device: str) -> tuple[int, int, int]:
    """(views of every content, sample_count of the device's one pattern, last version)."""
    conn = await asyncpg.connect(dsn)
    try:
        views = await conn.fetchval("SELECT coalesce(sum(views), 0)::bigint FROM content_views")
        samples = await conn.fetchval(
            "SELECT sample_count FROM device_patterns WHERE device_id = $1", device
        )
        last = await conn.fetchval(
            "SELECT last_local_version FROM devices WHERE device_id = $1", device
        )
    finally:
        await conn.close()
    return int(views), int(samples), int(last)


def make_brain(shard: RunningServer, tmp_path: Path, device: str) -> tuple[Brain, LosesReplies]:
    inner = GrpcTransport(f"127.0.0.1:{shard.port}", plaintext=True)
    fetched = fetch_catalog(inner)
    transport = LosesReplies(inner)
    brain = Brain(
        device,
        BrainConfig(
            store_path=tmp_path / f"{device}.sqlite",
            max_attempts=2,
            base_backoff_seconds=0.01,
            retry_budget_seconds=1.0,
            honour_sync_pace=False,  # replays sync back to back
        ),
        transport=transport,
        catalog=CatalogIndex(fetched.content_ids, fetched.embeddings),
    )
    return brain, transport


def watch(brain: Brain, n: int, start: int, completion: float = 1.0) -> None:
    for i in range(start, start + n):  # one evening, one bucket: one pattern
        brain.observe(ViewingEvent(f"c{i:04d}", EPOCH_MS + i * 60_000, completion=completion))


async def test_lost_reply_then_a_plain_retry_is_applied_once(
    shard: RunningServer, database_url: str, tmp_path: Path
) -> None:
    brain, transport = await asyncio.to_thread(make_brain, shard, tmp_path, "tv-lost-1")
    try:
        watch(brain, 3, 0)
        assert (await asyncio.to_thread(brain.sync)).ok
        watch(brain, 2, 3, completion=0.5)  # neutral: an "updated" delta (+2 samples)
        transport.lose = True
        assert not (await asyncio.to_thread(brain.sync)).ok  # applied, never acknowledged
        transport.lose = False
        assert (await asyncio.to_thread(brain.sync)).ok  # same version: a duplicate, acked
        assert await server_counts(database_url, "tv-lost-1") == (5, 5, 5)
    finally:
        brain.close()
        transport.inner.close()


async def test_lost_reply_then_new_viewings_is_applied_once(
    shard: RunningServer, database_url: str, tmp_path: Path
) -> None:
    brain, transport = await asyncio.to_thread(make_brain, shard, tmp_path, "tv-lost-2")
    try:
        watch(brain, 3, 0)
        assert (await asyncio.to_thread(brain.sync)).ok
        watch(brain, 2, 3, completion=0.5)
        transport.lose = True
        assert not (await asyncio.to_thread(brain.sync)).ok
        transport.lose = False
        watch(brain, 1, 5, completion=0.5)  # the viewer watches on before the next sync
        assert (await asyncio.to_thread(brain.sync)).ok
        views, samples, last = await server_counts(database_url, "tv-lost-2")
        assert last == brain.stats().acked_version == 6
        assert (views, samples) == (6, 6)  # today: (8, 8)
    finally:
        brain.close()
        transport.inner.close()
