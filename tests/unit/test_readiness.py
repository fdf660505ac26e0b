"""DependencyWatcher: transitions reported once, timeouts count as failures, clean stop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry, Gauge
from structlog.testing import capture_logs

from omega_common.readiness import DependencyWatcher


class Dependency:
    """A probe target whose health the test sets: up, down (raises) or hanging."""

    def __init__(self) -> None:
        self.state = "up"
        self.probes = 0

    async def probe(self, timeout_seconds: float) -> None:
        self.probes += 1
        if self.state == "down":
            raise ConnectionRefusedError("connection refused")
        if self.state == "hang":
            await asyncio.sleep(timeout_seconds * 10)


async def wait_for(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {seconds} s")


async def test_transitions_are_reported_once_and_the_gauge_follows() -> None:
    dependency = Dependency()
    changes: list[bool] = []

    async def on_change(up: bool) -> None:
        changes.append(up)

    registry = CollectorRegistry()
    gauge = Gauge("test_dependency_up", "test", registry=registry)

    def gauge_value() -> float | None:
        return registry.get_sample_value("test_dependency_up")

    watcher = DependencyWatcher(
        dependency.probe, on_change, interval_seconds=0.01, timeout_seconds=0.5, gauge=gauge
    )
    assert watcher.up and gauge_value() == 1
    with capture_logs() as logs:
        watcher.start()
        watcher.start()  # idempotent
        await wait_for(lambda: dependency.probes >= 3)
        dependency.state = "down"
        await wait_for(lambda: not watcher.up)
        probes = dependency.probes
        await wait_for(lambda: dependency.probes >= probes + 5)  # still down, many probes
        assert gauge_value() == 0
        dependency.state = "up"
        await wait_for(lambda: watcher.up)
        await watcher.stop()
        await watcher.stop()  # idempotent
    assert changes == [False, True]
    events = [e["event"] for e in logs]
    assert events.count("database_down") == 1 and events.count("database_up") == 1
    down = next(e for e in logs if e["event"] == "database_down")
    assert down["error"] == "ConnectionRefusedError" and down["log_level"] == "warning"
    assert gauge_value() == 1
    probes = dependency.probes
    await asyncio.sleep(0.05)
    assert dependency.probes == probes  # stopped


async def test_a_probe_over_its_timeout_counts_as_down() -> None:
    dependency = Dependency()
    dependency.state = "hang"
    changes: list[bool] = []

    async def on_change(up: bool) -> None:
        changes.append(up)

    watcher = DependencyWatcher(
        dependency.probe, on_change, interval_seconds=1.0, timeout_seconds=0.05, name="db"
    )
    with capture_logs() as logs:
        async with asyncio.timeout(1.0):
            assert await watcher.check() is False
    assert changes == [False]
    assert logs[0]["event"] == "db_down" and logs[0]["error"] == "TimeoutError"
    dependency.state = "up"
    assert await watcher.check() is True
    assert changes == [False, True]


async def test_a_failing_callback_does_not_stop_the_watch() -> None:
    dependency = Dependency()
    dependency.state = "down"
    calls: list[bool] = []

    async def on_change(up: bool) -> None:
        calls.append(up)
        raise RuntimeError("health service gone")

    watcher = DependencyWatcher(
        dependency.probe, on_change, interval_seconds=0.01, timeout_seconds=0.5
    )
    with capture_logs():
        watcher.start()
        await wait_for(lambda: calls == [False])
        dependency.state = "up"
        await wait_for(lambda: calls == [False, True])
        await watcher.stop()


def test_arguments_are_checked() -> None:
    async def probe(timeout_seconds: float) -> None:
        return None

    async def on_change(up: bool) -> None:
        return None

    with pytest.raises(ValueError):
        DependencyWatcher(probe, on_change, interval_seconds=0, timeout_seconds=1)
    with pytest.raises(ValueError):
        DependencyWatcher(probe, on_change, interval_seconds=1, timeout_seconds=-1)
