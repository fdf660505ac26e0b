"""A local stack for `make run`: Postgres, N constellation shards and the federation worker.

Every service runs as its own OS process, configured only through its environment, exactly as
in a deployment. Postgres is the server named by ``OMEGA_DATABASE_URL`` when set, otherwise the
embedded one (pgserver). Each run uses fresh databases, so runs are reproducible.

Security is on as in production: a development PKI (`omega_common.tls.dev_pki`) gives the
shards TLS certificates and the worker a client certificate (mutual TLS on the shards'
internal federation listener); fresh fleet keys sign every device's token and the worker's
service token.

A shard can run several replicas (``replicas``) on one device port and one federation port
(the servers set ``SO_REUSEPORT``, so the kernel spreads new connections over the live ones),
each with a plaintext health probe of its own; `kill_shard` SIGKILLs a replica and
`restart_shard` starts it again with the same settings, database and ports (the fleet's
``kill`` fault).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omega_common.auth import FleetKeys
from omega_common.db import create_database, drop_database, embedded_postgres_dsn, with_database
from omega_common.tls import channel_credentials, dev_pki
from omega_data import MovieLens, catalog_embeddings
from omega_simulator.access import FleetAccess

__all__ = ["LocalStack", "free_port", "run_federation_round", "write_catalog_file"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_catalog_file(ml: MovieLens, path: Path) -> int:
    """Write the MovieLens catalog with its MiniLM embeddings as the shards' ``.npz``."""
    ids, embeddings = catalog_embeddings(ml)
    items = [ml.items[int(i)] for i in ids]
    np.savez(
        path,
        content_ids=np.array([str(int(i)) for i in ids]),
        titles=np.array([it.title for it in items]),
        genres=np.array(["|".join(it.genres) for it in items]),
        embeddings=embeddings.astype(np.float32),
    )
    return len(ids)


def run_federation_round(env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run one round as a worker process (``omega-federation run-once``) and return its report.

    Args:
        env: ``OMEGA_FEDERATION_*`` variables added to this process's environment.
        log: the worker's output is appended here.

    Raises:
        RuntimeError: the worker failed (its output is in ``log``).
    """
    done = subprocess.run(
        [sys.executable, "-m", "omega_federation", "run-once"],
        env={**os.environ, **env},
        capture_output=True,
        timeout=600,
        check=False,
    )
    with log.open("ab") as out:
        out.write(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"federation round failed ({done.returncode}); see {log}")
    report: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return report


@dataclass
class _Proc:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    probe: str | None = None
    """``127.0.0.1:port`` of the replica's own plaintext health probe (several replicas)."""


class LocalStack:
    """Starts and stops the processes of one local run.

    Args:
        work_dir: PKI, fleet keys and the processes' logs go here.
        shard_count: shards to start.
        env: variables added to every process's environment.
        min_sources: k-anonymity threshold of the worker and the shards.
        replicas: processes per shard, all on the shard's ports and database.
        database_prefix: the run's databases are ``<prefix>_shard_<i>`` and
            ``<prefix>_federation`` (dropped and created again by `start`).
    """

    def __init__(
        self,
        work_dir: Path,
        shard_count: int,
        *,
        env: dict[str, str] | None = None,
        min_sources: int = 1000,
        replicas: int = 1,
        database_prefix: str = "omega_run",
    ):
        if replicas < 1:
            raise ValueError("a shard needs at least one replica")
        self.work_dir = work_dir
        self.shard_count = shard_count
        self.replicas = replicas
        self.database_prefix = database_prefix
        self.shards: dict[str, str] = {}
        self.federation_listeners: dict[str, str] = {}
        self.federation_dsn = ""
        self._admin_dsn = ""
        self._dbs: list[str] = []
        self._procs: list[_Proc] = []
        self._env = dict(env or {})
        self.min_sources = min_sources  # k-anonymity, checked by the worker and the shards
        self.pki = dev_pki(work_dir / "pki", clients=("federation-worker",))
        keys_file = work_dir / "pki" / "fleet-keys.json"
        keys_file.write_text(
            json.dumps({"dev-1": base64.b64encode(os.urandom(32)).decode("ascii")})
        )
        keys_file.chmod(0o600)
        self.fleet_keys_file = keys_file
        self.access = FleetAccess.of(False, self.pki.ca_cert, keys_file)
        worker_cert, worker_key = self.pki.client_certs["federation-worker"]
        self._worker_tls = {
            "OMEGA_FEDERATION_TLS_CA_FILE": str(self.pki.ca_cert),
            "OMEGA_FEDERATION_TLS_CERT_FILE": str(worker_cert),
            "OMEGA_FEDERATION_TLS_KEY_FILE": str(worker_key),
            "OMEGA_FEDERATION_SERVICE_TOKEN": FleetKeys.from_file(keys_file).issue(
                "service:federation-worker"
            ),
        }

    def _postgres(self) -> str:
        configured = os.environ.get("OMEGA_DATABASE_URL")
        if configured:
            return configured
        return embedded_postgres_dsn("postgres")

    def start(self, catalog_path: Path, export_settle_ms: int) -> None:
        """Create fresh databases and start the shards; waits until each is SERVING.

        Raises:
            RuntimeError: a shard did not become healthy within 60 s (its log is named).
        """
        self._admin_dsn = self._postgres()
        prefix = self.database_prefix
        names = [f"{prefix}_shard_{i}" for i in range(self.shard_count)] + [f"{prefix}_federation"]

        async def fresh() -> None:
            for name in names:
                await drop_database(self._admin_dsn, name)
                await create_database(self._admin_dsn, name)

        asyncio.run(fresh())
        self._dbs = names
        self.federation_dsn = with_database(self._admin_dsn, f"{prefix}_federation")
        shard_ids = [f"shard-{i}" for i in range(self.shard_count)]
        for i, shard_id in enumerate(shard_ids):
            port, federation_port = free_port(), free_port()
            env = {
                "OMEGA_CONSTELLATION_FEDERATION_PORT": str(federation_port),
                "OMEGA_CONSTELLATION_TLS_CERT_FILE": str(self.pki.server_cert),
                "OMEGA_CONSTELLATION_TLS_KEY_FILE": str(self.pki.server_key),
                "OMEGA_CONSTELLATION_TLS_CA_FILE": str(self.pki.ca_cert),
                "OMEGA_CONSTELLATION_FLEET_KEYS_FILE": str(self.fleet_keys_file),
                "OMEGA_CONSTELLATION_MIN_PUBLISHED_SOURCES": str(self.min_sources),
                "OMEGA_CONSTELLATION_SHARD_ID": shard_id,
                "OMEGA_CONSTELLATION_SHARD_IDS": json.dumps(shard_ids),
                "OMEGA_CONSTELLATION_PORT": str(port),
                "OMEGA_CONSTELLATION_DATABASE_URL": with_database(self._admin_dsn, names[i]),
                "OMEGA_CONSTELLATION_CATALOG_PATH": str(catalog_path),
                "OMEGA_CONSTELLATION_EXPORT_SETTLE_MS": str(export_settle_ms),
            }
            argv = [sys.executable, "-m", "omega_constellation", "serve"]
            for name in self.replica_names(shard_id):
                probe: str | None = None
                own = {"OMEGA_CONSTELLATION_METRICS_PORT": str(free_port())}
                if self.replicas > 1:
                    probe_port = free_port()
                    own["OMEGA_CONSTELLATION_PROBE_PORT"] = str(probe_port)
                    probe = f"127.0.0.1:{probe_port}"
                self._spawn(name, argv, {**env, **own}, probe)
            self.shards[shard_id] = f"127.0.0.1:{port}"
            self.federation_listeners[shard_id] = f"127.0.0.1:{federation_port}"
        for shard_id in self.shards:
            for name in self.replica_names(shard_id):
                self._wait_healthy(name)

    def replica_names(self, shard_id: str) -> list[str]:
        """The process names of a shard's replicas (the shard id itself with one replica)."""
        if self.replicas == 1:
            return [shard_id]
        return [f"{shard_id}-r{r}" for r in range(self.replicas)]

    def _replica(self, shard_id: str, replica: int) -> _Proc:
        if shard_id not in self.shards:
            raise KeyError(f"no shard {shard_id!r} (shards: {sorted(self.shards)})")
        if not 0 <= replica < self.replicas:
            raise IndexError(f"{shard_id} has replicas 0-{self.replicas - 1}, not {replica}")
        name = self.replica_names(shard_id)[replica]
        return next(p for p in self._procs if p.name == name)

    def kill_shard(self, shard_id: str, replica: int = 0) -> int:
        """SIGKILL one replica of a shard (no drain: in-flight syncs and their transactions
        are cut) and reap it; the other replicas keep answering on the shard's port.

        Returns:
            The killed process's pid.

        Raises:
            KeyError, IndexError: no such shard or replica.
        """
        proc = self._replica(shard_id, replica)
        if proc.process.poll() is None:
            proc.process.send_signal(signal.SIGKILL)
            proc.process.wait(timeout=30)
        return proc.process.pid

    def restart_shard(self, shard_id: str, replica: int = 0, *, wait: bool = True) -> int:
        """Start a killed (or stopped) replica again: same settings, database and ports.

        Args:
            shard_id: the shard.
            replica: which of its replicas.
            wait: block until it answers SERVING.

        Returns:
            The new process's pid.

        Raises:
            KeyError, IndexError: no such shard or replica.
            RuntimeError: it is still running, or did not become healthy within 60 s.
        """
        old = self._replica(shard_id, replica)
        if old.process.poll() is None:
            raise RuntimeError(f"{old.name} is still running (pid {old.process.pid})")
        self._procs.remove(old)
        self._spawn(old.name, old.argv, old.env, old.probe)
        if wait:
            self._wait_healthy(old.name)
        return self._replica(shard_id, replica).process.pid

    def pids(self) -> dict[str, int]:
        """Process name -> pid of every process started (running or not)."""
        return {p.name: p.process.pid for p in self._procs}

    def drop_databases(self) -> None:
        """Drop the run's databases (after `stop`; `make run` keeps them for inspection)."""
        admin, names = self._admin_dsn, list(self._dbs)

        async def drop() -> None:
            for name in names:
                await drop_database(admin, name)

        if admin and names:
            asyncio.run(drop())
        self._dbs = []

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str], probe: str | None = None
    ) -> None:
        log = self.work_dir / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                argv,
                env={**os.environ, **self._env, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self._procs.append(_Proc(name, process, log, list(argv), dict(env), probe))

    def _wait_healthy(self, name: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        proc = next(p for p in self._procs if p.name == name)
        shard_id = str(proc.env.get("OMEGA_CONSTELLATION_SHARD_ID", name))
        channel = (
            grpc.insecure_channel(proc.probe)
            if proc.probe is not None
            else grpc.secure_channel(self.shards[shard_id], channel_credentials(self.pki.ca_cert))
        )
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if proc.process.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {proc.process.returncode}; see {proc.log}"
                    )
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if status.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise RuntimeError(f"{name} did not become healthy in {timeout:.0f} s; see {proc.log}")

    def federation_round(self, env: dict[str, str]) -> dict[str, Any]:
        """Run one federation round over this stack's shards (see `run_federation_round`)."""
        return run_federation_round(
            {
                **self._env,
                **self._worker_tls,
                "OMEGA_FEDERATION_SHARDS": json.dumps(self.federation_listeners),
                "OMEGA_FEDERATION_DATABASE_URL": self.federation_dsn,
                **env,
            },
            self.work_dir / "federation.log",
        )

    def stop(self) -> None:
        """SIGTERM every process, wait for it (SIGKILL after 15 s), drop nothing."""
        for p in self._procs:
            if p.process.poll() is None:
                p.process.send_signal(signal.SIGTERM)
        for p in self._procs:
            try:
                p.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.process.kill()
                p.process.wait()
        self._procs.clear()

    @contextmanager
    def running(self, catalog_path: Path, export_settle_ms: int) -> Iterator[LocalStack]:
        """``start`` then ``stop`` whatever happens in between."""
        try:
            self.start(catalog_path, export_settle_ms)
            yield self
        finally:
            self.stop()
