"""Constellation over real gRPC and a real Postgres: sync, validation, idempotency, catalog."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import asyncpg
import grpc
import numpy as np
import pytest
import zstandard
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omega.v1 import federation_pb2, federation_pb2_grpc, patterns_pb2, sync_pb2, sync_pb2_grpc
from omega_constellation.server import RunningServer
from omega_protocol import encode_embedding, encode_payload, shard_for

from .conftest import StartShard

pytestmark = pytest.mark.integration


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
    return v / np.linalg.norm(v)


def pattern(
    pid: str, rate: float = 0.9, seed: int = 1, **kw: object
) -> patterns_pb2.ViewingPattern:
    return patterns_pb2.ViewingPattern(
        pattern_id=pid,
        embedding=kw.pop("embedding", encode_embedding(unit(seed))),  # type: ignore[arg-type]
        success_rate=rate,
        sample_count=5,
        context=patterns_pb2.PatternContext(
            time_slot=patterns_pb2.TIME_SLOT_EVENING, day_type=patterns_pb2.DAY_TYPE_WEEKEND
        ),
        created_at_ms=1_000,
        updated_at_ms=2_000,
    )


def request(
    device: str, version: int, *patterns: patterns_pb2.ViewingPattern, views: int = 0
) -> sync_pb2.SyncPatternsRequest:
    delta = patterns_pb2.PatternDelta(
        added=list(patterns),
        local_version=version,
        base_version=max(version - 1, 0),
        content_views=[patterns_pb2.ContentViewCount(content_id="c0001", views=views)]
        if views
        else [],
    )
    return sync_pb2.SyncPatternsRequest(
        device_id=device, local_version=version, delta=encode_payload(delta)
    )


async def count_rows(dsn: str, table: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()


async def test_sync_stores_patterns_in_postgres(
    stub: sync_pb2_grpc.ConstellationSyncStub, database_url: str
) -> None:
    response = await stub.SyncPatterns(
        request("tv-1", 1, pattern("p-evening"), pattern("p-low", rate=0.3, seed=2), views=2)
    )
    assert response.acknowledged_version == 1
    assert not response.duplicate
    assert response.patterns_stored == 1  # the 0.3 pattern is below the 0.7 threshold
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT success_rate, sample_count, length(embedding) AS n, time_slot"
            " FROM device_patterns WHERE device_id = 'tv-1' AND pattern_id = 'p-evening'"
        )
        views = await conn.fetchval("SELECT views FROM content_views WHERE content_id = 'c0001'")
        last = await conn.fetchval("SELECT last_local_version FROM devices WHERE device_id='tv-1'")
    finally:
        await conn.close()
    assert row is not None and row["n"] == 384 and row["sample_count"] == 5
    assert row["success_rate"] == pytest.approx(0.9)
    assert row["time_slot"] == patterns_pb2.TIME_SLOT_EVENING
    assert views == 2 and last == 1


async def test_retried_sync_is_applied_once(
    stub: sync_pb2_grpc.ConstellationSyncStub, database_url: str
) -> None:
    req = request("tv-2", 1, pattern("p1"), views=3)
    first = await stub.SyncPatterns(req)
    again = await stub.SyncPatterns(req)
    assert not first.duplicate and again.duplicate
    assert again.acknowledged_version == 1
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT views FROM content_views") == 3
    finally:
        await conn.close()


def _bomb() -> sync_pb2.CompressedPayload:
    data = zstandard.ZstdCompressor().compress(b"\x00" * (8 << 20))
    return sync_pb2.CompressedPayload(codec=sync_pb2.CODEC_ZSTD, raw_size=100, data=data)


def _bomb_without_size() -> sync_pb2.CompressedPayload:
    data = zstandard.ZstdCompressor(write_content_size=False).compress(b"\x00" * (8 << 20))
    return sync_pb2.CompressedPayload(codec=sync_pb2.CODEC_ZSTD, raw_size=100, data=data)


def _nan_pattern() -> patterns_pb2.ViewingPattern:
    v = unit(3)
    v[7] = np.nan
    emb = patterns_pb2.Embedding(
        encoding=patterns_pb2.EMBEDDING_ENCODING_FLOAT32, dim=384, data=v.tobytes()
    )
    return pattern("p-nan", embedding=emb)


def _wrong_dim_pattern() -> patterns_pb2.ViewingPattern:
    return pattern("p-dim", embedding=encode_embedding(unit(4)[:128]))


def _with_payload(payload: sync_pb2.CompressedPayload) -> sync_pb2.SyncPatternsRequest:
    return sync_pb2.SyncPatternsRequest(device_id="tv-bad", local_version=1, delta=payload)


MALFORMED = {
    "garbage bytes": _with_payload(
        sync_pb2.CompressedPayload(codec=sync_pb2.CODEC_ZSTD, raw_size=10, data=b"\x13garbage!")
    ),
    "garbage protobuf": _with_payload(
        sync_pb2.CompressedPayload(
            codec=sync_pb2.CODEC_NONE, raw_size=5, data=b"\xff\xff\xff\xff\xff"
        )
    ),
    "zstd bomb": _with_payload(_bomb()),
    "zstd bomb, no declared size": _with_payload(_bomb_without_size()),
    "NaN embedding": request("tv-bad", 1, pattern("ok"), _nan_pattern()),
    "wrong dimension": request("tv-bad", 1, pattern("ok"), _wrong_dim_pattern()),
    "success rate above 1": request("tv-bad", 1, pattern("ok", rate=1.5)),
    "unknown dictionary": _with_payload(
        sync_pb2.CompressedPayload(codec=sync_pb2.CODEC_ZSTD, dictionary_id=9, raw_size=1, data=b"")
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_malformed_delta_is_rejected_and_nothing_written(
    case: str, stub: sync_pb2_grpc.ConstellationSyncStub, database_url: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SyncPatterns(MALFORMED[case])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for table in ("devices", "device_patterns", "content_views"):
        assert await count_rows(database_url, table) == 0, table


async def test_device_of_another_shard_is_redirected(
    start_shard: StartShard, database_url: str
) -> None:
    shards = ["shard-a", "shard-b"]
    running = await start_shard(database_url=database_url, shard_id="shard-a", shard_ids=shards)
    device = next(f"tv-{i}" for i in range(100) if shard_for(f"tv-{i}", shards) == "shard-b")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        response = await sync_pb2_grpc.ConstellationSyncStub(channel).SyncPatterns(
            request(device, 1, pattern("p"))
        )
    assert response.redirect_shard_id == "shard-b"
    assert await count_rows(database_url, "devices") == 0


async def test_fetch_embeddings_pages_through_catalog(
    stub: sync_pb2_grpc.ConstellationSyncStub,
) -> None:
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.FetchEmbeddings(
            sync_pb2.FetchEmbeddingsRequest(page_size=20, page_token=token)
        )
        seen += [item.content_id for item in page.items]
        assert all(item.embedding.dim == 384 for item in page.items)
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"c{i:04d}" for i in range(50)]
    by_id = await stub.FetchEmbeddings(
        sync_pb2.FetchEmbeddingsRequest(
            content_ids=["c0003"], encoding=patterns_pb2.EMBEDDING_ENCODING_FLOAT32
        )
    )
    assert [i.title for i in by_id.items] == ["Title 3"]


async def test_search_content_finds_the_item_itself(
    stub: sync_pb2_grpc.ConstellationSyncStub, shard: RunningServer
) -> None:
    row = shard.service.catalog.rows[5]
    query = patterns_pb2.Embedding(
        encoding=row_encoding(), dim=384, scale=row.scale, data=row.codes
    )
    found = await stub.SearchContent(sync_pb2.SearchContentRequest(query=query, k=3))
    assert found.results[0].content_id == row.content_id
    assert found.results[0].score == pytest.approx(1.0, abs=1e-3)
    filtered = await stub.SearchContent(
        sync_pb2.SearchContentRequest(query=query, k=3, genres=["Comedy"])
    )
    assert all(int(r.content_id[1:]) % 2 == 1 for r in filtered.results)


def row_encoding() -> int:
    return patterns_pb2.EMBEDDING_ENCODING_INT8


async def _services(port: int) -> set[str]:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        return {s.name async for r in stream for s in r.list_services_response.service}


async def test_health_and_reflection(shard: RunningServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{shard.port}") as channel:
        status = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="omega.v1.ConstellationSync")
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        # The Federation API is not on the device port at all.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await federation_pb2_grpc.FederationStub(channel).PublishRound(
                federation_pb2.PublishRoundRequest(round=1)
            )
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    device = await _services(shard.port)
    assert {"omega.v1.ConstellationSync", "grpc.health.v1.Health"} <= device
    assert "omega.v1.Federation" not in device
    assert "omega.v1.Federation" in await _services(shard.federation_port)


async def test_database_outage_is_unavailable_then_recovers(
    stub: sync_pb2_grpc.ConstellationSyncStub, database_url: str, pg_admin_dsn: str
) -> None:
    name = urlsplit(database_url).path.lstrip("/")
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SyncPatterns(request("tv-outage", 1, pattern("p")))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
    # The client retries the same (device, version) once the database is back: applied once.
    for _ in range(20):
        try:
            response = await stub.SyncPatterns(request("tv-outage", 1, pattern("p")))
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
    assert response.acknowledged_version == 1 and not response.duplicate


async def test_report_metrics_and_prometheus_endpoint(
    stub: sync_pb2_grpc.ConstellationSyncStub,
) -> None:
    import urllib.request

    from prometheus_client import start_http_server

    from omega.v1 import events_pb2
    from omega_simulator.stack import free_port

    await stub.ReportMetrics(
        sync_pb2.ReportMetricsRequest(
            device_id="tv-9", metrics=events_pb2.DeviceMetrics(recommend_p99_ms=3.5, syncs_failed=2)
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ReportMetrics(sync_pb2.ReportMetricsRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1")
    try:

        def scrape() -> str:
            url = f"http://127.0.0.1:{port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode())

        text = await asyncio.to_thread(scrape)
    finally:
        server.shutdown()
        thread.join(5)
    assert 'omega_constellation_rpc_handled_total{code="OK",method="ReportMetrics"}' in text
    assert 'code="INVALID_ARGUMENT",method="ReportMetrics"' in text
    assert "omega_constellation_device_syncs_failed_total" in text


async def test_rejections_are_logged_with_rpc_context(
    stub: sync_pb2_grpc.ConstellationSyncStub,
) -> None:
    from structlog.testing import capture_logs

    with capture_logs() as logs, pytest.raises(grpc.aio.AioRpcError):
        await stub.SyncPatterns(MALFORMED["wrong dimension"])
    rejected = [e for e in logs if e["event"] == "rpc_rejected"]
    assert rejected and rejected[0]["code"] == "INVALID_ARGUMENT"
    assert "dimension" in rejected[0]["reason"]


async def test_worker_and_metrics_requests_with_bad_numbers_are_rejected(
    shard: RunningServer, stub: sync_pb2_grpc.ConstellationSyncStub
) -> None:
    from omega.v1 import events_pb2

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ReportMetrics(
            sync_pb2.ReportMetricsRequest(
                device_id="tv", metrics=events_pb2.DeviceMetrics(recommend_p99_ms=float("inf"))
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    async with grpc.aio.insecure_channel(f"127.0.0.1:{shard.federation_port}") as channel:
        federation = federation_pb2_grpc.FederationStub(channel)
        for rate in (float("nan"), 1.5):
            call = federation.ExportPatterns(
                federation_pb2.ExportPatternsRequest(min_success_rate=rate)
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_version_zero_is_a_pull_that_writes_nothing(
    stub: sync_pb2_grpc.ConstellationSyncStub, database_url: str
) -> None:
    # A new (or factory-reset) device has learned nothing yet; it may still fetch the global
    # state, but a version-0 delta that carries data is refused.
    pull = await stub.SyncPatterns(request("tv-new", 0))
    assert pull.acknowledged_version == 0 and not pull.duplicate
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.SyncPatterns(request("tv-new", 0, pattern("p1"), views=4))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "local_version" in (refused.value.details() or "")
    for table in ("devices", "device_patterns", "content_views"):
        assert await count_rows(database_url, table) == 0
