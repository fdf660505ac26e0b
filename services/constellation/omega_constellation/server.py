"""Assemble and run one constellation replica: gRPC (aio), health, reflection, /metrics."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from omega.v1 import federation_pb2, sync_pb2
from omega_common.auth import AuthenticationError, TokenVerifier, token_from_metadata
from omega_common.db import embedded_postgres_dsn, with_database
from omega_common.grpc_auth import AuthInterceptor
from omega_common.grpc_server import (
    ServerInterceptor,
    add_health_and_reflection,
    serve_until_signal,
    set_serving,
)
from omega_common.load_control import KeyOf, LoadControlInterceptor, Metadata
from omega_common.logging import configure_logging
from omega_common.ratelimit import KeyedRateLimiter
from omega_common.readiness import DependencyWatcher
from omega_common.tls import ServerTls
from omega_constellation import metrics
from omega_constellation.pacing import SyncPacer
from omega_constellation.service import ConstellationService
from omega_constellation.servicers import ConstellationSyncServicer, FederationServicer
from omega_constellation.settings import ConstellationSettings
from omega_constellation.store import ShardStore

__all__ = ["RunningServer", "main_async", "resolve_database_url", "start_server"]

_log = structlog.get_logger(component="constellation")

_SYNC = sync_pb2.DESCRIPTOR.services_by_name["ConstellationSync"].full_name
_FEDERATION = federation_pb2.DESCRIPTOR.services_by_name["Federation"].full_name
DEVICE_SERVICES = (_SYNC,)
"""Services of the device listener."""
INTERNAL_SERVICES = (_FEDERATION, _SYNC)
"""Services of the internal listener; its service credential may only call `WORKER_METHODS`."""
WORKER_METHODS = (f"/{_FEDERATION}/", f"/{_SYNC}/FetchEmbeddings", f"/{_SYNC}/FetchModel")
"""What the federation worker's credential may call on the internal listener (FetchModel: it
reads the whole model from a shard to send it to a shard whose model is behind)."""
LIVENESS_SERVICE = "liveness"
"""Health service name of the probe listener that stays SERVING while the process answers
(Kubernetes liveness must not follow the database: an outage would restart every replica)."""
INTERNAL_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Receive limit of the internal listener (a whole model's publish fits several times over)."""


@dataclass
class RunningServer:
    """A started replica: its two listeners and what must be closed on stop.

    ``server`` / ``port`` / ``health`` are the device listener (ConstellationSync);
    ``federation_server`` / ``federation_port`` / ``federation_health`` the internal one
    (Federation, and FetchEmbeddings for the worker's catalog reads).
    """

    server: grpc.aio.Server
    port: int
    service: ConstellationService
    health: health.aio.HealthServicer
    federation_server: grpc.aio.Server
    federation_port: int
    federation_health: health.aio.HealthServicer
    readiness: DependencyWatcher | None = None
    """Probes the database and flips both listeners' health (started by `start_server`)."""
    probe_server: grpc.aio.Server | None = None
    """The plaintext health-only listener (``probe_port``), serving the device listener's
    health service; None when not configured."""
    probe_port: int = 0

    @property
    def healths(self) -> tuple[health.aio.HealthServicer, health.aio.HealthServicer]:
        """Both listeners' health services (readiness flips them together)."""
        return (self.health, self.federation_health)

    async def set_serving(self, serving: bool) -> None:
        """Mark both listeners SERVING or NOT_SERVING."""
        await set_serving(self.health, DEVICE_SERVICES, serving)
        await set_serving(self.federation_health, INTERNAL_SERVICES, serving)

    async def stop(self, grace_seconds: float = 0.0) -> None:
        """Stop serving (draining for ``grace_seconds``) and close the database pool."""
        if self.readiness is not None:
            await self.readiness.stop()
        await self.set_serving(False)
        await asyncio.gather(
            self.server.stop(grace_seconds), self.federation_server.stop(grace_seconds)
        )
        if self.probe_server is not None:
            await self.probe_server.stop(0)
        await self.service.close()


async def resolve_database_url(settings: ConstellationSettings) -> str:
    """The configured DSN, or a database on the embedded Postgres named after the shard."""
    if settings.database_url:
        return settings.database_url
    from omega_common.db import create_database

    admin = await asyncio.to_thread(embedded_postgres_dsn, "postgres")
    name = "omega_" + settings.shard_id.replace("-", "_").lower()
    await create_database(admin, name)
    return with_database(admin, name)


def _credentials(
    settings: ConstellationSettings,
) -> tuple[grpc.ServerCredentials | None, grpc.ServerCredentials | None]:
    """(device listener, internal listener) TLS credentials; None, None with ``plaintext``.

    The internal listener requires a client certificate signed by ``tls_ca_file``. Both follow
    a rotation of the files (`ServerTls`, checked every ``credentials_recheck_seconds``).
    """
    settings.require_tls_files("tls_cert_file", "tls_key_file", "tls_ca_file")
    if settings.plaintext:
        return None, None
    assert settings.tls_cert_file and settings.tls_key_file and settings.tls_ca_file
    files = ServerTls(
        settings.tls_cert_file,
        settings.tls_key_file,
        settings.tls_ca_file,
        recheck_seconds=settings.credentials_recheck_seconds,
        on_reload=lambda outcome: metrics.CREDENTIALS_RELOADED.labels("tls", outcome).inc(),
    )
    return files.credentials(), files.credentials(require_client_auth=True)


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    port = (
        server.add_insecure_port(address)
        if credentials is None
        else server.add_secure_port(address, credentials)
    )
    if port == 0:
        raise RuntimeError(f"cannot bind {address}")
    return int(port)


def device_rate_key(keys: TokenVerifier | None) -> KeyOf:
    """The rate-limit key of a device listener RPC: the calling device.

    With credentials (``keys``), the device id of the call's token, which `AuthInterceptor`
    verified just before (so every ConstellationSync call of a device shares its bucket,
    FetchModel and FetchEmbeddings included, whose requests name no device). Without, the
    request's ``device_id`` (SyncPatterns, ReportMetrics); calls naming no device, health and
    reflection are not limited.
    """

    def key_of(method: str, request: Any, metadata: Metadata) -> str | None:
        if not method.startswith(f"/{_SYNC}/"):
            return None
        if keys is not None:
            try:
                return keys.verify(token_from_metadata(metadata)).device_id
            except AuthenticationError:
                return None  # refused by AuthInterceptor already; never reached in practice
        device_id = getattr(request, "device_id", None)
        return device_id if isinstance(device_id, str) and device_id else None

    return key_of


def _load_control(
    settings: ConstellationSettings, keys: TokenVerifier | None
) -> LoadControlInterceptor:
    """The device listener's in-flight counter and per-device rate limit (see settings)."""
    limiter = (
        KeyedRateLimiter(
            settings.device_rate_per_second,
            settings.device_burst,
            settings.rate_limit_max_devices,
        )
        if settings.device_rate_per_second > 0
        else None
    )
    return LoadControlInterceptor(
        max_concurrent_rpcs=settings.max_concurrent_rpcs,
        limiter=limiter,
        key_of=device_rate_key(keys),
        metrics=metrics.LOAD,
    )


async def start_server(settings: ConstellationSettings) -> RunningServer:
    """Open the store, load the catalog, start both listeners.

    The device listener (``host:port``) serves ConstellationSync to devices holding a device
    token; the internal listener (``federation_host:federation_port``) serves Federation to
    the worker (mutual TLS and a service token). TLS unless ``plaintext``; credentials unless
    ``auth`` is false.

    Raises:
        ValueError: TLS files or fleet keys missing (see the settings); OSError / asyncpg
            errors when the database is unreachable; RuntimeError when a port cannot be bound.
    """
    device_tls, internal_tls = _credentials(settings)
    keys = (
        settings.token_verifier(
            lambda outcome: metrics.CREDENTIALS_RELOADED.labels("fleet_keys", outcome).inc()
        )
        if settings.auth
        else None
    )
    dsn = await resolve_database_url(settings)
    store = await ShardStore.open(
        dsn,
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
        timeout_seconds=settings.db_timeout_seconds,
    )
    service = ConstellationService(store, settings)
    try:
        await service.start()
        from omega.v1 import federation_pb2_grpc, sync_pb2_grpc

        device_interceptors: list[grpc.aio.ServerInterceptor] = [
            ServerInterceptor(metrics.RPC, shard_id=settings.shard_id)
        ]
        internal_interceptors: list[grpc.aio.ServerInterceptor] = [
            ServerInterceptor(metrics.RPC, shard_id=settings.shard_id, listener="internal")
        ]
        if keys is not None:
            device_interceptors.append(AuthInterceptor(keys, "device"))
            internal_interceptors.append(
                AuthInterceptor(
                    keys, "service", services=settings.federation_services, methods=WORKER_METHODS
                )
            )
        # Last: only authenticated RPCs are charged to a device's bucket, and the error
        # mapping (first) turns a refusal into RESOURCE_EXHAUSTED with retry trailers.
        load = _load_control(settings, keys)
        device_interceptors.append(load)
        server = grpc.aio.server(
            interceptors=device_interceptors,
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", settings.max_request_bytes),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.so_reuseport", 1),
                # gRPC core's backlog of calls the event loop has not taken yet: past the soft
                # limit new calls are dropped at random (random early detection), past the
                # hard one all; the client sees CANCELLED (measured: a 2,000/s burst on one
                # replica on 2 cores, README "Fleet simulator").
                ("grpc.server.max_pending_requests", settings.max_pending_calls),
                ("grpc.server.max_pending_requests_hard_limit", 3 * settings.max_pending_calls),
            ],
        )
        sync_servicer = ConstellationSyncServicer(service, pacer=SyncPacer(settings, load))
        sync_pb2_grpc.add_ConstellationSyncServicer_to_server(sync_servicer, server)
        health = add_health_and_reflection(server, DEVICE_SERVICES)
        port = _bind(server, f"{settings.host}:{settings.port}", device_tls)

        internal = grpc.aio.server(
            interceptors=internal_interceptors,
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
            options=[
                # A round's publish carries the whole model (100K items x 64 int8 factors
                # with 12-character ids is 9.5 MB): the internal listener takes large
                # messages, up to 64 MiB, the worker's own send limit. More only lets requests
                # hold more of the replica's memory: under 256 MiB, four 200 MiB requests (two
                # at a time) took it from 117 to 1,161 MiB, 438 MiB still held after; above
                # the limit a request is refused from its length prefix (+13 MiB peak).
                ("grpc.max_receive_message_length", INTERNAL_MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", 256 * 1024 * 1024),
                ("grpc.so_reuseport", 1),
            ],
        )
        federation_pb2_grpc.add_FederationServicer_to_server(FederationServicer(service), internal)
        sync_pb2_grpc.add_ConstellationSyncServicer_to_server(sync_servicer, internal)
        federation_health = add_health_and_reflection(internal, INTERNAL_SERVICES)
        federation_port = _bind(
            internal, f"{settings.federation_host}:{settings.federation_port}", internal_tls
        )
        await server.start()
        await internal.start()
        running = RunningServer(
            server, port, service, health, internal, federation_port, federation_health
        )
        await running.set_serving(True)
        if settings.probe_port is not None:
            probe = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
            health_pb2_grpc.add_HealthServicer_to_server(health, probe)
            await health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
            running.probe_port = _bind(probe, f"{settings.host}:{settings.probe_port}", None)
            await probe.start()
            running.probe_server = probe
        running.readiness = DependencyWatcher(
            store.ping,
            running.set_serving,
            interval_seconds=settings.db_probe_interval_seconds,
            timeout_seconds=settings.db_probe_timeout_seconds,
            name="database",
            gauge=metrics.DATABASE_UP,
        )
        running.readiness.start()
    except BaseException:
        await store.close()
        raise
    _log.info(
        "listening",
        shard_id=settings.shard_id,
        port=port,
        federation_port=federation_port,
        tls=not settings.plaintext,
        auth=settings.auth,
        catalog_items=len(service.catalog),
        global_version=service.global_view.version,
    )
    return running


async def main_async(settings: ConstellationSettings) -> None:
    """Run a replica until SIGTERM/SIGINT."""
    configure_logging(settings.log_level, json=settings.log_json)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.host)
    running = await start_server(settings)

    async def on_stop() -> None:
        if running.readiness is not None:
            await running.readiness.stop()  # or a probe could flip health back to SERVING
        await running.set_serving(False)

    try:
        await serve_until_signal(running.server, settings.grace_seconds, on_stop)
        await running.federation_server.stop(settings.grace_seconds)
        if running.probe_server is not None:
            await running.probe_server.stop(0)
    finally:
        if running.readiness is not None:
            await running.readiness.stop()  # idempotent; before the pool it probes closes
        await running.service.close()
        _log.info("stopped")
