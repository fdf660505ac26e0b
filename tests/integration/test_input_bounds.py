"""Every request field is bounded on the way in (issue 6, item 4), over real gRPC and Postgres.

Each hostile value a fuzz run found is refused with INVALID_ARGUMENT naming the field (never
INTERNAL), and every table of the shard's database is unchanged (row counts and contents).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omega.v1 import (
    events_pb2,
    federation_pb2,
    federation_pb2_grpc,
    patterns_pb2,
    sync_pb2,
    sync_pb2_grpc,
)
from omega_constellation.server import RunningServer
from omega_protocol import encode_embedding, encode_payload
from omega_protocol.model_update import encode_item_factor_update
from tools.fuzz.shard import database_state

from .conftest import StartShard, write_catalog

pytestmark = pytest.mark.integration

ABOVE_INT64 = 2**63
U64_MAX = 2**64 - 1


def unit(seed: int, dim: int = 384) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def viewing_pattern(
    pid: str = "p1", embedding: patterns_pb2.Embedding | None = None, **kw: Any
) -> patterns_pb2.ViewingPattern:
    context = patterns_pb2.PatternContext(
        time_slot=patterns_pb2.TIME_SLOT_EVENING,
        day_type=patterns_pb2.DAY_TYPE_WEEKDAY,
        content_type=kw.pop("content_type", "movie"),
        genre_hints=kw.pop("genre_hints", ["Drama"]),
    )
    return patterns_pb2.ViewingPattern(
        pattern_id=pid,
        embedding=embedding if embedding is not None else encode_embedding(unit(1)),
        success_rate=0.9,
        sample_count=3,
        context=context,
        created_at_ms=1_700_000_000_000,
        updated_at_ms=1_700_000_000_000,
        **kw,
    )


def sync(
    device: str = "tv-1",
    version: int = 1,
    *,
    patterns: tuple[patterns_pb2.ViewingPattern, ...] = (),
    views: tuple[tuple[str, int], ...] = (),
    removed: tuple[str, ...] = (),
    model_update: patterns_pb2.ItemFactorUpdate | None = None,
    since: int = 0,
) -> sync_pb2.SyncPatternsRequest:
    """A sync whose request and delta carry the same ``version``."""
    delta = patterns_pb2.PatternDelta(
        added=list(patterns),
        removed=list(removed),
        content_views=[patterns_pb2.ContentViewCount(content_id=c, views=n) for c, n in views],
        local_version=version,
        base_version=0,
    )
    if model_update is not None:
        delta.model_update.CopyFrom(model_update)
    return sync_pb2.SyncPatternsRequest(
        device_id=device,
        local_version=version,
        since_global_version=since,
        delta=encode_payload(delta),
    )


def int8(vector: np.ndarray, scale: float) -> patterns_pb2.Embedding:
    """An INT8 embedding of ``vector``'s codes with another ``scale``."""
    good = encode_embedding(vector)
    return patterns_pb2.Embedding(
        encoding=patterns_pb2.EMBEDDING_ENCODING_INT8, dim=good.dim, scale=scale, data=good.data
    )


def floats(vector: np.ndarray, encoding: int) -> patterns_pb2.Embedding:
    dtype = "<f2" if encoding == patterns_pb2.EMBEDDING_ENCODING_FLOAT16 else "<f4"
    return patterns_pb2.Embedding(
        encoding=encoding, dim=vector.size, data=vector.astype(dtype).tobytes()
    )


def model_update_with_version(version: int) -> patterns_pb2.ItemFactorUpdate:
    message = encode_item_factor_update(1, ["c0001"], [1.0], [0.5, 0.5])
    message.model_version = version
    return message


@pytest.fixture
async def federation(shard: RunningServer) -> AsyncIterator[federation_pb2_grpc.FederationStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{shard.federation_port}") as channel:
        yield federation_pb2_grpc.FederationStub(channel)


async def refused(call: Awaitable[Any] | Any, field: str) -> str:
    """Await a unary call or drain a stream; it must fail INVALID_ARGUMENT naming ``field``."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    details = err.value.details() or ""
    assert field in details, details
    return details


async def unchanged(dsn: str, act: Callable[[], Awaitable[object]]) -> None:
    """Run ``act`` and check that no table of the shard changed."""
    before = await database_state(dsn)
    await act()
    assert await database_state(dsn) == before


# ---- uint64 fields above the signed 64-bit range --------------------------------------------

SYNC_ABOVE_INT64 = {
    "local_version": sync(version=ABOVE_INT64),
    "since_global_version": sync(since=U64_MAX),
    "model_update.model_version": sync(model_update=model_update_with_version(ABOVE_INT64)),
}


@pytest.mark.parametrize("field", sorted(SYNC_ABOVE_INT64))
async def test_sync_uint64_above_int64_is_refused(
    field: str, stub: sync_pb2_grpc.ConstellationSyncStub, database_url: str
) -> None:
    await unchanged(
        database_url, lambda: refused(stub.SyncPatterns(SYNC_ABOVE_INT64[field]), field)
    )


async def test_read_and_worker_uint64_above_int64_are_refused(
    stub: sync_pb2_grpc.ConstellationSyncStub,
    federation: federation_pb2_grpc.FederationStub,
    database_url: str,
) -> None:
    async def act() -> None:
        await refused(
            stub.FetchEmbeddings(sync_pb2.FetchEmbeddingsRequest(since_catalog_version=U64_MAX)),
            "since_catalog_version",
        )
        await refused(
            stub.FetchModel(sync_pb2.FetchModelRequest(since_model_version=ABOVE_INT64)),
            "since_model_version",
        )
        await refused(
            federation.ExportPatterns(
                federation_pb2.ExportPatternsRequest(views_since_round=U64_MAX)
            ),
            "views_since_round",
        )
        await refused(
            federation.PublishRound(federation_pb2.PublishRoundRequest(round=ABOVE_INT64)),
            "round",
        )
        row = patterns_pb2.ItemFactorRow(
            content_id="c0001", factor=encode_embedding(unit(2, 4)), model_version=U64_MAX
        )
        await refused(
            federation.PublishRound(
                federation_pb2.PublishRoundRequest(round=1, item_factors=[row], factors=4)
            ),
            "item_factors[0].model_version",
        )
        pattern = patterns_pb2.GlobalPattern(
            pattern_key="k",
            embedding=encode_embedding(unit(3)),
            context=viewing_pattern().context,
            round=U64_MAX,
        )
        await refused(
            federation.PublishRound(
                federation_pb2.PublishRoundRequest(round=1, patterns=[pattern])
            ),
            "patterns[0].round",
        )

    await unchanged(database_url, act)


# ---- identifiers: NUL, control characters, length --------------------------------------------

SYNC_BAD_IDS = {
    "device_id NUL": (sync(device="tv\x00"), "device_id"),
    "device_id ESC": (sync(device="tv\x1b[31m"), "device_id"),
    "device_id too long": (sync(device="t" * 129), "device_id"),
    "pattern_id": (sync(patterns=(viewing_pattern("p\x01"),)), "added[0].pattern_id"),
    "removed": (sync(removed=("p\x7f",)), "removed[0]"),
    "content view id": (sync(views=(("c\x00", 1),)), "content_views[0].content_id"),
    "genre hint": (
        sync(patterns=(viewing_pattern(genre_hints=["Dra\x00ma"]),)),
        "added[0].context.genre_hints[0]",
    ),
    "content type": (
        sync(patterns=(viewing_pattern(content_type="movie\x85"),)),
        "added[0].context.content_type",
    ),
}


@pytest.mark.parametrize("case", sorted(SYNC_BAD_IDS))
async def test_sync_ids_with_control_characters_are_refused(
    case: str, stub: sync_pb2_grpc.ConstellationSyncStub, database_url: str
) -> None:
    request, field = SYNC_BAD_IDS[case]
    await unchanged(database_url, lambda: refused(stub.SyncPatterns(request), field))


async def test_other_ids_with_control_characters_are_refused(
    stub: sync_pb2_grpc.ConstellationSyncStub,
    federation: federation_pb2_grpc.FederationStub,
    database_url: str,
) -> None:
    query = encode_embedding(unit(4))

    async def act() -> None:
        await refused(
            stub.FetchEmbeddings(sync_pb2.FetchEmbeddingsRequest(page_token="1\x00")),
            "page_token",
        )
        await refused(
            stub.FetchEmbeddings(sync_pb2.FetchEmbeddingsRequest(content_ids=["c\x00"])),
            "content_ids[0]",
        )
        await refused(stub.FetchModel(sync_pb2.FetchModelRequest(page_token="\x00")), "page_token")
        await refused(
            stub.SearchContent(
                sync_pb2.SearchContentRequest(query=query, exclude_content_ids=["\x85"])
            ),
            "exclude_content_ids[0]",
        )
        await refused(
            stub.ReportMetrics(sync_pb2.ReportMetricsRequest(device_id="tv\n")), "device_id"
        )
        trending = patterns_pb2.TrendingContent(content_id="c\x00", score=1.0)
        await refused(
            federation.PublishRound(
                federation_pb2.PublishRoundRequest(round=1, trending=[trending])
            ),
            "trending[0].content_id",
        )

    await unchanged(database_url, act)


# ---- embeddings: a unit vector in every encoding ---------------------------------------------

BAD_EMBEDDINGS = {
    "int8 scale 1e30": int8(unit(5), 1e30),
    "int8 scale inf": int8(unit(5), float("inf")),
    "int8 scale NaN": int8(unit(5), float("nan")),
    "int8 scale negative": int8(unit(5), -0.01),
    "int8 scale 0": int8(unit(5), 0.0),
    "int8 scale 100x": int8(unit(5), encode_embedding(unit(5)).scale * 100),
    "float32 1e30": floats(unit(5) * 1e30, patterns_pb2.EMBEDDING_ENCODING_FLOAT32),
    "float32 tiny": floats(unit(5) * 1e-3, patterns_pb2.EMBEDDING_ENCODING_FLOAT32),
    "float16 huge": floats(unit(5) * 1000, patterns_pb2.EMBEDDING_ENCODING_FLOAT16),
}


@pytest.mark.parametrize("case", sorted(BAD_EMBEDDINGS))
async def test_embeddings_that_are_not_unit_vectors_are_refused(
    case: str,
    stub: sync_pb2_grpc.ConstellationSyncStub,
    federation: federation_pb2_grpc.FederationStub,
    database_url: str,
) -> None:
    embedding = BAD_EMBEDDINGS[case]
    global_pattern = patterns_pb2.GlobalPattern(
        pattern_key="k", embedding=embedding, context=viewing_pattern().context
    )

    async def act() -> None:
        await refused(
            stub.SyncPatterns(sync(patterns=(viewing_pattern(embedding=embedding),))), "added[0]"
        )
        await refused(
            federation.PublishRound(
                federation_pb2.PublishRoundRequest(round=1, patterns=[global_pattern])
            ),
            "patterns[0]",
        )
        await refused(stub.SearchContent(sync_pb2.SearchContentRequest(query=embedding)), "query")

    await unchanged(database_url, act)


@pytest.mark.parametrize(
    "encoding",
    [
        patterns_pb2.EMBEDDING_ENCODING_INT8,
        patterns_pb2.EMBEDDING_ENCODING_FLOAT16,
        patterns_pb2.EMBEDDING_ENCODING_FLOAT32,
    ],
)
async def test_unit_embeddings_as_the_brain_sends_them_are_stored(
    encoding: int, stub: sync_pb2_grpc.ConstellationSyncStub, database_url: str
) -> None:
    import asyncpg

    embedding = encode_embedding(unit(6), encoding)
    response = await stub.SyncPatterns(
        sync(device=f"tv-{encoding}", patterns=(viewing_pattern(embedding=embedding),))
    )
    assert response.acknowledged_version == 1 and response.patterns_stored == 1
    conn = await asyncpg.connect(database_url)
    try:
        scale = await conn.fetchval("SELECT embedding_scale FROM device_patterns")
    finally:
        await conn.close()
    assert 0 < scale * 127 * np.sqrt(384) < 20  # a unit vector's int8 scale, whatever came in


# ---- view counts: capped per content and per sync, catalog ids only ---------------------------


@pytest.fixture
async def small_limits(
    start_shard: StartShard, database_url: str, tmp_path: Path
) -> AsyncIterator[sync_pb2_grpc.ConstellationSyncStub]:
    """A shard with a catalog and small view limits (10 per content, 15 per sync)."""
    write_catalog(tmp_path / "catalog.npz")
    running = await start_shard(
        database_url=database_url,
        catalog_path=tmp_path / "catalog.npz",
        max_views_per_content=10,
        max_views_per_sync=15,
        max_version_step=100,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield sync_pb2_grpc.ConstellationSyncStub(channel)


VIEW_CASES = {
    "one entry above the per-content cap": ((("c0001", 11),), "content_views[0].views"),
    "two entries of one id above it": ((("c0001", 6), ("c0001", 6)), "content_views[1].views"),
    "above the per-sync cap": ((("c0001", 8), ("c0002", 8)), "15 views in one sync"),
    "uint32 max": ((("c0001", 2**32 - 1),), "content_views[0].views"),
}


@pytest.mark.parametrize("case", sorted(VIEW_CASES))
async def test_view_counts_above_the_caps_are_refused(
    case: str, small_limits: sync_pb2_grpc.ConstellationSyncStub, database_url: str
) -> None:
    views, field = VIEW_CASES[case]
    await unchanged(
        database_url, lambda: refused(small_limits.SyncPatterns(sync(views=views)), field)
    )


async def test_views_within_the_caps_are_stored_and_unknown_ids_dropped(
    small_limits: sync_pb2_grpc.ConstellationSyncStub, database_url: str
) -> None:
    import asyncpg

    response = await small_limits.SyncPatterns(
        sync(views=(("c0001", 10), ("not-in-catalog", 3), ("c0002", 2)))
    )
    assert response.acknowledged_version == 1  # the delta is applied, not refused
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT content_id, views FROM content_views ORDER BY 1")
    finally:
        await conn.close()
    assert [(r["content_id"], r["views"]) for r in rows] == [("c0001", 10), ("c0002", 2)]


# ---- local_version: bounded step per sync -----------------------------------------------------


async def test_local_version_may_advance_by_at_most_the_step(
    small_limits: sync_pb2_grpc.ConstellationSyncStub, database_url: str
) -> None:
    import asyncpg

    assert (await small_limits.SyncPatterns(sync("tv-step", 1))).acknowledged_version == 1
    details = ""

    async def jump() -> None:
        nonlocal details
        details = await refused(small_limits.SyncPatterns(sync("tv-step", 102)), "local_version")

    await unchanged(database_url, jump)
    assert "100" in details
    assert (await small_limits.SyncPatterns(sync("tv-step", 101))).acknowledged_version == 101
    # A new device starts from 0: it cannot wedge itself at 2^63 - 1 either.
    await unchanged(
        database_url,
        lambda: refused(small_limits.SyncPatterns(sync("tv-wedge", 2**63 - 1)), "local_version"),
    )
    pull = await small_limits.SyncPatterns(sync("tv-wedge", 0))  # the pull still works
    assert pull.acknowledged_version == 0
    conn = await asyncpg.connect(database_url)
    try:
        devices = await conn.fetch("SELECT device_id, last_local_version FROM devices")
    finally:
        await conn.close()
    assert [(r["device_id"], r["last_local_version"]) for r in devices] == [("tv-step", 101)]


# ---- ReportMetrics: counters, sizes and latencies in sane ranges ------------------------------

METRIC_CASES = {
    "syncs_failed": events_pb2.DeviceMetrics(syncs_failed=4_500_000_000_000_000_000),
    "events_observed": events_pb2.DeviceMetrics(events_observed=10**9 + 1),
    "recommendations_served": events_pb2.DeviceMetrics(recommendations_served=U64_MAX),
    "syncs_ok": events_pb2.DeviceMetrics(syncs_ok=ABOVE_INT64),
    "store_bytes": events_pb2.DeviceMetrics(store_bytes=(1 << 40) + 1),
    "memory_bytes": events_pb2.DeviceMetrics(memory_bytes=U64_MAX),
    "recommend_p99_ms": events_pb2.DeviceMetrics(recommend_p99_ms=60_001.0),
    "recommend_p99_ms NaN": events_pb2.DeviceMetrics(recommend_p99_ms=float("nan")),
    "recommend_p99_ms negative": events_pb2.DeviceMetrics(recommend_p99_ms=-1.0),
}


@pytest.mark.parametrize("case", sorted(METRIC_CASES))
async def test_report_metrics_out_of_range_is_refused_and_not_counted(
    case: str, stub: sync_pb2_grpc.ConstellationSyncStub
) -> None:
    from prometheus_client import REGISTRY

    def failed() -> float:
        return REGISTRY.get_sample_value("omega_constellation_device_syncs_failed_total") or 0.0

    before = failed()
    metrics = METRIC_CASES[case]
    metrics.syncs_failed = metrics.syncs_failed or 7  # would be counted if accepted
    field = case.split()[0]
    await refused(
        stub.ReportMetrics(sync_pb2.ReportMetricsRequest(device_id="tv-m", metrics=metrics)),
        f"metrics.{field}",
    )
    assert failed() == before


async def test_report_metrics_in_range_is_counted(
    stub: sync_pb2_grpc.ConstellationSyncStub,
) -> None:
    from prometheus_client import REGISTRY

    before = REGISTRY.get_sample_value("omega_constellation_device_syncs_failed_total") or 0.0
    await stub.ReportMetrics(
        sync_pb2.ReportMetricsRequest(
            device_id="tv-m",
            metrics=events_pb2.DeviceMetrics(
                syncs_failed=3, recommend_p99_ms=4.0, store_bytes=1 << 20
            ),
            reported_at_ms=1_700_000_000_000,
        )
    )
    after = REGISTRY.get_sample_value("omega_constellation_device_syncs_failed_total")
    assert after == before + 3


# ---- FetchEmbeddings: an empty page in every encoding ------------------------------------------


@pytest.mark.parametrize(
    "encoding",
    [
        patterns_pb2.EMBEDDING_ENCODING_INT8,
        patterns_pb2.EMBEDDING_ENCODING_FLOAT16,
        patterns_pb2.EMBEDDING_ENCODING_FLOAT32,
    ],
)
async def test_fetch_embeddings_empty_page_in_every_encoding(
    encoding: int, stub: sync_pb2_grpc.ConstellationSyncStub, shard: RunningServer
) -> None:
    by_id = await stub.FetchEmbeddings(
        sync_pb2.FetchEmbeddingsRequest(content_ids=["not-in-catalog"], encoding=encoding)
    )
    assert list(by_id.items) == [] and by_id.next_page_token == ""
    newer = await stub.FetchEmbeddings(
        sync_pb2.FetchEmbeddingsRequest(
            since_catalog_version=shard.service.catalog.version, encoding=encoding
        )
    )
    assert list(newer.items) == []
    page = await stub.FetchEmbeddings(
        sync_pb2.FetchEmbeddingsRequest(content_ids=["c0001"], encoding=encoding)
    )
    assert [i.embedding.encoding for i in page.items] == [encoding]


# ---- PublishRound numbers -----------------------------------------------------------------------

PUBLISH_CASES = {
    "epsilon": federation_pb2.PublishRoundRequest(round=1, epsilon=float("nan")),
    "cumulative_epsilon": federation_pb2.PublishRoundRequest(round=1, cumulative_epsilon=-1.0),
    "delta": federation_pb2.PublishRoundRequest(round=1, delta=2.0),
    "source_count": federation_pb2.PublishRoundRequest(
        round=1,
        patterns=[
            patterns_pb2.GlobalPattern(
                pattern_key="k",
                embedding=encode_embedding(unit(7)),
                context=viewing_pattern().context,
                source_count=2**31,
            )
        ],
    ),
    "quality": federation_pb2.PublishRoundRequest(
        round=1,
        patterns=[
            patterns_pb2.GlobalPattern(
                pattern_key="k",
                embedding=encode_embedding(unit(7)),
                context=viewing_pattern().context,
                quality=float("inf"),
            )
        ],
    ),
}


@pytest.mark.parametrize("field", sorted(PUBLISH_CASES))
async def test_publish_round_numbers_out_of_range_are_refused(
    field: str, federation: federation_pb2_grpc.FederationStub, database_url: str
) -> None:
    await unchanged(
        database_url, lambda: refused(federation.PublishRound(PUBLISH_CASES[field]), field)
    )


# ---- bytes that are not protobuf: INVALID_ARGUMENT, one log line, no stack trace ----------------


async def test_undecodable_requests_are_invalid_argument_without_a_stack_trace(
    shard: RunningServer, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    from structlog.testing import capture_logs

    garbage = b"\xff\xff\xff\xff"
    device = f"127.0.0.1:{shard.port}"
    internal = f"127.0.0.1:{shard.federation_port}"
    calls = [
        (device, "unary", "/omega.v1.ConstellationSync/SyncPatterns", "SyncPatternsRequest"),
        (device, "unary", "/omega.v1.ConstellationSync/ReportMetrics", "ReportMetricsRequest"),
        (device, "unary", "/grpc.health.v1.Health/Check", "HealthCheckRequest"),
        (
            device,
            "bidi",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            "ServerReflectionRequest",
        ),
        (internal, "unary", "/omega.v1.Federation/PublishRound", "PublishRoundRequest"),
        (internal, "stream", "/omega.v1.Federation/ExportPatterns", "ExportPatternsRequest"),
    ]
    before = await database_state(database_url)
    with capture_logs() as logs:
        for target, shape, path, message in calls:
            async with grpc.aio.insecure_channel(target) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    if shape == "unary":
                        await channel.unary_unary(path)(garbage)
                    elif shape == "stream":
                        async for _ in channel.unary_stream(path)(garbage):
                            pass
                    else:
                        async for _ in channel.stream_stream(path)(iter([garbage])):
                            pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
            assert err.value.details().startswith("request is not a valid "), path
            assert err.value.details().endswith(message), path
    assert await database_state(database_url) == before
    assert not [e for e in logs if e["log_level"] in ("error", "exception")]
    rejected = [e for e in logs if e["event"] == "rpc_rejected"]
    assert len(rejected) == len(calls)
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


async def test_health_watch_and_list_through_the_interceptors(shard: RunningServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{shard.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary("/grpc.health.v1.Health/List")(b"")
        # grpcio-health-checking's asyncio servicer does not implement List: UNIMPLEMENTED
        # (it raised NotImplementedError, which was INTERNAL with a stack trace).
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
