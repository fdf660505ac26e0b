"""A shard with TLS and credentials on, as deployed: device tokens, mutual TLS to the worker.

Covers issue 6's takeover (another device's id), the forged round (PublishRound from the
device port or with a device's credential) and the closed internal listener.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import asyncpg
import grpc
import numpy as np
import pytest

from omega.v1 import federation_pb2, federation_pb2_grpc, patterns_pb2, sync_pb2, sync_pb2_grpc
from omega_brain import Brain, BrainConfig, GrpcTransport, ViewingEvent
from omega_common.auth import FleetKeys, bearer
from omega_common.tls import DevPki, channel_credentials, dev_pki
from omega_constellation.server import RunningServer
from omega_federation.__main__ import shard_channels
from omega_federation.settings import FederationSettings
from omega_federation.state import WorkerState
from omega_federation.worker import run_round

from .conftest import StartShard
from .test_constellation import count_rows, pattern, request

pytestmark = pytest.mark.integration

SECRET = base64.b64encode(b"s" * 32).decode()


@pytest.fixture
def pki(tmp_path: Path) -> DevPki:
    return dev_pki(tmp_path / "pki")


@pytest.fixture
def keys() -> FleetKeys:
    return FleetKeys.from_json(json.dumps({"k1": SECRET}))


@pytest.fixture
async def secure(
    start_shard: StartShard, database_url: str, pki: DevPki, tmp_path: Path
) -> RunningServer:
    from .conftest import write_catalog

    write_catalog(tmp_path / "catalog.npz")
    return await start_shard(
        database_url=database_url,
        plaintext=False,
        auth=True,
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_ca_file=pki.ca_cert,
        fleet_keys=json.dumps({"k1": SECRET}),
        catalog_path=tmp_path / "catalog.npz",
    )


def _device_channel(shard: RunningServer, pki: DevPki) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(f"127.0.0.1:{shard.port}", channel_credentials(pki.ca_cert))


def _worker_channel(shard: RunningServer, pki: DevPki, with_cert: bool = True) -> grpc.aio.Channel:
    cert, key = pki.client_certs["federation-worker"]
    credentials = (
        channel_credentials(pki.ca_cert, cert, key)
        if with_cert
        else channel_credentials(pki.ca_cert)
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{shard.federation_port}", credentials)


async def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value.code()


async def test_device_calls_need_their_own_credential(
    secure: RunningServer, pki: DevPki, keys: FleetKeys, database_url: str
) -> None:
    async with _device_channel(secure, pki) as channel:
        stub = sync_pb2_grpc.ConstellationSyncStub(channel)
        req = request("tv-1", 1, pattern("p1"), views=2)
        assert await _code(stub.SyncPatterns(req)) == grpc.StatusCode.UNAUTHENTICATED
        forged = keys.issue("tv-1")[:-3] + "AAA"
        assert (
            await _code(stub.SyncPatterns(req, metadata=bearer(forged)))
            == grpc.StatusCode.UNAUTHENTICATED
        )
        other = FleetKeys({"k1": b"x" * 32}, "k1").issue("tv-1")  # another fleet's secret
        assert (
            await _code(stub.SyncPatterns(req, metadata=bearer(other)))
            == grpc.StatusCode.UNAUTHENTICATED
        )
        mine = keys.issue("tv-2")
        assert (
            await _code(stub.SyncPatterns(req, metadata=bearer(mine)))
            == grpc.StatusCode.PERMISSION_DENIED
        )
        service = keys.issue("service:federation-worker")
        assert (
            await _code(stub.SyncPatterns(req, metadata=bearer(service)))
            == grpc.StatusCode.PERMISSION_DENIED
        )
        for table in ("devices", "device_patterns", "content_views"):
            assert await count_rows(database_url, table) == 0
        ok = await stub.SyncPatterns(req, metadata=bearer(keys.issue("tv-1")))
        assert ok.acknowledged_version == 1
        # Calls without a device id (catalog pages) need a valid device credential too.
        page = sync_pb2.FetchEmbeddingsRequest(page_size=5)
        assert await _code(stub.FetchEmbeddings(page)) == grpc.StatusCode.UNAUTHENTICATED
        fetched = await stub.FetchEmbeddings(page, metadata=bearer(mine))
        assert len(fetched.items) == 5


async def test_takeover_of_another_device_is_refused(
    secure: RunningServer, pki: DevPki, keys: FleetKeys, database_url: str
) -> None:
    async with _device_channel(secure, pki) as channel:
        stub = sync_pb2_grpc.ConstellationSyncStub(channel)
        victim = bearer(keys.issue("tv-victim"))
        await stub.SyncPatterns(request("tv-victim", 1, pattern("p1")), metadata=victim)
        # The attacker holds a valid token, for its own id, and claims the victim's.
        attack = request("tv-victim", 1)
        attack.local_version = 2**63 - 1
        attacker = bearer(keys.issue("tv-attacker"))
        assert (
            await _code(stub.SyncPatterns(attack, metadata=attacker))
            == grpc.StatusCode.PERMISSION_DENIED
        )
    conn = await asyncpg.connect(database_url)
    try:
        last = await conn.fetchval(
            "SELECT last_local_version FROM devices WHERE device_id = 'tv-victim'"
        )
        patterns = await conn.fetchval("SELECT count(*) FROM device_patterns")
    finally:
        await conn.close()
    assert last == 1 and patterns == 1


async def test_federation_api_is_closed_to_devices_and_strangers(
    secure: RunningServer, pki: DevPki, keys: FleetKeys
) -> None:
    forged_round = federation_pb2.PublishRoundRequest(round=2**63 - 1)
    async with _device_channel(secure, pki) as channel:  # the device port: no Federation
        call = federation_pb2_grpc.FederationStub(channel).PublishRound(
            forged_round, metadata=bearer(keys.issue("tv-1"))
        )
        assert await _code(call) == grpc.StatusCode.UNIMPLEMENTED
    async with _worker_channel(secure, pki, with_cert=False) as channel:  # no client cert
        call = federation_pb2_grpc.FederationStub(channel).PublishRound(
            forged_round, metadata=bearer(keys.issue("service:federation-worker")), timeout=5
        )
        assert await _code(call) == grpc.StatusCode.UNAVAILABLE
    async with _worker_channel(secure, pki) as channel:
        federation = federation_pb2_grpc.FederationStub(channel)
        assert await _code(federation.PublishRound(forged_round)) == grpc.StatusCode.UNAUTHENTICATED
        device = bearer(keys.issue("tv-1"))
        assert (
            await _code(federation.PublishRound(forged_round, metadata=device))
            == grpc.StatusCode.PERMISSION_DENIED
        )
        worker = bearer(keys.issue("service:federation-worker"))
        sync = sync_pb2_grpc.ConstellationSyncStub(channel)
        assert (
            await _code(sync.SyncPatterns(request("tv-1", 1), metadata=worker))
            == grpc.StatusCode.PERMISSION_DENIED
        )
        page = await sync.FetchEmbeddings(sync_pb2.FetchEmbeddingsRequest(), metadata=worker)
        assert len(page.items) > 0
        # The worker reads a shard's whole model to send it to a shard whose model is behind.
        model = await sync.FetchModel(sync_pb2.FetchModelRequest(), metadata=worker)
        assert model.model_version == 0 and not model.rows
    assert secure.service.global_view.version == 0


async def test_plaintext_client_cannot_talk_to_a_tls_shard(secure: RunningServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secure.port}") as channel:
        call = sync_pb2_grpc.ConstellationSyncStub(channel).FetchEmbeddings(
            sync_pb2.FetchEmbeddingsRequest(), timeout=5
        )
        assert await _code(call) == grpc.StatusCode.UNAVAILABLE


async def test_brain_and_worker_over_tls_with_credentials(
    secure: RunningServer,
    pki: DevPki,
    keys: FleetKeys,
    make_database: object,
    tmp_path: Path,
) -> None:
    transport = GrpcTransport(
        f"127.0.0.1:{secure.port}",
        credential=keys.issue("tv-tls"),
        root_certificates=pki.ca_cert.read_bytes(),
    )
    brain = Brain("tv-tls", BrainConfig(store_path=tmp_path / "tv.db"), transport=transport)
    try:
        await asyncio.to_thread(brain.fetch_catalog)
        for n in range(5):
            brain.observe(ViewingEvent(f"c{n:04d}", 1_795_300_000_000 + n * 60_000, 0.95))
        result = await asyncio.to_thread(brain.sync)
        assert result.ok, result.error
    finally:
        brain.close()
        transport.close()
    cert, key = pki.client_certs["federation-worker"]
    settings = FederationSettings(
        shards={"shard-0": f"127.0.0.1:{secure.federation_port}"},
        tls_ca_file=pki.ca_cert,
        tls_cert_file=cert,
        tls_key_file=key,
        service_token=keys.issue("service:federation-worker"),
        min_sources=1,
        model_factors=2,
        model_noise_multiplier=0.0,
    )
    channels = shard_channels(settings)
    state = await WorkerState.open(await make_database())  # type: ignore[operator]
    try:
        report = await run_round(settings, state, channels)
    finally:
        await state.close()
        for channel in channels.values():
            await channel.close()
    assert report.status == "published"
    assert report.model["model_action"] == "created"
    assert secure.service.global_view.version == report.round_id


async def test_shard_refuses_to_start_without_tls_or_keys(
    start_shard: StartShard, database_url: str, pki: DevPki
) -> None:
    with pytest.raises(ValueError, match="TLS needs"):
        await start_shard(database_url=database_url, plaintext=False)
    with pytest.raises(ValueError, match="FLEET_KEYS"):
        await start_shard(database_url=database_url, auth=True)


async def test_forget_device_deletes_everything_it_owns_in_one_go(
    secure: RunningServer, pki: DevPki, keys: FleetKeys, database_url: str
) -> None:
    async with _device_channel(secure, pki) as channel:
        stub = sync_pb2_grpc.ConstellationSyncStub(channel)
        for device in ("tv-gone", "tv-stays"):
            await stub.SyncPatterns(
                request(device, 1, pattern("p1"), pattern("p2", seed=2)),
                metadata=bearer(keys.issue(device)),
            )
        forget = sync_pb2.ForgetDeviceRequest(device_id="tv-gone")
        # Only the device's own credential may erase it.
        assert (
            await _code(stub.ForgetDevice(forget, metadata=bearer(keys.issue("tv-stays"))))
            == grpc.StatusCode.PERMISSION_DENIED
        )
        assert await _code(stub.ForgetDevice(forget)) == grpc.StatusCode.UNAUTHENTICATED
        mine = bearer(keys.issue("tv-gone"))
        done = await stub.ForgetDevice(forget, metadata=mine)
        assert done.forgotten and done.patterns_deleted == 2
        again = await stub.ForgetDevice(forget, metadata=mine)
        assert not again.forgotten and again.patterns_deleted == 0
    conn = await asyncpg.connect(database_url)
    try:
        left = await conn.fetch("SELECT DISTINCT device_id FROM device_patterns")
        devices = await conn.fetch("SELECT device_id FROM devices")
    finally:
        await conn.close()
    assert [r["device_id"] for r in left] == ["tv-stays"]
    assert [r["device_id"] for r in devices] == ["tv-stays"]


async def test_factory_reset_then_forget_over_tls(
    secure: RunningServer, pki: DevPki, keys: FleetKeys, database_url: str, tmp_path: Path
) -> None:
    def brain(store: str) -> tuple[Brain, GrpcTransport]:
        transport = GrpcTransport(
            f"127.0.0.1:{secure.port}",
            credential=keys.issue("tv-reset"),
            root_certificates=pki.ca_cert.read_bytes(),
        )
        return Brain("tv-reset", BrainConfig(store_path=tmp_path / store), transport=transport), (
            transport
        )

    async def server_state() -> tuple[int | None, int]:
        conn = await asyncpg.connect(database_url)
        try:
            last = await conn.fetchval(
                "SELECT last_local_version FROM devices WHERE device_id = 'tv-reset'"
            )
            patterns = await conn.fetchval(
                "SELECT count(*) FROM device_patterns WHERE device_id = 'tv-reset'"
            )
        finally:
            await conn.close()
        return last, int(patterns)

    old, transport = brain("old.db")
    try:
        await asyncio.to_thread(old.fetch_catalog)
        for n in range(6):  # evening viewings: one pattern
            old.observe(ViewingEvent(f"c{n:04d}", 1_795_300_000_000 + n * 60_000, 0.95))
        assert (await asyncio.to_thread(old.sync)).ok
    finally:
        old.close()
        transport.close()
    last_before, patterns_before = await server_state()
    assert last_before == 6 and patterns_before == 1

    # Factory reset: same id, a new store. Its morning viewings must reach the shard.
    new, transport = brain("new.db")
    try:
        await asyncio.to_thread(new.fetch_catalog)
        for n in range(3):
            new.observe(ViewingEvent(f"c{n + 10:04d}", 1_795_250_000_000 + n * 60_000, 0.95))
        result = await asyncio.to_thread(new.sync)
        assert result.ok, result.error
        assert result.acknowledged_version == 7 and result.patterns_sent == 1
        last_after, patterns_after = await server_state()
        assert last_after == 7 and patterns_after == 2  # the new pattern beside the old one

        # Right to be forgotten: the shard's rows, then the device's own data.
        assert await asyncio.to_thread(new.forget)
        assert await server_state() == (None, 0)
        stats = new.stats()
        assert (stats.local_version, stats.acked_version, stats.pattern_count) == (0, 0, 0)
        assert new.catalog is not None and len(new.catalog) == 50  # server data is kept
        for n in range(3):  # a new life: versions start again at 1
            new.observe(ViewingEvent(f"c{n + 20:04d}", 1_795_300_000_000 + n * 60_000, 0.95))
        assert (await asyncio.to_thread(new.sync)).ok
        assert await server_state() == (3, 1)
    finally:
        new.close()
        transport.close()


async def test_publish_round_is_bounded_even_for_the_worker(
    start_shard: StartShard, database_url: str
) -> None:
    from omega_protocol import encode_embedding

    shard = await start_shard(
        database_url=database_url, min_published_sources=5, max_published_trending=3
    )
    unit = np.zeros(384, dtype=np.float32)
    unit[0] = 1.0

    def pattern(sources: int) -> patterns_pb2.GlobalPattern:
        return patterns_pb2.GlobalPattern(
            pattern_key="0:1",
            embedding=encode_embedding(unit),
            quality=1.0,
            success_rate=0.9,
            source_count=sources,
            context=patterns_pb2.PatternContext(
                time_slot=patterns_pb2.TIME_SLOT_EVENING, day_type=patterns_pb2.DAY_TYPE_WEEKDAY
            ),
        )

    async with grpc.aio.insecure_channel(f"127.0.0.1:{shard.federation_port}") as channel:
        federation = federation_pb2_grpc.FederationStub(channel)
        refused = [
            federation_pb2.PublishRoundRequest(round=2**62),  # would make later rounds dups
            federation_pb2.PublishRoundRequest(round=1, patterns=[pattern(4)]),  # k = 5
            federation_pb2.PublishRoundRequest(
                round=1,
                trending=[
                    patterns_pb2.TrendingContent(content_id=f"c{i}", score=1.0) for i in range(4)
                ],
            ),
            federation_pb2.PublishRoundRequest(round=1, epsilon=float("nan")),
            federation_pb2.PublishRoundRequest(round=1, delta=-1.0),
        ]
        for request in refused:
            assert await _code(federation.PublishRound(request)) == (
                grpc.StatusCode.INVALID_ARGUMENT
            )
        assert shard.service.global_view.version == 0
        ok = await federation.PublishRound(
            federation_pb2.PublishRoundRequest(round=1, patterns=[pattern(5)])
        )
        assert ok.global_version == 1 and shard.service.global_view.version == 1


async def test_a_shard_added_late_takes_the_fleets_round_then_steps(
    start_shard: StartShard, database_url: str
) -> None:
    # A shard added when the fleet is at round 5,000 (max_round_step 1,000) takes that round;
    # from there the step bound holds; an absurd first round is still refused.
    shard = await start_shard(database_url=database_url, max_round_step=1_000)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{shard.federation_port}") as channel:
        federation = federation_pb2_grpc.FederationStub(channel)
        assert await _code(
            federation.PublishRound(federation_pb2.PublishRoundRequest(round=2**53 + 1))
        ) == (grpc.StatusCode.INVALID_ARGUMENT)
        first = await federation.PublishRound(federation_pb2.PublishRoundRequest(round=5_000))
        assert first.global_version == 5_000 and not first.duplicate
        assert await _code(
            federation.PublishRound(federation_pb2.PublishRoundRequest(round=7_000))
        ) == (grpc.StatusCode.INVALID_ARGUMENT)
        step = await federation.PublishRound(federation_pb2.PublishRoundRequest(round=5_001))
        assert step.global_version == 5_001
