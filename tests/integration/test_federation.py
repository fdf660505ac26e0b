"""A federation round over real gRPC against two shards with real Postgres databases."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from omega.v1 import federation_pb2, federation_pb2_grpc, patterns_pb2, sync_pb2, sync_pb2_grpc
from omega_federation.settings import FederationSettings
from omega_federation.state import WorkerState
from omega_federation.worker import run_round
from omega_protocol import decode_embedding, decode_payload, shard_for

from .conftest import StartShard, write_catalog
from .test_constellation import pattern, request

pytestmark = pytest.mark.integration

SHARDS = ["shard-a", "shard-b"]


def near(base: np.ndarray, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(384).astype(np.float32) * 0.02
    v = base + noise
    return v / np.linalg.norm(v)


async def test_round_publishes_global_patterns_a_new_device_receives(
    start_shard: StartShard, make_database: Callable[[], Awaitable[str]], tmp_path: Path
) -> None:
    from omega_protocol import encode_embedding

    write_catalog(tmp_path / "catalog.npz")  # shards count views of catalog items only
    servers = {
        s: await start_shard(
            database_url=await make_database(),
            shard_id=s,
            shard_ids=SHARDS,
            catalog_path=tmp_path / "catalog.npz",
        )
        for s in SHARDS
    }
    channels = {
        s: grpc.aio.insecure_channel(f"127.0.0.1:{r.federation_port}") for s, r in servers.items()
    }
    stubs = {s: sync_pb2_grpc.ConstellationSyncStub(c) for s, c in channels.items()}
    base = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    base /= np.linalg.norm(base)
    devices = [f"tv-{i}" for i in range(5)]
    assert {shard_for(d, SHARDS) for d in devices} == set(SHARDS)  # both shards get devices
    for i, device in enumerate(devices):
        p = pattern("evening", rate=0.9, seed=i, embedding=encode_embedding(near(base, i)))
        stub = stubs[shard_for(device, SHARDS)]
        response = await stub.SyncPatterns(request(device, 1, p, views=i + 1))
        assert response.acknowledged_version == 1

    settings = FederationSettings(
        shards={s: f"127.0.0.1:{r.federation_port}" for s, r in servers.items()},
        min_sources=3,
        codebook_size=1,
        epsilon=float("inf"),
        trend_noise_scale=0.0,
        seed=1,
        patterns_enabled=True,  # the legacy pipeline: averaged global patterns, view trends
    )
    state = await WorkerState.open(await make_database())
    try:
        report = await run_round(settings, state, channels)
        assert report.status == "published" and report.round_id == 1
        assert report.exported_patterns == 5
        assert report.patterns_published == 1
        again = await run_round(settings, state, channels)  # nothing new: watermarks held
        assert again.round_id == 2 and again.exported_patterns == 0
    finally:
        await state.close()

    newcomer = next(f"new-{i}" for i in range(50) if shard_for(f"new-{i}", SHARDS) == "shard-b")
    response = await stubs["shard-b"].SyncPatterns(
        request(newcomer, 1, pattern("morning", seed=99))
    )
    assert response.global_version == 2
    received = decode_payload(response.global_patterns, patterns_pb2.GlobalPatterns)
    assert len(received.patterns) == 1
    got = received.patterns[0]
    assert got.source_count == 5
    assert got.context.time_slot == patterns_pb2.TIME_SLOT_EVENING
    # Equal weights (same rate and samples, no clipping hit): the normalized mean embedding.
    expected = np.sum([near(base, i) for i in range(5)], axis=0)
    expected /= np.linalg.norm(expected)
    got_vec = decode_embedding(got.embedding)
    assert float(got_vec @ expected) / float(np.linalg.norm(got_vec)) > 0.999
    assert [t.content_id for t in received.trending] == ["c0001"]

    # A device that is current gets no payload; a re-published round is a no-op.
    current = await stubs["shard-b"].SyncPatterns(
        sync_pb2.SyncPatternsRequest(
            device_id=newcomer,
            local_version=2,
            since_global_version=2,
            delta=request(newcomer, 2).delta,
        )
    )
    assert not current.HasField("global_patterns")
    fed = federation_pb2_grpc.FederationStub(channels["shard-b"])
    dup = await fed.PublishRound(federation_pb2.PublishRoundRequest(round=1))
    assert dup.duplicate and dup.global_version == 2
    for c in channels.values():
        await c.close()


async def test_periodic_worker_runs_rounds_until_stopped(
    start_shard: StartShard, make_database: Callable[[], Awaitable[str]]
) -> None:
    import asyncio

    from omega_federation.worker import run_periodic

    running = await start_shard(database_url=await make_database())
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.federation_port}")
    settings = FederationSettings(
        shards={"shard-0": f"127.0.0.1:{running.federation_port}"},
        interval_seconds=0.1,
        min_sources=3,
    )
    dsn = await make_database()
    state = await WorkerState.open(dsn)
    observer = await WorkerState.open(dsn)  # its own connection: the worker holds the other
    stop = asyncio.Event()
    try:
        task = asyncio.create_task(run_periodic(settings, state, {"shard-0": channel}, stop))
        for _ in range(100):
            latest = await observer.latest()
            if latest is not None and latest.round_id >= 3:
                break
            await asyncio.sleep(0.05)
        stop.set()
        published = await asyncio.wait_for(task, timeout=10)
    finally:
        await observer.close()
        await state.close()
        await channel.close()
    assert published >= 3
    assert await running.service.store.global_version() == published


async def test_only_one_worker_runs_a_round(
    start_shard: StartShard, make_database: Callable[[], Awaitable[str]]
) -> None:
    running = await start_shard(database_url=await make_database())
    settings = FederationSettings(shards={"shard-0": f"127.0.0.1:{running.federation_port}"})
    dsn = await make_database()
    first, second = await WorkerState.open(dsn), await WorkerState.open(dsn)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.federation_port}")
    try:
        assert await first.try_lock()  # another worker is mid-round
        report = await run_round(settings, second, {"shard-0": channel})
        assert report.status == "skipped_locked" and await second.latest() is None
        await first.unlock()
        assert (await run_round(settings, second, {"shard-0": channel})).status == "published"
    finally:
        await channel.close()
        await first.close()
        await second.close()
