"""bench-brain runs end to end at a tiny size (figures are not checked: they are printed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

CATALOG_KEYS = (
    "items",
    "index_build_s",
    "start_ms",
    "load_catalog_s",
    "reopen_s",
    "cold_open_s",
    "cold_open_rss_growth_mb",
    "cold_open_peak_rss_growth_mb",
    "recommend_p50_ms",
    "recommend_p99_ms",
    "observe_p50_ms",
    "observe_p99_ms",
    "rss_growth_mb",
    "store_mb",
    "stats_store_mb",
    "recall_at_10",
    "recall_at_10_mixed",
)
HEADLINE_KEYS = (
    "reopen_s",
    "cold_open_s",
    "cold_open_rss_growth_mb",
    "recommend_p99_ms",
    "observe_p99_ms",
    "rss_growth_mb",
    "store_mb",
    "recall_at_10",
)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def test_bench_brain_quick_writes_its_section(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    out.write_text(json.dumps({"sync": {"kept": True}}))  # other sections survive
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.brain_bench",
            "--quick",
            "--dir",
            str(tmp_path),
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "recommend(10) p99 ms" in run.stdout
    data = json.loads(out.read_text())
    assert data["sync"] == {"kept": True}
    brain = data["brain"]
    assert brain["settings"]["quick"] is True
    synthetic = brain["synthetic"]
    assert synthetic["items"] == brain["settings"]["synthetic_items"]
    encrypted = brain["synthetic_encrypted"]
    assert encrypted["encrypted"] is True and synthetic["encrypted"] is False
    assert encrypted["items"] == synthetic["items"]
    catalogs = [synthetic, encrypted] + (
        [brain["movielens"]] if brain["movielens"] is not None else []
    )
    for catalog in catalogs:
        for key in CATALOG_KEYS:
            assert _is_number(catalog[key]), (key, catalog.get(key))
        assert 0.0 <= catalog["recall_at_10"] <= 1.0
    for key in HEADLINE_KEYS:
        assert brain[key] == synthetic[key], key
    assert list(tmp_path.iterdir()) == [out]  # the stores went with their temp dir
