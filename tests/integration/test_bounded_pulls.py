"""Bounded pulls: no sync answer exceeds the shard's byte budget; global patterns that do not fit
arrive over the next syncs (best first), and the device adopts the version with the last part."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest

from omega.v1 import federation_pb2, federation_pb2_grpc, patterns_pb2, sync_pb2, sync_pb2_grpc
from omega_brain import Brain, BrainConfig, CatalogIndex, GrpcTransport, fetch_catalog
from omega_constellation.server import RunningServer
from omega_protocol import decode_payload, encode_embedding, encode_payload

pytestmark = pytest.mark.integration

BUDGET = 5120


def global_pattern(i: int, round_: int) -> patterns_pb2.GlobalPattern:
    rng = np.random.default_rng(i + 1000 * round_)
    v = rng.standard_normal(384).astype(np.float32)
    return patterns_pb2.GlobalPattern(
        pattern_key=f"r{round_}-k{i:03d}",
        embedding=encode_embedding(v / np.linalg.norm(v)),
        quality=0.4 * round_ - i / 1000,  # best first: k000, k001, ...; later rounds better
        source_count=5,
        success_rate=0.9,
        context=patterns_pb2.PatternContext(
            time_slot=patterns_pb2.TIME_SLOT_EVENING, day_type=patterns_pb2.DAY_TYPE_WEEKEND
        ),
        round=round_,
    )


async def publish(shard: RunningServer, round_: int, patterns: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{shard.federation_port}") as channel:
        await federation_pb2_grpc.FederationStub(channel).PublishRound(
            federation_pb2.PublishRoundRequest(
                round=round_,
                patterns=[global_pattern(i, round_) for i in range(patterns)],
                trending=[
                    patterns_pb2.TrendingContent(content_id=f"c{i:04d}", score=50.0 - i)
                    for i in range(50)
                ],
            )
        )


def pull(version: int, page_version: int = 0, offset: int = 0) -> sync_pb2.SyncPatternsRequest:
    return sync_pb2.SyncPatternsRequest(
        device_id="tv-raw",
        local_version=0,
        since_global_version=version,
        delta=encode_payload(patterns_pb2.PatternDelta(), compress=False),
        global_page_version=page_version,
        global_page_offset=offset,
    )


async def test_a_brain_gets_every_global_pattern_in_parts_under_the_budget(
    shard: RunningServer, tmp_path: Path
) -> None:
    await publish(shard, 1, 60)  # about 26 KB of patterns: six or seven parts
    transport = GrpcTransport(f"127.0.0.1:{shard.port}", plaintext=True)
    try:
        fetched = await asyncio.to_thread(fetch_catalog, transport)
        brain = Brain(
            "tv-parts",
            BrainConfig(store_path=tmp_path / "b.db", honour_sync_pace=False),
            transport=transport,
            catalog=CatalogIndex(fetched.content_ids, fetched.embeddings),
        )
        sizes, counts = [], []
        for _ in range(20):
            result = await asyncio.to_thread(brain.sync)
            assert result.ok, result.error
            sizes.append(result.bytes_down)
            stats = brain.stats()
            counts.append(stats.global_pattern_count)
            if stats.global_version == 1:
                break
            assert stats.trending_count == 50  # the trending list rides in every part
        brain.close()
    finally:
        transport.close()
    assert max(sizes) <= BUDGET
    assert 5 <= len(sizes) <= 10  # split, and every part makes progress
    assert counts == sorted(counts) and counts[-1] == 60
    assert counts[0] > 0  # the best patterns first, at once


async def test_a_transfer_restarts_when_a_new_round_arrives_mid_way(
    shard: RunningServer, stub: sync_pb2_grpc.ConstellationSyncStub
) -> None:
    await publish(shard, 1, 40)
    first = await stub.SyncPatterns(pull(0))
    assert first.ByteSize() <= BUDGET and first.global_version == 1
    offset = first.next_global_page_offset
    assert offset > 0
    keys = [
        p.pattern_key
        for p in decode_payload(first.global_patterns, patterns_pb2.GlobalPatterns).patterns
    ]
    assert keys == [f"r1-k{i:03d}" for i in range(offset)]  # best first
    second = await stub.SyncPatterns(pull(0, 1, offset))
    part = decode_payload(second.global_patterns, patterns_pb2.GlobalPatterns)
    assert part.patterns[0].pattern_key == f"r1-k{offset:03d}"  # continues where it stopped
    await publish(shard, 2, 10)
    restarted = await stub.SyncPatterns(pull(0, 1, second.next_global_page_offset))
    part = decode_payload(restarted.global_patterns, patterns_pb2.GlobalPatterns)
    assert restarted.global_version == 2
    # Version 2's transfer from its start (round 2's patterns are the best here).
    assert part.patterns[0].pattern_key == "r2-k000"
    # A made-up offset past the end: nothing left to send, the transfer is complete.
    done = await stub.SyncPatterns(pull(0, 2, 4000))
    assert done.next_global_page_offset == 0
    assert not decode_payload(done.global_patterns, patterns_pb2.GlobalPatterns).patterns
