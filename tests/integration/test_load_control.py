"""Load control and memory over real gRPC and Postgres: the concurrency bound, the per-device
rate limit (with gRPC's own retry honouring the pushback), pace steering, the bounded view."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from omega.v1 import (
    events_pb2,
    federation_pb2,
    federation_pb2_grpc,
    patterns_pb2,
    sync_pb2,
    sync_pb2_grpc,
)
from omega_common.auth import FleetKeys, bearer
from omega_constellation.server import RunningServer
from omega_protocol import decode_payload, encode_embedding, encode_payload, shard_for

from .conftest import StartShard, write_catalog
from .test_readiness import sync_request

pytestmark = pytest.mark.integration


@pytest.fixture
async def catalog(tmp_path: Path) -> Path:
    write_catalog(tmp_path / "catalog.npz")
    return tmp_path / "catalog.npz"


async def start(start_shard: StartShard, database_url: str, catalog: Path, **kw: Any) -> Any:
    return await start_shard(database_url=database_url, catalog_path=catalog, **kw)


@pytest.fixture
async def admin(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


async def wait_for_lock_waiters(dsn: str, count: int) -> None:
    """Until ``count`` sessions wait on a lock (the syncs the test holds are in flight).

    Polls from a connection of its own: inside a transaction pg_stat_activity is a snapshot.
    """
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(500):  # 10 s at most
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if waiting >= count:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"{count} syncs never waited on the held lock")
    finally:
        await conn.close()


def rate_limited(method: str) -> float:
    value = REGISTRY.get_sample_value(
        "omega_constellation_rpc_rate_limited_total", {"method": method}
    )
    return value or 0.0


async def test_concurrency_bound_answers_resource_exhausted_and_stretches_the_pace(
    start_shard: StartShard, database_url: str, catalog: Path, admin: asyncpg.Connection
) -> None:
    running = await start(
        start_shard,
        database_url,
        catalog,
        max_concurrent_rpcs=3,
        db_timeout_seconds=60.0,
        sync_interval_seconds=100,
        sync_interval_jitter=0.0,
        pace_pressure_threshold=0.5,
        pace_max_multiplier=3.0,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = sync_pb2_grpc.ConstellationSyncStub(channel)
        for device in ("tv-a", "tv-b", "tv-c", "tv-d"):
            answer = await stub.SyncPatterns(sync_request(device, 1))
            assert answer.next_sync_after_ms == 100_000  # one RPC in flight of 3: no stretch
        # Hold syncs in flight: their device rows are locked, so they wait inside Postgres.
        async with admin.transaction():
            await admin.execute(
                "SELECT 1 FROM devices WHERE device_id = ANY($1) FOR UPDATE",
                ["tv-a", "tv-b", "tv-c"],
            )
            held = [
                asyncio.ensure_future(stub.SyncPatterns(sync_request(f"tv-{d}", 2))) for d in "ab"
            ]
            await wait_for_lock_waiters(database_url, 2)
            # Two held + this one = 3 of 3 in flight: the pace is stretched to the maximum.
            answer = await stub.SyncPatterns(sync_request("tv-d", 2))
            assert answer.acknowledged_version == 2
            assert answer.next_sync_after_ms == 300_000
            # gRPC releases the finished RPC's slot a moment after its answer: retry until
            # the third held sync is admitted.
            for _ in range(100):
                third = asyncio.ensure_future(stub.SyncPatterns(sync_request("tv-c", 2)))
                await asyncio.sleep(0.05)
                if not third.done():
                    break
                assert third.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[union-attr]
            held.append(third)
            await wait_for_lock_waiters(database_url, 3)
            # At the bound: gRPC refuses anything more, even a health check, before any handler.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ReportMetrics(
                    sync_pb2.ReportMetricsRequest(
                        device_id="tv-z", metrics=events_pb2.DeviceMetrics(syncs_failed=1)
                    )
                )
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        answers = await asyncio.gather(*held)
        assert [a.acknowledged_version for a in answers] == [2, 2, 2]
        # Below the bound again: served, and at the base pace.
        answer = await stub.SyncPatterns(sync_request("tv-a", 3))
        assert answer.acknowledged_version == 3 and answer.next_sync_after_ms == 100_000


async def test_device_over_its_rate_gets_resource_exhausted_with_retry_trailers(
    start_shard: StartShard, database_url: str, catalog: Path, admin: asyncpg.Connection
) -> None:
    running = await start(
        start_shard,
        database_url,
        catalog,
        device_rate_per_second=0.5,
        device_burst=3,
        sync_interval_seconds=100,
        sync_interval_jitter=0.0,
        pace_pressure_threshold=0.5,
        pace_max_multiplier=3.0,
    )
    before = rate_limited("SyncPatterns")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = sync_pb2_grpc.ConstellationSyncStub(channel)
        pauses = [
            (await stub.SyncPatterns(sync_request("tv-fast", v))).next_sync_after_ms for v in (1, 2)
        ]
        # A device spending its burst is asked to slow down: with 1/3 of it spent, the base
        # pause; with 2/3 spent (pressure 0.67 over the 0.5 threshold), 1 + 2 x 0.33 times it
        # (a little less: the bucket refills between the calls).
        assert pauses[0] == 100_000
        assert 160_000 <= pauses[1] <= 166_667
        await stub.ReportMetrics(  # the same bucket: device RPCs of every kind count
            sync_pb2.ReportMetricsRequest(
                device_id="tv-fast", metrics=events_pb2.DeviceMetrics(syncs_failed=0)
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SyncPatterns(sync_request("tv-fast", 3))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(err.value.trailing_metadata())
        # One token at 0.5/s: about 2 s.
        assert 1500 <= int(trailers["retry-after-ms"]) <= 2000
        assert trailers["grpc-retry-pushback-ms"] == trailers["retry-after-ms"]
        # Nothing of the refused sync was written.
        row = await admin.fetchrow(
            "SELECT last_local_version, pattern_count FROM devices WHERE device_id = 'tv-fast'"
        )
        assert (row["last_local_version"], row["pattern_count"]) == (2, 2)
        assert not await admin.fetchval(
            "SELECT count(*) FROM device_patterns WHERE pattern_id = 'p3'"
        )
        # Other devices, and (without credentials) calls naming no device, are not affected.
        assert (await stub.SyncPatterns(sync_request("tv-calm", 1))).acknowledged_version == 1
        await stub.FetchModel(sync_pb2.FetchModelRequest())
        assert rate_limited("SyncPatterns") == before + 1
        assert REGISTRY.get_sample_value("omega_constellation_rate_limit_tracked_devices") == 2


async def test_with_credentials_every_call_of_a_device_shares_its_bucket(
    start_shard: StartShard, database_url: str, catalog: Path
) -> None:
    secret = base64.b64encode(b"k" * 32).decode()
    keys = FleetKeys.from_json(json.dumps({"k1": secret}))
    running = await start(
        start_shard,
        database_url,
        catalog,
        auth=True,
        fleet_keys=json.dumps({"k1": secret}),
        device_rate_per_second=0.5,
        device_burst=3,
    )
    mine, other = bearer(keys.issue("tv-auth")), bearer(keys.issue("tv-other"))
    before = rate_limited("FetchEmbeddings")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = sync_pb2_grpc.ConstellationSyncStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:  # refused before any bucket
            await stub.FetchModel(sync_pb2.FetchModelRequest())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await stub.SyncPatterns(sync_request("tv-auth", 1), metadata=mine)
        await stub.FetchModel(sync_pb2.FetchModelRequest(), metadata=mine)
        await stub.FetchEmbeddings(sync_pb2.FetchEmbeddingsRequest(page_size=5), metadata=mine)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.FetchEmbeddings(sync_pb2.FetchEmbeddingsRequest(page_size=5), metadata=mine)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert int(dict(err.value.trailing_metadata())["retry-after-ms"]) > 1000
        await stub.FetchEmbeddings(sync_pb2.FetchEmbeddingsRequest(page_size=5), metadata=other)
    assert rate_limited("FetchEmbeddings") == before + 1


async def test_grpc_retry_policy_honours_the_pushback(
    start_shard: StartShard, database_url: str, catalog: Path
) -> None:
    running = await start(
        start_shard, database_url, catalog, device_rate_per_second=4.0, device_burst=1
    )
    config = {
        "methodConfig": [
            {
                "name": [{"service": "omega.v1.ConstellationSync"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.01s",
                    "maxBackoff": "0.01s",
                    "backoffMultiplier": 1,
                    "retryableStatusCodes": ["RESOURCE_EXHAUSTED"],
                },
            }
        ]
    }
    options = [("grpc.service_config", json.dumps(config)), ("grpc.enable_retries", 1)]
    before = rate_limited("SyncPatterns")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}", options=options) as ch:
        stub = sync_pb2_grpc.ConstellationSyncStub(ch)
        assert (await stub.SyncPatterns(sync_request("tv-r", 1))).acknowledged_version == 1
        started = time.monotonic()
        answer = await stub.SyncPatterns(sync_request("tv-r", 2))  # refused once, retried
        waited = time.monotonic() - started
    assert answer.acknowledged_version == 2 and not answer.duplicate
    assert rate_limited("SyncPatterns") == before + 1
    # The client waited for the pushback (about 250 ms at 4/s), not its 10 ms backoff.
    assert 0.15 <= waited < 2.0


async def test_every_sync_answer_carries_the_pace(
    start_shard: StartShard, database_url: str, catalog: Path
) -> None:
    running = await start(
        start_shard,
        database_url,
        catalog,
        shard_ids=["shard-0", "shard-1"],
        sync_interval_seconds=300,
        sync_interval_jitter=0.2,
    )
    owners = {f"tv-{i}": shard_for(f"tv-{i}", ["shard-0", "shard-1"]) for i in range(100)}
    here = next(d for d, owner in owners.items() if owner == "shard-0")
    elsewhere = next(d for d, owner in owners.items() if owner == "shard-1")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = sync_pb2_grpc.ConstellationSyncStub(channel)
        answers = [
            await stub.SyncPatterns(sync_request(here, 1)),
            await stub.SyncPatterns(sync_request(here, 1)),  # duplicate
            await stub.SyncPatterns(pull_request(here, 0)),  # a pull
            await stub.SyncPatterns(sync_request(elsewhere, 1)),  # redirect
        ]
    assert answers[1].duplicate and answers[3].redirect_shard_id == "shard-1"
    for answer in answers:
        assert 240_000 <= answer.next_sync_after_ms <= 360_000
    assert len({a.next_sync_after_ms for a in answers}) > 1  # jittered


def pull_request(device: str, since: int) -> sync_pb2.SyncPatternsRequest:
    """A version-0 sync: an empty delta, asking for the global state newer than ``since``."""
    return sync_pb2.SyncPatternsRequest(
        device_id=device,
        since_global_version=since,
        delta=encode_payload(patterns_pb2.PatternDelta()),
    )


def global_pattern(key: str, quality: float, seed: int) -> patterns_pb2.GlobalPattern:
    v = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
    return patterns_pb2.GlobalPattern(
        pattern_key=key,
        embedding=encode_embedding(v / np.linalg.norm(v)),
        quality=quality,
        source_count=1000,
        success_rate=0.9,
        context=patterns_pb2.PatternContext(
            time_slot=patterns_pb2.TIME_SLOT_EVENING, day_type=patterns_pb2.DAY_TYPE_WEEKEND
        ),
    )


async def received(
    stub: sync_pb2_grpc.ConstellationSyncStub, device: str, since: int
) -> tuple[list[str], list[str]]:
    """(pattern keys, trending ids) a pull from ``since`` answers."""
    answer = await stub.SyncPatterns(pull_request(device, since))
    if not answer.HasField("global_patterns"):
        return [], []
    message = decode_payload(answer.global_patterns, patterns_pb2.GlobalPatterns)
    return [p.pattern_key for p in message.patterns], [t.content_id for t in message.trending]


def expected(rows: list[Any], since: int, per_sync: int) -> list[str]:
    """The answer of an unbounded view: the per_sync best patterns newer than ``since``."""
    return [r.pattern_key for r in rows if r.round > since][:per_sync]


async def test_global_view_is_bounded_and_answers_stay_correct(
    start_shard: StartShard, database_url: str, catalog: Path
) -> None:
    per_sync = {"max_global_patterns_per_sync": 3, "trending_per_sync": 2}
    running: RunningServer = await start(
        start_shard, database_url, catalog, max_global_patterns_held=100, **per_sync
    )
    # Round 1: 8 patterns of high quality; round 2: 4 new ones of low quality and one of
    # round 1 re-published lower; round 3: 2 more, of middling quality.
    rounds = [
        [global_pattern(f"r1-{i}", 10.0 - i, i) for i in range(8)],
        [global_pattern(f"r2-{i}", 1.0 - i / 10, 20 + i) for i in range(4)]
        + [global_pattern("r1-7", 0.5, 7)],
        [global_pattern(f"r3-{i}", 5.5 - i, 40 + i) for i in range(2)],
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.federation_port}") as internal:
        federation = federation_pb2_grpc.FederationStub(internal)
        for number, patterns in enumerate(rounds, start=1):
            await federation.PublishRound(
                federation_pb2.PublishRoundRequest(
                    round=number,
                    patterns=patterns,
                    trending=[
                        patterns_pb2.TrendingContent(content_id=f"c{i:04d}", score=10.0 - i)
                        for i in range(6)
                    ],
                )
            )
    version, full, _ = await running.service.store.load_global()  # unbounded, for reference
    assert version == 3 and len(full) == 14
    answers = {since: expected(full, since, 3) for since in range(3)}
    sent = [r.pattern_key for r in full if any(r.pattern_key in a for a in answers.values())]
    assert len(sent) == 6  # of 14 rows, only 6 are in any answer

    # The replica that received the publication holds exactly those, and answers as before.
    view = running.service.global_view
    assert view.version == 3 and len(view.trending) == 2
    assert [p.pattern_key for p in view.patterns] == sent
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = sync_pb2_grpc.ConstellationSyncStub(channel)
        for since, keys in answers.items():
            assert await received(stub, "tv-view", since) == (keys, ["c0000", "c0001"])
        assert await received(stub, "tv-view", 3) == ([], [])

    # A replica (re)started with a tighter bound loads at most that many, best first: the
    # answer to a new device (since 0) is still whole.
    replica = await start(
        start_shard, database_url, catalog, max_global_patterns_held=4, **per_sync
    )
    assert [p.pattern_key for p in replica.service.global_view.patterns] == sent[:4]
    assert REGISTRY.get_sample_value("omega_constellation_global_patterns_held") == 4
    async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
        stub = sync_pb2_grpc.ConstellationSyncStub(channel)
        assert await received(stub, "tv-new", 0) == (answers[0], ["c0000", "c0001"])
