"""A shard whose model is behind gets the whole model: real gRPC, real Postgres, no mocks.

Model rows only travel with the rounds that change the model. Two shards train a model until
its privacy budget is spent; a third shard (a fresh database) joins: the next round sends it
the whole model at the same version (PublishModelSnapshot), after which it serves exactly the
rows the others do, and later rounds send nothing. At the store: a snapshot never moves a
shard's model backwards and makes the stored model equal to it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from omega.v1 import federation_pb2, federation_pb2_grpc, patterns_pb2, sync_pb2_grpc
from omega_constellation.server import RunningServer
from omega_federation import model_catchup
from omega_federation.accounting import PrivacyLedger, RoundMechanism
from omega_federation.settings import FederationSettings
from omega_federation.state import WorkerState
from omega_federation.worker import RoundReport, run_round
from omega_protocol import encode_embedding, shard_for

from .conftest import StartShard, write_catalog
from .test_model_sync import (
    FACTORS,
    factors_of,
    fetch_all,
    fetch_rows,
    publish_request,
    sync_request,
    update,
)

pytestmark = pytest.mark.integration

FIRST = ["shard-a", "shard-b"]
ALL = [*FIRST, "shard-c"]
NOISE = 1.0
DELTA = 1e-5


def two_releases_budget() -> float:
    """An epsilon budget that two model releases of multiplier NOISE fit and a third passes."""
    ledger = PrivacyLedger(DELTA)
    ledger.spend(RoundMechanism((NOISE,)), 1)
    two = ledger.spend(RoundMechanism((NOISE,)), 2)
    three = ledger.preview(RoundMechanism((NOISE,)))
    return (two + three) / 2


@dataclass
class Fleet:
    """Shards, the worker's channels to their internal listeners and its state."""

    servers: dict[str, RunningServer]
    channels: dict[str, grpc.aio.Channel]
    state: WorkerState
    settings: FederationSettings
    local_versions: dict[str, int] = field(default_factory=dict)

    async def round(self) -> RoundReport:
        report = await run_round(self.settings, self.state, self.channels)
        assert report.status == "published"
        return report

    async def sync_updates(self, model_version: int) -> None:
        """Every device sends a model update against ``model_version`` to its shard."""
        for i in range(8):
            device = f"tv-{i}"
            ids = (f"c{i:04d}", f"c{i + 8:04d}", f"c{i + 16:04d}")
            direction = [0.2] * FACTORS if model_version else None
            version = self.local_versions[device] = self.local_versions.get(device, 0) + 1
            address = f"127.0.0.1:{self.servers[shard_for(device, FIRST)].port}"
            async with grpc.aio.insecure_channel(address) as channel:
                response = await sync_pb2_grpc.ConstellationSyncStub(channel).SyncPatterns(
                    sync_request(device, version, update(ids, model_version, direction))
                )
            assert response.acknowledged_version == version

    async def join(
        self, shard_id: str, database_url: str, catalog: Path, start: StartShard
    ) -> None:
        """Start a shard on a fresh database and add it to the worker's shards."""
        server = await start(
            database_url=database_url, shard_id=shard_id, shard_ids=ALL, catalog_path=catalog
        )
        self.servers[shard_id] = server
        self.channels[shard_id] = grpc.aio.insecure_channel(f"127.0.0.1:{server.federation_port}")


@asynccontextmanager
async def trained_fleet(
    start_shard: StartShard, make_database: Callable[[], Awaitable[str]], catalog: Path
) -> AsyncIterator[Fleet]:
    """Two shards whose model was created, stepped once and then stopped changing (its
    budget is spent): version 2 on both."""
    write_catalog(catalog)
    servers = {
        s: await start_shard(
            database_url=await make_database(), shard_id=s, shard_ids=FIRST, catalog_path=catalog
        )
        for s in FIRST
    }
    assert {shard_for(f"tv-{i}", FIRST) for i in range(8)} == set(FIRST)
    channels = {
        s: grpc.aio.insecure_channel(f"127.0.0.1:{r.federation_port}") for s, r in servers.items()
    }
    settings = FederationSettings(
        shards={s: f"127.0.0.1:{r.federation_port}" for s, r in servers.items()},
        seed=1,
        patterns_enabled=False,
        model_factors=FACTORS,
        model_active_items=12,
        model_noise_multiplier=NOISE,
        model_delta=DELTA,
        model_epsilon_budget=two_releases_budget(),
    )
    fleet = Fleet(servers, channels, await WorkerState.open(await make_database()), settings)
    try:
        await fleet.sync_updates(0)
        assert (await fleet.round()).model["model_action"] == "created"
        await fleet.sync_updates(1)
        assert (await fleet.round()).model["model_action"] == "stepped"
        await fleet.sync_updates(2)
        spent = await fleet.round()
        assert spent.model["model_action"] == "skipped_budget"
        assert spent.model["model_version"] == 2 and spent.model["model_snapshots_sent"] == 0
        yield fleet
    finally:
        await fleet.state.close()
        for channel in fleet.channels.values():
            await channel.close()


async def whole_model(server: RunningServer) -> tuple[int, int, list[patterns_pb2.ItemFactorRow]]:
    """(model version, factors, every row) FetchModel serves from ``since_model_version=0``."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        pages, rows = await fetch_all(sync_pb2_grpc.ConstellationSyncStub(channel), since=0)
    assert len({(p.model_version, p.factors) for p in pages}) == 1
    return pages[0].model_version, pages[0].factors, rows


def snapshots(status: str) -> float:
    value = REGISTRY.get_sample_value("omega_federation_model_snapshots_total", {"status": status})
    return value or 0.0


async def test_a_shard_that_joins_after_the_model_stopped_changing_gets_it_whole(
    start_shard: StartShard, make_database: Callable[[], Awaitable[str]], tmp_path: Path
) -> None:
    async with trained_fleet(start_shard, make_database, tmp_path / "catalog.npz") as fleet:
        await fleet.join("shard-c", await make_database(), tmp_path / "catalog.npz", start_shard)
        sent_before = snapshots("sent")

        with capture_logs() as logs:
            joined = await fleet.round()
        sent = [e for e in logs if e["event"] == "model_snapshot_sent"]
        assert [(e["shard"], e["shard_version"], e["model_version"], e["rows"]) for e in sent] == [
            ("shard-c", 0, 2, 12)
        ]
        assert joined.model["model_action"] == "skipped_budget"  # the model did not change
        assert joined.model["model_version"] == 2
        assert joined.model["model_snapshots_sent"] == 1
        assert joined.model["model_snapshots_failed"] == 0
        assert joined.model["model_snapshot_shards"] == ["shard-c"]
        assert snapshots("sent") == sent_before + 1

        version, factors, rows = await whole_model(fleet.servers["shard-a"])
        assert (version, factors, len(rows)) == (2, FACTORS, 12)
        assert all(r.HasField("factor") for r in rows)
        for other in ("shard-b", "shard-c"):
            assert await whole_model(fleet.servers[other]) == (version, factors, rows), other
        assert fleet.servers["shard-c"].service.model.version == 2

        current = await fleet.round()  # every shard is current: nothing sent
        assert current.model["model_snapshots_sent"] == 0
        assert snapshots("sent") == sent_before + 1


async def test_a_failed_catch_up_keeps_the_round_and_is_retried_next_round(
    start_shard: StartShard,
    make_database: Callable[[], Awaitable[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with trained_fleet(start_shard, make_database, tmp_path / "catalog.npz") as fleet:
        await fleet.join("shard-c", await make_database(), tmp_path / "catalog.npz", start_shard)
        failed_before = snapshots("failed")
        monkeypatch.setattr(model_catchup, "MAX_SNAPSHOT_BYTES", 100)  # the model is larger

        refused = await fleet.round()  # published to every shard all the same
        assert refused.shards.keys() == set(ALL)
        assert refused.model["model_snapshots_sent"] == 0
        assert refused.model["model_snapshots_failed"] == 1
        assert snapshots("failed") == failed_before + 1
        version, _, rows = await whole_model(fleet.servers["shard-c"])
        assert version == 0 and rows == []
        assert fleet.servers["shard-c"].service.global_view.version == refused.round_id

        monkeypatch.undo()
        retried = await fleet.round()
        assert retried.model["model_snapshot_shards"] == ["shard-c"]
        assert await whole_model(fleet.servers["shard-c"]) == await whole_model(
            fleet.servers["shard-b"]
        )


# ---- the shard's side: PublishModelSnapshot ---------------------------------------------------


def snapshot_request(
    version: int, rows: dict[str, tuple[np.ndarray | None, int]]
) -> federation_pb2.PublishModelSnapshotRequest:
    """A snapshot of ``rows``: content id -> (factor or None when removed, row version)."""
    request = federation_pb2.PublishModelSnapshotRequest(model_version=version, factors=FACTORS)
    for cid, (vector, row_version) in rows.items():
        row = request.item_factors.add(content_id=cid, model_version=row_version)
        if vector is not None:
            row.factor.CopyFrom(encode_embedding(vector))
    return request


async def stored_model(database_url: str) -> dict[str, tuple[bytes | None, int]]:
    rows = await fetch_rows(
        database_url, "SELECT content_id, factor, model_version FROM item_factors"
    )
    return {
        r["content_id"]: (None if r["factor"] is None else bytes(r["factor"]), r["model_version"])
        for r in rows
    }


async def test_a_snapshot_replaces_stale_rows_and_never_moves_the_model_backwards(
    shard: RunningServer, database_url: str
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{shard.federation_port}") as channel:
        federation = federation_pb2_grpc.FederationStub(channel)
        first = factors_of(1, ["c0001", "c0002", "c0003"])
        await federation.PublishRound(publish_request(1, dict(first)))
        await federation.PublishRound(publish_request(2, dict(factors_of(2, ["c0002", "c0004"]))))
        answer = await federation.PublishRound(federation_pb2.PublishRoundRequest(round=3))
        assert answer.HasField("model_version") and answer.model_version == 2

        # An old backup's model (version 2) behind the fleet's version 3: c0001 is unchanged
        # (keeps version 1), c0002 changed at a version the shard already passed (so it gets 3,
        # or its devices at version 2 would miss it), c0003 left the model, c0004 is not in
        # the model any more, c0005 is new.
        newer = factors_of(3, ["c0002", "c0005"])
        snapshot = snapshot_request(
            3,
            {
                "c0001": (first["c0001"], 1),
                "c0002": (newer["c0002"], 2),
                "c0003": (None, 3),
                "c0005": (newer["c0005"], 3),
            },
        )
        applied = await federation.PublishModelSnapshot(snapshot)
        assert (applied.model_version, applied.applied, applied.rows_stored) == (3, True, 4)
        stored = await stored_model(database_url)
        assert {c: v for c, (_, v) in stored.items()} == {
            "c0001": 1,
            "c0002": 3,
            "c0003": 3,
            "c0004": 3,
            "c0005": 3,
        }
        assert stored["c0003"][0] is None and stored["c0004"][0] is None
        assert shard.service.model.version == 3

        # Repeated, or older than what the shard holds: acknowledged, nothing written.
        again = await federation.PublishModelSnapshot(snapshot)
        assert (again.model_version, again.applied, again.rows_stored) == (3, False, 0)
        older = snapshot_request(2, {"c0001": (np.ones(FACTORS, np.float32), 2)})
        stale = await federation.PublishModelSnapshot(older)
        assert (stale.model_version, stale.applied) == (3, False)
        assert await stored_model(database_url) == stored

        # A version above the shard's rounds, a row newer than its snapshot, no rows: refused.
        for bad in (
            snapshot_request(4, {"c0001": (first["c0001"], 1)}),
            snapshot_request(3, {"c0001": (first["c0001"], 4)}),
            federation_pb2.PublishModelSnapshotRequest(model_version=3, factors=FACTORS),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await federation.PublishModelSnapshot(bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert await stored_model(database_url) == stored
