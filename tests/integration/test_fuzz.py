"""A bounded slice of ``make fuzz`` against a real shard process: the same checks, 500 cases,
with credentials on (the seeded mix of `tools.fuzz.credentials`) and off."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.fuzz import CredentialMix, FuzzConfig, ShardProcess, run_fuzz

pytestmark = pytest.mark.integration

CASES = 500
_METHODS = (
    "/omega.v1.ConstellationSync/SyncPatterns",
    "/omega.v1.ConstellationSync/FetchEmbeddings",
    "/omega.v1.ConstellationSync/FetchModel",
    "/omega.v1.ConstellationSync/ReportMetrics",
    "/omega.v1.ConstellationSync/SearchContent",
    "/omega.v1.ConstellationSync/ForgetDevice",
    "/omega.v1.Federation/ExportPatterns",
    "/omega.v1.Federation/PublishRound",
)


@pytest.mark.parametrize("auth", [True, False], ids=["credentials", "no-credentials"])
async def test_fuzz_slice_finds_no_internal_error_no_write_no_leak(
    pg_admin_dsn: str, tmp_path: Path, auth: bool
) -> None:
    shard = await ShardProcess.start(pg_admin_dsn, tmp_path, auth=auth)
    try:
        mix = CredentialMix(shard.keys, 0, shard.targets[1:]) if shard.keys is not None else None
        report = await run_fuzz(
            shard.targets,
            FuzzConfig(cases=CASES, seed=0, max_replayed=300, time_limit_seconds=240, metadata=mix),
            pid=shard.pid,
            database_url=shard.database_url,
            log_path=shard.log_path,
            max_request_bytes=shard.max_request_bytes,
            internal_max_request_bytes=shard.internal_max_request_bytes,
        )
    finally:
        await shard.stop()
    assert report.ok, report.summary()
    assert report.cases_run == CASES and not report.truncated
    methods = {m for m, _ in report.statuses}
    # Every RPC of both APIs was reached, wherever the Federation API is served.
    for method in _METHODS:
        assert method in methods, method
    refused = sum(n for (_, code), n in report.statuses.items() if code != "OK")
    assert refused > CASES // 2  # hostile cases are mostly refused...
    assert report.statuses["/omega.v1.ConstellationSync/SyncPatterns", "OK"] > 0  # ...not all
    assert report.replay_batches_checked > 0
    assert report.health_polls > 0 and report.rss_start_bytes > 0
    assert report.rss_baseline_bytes > 0 and report.rss_warmup_cases == 100
    kinds = {k for k, _ in report.credentials}
    if not auth:
        assert kinds == {"plain"}
        return
    codes = report.credentials
    assert kinds == {
        "device@device",
        "other-device@device",
        "none@device",
        "forged@device",
        "service@device",
        "service@internal",
        "device@internal",
        "intruder@internal",
        "none@internal",
        "forged@internal",
    }
    # Valid credentials reach validation and past it, on both listeners...
    for kind in ("device@device", "service@internal"):
        assert codes[kind, "INVALID_ARGUMENT"] > 0 and codes[kind, "OK"] > 0, kind
    # ...the others are refused by the credential check (health and reflection are open).
    for kind in ("none@device", "forged@device", "none@internal", "forged@internal"):
        assert codes[kind, "UNAUTHENTICATED"] > 0, kind
        assert codes[kind, "INVALID_ARGUMENT"] == codes[kind, "PERMISSION_DENIED"] == 0, kind
    for kind in ("service@device", "device@internal", "intruder@internal"):
        assert codes[kind, "PERMISSION_DENIED"] > 0, kind
        assert codes[kind, "UNAUTHENTICATED"] == 0, kind
    assert codes["other-device@device", "PERMISSION_DENIED"] > 0
