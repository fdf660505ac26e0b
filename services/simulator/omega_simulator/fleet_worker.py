"""One load-generator process of a fleet run: its devices' syncs, scheduled in advance and
sent open-loop over grpc.aio.

Schedule: device ``i`` gets a random phase in its wall-clock interval and syncs at phase,
phase + interval, ... in *load time*, which runs ``rate_multiplier`` times faster during a
scenario's phases (so a 10x burst makes every device sync 10x as often). The whole list of
(time, device) is built before the start. The sender launches every sync when its time comes
whatever the earlier ones are doing (no coordinated omission) and measures latency from the
scheduled time; the request bytes are built at send time, so a simulator that cannot keep up
shows in the latency and in its own send lag (reported separately).

Accounting: every scheduled sync ends as ok, a gRPC failure (status name), ``REDIRECTED``
(answered by a shard naming another shard this run does not know), ``NOT_SENT`` (the sender
had not reached it ``rpc_timeout_seconds`` after the run's end) or ``UNFINISHED`` (no answer
by the hard stop), so ok + failed == scheduled; with ``malformed_fraction``, a malformed sync
refused with INVALID_ARGUMENT is ``refused`` (as expected) instead, so ok + failed + refused
== scheduled, and one accepted is the failure ``MALFORMED_ACCEPTED``. Device-behaviour faults
(see `omega_simulator.fleet_devices`): malformed syncs drawn per sync, factory resets at a
random time of the run's 20-60% for ``factory_reset_fraction`` of the devices, rollbacks to
stale versions likewise for ``stale_fraction`` of the others (from their first sync at or
after that time with something acknowledged), churn applied to the schedule (`apply_churn`).
"""

from __future__ import annotations

import asyncio
import os
import queue as queue_module
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from omega.v1 import sync_pb2
from omega_protocol import shard_for
from omega_simulator.access import FleetAccess
from omega_simulator.fleet_catalog import CatalogTaste
from omega_simulator.fleet_devices import SIM_EPOCH_MS, DeviceFleet
from omega_simulator.fleet_measure import Recorder
from omega_simulator.fleet_scenario import Scenario

__all__ = [
    "SYNC_METHOD",
    "WorkerSpec",
    "apply_churn",
    "build_schedule",
    "run_worker",
    "worker_process",
]

SYNC_METHOD = "/omega.v1.ConstellationSync/SyncPatterns"
_PROGRESS_SECONDS = 1.0
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 << 20),
    # Each channel its own TCP connection, so several server processes on one port
    # (SO_REUSEPORT) each get some of them.
    ("grpc.use_local_subchannel_pool", 1),
    # Reconnect within a second after a connection is lost (gRPC's default backoff grows to
    # 120 s): after a fault window the run measures the shard again, not the client's backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def build_schedule(
    scenario: Scenario, devices: int, rng: np.random.Generator
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int32]]:
    """Every sync of ``devices`` devices over the run, in time order.

    Returns:
        ``(times, device)``: (m,) float64 wall seconds from the start, ascending, all below
        ``scenario.duration_seconds``; (m,) int32 device positions in [0, devices).
    """
    interval = scenario.interval_wall_seconds
    end = scenario.duration_seconds
    cuts = {0.0, end}
    for p in scenario.phases:
        cuts.update({p.start_seconds, min(end, p.start_seconds + p.duration_seconds)})
    grid = np.array(sorted(c for c in cuts if c <= end), dtype=np.float64)
    rates = np.array([scenario.rate_multiplier_at(float(t)) for t in grid[:-1]])
    load = np.concatenate([[0.0], np.cumsum(rates * np.diff(grid))])  # load time at each cut
    phase = rng.uniform(0.0, interval, devices)
    total = float(load[-1])
    counts = np.where(phase < total, np.floor((total - phase) / interval) + 1, 0).astype(np.int64)
    counts = np.where(phase + (counts - 1) * interval >= total, counts - 1, counts)
    device = np.repeat(np.arange(devices, dtype=np.int32), counts)
    starts = np.cumsum(counts) - counts
    k = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)
    times = np.interp(np.repeat(phase, counts) + k * interval, load, grid)
    times = np.minimum(times, np.nextafter(end, 0.0))
    order = np.argsort(times, kind="stable")
    return times[order], device[order]


def apply_churn(
    scenario: Scenario,
    times: npt.NDArray[np.float64],
    device: npt.NDArray[np.int32],
    devices: int,
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int32], int, int]:
    """Drop the syncs churn removes: ``churn_fraction`` of the devices churn, half of them
    appearing at a random time in the middle 60% of the run (no syncs before: new devices),
    the other half vanishing then (no syncs after: they just stop being scheduled).

    Returns:
        ``(times, device, appeared, vanished)``: the schedule kept and the churned counts.
    """
    m = round(scenario.churn_fraction * devices)
    if m == 0:
        return times, device, 0, 0
    churned = rng.choice(devices, m, replace=False)
    at = np.full(devices, np.nan)
    at[churned] = rng.uniform(0.2, 0.8, m) * scenario.duration_seconds
    appearing = np.zeros(devices, bool)
    appearing[churned[: (m + 1) // 2]] = True
    when = at[device]
    gone = np.where(appearing[device], times < when, times >= when)  # NaN compares False
    keep = ~gone
    return times[keep], device[keep], (m + 1) // 2, m // 2


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process needs (picklable).

    Attributes:
        worker: index in [0, workers); it simulates devices ``worker, worker + workers, ...``.
        scenario: the run's scenario.
        shards: shard id -> ``host:port``; devices go to ``shard_for(device, ids)``.
        access: TLS trust and fleet keys.
        taste: the catalog's clusters.
        prefix: device id prefix of this run.
        window_seconds: series window width.
        windows: series windows.
    """

    worker: int
    scenario: Scenario
    shards: dict[str, str]
    access: FleetAccess
    taste: CatalogTaste
    prefix: str
    window_seconds: float
    windows: int
    extra: dict[str, Any] = field(default_factory=dict)


class _Sender:
    """The open-loop sending of one worker."""

    def __init__(self, spec: WorkerSpec, fleet: DeviceFleet, recorder: Recorder) -> None:
        self.spec = spec
        self.fleet = fleet
        self.recorder = recorder
        self.shard_ids = sorted(spec.shards)
        self.stubs: dict[str, list[grpc.aio.UnaryUnaryMultiCallable]] = {}
        self.channels: list[grpc.aio.Channel] = []
        self.metadata: dict[int, tuple[tuple[str, str], ...]] = {}
        self.inflight: dict[int, float] = {}
        self.launched = 0
        self.start = 0.0
        self._rr = 0
        self.rng = np.random.default_rng([spec.scenario.seed, 7, spec.worker])
        self.resets: dict[int, float] = {}  # device position -> wall second of its reset
        self.awaiting_resume: set[int] = set()  # reset, no acknowledged sync since
        self.rollbacks: dict[int, float] = {}  # device position -> wall second of its rollback
        # rolled back, unsettled -> (its acknowledged version before, shown behind yet)
        self.stale: dict[int, tuple[int, bool]] = {}

    def open_channels(self) -> None:
        access = self.spec.access
        for shard_id, address in self.spec.shards.items():
            stubs = []
            for _ in range(self.spec.scenario.connections_per_worker):
                if access.plaintext:
                    channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
                else:
                    tls = grpc.ssl_channel_credentials(root_certificates=access.root_certificates)
                    channel = grpc.aio.secure_channel(address, tls, options=_CHANNEL_OPTIONS)
                self.channels.append(channel)
                stubs.append(channel.unary_unary(SYNC_METHOD))
            self.stubs[shard_id] = stubs

    def _stub(self, shard_id: str) -> grpc.aio.UnaryUnaryMultiCallable:
        stubs = self.stubs[shard_id]
        self._rr += 1
        return stubs[self._rr % len(stubs)]

    def _metadata(self, k: int) -> tuple[tuple[str, str], ...]:
        md = self.metadata.get(k)
        if md is None:
            token = self.spec.access.credential(self.fleet.device_id(k))
            md = () if token is None else (("authorization", f"Bearer {token}"),)
            self.metadata[k] = md
        return md

    def now(self) -> float:
        return time.perf_counter() - self.start

    def sim_ms(self, t: float) -> int:
        sc = self.spec.scenario
        return int(SIM_EPOCH_MS + (sc.start_hour * 3600.0 + t * sc.time_compression) * 1000.0)

    async def one(self, seq: int, k: int, scheduled: float) -> None:
        sc = self.spec.scenario
        rec = self.recorder
        fleet = self.fleet
        rec.record_lag(self.now() - scheduled)
        reset_at = self.resets.get(k)
        if reset_at is not None and scheduled >= reset_at:
            del self.resets[k]
            fleet.factory_reset(k)
            rec.device_faults["factory_resets"] += 1
            self.awaiting_resume.add(k)
        stale_at = self.rollbacks.get(k)
        if (
            stale_at is not None
            and scheduled >= stale_at
            and int(fleet.acked_version[k]) >= 2  # else there is no older version to go to
            and k not in fleet.needs_pull
        ):
            del self.rollbacks[k]
            self.stale[k] = (int(fleet.acked_version[k]), False)
            fleet.rollback(k)
            rec.device_faults["stale_rollbacks"] += 1
        sim_ms = self.sim_ms(scheduled)
        fleet.advance(k, sim_ms, sc.sync_interval_seconds * 1000.0)
        malformed = sc.malformed_fraction > 0 and float(self.rng.random()) < sc.malformed_fraction
        shard_id = (
            self.shard_ids[0]
            if len(self.shard_ids) == 1
            else shard_for(fleet.device_id(k), self.shard_ids)
        )
        sent = 0
        received = 0

        async def send(body: bytes) -> sync_pb2.SyncPatternsResponse:
            nonlocal shard_id, sent, received
            for _hop in range(2):  # the shard asked, then the one a redirect names
                sent += len(body)
                answer_bytes: bytes = await self._stub(shard_id)(
                    body, timeout=sc.rpc_timeout_seconds, metadata=self._metadata(k)
                )
                received += len(answer_bytes)
                answer = sync_pb2.SyncPatternsResponse.FromString(answer_bytes)
                if not answer.redirect_shard_id:
                    break
                rec.redirects += 1
                shard_id = answer.redirect_shard_id
                if shard_id not in self.stubs:
                    break
            return answer

        version = 0
        try:
            if malformed:
                rec.device_faults["malformed_sent"] += 1
                kind = int(self.rng.integers(0, 2))
                answer = await send(fleet.malformed_request(k, sim_ms, kind))
            else:
                answer = sync_pb2.SyncPatternsResponse()
                if k in fleet.needs_pull:  # a factory-reset store learns its version first
                    answer = await send(fleet.pull_request(k))
                    if not answer.redirect_shard_id:
                        fleet.learn(k, answer)
                if not answer.redirect_shard_id:
                    body, version = fleet.request(k, sim_ms)
                    answer = await send(body)
        except grpc.aio.AioRpcError as exc:
            self._done(seq)
            if malformed and exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                rec.device_faults["malformed_refused"] += 1
                rec.record_refused(scheduled, sent)
                return
            rec.record_failure(scheduled, exc.code().name, sent)
            return
        except DecodeError:
            self._done(seq)
            rec.record_failure(scheduled, "BAD_ANSWER", sent)
            return
        # (a cancellation leaves the sync in `inflight`: `run` counts it as UNFINISHED)
        self._done(seq)
        if answer.redirect_shard_id:
            rec.record_failure(scheduled, "REDIRECTED", sent)
            return
        if malformed:
            rec.device_faults["malformed_accepted"] += 1
            rec.record_failure(scheduled, "MALFORMED_ACCEPTED", sent)
            return
        if k not in fleet.needs_pull:  # (an answer to a sync sent before a reset: dropped)
            behind = fleet.acknowledge(k, version, answer)
            if k in self.stale:
                self._settle_stale(k, version, answer, behind)
            if k in self.awaiting_resume:
                self.awaiting_resume.discard(k)
                resumed = answer.acknowledged_version >= version and not answer.duplicate
                rec.device_faults["resets_resumed" if resumed else "resets_wedged"] += 1
        rec.record_ok(scheduled, self.now(), sent, received, answer.duplicate)

    def _settle_stale(
        self, k: int, version: int, answer: sync_pb2.SyncPatternsResponse, behind: bool
    ) -> None:
        """Follow a rolled-back device: the shard should answer its stale version as a
        duplicate acknowledging its own later version (``stale_detected``), after which the
        renumbered changes are applied (``stale_resumed``). Shown behind twice:
        ``stale_wedged``. Applied before being shown behind: ``stale_passed`` when its
        version had passed the one acknowledged before the rollback (new changes), else
        ``stale_applied``, the failure of a shard that applied a version twice."""
        faults = self.recorder.device_faults
        before, detected = self.stale[k]
        if behind:
            if detected:
                faults["stale_wedged"] += 1
                del self.stale[k]
            else:
                faults["stale_detected"] += 1
                self.stale[k] = (before, True)
        elif answer.acknowledged_version >= version and not answer.duplicate:
            if detected:
                faults["stale_resumed"] += 1
            else:
                faults["stale_passed" if version > before else "stale_applied"] += 1
            del self.stale[k]

    def _done(self, seq: int) -> None:
        self.inflight.pop(seq, None)

    async def run(
        self,
        times: npt.NDArray[np.float64],
        devices: npt.NDArray[np.int32],
        start_at_wall: float,
        progress: Any,
    ) -> None:
        sc = self.spec.scenario
        self.start = time.perf_counter() + (start_at_wall - time.time())
        launch_until = sc.duration_seconds + sc.rpc_timeout_seconds
        hard_stop = launch_until + sc.rpc_timeout_seconds + 1.0
        tasks: set[asyncio.Task[None]] = set()
        n = int(times.shape[0])
        i = 0
        next_progress = 0.0
        while i < n:
            now = self.now()
            if now >= next_progress:
                next_progress = now + _PROGRESS_SECONDS
                self.report(progress, i, n)
            if now > launch_until:
                break
            due = float(times[i])
            if due > now:
                await asyncio.sleep(min(due - now, _PROGRESS_SECONDS))
                continue
            while i < n and float(times[i]) <= now:
                self.inflight[i] = float(times[i])
                task = asyncio.create_task(self.one(i, int(devices[i]), float(times[i])))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            self.launched = i
            await asyncio.sleep(0)
        for t in times[i:]:
            self.recorder.record_failure(float(t), "NOT_SENT")
        while tasks and self.now() < hard_stop:
            self.report(progress, i, n)
            await asyncio.wait(set(tasks), timeout=min(_PROGRESS_SECONDS, hard_stop - self.now()))
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for scheduled in self.inflight.values():
            self.recorder.record_failure(scheduled, "UNFINISHED")
        self.inflight.clear()
        if self.awaiting_resume:  # reset, but no answered sync after it before the end
            self.recorder.device_faults["resets_unresolved"] += len(self.awaiting_resume)
        if self.stale:  # rolled back, not settled before the end
            self.recorder.device_faults["stale_unresolved"] += len(self.stale)
        self.report(progress, i, n)

    def report(self, progress: Any, launched: int, scheduled: int) -> None:
        if progress is None:
            return
        rec = self.recorder
        progress.put(
            (
                "progress",
                self.spec.worker,
                {
                    "t": self.now(),
                    "launched": launched,
                    "scheduled": scheduled,
                    "ok": rec.total_ok,
                    "failed": rec.total_failed,
                    "inflight": len(self.inflight),
                    "p99_ms": rec.latency.get_value_at_percentile(99.0) / 1000.0,
                    "bytes_up": sum(rec.bytes_up),
                    "bytes_down": sum(rec.bytes_down),
                    "refused": rec.total_refused,
                    "errors": dict(rec.errors),
                    "latency_buckets": list(rec.latency_buckets),
                    "latency_sum": rec.latency_sum,
                },
            )
        )

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


def run_worker(
    spec: WorkerSpec, start_at_wall: float | None = None, progress: Any = None, ready: Any = None
) -> dict[str, Any]:
    """Build the devices and the schedule, wait for the start, send, return the measurements.

    Args:
        spec: this worker's part of the run.
        start_at_wall: the start as ``time.time()``; None: wait for ``ready`` to return it.
        progress: a queue receiving ``("progress", worker, figures)`` tuples, or None.
        ready: called once the schedule is built with the scheduled count; returns the
            start time (``time.time()``) when ``start_at_wall`` is None.

    Returns:
        ``Recorder.to_dict()`` plus ``cpu_seconds`` and ``devices``.
    """
    sc = spec.scenario
    indices = np.arange(spec.worker, sc.devices, sc.workers, dtype=np.int64)
    fleet = DeviceFleet(
        indices,
        spec.taste,
        spec.prefix,
        sc.seed,
        sc.favourite_clusters,
        sc.views_per_day,
        sc.clock_skew_seconds,
    )
    rng = np.random.default_rng([sc.seed, 5, spec.worker])
    times, devices = build_schedule(sc, len(fleet), rng)
    recorder = Recorder(spec.window_seconds, spec.windows)
    faults_rng = np.random.default_rng([sc.seed, 8, spec.worker])
    times, devices, appeared, vanished = apply_churn(sc, times, devices, len(fleet), faults_rng)
    if appeared or vanished:
        recorder.device_faults.update({"churn_appeared": appeared, "churn_vanished": vanished})
    resets: dict[int, float] = {}
    n_resets = round(sc.factory_reset_fraction * len(fleet))
    if n_resets:
        chosen = faults_rng.choice(len(fleet), n_resets, replace=False)
        at = faults_rng.uniform(0.2, 0.6, n_resets) * sc.duration_seconds
        resets = {int(k): float(t) for k, t in zip(chosen, at, strict=True)}
    rollbacks: dict[int, float] = {}
    n_stale = min(round(sc.stale_fraction * len(fleet)), len(fleet) - len(resets))
    if n_stale:
        free = np.setdiff1d(np.arange(len(fleet)), np.fromiter(resets, np.int64, len(resets)))
        chosen = faults_rng.choice(free, n_stale, replace=False)
        at = faults_rng.uniform(0.2, 0.6, n_stale) * sc.duration_seconds
        rollbacks = {int(k): float(t) for k, t in zip(chosen, at, strict=True)}
    recorder.schedule(times)
    start = ready(int(times.shape[0])) if ready is not None else None
    start_wall = start_at_wall if start_at_wall is not None else start
    if start_wall is None:
        raise ValueError("no start time")

    async def main() -> None:
        sender = _Sender(spec, fleet, recorder)
        sender.resets = resets
        sender.rollbacks = rollbacks
        sender.open_channels()
        try:
            await sender.run(times, devices, start_wall, progress)
        finally:
            await sender.close()

    cpu0 = time.process_time()
    asyncio.run(main())
    out = recorder.to_dict()
    out["cpu_seconds"] = time.process_time() - cpu0
    out["devices"] = len(fleet)
    return out


def worker_process(spec: WorkerSpec, channel: Any, start_event: Any, start_at: Any) -> None:
    """Entry of a spawned worker: ``("ready", worker, scheduled)``, then waits for the start
    event, runs, and puts ``("result", worker, figures)`` (or ``("error", worker, text)``)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    def ready(scheduled: int) -> float:
        channel.put(("ready", spec.worker, scheduled))
        if not start_event.wait(timeout=600):
            raise TimeoutError("no start signal")
        return float(start_at.value)

    try:
        result = run_worker(spec, progress=channel, ready=ready)
    except BaseException as exc:  # reported to the parent, which accounts the lost syncs
        channel.put(("error", spec.worker, f"{type(exc).__name__}: {exc}"))
        raise
    channel.put(("result", spec.worker, result))
    try:
        channel.close()
        channel.join_thread()
    except (OSError, ValueError, queue_module.Full):
        pass
