"""bench-fleet end to end at a tiny size, over two shards of two replicas each: the
``fleet_2x2`` section and its keys (figures are printed, not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]


def test_bench_fleet_quick_writes_its_section(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    out.write_text(json.dumps({"sync": {"kept": True}}))  # other sections survive
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.fleet_capacity",
            "--quick",
            "--shards",
            "2",
            "--replicas",
            "2",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "capacity (2 shard(s) x 2 replica(s)):" in run.stdout and "p99 ms" in run.stdout
    data = json.loads(out.read_text())
    assert data["sync"] == {"kept": True}
    fleet = data["fleet_2x2"]
    assert (fleet["shards"], fleet["replicas_per_shard"]) == (2, 2)
    for key in (
        "machine",
        "criterion",
        "step_seconds",
        "capacity_devices",
        "capacity_syncs_per_second",
        "limited_by",
        "steps",
    ):
        assert key in fleet, key
    assert fleet["criterion"]["p99_ms_below"] == 200.0
    assert isinstance(fleet["limited_by"], str) and fleet["limited_by"]
    assert len(fleet["steps"]) >= 1
    sizes = [s["devices"] for s in fleet["steps"]]
    assert len(set(sizes)) == len(sizes)  # each size measured once (the order follows the search)
    for step in fleet["steps"]:
        assert step["ok"] + step["failed"] == step["scheduled"] > 0
        assert step["scheduled_per_second"] > 0
        if step["ok"]:
            assert 0 < step["p50_ms"] <= step["p99_ms"]
        assert set(step["cpu_cores"]) == {"simulator", "shard", "postgres"}
        assert all(v >= 0 for v in step["cpu_cores"].values())
        assert isinstance(step["holds"], bool)
    if fleet["capacity_devices"]:
        assert fleet["capacity_devices"] in {s["devices"] for s in fleet["steps"] if s["holds"]}
