"""The benchmarks run end to end at a tiny size (figures are not checked: they are printed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_bench_sync_quick_writes_its_section(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    out.write_text(json.dumps({"brain": {"kept": True}}))  # other sections survive
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.sync_throughput",
            "--quick",
            "--workers",
            "1",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "pipeline / bare throughput" in run.stdout
    data = json.loads(out.read_text())
    assert data["brain"] == {"kept": True}
    sync = data["sync"]
    for key in (
        "ratio_to_bare",
        "p99_ms_at_70pct",
        "max_syncs_per_second",
        "bare_max_syncs_per_second",
    ):
        assert isinstance(sync[key], float) and sync[key] > 0, key
    pipeline = sync["pipeline"]["max"]
    assert pipeline["ok"] > 0 and not pipeline["errors"]
    assert pipeline["ok"] == pipeline["sent"]  # every sync answered
    assert set(pipeline["cpu_ms_per_request"]) == {"server", "postgres", "load_generator"}
