"""Assemble and run one constellation replica: gRPC (aio), health, reflection, /metrics."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
import structlog
from grpc_health.v1 import health
from prometheus_client import start_http_server

from omega.v1 import federation_pb2, sync_pb2
from omega_common.db import embedded_postgres_dsn, with_database
from omega_common.grpc_server import (
    ServerInterceptor,
    add_health_and_reflection,
    serve_until_signal,
    set_serving,
)
from omega_common.logging import configure_logging
from omega_constellation import metrics
from omega_constellation.service import ConstellationService
from omega_constellation.servicers import ConstellationSyncServicer, FederationServicer
from omega_constellation.settings import ConstellationSettings
from omega_constellation.store import ShardStore

__all__ = ["RunningServer", "main_async", "resolve_database_url", "start_server"]

_log = structlog.get_logger(component="constellation")

SERVICE_NAMES = (
    sync_pb2.DESCRIPTOR.services_by_name["ConstellationSync"].full_name,
    federation_pb2.DESCRIPTOR.services_by_name["Federation"].full_name,
)


@dataclass
class RunningServer:
    """A started replica: its bound port and what must be closed on stop."""

    server: grpc.aio.Server
    port: int
    service: ConstellationService
    health: health.aio.HealthServicer

    async def stop(self, grace_seconds: float = 0.0) -> None:
        """Stop serving (draining for ``grace_seconds``) and close the database pool."""
        await set_serving(self.health, SERVICE_NAMES, False)
        await self.server.stop(grace_seconds)
        await self.service.store.close()


async def resolve_database_url(settings: ConstellationSettings) -> str:
    """The configured DSN, or a database on the embedded Postgres named after the shard."""
    if settings.database_url:
        return settings.database_url
    from omega_common.db import create_database

    admin = await asyncio.to_thread(embedded_postgres_dsn, "postgres")
    name = "omega_" + settings.shard_id.replace("-", "_").lower()
    await create_database(admin, name)
    return with_database(admin, name)


async def start_server(settings: ConstellationSettings) -> RunningServer:
    """Open the store, load the catalog, start gRPC on ``settings.host:port``.

    Raises:
        OSError / asyncpg errors when the database is unreachable; RuntimeError when the port
        cannot be bound.
    """
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
        server = grpc.aio.server(
            interceptors=[ServerInterceptor(metrics.RPC, shard_id=settings.shard_id)],
            options=[
                ("grpc.max_receive_message_length", settings.max_request_bytes),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.so_reuseport", 1),
            ],
        )
        from omega.v1 import federation_pb2_grpc, sync_pb2_grpc

        sync_pb2_grpc.add_ConstellationSyncServicer_to_server(
            ConstellationSyncServicer(service), server
        )
        federation_pb2_grpc.add_FederationServicer_to_server(FederationServicer(service), server)
        health = add_health_and_reflection(server, SERVICE_NAMES)
        port = server.add_insecure_port(f"{settings.host}:{settings.port}")
        if port == 0:
            raise RuntimeError(f"cannot bind {settings.host}:{settings.port}")
        await server.start()
        await set_serving(health, SERVICE_NAMES, True)
    except BaseException:
        await store.close()
        raise
    _log.info(
        "listening",
        shard_id=settings.shard_id,
        port=port,
        catalog_items=len(service.catalog),
        global_version=service.global_view.version,
    )
    return RunningServer(server, port, service, health)


async def main_async(settings: ConstellationSettings) -> None:
    """Run a replica until SIGTERM/SIGINT."""
    configure_logging(settings.log_level, json=settings.log_json)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.host)
    running = await start_server(settings)

    async def on_stop() -> None:
        await set_serving(running.health, SERVICE_NAMES, False)

    try:
        await serve_until_signal(running.server, settings.grace_seconds, on_stop)
    finally:
        await running.service.store.close()
        _log.info("stopped")
