"""Support of the fault tests: shard replicas as OS processes, a replayed fleet, invariants.

`ShardProcesses` runs replicas of ONE shard (same shard id, one shared database, each its own
ports) as ``python -m omega_constellation serve`` processes configured only through their
environment, with TLS and device credentials on, as `omega_simulator.stack.LocalStack` does
it: a development PKI and a fresh fleet key. A replica can be SIGKILLed and started again
on the same ports. Every process is killed when the context exits, whatever happened.

`Fleet` replays viewing events on real `omega_brain.Brain`s (SQLite stores, `GrpcTransport`
over TLS with each device's own token), each device pinned to one replica, and records every
sync. `check_fleet` compares what the devices believe was acknowledged with what the shard's
database holds (SQL), after a last sync of every device.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncpg
import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omega.v1 import sync_pb2
from omega_brain import (
    Brain,
    BrainConfig,
    CatalogIndex,
    GrpcTransport,
    SyncResult,
    ViewingEvent,
    fetch_catalog,
)
from omega_brain.errors import SyncError
from omega_brain.store import Store
from omega_common.auth import FleetKeys
from omega_common.tls import DevPki, channel_credentials, dev_pki

__all__ = [
    "Device",
    "Fleet",
    "FleetFigures",
    "RecordingTransport",
    "ReplicaProcess",
    "ShardProcesses",
    "SyncRecord",
    "check_fleet",
    "during",
    "free_port",
    "shard_catalog",
    "summarize",
    "wait_until",
]

EPOCH_MS = 1_795_300_000_000  # a Tuesday, 19:06 UTC
MIN_SUCCESS_RATE = 0.7  # ConstellationSettings.min_success_rate (the default the replicas run)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ReplicaProcess:
    """One ``omega-constellation serve`` process; `start` again after `kill` reuses its ports."""

    name: str
    port: int
    federation_port: int
    env: dict[str, str]
    log: Path
    ca_cert: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        """The device listener, ``127.0.0.1:port``."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Spawn the process (its output is appended to ``log``)."""
        assert self.process is None or self.process.poll() is not None, "already running"
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "omega_constellation", "serve"],
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1

    def wait_serving(self, timeout_seconds: float = 60.0) -> float:
        """Block until gRPC health answers SERVING; returns the seconds waited.

        Raises:
            RuntimeError: the process exited or did not become healthy in time.
        """
        started = time.monotonic()
        deadline = started + timeout_seconds
        with grpc.secure_channel(self.address, channel_credentials(self.ca_cert)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    code = None if self.process is None else self.process.returncode
                    raise RuntimeError(f"{self.name} exited with {code}; see {self.log}")
                try:
                    answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - started
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} not SERVING within {timeout_seconds} s; see {self.log}")

    def kill(self) -> None:
        """SIGKILL (no drain, no clean-up: in-flight transactions are cut) and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()


class ShardProcesses:
    """Replicas of one shard over one database, TLS and credentials on (a context manager).

    Args:
        work_dir: PKI, fleet keys and the replicas' logs go here.
        database_url: the shard's database, shared by every replica.
        catalog_path: the ``.npz`` catalog each replica loads.
        replicas: how many replicas to run.
        shard_id: the one shard of the shard map.
        extra_env: more ``OMEGA_CONSTELLATION_*`` settings for every replica.
    """

    def __init__(
        self,
        work_dir: Path,
        database_url: str,
        catalog_path: Path,
        replicas: int = 2,
        *,
        shard_id: str = "shard-0",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.work_dir = work_dir
        self.pki: DevPki = dev_pki(work_dir / "pki", clients=("federation-worker",))
        keys_file = work_dir / "pki" / "fleet-keys.json"
        keys_file.write_text(
            json.dumps({"fault-1": base64.b64encode(os.urandom(32)).decode("ascii")})
        )
        keys_file.chmod(0o600)
        self.keys = FleetKeys.from_file(keys_file)
        self.root_certificates = self.pki.ca_cert.read_bytes()
        self.replicas: list[ReplicaProcess] = []
        for i in range(replicas):
            port, federation_port = free_port(), free_port()
            env = {
                "OMEGA_CONSTELLATION_SHARD_ID": shard_id,
                "OMEGA_CONSTELLATION_SHARD_IDS": json.dumps([shard_id]),
                "OMEGA_CONSTELLATION_HOST": "127.0.0.1",
                "OMEGA_CONSTELLATION_PORT": str(port),
                "OMEGA_CONSTELLATION_FEDERATION_HOST": "127.0.0.1",
                "OMEGA_CONSTELLATION_FEDERATION_PORT": str(federation_port),
                "OMEGA_CONSTELLATION_METRICS_PORT": "0",
                "OMEGA_CONSTELLATION_DATABASE_URL": database_url,
                "OMEGA_CONSTELLATION_CATALOG_PATH": str(catalog_path),
                "OMEGA_CONSTELLATION_TLS_CERT_FILE": str(self.pki.server_cert),
                "OMEGA_CONSTELLATION_TLS_KEY_FILE": str(self.pki.server_key),
                "OMEGA_CONSTELLATION_TLS_CA_FILE": str(self.pki.ca_cert),
                "OMEGA_CONSTELLATION_FLEET_KEYS_FILE": str(keys_file),
                "OMEGA_CONSTELLATION_PLAINTEXT": "false",
                "OMEGA_CONSTELLATION_AUTH": "true",
                "OMEGA_CONSTELLATION_DB_PROBE_INTERVAL_SECONDS": "0.2",
                "OMEGA_CONSTELLATION_DB_PROBE_TIMEOUT_SECONDS": "0.5",
                "OMEGA_CONSTELLATION_DB_TIMEOUT_SECONDS": "3",
                **(extra_env or {}),
            }
            self.replicas.append(
                ReplicaProcess(
                    f"replica-{i}",
                    port,
                    federation_port,
                    env,
                    work_dir / f"replica-{i}.log",
                    self.pki.ca_cert,
                )
            )

    def __enter__(self) -> ShardProcesses:
        try:
            for replica in self.replicas:
                replica.start()
            for replica in self.replicas:
                replica.wait_serving()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill every replica still running (SIGKILL: a fault test needs no drain)."""
        for replica in self.replicas:
            replica.kill()

    def logs(self) -> str:
        """The tail of every replica's log (for assertion messages)."""
        return "\n".join(
            f"--- {r.name}\n" + r.log.read_text(errors="replace")[-3000:]
            for r in self.replicas
            if r.log.exists()
        )


def shard_catalog(shard: ShardProcesses) -> CatalogIndex:
    """The catalog as a device downloads it (FetchEmbeddings over TLS with a token)."""
    transport = GrpcTransport(
        shard.replicas[0].address,
        credential=shard.keys.issue("catalog-reader"),
        root_certificates=shard.root_certificates,
    )
    try:
        fetched = fetch_catalog(transport)
    finally:
        transport.close()
    return CatalogIndex(fetched.content_ids, fetched.embeddings)


class RecordingTransport:
    """A `SyncTransport` over a `GrpcTransport` that records every failed attempt's code."""

    def __init__(self, inner: GrpcTransport) -> None:
        self._inner = inner
        self.failures: list[tuple[float, str]] = []
        """(monotonic time, status code name) of each failed SyncPatterns attempt."""
        self.attempts = 0

    def sync_patterns(
        self, request: sync_pb2.SyncPatternsRequest, timeout: float
    ) -> sync_pb2.SyncPatternsResponse:
        """Delegate, recording the failure code, if any."""
        self.attempts += 1
        try:
            return self._inner.sync_patterns(request, timeout)
        except SyncError as exc:
            self.failures.append((time.monotonic(), exc.code.name if exc.code else "OTHER"))
            raise

    def fetch_embeddings(
        self, request: sync_pb2.FetchEmbeddingsRequest, timeout: float
    ) -> sync_pb2.FetchEmbeddingsResponse:
        """Delegate."""
        return self._inner.fetch_embeddings(request, timeout)

    def fetch_model(
        self, request: sync_pb2.FetchModelRequest, timeout: float
    ) -> sync_pb2.FetchModelResponse:
        """Delegate."""
        return self._inner.fetch_model(request, timeout)

    def forget_device(
        self, request: sync_pb2.ForgetDeviceRequest, timeout: float
    ) -> sync_pb2.ForgetDeviceResponse:
        """Delegate."""
        return self._inner.forget_device(request, timeout)


@dataclass
class SyncRecord:
    """One `Brain.sync` call of the replay."""

    device_id: str
    replica: str
    started: float  # time.monotonic()
    seconds: float
    ok: bool
    attempts: int
    error: str | None


@dataclass
class Device:
    """A replayed TV: its brain, its transport and what it observed (the ground truth)."""

    device_id: str
    replica: str
    brain: Brain
    transport: RecordingTransport
    store_path: Path
    views: Counter[str] = field(default_factory=Counter)
    syncs: list[SyncRecord] = field(default_factory=list)
    events: int = 0


def _completion(rng: random.Random) -> float:
    # Mostly successes, some abandoned and half-watched viewings: the buckets' success rates
    # spread around the 0.7 threshold, so some patterns are stored and some are not, and
    # "updated" (neutral viewings) as well as "added" (moved embeddings) deltas occur.
    return rng.choices([1.0, 0.9, 0.5, 0.1, 0.0], weights=[40, 15, 20, 15, 10])[0]


class Fleet:
    """Devices replaying random viewings over one shard's replicas.

    Args:
        shard: the running replicas (their TLS trust and fleet keys).
        catalog: the shard's catalog, shared by every brain.
        work_dir: the devices' SQLite stores.
        devices: how many devices; device i syncs through replica ``i % replicas``.
        seed: the events' seed.
        config: the brains' settings besides ``store_path`` (default: `BrainConfig` defaults,
            i.e. the retry budget of a TV).
    """

    def __init__(
        self,
        shard: ShardProcesses,
        catalog: CatalogIndex,
        work_dir: Path,
        devices: int,
        *,
        seed: int = 0,
        config: dict[str, Any] | None = None,
    ) -> None:
        self._catalog = catalog
        self._ids = list(catalog.content_ids)
        self._seed = seed
        self._lock = threading.Lock()
        self.in_flight: Counter[str] = Counter()
        self.syncs_done = 0
        self._transports: list[GrpcTransport] = []
        self.devices: list[Device] = []
        work_dir.mkdir(parents=True, exist_ok=True)
        for i in range(devices):
            replica = shard.replicas[i % len(shard.replicas)]
            device_id = f"tv-{seed}-{i:03d}"
            inner = GrpcTransport(
                replica.address,
                credential=shard.keys.issue(device_id),
                root_certificates=shard.root_certificates,
            )
            self._transports.append(inner)
            transport = RecordingTransport(inner)
            path = work_dir / f"{device_id}.sqlite"
            brain = Brain(
                device_id,
                BrainConfig(store_path=path, honour_sync_pace=False, **(config or {})),
                transport=transport,
                catalog=catalog,
            )
            self.devices.append(Device(device_id, replica.name, brain, transport, path))

    def _observe(self, device: Device, rng: random.Random) -> None:
        content = rng.choice(self._ids)
        # Spread viewings over time slots and day types: one bucket's pattern per pair.
        started_at_ms = EPOCH_MS + device.events * 7 * 3_600_000 + rng.randrange(3_600_000)
        device.brain.observe(ViewingEvent(content, started_at_ms, completion=_completion(rng)))
        device.views[content] += 1
        device.events += 1

    def sync(self, device: Device) -> SyncResult:
        """One `Brain.sync`, recorded (with the replica's in-flight count around it)."""
        with self._lock:
            self.in_flight[device.replica] += 1
        started = time.monotonic()
        try:
            result = device.brain.sync()
        finally:
            with self._lock:
                self.in_flight[device.replica] -= 1
                self.syncs_done += 1
        device.syncs.append(
            SyncRecord(
                device.device_id,
                device.replica,
                started,
                time.monotonic() - started,
                result.ok,
                result.attempts,
                result.error,
            )
        )
        return result

    def replay(
        self,
        events_per_device: int,
        sync_every: int,
        pace_seconds: float,
        stop: threading.Event | None = None,
    ) -> None:
        """Every device (one thread each) observes events and syncs every ``sync_every``.

        ``pace_seconds`` is slept after each event, so the replay spans a known time.
        """

        def play(index: int, device: Device) -> None:
            rng = random.Random(self._seed * 100_003 + index)
            for n in range(1, events_per_device + 1):
                if stop is not None and stop.is_set():
                    return
                self._observe(device, rng)
                if n % sync_every == 0:
                    self.sync(device)
                time.sleep(pace_seconds * rng.uniform(0.5, 1.5))

        errors: list[BaseException] = []

        def guarded(index: int, device: Device) -> None:
            try:
                play(index, device)
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=guarded, args=(i, d), name=d.device_id, daemon=True)
            for i, d in enumerate(self.devices)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def finish(self) -> list[SyncResult]:
        """Each device observes one more viewing and syncs (the 'afterwards' sync), then a
        pull-only sync so that every change is acknowledged; returns the first syncs."""
        results = []
        for i, device in enumerate(self.devices):
            self._observe(device, random.Random(-1 - i))
            results.append(self.sync(device))
        for device in self.devices:
            self.sync(device)
        return results

    def close(self) -> None:
        """Close every brain and channel (idempotent)."""
        for device in self.devices:
            device.brain.close()
        for transport in self._transports:
            transport.close()

    def records(self) -> list[SyncRecord]:
        """Every recorded sync, in start order."""
        return sorted((r for d in self.devices for r in d.syncs), key=lambda r: r.started)

    def failures(self) -> Counter[str]:
        """Failed SyncPatterns attempts by status code, over every device."""
        return Counter(code for d in self.devices for _, code in d.transport.failures)


@dataclass(frozen=True)
class FleetFigures:
    """What `check_fleet` verified."""

    devices: int
    patterns_checked: int
    """Device patterns with an embedding (every one of them was sent and acknowledged)."""
    patterns_stored: int
    """Of those, the ones at or above the quality threshold: a row with the same samples."""
    patterns_below_threshold: int
    """Of those, the ones below it: no row."""
    views: int
    samples_stored: int


def _device_side(device: Device) -> tuple[dict[str, int], dict[str, tuple[int, float]], int, int]:
    """(acked sample counts, pattern id -> (samples, rate) of patterns with an embedding,
    acked version, local version), read from the device's own store (brain closed)."""
    store = Store(device.store_path, device.device_id)
    try:
        state = store.state()
        acked = store.acked()
        patterns = {
            row.pattern_id: (row.state.sample_count, row.state.success_rate)
            for row in store.patterns().values()
            if row.state.embedding is not None
        }
        pending = store.pending_views()
    finally:
        store.close()
    assert not pending, f"{device.device_id}: views still pending after the last sync: {pending}"
    return acked, patterns, state["acked_version"], state["local_version"]


def _stored(rate: float) -> bool:
    """Whether the shard keeps a pattern of this rate: not below the threshold, both compared
    as float32 (the wire's type), so a rate of exactly 0.7 (7/10) is kept."""
    return bool(np.float32(rate) >= np.float32(MIN_SUCCESS_RATE))


async def check_fleet(dsn: str, devices: Sequence[Device]) -> FleetFigures:
    """Assert that nothing acknowledged was lost and nothing was applied twice.

    Call after `Fleet.finish` and `Fleet.close`. For every device: its acknowledged version is
    its local version (everything was acknowledged) and equals ``devices.last_local_version``;
    every pattern it holds with an embedding was acknowledged with its current sample count;
    one at or above the threshold is in ``device_patterns`` with exactly that sample count
    (not fewer: nothing acknowledged was lost; not more: no ``updated`` delta was applied
    twice) and its success rate, one below has no row, and the shard holds no other row. The
    shard's view counts per content equal the viewings the devices observed (one view each).

    Raises:
        AssertionError: an invariant does not hold (the message names the device).
    """
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT device_id, pattern_id, sample_count, success_rate FROM device_patterns"
        )
        known = {
            r["device_id"]: (r["last_local_version"], r["pattern_count"])
            for r in await conn.fetch(
                "SELECT device_id, last_local_version, pattern_count FROM devices"
            )
        }
        server_views = {
            r["content_id"]: int(r["views"])
            for r in await conn.fetch(
                "SELECT content_id, sum(views)::bigint AS views FROM content_views"
                " GROUP BY content_id"
            )
        }
    finally:
        await conn.close()
    by_device: dict[str, dict[str, tuple[int, float]]] = {}
    for r in rows:
        by_device.setdefault(r["device_id"], {})[r["pattern_id"]] = (
            int(r["sample_count"]),
            float(r["success_rate"]),
        )
    checked = stored = below = samples = 0
    views: Counter[str] = Counter()
    for device in devices:
        acked, patterns, acked_version, local_version = _device_side(device)
        who = device.device_id
        assert acked_version == local_version, f"{who}: {local_version} not acknowledged"
        assert who in known, f"{who}: the shard has no device row"
        last, pattern_count = known[who]
        assert last == acked_version, f"{who}: shard applied {last}, device acked {acked_version}"
        server = by_device.get(who, {})
        assert set(server) <= set(patterns), f"{who}: unknown rows {set(server) - set(patterns)}"
        assert pattern_count == len(server), f"{who}: pattern_count {pattern_count}"
        for pattern_id, (sample_count, rate) in patterns.items():
            checked += 1
            assert acked.get(pattern_id) == sample_count, (
                f"{who}/{pattern_id}: acked {acked.get(pattern_id)}, holds {sample_count}"
            )
            if _stored(rate):
                stored += 1
                assert pattern_id in server, f"{who}/{pattern_id}: acknowledged but lost"
                got_samples, got_rate = server[pattern_id]
                assert got_samples == sample_count, (
                    f"{who}/{pattern_id}: shard has {got_samples} samples, device {sample_count}"
                )
                assert abs(got_rate - rate) < 1e-6, f"{who}/{pattern_id}: rate {got_rate}"
                samples += got_samples
            else:
                below += 1
                assert pattern_id not in server, f"{who}/{pattern_id}: stored below threshold"
        views.update(device.views)
    assert server_views == dict(views), "view counts differ: " + str(
        {
            c: (server_views.get(c), views.get(c))
            for c in set(views) | set(server_views)
            if server_views.get(c) != views.get(c)
        }
    )
    return FleetFigures(len(devices), checked, stored, below, sum(views.values()), samples)


def summarize(fleet: Fleet) -> dict[str, Any]:
    """Figures of a replay: syncs, failed syncs, retried syncs, failed attempts by code."""
    records = fleet.records()
    return {
        "syncs": len(records),
        "syncs_failed": sum(not r.ok for r in records),
        "syncs_retried": sum(r.attempts > 1 for r in records),
        "max_attempts": max((r.attempts for r in records), default=0),
        "max_sync_seconds": round(max((r.seconds for r in records), default=0.0), 2),
        "failed_attempts_by_code": dict(fleet.failures()),
        "errors": sorted({r.error for r in records if r.error})[:5],
    }


def during(fleet: Fleet, window: tuple[float, float], replica: str | None = None) -> dict[str, int]:
    """The syncs (of ``replica``'s devices, or all) that overlapped a fault's monotonic
    ``window`` (start, end): how many, how many failed, how many needed retries."""
    start, end = window
    hit = [
        r
        for r in fleet.records()
        if (replica is None or r.replica == replica)
        and r.started <= end
        and r.started + r.seconds >= start
    ]
    return {
        "syncs_during_fault": len(hit),
        "syncs_during_fault_failed": sum(not r.ok for r in hit),
        "syncs_during_fault_retried": sum(r.attempts > 1 for r in hit),
    }


def wait_until(check: Callable[[], bool], timeout_seconds: float, what: str) -> None:
    """Poll ``check`` every 10 ms until it holds.

    Raises:
        TimeoutError: not within ``timeout_seconds``.
    """
    deadline = time.monotonic() + timeout_seconds
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_seconds} s")
        time.sleep(0.01)


async def replay_with_faults(
    fleet: Fleet,
    *,
    events: int,
    pace_seconds: float,
    faults: int,
    inject: Callable[[int, int], dict[str, Any]],
    sync_every: int = 2,
) -> list[dict[str, Any]]:
    """Replay the fleet in a thread while ``inject(k, after_syncs)`` causes fault ``k`` (in a
    thread, spread evenly over the replay); returns the faults' figures.

    Raises:
        AssertionError: the replay ended before the last fault was over.
    """
    total = len(fleet.devices) * (events // sync_every)
    stop = threading.Event()
    replay = asyncio.create_task(
        asyncio.to_thread(fleet.replay, events, sync_every, pace_seconds, stop)
    )
    figures: list[dict[str, Any]] = []
    try:
        for k in range(faults):
            after = total * (k + 1) // (faults + 2)
            figures.append(await asyncio.to_thread(inject, k, after))
        assert not replay.done(), "the replay ended before the last fault was over"
        await replay
    finally:
        stop.set()
        await asyncio.gather(replay, return_exceptions=True)
    return figures
