"""Readiness from a dependency probe: a background task that flips health when it fails.

`DependencyWatcher` runs ``probe`` every ``interval_seconds`` (each probe bounded by
``timeout_seconds``). On the first failure after a success it calls ``on_change(False)`` (e.g.
set gRPC health NOT_SERVING) and logs one warning; on the first success after a failure it
calls ``on_change(True)`` and logs once. A Prometheus gauge, when given, holds 1 or 0 after
every probe. The services use it for their Postgres (``SELECT 1`` through the pool).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog
from prometheus_client import Gauge

__all__ = ["DependencyWatcher"]

_log = structlog.get_logger(component="readiness")


class DependencyWatcher:
    """Probes a dependency periodically and reports up/down transitions."""

    def __init__(
        self,
        probe: Callable[[float], Awaitable[object]],
        on_change: Callable[[bool], Awaitable[None]],
        *,
        interval_seconds: float,
        timeout_seconds: float,
        name: str = "database",
        gauge: Gauge | None = None,
        initially_up: bool = True,
    ) -> None:
        """Args:
            probe: called with the timeout in seconds; returns when the dependency answered,
                raises when it did not (any exception counts as down).
            on_change: awaited with the new state on each transition (not on every probe).
            interval_seconds: pause between the end of a probe and the next one (> 0).
            timeout_seconds: a probe taking longer counts as a failure (> 0).
            name: the dependency's name in log events.
            gauge: set to 1 (up) or 0 (down) after every probe.
            initially_up: the state before the first probe (the caller usually just used it).

        Raises:
            ValueError: a non-positive interval or timeout.
        """
        if not interval_seconds > 0 or not timeout_seconds > 0:
            raise ValueError("interval_seconds and timeout_seconds must be positive")
        self._probe = probe
        self._on_change = on_change
        self._interval = interval_seconds
        self._timeout = timeout_seconds
        self._name = name
        self._gauge = gauge
        self._up = initially_up
        self._down_since = 0.0 if initially_up else time.monotonic()
        self._task: asyncio.Task[None] | None = None
        if gauge is not None:
            gauge.set(1 if initially_up else 0)

    @property
    def up(self) -> bool:
        """The state after the last probe (``initially_up`` before the first)."""
        return self._up

    def start(self) -> None:
        """Start probing in a background task of the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"watch-{self._name}"
            )

    async def stop(self) -> None:
        """Stop probing and wait for the task to end (idempotent); no transition is reported."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def check(self) -> bool:
        """Probe once, report a transition if the state changed; returns the new state."""
        error: Exception | None = None
        try:
            # A probe over its time raises TimeoutError here; a cancellation of this task
            # (stop()) stays a CancelledError and propagates.
            async with asyncio.timeout(self._timeout):
                await self._probe(self._timeout)
        except Exception as exc:  # any failure of the probe means "not ready"
            error = exc
        up = error is None
        if self._gauge is not None:
            self._gauge.set(1 if up else 0)
        if up != self._up:
            self._up = up
            if up:
                down_for = time.monotonic() - self._down_since
                _log.info(f"{self._name}_up", down_seconds=round(down_for, 3))
            else:
                self._down_since = time.monotonic()
                _log.warning(
                    f"{self._name}_down",
                    error=type(error).__name__,
                    reason=str(error)[:200],
                )
            await self._on_change(up)
        return up

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # on_change failed: log, keep watching
                _log.exception(f"{self._name}_watch_failed")
            await asyncio.sleep(self._interval)
