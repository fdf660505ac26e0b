"""A fleet run: worker processes started, synchronized on one start time, watched (live
progress on a terminal with `rich`), stopped by a hard deadline, their measurements merged.

Every run stops by itself: workers stop launching ``rpc_timeout_seconds`` after the scenario's
duration and cancel what is still open another timeout later; the parent waits at most a
further 30 s for their results and terminates any worker that has not answered (its
scheduled syncs are then counted as ``WORKER_LOST`` failures).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import queue as queue_module
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from omega_simulator.access import FleetAccess
from omega_simulator.fleet_catalog import CatalogTaste
from omega_simulator.fleet_measure import Recorder
from omega_simulator.fleet_metrics import FleetMetrics
from omega_simulator.fleet_scenario import Scenario
from omega_simulator.fleet_worker import WorkerSpec, worker_process

__all__ = ["FleetRun", "run_fleet", "series_windows"]

_READY_TIMEOUT_SECONDS = 300.0
_RESULT_GRACE_SECONDS = 30.0
_START_MARGIN_SECONDS = 0.5


def series_windows(scenario: Scenario) -> tuple[float, int]:
    """Window width (s) and count of a run's time series: at most about 120 windows over
    the duration, plus room for the stragglers answered after it."""
    width = max(1.0, scenario.duration_seconds / 120.0)
    tail = 2 * scenario.rpc_timeout_seconds + 2.0
    return width, math.ceil((scenario.duration_seconds + tail) / width) + 1


@dataclass
class FleetRun:
    """The merged measurements of one run and what the report says about it."""

    scenario: Scenario
    recorder: Recorder
    shards: dict[str, str]
    prefix: str
    started_at: float
    wall_seconds: float
    worker_cpu_seconds: list[float] = field(default_factory=list)
    lost_workers: list[str] = field(default_factory=list)
    proxy: dict[str, Any] = field(default_factory=dict)
    """With faults: ``{"shards": the real addresses, "stats": FaultProxies.stats()}``."""
    kills: list[dict[str, Any]] = field(default_factory=list)
    """With ``kill`` faults: `omega_simulator.fleet_kill.ReplicaKills.events`."""
    closed_loop: bool = False
    """True for a run without a schedule (the replay): each sync counts as scheduled when its
    device started it, so its latency does not include waiting for an earlier one."""


def _progress_table(scenario: Scenario, figures: dict[int, dict[str, Any]], t: float) -> Table:
    table = Table(title=f"omega-simulator fleet: {scenario.name}", show_header=True)
    for name in ("elapsed", "sent", "ok", "failed", "in flight", "p99 ms", "ok/s"):
        table.add_column(name, justify="right")
    ok = sum(int(f["ok"]) for f in figures.values())
    table.add_row(
        f"{t:.0f} / {scenario.duration_seconds:.0f} s",
        f"{sum(int(f['launched']) for f in figures.values()):,}",
        f"{ok:,}",
        f"{sum(int(f['failed']) for f in figures.values()):,}",
        f"{sum(int(f['inflight']) for f in figures.values()):,}",
        f"{max((float(f['p99_ms']) for f in figures.values()), default=0.0):.1f}",
        f"{ok / t:,.0f}" if t > 0 else "-",
    )
    return table


def run_fleet(
    scenario: Scenario,
    shards: dict[str, str],
    access: FleetAccess,
    taste: CatalogTaste,
    *,
    live: bool | None = None,
    prefix: str | None = None,
    on_start: Callable[[float], None] | None = None,
    metrics: FleetMetrics | None = None,
) -> FleetRun:
    """Run ``scenario`` against ``shards`` with ``scenario.workers`` processes.

    Args:
        scenario: the run.
        shards: shard id -> ``host:port`` (one entry: every device goes there).
        access: TLS trust and fleet keys of the simulated devices.
        taste: the catalog's clusters.
        live: show live progress (default: when stdout is a terminal).
        prefix: device id prefix (default: a fresh one, so runs never share devices).
        on_start: called with the run's start (``time.time()``, about 0.5 s ahead) before
            the workers are released (the fault proxies' timeline starts there).
        metrics: live Prometheus export, updated with every worker's progress.

    Raises:
        RuntimeError: a worker did not get ready in time.
    """
    live = sys.stdout.isatty() if live is None else live
    prefix = prefix or f"sim-{uuid.uuid4().hex[:8]}"
    width, windows = series_windows(scenario)
    ctx = mp.get_context("spawn")
    channel: Any = ctx.Queue()
    start_event = ctx.Event()
    start_at = ctx.Value("d", 0.0)
    procs = []
    for w in range(scenario.workers):
        spec = WorkerSpec(w, scenario, shards, access, taste, prefix, width, windows)
        proc = ctx.Process(
            target=worker_process,
            args=(spec, channel, start_event, start_at),
            name=f"fleet-worker-{w}",
            daemon=True,
        )
        proc.start()
        procs.append(proc)
    scheduled: dict[int, int] = {}
    results: dict[int, dict[str, Any]] = {}
    errors: dict[int, str] = {}
    figures: dict[int, dict[str, Any]] = {}
    try:
        deadline = time.monotonic() + _READY_TIMEOUT_SECONDS
        while len(scheduled) + len(errors) < scenario.workers:
            if time.monotonic() > deadline:
                raise RuntimeError("the fleet workers did not get ready in time")
            with contextlib.suppress(queue_module.Empty):
                kind, w, value = channel.get(timeout=0.5)
                if kind == "ready":
                    scheduled[w] = int(value)
                    if metrics is not None:
                        metrics.scheduled(w, int(value))
                elif kind == "error":
                    errors[w] = str(value)
        started = time.time() + _START_MARGIN_SECONDS
        start_at.value = started
        if on_start is not None:
            on_start(started)
        start_event.set()
        hard_end = (
            time.monotonic()
            + _START_MARGIN_SECONDS
            + scenario.duration_seconds
            + 2 * scenario.rpc_timeout_seconds
            + 1.0
            + _RESULT_GRACE_SECONDS
        )
        console = Console()
        with (
            Live(_progress_table(scenario, figures, 0.0), console=console, refresh_per_second=2)
            if live
            else contextlib.nullcontext() as display
        ):
            while len(results) + len(errors) < scenario.workers and time.monotonic() < hard_end:
                try:
                    kind, w, value = channel.get(timeout=0.5)
                except queue_module.Empty:
                    if all(not p.is_alive() for p in procs):
                        break
                    continue
                if kind == "progress":
                    figures[w] = value
                    if metrics is not None:
                        metrics.update(w, value)
                    if display is not None:
                        display.update(
                            _progress_table(scenario, figures, max(0.0, time.time() - started))
                        )
                elif kind == "result":
                    results[w] = value
                elif kind == "error":
                    errors[w] = str(value)
    finally:
        start_event.set()  # a worker still waiting must not hang
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
    wall = time.time() - started
    recorder = Recorder(width, windows)
    lost: list[str] = []
    for w in range(scenario.workers):
        if w in results:
            recorder.merge(results[w])
        else:
            lost.append(f"worker {w}: {errors.get(w, 'no result before the deadline')}")
            recorder.scheduled[0] += scheduled.get(w, 0)
            recorder.record_failure(0.0, "WORKER_LOST", count=scheduled.get(w, 0))
    return FleetRun(
        scenario,
        recorder,
        shards,
        prefix,
        started,
        wall,
        [float(results[w]["cpu_seconds"]) for w in sorted(results)],
        lost,
    )
