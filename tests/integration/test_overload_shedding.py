"""What devices see when a replica's event loop cannot take calls as fast as they come: gRPC
core holds at most ``max_pending_calls`` of them (random early drop past it, all past 3x) and
drops the rest before any handler runs, so the client gets CANCELLED. This is where the
CANCELLED statuses of an overloaded fleet run come from (README, "Fleet simulator"); the brain
retries them (`omega_brain.errors.RETRYABLE_STATUS_CODES`)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import grpc
import pytest

from omega.v1 import patterns_pb2, sync_pb2, sync_pb2_grpc
from omega_protocol import encode_payload
from tools.fuzz.shard import ShardProcess, admin_dsn

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

_CALLS = 400


async def _flood(target: str) -> Counter[str]:
    """``_CALLS`` pulls sent at once on one connection; their status names."""
    pull = patterns_pb2.PatternDelta()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = sync_pb2_grpc.ConstellationSyncStub(channel)
        await channel.channel_ready()

        async def one(i: int) -> str:
            request = sync_pb2.SyncPatternsRequest(
                device_id=f"flood-{i}", local_version=0, delta=encode_payload(pull)
            )
            try:
                await stub.SyncPatterns(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                return str(exc.code().name)
            return "OK"

        return Counter(await asyncio.gather(*(one(i) for i in range(_CALLS))))


@pytest.mark.parametrize(("max_pending", "cancelled"), [(1, True), (1000, False)])
async def test_a_burst_past_the_pending_bound_is_dropped_as_cancelled(
    tmp_path: Path, max_pending: int, cancelled: bool
) -> None:
    shard = await ShardProcess.start(
        await admin_dsn(),
        tmp_path,
        {
            "OMEGA_CONSTELLATION_MAX_PENDING_CALLS": str(max_pending),
            "OMEGA_CONSTELLATION_MAX_CONCURRENT_RPCS": "100000",  # only the backlog bound
        },
        auth=False,
    )
    try:
        codes = await _flood(shard.targets[0])
    finally:
        await shard.stop()
    print(max_pending, dict(codes))
    assert sum(codes.values()) == _CALLS
    assert set(codes) <= {"OK", "CANCELLED"}  # dropped before a handler: nothing else
    if cancelled:
        assert codes["CANCELLED"] > 0 and codes["OK"] > 0
    else:  # 400 calls never fill a backlog of 1,000: every one is answered
        assert codes["OK"] == _CALLS
