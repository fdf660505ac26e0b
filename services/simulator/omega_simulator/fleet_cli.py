"""``omega-simulator fleet`` and ``omega-simulator compare``: argument parsing and wiring.

``fleet`` resolves the scenario (built-in name or file, with command-line overrides), the
target (``--target`` shards, or ``--local``: a local stack of its own with TLS and device
credentials), the catalog's structure (``--catalog`` file, the local stack's catalog, or
``FetchEmbeddings`` from the first shard), runs the fleet and writes the report folder. A
scenario with ``faults`` puts a loopback fault proxy (`omega_simulator.fleet_proxy`) between the
devices and every shard; its ``kill`` faults (``--local`` only) SIGKILL and restart a shard
replica of the local stack (`omega_simulator.fleet_kill`). ``--scenario replay`` runs the
MovieLens replay instead (closed loop, real viewing histories; `omega_simulator.replay_cli`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from rich.console import Console
from rich.table import Table

from omega_simulator.access import FleetAccess
from omega_simulator.fleet_catalog import (
    CatalogTaste,
    fetch_catalog,
    load_catalog_file,
    synthetic_catalog,
    write_catalog_npz,
)
from omega_simulator.fleet_kill import ReplicaKills
from omega_simulator.fleet_metrics import FleetMetrics
from omega_simulator.fleet_proxy import FaultProxies
from omega_simulator.fleet_report import (
    compare_markdown,
    compare_reports,
    load_report,
    write_report,
)
from omega_simulator.fleet_run import run_fleet
from omega_simulator.fleet_scenario import BUILTIN_SCENARIOS, ScenarioError, load_scenario
from omega_simulator.replay_fleet import REPLAY_SCENARIO

if TYPE_CHECKING:
    from omega_simulator.stack import LocalStack

__all__ = [
    "add_compare_arguments",
    "add_fleet_arguments",
    "compare_main",
    "fleet_main",
    "parse_targets",
]

_LOCAL_CATALOG_ITEMS = 2000
_LOCAL_CATALOG_CLUSTERS = 40


def add_fleet_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``omega-simulator fleet``."""
    parser.add_argument(
        "--scenario",
        required=True,
        help=f"{' | '.join(BUILTIN_SCENARIOS)} or a scenario file (.toml, .yaml), or "
        f"{REPLAY_SCENARIO}: the MovieLens replay (943 real users as full brains, closed loop, "
        "with the federation rounds and the quality report; --devices N replays the first N "
        "users, --workers sets its threads; --duration, --time-compression, --catalog and "
        "--metrics-port do not apply)",
    )
    parser.add_argument("--duration", type=float, help="wall seconds (overrides the scenario)")
    parser.add_argument("--time-compression", type=float, help="simulated seconds per wall second")
    parser.add_argument("--seed", type=int, help="seed of tastes, schedules and viewings")
    parser.add_argument("--workers", type=int, help="load-generator processes")
    parser.add_argument(
        "--devices", type=int, help="fleet size (overrides the scenario; replay: first N users)"
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--target",
        action="append",
        metavar="[SHARD_ID=]HOST:PORT",
        help="a shard to load (repeat for several; devices are routed by shard_for)",
    )
    where.add_argument(
        "--local",
        action="store_true",
        help="start a local stack (Postgres: OMEGA_DATABASE_URL or embedded) and load it",
    )
    parser.add_argument("--shards", type=int, default=1, help="--local: shards to start")
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="--local: replica processes per shard, sharing its port and database",
    )
    parser.add_argument("--plaintext", action="store_true", help="--target: no TLS")
    parser.add_argument("--tls-ca", type=Path, help="--target: PEM CA of the shards")
    parser.add_argument(
        "--fleet-keys", type=Path, help="--target: fleet keys JSON to issue device tokens"
    )
    parser.add_argument(
        "--catalog", type=Path, help="catalog .npz (default: fetched from the first shard)"
    )
    parser.add_argument("--output", type=Path, help="run folder (default: reports/fleet/...)")
    parser.add_argument(
        "--live", action=argparse.BooleanOptionalAction, help="live progress (default: on a TTY)"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="serve the run's figures as Prometheus metrics on 127.0.0.1:PORT while running",
    )


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``omega-simulator compare``."""
    parser.add_argument("a", type=Path, help="run folder (or report.json) A")
    parser.add_argument("b", type=Path, help="run folder (or report.json) B")
    parser.add_argument(
        "--output", type=Path, help="where compare.md goes (default: B's run folder)"
    )


def parse_targets(values: list[str]) -> dict[str, str]:
    """Shard id -> address from ``--target [SHARD_ID=]HOST:PORT`` values (one value without
    an id: ``default``; several: ``target-<i>``).

    Raises:
        ValueError: a value without ``HOST:PORT``.
    """
    shards: dict[str, str] = {}
    for i, value in enumerate(values):
        shard_id, sep, address = value.rpartition("=")
        if not sep:
            shard_id = "default" if len(values) == 1 else f"target-{i}"
        if not address or ":" not in address:
            raise ValueError(f"--target {value!r}: expected [SHARD_ID=]HOST:PORT")
        shards[shard_id] = address
    return shards


def _fetch_taste(address: str, access: FleetAccess, clusters: int, seed: int) -> CatalogTaste:
    if access.plaintext:
        channel = grpc.insecure_channel(address)
    else:
        tls = grpc.ssl_channel_credentials(root_certificates=access.root_certificates)
        channel = grpc.secure_channel(address, tls)
    token = access.credential("omega-simulator-catalog")
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    with channel:
        ids, embeddings = fetch_catalog(channel, metadata)
    if not ids:
        raise RuntimeError(f"the shard at {address} has an empty catalog")
    return CatalogTaste.from_embeddings(ids, embeddings, clusters, seed)


@contextlib.contextmanager
def _local_stack(shards: int, work: Path, replicas: int = 1) -> Iterator[LocalStack]:
    from omega_simulator.stack import LocalStack  # Postgres and process management

    catalog = work / "catalog.npz"
    ids, embeddings = synthetic_catalog(_LOCAL_CATALOG_ITEMS, _LOCAL_CATALOG_CLUSTERS)
    write_catalog_npz(catalog, ids, embeddings)
    stack = LocalStack(
        work,
        shards,
        replicas=replicas,
        # its own databases, dropped after the run: the report is what the run leaves
        database_prefix=f"omega_fleet_{os.getpid()}",
        env={
            "OMEGA_CONSTELLATION_LOG_LEVEL": "WARNING",
            # Time compression makes a device sync far more often than a real one ever does
            # (every 5 s at 60x): the per-device rate limit would measure the compression.
            "OMEGA_CONSTELLATION_DEVICE_RATE_PER_SECOND": "0",
        },
    )
    try:
        with stack.running(catalog, 1000):
            yield stack
    finally:
        stack.drop_databases()


def fleet_main(args: argparse.Namespace) -> int:
    """Run ``omega-simulator fleet``; returns the exit code."""
    if args.scenario == REPLAY_SCENARIO:
        from omega_simulator.replay_cli import replay_fleet_main  # MovieLens, Postgres, processes

        return replay_fleet_main(args)
    try:
        scenario = load_scenario(args.scenario).with_overrides(
            duration_seconds=args.duration,
            time_compression=args.time_compression,
            seed=args.seed,
            workers=args.workers,
            devices=args.devices,
        )
    except ScenarioError as exc:
        print(f"omega-simulator fleet: {exc}", file=sys.stderr)
        return 2
    output: Path = args.output or Path("reports") / "fleet" / (
        f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    if scenario.kill_faults and not args.local:
        print(
            "omega-simulator fleet: kill faults need --local (a stack of its own)", file=sys.stderr
        )
        return 2
    if any((f.replica or 0) >= args.replicas for f in scenario.kill_faults):
        print(
            f"omega-simulator fleet: a kill fault names a replica beyond "
            f"--replicas {args.replicas}",
            file=sys.stderr,
        )
        return 2
    with contextlib.ExitStack() as stack:
        local: LocalStack | None = None
        if args.local:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="omega-fleet-")))
            print(
                f"starting a local stack ({args.shards} shard(s) x {args.replicas} "
                f"replica(s)) in {work} ..."
            )
            local = stack.enter_context(_local_stack(args.shards, work, args.replicas))
            shards, access = local.shards, local.access
            catalog: Path | None = args.catalog or work / "catalog.npz"
        else:
            try:
                shards = parse_targets(args.target)
                access = FleetAccess.of(args.plaintext, args.tls_ca, args.fleet_keys)
            except (ValueError, OSError) as exc:
                print(f"omega-simulator fleet: {exc}", file=sys.stderr)
                return 2
            catalog = args.catalog
        if catalog is not None:
            ids, embeddings = load_catalog_file(catalog)
            taste = CatalogTaste.from_embeddings(
                ids, embeddings, scenario.catalog_clusters, scenario.seed
            )
        else:
            taste = _fetch_taste(
                next(iter(shards.values())), access, scenario.catalog_clusters, scenario.seed
            )
        unknown = {f.shard for f in scenario.faults if f.shard is not None} - set(shards)
        if unknown:
            print(
                f"omega-simulator fleet: faults name unknown shards {sorted(unknown)} "
                f"(shards: {sorted(shards)})",
                file=sys.stderr,
            )
            return 2
        proxies: FaultProxies | None = None
        kills: ReplicaKills | None = None
        targets = shards
        if scenario.proxy_faults:
            proxies = FaultProxies(shards, scenario.proxy_faults, scenario.seed)
            targets = stack.enter_context(proxies.running())
            print(
                "fault proxy: "
                + ", ".join(f"{k} {targets[k]} -> {v}" for k, v in shards.items())
                + "; "
                + "; ".join(f.label() for f in scenario.proxy_faults)
            )
        if scenario.kill_faults and local is not None:
            kills = ReplicaKills(local, scenario.kill_faults, shards)
            stack.callback(kills.stop)  # before the local stack stops
            print("replica kills: " + "; ".join(f.label() for f in scenario.kill_faults))

        def on_start(origin: float) -> None:
            for timeline in (proxies, kills):
                if timeline is not None:
                    timeline.begin(origin)

        metrics: FleetMetrics | None = None
        if args.metrics_port is not None:
            metrics = FleetMetrics(scenario.name)
            port = metrics.start(args.metrics_port)
            stack.callback(metrics.stop)
            print(f"live metrics: http://127.0.0.1:{port}/metrics")
        print(
            f"fleet {scenario.name}: {scenario.devices:,} devices, "
            f"{scenario.base_rate_per_second:,.1f} syncs/s scheduled, "
            f"{scenario.duration_seconds:g} s, {scenario.workers} worker(s) -> {targets}"
        )
        run = run_fleet(
            scenario,
            targets,
            access,
            taste,
            live=args.live,
            on_start=on_start,
            metrics=metrics,
        )
        if proxies is not None:
            proxies.stop()
            run.proxy = {"shards": shards, "stats": proxies.stats()}
        if kills is not None:
            kills.stop()
            run.kills = kills.events()
    report = write_report(run, output)
    f = report["figures"]
    lat = f["latency_ms"]
    refused = f["refused_as_expected"]
    print(
        f"scheduled {f['scheduled']:,}, ok {f['ok']:,}, failed {f['failed']:,} "
        f"{report['errors'] or ''}"
        + (f", refused as expected {refused:,}" if refused else "")
        + f"; p50/p99/p99.9/max {lat['p50']:.1f}/{lat['p99']:.1f}/"
        f"{lat['p99_9']:.1f}/{lat['max']:.1f} ms; throughput {f['throughput_per_second']:,.1f}/s"
    )
    print(f"report written to {output}/report.md")
    return 0 if f["accounted"] and not run.lost_workers else 1


def compare_main(args: argparse.Namespace) -> int:
    """Run ``omega-simulator compare A B``; returns the exit code."""
    try:
        a, b = load_report(args.a), load_report(args.b)
    except (OSError, ValueError) as exc:
        print(f"omega-simulator compare: {exc}", file=sys.stderr)
        return 2
    rows = compare_reports(a, b)
    table = Table(title=f"A = {args.a}   B = {args.b}")
    for name, justify in (("figure", "left"), ("A", "right"), ("B", "right"), ("change", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 120).print(table)
    folder = args.output or (args.b if args.b.is_dir() else args.b.parent)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "compare.md"
    path.write_text(compare_markdown(str(args.a), str(args.b), a, b))
    print(f"written to {path}")
    return 0
