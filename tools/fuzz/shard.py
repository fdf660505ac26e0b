"""The shard under test: a child process ``python -m omega_constellation`` on 127.0.0.1 with a
database of its own, credentials on (fresh fleet keys) or off, its memory (VmRSS) and its
database's contents.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import asyncpg
import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omega_common.auth import FleetKeys
from omega_common.db import create_database, drop_database, with_database
from omega_constellation.server import INTERNAL_MAX_MESSAGE_BYTES
from tools.fuzz.credentials import new_fleet_keys

__all__ = [
    "MALLOC_ENV",
    "DatabaseState",
    "ShardProcess",
    "admin_dsn",
    "database_state",
    "free_port",
    "rss_bytes",
    "write_catalog",
]

MALLOC_ENV: dict[str, str] = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"}
"""glibc malloc settings of the shard, as a deployment should set them too.

Measured over ``make fuzz`` (10,000 cases, RSS growth after the warm-up, two runs each):
+45 and +48 MiB with glibc's defaults, +21 and +25 MiB with ``MALLOC_ARENA_MAX=2``, +4 and
+11 MiB with both. The difference is memory the allocator keeps after freeing it
(``malloc_trim`` gives it back), not live objects: with one arena per thread (up to 8 per
core), blocks freed by gRPC's and Python's threads stay in their arenas; and glibc raises
its mmap threshold after the first large block is freed (up to 32 MiB), after which
request-sized blocks (messages of 1-4 MiB, up to 64 MiB on the internal listener) come from
the arenas and stay there. ``MALLOC_MMAP_THRESHOLD_`` fixes the threshold at 128 KiB (where
the default starts), so large blocks are mapped and unmapped on free. Same as
``GLIBC_TUNABLES=glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=131072``; musl and
other allocators ignore both.
"""

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
_START_TIMEOUT_SECONDS = 90.0
_STOP_TIMEOUT_SECONDS = 20.0
CATALOG_ITEMS = 50

DatabaseState = dict[str, tuple[int, str]]
"""table -> (row count, md5 of its rows in a fixed order)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def admin_dsn(explicit: str | None = None) -> str:
    """The maintenance DSN to create shard databases on.

    ``explicit``, else ``$OMEGA_TEST_POSTGRES_URL``, else the local server
    (`DEFAULT_POSTGRES`); when that is unreachable and nothing was given explicitly, an
    embedded Postgres (`omega_common.db.embedded_postgres_dsn`).

    Raises:
        OSError, asyncpg.PostgresError: an explicit DSN is unreachable.
    """
    dsn = explicit or os.environ.get("OMEGA_TEST_POSTGRES_URL") or DEFAULT_POSTGRES
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (OSError, asyncpg.PostgresError):
        if explicit:
            raise
        from omega_common.db import embedded_postgres_dsn

        return await asyncio.to_thread(embedded_postgres_dsn, "postgres")
    await conn.close()
    return dsn


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (VmRSS of /proc/<pid>/status), in bytes.

    Raises:
        OSError: no such process (or no /proc).
        ValueError: no VmRSS line.
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def write_catalog(path: Path, n: int = CATALOG_ITEMS) -> list[str]:
    """A small deterministic catalog file (``c0000``...); returns its content ids."""
    rng = np.random.default_rng(7)
    embeddings = rng.standard_normal((n, 384)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    ids = [f"c{i:04d}" for i in range(n)]
    np.savez(
        path,
        content_ids=np.array(ids),
        titles=np.array([f"Title {i}" for i in range(n)]),
        genres=np.array(["Drama|Comedy" if i % 2 else "Sci-Fi" for i in range(n)]),
        embeddings=embeddings,
    )
    return ids


async def database_state(dsn: str) -> DatabaseState:
    """Row count and content digest of every table of the public schema.

    The digest is the md5 of every row's text form in sorted order, so an UPDATE shows as
    well as an INSERT or DELETE.
    """
    conn = await asyncpg.connect(dsn)
    try:
        tables = [
            r["tablename"]
            for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
            )
        ]
        state: DatabaseState = {}
        for table in tables:
            row = await conn.fetchrow(
                f"SELECT count(*) AS n, md5(coalesce(string_agg(t::text, E'\\n' ORDER BY"
                f" t::text), '')) AS digest FROM \"{table}\" t"
            )
            state[table] = (int(row["n"]), str(row["digest"]))
        return state
    finally:
        await conn.close()


async def _serving(target: str, timeout_seconds: float) -> bool:
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_seconds
            )
        except grpc.aio.AioRpcError:
            return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


@dataclass
class ShardProcess:
    """A constellation replica started as a child process for the fuzzer.

    Attributes:
        process: The child.
        targets: ``127.0.0.1:port`` of its device listener, then of its internal listener
            (the second only answers when the server has one; the fuzzer asks reflection).
        database_url: Its own database (dropped by `stop`).
        catalog_ids: The content ids of the catalog it loaded.
        log_path: Its stdout and stderr.
        max_request_bytes: Its device listener's receive limit.
        internal_max_request_bytes: Its internal listener's receive limit.
        keys: Its fleet keys when it checks credentials (None: ``auth`` off).
    """

    process: asyncio.subprocess.Process
    targets: list[str]
    database_url: str
    catalog_ids: list[str]
    log_path: Path
    max_request_bytes: int
    internal_max_request_bytes: int
    keys: FleetKeys | None
    _admin_dsn: str
    _database: str
    _log: IO[bytes]
    _env: dict[str, str]
    replicas: list[asyncio.subprocess.Process]

    @classmethod
    async def start(
        cls,
        admin_dsn: str,
        workdir: Path,
        extra_env: dict[str, str] | None = None,
        *,
        auth: bool = True,
    ) -> ShardProcess:
        """Create a database, write a catalog, start the child and wait until it serves.

        Args:
            admin_dsn: DSN of a maintenance database on the Postgres server to use.
            workdir: Where the catalog and the log go.
            extra_env: More environment (``OMEGA_CONSTELLATION_*`` settings; `MALLOC_ENV` is
                set unless overridden here); it overrides the defaults.
            auth: Check credentials, under fleet keys made for this shard (`keys`); False:
                a shard that takes any call (``OMEGA_CONSTELLATION_AUTH=false``).

        Raises:
            RuntimeError: the child exited or did not serve within 90 s (its log is quoted).
        """
        name = f"omega_fuzz_{uuid.uuid4().hex[:12]}"
        await create_database(admin_dsn, name)
        dsn = with_database(admin_dsn, name)
        catalog = workdir / "catalog.npz"
        ids = write_catalog(catalog)
        port, internal = free_port(), free_port()
        max_request = 1024 * 1024
        keys, keys_json = new_fleet_keys() if auth else (None, "")
        env = {
            **os.environ,
            "OMEGA_CONSTELLATION_DATABASE_URL": dsn,
            "OMEGA_CONSTELLATION_HOST": "127.0.0.1",
            "OMEGA_CONSTELLATION_PORT": str(port),
            "OMEGA_CONSTELLATION_FEDERATION_HOST": "127.0.0.1",
            "OMEGA_CONSTELLATION_FEDERATION_PORT": str(internal),
            "OMEGA_CONSTELLATION_SHARD_ID": "shard-0",
            "OMEGA_CONSTELLATION_SHARD_IDS": '["shard-0"]',
            "OMEGA_CONSTELLATION_CATALOG_PATH": str(catalog),
            "OMEGA_CONSTELLATION_LOG_JSON": "true",
            "OMEGA_CONSTELLATION_METRICS_PORT": "0",
            "OMEGA_CONSTELLATION_EXPORT_SETTLE_MS": "0",
            "OMEGA_CONSTELLATION_MAX_REQUEST_BYTES": str(max_request),
            # No TLS (the fuzzer talks to 127.0.0.1 in plaintext): what it fuzzes is the
            # messages and the credentials, not the handshake.
            "OMEGA_CONSTELLATION_PLAINTEXT": "true",
            "OMEGA_CONSTELLATION_AUTH": "true" if auth else "false",
            # No per-device rate limit: the fuzzer is one client sending thousands of calls a
            # second, many under the same device token (requests that name no device are all
            # sent as one device); with a limit most would be RESOURCE_EXHAUSTED before they
            # reach validation. The limit itself is tested in test_load_control.
            "OMEGA_CONSTELLATION_DEVICE_RATE_PER_SECOND": "0",
            **MALLOC_ENV,
            **(extra_env or {}),
        }
        if keys is not None:
            env["OMEGA_CONSTELLATION_FLEET_KEYS"] = keys_json
            env.pop("OMEGA_CONSTELLATION_FLEET_KEYS_FILE", None)
            env.pop("OMEGA_CONSTELLATION_FLEET_KEY_ID", None)
        log_path = workdir / "shard.log"
        log = log_path.open("wb")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "omega_constellation",
            env=env,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
        )
        shard = cls(
            process,
            [f"127.0.0.1:{port}", f"127.0.0.1:{internal}"],
            dsn,
            ids,
            log_path,
            max_request,
            INTERNAL_MAX_MESSAGE_BYTES,
            keys,
            admin_dsn,
            name,
            log,
            env,
            [],
        )
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while not await _serving(shard.targets[0], 1.0):
            if process.returncode is not None or time.monotonic() > deadline:
                await shard.stop()
                tail = (await asyncio.to_thread(log_path.read_text, errors="replace"))[-4000:]
                raise RuntimeError(f"the shard did not start:\n{tail}")
            await asyncio.sleep(0.2)
        return shard

    async def add_replica(self) -> int:
        """Start one more replica of this shard: same settings, database and ports.

        gRPC sets SO_REUSEPORT on its listeners, so the kernel spreads new connections over
        every process listening on the port. Returns its process id once it listens.

        Raises:
            RuntimeError: it exited or did not listen within 90 s.
        """
        log_path = self.log_path.with_name(f"replica-{len(self.replicas) + 1}.log")
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "omega_constellation",
                # Its "listening" line (INFO) tells when it serves: health checks on the
                # shared port may reach the other processes.
                env={**self._env, "OMEGA_CONSTELLATION_LOG_LEVEL": "INFO"},
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
            )
        self.replicas.append(process)
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while b'"listening"' not in log_path.read_bytes():
            if process.returncode is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"the replica did not start:\n{tail}")
            await asyncio.sleep(0.2)
        return int(process.pid)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return int(self.process.pid)

    def rss_bytes(self) -> int:
        """The child's resident set size, in bytes."""
        return rss_bytes(self.pid)

    async def stop(self) -> None:
        """SIGTERM the child and its replicas (SIGKILL after 20 s), close its log, drop its
        database."""
        for replica in self.replicas:
            if replica.returncode is None:
                replica.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(replica.wait(), _STOP_TIMEOUT_SECONDS)
                except TimeoutError:
                    replica.kill()
                    await replica.wait()
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), _STOP_TIMEOUT_SECONDS)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        self._log.close()
        await drop_database(self._admin_dsn, self._database)
