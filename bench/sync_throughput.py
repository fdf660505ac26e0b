"""bench-sync: the shard's full SyncPatterns pipeline against a bare grpc.aio echo server.

Both servers get the same request bytes (a real brain's steady-state sync, see
`bench.sync_load`) from the same multi-process load generator, in the same run:

1. **Maximum**: closed loop at several in-flight counts; the best throughput (syncs/s) and
   its p50/p99 (latency from the send).
2. **70% of maximum, open loop**: sends scheduled in advance at 0.7 x the server's own
   maximum; p50/p99/p99.9 measured from the *scheduled* time, so queueing is not hidden.

For each, CPU seconds per request of the server process, of Postgres (every ``postgres``
process on the machine, read from /proc) and of the load generator. The shard runs as a
child process (plaintext, credentials off, no per-device rate limit: the bench measures the
sync pipeline: decode, validate, Postgres, answer) over a database of its own.

Usage::

    .venv/bin/python -m bench.sync_throughput [--seconds 5] [--workers 2] [--quick]

Prints one table and writes the ``sync`` section of ``reports/bench.json`` (``ratio_to_bare``,
``p99_ms_at_70pct``, ...). Figures only: nothing fails on timing.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.echo_server import serve_echo
from bench.procstat import cpu_between, postgres_snapshot, snapshot
from bench.report import DEFAULT_JSON, format_table, machine, write_section
from bench.sync_load import SYNC_METHOD, LoadResult, request_bytes, run_worker, template_request
from tools.fuzz.shard import ShardProcess, admin_dsn, free_port


@dataclass
class Phase:
    """One measured phase against one server, merged over the workers."""

    label: str
    offered: str
    result: LoadResult
    server_cpu: float
    postgres_cpu: float

    @property
    def ok(self) -> int:
        return len(self.result.latencies_ms)

    @property
    def throughput(self) -> float:
        return self.ok / self.result.elapsed_seconds if self.result.elapsed_seconds else 0.0

    def percentile(self, q: float) -> float:
        lat = self.result.latencies_ms
        return float(np.percentile(lat, q)) if lat else float("nan")

    def per_request_ms(self, seconds: float) -> float:
        return seconds * 1000.0 / self.result.sent if self.result.sent else float("nan")

    def summary(self) -> dict[str, Any]:
        r = self.result
        return {
            "offered": self.offered,
            "sent": r.sent,
            "ok": self.ok,
            "errors": dict(r.errors),
            "syncs_per_second": round(self.throughput, 1),
            "p50_ms": round(self.percentile(50), 2),
            "p90_ms": round(self.percentile(90), 2),
            "p99_ms": round(self.percentile(99), 2),
            "p999_ms": round(self.percentile(99.9), 2),
            "max_ms": round(max(r.latencies_ms), 2) if r.latencies_ms else None,
            "bytes_up_per_sync": round(r.bytes_up / r.sent, 1) if r.sent else None,
            "bytes_down_per_sync": round(r.bytes_down / self.ok, 1) if self.ok else None,
            "cpu_ms_per_request": {
                "server": round(self.per_request_ms(self.server_cpu), 3),
                "postgres": round(self.per_request_ms(self.postgres_cpu), 3),
                "load_generator": round(self.per_request_ms(r.cpu_seconds), 3),
            },
        }


class Runner:
    """Runs phases with a pool of load-generator processes against one target."""

    def __init__(
        self,
        pool: ProcessPoolExecutor,
        workers: int,
        catalog: Path,
        pids: list[int],
        connections: int,
    ):
        self._pool = pool
        self._workers = workers
        self._catalog = catalog
        self._pids = pids
        self._connections = connections

    def run(self, label: str, kind: str, amount: float, seconds: float, target: str) -> Phase:
        """``kind`` "closed" (``amount`` in flight in total) or "open" (``amount`` syncs/s)."""
        per_worker = amount / self._workers
        if kind == "closed":
            per_worker = max(1.0, round(per_worker))
            needed = int(8000 * seconds / self._workers) + 500
        else:
            needed = int(per_worker * seconds) + 10
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        server0, pg0 = snapshot(self._pids), postgres_snapshot()
        futures = [
            self._pool.submit(
                run_worker,
                w,
                target,
                str(self._catalog),
                devices=2000,
                total_requests=needed,
                phases=[(kind, per_worker, seconds)],
                device_prefix=prefix,
                connections=self._connections,
            )
            for w in range(self._workers)
        ]
        parts = [f.result()[0] for f in futures]
        merged = LoadResult(errors=Counter())
        for p in parts:
            merged.latencies_ms.extend(p.latencies_ms)
            merged.errors.update(p.errors)
            merged.bytes_up += p.bytes_up
            merged.bytes_down += p.bytes_down
            merged.sent += p.sent
            merged.cpu_seconds += p.cpu_seconds
            merged.elapsed_seconds = max(merged.elapsed_seconds, p.elapsed_seconds)
        server = cpu_between(server0, snapshot(self._pids))
        postgres = cpu_between(pg0, postgres_snapshot())
        offered = f"{amount:.0f} in flight" if kind == "closed" else f"{amount:.0f}/s open"
        return Phase(label, offered, merged, server, postgres)


def _measure(
    name: str,
    target: str,
    pids: list[int],
    pool: ProcessPoolExecutor,
    catalog: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Maximum (closed-loop sweep) then 70% of it open-loop, against one server."""
    runner = Runner(pool, args.workers, catalog, pids, args.connections)
    runner.run("warm-up", "closed", 16, min(2.0, args.seconds), target)
    sweep = []
    for n, c in enumerate(args.in_flight):
        profiler = None
        if args.profile is not None and name == "pipeline" and n == len(args.in_flight) - 1:
            # py-spy on the shard during the last (largest) closed-loop phase.
            profiler = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("py-spy")),
                    "record",
                    "--pid",
                    str(pids[0]),
                    "--duration",
                    str(max(1, int(args.seconds))),
                    "--format",
                    "raw",
                    "--output",
                    str(args.profile),
                    "--nonblocking",
                    "--rate",
                    "250",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        sweep.append(runner.run("max", "closed", c, args.seconds, target))
        if profiler is not None:
            profiler.wait(60)
    best = max(sweep, key=lambda p: p.throughput)
    rate = 0.7 * best.throughput
    open70 = runner.run("70%", "open", rate, args.seconds * args.open_factor, target)
    print(
        f"{name}: max {best.throughput:,.0f} syncs/s at {best.offered};"
        f" 70% open loop {rate:,.0f}/s: p99 {open70.percentile(99):.1f} ms",
        file=sys.stderr,
    )
    return {
        "sweep": [p.summary() for p in sweep],
        "max": best.summary(),
        "open_70pct": open70.summary(),
        "_best": best,
        "_open": open70,
    }


async def _probe_reply(target: str, body: bytes) -> bytes:
    """The shard's answer to one request (the echo server sends these bytes back)."""
    async with grpc.aio.insecure_channel(target) as channel:
        answer: bytes = await channel.unary_unary(SYNC_METHOD)(body, timeout=10)
        return answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per phase (5)")
    parser.add_argument("--open-factor", type=float, default=2.0, help="open phase length x")
    parser.add_argument("--workers", type=int, default=2, help="load-generator processes (2)")
    parser.add_argument(
        "--in-flight", type=int, nargs="+", default=[16, 64, 128, 256], help="closed-loop sweep"
    )
    parser.add_argument("--postgres-url", help="maintenance DSN (default: local, else embedded)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="reports/bench.json")
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="shard processes on one port and database (SO_REUSEPORT; default 1)",
    )
    parser.add_argument(
        "--connections", type=int, default=4, help="TCP connections per load-generator worker"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy the shard during the largest closed-loop phase into this file (raw "
        "collapsed stacks)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra OMEGA_CONSTELLATION_* setting of the shard (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.open_factor, args.in_flight = 0.5, 1.0, [8]
    extra = dict(kv.split("=", 1) for kv in args.env)
    return asyncio.run(_main(args, extra))


async def _main(args: argparse.Namespace, extra: dict[str, str]) -> int:
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="omega-bench-sync-") as tmp:
        work = Path(tmp)
        shard = await ShardProcess.start(
            await admin_dsn(args.postgres_url),
            work,
            {"OMEGA_CONSTELLATION_LOG_LEVEL": "WARNING", **extra},
            auth=False,
        )
        echo = None
        try:
            pids = [shard.pid]
            for _ in range(args.replicas - 1):
                pids.append(await shard.add_replica())
            catalog = work / "catalog.npz"
            template = template_request(catalog)
            body = request_bytes(template, "bench-probe", 1)
            reply = await _probe_reply(shard.targets[0], body)
            ready = ctx.Event()
            echo_port = free_port()
            echo = ctx.Process(target=serve_echo, args=(echo_port, reply, ready), daemon=True)
            echo.start()
            if not ready.wait(30):
                raise RuntimeError("the echo server did not start")
            with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
                bare = await asyncio.to_thread(
                    _measure,
                    "bare echo",
                    f"127.0.0.1:{echo_port}",
                    [echo.pid or 0],
                    pool,
                    catalog,
                    args,
                )
                full = await asyncio.to_thread(
                    _measure, "pipeline", shard.targets[0], pids, pool, catalog, args
                )
        finally:
            if echo is not None and echo.is_alive():
                echo.terminate()
                echo.join(10)
            await shard.stop()
    section = _section(args, len(body), len(reply), bare, full)
    _print(section, bare, full)
    write_section(args.json, "sync", section)
    print(f"written: {args.json} (section 'sync')")
    return 0


def _section(
    args: argparse.Namespace,
    up: int,
    down: int,
    bare: dict[str, Any],
    full: dict[str, Any],
) -> dict[str, Any]:
    b, f = bare["_best"], full["_best"]
    return {
        "machine": machine(),
        "settings": {
            "seconds_per_phase": args.seconds,
            "workers": args.workers,
            "in_flight_sweep": args.in_flight,
            "replicas": args.replicas,
            "connections_per_worker": args.connections,
            "quick": args.quick,
        },
        "request_bytes": up,
        "reply_bytes": down,
        "ratio_to_bare": round(f.throughput / b.throughput, 3) if b.throughput else None,
        "max_syncs_per_second": round(f.throughput, 1),
        "bare_max_syncs_per_second": round(b.throughput, 1),
        "p99_ms_at_max": round(f.percentile(99), 2),
        "p99_ms_at_70pct": round(full["_open"].percentile(99), 2),
        "bare_p99_ms_at_70pct": round(bare["_open"].percentile(99), 2),
        "pipeline": {k: v for k, v in full.items() if not k.startswith("_")},
        "bare": {k: v for k, v in bare.items() if not k.startswith("_")},
    }


def _print(section: dict[str, Any], bare: dict[str, Any], full: dict[str, Any]) -> None:
    rows = []
    for name, m in (("bare grpc.aio echo", bare), ("constellation SyncPatterns", full)):
        for key, phase in (("max", m["_best"]), ("70% open", m["_open"])):
            s = phase.summary()
            cpu = s["cpu_ms_per_request"]
            errors = sum(s["errors"].values())
            rows.append(
                [
                    f"{name} @ {key} ({s['offered']})",
                    s["syncs_per_second"],
                    s["p50_ms"],
                    s["p99_ms"],
                    s["p999_ms"],
                    errors,
                    cpu["server"],
                    cpu["postgres"],
                    cpu["load_generator"],
                ]
            )
    header = [
        "target",
        "syncs/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "errors",
        "server ms/req",
        "postgres ms/req",
        "loadgen ms/req",
    ]
    print(format_table(header, rows))
    print(
        f"pipeline / bare throughput: {section['ratio_to_bare']} (target >= 0.5);"
        f" pipeline p99 at 70% of its max: {section['p99_ms_at_70pct']} ms (target < 50);"
        f" request {section['request_bytes']} B, reply {section['reply_bytes']} B"
    )


if __name__ == "__main__":
    sys.exit(main())
