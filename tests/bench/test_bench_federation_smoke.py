"""bench-federation runs end to end at a tiny size (figures are not checked: they are printed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_bench_federation_quick_writes_its_section(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    out.write_text(json.dumps({"sync": {"kept": True}}))  # other sections survive
    run = subprocess.run(
        [sys.executable, "-m", "bench.federation_bench", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "worker peak MB" in run.stdout and "targets:" in run.stdout
    data = json.loads(out.read_text())
    assert data["sync"] == {"kept": True}
    federation = data["federation"]
    assert federation["peak_rss_mb_1m"] is None  # 1M is not among the quick sizes
    assert federation["settings"]["sizes"] == [2_000, 10_000]
    assert set(federation["targets"]) == {
        "round_seconds_1m",
        "peak_rss_mb_1m",
        "export_seconds_100k",
    }
    assert set(federation["per_size"]) == {"2000", "10000"}
    for size, entry in federation["per_size"].items():
        aggregation, round_ = entry["aggregation"], entry["round"]
        assert "error" not in aggregation and "error" not in round_, entry
        assert aggregation["patterns"] == int(size)
        assert round_["exported_patterns"] == round_["export_patterns"] == int(size)
        assert round_["status"] == "published"
        for part, keys in (
            (aggregation, ("seconds", "average_seconds", "peak_rss_mb", "input_rss_mb")),
            (round_, ("seconds", "peak_rss_mb", "export_seconds", "shard_peak_rss_mb")),
        ):
            for key in keys:
                assert isinstance(part[key], float) and part[key] > 0, (size, key)
    (step,) = federation["growth"]
    assert (step["from"], step["to"]) == (2_000, 10_000)
    assert {"aggregation_time_exponent", "round_time_exponent", "export_time_exponent"} <= set(step)
