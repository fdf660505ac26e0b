"""Running the MovieLens replay: on a local stack of its own or on shards already running.

Shared by ``omega-simulator run`` / ``replay`` (`omega_simulator.__main__`) and
``omega-simulator fleet --scenario replay`` (`omega_simulator.replay_cli`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omega_data import MovieLens
from omega_federation.accounting import calibrate_noise_multiplier
from omega_simulator.access import FleetAccess
from omega_simulator.fleet_report import write_report
from omega_simulator.replay import replay_movielens
from omega_simulator.report import SimulationReport
from omega_simulator.settings import SimulatorSettings
from omega_simulator.stack import LocalStack, run_federation_round

__all__ = [
    "FLEET_FOLDER",
    "dp_noise_multiplier",
    "model_variables",
    "replay_on_new_stack",
    "replay_on_shards",
    "write_fleet_folder",
]

FLEET_FOLDER = "fleet-replay"
"""Sub-folder of ``output_dir`` where ``run`` and ``replay`` write the fleet-format report."""


def model_variables(
    factors: int, active_items: int, noise_multiplier: float, settings: SimulatorSettings
) -> dict[str, str]:
    """The ``OMEGA_FEDERATION_MODEL_*`` variables of the replay's model rounds."""
    return {
        "OMEGA_FEDERATION_MODEL_FACTORS": str(factors),
        "OMEGA_FEDERATION_MODEL_ACTIVE_ITEMS": str(active_items),
        "OMEGA_FEDERATION_MODEL_NOISE_MULTIPLIER": repr(noise_multiplier),
        "OMEGA_FEDERATION_MODEL_EPSILON_BUDGET": repr(settings.model_epsilon),
        "OMEGA_FEDERATION_MODEL_DELTA": repr(settings.model_delta),
    }


def dp_noise_multiplier(settings: SimulatorSettings) -> float:
    """Noise multiplier giving ``settings.model_epsilon`` (at ``model_delta``) over the DP
    run's ``1 + model_rounds`` model releases."""
    return calibrate_noise_multiplier(
        settings.model_epsilon, settings.model_delta, 1 + settings.model_rounds
    )


def _dp_model_env(settings: SimulatorSettings) -> dict[str, str]:
    noise = dp_noise_multiplier(settings)
    return model_variables(settings.model_factors, settings.model_active_items, noise, settings)


def replay_on_new_stack(
    settings: SimulatorSettings,
    work: Path,
    ml: MovieLens,
    catalog: Path,
    model_env: dict[str, str],
    model_rounds: int,
    *,
    replicas: int = 1,
    database_prefix: str = "omega_run",
    drop_databases: bool = False,
) -> SimulationReport:
    """Start Postgres + ``settings.shard_count`` shards, replay every user, run the rounds,
    stop everything.

    Args:
        settings: the replay.
        work: PKI, logs and device stores go here (created).
        ml: MovieLens 100K.
        catalog: the shards' catalog ``.npz`` (`omega_simulator.stack.write_catalog_file`).
        model_env: ``OMEGA_FEDERATION_MODEL_*`` of the model rounds (`model_variables`).
        model_rounds: model steps after the round that creates the model.
        replicas: processes per shard.
        database_prefix: the stack's databases (`LocalStack`); dropped first if they exist.
        drop_databases: drop them after the run (``run`` keeps them for inspection).

    Raises:
        RuntimeError: a shard did not start or a federation round failed.
    """
    work.mkdir(parents=True, exist_ok=True)
    (work / "devices").mkdir(exist_ok=True)
    stack = LocalStack(
        work,
        settings.shard_count,
        env={"OMEGA_CONSTELLATION_LOG_LEVEL": "WARNING"},
        min_sources=settings.min_sources,
        replicas=replicas,
        database_prefix=database_prefix,
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

    def federation_round(extra: dict[str, str]) -> dict[str, Any]:
        time.sleep(settle + 0.05)  # let the last writes pass the shards' export settle time
        return stack.federation_round({**federation_env, **extra})

    try:
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
    finally:
        if drop_databases:
            stack.drop_databases()


def replay_on_shards(
    settings: SimulatorSettings, shards: dict[str, str], access: FleetAccess, work: Path
) -> SimulationReport:
    """Replay every user against shards already running, with the DP model rounds.

    Rounds run ``omega-federation run-once`` with this process's ``OMEGA_FEDERATION_*``
    (its SHARDS are the shards' internal listeners, with the worker's TLS files and service
    token); its output is appended to ``work / "federation.log"``.

    Args:
        settings: the replay.
        shards: shard id -> ``host:port`` of the device-facing listeners.
        access: TLS trust and device credentials.
        work: device stores and the worker's log go here (created).

    Raises:
        RuntimeError: a federation round failed.
    """
    work.mkdir(parents=True, exist_ok=True)
    return replay_movielens(
        settings,
        shards,
        lambda extra: run_federation_round(dict(extra), work / "federation.log"),
        work / "devices",
        model_env=_dp_model_env(settings),
        model_rounds=settings.model_rounds,
        access=access,
    )


def write_fleet_folder(report: SimulationReport, folder: Path) -> dict[str, Any]:
    """Write the replay's fleet-format report (report.json, report.md, the plots) into
    ``folder`` and print where; returns the report's JSON.

    Raises:
        ValueError: ``report`` has no fleet run (not made by `replay_movielens`).
    """
    if report.fleet is None:
        raise ValueError("this simulation report carries no fleet run")
    fleet = write_report(report.fleet, folder)
    f = fleet["figures"]
    lat = f["latency_ms"]
    print(
        f"fleet report: {f['scheduled']:,} syncs, ok {f['ok']:,}, failed {f['failed']:,} "
        f"{fleet['errors'] or ''}; p50/p99/max {lat['p50']:.1f}/{lat['p99']:.1f}/"
        f"{lat['max']:.1f} ms; written to {folder}/report.md"
    )
    return fleet
