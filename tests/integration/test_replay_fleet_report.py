"""`omega-simulator fleet --scenario replay --local`: the MovieLens replay on a local stack of
its own (shard processes, TLS, device tokens, Postgres databases dropped afterwards), written
as a fleet report folder with the replay's quality report next to it."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import asyncpg
import pytest

from omega_simulator.__main__ import main
from omega_simulator.fleet_report import PLOTS, compare_reports, load_report

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _main(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        main(argv)
    return int(done.value.code or 0)


async def _databases(admin_dsn: str, prefix: str) -> list[str]:
    conn = await asyncpg.connect(admin_dsn)
    try:
        rows = await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE $1", prefix)
    finally:
        await conn.close()
    return [str(r["datname"]) for r in rows]


async def test_fleet_scenario_replay_on_a_local_stack(
    pg_admin_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMEGA_DATABASE_URL", pg_admin_dsn)
    monkeypatch.setenv("OMEGA_SIMULATOR_PHASES", "2")
    monkeypatch.setenv("OMEGA_SIMULATOR_MODEL_ROUNDS", "1")
    monkeypatch.setenv("OMEGA_SIMULATOR_MODEL_ACTIVE_ITEMS", "100")
    out = tmp_path / "replay"
    argv = ["fleet", "--scenario", "replay", "--local", "--devices", "25", "--workers", "2"]
    # main() runs the stack's own event loops: not on this test's
    assert await asyncio.to_thread(_main, [*argv, "--no-live", "--output", str(out)]) == 0

    report = load_report(out)
    f = report["figures"]
    assert report["scenario"]["name"] == "replay" and f["devices"] == 25
    assert f["accounted"] is True and f["failed"] == 0 and f["ok"] > 25
    assert list(report["run"]["shards"]) == ["shard-0"]  # --shards defaults to 1
    for name in ("report.md", *PLOTS):
        assert (out / name).stat().st_size > 0
    quality = json.loads((out / "simulation-report.json").read_text())
    assert quality["devices"] == 25 and quality["syncs_ok"] == f["ok"]
    assert quality["syncs_failed"] == 0 and len(quality["rounds"]) == 2 + 2
    assert all(change == "=" for *_, change in compare_reports(report, report))
    # the stack's databases are named after this process (main() ran in it): all dropped
    assert await _databases(pg_admin_dsn, f"omega_fleet_replay_{os.getpid()}_%") == []
