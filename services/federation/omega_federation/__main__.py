"""``python -m omega_federation run-once|periodic``: the federation worker."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from dataclasses import asdict

import grpc
from prometheus_client import start_http_server

from omega_common.db import create_database, embedded_postgres_dsn, with_database
from omega_common.grpc_auth import bearer_interceptors
from omega_common.logging import configure_logging
from omega_common.tls import channel_credentials
from omega_federation.settings import FederationSettings
from omega_federation.state import WorkerState
from omega_federation.worker import run_periodic, run_round

_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


def shard_channels(settings: FederationSettings) -> dict[str, grpc.aio.Channel]:
    """One channel per shard's internal listener: mutual TLS (the worker's client
    certificate) and the service token on every call, unless ``plaintext``.

    Raises:
        ValueError: TLS files missing without ``plaintext``.
    """
    settings.require_tls_files("tls_ca_file", "tls_cert_file", "tls_key_file")
    token = settings.token()
    interceptors = bearer_interceptors(token) if token else None
    if settings.plaintext:
        return {
            s: grpc.aio.insecure_channel(a, options=_OPTIONS, interceptors=interceptors)
            for s, a in settings.shards.items()
        }
    credentials = channel_credentials(
        settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file
    )
    return {
        s: grpc.aio.secure_channel(a, credentials, options=_OPTIONS, interceptors=interceptors)
        for s, a in settings.shards.items()
    }


async def _database_url(settings: FederationSettings) -> str:
    if settings.database_url:
        return settings.database_url
    admin = await asyncio.to_thread(embedded_postgres_dsn, "postgres")
    await create_database(admin, "omega_federation")
    return with_database(admin, "omega_federation")


async def _main(mode: str, settings: FederationSettings) -> int:
    configure_logging(settings.log_level, json=settings.log_json)
    if settings.metrics_port and mode == "periodic":
        start_http_server(settings.metrics_port)
    state = await WorkerState.open(await _database_url(settings))
    channels = shard_channels(settings)
    try:
        if mode == "run-once":
            report = await run_round(settings, state, channels)
            print(json.dumps(asdict(report)))
            return 0 if report.status != "skipped_locked" else 3
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_periodic(settings, state, channels, stop)
        return 0
    finally:
        for channel in channels.values():
            await channel.close()
        await state.close()


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``omega-federation``."""
    parser = argparse.ArgumentParser(
        prog="omega-federation",
        description="Federation worker: federated averaging with differential privacy over "
        "every shard. Settings come from OMEGA_FEDERATION_* environment variables.",
    )
    parser.add_argument("mode", choices=["run-once", "periodic"])
    args = parser.parse_args(argv)
    raise SystemExit(asyncio.run(_main(args.mode, FederationSettings())))


if __name__ == "__main__":
    main()
