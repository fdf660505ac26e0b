"""A bounded slice of ``make fuzz`` against a real shard process: the same checks, 500 cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.fuzz import FuzzConfig, ShardProcess, run_fuzz

pytestmark = pytest.mark.integration

CASES = 500


async def test_fuzz_slice_finds_no_internal_error_no_write_no_leak(
    pg_admin_dsn: str, tmp_path: Path
) -> None:
    shard = await ShardProcess.start(pg_admin_dsn, tmp_path)
    try:
        report = await run_fuzz(
            shard.targets,
            FuzzConfig(cases=CASES, seed=0, max_replayed=300, time_limit_seconds=240),
            pid=shard.pid,
            database_url=shard.database_url,
            log_path=shard.log_path,
            max_request_bytes=shard.max_request_bytes,
        )
    finally:
        await shard.stop()
    assert report.ok, report.summary()
    assert report.cases_run == CASES and not report.truncated
    methods = {m for m, _ in report.statuses}
    # Every RPC of both APIs was reached, wherever the Federation API is served.
    for method in (
        "/omega.v1.ConstellationSync/SyncPatterns",
        "/omega.v1.ConstellationSync/FetchEmbeddings",
        "/omega.v1.ConstellationSync/FetchModel",
        "/omega.v1.ConstellationSync/ReportMetrics",
        "/omega.v1.ConstellationSync/SearchContent",
        "/omega.v1.Federation/ExportPatterns",
        "/omega.v1.Federation/PublishRound",
    ):
        assert method in methods, method
    refused = sum(n for (_, code), n in report.statuses.items() if code != "OK")
    assert refused > CASES // 2  # hostile cases are mostly refused...
    assert report.statuses["/omega.v1.ConstellationSync/SyncPatterns", "OK"] > 0  # ...not all
    assert report.replay_batches_checked > 0
    assert report.health_polls > 0 and report.rss_start_bytes > 0
