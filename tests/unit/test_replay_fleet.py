"""The replay's syncs as a fleet run: failure names, the closed-loop log, the scenario and
the fleet report built from them, and the fleet options the replay refuses."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from omega_brain import SyncResult
from omega_simulator.fleet_cli import add_fleet_arguments, fleet_main
from omega_simulator.fleet_measure import percentiles_ms
from omega_simulator.fleet_report import build_report, render_markdown
from omega_simulator.replay_cli import replay_settings
from omega_simulator.replay_fleet import SyncLog, replay_fleet_run, sync_status


def _result(
    ok: bool = True,
    *,
    error: str | None = None,
    redirect: str | None = None,
    paced: bool = False,
    bytes_up: int = 100,
    bytes_down: int = 40,
    model_bytes_down: int = 0,
) -> SyncResult:
    return SyncResult(
        ok=ok,
        attempts=1,
        bytes_up=bytes_up,
        bytes_down=bytes_down,
        latency_seconds=0.01,
        acknowledged_version=0,
        global_version=0,
        patterns_sent=0,
        global_patterns_received=0,
        error=error,
        redirect_shard_id=redirect,
        model_bytes_down=model_bytes_down,
        paced=paced,
    )


@pytest.mark.parametrize(
    ("result", "status"),
    [
        (
            _result(
                False,
                error="SyncPatterns failed: UNAVAILABLE: down [UNAVAILABLE] after 3 attempt(s)",
            ),
            "UNAVAILABLE",
        ),
        (
            _result(False, error="settling the unconfirmed send: x [DEADLINE_EXCEEDED]"),
            "DEADLINE_EXCEEDED",
        ),
        # Brackets in the server's details are not statuses; the brain's own suffix wins.
        (
            _result(False, error="failed: [not a code] [NOPE] [RESOURCE_EXHAUSTED] after 1"),
            "RESOURCE_EXHAUSTED",
        ),
        (_result(False, error="device belongs to shard 'b'", redirect="b"), "REDIRECTED"),
        (_result(False, error="paced: the shard asked ...", paced=True), "PACED"),
        (_result(False, error="transport returned a non-response"), "UNKNOWN"),
        (_result(False), "UNKNOWN"),
    ],
)
def test_sync_status_names_the_grpc_status_or_unknown(result: SyncResult, status: str) -> None:
    assert sync_status(result) == status


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_sync_log_accounts_for_every_sync_by_call_time() -> None:
    clock = _Clock()
    log = SyncLog(clock)
    for i in range(300):  # one sync per second, 50 ms each, every 10th failing
        clock.t = 100.0 + i
        called = log.now()
        clock.t += 0.05
        failed = i % 10 == 0
        log.record(called, _result(not failed, error="x [UNAVAILABLE]" if failed else None))
    clock.t = 100.0 + 300.0
    log.record(299.5, _result(False, redirect="b"))
    rec = log.recorder(300.0)
    assert len(log) == 301
    assert rec.window_seconds == pytest.approx(2.5)  # 300 s / 120 windows
    assert rec.total_scheduled == 301 and rec.total_ok == 270 and rec.total_failed == 31
    assert dict(rec.errors) == {"UNAVAILABLE": 30, "REDIRECTED": 1}
    assert rec.redirects == 1
    assert percentiles_ms(rec.latency)["p50"] == pytest.approx(50.0, rel=0.01)
    assert rec.scheduled[0] == 3 and rec.failed[0] == 1  # seconds 0, 1, 2; sync 0 failed


def test_short_replays_get_one_second_windows() -> None:
    log = SyncLog()
    log.record(0.0, _result(bytes_down=40, model_bytes_down=1000))
    rec = log.recorder(3.2)
    assert rec.window_seconds == 1.0 and rec.windows == 5
    assert sum(rec.bytes_down) == 1040  # the sync's reply and its model download


def test_replay_fleet_run_describes_a_closed_loop_run() -> None:
    clock = _Clock()
    log = SyncLog(clock)
    for i in range(40):
        clock.t = 100.0 + i / 4
        log.record(log.now(), _result())
    clock.t = 110.0
    run = replay_fleet_run(
        log,
        shards={"shard-0": "127.0.0.1:1"},
        devices=4,
        workers=100,
        seed=3,
        rpc_timeout_seconds=5.0,
        wall_seconds=10.0,
    )
    sc = run.scenario
    assert sc.name == "replay" and sc.devices == 4 and sc.workers == 64
    assert sc.sync_interval_seconds == pytest.approx(1.0)  # 40 syncs of 4 devices in 10 s
    assert "closed loop" in sc.description
    report = build_report(run)
    f = report["figures"]
    assert f["scheduled"] == f["ok"] == 40 and f["accounted"]
    assert run.closed_loop and report["run"]["closed_loop"]
    md = render_markdown(report)
    assert "Closed loop: no schedule" in md and "Open loop" not in md
    assert "64 thread(s)" in md


def _fleet_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_fleet_arguments(parser)
    return parser.parse_args(["--scenario", "replay", *argv])


@pytest.mark.parametrize(
    "extra",
    [
        ["--duration", "10"],
        ["--time-compression", "60"],
        ["--metrics-port", "9"],
        ["--devices", "0"],
    ],
)
def test_fleet_replay_refuses_options_that_do_not_apply(
    extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert fleet_main(_fleet_args("--local", *extra)) == 2
    assert "omega-simulator fleet:" in capsys.readouterr().err


def test_fleet_options_map_to_replay_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMEGA_SIMULATOR_PHASES", "2")
    s = replay_settings(
        _fleet_args("--local", "--devices", "30", "--workers", "3", "--shards", "2")
    )
    assert (s.max_users, s.workers, s.shard_count, s.phases) == (30, 3, 2, 2)
    t = replay_settings(_fleet_args("--target", "127.0.0.1:1", "--seed", "9"))
    assert t.max_users is None and t.seed == 9 and t.shard_count == 2  # the default


def test_fleet_replay_refuses_a_malformed_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fleet_main(_fleet_args("--target", "nowhere", "--output", str(tmp_path))) == 2
    assert "HOST:PORT" in capsys.readouterr().err
