"""bench-fleet: the largest fleet this machine sustains at one sync per 5 minutes.

A local stack (one shard process with TLS and device tokens, as ``omega-simulator fleet
--local`` starts it, over Postgres: ``$OMEGA_DATABASE_URL``, the test server or the embedded
one; ``--shards N`` shards, each of ``--replicas R`` processes on one port, for the capacity of
a bigger constellation on the same machine) is loaded by ``omega-simulator fleet`` runs of
growing size. Each step is an open-loop run
(syncs scheduled in advance, latency from the scheduled time) of a fleet of ``N`` devices at
one sync per 300 s, i.e. ``N / 300`` syncs per second; with ``--compression c`` it simulates
``N / c`` devices at time compression ``c`` (same rate, each device syncing ``c`` times as
often). A step *holds* when its p99 is under 200 ms and at most 0.1% of its syncs fail.

Search: the fleet doubles from ``--start`` while steps hold, then the last holding and first
failing sizes are bisected ``--bisect`` times. For each step: the scheduled rate, p50/p99,
errors, and where the CPU went, in cores (CPU seconds over the step's wall seconds): the
simulator (its worker processes and this one), the shard processes and Postgres (every
process named ``postgres``, from /proc/<pid>/stat utime + stime).

Usage::

    .venv/bin/python -m bench.fleet_capacity [--seconds 20] [--start 10000] [--quick]

Prints one table and writes the ``fleet`` section of ``reports/bench.json`` (``fleet_<N>x<R>``
with several shards or replicas)
(``capacity_devices``, ``capacity_syncs_per_second``, ``limited_by``, ``steps``). Figures only:
nothing fails on timing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.procstat import cpu_between, postgres_snapshot, snapshot
from bench.report import DEFAULT_JSON, format_table, machine, write_section
from omega_simulator.fleet_catalog import CatalogTaste, synthetic_catalog, write_catalog_npz
from omega_simulator.fleet_report import build_report
from omega_simulator.fleet_run import run_fleet
from omega_simulator.fleet_scenario import load_scenario
from omega_simulator.stack import LocalStack
from tools.fuzz.shard import admin_dsn

_P99_LIMIT_MS = 200.0
_ERROR_LIMIT = 0.001
_INTERVAL_SECONDS = 300.0
_CATALOG_ITEMS = 2000
_CATALOG_CLUSTERS = 40


def _step(
    stack: LocalStack, taste: CatalogTaste, size: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One open-loop run of a fleet of ``size`` devices; its figures and CPU by component."""
    compression = float(args.compression)
    simulated = max(1, round(size / compression))
    scenario = load_scenario("light").with_overrides(
        name=f"capacity-{size}",
        description=f"capacity step: {size:,} devices at one sync per 5 minutes",
        devices=simulated,
        sync_interval_seconds=_INTERVAL_SECONDS,
        time_compression=compression,
        duration_seconds=args.seconds,
        workers=args.workers,
        rpc_timeout_seconds=5.0,
        seed=size,
    )
    pids = list(stack.pids().values())
    at_start: dict[str, dict[int, float]] = {}
    self_start: list[float] = []

    def on_start(_origin: float) -> None:  # the workers are ready: the step starts
        at_start["shard"] = snapshot(pids)
        at_start["postgres"] = postgres_snapshot()
        self_start.append(time.process_time())

    run = run_fleet(scenario, stack.shards, stack.access, taste, live=False, on_start=on_start)
    shard = cpu_between(at_start["shard"], snapshot(pids))
    postgres = cpu_between(at_start["postgres"], postgres_snapshot())
    # the workers' CPU while they sent (their own process_time) plus this process's
    simulator = sum(run.worker_cpu_seconds) + time.process_time() - self_start[0]
    f = build_report(run)["figures"]
    lat = f["latency_ms"]
    wall = max(run.wall_seconds, 1e-9)
    holds = (
        f["accounted"]
        and not run.lost_workers
        and f["scheduled"] > 0
        and lat["p99"] < _P99_LIMIT_MS
        and f["error_rate"] <= _ERROR_LIMIT
    )
    return {
        "devices": size,
        "simulated_devices": simulated,
        "time_compression": compression,
        "scheduled_per_second": f["scheduled_per_second"],
        "throughput_per_second": f["throughput_per_second"],
        "scheduled": f["scheduled"],
        "ok": f["ok"],
        "failed": f["failed"],
        "error_rate": f["error_rate"],
        "errors": build_report(run)["errors"],
        "p50_ms": lat["p50"],
        "p99_ms": lat["p99"],
        "p99_9_ms": lat["p99_9"],
        "max_ms": lat["max"],
        "send_lag_ms_p99": f["send_lag_ms_p99"],
        "wall_seconds": run.wall_seconds,
        "cpu_cores": {
            "simulator": simulator / wall,
            "shard": shard / wall,
            "postgres": postgres / wall,
        },
        "holds": holds,
    }


def _search(
    stack: LocalStack, taste: CatalogTaste, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Double from ``args.start`` while steps hold, then bisect between hold and fail."""
    steps: list[dict[str, Any]] = []

    def measure(size: int) -> bool:
        step = _step(stack, taste, size, args)
        steps.append(step)
        cpu = step["cpu_cores"]
        print(
            f"  {size:>9,} devices {step['scheduled_per_second']:>8,.1f}/s  "
            f"p50 {step['p50_ms']:7.1f}  p99 {step['p99_ms']:7.1f} ms  "
            f"failed {step['failed']:,}  cpu sim/shard/pg "
            f"{cpu['simulator']:.2f}/{cpu['shard']:.2f}/{cpu['postgres']:.2f}  "
            f"{'holds' if step['holds'] else 'FAILS'}",
            flush=True,
        )
        return bool(step["holds"])

    good, bad = 0, 0
    size = args.start
    for _ in range(args.max_doublings + 1):
        if measure(size):
            good = size
            size *= 2
        else:
            bad = size
            break
    if good and bad:
        for _ in range(args.bisect):
            if bad - good <= max(1000, good // 50):
                break
            middle = int(round((good + bad) / 2, -3)) or (good + bad) // 2
            if measure(middle):
                good = middle
            else:
                bad = middle
    return steps


def _limited_by(steps: list[dict[str, Any]], cores: int) -> str:
    """A sentence on what stopped the fleet from growing."""
    failing = [s for s in steps if not s["holds"]]
    if not failing:
        return "nothing within the search: every step held (raise --max-doublings)"
    first = min(failing, key=lambda s: s["devices"])
    cpu = first["cpu_cores"]
    busiest = max(cpu, key=lambda k: cpu[k])
    total = sum(cpu.values())
    why = (
        f"p99 {first['p99_ms']:.0f} ms"
        if first["p99_ms"] >= _P99_LIMIT_MS
        else f"{100 * first['error_rate']:.2f}% failed"
    )
    return (
        f"{why} at {first['devices']:,} devices ({first['scheduled_per_second']:,.0f} syncs/s); "
        f"CPU there {total:.2f} of {cores} cores: {busiest} {cpu[busiest]:.2f}, "
        + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items() if k != busiest)
        + (" (the machine's CPU is saturated)" if total >= 0.9 * cores else "")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=20.0, help="wall seconds per step")
    parser.add_argument("--start", type=int, default=10_000, help="first fleet size")
    parser.add_argument("--max-doublings", type=int, default=8, help="doublings at most")
    parser.add_argument("--bisect", type=int, default=3, help="bisection steps after")
    parser.add_argument(
        "--compression",
        type=float,
        default=1.0,
        help="time compression: simulate size/c devices syncing c times as often",
    )
    parser.add_argument("--workers", type=int, default=1, help="load-generator processes")
    parser.add_argument("--shards", type=int, default=1, help="shards of the local stack")
    parser.add_argument(
        "--replicas", type=int, default=1, help="processes per shard, on one port (SO_REUSEPORT)"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="bench JSON to update")
    parser.add_argument(
        "--quick", action="store_true", help="smoke: 4 s steps from 2,000 devices, 2 steps"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.start, args.max_doublings, args.bisect = 4.0, 2000, 1, 0
    if not os.environ.get("OMEGA_DATABASE_URL"):
        os.environ["OMEGA_DATABASE_URL"] = asyncio.run(admin_dsn())
    cores = os.cpu_count() or 1
    if args.shards < 1 or args.replicas < 1:
        parser.error("--shards and --replicas are at least 1")
    topology = f"{args.shards} shard(s) x {args.replicas} replica(s)"
    section = (
        "fleet"
        if (args.shards, args.replicas) == (1, 1)
        else (f"fleet_{args.shards}x{args.replicas}")
    )
    with tempfile.TemporaryDirectory(prefix="omega-bench-fleet-") as tmp:
        work = Path(tmp)
        catalog = work / "catalog.npz"
        ids, embeddings = synthetic_catalog(_CATALOG_ITEMS, _CATALOG_CLUSTERS)
        write_catalog_npz(catalog, ids, embeddings)
        taste = CatalogTaste.from_embeddings(ids, embeddings, 32, 0)
        stack = LocalStack(
            work,
            args.shards,
            replicas=args.replicas,
            env={
                "OMEGA_CONSTELLATION_LOG_LEVEL": "WARNING",
                # one device syncs at most once per 5 minutes here, but with --compression
                # far more often: the per-device limit would measure the compression
                "OMEGA_CONSTELLATION_DEVICE_RATE_PER_SECOND": "0",
            },
            database_prefix=f"omega_bench_fleet_{os.getpid()}",
        )
        print(
            f"bench-fleet: {topology}, {cores} CPU(s), {args.seconds:g} s open-loop steps",
            flush=True,
        )
        try:
            with stack.running(catalog, 1000):
                steps = _search(stack, taste, args)
        finally:
            stack.drop_databases()
    held = [s for s in steps if s["holds"]]
    best = max(held, key=lambda s: s["devices"]) if held else None
    limited = _limited_by(steps, cores)
    print()
    print(
        format_table(
            [
                "devices",
                "syncs/s",
                "ok/s",
                "p50 ms",
                "p99 ms",
                "failed",
                "sim cores",
                "shard cores",
                "pg cores",
                "holds",
            ],
            [
                [
                    f"{s['devices']:,}",
                    s["scheduled_per_second"],
                    s["throughput_per_second"],
                    s["p50_ms"],
                    s["p99_ms"],
                    s["failed"],
                    s["cpu_cores"]["simulator"],
                    s["cpu_cores"]["shard"],
                    s["cpu_cores"]["postgres"],
                    "yes" if s["holds"] else "no",
                ]
                for s in sorted(steps, key=lambda s: s["devices"])
            ],
        )
    )
    print()
    if best is None:
        print(f"capacity ({topology}): no step held (p99 < {_P99_LIMIT_MS:g} ms); {limited}")
    else:
        print(
            f"capacity ({topology}): {best['devices']:,} devices at one sync per 5 minutes "
            f"({best['scheduled_per_second']:,.0f} syncs/s, p99 {best['p99_ms']:.0f} ms); "
            f"limited by: {limited}"
        )
    write_section(
        args.json,
        section,
        {
            "machine": machine(),
            "criterion": {
                "sync_interval_seconds": _INTERVAL_SECONDS,
                "p99_ms_below": _P99_LIMIT_MS,
                "error_rate_at_most": _ERROR_LIMIT,
            },
            "step_seconds": args.seconds,
            "time_compression": args.compression,
            "shards": args.shards,
            "replicas_per_shard": args.replicas,
            "capacity_devices": best["devices"] if best else 0,
            "capacity_syncs_per_second": best["scheduled_per_second"] if best else 0.0,
            "capacity_p99_ms": best["p99_ms"] if best else None,
            "limited_by": limited,
            "steps": sorted(steps, key=lambda s: s["devices"]),
        },
    )
    print(f"written to {args.json} (section {section})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
