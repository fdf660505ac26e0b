"""The whole loop on real MovieLens histories: devices, two shards, federation rounds, and the
replay's syncs written as a fleet-format report folder that `compare` accepts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
import pytest

from omega_data import load_movielens
from omega_federation.accounting import RoundMechanism, epsilon_for
from omega_federation.settings import FederationSettings
from omega_federation.state import WorkerState
from omega_federation.worker import run_round
from omega_simulator.fleet_report import PLOTS, compare_reports, load_report
from omega_simulator.replay import replay_movielens
from omega_simulator.replay_run import write_fleet_folder
from omega_simulator.report import SimulationReport
from omega_simulator.settings import SimulatorSettings
from omega_simulator.stack import write_catalog_file

from .conftest import StartShard

pytestmark = pytest.mark.integration

SHARDS = ["shard-0", "shard-1"]


async def test_movielens_replay_through_two_shards_and_federation(
    start_shard: StartShard, make_database: Callable[[], Awaitable[str]], tmp_path: Path
) -> None:
    ml = await asyncio.to_thread(load_movielens)
    catalog = tmp_path / "catalog.npz"
    assert await asyncio.to_thread(write_catalog_file, ml, catalog) == 1682
    servers = {
        s: await start_shard(
            database_url=await make_database(), shard_id=s, shard_ids=SHARDS, catalog_path=catalog
        )
        for s in SHARDS
    }
    addresses = {s: f"127.0.0.1:{r.port}" for s, r in servers.items()}
    channels = {
        s: grpc.aio.insecure_channel(f"127.0.0.1:{r.federation_port}") for s, r in servers.items()
    }
    state = await WorkerState.open(await make_database())
    federation = FederationSettings(
        shards={s: f"127.0.0.1:{r.federation_port}" for s, r in servers.items()},
        min_sources=3,
        codebook_size=4,
        epsilon=float("inf"),
        seed=3,
        patterns_enabled=True,  # both pipelines: global patterns first, then the model
    )
    loop = asyncio.get_running_loop()

    def one_round(extra: dict[str, str]) -> dict[str, Any]:
        # The replay passes OMEGA_FEDERATION_* overrides; pydantic parses them as the env would.
        overrides = {k.removeprefix("OMEGA_FEDERATION_").lower(): v for k, v in extra.items()}
        settings = FederationSettings(**{**federation.model_dump(), **overrides})
        future = asyncio.run_coroutine_threadsafe(run_round(settings, state, channels), loop)
        return asdict(future.result(timeout=120))

    settings = SimulatorSettings(max_users=40, phases=2, workers=2)
    model_env = {
        "OMEGA_FEDERATION_MODEL_FACTORS": "4",
        "OMEGA_FEDERATION_MODEL_ACTIVE_ITEMS": "200",
        "OMEGA_FEDERATION_MODEL_NOISE_MULTIPLIER": "0.5",
        "OMEGA_FEDERATION_MODEL_EPSILON_BUDGET": "100",
        "OMEGA_FEDERATION_MODEL_DELTA": "1e-5",
    }
    try:
        report = await asyncio.to_thread(
            replay_movielens,
            settings,
            addresses,
            one_round,
            tmp_path / "devices",
            model_env=model_env,
            model_rounds=2,
            movielens=ml,
            progress=lambda line: None,
        )
    finally:
        await state.close()
        for channel in channels.values():
            await channel.close()

    assert report.devices == 40 and report.shards == 2
    assert report.syncs.failed == 0 and report.syncs.ok > 40
    assert report.patterns_stored > 0
    assert [r["status"] for r in report.rounds] == ["published"] * 5
    assert report.rounds[0]["exported_patterns"] > 0
    # Two phase rounds leave the model alone; then it is created and stepped twice.
    actions = [r["model"].get("model_action") for r in report.rounds]
    assert actions == [None, None, "created", "stepped", "stepped"]
    assert report.rounds[-1]["model"]["model_devices"] == 40
    privacy = report.privacy
    assert privacy["releases"] == 3 and privacy["noise_multiplier"] == 0.5
    assert len(privacy["epsilon_per_round"]) == 3
    assert privacy["cumulative_epsilon"] > max(privacy["epsilon_per_round"])
    # The ledger went through Postgres between rounds and charged each release exactly once.
    three = epsilon_for([RoundMechanism((0.5,))] * 3, 1e-5)
    assert privacy["cumulative_epsilon"] == pytest.approx(three, rel=1e-9)
    assert sum(privacy["epsilon_per_round"]) == pytest.approx(three, rel=1e-9)
    assert report.syncs.model_bytes_down and min(report.syncs.model_bytes_down) > 0
    assert report.global_patterns_published > 0
    names = [q.recommender for q in report.quality]
    assert names == ["popularity (central)", "brain, local only", "brain, federated"]
    assert all(q.users > 30 for q in report.quality)
    summary = report.syncs.summary()
    assert 0 < summary["bytes_up_median"] <= 1024
    assert "syncs ok / failed" in report.render()
    _check_fleet_report(report, tmp_path / "fleet-replay")


def _check_fleet_report(report: SimulationReport, folder: Path) -> None:
    """The replay's sync log accounts for every sync and makes a fleet report folder."""
    assert report.fleet is not None
    rec = report.fleet.recorder
    assert rec.total_ok == report.syncs.ok and rec.total_failed == report.syncs.failed
    assert rec.total_scheduled == report.syncs.ok + report.syncs.failed
    assert sorted(report.fleet.shards) == SHARDS
    written = write_fleet_folder(report, folder)
    for name in ("report.json", "report.md", *PLOTS):
        assert (folder / name).stat().st_size > 0
    loaded = load_report(folder)
    assert loaded == written
    f = loaded["figures"]
    assert f["accounted"] is True and f["ok"] == report.syncs.ok and f["devices"] == 40
    assert f["latency_ms"]["p50"] > 0 and f["bytes_up"] > 0 and f["bytes_down"] > 0
    assert loaded["scenario"]["name"] == "replay"
    assert loaded["run"]["wall_seconds"] == pytest.approx(report.wall_seconds, abs=1e-3)
    assert "closed loop" in (folder / "report.md").read_text()
    rows = compare_reports(loaded, load_report(folder / "report.json"))
    assert rows and all(change == "=" for *_, change in rows)
