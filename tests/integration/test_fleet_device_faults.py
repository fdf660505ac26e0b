"""Device-behaviour faults against a real shard process: malformed syncs are refused with
INVALID_ARGUMENT and counted apart (ok + failed + refused as expected = scheduled),
factory-reset devices pull, then resume past the shard's version (no wedge), stores
restored from an older backup (stale versions) are answered as duplicates naming the shard's
version and then resume past it, skewed clocks are accepted and churn changes the schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omega_simulator.__main__ import main
from tools.fuzz.shard import ShardProcess

from .fleet_support import fleet_keys_file, fleet_shard  # noqa: F401 - the fixtures

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def test_device_faults_are_refused_resumed_and_accounted(
    shard: ShardProcess, fleet_keys: Path, tmp_path: Path
) -> None:
    scenario = tmp_path / "device-faults.toml"
    # 500 devices, one sync per 3 s wall, 8 s: resets at 1.6-4.8 s leave time for a sync after
    scenario.write_text(
        'name = "device-faults"\ndevices = 500\nduration_seconds = 8\ntime_compression = 100\n'
        "rpc_timeout_seconds = 5\nviews_per_day = 200\nmalformed_fraction = 0.1\n"
        "factory_reset_fraction = 0.2\nstale_fraction = 0.2\nclock_skew_seconds = 86400\n"
        "churn_fraction = 0.2\n"
    )
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        main(
            [
                "fleet",
                "--no-live",
                "--scenario",
                str(scenario),
                "--target",
                f"shard-0={shard.targets[0]}",
                "--plaintext",
                "--fleet-keys",
                str(fleet_keys),
                "--output",
                str(out),
                "--metrics-port",
                "0",  # live Prometheus export on a free port (scraped in the unit test)
            ]
        )
    assert done.value.code == 0
    report = json.loads((out / "report.json").read_text())
    f, d = report["figures"], report["device_faults"]
    print(json.dumps({"figures": f, "errors": report["errors"], "device_faults": d}, indent=1))
    assert f["accounted"] is True
    assert f["ok"] + f["failed"] + f["refused_as_expected"] == f["scheduled"]
    # malformed: every one refused with INVALID_ARGUMENT, none accepted, none a failure
    assert d["malformed_sent"] > 0.05 * f["scheduled"]
    assert d["malformed_refused"] == d["malformed_sent"] == f["refused_as_expected"]
    assert d["malformed_accepted"] == 0
    assert "INVALID_ARGUMENT" not in report["errors"]
    # everything else (skewed clocks included) was answered
    assert f["ok"] >= 0.95 * (f["scheduled"] - f["refused_as_expected"])
    # factory resets: they pulled and their new changes were acknowledged
    assert d["factory_resets"] > 0.1 * 500
    assert d["resets_wedged"] == 0
    assert d["resets_resumed"] >= 0.8 * d["factory_resets"]
    assert d["resets_resumed"] + d["resets_unresolved"] == d["factory_resets"]
    # stale stores: shown behind by the shard (or already past it), then their renumbered
    # changes applied; none wedged, every one settled or still open at the end
    # (the run is short: a rollback late in it, or a device that vanishes, stays unsettled)
    assert d["stale_rollbacks"] > 0.1 * 500
    assert d["stale_detected"] >= 0.2 * d["stale_rollbacks"]
    assert d["stale_applied"] == d["stale_wedged"] == 0
    assert d["stale_resumed"] >= 0.3 * d["stale_detected"]
    assert d["stale_resumed"] + d["stale_passed"] + d["stale_unresolved"] == d["stale_rollbacks"]
    # churn: 50 appeared, 50 vanished (fewer syncs than the 500 devices would have made)
    assert (d["churn_appeared"], d["churn_vanished"]) == (50, 50)
    assert f["scheduled"] < 500 * 8 / 3
    md = (out / "report.md").read_text()
    assert "## Device faults" in md and "malformed refused as expected" in md
