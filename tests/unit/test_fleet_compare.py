"""`omega-simulator compare`: device-fault counters appear side by side when either run used
them, and stay out of the table otherwise."""

from __future__ import annotations

from typing import Any

from omega_simulator.fleet_report import DEVICE_FAULT_COUNTERS, compare_reports


def _report(scheduled: int, device_faults: dict[str, int] | None) -> dict[str, Any]:
    return {
        "figures": {"scheduled": scheduled, "ok": scheduled, "failed": 0},
        "errors": {},
        "device_faults": device_faults,
    }


def test_device_fault_counters_are_compared_when_either_run_used_them() -> None:
    a = _report(100, {"factory_resets": 10, "resets_resumed": 8, "stale_rollbacks": 0})
    b = _report(120, {"factory_resets": 10, "resets_resumed": 9, "stale_rollbacks": 4})
    rows = {r[0]: r[1:] for r in compare_reports(a, b)}
    labels = dict(DEVICE_FAULT_COUNTERS)
    assert rows[f"device fault: {labels['factory_resets']}"] == ("10", "10", "=")
    assert rows[f"device fault: {labels['resets_resumed']}"] == ("8", "9", "+12.5%")
    assert rows[f"device fault: {labels['stale_rollbacks']}"] == ("0", "4", "new")
    assert f"device fault: {labels['malformed_sent']}" not in rows  # neither run used it
    assert rows["syncs scheduled"] == ("100", "120", "+20.0%")


def test_runs_without_device_faults_have_no_device_fault_rows() -> None:
    rows = compare_reports(_report(5, None), _report(5, None))
    assert not [r for r in rows if r[0].startswith("device fault")]
