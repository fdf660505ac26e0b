"""A round streams its export: each batch is aggregated as whole devices as it arrives. Batches
that split devices (batch size 2, three patterns per device) publish exactly what one batch does,
because the shard sends a device's patterns consecutively and the worker holds the last device
of each batch back until the next one shows where it ends."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from omega.v1 import patterns_pb2, sync_pb2_grpc
from omega_federation.settings import FederationSettings
from omega_federation.state import WorkerState
from omega_federation.worker import run_round
from omega_protocol import decode_payload, encode_embedding, encode_payload

from .conftest import StartShard, write_catalog

pytestmark = pytest.mark.integration

SLOTS = [
    patterns_pb2.TIME_SLOT_MORNING,
    patterns_pb2.TIME_SLOT_EVENING,
    patterns_pb2.TIME_SLOT_NIGHT,
]


def device_request(i: int) -> object:
    rng = np.random.default_rng(i)
    added = []
    for j, slot in enumerate(SLOTS):
        v = rng.standard_normal(384).astype(np.float32)
        added.append(
            patterns_pb2.ViewingPattern(
                pattern_id=f"p{j}",
                embedding=encode_embedding(v / np.linalg.norm(v)),
                success_rate=float(rng.uniform(0.85, 1.0)),
                sample_count=int(rng.integers(1, 30)),
                context=patterns_pb2.PatternContext(
                    time_slot=slot, day_type=patterns_pb2.DAY_TYPE_WEEKDAY
                ),
                created_at_ms=1_000,
                updated_at_ms=2_000,
            )
        )
    delta = patterns_pb2.PatternDelta(added=added, local_version=1)
    from omega.v1 import sync_pb2

    return sync_pb2.SyncPatternsRequest(
        device_id=f"tv-{i:03d}", local_version=1, delta=encode_payload(delta)
    )


async def published(
    start_shard: StartShard,
    make_database: Callable[[], Awaitable[str]],
    catalog: Path,
    batch_size: int,
) -> list[tuple[str, int, float, float, np.ndarray]]:
    server = await start_shard(
        database_url=await make_database(), catalog_path=catalog, max_global_patterns_per_sync=64
    )
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as device_channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.federation_port}") as channel,
    ):
        stub = sync_pb2_grpc.ConstellationSyncStub(device_channel)
        for i in range(40):
            assert (await stub.SyncPatterns(device_request(i))).acknowledged_version == 1
        settings = FederationSettings(
            shards={"shard-0": f"127.0.0.1:{server.federation_port}"},
            min_sources=3,
            min_success_rate=0.5,
            codebook_size=4,
            epsilon=float("inf"),  # clipping and the group cap, no noise: comparable
            clipping_norm=10.0,
            max_patterns_per_device=2,
            trend_noise_scale=0.0,
            seed=3,
            export_batch_size=batch_size,
            patterns_enabled=True,
        )
        state = await WorkerState.open(await make_database())
        try:
            report = await run_round(settings, state, {"shard-0": channel})
        finally:
            await state.close()
        assert report.status == "published" and report.exported_patterns == 120
        from omega.v1 import sync_pb2

        answer = await stub.SyncPatterns(
            sync_pb2.SyncPatternsRequest(
                device_id="tv-new",
                local_version=0,
                delta=encode_payload(patterns_pb2.PatternDelta(), compress=False),
            )
        )
    message = decode_payload(answer.global_patterns, patterns_pb2.GlobalPatterns)
    assert not answer.next_global_page_offset  # everything in one answer here
    return sorted(
        (
            p.pattern_key,
            p.source_count,
            p.quality,
            p.success_rate,
            np.frombuffer(p.embedding.data, dtype=np.int8).astype(np.float32) * p.embedding.scale,
        )
        for p in message.patterns
    )


async def test_a_round_split_into_tiny_batches_publishes_what_one_batch_does(
    start_shard: StartShard, make_database: Callable[[], Awaitable[str]], tmp_path: Path
) -> None:
    write_catalog(tmp_path / "catalog.npz")
    whole = await published(start_shard, make_database, tmp_path / "catalog.npz", 10_000)
    tiny = await published(start_shard, make_database, tmp_path / "catalog.npz", 2)
    assert len(whole) >= 3  # several groups pass k-anonymity
    assert [(k, n) for k, n, *_ in tiny] == [(k, n) for k, n, *_ in whole]
    for (_, _, q1, s1, e1), (_, _, q2, s2, e2) in zip(tiny, whole, strict=True):
        assert q1 == pytest.approx(q2, rel=1e-5) and s1 == pytest.approx(s2, rel=1e-5)
        assert np.allclose(e1, e2, atol=2e-3)  # int8 on the wire


async def test_the_watermark_is_the_latest_row_whatever_the_export_order(
    start_shard: StartShard, make_database: Callable[[], Awaitable[str]], tmp_path: Path
) -> None:
    # Rows are exported in device order: "tv-000" (stored last) comes before "tv-999"
    # (stored first). The next round must not export either again.
    import asyncio

    from omega.v1 import sync_pb2

    write_catalog(tmp_path / "catalog.npz")
    server = await start_shard(
        database_url=await make_database(), catalog_path=tmp_path / "catalog.npz"
    )
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as device_channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.federation_port}") as channel,
    ):
        stub = sync_pb2_grpc.ConstellationSyncStub(device_channel)
        for i, name in enumerate(("tv-999", "tv-000")):
            request = device_request(i)
            assert isinstance(request, sync_pb2.SyncPatternsRequest)
            request.device_id = name
            assert (await stub.SyncPatterns(request)).acknowledged_version == 1
            await asyncio.sleep(0.01)  # distinct stored_at_ms
        settings = FederationSettings(
            shards={"shard-0": f"127.0.0.1:{server.federation_port}"},
            min_sources=3,
            min_success_rate=0.5,
            codebook_size=2,
            epsilon=float("inf"),
            trend_noise_scale=0.0,
            seed=3,
            patterns_enabled=True,
        )
        state = await WorkerState.open(await make_database())
        try:
            first = await run_round(settings, state, {"shard-0": channel})
            again = await run_round(settings, state, {"shard-0": channel})
        finally:
            await state.close()
    assert first.exported_patterns == 6 and again.exported_patterns == 0
