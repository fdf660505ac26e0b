"""``python -m omega_federation run-once|periodic``: the federation worker."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import Mapping
from dataclasses import asdict

import grpc
import structlog
from prometheus_client import start_http_server

from omega_common.db import create_database, embedded_postgres_dsn, with_database
from omega_common.grpc_auth import bearer_interceptors
from omega_common.logging import configure_logging
from omega_common.tls import channel_credentials, check_pem_files
from omega_common.watched_files import file_stamps
from omega_federation import metrics
from omega_federation.settings import FederationSettings
from omega_federation.state import WorkerState
from omega_federation.worker import run_periodic, run_round

_log = structlog.get_logger(component="federation")

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


class ShardChannels:
    """The worker's shard channels, re-opened when their TLS or token files changed.

    `shard_channels` reads the CA, the client certificate and key and the service token file
    once; `refresh` (called by the periodic worker before each round) compares the files'
    stamps (inode, mtime, size) with those of the last opening and, when they differ, checks
    the new files (PEM parses, key matches the certificate, token not empty), opens new
    channels and closes the old ones (between rounds: nothing is in flight on them). A broken
    file set is logged and counted once per change and the old channels kept.
    """

    def __init__(self, settings: FederationSettings) -> None:
        self._settings = settings
        tls = (
            ()
            if settings.plaintext
            else (
                settings.tls_ca_file,
                settings.tls_cert_file,
                settings.tls_key_file,
            )
        )
        token = () if settings.service_token is not None else (settings.service_token_file,)
        self.files = tuple(p for p in (*tls, *token) if p is not None)
        self._stamps = file_stamps(self.files)
        self.channels = shard_channels(settings)

    def _check(self) -> None:
        settings = self._settings
        if not settings.plaintext:
            check_pem_files(settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file)
        try:
            token = settings.token()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the service token file: {exc}") from exc
        if settings.service_token_file is not None and not token:
            raise ValueError(f"the service token file {settings.service_token_file} is empty")

    async def refresh(self) -> Mapping[str, grpc.aio.Channel]:
        """The channels to use for the next round, re-opened if the files changed."""
        stamps = file_stamps(self.files)
        if stamps == self._stamps:
            return self.channels
        self._stamps = stamps
        files = [str(p) for p in self.files]
        try:
            self._check()
            channels = shard_channels(self._settings)
        except ValueError as exc:
            _log.warning("credentials_reload_refused", files=files, error=str(exc))
            metrics.CREDENTIALS_RELOADED.labels("refused").inc()
            return self.channels
        old, self.channels = self.channels, channels
        for channel in old.values():
            await channel.close()
        _log.info("tls_reloaded", files=files, shards=len(channels))
        metrics.CREDENTIALS_RELOADED.labels("ok").inc()
        return self.channels

    async def close(self) -> None:
        """Close the current channels."""
        for channel in self.channels.values():
            await channel.close()


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
    channels = ShardChannels(settings)
    try:
        if mode == "run-once":
            # A new process per run (CronJob): the files are read fresh every time.
            report = await run_round(settings, state, channels.channels)
            print(json.dumps(asdict(report)))
            return 0 if report.status != "skipped_locked" else 3
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_periodic(settings, state, channels.channels, stop, refresh=channels.refresh)
        return 0
    finally:
        await channels.close()
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
