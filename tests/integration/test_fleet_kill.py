"""The ``kill`` fault of `omega-simulator fleet --local`: a shard replica SIGKILLed for 3 s and
restarted (same settings, database and port).

With one replica the syncs scheduled while it is down fail (UNAVAILABLE), none before, and
everything is answered again once it is SERVING; with two replicas on the shard's port the
other one keeps answering and (nearly) every sync succeeds. Every scheduled sync is accounted
for, and the report gives the kill's window and when the replica answered again.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from omega_simulator.__main__ import main
from tools.fuzz.shard import admin_dsn

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

_KILL = (3.0, 3.0)  # start, duration (s)
_DURATION = 10.0


@pytest.fixture(autouse=True)
def postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    """The local stack's Postgres: the test server (else the embedded one)."""
    monkeypatch.setenv("OMEGA_DATABASE_URL", asyncio.run(admin_dsn()))


def _run(tmp_path: Path, replicas: int) -> dict[str, Any]:
    scenario = tmp_path / "kill.toml"
    scenario.write_text(
        'name = "kill"\ndescription = "600 devices at 100x, a replica killed for 3 s"\n'
        f"devices = 600\nduration_seconds = {_DURATION}\ntime_compression = 100\n"
        "rpc_timeout_seconds = 2\n"
        f'[[faults]]\nkind = "kill"\nshard = "shard-0"\nstart_seconds = {_KILL[0]}\n'
        f"duration_seconds = {_KILL[1]}\n"
    )
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        main(
            [
                "fleet",
                "--no-live",
                "--scenario",
                str(scenario),
                "--local",
                "--replicas",
                str(replicas),
                "--output",
                str(out),
            ]
        )
    assert done.value.code == 0
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    f = report["figures"]
    assert f["ok"] + f["failed"] == f["scheduled"] > 0
    assert f["accounted"] is True
    (kill,) = report["faults"]["kills"]
    assert kill["error"] is None and kill["shard"] == "shard-0" and kill["replica"] == 0
    assert abs(kill["killed_at_seconds"] - _KILL[0]) < 0.5
    assert kill["restarted_at_seconds"] >= sum(_KILL) - 0.1
    assert kill["pid"] != kill["killed_pid"]
    md = (out / "report.md").read_text()
    assert "## Faults" in md and "SIGKILL" in md and kill["label"] in md
    print(json.dumps({"figures": f, "errors": report["errors"], "kill": kill}, indent=1))
    return report


def test_killed_single_replica_fails_only_while_down(tmp_path: Path) -> None:
    report = _run(tmp_path, replicas=1)
    assert set(report["errors"]) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
    (row,) = report["faults"]["faults"]
    kill = report["faults"]["kills"][0]
    assert row["kind"] == "kill"
    assert row["inside"]["failed"] >= 0.9 * row["inside"]["scheduled"] > 0
    ws = report["run"]["window_seconds"]
    series = report["series"]
    back = kill["serving_at_seconds"] + 1.0  # the devices' channels reconnect (backoff)
    for t, failed, done in zip(
        series["t"], series["failed_per_second"], series["completed_per_second"], strict=True
    ):
        if t + ws <= _KILL[0]:
            assert failed == 0, f"failures before the kill at {t} s"
        elif back <= t < _DURATION:
            assert failed == 0 and done > 0, f"not answered again at {t} s"
    assert row["failures_until_seconds"] is not None
    assert row["failures_until_seconds"] <= back + ws


def test_second_replica_keeps_answering(tmp_path: Path) -> None:
    report = _run(tmp_path, replicas=2)
    f = report["figures"]
    assert f["ok"] >= 0.98 * f["scheduled"]
    (row,) = report["faults"]["faults"]
    assert row["inside"]["ok"] >= 0.95 * row["inside"]["scheduled"] > 0
