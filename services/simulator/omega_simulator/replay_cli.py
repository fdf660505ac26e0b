"""``omega-simulator fleet --scenario replay``: the MovieLens replay as a fleet scenario.

943 real viewing histories through full brains (closed loop, `omega_simulator.replay`), the
federation rounds and the quality evaluation, then the fleet report folder (report.json,
report.md, the plots; ``compare`` accepts it) plus the replay's own ``simulation-report.json``
in the same folder. Replay settings come from ``OMEGA_SIMULATOR_*`` (`SimulatorSettings`),
overridden by the fleet options that mean something here: ``--devices`` (replay only the
first N users), ``--workers`` (replay threads), ``--seed`` (federation noise), ``--shards``
and ``--replicas`` (``--local``). ``--live`` is ignored (progress is printed line by line);
options of synthetic fleets (``--duration``, ``--time-compression``, ``--catalog``,
``--metrics-port``) are refused.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from omega_data import load_movielens
from omega_simulator.access import FleetAccess
from omega_simulator.fleet_cli import parse_targets
from omega_simulator.replay_fleet import REPLAY_SCENARIO
from omega_simulator.replay_run import (
    dp_noise_multiplier,
    model_variables,
    replay_on_new_stack,
    replay_on_shards,
    write_fleet_folder,
)
from omega_simulator.report import SimulationReport
from omega_simulator.settings import SimulatorSettings
from omega_simulator.stack import write_catalog_file

__all__ = ["REFUSED_OPTIONS", "replay_fleet_main", "replay_settings"]

REFUSED_OPTIONS = {
    "duration": "--duration",
    "time_compression": "--time-compression",
    "catalog": "--catalog",
    "metrics_port": "--metrics-port",
}
"""Fleet options (argparse dest -> flag) that make no sense for the replay."""


def _fail(message: str) -> int:
    print(f"omega-simulator fleet: {message}", file=sys.stderr)
    return 2


def replay_settings(args: argparse.Namespace) -> SimulatorSettings:
    """`SimulatorSettings` from the environment with the fleet options applied.

    ``--devices`` -> ``max_users``, ``--workers`` -> ``workers``, ``--seed`` -> ``seed``,
    ``--shards`` -> ``shard_count`` (``--local`` only; with ``--target`` the shards are given).

    Raises:
        pydantic.ValidationError: a value out of the settings' bounds (e.g. ``--devices 0``).
    """
    overrides = {
        "max_users": args.devices,
        "workers": args.workers,
        "seed": args.seed,
        "shard_count": args.shards if args.local else None,
    }
    return SimulatorSettings(**{k: v for k, v in overrides.items() if v is not None})


def _on_local_stack(settings: SimulatorSettings, replicas: int, work: Path) -> SimulationReport:
    print("loading MovieLens 100K and catalog embeddings (cached after the first run)...")
    ml = load_movielens()
    catalog = work / "catalog.npz"
    print(f"catalog: {write_catalog_file(ml, catalog)} items embedded with all-MiniLM-L6-v2")
    noise = dp_noise_multiplier(settings)
    return replay_on_new_stack(
        settings,
        work / "stack",
        ml,
        catalog,
        model_variables(settings.model_factors, settings.model_active_items, noise, settings),
        settings.model_rounds,
        replicas=replicas,
        # its own databases, dropped after the run: the reports are what the run leaves
        database_prefix=f"omega_fleet_replay_{os.getpid()}",
        drop_databases=True,
    )


def replay_fleet_main(args: argparse.Namespace) -> int:
    """Run ``omega-simulator fleet --scenario replay``; returns the exit code (0: every sync
    accounted for and none failed, 1: some failed, 2: unusable options)."""
    refused = [flag for dest, flag in REFUSED_OPTIONS.items() if getattr(args, dest) is not None]
    if refused:
        return _fail(f"{', '.join(refused)}: not an option of --scenario {REPLAY_SCENARIO}")
    try:
        settings = replay_settings(args)
        if args.local:
            access = None
            shards: dict[str, str] = {}
        else:
            shards = parse_targets(args.target)
            access = FleetAccess.of(args.plaintext, args.tls_ca, args.fleet_keys)
    except (ValueError, OSError) as exc:  # pydantic's ValidationError is a ValueError
        return _fail(str(exc))
    output: Path = args.output or Path("reports") / "fleet" / (
        f"{REPLAY_SCENARIO}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    with tempfile.TemporaryDirectory(prefix="omega-fleet-replay-") as tmp:
        work = settings.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if access is None:
            print(f"replay on a local stack ({settings.shard_count} shard(s)) in {work} ...")
            report = _on_local_stack(settings, args.replicas, work)
        else:
            print(f"replay against {shards} (rounds: omega-federation run-once) ...")
            report = replay_on_shards(settings, shards, access, work)
    print()
    print(report.render())
    print(f"\nquality report written to {report.write(output)}")
    fleet = write_fleet_folder(report, output)
    return 0 if fleet["figures"]["accounted"] and report.syncs.failed == 0 else 1
