"""``python -m omega_simulator run``: the whole suite end to end on MovieLens 100K.

``run`` starts Postgres (embedded unless ``OMEGA_DATABASE_URL`` is set), the shards and the
federation worker as processes, replays every user, prints the report and stops everything.
``replay`` replays against shards already running (``OMEGA_SIMULATOR_SHARDS``).
``fleet`` drives a synthetic fleet open-loop (``--scenario light|medium|heavy|burst|FILE``)
and writes a report folder; ``compare A B`` puts two such folders side by side.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from omega_data import MovieLens, load_movielens
from omega_federation.accounting import calibrate_noise_multiplier
from omega_simulator.access import FleetAccess
from omega_simulator.fleet_cli import (
    add_compare_arguments,
    add_fleet_arguments,
    compare_main,
    fleet_main,
)
from omega_simulator.privacy_plot import central_reference, write_privacy_plot
from omega_simulator.replay import replay_movielens
from omega_simulator.report import SimulationReport
from omega_simulator.settings import SimulatorSettings
from omega_simulator.stack import LocalStack, run_federation_round, write_catalog_file


def _model_env(
    factors: int, active_items: int, noise_multiplier: float, settings: SimulatorSettings
) -> dict[str, str]:
    return {
        "OMEGA_FEDERATION_MODEL_FACTORS": str(factors),
        "OMEGA_FEDERATION_MODEL_ACTIVE_ITEMS": str(active_items),
        "OMEGA_FEDERATION_MODEL_NOISE_MULTIPLIER": repr(noise_multiplier),
        "OMEGA_FEDERATION_MODEL_EPSILON_BUDGET": repr(settings.model_epsilon),
        "OMEGA_FEDERATION_MODEL_DELTA": repr(settings.model_delta),
    }


def _replay_on_new_stack(
    settings: SimulatorSettings,
    work: Path,
    ml: MovieLens,
    catalog: Path,
    model_env: dict[str, str],
    model_rounds: int,
) -> SimulationReport:
    """Start Postgres + shards, replay every user, run the rounds, stop everything."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "devices").mkdir(exist_ok=True)
    stack = LocalStack(
        work,
        settings.shard_count,
        env={"OMEGA_CONSTELLATION_LOG_LEVEL": "WARNING"},
        min_sources=settings.min_sources,
    )
    federation_env = {
        "OMEGA_FEDERATION_MIN_SOURCES": str(settings.min_sources),
        "OMEGA_FEDERATION_EPSILON": str(settings.epsilon),
        "OMEGA_FEDERATION_SEED": str(settings.seed),
        "OMEGA_FEDERATION_CODEBOOK_SIZE": str(settings.codebook_size),
        "OMEGA_FEDERATION_CLIPPING_NORM": str(settings.clipping_norm),
        "OMEGA_FEDERATION_MAX_PATTERNS_PER_DEVICE": str(settings.max_patterns_per_device),
        "OMEGA_FEDERATION_PATTERNS_ENABLED": str(settings.patterns).lower(),
    }
    settle = settings.export_settle_ms / 1000.0

    def federation_round(extra: dict[str, str]) -> dict[str, object]:
        time.sleep(settle + 0.05)  # let the last writes pass the shards' export settle time
        return stack.federation_round({**federation_env, **extra})

    with stack.running(catalog, settings.export_settle_ms):
        print(f"started {len(stack.shards)} shards: {stack.shards}; logs in {work}")
        return replay_movielens(
            settings,
            stack.shards,
            federation_round,
            work / "devices",
            model_env=model_env,
            model_rounds=model_rounds,
            movielens=ml,
            access=stack.access,
        )


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
        noise = calibrate_noise_multiplier(settings.model_epsilon, settings.model_delta, releases)
        print(
            f"\n== replay with differential privacy: epsilon {settings.model_epsilon:g} per device"
            f" over {releases} model releases, noise multiplier {noise:.3f} =="
        )
        report = _replay_on_new_stack(
            settings,
            work / "dp",
            ml,
            catalog,
            _model_env(settings.model_factors, settings.model_active_items, noise, settings),
            settings.model_rounds,
        )
        report.label_federated("brain, federated (DP)")
        if settings.clean_model_rounds:
            print("\n== replay without noise (the same system, no differential privacy) ==")
            clean = _replay_on_new_stack(
                settings,
                work / "clean",
                ml,
                catalog,
                _model_env(settings.clean_model_factors, n, 0.0, settings),
                settings.clean_model_rounds,
            )
            report.add_run("brain, federated (no noise)", clean)
        report.add_central(central_reference(ml, settings.clean_model_factors))
        report.wall_seconds = time.perf_counter() - started
        plot = write_privacy_plot(report, ml, settings, settings.output_dir)
        print()
        print(report.render())
        path = report.write(settings.output_dir)
        print(f"\nreport written to {path}; precision vs epsilon plotted in {plot}")
    return 0 if report.syncs.failed == 0 else 1


def _replay(settings: SimulatorSettings) -> int:
    if not settings.shards:
        print('replay needs OMEGA_SIMULATOR_SHARDS, e.g. \'{"shard-0": "127.0.0.1:50051"}\'')
        return 2
    # Rounds run `omega-federation run-once` with this process's OMEGA_FEDERATION_* (its
    # SHARDS are the internal listeners, with the worker's TLS files and service token).
    with tempfile.TemporaryDirectory(prefix="omega-replay-") as tmp:
        work = settings.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        env: dict[str, str] = {}
        noise = calibrate_noise_multiplier(
            settings.model_epsilon, settings.model_delta, 1 + settings.model_rounds
        )
        report = replay_movielens(
            settings,
            settings.shards,
            lambda extra: run_federation_round({**env, **extra}, work / "federation.log"),
            work / "devices",
            model_env=_model_env(
                settings.model_factors, settings.model_active_items, noise, settings
            ),
            model_rounds=settings.model_rounds,
            access=FleetAccess.of(
                settings.plaintext, settings.tls_ca_file, settings.fleet_keys_file
            ),
        )
    print()
    print(report.render())
    print(f"\nreport written to {report.write(settings.output_dir)}")
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
        help="a synthetic fleet (light | medium | heavy | burst | file), open-loop, with a "
        "report folder",
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
