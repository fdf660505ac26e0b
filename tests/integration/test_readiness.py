"""Readiness: health follows the shard's Postgres (a private cluster the test stops, starts)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from omega.v1 import patterns_pb2, sync_pb2, sync_pb2_grpc
from omega_protocol import encode_embedding, encode_payload

from .conftest import StartShard, write_catalog
from .private_postgres import PrivatePostgres, postgres_bin_dir

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def private_postgres() -> AsyncIterator[PrivatePostgres]:
    """A started cluster of this test's own, destroyed afterwards."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("no Postgres binaries (system or pgserver) to run a private cluster")
    cluster = await asyncio.to_thread(PrivatePostgres, bin_dir)
    try:
        await asyncio.to_thread(cluster.start)
        yield cluster
    finally:
        await asyncio.to_thread(cluster.destroy)


def sync_request(device: str, version: int) -> sync_pb2.SyncPatternsRequest:
    v = np.random.default_rng(version).standard_normal(384).astype(np.float32)
    pattern = patterns_pb2.ViewingPattern(
        pattern_id=f"p{version}",
        embedding=encode_embedding(v / np.linalg.norm(v)),
        success_rate=0.9,
        sample_count=5,
        context=patterns_pb2.PatternContext(
            time_slot=patterns_pb2.TIME_SLOT_EVENING, day_type=patterns_pb2.DAY_TYPE_WEEKEND
        ),
        created_at_ms=1_000,
        updated_at_ms=2_000,
    )
    delta = patterns_pb2.PatternDelta(
        added=[pattern], local_version=version, base_version=version - 1
    )
    return sync_pb2.SyncPatternsRequest(
        device_id=device, local_version=version, delta=encode_payload(delta)
    )


async def eventually(
    check: Callable[[], Awaitable[bool]], within_seconds: float, step_seconds: float = 0.05
) -> float:
    """Poll ``check`` until it holds; returns the seconds it took. Fails past the bound."""
    started = time.monotonic()
    while not await check():
        elapsed = time.monotonic() - started
        assert elapsed < within_seconds, f"not within {within_seconds} s"
        await asyncio.sleep(step_seconds)
    return time.monotonic() - started


@pytest.mark.timeout(120)
async def test_health_follows_the_database_and_recovers_by_itself(
    private_postgres: PrivatePostgres, start_shard: StartShard, tmp_path: Path
) -> None:
    write_catalog(tmp_path / "catalog.npz")
    running = await start_shard(
        database_url=private_postgres.dsn,
        catalog_path=tmp_path / "catalog.npz",
        db_probe_interval_seconds=0.1,
        db_probe_timeout_seconds=0.5,
        db_timeout_seconds=2.0,
        probe_port=0,
    )
    assert running.readiness is not None and running.probe_port > 0
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.federation_port}") as internal,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.probe_port}") as probes,
    ):
        device_health = health_pb2_grpc.HealthStub(channel)
        internal_health = health_pb2_grpc.HealthStub(internal)
        # The kubelet's native grpc probes: readiness (service "") and liveness.
        probe_health = health_pb2_grpc.HealthStub(probes)

        async def liveness() -> int:
            answer = await probe_health.Check(health_pb2.HealthCheckRequest(service="liveness"))
            return int(answer.status)

        stub = sync_pb2_grpc.ConstellationSyncStub(channel)

        async def statuses() -> set[int]:
            answers = [
                await device_health.Check(health_pb2.HealthCheckRequest(service="")),
                await device_health.Check(
                    health_pb2.HealthCheckRequest(service="omega.v1.ConstellationSync")
                ),
                await internal_health.Check(
                    health_pb2.HealthCheckRequest(service="omega.v1.Federation")
                ),
                await probe_health.Check(health_pb2.HealthCheckRequest(service="")),
            ]
            return {a.status for a in answers}

        async def is_(status: int) -> bool:
            return await statuses() == {status}

        assert await statuses() == {SERVING} and await liveness() == SERVING
        # The probe listener serves health only: no sync, no reflection.
        with pytest.raises(grpc.aio.AioRpcError) as unimplemented:
            await sync_pb2_grpc.ConstellationSyncStub(probes).SyncPatterns(sync_request("x", 1))
        assert unimplemented.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # A Watch stream (through every interceptor) sees each transition.
        watch = device_health.Watch(health_pb2.HealthCheckRequest(service=""))
        watched: list[int] = []

        async def follow() -> None:
            async for answer in watch:
                watched.append(answer.status)

        follower = asyncio.ensure_future(follow())
        assert (await stub.SyncPatterns(sync_request("tv-1", 1))).acknowledged_version == 1
        assert REGISTRY.get_sample_value("omega_constellation_database_up") == 1

        with capture_logs() as logs:
            await asyncio.to_thread(private_postgres.stop)
            took = await eventually(lambda: is_(NOT_SERVING), within_seconds=5.0)
            assert took < 5.0
            assert await liveness() == SERVING  # not restarted for an outage of Postgres
            assert REGISTRY.get_sample_value("omega_constellation_database_up") == 0
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SyncPatterns(sync_request("tv-1", 2), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            await asyncio.sleep(0.5)  # several more failed probes: still one transition

            await asyncio.to_thread(private_postgres.start)
            await eventually(lambda: is_(SERVING), within_seconds=10.0)
            assert REGISTRY.get_sample_value("omega_constellation_database_up") == 1
            # The same (device, version) the outage refused is applied now, once.
            answer = await stub.SyncPatterns(sync_request("tv-1", 2), timeout=10)
            assert answer.acknowledged_version == 2 and not answer.duplicate
            assert answer.patterns_stored == 2

        async def transitions_seen() -> bool:
            return len(watched) >= 3

        await eventually(transitions_seen, within_seconds=5.0)
        watch.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        assert watched[:3] == [SERVING, NOT_SERVING, SERVING]

    events = [e["event"] for e in logs]
    assert events.count("database_down") == 1, events
    assert events.count("database_up") == 1, events
