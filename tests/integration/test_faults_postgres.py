"""Fault: the shard's Postgres is stopped and started again during a replay.

A private cluster (`private_postgres.PrivatePostgres`, fast shutdown: every session is cut)
backs two replica processes of one shard (TLS, device tokens). While a fleet of real brains
replays viewings the cluster goes down for a few seconds: syncs in the outage are answered
UNAVAILABLE, the brains retry by themselves (their retry budget spans the outage) and,
afterwards, nothing acknowledged is lost and nothing is applied twice
(`fault_support.check_fleet`).

The short variant runs in ``make test``; the long one (several outages) behind ``make chaos``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import write_catalog
from .fault_support import (
    Fleet,
    ShardProcesses,
    check_fleet,
    during,
    replay_with_faults,
    shard_catalog,
    summarize,
    wait_until,
)
from .private_postgres import PrivatePostgres, postgres_bin_dir

pytestmark = pytest.mark.integration

long_only = pytest.mark.skipif(
    not os.environ.get("OMEGA_CHAOS"), reason="long fault test: run with `make chaos`"
)


@pytest.fixture
async def cluster() -> AsyncIterator[PrivatePostgres]:
    """A started private cluster, destroyed afterwards (also when the test fails)."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("no Postgres binaries (system or pgserver) to run a private cluster")
    pg = await asyncio.to_thread(PrivatePostgres, bin_dir)
    try:
        await asyncio.to_thread(pg.start)
        yield pg
    finally:
        await asyncio.to_thread(pg.destroy)


def outage(
    pg: PrivatePostgres, fleet: Fleet, *, after_syncs: int, down_seconds: float
) -> dict[str, Any]:
    """Stop the cluster once ``after_syncs`` syncs are done, start it ``down_seconds`` later.

    Returns:
        The monotonic window (stop called, start returned) and its length in seconds.
    """
    wait_until(lambda: fleet.syncs_done >= after_syncs, 120, "replay progress")
    stopping = time.monotonic()
    pg.stop()
    time.sleep(down_seconds)
    pg.start()
    up = time.monotonic()
    return {"window": (stopping, up), "seconds_down": round(up - stopping, 2)}


async def run_outage_scenario(
    pg: PrivatePostgres,
    tmp_path: Path,
    *,
    devices: int,
    events: int,
    pace_seconds: float,
    outages: int,
) -> dict[str, Any]:
    write_catalog(tmp_path / "catalog.npz", n=60)
    started = time.monotonic()
    with ShardProcesses(tmp_path, pg.dsn, tmp_path / "catalog.npz", replicas=2) as shard:
        catalog = await asyncio.to_thread(shard_catalog, shard)
        fleet = Fleet(shard, catalog, tmp_path / "devices", devices, seed=2)
        try:
            faults = await replay_with_faults(
                fleet,
                events=events,
                pace_seconds=pace_seconds,
                faults=outages,
                inject=lambda k, after: outage(pg, fleet, after_syncs=after, down_seconds=3.0),
            )
            figures = summarize(fleet)
            overlaps = [during(fleet, f["window"]) for f in faults]
            finish = await asyncio.to_thread(fleet.finish)
        finally:
            fleet.close()
    assert all(r.ok for r in finish), [r.error for r in finish if not r.ok]
    checked = await check_fleet(pg.dsn, fleet.devices)
    report = {
        **figures,
        "outages": [
            {"seconds_down": f["seconds_down"], **d} for f, d in zip(faults, overlaps, strict=True)
        ],
        "devices_ok_afterwards": sum(r.ok for r in finish),
        "checked": checked,
        "seconds": round(time.monotonic() - started, 1),
    }
    print(f"\npostgres outage: {report}")
    return report


@pytest.mark.timeout(180)
async def test_postgres_outage_mid_replay_devices_recover_by_themselves(
    cluster: PrivatePostgres, tmp_path: Path
) -> None:
    report = await run_outage_scenario(
        cluster, tmp_path, devices=12, events=36, pace_seconds=0.25, outages=1
    )
    fault = report["outages"][0]
    assert fault["syncs_during_fault"] > 0  # the outage did hit the replay
    # The shards answered UNAVAILABLE during the outage (what the brains retry on) ...
    assert report["failed_attempts_by_code"].get("UNAVAILABLE", 0) > 0, report
    assert set(report["failed_attempts_by_code"]) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}, report
    # ... and the retry budget (~15 s) spans an outage of a few seconds.
    assert fault["syncs_during_fault_failed"] == 0, report


@pytest.mark.chaos
@long_only
@pytest.mark.timeout(600)
async def test_chaos_postgres_outages_repeatedly(cluster: PrivatePostgres, tmp_path: Path) -> None:
    report = await run_outage_scenario(
        cluster, tmp_path, devices=24, events=160, pace_seconds=0.3, outages=5
    )
    assert all(f["syncs_during_fault"] > 0 for f in report["outages"]), report
