"""After resharding: the devices that moved are redirected by their old shard, may still erase
what it holds (ForgetDevice), and `omega-constellation relinquish-moved` deletes their rows
there, batch by batch, leaving the devices it still owns untouched."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import grpc
import pytest

from omega.v1 import sync_pb2, sync_pb2_grpc
from omega_constellation.relinquish import relinquish_moved_devices
from omega_protocol import shard_for

from .conftest import StartShard, write_catalog
from .test_readiness import sync_request

pytestmark = pytest.mark.integration

OLD = ["shard-0"]
NEW = ["shard-0", "shard-1"]


def _devices() -> tuple[list[str], list[str]]:
    """Twelve device ids: (those shard-0 keeps, those that move to shard-1 under NEW)."""
    ids = [f"tv-{i:03d}" for i in range(40)]
    stay = [d for d in ids if shard_for(d, NEW) == "shard-0"][:6]
    move = [d for d in ids if shard_for(d, NEW) == "shard-1"][:6]
    assert len(stay) == len(move) == 6
    return stay, move


async def _device_ids(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return {r["device_id"] for r in await conn.fetch("SELECT device_id FROM devices")}
    finally:
        await conn.close()


async def test_moved_devices_are_redirected_forgettable_and_relinquished(
    start_shard: StartShard, database_url: str, tmp_path: Path
) -> None:
    catalog = tmp_path / "catalog.npz"
    write_catalog(catalog)
    stay, move = _devices()
    old = await start_shard(
        database_url=database_url, shard_id="shard-0", shard_ids=OLD, catalog_path=catalog
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{old.port}") as channel:
        stub = sync_pb2_grpc.ConstellationSyncStub(channel)
        for d in stay + move:
            answer = await stub.SyncPatterns(sync_request(d, 1))
            assert answer.acknowledged_version == 1 and not answer.redirect_shard_id
    await old.stop()
    assert await _device_ids(database_url) == set(stay + move)

    # The same database served with the new map: moved devices are redirected, and may erase.
    resharded = await start_shard(
        database_url=database_url, shard_id="shard-0", shard_ids=NEW, catalog_path=catalog
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{resharded.port}") as channel:
        stub = sync_pb2_grpc.ConstellationSyncStub(channel)
        answer = await stub.SyncPatterns(sync_request(move[0], 2))
        assert answer.redirect_shard_id == "shard-1"
        gone = await stub.ForgetDevice(sync_pb2.ForgetDeviceRequest(device_id=move[0]))
        assert gone.forgotten and gone.patterns_deleted == 1

    conn = await asyncpg.connect(database_url)
    try:
        with pytest.raises(ValueError, match="not in the shard ids"):
            await relinquish_moved_devices(conn, "shard-9", NEW)
        dry = await relinquish_moved_devices(conn, "shard-0", NEW, batch_size=4, dry_run=True)
        assert (dry.scanned, dry.moved, dry.patterns) == (11, 5, 5)
        assert await _device_ids(database_url) == set(stay + move[1:])
        done = await relinquish_moved_devices(conn, "shard-0", NEW, batch_size=4)
        assert (done.scanned, done.moved, done.patterns, done.by_owner) == (
            11,
            5,
            5,
            {"shard-1": 5},
        )
        again = await relinquish_moved_devices(conn, "shard-0", NEW)
        assert (again.scanned, again.moved) == (6, 0)
        left = await conn.fetch("SELECT DISTINCT device_id FROM device_patterns")
    finally:
        await conn.close()
    assert await _device_ids(database_url) == set(stay)
    assert {r["device_id"] for r in left} == set(stay)
