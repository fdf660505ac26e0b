"""The federation worker's metrics that the alert rules read (deploy/prometheus/rules).

`run_periodic` exports the configured interval and the time of the last successful round
(OmegaFederationRoundLate), and every round outcome is exported from the start as 0
(OmegaFederationRoundFailing's ``increase()`` then sees the first failure). The model's
epsilon gauges are set by a real round: tests/integration/test_prometheus_live.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import pytest
from prometheus_client import REGISTRY

from omega_common.errors import UnavailableError
from omega_federation import worker
from omega_federation.settings import FederationSettings
from omega_federation.worker import RoundReport, run_periodic


def _value(name: str, labels: Mapping[str, str] | None = None) -> float | None:
    return REGISTRY.get_sample_value(name, dict(labels or {}))


def test_every_round_outcome_is_exported_before_any_round() -> None:
    for status in ("published", "resumed", "failed"):
        assert _value("omega_federation_rounds_total", {"status": status}) is not None, status


async def test_periodic_worker_exports_interval_and_last_success(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    outcomes: list[RoundReport | Exception] = [
        RoundReport(1, "published"),
        UnavailableError("shard-0 down"),
        RoundReport(None, "skipped_locked"),
    ]
    stop = asyncio.Event()
    seen: list[float | None] = []

    async def fake_round(*_: Any) -> RoundReport:
        # What the gauge held when this round started (the previous rounds' effect).
        seen.append(_value("omega_federation_last_success_timestamp_seconds"))
        outcome = outcomes.pop(0)
        if not outcomes:
            stop.set()
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(worker, "run_round", fake_round)
    failed_before = _value("omega_federation_rounds_total", {"status": "failed"}) or 0.0
    before = time.time()
    settings = FederationSettings(interval_seconds=0.001, plaintext=True)
    published = await run_periodic(settings, None, {}, stop)  # type: ignore[arg-type]
    after = time.time()

    assert published == 1
    assert _value("omega_federation_round_interval_seconds") == pytest.approx(0.001)
    last = _value("omega_federation_last_success_timestamp_seconds")
    assert last is not None and before <= last <= after
    # Set by the published round only: the failed and the skipped rounds left it alone.
    assert seen[1] == seen[2] == last
    failed = _value("omega_federation_rounds_total", {"status": "failed"})
    assert failed == failed_before + 1
