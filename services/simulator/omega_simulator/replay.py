"""Replay MovieLens users as TV devices against running constellation shards.

One device per user (`omega_brain.Brain`, its own SQLite store), its training ratings in time
order as viewing events (rating >= 4 completed, <= 2 abandoned, 3 half-watched), a sync every
``sync_every_events`` events and at the end of each phase, a federation round between phases,
then recommendations on the chronological hold-out (ARCHITECTURE.md section 8) for a
popularity baseline, the local-only brain and the federated brain. Every sync is also logged
(`omega_simulator.replay_fleet.SyncLog`) for a fleet-format report of the run
(``SimulationReport.fleet``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from omega_brain import Brain, BrainConfig, CatalogIndex, ViewingEvent, fetch_catalog
from omega_data import (
    MovieLens,
    UserSplit,
    chronological_split,
    evaluate_rankings,
    load_movielens,
    popularity_rankings,
)
from omega_protocol import shard_for
from omega_simulator.access import FleetAccess
from omega_simulator.replay_fleet import SyncLog, replay_fleet_run
from omega_simulator.report import QualityRow, SimulationReport, SyncStats
from omega_simulator.settings import SimulatorSettings

__all__ = ["Device", "RoundRunner", "replay_movielens"]

_log = structlog.get_logger(component="simulator")

RoundRunner = Callable[[dict[str, str]], dict[str, Any]]
"""Runs one federation round with extra ``OMEGA_FEDERATION_*`` variables; returns its report."""

MODEL_OFF: dict[str, str] = {"OMEGA_FEDERATION_MODEL_FACTORS": "0"}
"""Rounds between replay phases leave the collaborative model alone."""


def completion_of(rating: float) -> float:
    """Viewing completion standing for a rating: >= 4 completed, <= 2 abandoned, 3 half."""
    if rating >= 4:
        return 1.0
    if rating <= 2:
        return 0.1
    return 0.5


@dataclass
class Device:
    """One simulated TV: a user's brain and its replay position."""

    user_id: int
    brain: Brain
    events: list[ViewingEvent]
    patterns_stored: int = 0


def _phase_slice(n: int, phase: int, phases: int) -> slice:
    return slice(n * phase // phases, n * (phase + 1) // phases)


def _replay_phase(
    device: Device, phase: int, settings: SimulatorSettings, log: SyncLog
) -> SyncStats:
    stats = SyncStats()
    chunk = device.events[_phase_slice(len(device.events), phase, settings.phases)]
    pending = 0

    for event in chunk:
        device.brain.observe(event)
        pending += 1
        if pending >= settings.sync_every_events:
            _sync(device, stats, log)
            pending = 0
    if pending:
        _sync(device, stats, log)
    return stats


def _sync(device: Device, stats: SyncStats, log: SyncLog) -> None:
    """One sync of ``device``, recorded in ``stats`` and ``log``."""
    called_at = log.now()
    result = device.brain.sync()
    log.record(called_at, result)
    if result.ok:
        stats.ok += 1
        stats.bytes_up.append(result.bytes_up)
        stats.bytes_down.append(result.bytes_down)
        stats.latency_seconds.append(result.latency_seconds)
        if result.model_bytes_down:
            stats.model_bytes_down.append(result.model_bytes_down)
        device.patterns_stored = result.server_pattern_count
    else:
        stats.failed += 1
        key = (result.error or "unknown")[:80]
        stats.errors[key] = stats.errors.get(key, 0) + 1


def _final_pull(device: Device, log: SyncLog) -> SyncStats:
    stats = SyncStats()
    _sync(device, stats, log)
    return stats


def _events(split: UserSplit) -> list[ViewingEvent]:
    return [
        ViewingEvent(
            content_id=str(r.item_id),
            started_at_ms=int(r.timestamp) * 1000,
            completion=completion_of(r.rating),
            watch_seconds=0.0,
        )
        for r in split.train
    ]


def replay_movielens(
    settings: SimulatorSettings,
    shards: Mapping[str, str],
    run_round: RoundRunner,
    work_dir: Path,
    *,
    model_env: Mapping[str, str],
    model_rounds: int,
    movielens: MovieLens | None = None,
    progress: Callable[[str], None] = print,
    access: FleetAccess | None = None,
) -> SimulationReport:
    """Replay every MovieLens user against ``shards`` and evaluate on the hold-out.

    The training history is replayed in ``settings.phases`` phases with a round after each
    (patterns and trends; the collaborative model off); then ``1 + model_rounds`` model rounds
    (the first creates the model, the others step it), each after every device synced (sent
    its contribution, fetched the model); then a last sync and the evaluation.

    Args:
        settings: replay parameters.
        shards: shard id -> gRPC address of a running constellation replica.
        run_round: runs one federation round over all shards (a real worker process in `run`).
        work_dir: folder for the devices' SQLite stores.
        model_env: ``OMEGA_FEDERATION_MODEL_*`` variables of the model rounds.
        model_rounds: model steps after the round that creates the model.
        movielens: preloaded data (loaded from the cache when None).
        progress: where progress lines go.
        access: TLS trust and device credentials (None: plaintext, no credentials).

    Returns:
        The report, with every sync also in ``report.fleet`` (a closed-loop `FleetRun` for
        `omega_simulator.fleet_report.write_report`); raises nothing for failed syncs (they
        are counted).
    """
    log = SyncLog()
    work_dir.mkdir(parents=True, exist_ok=True)
    ml = movielens or load_movielens()
    splits = chronological_split(ml, settings.train_fraction)
    user_ids = sorted(splits)[: settings.max_users] if settings.max_users else sorted(splits)
    shard_ids = sorted(shards)
    access = access or FleetAccess(plaintext=True)
    transports = {s: access.transport(shards[s]) for s in shard_ids}
    try:
        fetched = fetch_catalog(
            transports[shard_ids[0]].with_credential(access.credential("simulator-catalog"))
        )
        catalog = CatalogIndex(
            fetched.content_ids, fetched.embeddings, titles=fetched.titles, genres=fetched.genres
        )
        progress(f"catalog: {len(catalog)} items fetched from {shard_ids[0]}")
        # The replay compresses weeks of viewing into minutes: a device syncs after each
        # session, not at the shard's pace (honour_sync_pace would refuse most calls).
        base_config = dataclasses.replace(BrainConfig(honour_sync_pace=False), **settings.brain)
        devices: list[Device] = []
        for uid in user_ids:
            device_id = f"ml100k-user-{uid}"
            shard = shard_for(device_id, shard_ids)
            brain = Brain(
                device_id,
                dataclasses.replace(base_config, store_path=work_dir / f"{device_id}.sqlite"),
                transport=transports[shard].with_credential(access.credential(device_id)),
                catalog=catalog,
            )
            devices.append(Device(uid, brain, _events(splits[uid])))
        stats = SyncStats()
        rounds: list[dict[str, Any]] = []
        events = sum(len(d.events) for d in devices)
        with ThreadPoolExecutor(max_workers=settings.workers) as pool:
            for phase in range(settings.phases):
                t0 = log.now()
                work = functools.partial(_replay_phase, phase=phase, settings=settings, log=log)
                for s in pool.map(work, devices):
                    stats.merge(s)
                progress(
                    f"phase {phase + 1}/{settings.phases}: {len(devices)} devices,"
                    f" syncs ok {stats.ok} failed {stats.failed}"
                    f" ({log.now() - t0:.1f} s)"
                )
                rounds.append(run_round(dict(MODEL_OFF)))
                r = rounds[-1]
                progress(
                    f"federation round {r.get('round_id')}: {r.get('exported_patterns')} patterns"
                    f" exported, {r.get('patterns_published')} global patterns,"
                    f" {r.get('trending_published')} trending, epsilon {r.get('epsilon', 0):.2f}"
                )
            pull = functools.partial(_final_pull, log=log)
            for _ in range(1 + model_rounds):
                # Every device syncs: sends its contribution for the model version it holds.
                for s in pool.map(pull, devices):
                    stats.merge(s)
                rounds.append(run_round(dict(model_env)))
                m = rounds[-1].get("model", {})
                progress(
                    f"model round {rounds[-1].get('round_id')}: {m.get('model_action')},"
                    f" {m.get('model_devices')} devices, version {m.get('model_version')},"
                    f" epsilon {m.get('model_cumulative_epsilon', 0.0):.2f} cumulative"
                )
                # ... and syncs again to fetch what the round published (after the last
                # round: before it is asked for recommendations).
                for s in pool.map(pull, devices):
                    stats.merge(s)
        quality = _evaluate(devices, splits, len(ml.items))
        patterns_stored = sum(d.patterns_stored for d in devices)
        for d in devices:
            d.brain.close()
    finally:
        for transport in transports.values():
            transport.close()
    wall = log.now()
    return SimulationReport(
        devices=len(devices),
        shards=len(shard_ids),
        events_replayed=events,
        syncs=stats,
        patterns_stored=patterns_stored,
        rounds=rounds,
        quality=quality,
        wall_seconds=wall,
        settings=settings.model_dump(mode="json"),
        fleet=replay_fleet_run(
            log,
            shards=shards,
            devices=len(devices),
            workers=settings.workers,
            seed=settings.seed,
            rpc_timeout_seconds=base_config.timeout_seconds,
            wall_seconds=wall,
        ),
    )


def _evaluate(
    devices: Sequence[Device], splits: Mapping[int, UserSplit], catalog_size: int
) -> list[QualityRow]:
    evaluated = {d.user_id: d for d in devices if splits[d.user_id].relevant}
    user_splits = {u: splits[u] for u in evaluated}
    rows: list[QualityRow] = []

    def add(name: str, rankings: Mapping[int, Sequence[int]]) -> None:
        m = evaluate_rankings(rankings, user_splits, catalog_size)
        rows.append(
            QualityRow(
                name, m.users, m.precision_at_10, m.recall_at_20, m.ndcg_at_10, m.coverage_at_10
            )
        )

    popularity = popularity_rankings(splits, k=20)
    add("popularity (central)", {u: popularity[u] for u in evaluated})
    for name, use_global in (("brain, local only", False), ("brain, federated", True)):
        rankings: dict[int, list[int]] = {}
        for uid, device in evaluated.items():
            when = splits[uid].holdout[0].timestamp * 1000
            recs = device.brain.recommend(k=20, timestamp_ms=when, use_global=use_global)
            rankings[uid] = [int(r.content_id) for r in recs]
        add(name, rankings)
    return rows
