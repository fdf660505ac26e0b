"""Certificate and fleet-key rotation while the processes run (no restart).

Real gRPC over loopback with real TLS: a shard started from certificate files picks up new
files (written like Kubernetes does, write-then-rename, or half-written like a manual ``cp``)
on new handshakes; the fleet keys file is re-read for token checks; the periodic federation
worker re-opens its channels when its TLS or token files change.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from omega.v1 import sync_pb2, sync_pb2_grpc
from omega_common.auth import FleetKeys, bearer
from omega_common.tls import DevPki, channel_credentials, dev_pki
from omega_constellation.server import RunningServer
from omega_federation.__main__ import ShardChannels
from omega_federation.settings import FederationSettings

from .conftest import StartShard, write_catalog

pytestmark = pytest.mark.integration

RECHECK = 0.2
"""credentials_recheck_seconds of the shards under test."""
S1 = base64.b64encode(b"1" * 32).decode()
S2 = base64.b64encode(b"2" * 32).decode()


def _swap(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically (write a sibling, rename over), as a Secret update does."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _reloads(what: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "omega_constellation_credentials_reloaded_total", {"what": what, "outcome": outcome}
    )
    return value or 0.0


async def _health(port: int, credentials: grpc.ChannelCredentials) -> object:
    """SERVING (1) on a fresh channel, or the status code of the failure."""
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=3
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return reply.status


async def _eventually(check: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        if await check():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(RECHECK / 2)


@pytest.fixture
def pkis(tmp_path: Path) -> tuple[DevPki, DevPki]:
    """Two unrelated PKIs: the old CA and the new one."""
    return dev_pki(tmp_path / "old"), dev_pki(tmp_path / "new")


@pytest.fixture
def secret(tmp_path: Path, pkis: tuple[DevPki, DevPki]) -> Path:
    """A mounted-Secret-like folder holding the old server certificate, key and CA."""
    old, _ = pkis
    folder = tmp_path / "secret"
    folder.mkdir()
    for name, source in (("tls.crt", old.server_cert), ("tls.key", old.server_key)):
        _swap(folder / name, source.read_bytes())
    _swap(folder / "ca.crt", old.ca_cert.read_bytes())
    return folder


async def _tls_shard(start_shard: StartShard, database_url: str, secret: Path) -> RunningServer:
    return await start_shard(
        database_url=database_url,
        plaintext=False,
        tls_cert_file=secret / "tls.crt",
        tls_key_file=secret / "tls.key",
        tls_ca_file=secret / "ca.crt",
        credentials_recheck_seconds=RECHECK,
    )


async def test_a_new_certificate_is_served_without_restart(
    start_shard: StartShard, database_url: str, pkis: tuple[DevPki, DevPki], secret: Path
) -> None:
    old, new = pkis
    shard = await _tls_shard(start_shard, database_url, secret)
    trust_old, trust_new = channel_credentials(old.ca_cert), channel_credentials(new.ca_cert)
    assert await _health(shard.port, trust_old) == health_pb2.HealthCheckResponse.SERVING
    assert await _health(shard.port, trust_new) == grpc.StatusCode.UNAVAILABLE
    ok_before = _reloads("tls", "ok")
    async with grpc.aio.secure_channel(f"127.0.0.1:{shard.port}", trust_old) as kept:
        health = health_pb2_grpc.HealthStub(kept)
        await health.Check(health_pb2.HealthCheckRequest(), timeout=3)

        # cert-manager renews with a new CA: the certificate and key are swapped; the client CA
        # bundle (verifying the worker) keeps the old CA, which signed the worker's cert.
        _swap(secret / "tls.key", new.server_key.read_bytes())
        _swap(secret / "tls.crt", new.server_cert.read_bytes())

        async def new_ca_connects() -> bool:
            status = await _health(shard.port, trust_new)
            return bool(status == health_pb2.HealthCheckResponse.SERVING)

        assert await _eventually(new_ca_connects)
        assert await _health(shard.port, trust_old) == grpc.StatusCode.UNAVAILABLE
        # The internal listener (mutual TLS) serves the new certificate too.
        cert, key = old.client_certs["federation-worker"]
        worker_new = channel_credentials(new.ca_cert, cert, key)
        assert (
            await _health(shard.federation_port, worker_new)
            == health_pb2.HealthCheckResponse.SERVING
        )
        # The connection opened before the rotation is not dropped.
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=3)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert _reloads("tls", "ok") > ok_before


async def test_a_broken_certificate_set_is_refused_and_the_old_one_kept(
    start_shard: StartShard, database_url: str, pkis: tuple[DevPki, DevPki], secret: Path
) -> None:
    old, new = pkis
    shard = await _tls_shard(start_shard, database_url, secret)
    trust_old, trust_new = channel_credentials(old.ca_cert), channel_credentials(new.ca_cert)
    refused_before = _reloads("tls", "refused")

    # A key that is not the certificate's (the key was updated, the certificate not yet).
    _swap(secret / "tls.key", new.server_key.read_bytes())
    await asyncio.sleep(RECHECK * 2)
    for _ in range(3):  # several handshakes, several re-checks: refused (and counted) once
        assert await _health(shard.port, trust_old) == health_pb2.HealthCheckResponse.SERVING
        await asyncio.sleep(RECHECK)
    assert _reloads("tls", "refused") == refused_before + 1

    # A half-written certificate (a manual, non-atomic cp caught in the middle).
    pem = new.server_cert.read_bytes()
    (secret / "tls.crt").write_bytes(pem[: len(pem) // 2])
    await asyncio.sleep(RECHECK * 2)
    assert await _health(shard.port, trust_old) == health_pb2.HealthCheckResponse.SERVING
    assert await _health(shard.port, trust_new) == grpc.StatusCode.UNAVAILABLE
    assert _reloads("tls", "refused") == refused_before + 2

    # The copy completes: the new pair is consistent and taken.
    (secret / "tls.crt").write_bytes(pem)

    async def new_ca_connects() -> bool:
        status = await _health(shard.port, trust_new)
        return bool(status == health_pb2.HealthCheckResponse.SERVING)

    assert await _eventually(new_ca_connects)


async def test_fleet_keys_file_rotation(
    start_shard: StartShard, database_url: str, pkis: tuple[DevPki, DevPki], tmp_path: Path
) -> None:
    old, _ = pkis
    keys_file = tmp_path / "fleet-keys.json"
    _swap(keys_file, json.dumps({"k1": S1}).encode())
    write_catalog(tmp_path / "catalog.npz")
    shard = await start_shard(
        database_url=database_url,
        plaintext=False,
        auth=True,
        tls_cert_file=old.server_cert,
        tls_key_file=old.server_key,
        tls_ca_file=old.ca_cert,
        fleet_keys_file=keys_file,
        credentials_recheck_seconds=RECHECK,
        catalog_path=tmp_path / "catalog.npz",
    )
    both = FleetKeys.from_json(json.dumps({"k1": S1, "k2": S2}))
    token_k1, token_k2 = both.issue("tv-1", key_id="k1"), both.issue("tv-1", key_id="k2")
    page = sync_pb2.FetchEmbeddingsRequest(page_size=2)
    ok_before = _reloads("fleet_keys", "ok")
    refused_before = _reloads("fleet_keys", "refused")
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{shard.port}", channel_credentials(old.ca_cert)
    ) as channel:
        stub = sync_pb2_grpc.ConstellationSyncStub(channel)

        async def code(token: str) -> grpc.StatusCode:
            try:
                await stub.FetchEmbeddings(page, metadata=bearer(token), timeout=3)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        async def accepted(token: str) -> bool:
            return bool(await code(token) == grpc.StatusCode.OK)

        async def refused(token: str) -> bool:
            return bool(await code(token) == grpc.StatusCode.UNAUTHENTICATED)

        assert await accepted(token_k1)
        assert await refused(token_k2)

        # 1. Add k2 (it becomes the current key, listed last): both are accepted.
        _swap(keys_file, json.dumps({"k1": S1, "k2": S2}).encode())
        assert await _eventually(lambda: accepted(token_k2))
        assert await accepted(token_k1)
        assert _reloads("fleet_keys", "ok") == ok_before + 1

        # A broken file (not JSON, a secret too short) is refused; the keys in force stay.
        _swap(keys_file, b'{"k2": ')
        await asyncio.sleep(RECHECK * 2)
        assert await accepted(token_k2) and await accepted(token_k1)
        _swap(keys_file, json.dumps({"k2": base64.b64encode(b"x").decode()}).encode())
        await asyncio.sleep(RECHECK * 2)
        assert await accepted(token_k1)
        assert _reloads("fleet_keys", "refused") == refused_before + 2

        # 3. Remove k1: its tokens are refused with UNAUTHENTICATED, k2's still accepted.
        _swap(keys_file, json.dumps({"k2": S2}).encode())
        assert await _eventually(lambda: refused(token_k1))
        assert await accepted(token_k2)
        assert _reloads("fleet_keys", "ok") == ok_before + 2


async def test_worker_reopens_its_channels_when_its_files_change(
    start_shard: StartShard, database_url: str, pkis: tuple[DevPki, DevPki], tmp_path: Path
) -> None:
    old, new = pkis
    write_catalog(tmp_path / "catalog.npz")
    keys = FleetKeys.from_json(json.dumps({"k1": S1}))
    shard = await start_shard(
        database_url=database_url,
        plaintext=False,
        auth=True,
        tls_cert_file=old.server_cert,
        tls_key_file=old.server_key,
        tls_ca_file=old.ca_cert,
        fleet_keys=json.dumps({"k1": S1}),
        catalog_path=tmp_path / "catalog.npz",
    )
    files = tmp_path / "worker"
    files.mkdir()
    cert, key = old.client_certs["federation-worker"]
    _swap(files / "tls.crt", cert.read_bytes())
    _swap(files / "tls.key", key.read_bytes())
    _swap(files / "ca.crt", new.ca_cert.read_bytes())  # the wrong CA: handshakes fail
    other_fleet = FleetKeys({"k1": b"o" * 32}, "k1")
    _swap(files / "token", other_fleet.issue("service:federation-worker").encode())
    settings = FederationSettings(
        shards={"shard-0": f"127.0.0.1:{shard.federation_port}"},
        tls_ca_file=files / "ca.crt",
        tls_cert_file=files / "tls.crt",
        tls_key_file=files / "tls.key",
        service_token_file=files / "token",
    )
    worker = ShardChannels(settings)

    async def code() -> grpc.StatusCode:
        stub = sync_pb2_grpc.ConstellationSyncStub(worker.channels["shard-0"])
        try:
            await stub.FetchEmbeddings(sync_pb2.FetchEmbeddingsRequest(page_size=1), timeout=3)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    try:
        assert await code() == grpc.StatusCode.UNAVAILABLE
        first = worker.channels
        assert await worker.refresh() is first  # nothing changed: the same channels

        _swap(files / "ca.crt", old.ca_cert.read_bytes())  # the CA is fixed
        assert await worker.refresh() is not first
        assert await code() == grpc.StatusCode.UNAUTHENTICATED  # TLS passes, the token not

        second = worker.channels
        _swap(files / "token", b"")  # a broken token file: refused, channels kept
        assert await worker.refresh() is second
        _swap(files / "token", keys.issue("service:federation-worker").encode() + b"\n")
        assert await worker.refresh() is not second
        assert await code() == grpc.StatusCode.OK
    finally:
        await worker.close()
