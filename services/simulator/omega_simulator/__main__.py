"""``python -m omega_simulator run``: the whole suite end to end on MovieLens 100K.

``run`` starts Postgres (embedded unless ``OMEGA_DATABASE_URL`` is set), the shards and the
federation worker as processes, replays every user, prints the report and stops everything.
``replay`` replays against shards already running (``OMEGA_SIMULATOR_SHARDS``). Both also
write the replay's syncs as a fleet-format report folder (``<output_dir>/fleet-replay``).
``fleet`` drives a synthetic fleet open-loop (``--scenario light|medium|heavy|burst|FILE``), or
the replay (``--scenario replay``), and writes a report folder; ``compare A B`` puts two such
folders side by side.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from omega_data import load_movielens
from omega_simulator.access import FleetAccess
from omega_simulator.fleet_cli import (
    add_compare_arguments,
    add_fleet_arguments,
    compare_main,
    fleet_main,
)
from omega_simulator.privacy_plot import central_reference, write_privacy_plot
from omega_simulator.replay_run import (
    FLEET_FOLDER,
    dp_noise_multiplier,
    model_variables,
    replay_on_new_stack,
    replay_on_shards,
    write_fleet_folder,
)
from omega_simulator.settings import SimulatorSettings
from omega_simulator.stack import write_catalog_file


def _run(settings: SimulatorSettings) -> int:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="omega-run-") as tmp:
        work = settings.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print("loading MovieLens 100K and catalog embeddings (cached after the first run)...")
        ml = load_movielens()
        catalog = work / "catalog.npz"
        n = write_catalog_file(ml, catalog)
        print(f"catalog: {n} items embedded with all-MiniLM-L6-v2")
        releases = 1 + settings.model_rounds
        noise = dp_noise_multiplier(settings)
        print(
            f"\n== replay with differential privacy: epsilon {settings.model_epsilon:g} per device"
            f" over {releases} model releases, noise multiplier {noise:.3f} =="
        )
        report = replay_on_new_stack(
            settings,
            work / "dp",
            ml,
            catalog,
            model_variables(settings.model_factors, settings.model_active_items, noise, settings),
            settings.model_rounds,
        )
        report.label_federated("brain, federated (DP)")
        fleet_folder = settings.output_dir / FLEET_FOLDER
        write_fleet_folder(report, fleet_folder)
        if settings.clean_model_rounds:
            print("\n== replay without noise (the same system, no differential privacy) ==")
            clean = replay_on_new_stack(
                settings,
                work / "clean",
                ml,
                catalog,
                model_variables(settings.clean_model_factors, n, 0.0, settings),
                settings.clean_model_rounds,
            )
            report.add_run("brain, federated (no noise)", clean)
        report.add_central(central_reference(ml, settings.clean_model_factors))
        report.wall_seconds = time.perf_counter() - started
        plot = write_privacy_plot(report, ml, settings, settings.output_dir)
        print()
        print(report.render())
        path = report.write(settings.output_dir)
        print(
            f"\nreport written to {path}; precision vs epsilon plotted in {plot}; "
            f"the DP replay's fleet report in {fleet_folder}"
        )
    return 0 if report.syncs.failed == 0 else 1


def _replay(settings: SimulatorSettings) -> int:
    if not settings.shards:
        print('replay needs OMEGA_SIMULATOR_SHARDS, e.g. \'{"shard-0": "127.0.0.1:50051"}\'')
        return 2
    with tempfile.TemporaryDirectory(prefix="omega-replay-") as tmp:
        report = replay_on_shards(
            settings,
            settings.shards,
            FleetAccess.of(settings.plaintext, settings.tls_ca_file, settings.fleet_keys_file),
            settings.work_dir or Path(tmp),
        )
    print()
    print(report.render())
    print(f"\nreport written to {report.write(settings.output_dir)}")
    write_fleet_folder(report, settings.output_dir / FLEET_FOLDER)
    return 0 if report.syncs.failed == 0 else 1


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``omega-simulator``."""
    parser = argparse.ArgumentParser(prog="omega-simulator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    commands.add_parser("run", help="the whole stack end to end (MovieLens replay)")
    commands.add_parser(
        "replay",
        help="against running shards (OMEGA_SIMULATOR_SHARDS; rounds run "
        "`omega-federation run-once` with OMEGA_FEDERATION_*)",
    )
    fleet = commands.add_parser(
        "fleet",
        help="a synthetic fleet (light | medium | heavy | burst | file), open-loop, or the "
        "MovieLens replay (replay), closed-loop, with a report folder",
    )
    add_fleet_arguments(fleet)
    compare = commands.add_parser("compare", help="two fleet run folders side by side")
    add_compare_arguments(compare)
    args = parser.parse_args(argv)
    if args.command == "fleet":
        sys.exit(fleet_main(args))
    if args.command == "compare":
        sys.exit(compare_main(args))
    settings = SimulatorSettings()
    sys.exit(_run(settings) if args.command == "run" else _replay(settings))


if __name__ == "__main__":
    main()
