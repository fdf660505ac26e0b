"""The MovieLens replay measured like a fleet run, for the fleet report (`fleet_report`).

The replay is closed loop: a device syncs when its session ends, not at a scheduled time, so
each sync's "scheduled" time is the moment its brain's ``sync()`` was called and its latency
runs from there to the call's return (retries and model download included). `SyncLog`
collects ``(called, done, outcome)`` samples from the replay's threads; once the replay's
wall time is known, `replay_fleet_run` turns them into a `FleetRun` (a `Recorder` with
windows of ``max(1 s, wall / 120)``) that `fleet_report.write_report` writes like any other
run.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc

from omega_brain import SyncResult
from omega_simulator.fleet_measure import Recorder
from omega_simulator.fleet_run import FleetRun
from omega_simulator.fleet_scenario import Scenario

__all__ = ["REPLAY_SCENARIO", "SyncLog", "replay_fleet_run", "sync_status"]

REPLAY_SCENARIO = "replay"
"""The scenario name of the replay in fleet reports and in ``fleet --scenario``."""

_GRPC_STATUS_NAMES = frozenset(grpc.StatusCode.__members__)
_BRACKETED = re.compile(r"\[([A-Z_]+)\]")
_MAX_SERIES_WINDOWS = 120
_MAX_DURATION_SECONDS = 86_400.0  # Scenario's bound
_MAX_RPC_TIMEOUT_SECONDS = 600.0  # Scenario's bound
_MAX_WORKERS = 64  # Scenario's bound


def sync_status(result: SyncResult) -> str:
    """The name a failed sync is counted under, like the fleet's gRPC status names.

    ``REDIRECTED`` when the replica named another shard (the fleet worker's name for it),
    ``PACED`` when the brain sent nothing because the shard asked it to wait, else the gRPC
    status the brain reports in brackets in ``result.error`` (``... [UNAVAILABLE] after 3
    attempt(s)``; the last valid status name wins), else ``UNKNOWN`` (e.g. a reply the brain
    could not apply, or an error without a status).
    """
    if result.redirect_shard_id:
        return "REDIRECTED"
    if result.paced:
        return "PACED"
    names = [n for n in _BRACKETED.findall(result.error or "") if n in _GRPC_STATUS_NAMES]
    return names[-1] if names else "UNKNOWN"


@dataclass(frozen=True, slots=True)
class _Sample:
    called_at: float
    done_at: float
    status: str | None  # None: ok
    bytes_up: int
    bytes_down: int


class SyncLog:
    """Every sync of a replay, with its times in wall seconds from the log's creation.

    Thread-safe: the replay's worker threads call `record` concurrently.

    Args:
        clock: monotonic seconds (``time.perf_counter``; tests may pass a fake one).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._origin = self._clock()
        self.started_at = time.time()
        """When the log was created, seconds since the epoch (the run's start)."""
        self._lock = threading.Lock()
        self._samples: list[_Sample] = []

    def now(self) -> float:
        """Wall seconds since the log was created."""
        return self._clock() - self._origin

    def record(self, called_at: float, result: SyncResult) -> None:
        """One sync that was called at ``called_at`` (`now`) and just returned ``result``.

        Bytes down count the sync's reply and its model download (the latency includes both).
        """
        sample = _Sample(
            called_at,
            self.now(),
            None if result.ok else sync_status(result),
            result.bytes_up,
            result.bytes_down + result.model_bytes_down,
        )
        with self._lock:
            self._samples.append(sample)

    def __len__(self) -> int:
        with self._lock:
            return len(self._samples)

    def recorder(self, wall_seconds: float) -> Recorder:
        """The samples in a `Recorder` with windows of ``max(1, wall_seconds / 120)`` seconds
        covering ``wall_seconds`` (each sync scheduled at its call time)."""
        width = max(1.0, wall_seconds / _MAX_SERIES_WINDOWS)
        rec = Recorder(width, math.ceil(max(wall_seconds, 0.0) / width) + 1)
        with self._lock:
            samples = list(self._samples)
        rec.schedule([s.called_at for s in samples])
        for s in samples:
            if s.status is None:
                rec.record_ok(s.called_at, s.done_at, s.bytes_up, s.bytes_down, dup=False)
                continue
            rec.record_failure(s.called_at, s.status, s.bytes_up)
            rec.redirects += s.status == "REDIRECTED"
        return rec


def replay_fleet_run(
    log: SyncLog,
    *,
    shards: Mapping[str, str],
    devices: int,
    workers: int,
    seed: int,
    rpc_timeout_seconds: float,
    wall_seconds: float,
) -> FleetRun:
    """The replay as a `FleetRun` of the ``replay`` scenario.

    The scenario says what the replay did: ``devices`` users, ``workers`` threads (capped at
    the scenario bound, 64), ``duration_seconds`` = the wall time, no time compression, and
    ``sync_interval_seconds`` = the mean wall seconds between two syncs of a device (to 0.01 s).

    Args:
        log: the replay's syncs.
        shards: shard id -> address the devices synced with.
        devices: devices replayed (>= 1).
        workers: replay threads.
        seed: the replay's seed (federation noise).
        rpc_timeout_seconds: the brains' deadline of one sync attempt.
        wall_seconds: the replay's wall time (> 0).

    Raises:
        pydantic.ValidationError: ``devices`` < 1 or a figure outside the scenario's bounds.
    """
    duration = min(max(wall_seconds, 1e-3), _MAX_DURATION_SECONDS)
    syncs = len(log)
    scenario = Scenario(
        name=REPLAY_SCENARIO,
        description=(
            f"MovieLens 100K replay: {devices} real viewing histories through full brains on "
            f"{workers} thread(s), closed loop (no schedule: each sync counts as scheduled "
            "when its device called sync(), latency from that call to its return)"
        ),
        devices=devices,
        sync_interval_seconds=max(0.01, round(duration * devices / max(syncs, 1), 2)),
        duration_seconds=duration,
        time_compression=1.0,
        workers=min(max(workers, 1), _MAX_WORKERS),
        seed=seed,
        rpc_timeout_seconds=min(rpc_timeout_seconds, _MAX_RPC_TIMEOUT_SECONDS),
    )
    return FleetRun(
        scenario,
        log.recorder(wall_seconds),
        dict(shards),
        "ml100k-user-",
        log.started_at,
        wall_seconds,
        closed_loop=True,
    )
