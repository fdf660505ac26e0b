"""Faults of the federation worker: killed between checkpoint and publish, a shard down.

Two in-process shards (real gRPC, real Postgres) and devices (real brains) that send model
updates; the worker runs the collaborative model only (its privacy ledger is every device's
whole privacy loss), either as its own process (``omega-federation run-once``) or in process.

The policy these tests pin down (worker.py):

* A round is checkpointed (``save_aggregated``: payload, marks, ledger already charged) before
  anything is published. The next run finds the checkpoint and re-publishes the SAME payload
  under the same round id; shards acknowledge a round they hold as a duplicate; the ledger is
  not charged again.
* A shard down while exporting: each RPC is tried ``rpc_attempts`` times, then the round fails
  with UnavailableError before any checkpoint: nothing is published anywhere, nothing is
  charged, no watermark moves. The next run does the round from scratch.
* A shard down while publishing: the other shards get the round, the checkpoint (and its
  charge) stays, the run fails; every later run re-publishes the checkpoint (and does no new
  round) until every shard has it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from omega.v1 import federation_pb2
from omega_brain import Brain, BrainConfig, CatalogIndex, GrpcTransport, ViewingEvent, fetch_catalog
from omega_common.errors import UnavailableError
from omega_constellation.server import RunningServer
from omega_federation.accounting import PrivacyLedger
from omega_federation.settings import FederationSettings
from omega_federation.state import WorkerState
from omega_federation.worker import run_round
from omega_protocol import shard_for

from .conftest import StartShard, write_catalog
from .fault_support import EPOCH_MS

pytestmark = pytest.mark.integration

SHARDS = ["shard-a", "shard-b"]
WORKER = Path(__file__).with_name("fault_worker.py")


@dataclass
class Shard:
    """One shard: its running server, database and the ports it restarts on."""

    shard_id: str
    dsn: str
    server: RunningServer

    @property
    def internal(self) -> str:
        return f"127.0.0.1:{self.server.federation_port}"


class Fixture:
    """Two shards, a fleet of brains, the worker's database."""

    def __init__(
        self,
        start_shard: StartShard,
        make_database: Callable[[], Awaitable[str]],
        tmp_path: Path,
    ) -> None:
        self._start_shard = start_shard
        self._make_database = make_database
        self.tmp_path = tmp_path
        self.catalog_path = tmp_path / "catalog.npz"
        self.shards: dict[str, Shard] = {}
        self.worker_dsn = ""
        self.brains: list[Brain] = []
        self._transports: list[GrpcTransport] = []

    async def start(self, devices: int = 8) -> None:
        write_catalog(self.catalog_path, n=40)
        for s in SHARDS:
            dsn = await self._make_database()
            self.shards[s] = Shard(s, dsn, await self._start(s, dsn))
        self.worker_dsn = await self._make_database()
        transports = {
            s: GrpcTransport(f"127.0.0.1:{shard.server.port}", plaintext=True)
            for s, shard in self.shards.items()
        }
        self._transports = list(transports.values())
        fetched = await asyncio.to_thread(fetch_catalog, transports["shard-a"])
        catalog = CatalogIndex(fetched.content_ids, fetched.embeddings)
        ids = list(fetched.content_ids)
        for i in range(devices):
            device = f"tv-fed-{i}"
            brain = Brain(
                device,
                BrainConfig(max_attempts=3, retry_budget_seconds=2.0, honour_sync_pace=False),
                transport=transports[shard_for(device, SHARDS)],
                catalog=catalog,
            )
            for n in range(4):
                content = ids[(i * 3 + n * 5) % len(ids)]
                brain.observe(ViewingEvent(content, EPOCH_MS + n * 60_000, completion=1.0))
            self.brains.append(brain)
        assert {shard_for(b.device_id, SHARDS) for b in self.brains} == set(SHARDS)

    async def _start(
        self, shard_id: str, dsn: str, port: int = 0, federation_port: int = 0
    ) -> RunningServer:
        return await self._start_shard(
            database_url=dsn,
            shard_id=shard_id,
            shard_ids=SHARDS,
            catalog_path=self.catalog_path,
            port=port,
            federation_port=federation_port,
        )

    async def stop_shard(self, shard_id: str) -> None:
        """Stop a shard's server (both listeners closed: connections are refused)."""
        await self.shards[shard_id].server.stop()

    async def restart_shard(self, shard_id: str) -> None:
        """Start the shard again on the same ports and database."""
        shard = self.shards[shard_id]
        shard.server = await self._start(
            shard_id, shard.dsn, shard.server.port, shard.server.federation_port
        )

    async def sync_all(self) -> None:
        def run() -> None:
            for brain in self.brains:
                result = brain.sync()
                assert result.ok, result.error

        await asyncio.to_thread(run)

    def env(self) -> dict[str, str]:
        """The worker's environment (plaintext: the shards run without TLS in process)."""
        return {
            "OMEGA_FEDERATION_SHARDS": json.dumps(
                {s: sh.internal for s, sh in self.shards.items()}
            ),
            "OMEGA_FEDERATION_DATABASE_URL": self.worker_dsn,
            "OMEGA_FEDERATION_PLAINTEXT": "true",
            "OMEGA_FEDERATION_SEED": "3",
            "OMEGA_FEDERATION_MODEL_FACTORS": "4",
            "OMEGA_FEDERATION_MODEL_ACTIVE_ITEMS": "30",
            "OMEGA_FEDERATION_RPC_TIMEOUT_SECONDS": "10",
            "OMEGA_FEDERATION_LOG_LEVEL": "WARNING",
        }

    def settings(self, **overrides: Any) -> FederationSettings:
        values: dict[str, Any] = {
            "shards": {s: sh.internal for s, sh in self.shards.items()},
            "plaintext": True,
            "seed": 3,
            "model_factors": 4,
            "model_active_items": 30,
            "rpc_timeout_seconds": 5.0,
            "rpc_attempts": 3,
        }
        values.update(overrides)
        return FederationSettings(**values)

    def close(self) -> None:
        for brain in self.brains:
            brain.close()
        for transport in self._transports:
            transport.close()


@pytest.fixture
async def fed(
    start_shard: StartShard, make_database: Callable[[], Awaitable[str]], tmp_path: Path
) -> AsyncIterator[Fixture]:
    fixture = Fixture(start_shard, make_database, tmp_path)
    try:
        await fixture.start()
        yield fixture
    finally:
        fixture.close()


async def run_worker(env: dict[str, str], script: Sequence[str]) -> tuple[int, str]:
    """Run the worker as its own process; returns (exit code, stdout). Killed past 120 s."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *script,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace")


RUN_ONCE = ("-m", "omega_federation", "run-once")


def report_of(output: str) -> dict[str, Any]:
    """The JSON report `run-once` prints last."""
    last = [line for line in output.splitlines() if line.startswith('{"round_id"')][-1]
    parsed: dict[str, Any] = json.loads(last)
    return parsed


@dataclass(frozen=True)
class Checkpoint:
    """One row of the worker's ``federation_rounds``."""

    round_id: int
    status: str
    payload: bytes
    figures: dict[str, Any]
    model: dict[str, Any]


async def worker_rounds(dsn: str) -> list[Checkpoint]:
    """Every round the worker checkpointed, in order (read with SQL)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT round_id, status, payload, figures::text, model::text FROM federation_rounds"
            " ORDER BY round_id"
        )
    finally:
        await conn.close()
    return [
        Checkpoint(
            r["round_id"],
            r["status"],
            bytes(r["payload"]),
            json.loads(r["figures"]),
            json.loads(r["model"]),
        )
        for r in rows
    ]


def ledger(record: Checkpoint) -> tuple[float, list[int]]:
    """(cumulative epsilon, round ids charged) of the model ledger checkpointed with a round."""
    data = record.model.get("ledger")
    if data is None:
        return 0.0, []
    restored = PrivacyLedger.from_dict(data)
    return restored.epsilon, list(restored.round_ids)


async def shard_rounds(dsn: str) -> dict[str, Any]:
    """What a shard's database holds of the published rounds and the model."""
    conn = await asyncpg.connect(dsn)
    try:
        rounds = [
            dict(r)
            for r in await conn.fetch(
                "SELECT round, trending, model_rows, model_factors, noise_multiplier, epsilon,"
                " cumulative_epsilon FROM published_rounds ORDER BY round"
            )
        ]
        state = {
            r["key"]: r["value"] for r in await conn.fetch("SELECT key, value FROM shard_state")
        }
        factors = {
            r["content_id"]: (bytes(r["factor"]), float(r["factor_scale"]), r["model_version"])
            for r in await conn.fetch(
                "SELECT content_id, factor, factor_scale, model_version FROM item_factors"
                " WHERE factor IS NOT NULL"
            )
        }
        trending = {
            r["content_id"]: float(r["score"])
            for r in await conn.fetch("SELECT content_id, score FROM trending")
        }
        updates = int(await conn.fetchval("SELECT count(*) FROM model_updates"))
    finally:
        await conn.close()
    return {
        "rounds": rounds,
        "global_version": int(state.get("global_version", 0)),
        "model_version": int(state.get("model_version", 0)),
        "factors": factors,
        "trending": trending,
        "model_updates": updates,
    }


def assert_holds_payload(shard: dict[str, Any], payload: bytes) -> None:
    """The shard stored exactly what the checkpointed PublishRoundRequest carries, once."""
    request = federation_pb2.PublishRoundRequest.FromString(payload)
    mine = [r for r in shard["rounds"] if r["round"] == request.round]
    assert len(mine) == 1, shard["rounds"]
    assert mine[0]["model_rows"] == len(request.item_factors)
    assert mine[0]["noise_multiplier"] == pytest.approx(request.noise_multiplier)
    assert shard["global_version"] == request.round == shard["model_version"]
    published = {
        row.content_id: (row.factor.data, row.factor.scale)
        for row in request.item_factors
        if row.HasField("factor")
    }
    stored = {
        c: (codes, scale)
        for c, (codes, scale, version) in shard["factors"].items()
        if version == request.round
    }
    assert stored.keys() == published.keys()
    for c, (codes, scale) in published.items():
        assert stored[c][0] == codes and stored[c][1] == pytest.approx(scale), c
    assert shard["trending"] == pytest.approx({t.content_id: t.score for t in request.trending})


@pytest.mark.timeout(240)
async def test_worker_killed_between_checkpoint_and_publish_resumes_the_same_round_once(
    fed: Fixture,
) -> None:
    started = time.monotonic()
    env = fed.env()
    # Round 1 (creates the model) runs normally: the ledger holds one release.
    await fed.sync_all()
    code, out = await run_worker(env, RUN_ONCE)
    assert code == 0, out
    assert report_of(out)["status"] == "published" and report_of(out)["round_id"] == 1
    eps_before, charged = ledger((await worker_rounds(fed.worker_dsn))[-1])
    assert charged == [1] and eps_before > 0
    # Devices fetch model 1, then send their updates against it (a step's inputs).
    await fed.sync_all()
    await fed.sync_all()

    # Round 2: the worker process is SIGKILLed right after its checkpoint committed.
    code, out = await run_worker(env, (str(WORKER),))
    assert code == -signal.SIGKILL, out
    records = await worker_rounds(fed.worker_dsn)
    crashed = records[-1]
    assert (crashed.round_id, crashed.status) == (2, "aggregated")
    eps_checkpoint, charged = ledger(crashed)
    assert charged == [1, 2] and eps_checkpoint > eps_before
    for shard in fed.shards.values():  # nothing of round 2 reached any shard
        held = await shard_rounds(shard.dsn)
        assert held["global_version"] == 1 and [r["round"] for r in held["rounds"]] == [1]
        assert held["model_updates"] > 0  # the round's inputs were not consumed

    # The next run resumes: the same round, the same payload, published once, charged once.
    code, out = await run_worker(env, RUN_ONCE)
    assert code == 0, out
    resumed = report_of(out)
    assert (resumed["status"], resumed["round_id"]) == ("resumed", 2)
    records = await worker_rounds(fed.worker_dsn)
    assert [r.round_id for r in records] == [1, 2]
    after = records[-1]
    assert after.status == "published" and after.figures.get("resumed") is True
    assert after.payload == crashed.payload  # the same bytes, not a recomputed round
    assert after.model == crashed.model
    assert ledger(after) == (eps_checkpoint, [1, 2])
    for shard in fed.shards.values():
        assert_holds_payload(await shard_rounds(shard.dsn), crashed.payload)

    # A later round starts from that ledger: nothing new to learn, nothing charged.
    code, out = await run_worker(env, RUN_ONCE)
    assert code == 0, out
    assert report_of(out)["round_id"] == 3
    assert ledger((await worker_rounds(fed.worker_dsn))[-1]) == (eps_checkpoint, [1, 2])
    # Devices get the resumed round's model.
    await fed.sync_all()
    assert {b.stats().model_version for b in fed.brains} == {2}
    print(
        f"\nworker crash: epsilon before {eps_before:.4f}, at checkpoint {eps_checkpoint:.4f},"
        f" after resume {ledger(after)[0]:.4f}; payload {len(crashed.payload)} bytes;"
        f" {time.monotonic() - started:.1f} s"
    )


class _Unavailable(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Answers every call UNAVAILABLE (a shard whose replica cannot serve) and counts them."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        self.calls.append(details.method)

        async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "shard down")
            raise AssertionError("unreachable")

        if details.method.endswith("ExportPatterns"):
            return grpc.unary_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)


@asynccontextmanager
async def refusing_server(port: int) -> AsyncIterator[_Unavailable]:
    """A gRPC server on ``port`` that answers UNAVAILABLE to everything."""
    refuser = _Unavailable()
    server = grpc.aio.server(interceptors=[refuser])
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    await server.start()
    try:
        yield refuser
    finally:
        await server.stop(0)


@contextmanager
def elapsed() -> Iterator[list[float]]:
    box: list[float] = []
    started = time.monotonic()
    try:
        yield box
    finally:
        box.append(time.monotonic() - started)


async def one_round(fed: Fixture, state: WorkerState, **overrides: Any) -> Any:
    """`run_round` with fresh channels (as a new worker process would open them)."""
    settings = fed.settings(**overrides)
    channels = {s: grpc.aio.insecure_channel(a) for s, a in settings.shards.items()}
    try:
        return await run_round(settings, state, channels)
    finally:
        for channel in channels.values():
            await channel.close()


@pytest.mark.timeout(180)
async def test_shard_down_during_a_round_fails_it_cleanly_then_a_later_round_succeeds(
    fed: Fixture,
) -> None:
    await fed.sync_all()
    state = await WorkerState.open(fed.worker_dsn)
    try:
        # 1. shard-b down while exporting: rpc_attempts tries, then the round fails before any
        #    checkpoint: nothing published, nothing charged.
        port = fed.shards["shard-b"].server.federation_port
        await fed.stop_shard("shard-b")
        async with refusing_server(port) as refuser:
            with elapsed() as took, pytest.raises(UnavailableError, match="shard-b"):
                await one_round(fed, state, rpc_attempts=3)
        exports = [m for m in refuser.calls if m.endswith("/ExportPatterns")]
        assert len(exports) == 3, refuser.calls
        assert await state.latest() is None  # no checkpoint, so no ledger charge
        for shard in fed.shards.values():
            held = await shard_rounds(shard.dsn)
            assert held["rounds"] == [] and held["global_version"] == 0
        # The same with the port closed (connection refused), one attempt.
        with pytest.raises(UnavailableError, match="shard-b"):
            await one_round(fed, state, rpc_attempts=1)
        assert await state.latest() is None

        # 2. shard-b back: the next round is round 1, published everywhere, charged once.
        await fed.restart_shard("shard-b")
        report = await one_round(fed, state)
        assert (report.status, report.round_id) == ("published", 1)
        assert ledger((await worker_rounds(fed.worker_dsn))[-1])[1] == [1]
        for shard in fed.shards.values():
            assert (await shard_rounds(shard.dsn))["global_version"] == 1

        # 3. shard-b down between the checkpoint and the publish (round 2).
        await fed.sync_all()
        await fed.sync_all()

        class ShardDiesAfterCheckpoint(WorkerState):
            async def save_aggregated(self, *args: Any, **kwargs: Any) -> None:
                await super().save_aggregated(*args, **kwargs)
                await fed.stop_shard("shard-b")

        dying = await ShardDiesAfterCheckpoint.open(fed.worker_dsn)
        try:
            with pytest.raises(UnavailableError, match="publish to shard-b"):
                await one_round(fed, dying)
        finally:
            await dying.close()
        checkpoint = (await worker_rounds(fed.worker_dsn))[-1]
        assert (checkpoint.round_id, checkpoint.status) == (2, "aggregated")
        eps, charged = ledger(checkpoint)
        assert charged == [1, 2]
        held_a = await shard_rounds(fed.shards["shard-a"].dsn)
        held_b = await shard_rounds(fed.shards["shard-b"].dsn)
        assert held_a["global_version"] == 2 and held_b["global_version"] == 1  # partial
        # Still down: the run re-publishes the checkpoint (no new round) and fails again.
        with pytest.raises(UnavailableError, match="publish to shard-b"):
            await one_round(fed, state, rpc_attempts=1)
        assert [(r.round_id, r.status) for r in await worker_rounds(fed.worker_dsn)] == [
            (1, "published"),
            (2, "aggregated"),
        ]
        # Back: the checkpoint is resumed, shard-b gets the same round, nothing more charged.
        await fed.restart_shard("shard-b")
        report = await one_round(fed, state)
        assert (report.status, report.round_id) == ("resumed", 2)
        final = (await worker_rounds(fed.worker_dsn))[-1]
        assert final.status == "published" and ledger(final) == (eps, [1, 2])
        for shard in fed.shards.values():
            assert_holds_payload(await shard_rounds(shard.dsn), checkpoint.payload)
        report = await one_round(fed, state)
        assert (report.status, report.round_id) == ("published", 3)
        await fed.sync_all()
        assert {b.stats().model_version for b in fed.brains} == {2}
    finally:
        await state.close()
    print(f"\nshard down: export refused {len(exports)} times in {took[0]:.2f} s")
