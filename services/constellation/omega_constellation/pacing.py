"""Pace steering: the pause a sync answer asks of the device before its next sync.

Policy (``next_sync_after_ms`` of every SyncPatterns answer):

    pressure = max(in-flight RPCs / max_concurrent_rpcs, spent fraction of the device's burst)
    stretch  = 1 + (pace_max_multiplier - 1) * clip((pressure - threshold) / (1 - threshold), 0, 1)
    pause    = sync_interval_seconds * stretch * uniform(1 - jitter, 1 + jitter)

Below ``pace_pressure_threshold`` devices keep the fleet's pace (5 min by default, jittered so
they spread out); from there to a saturated replica (or a device at its rate limit) the pause
grows linearly up to ``pace_max_multiplier`` times. Capped at 2^32 - 1 ms (the field is uint32).
"""

from __future__ import annotations

import random

from omega_common.load_control import LoadControlInterceptor
from omega_constellation.settings import ConstellationSettings

__all__ = ["MAX_PAUSE_MS", "SyncPacer"]

MAX_PAUSE_MS = 2**32 - 1


class SyncPacer:
    """Computes ``next_sync_after_ms`` from the settings and the replica's load."""

    def __init__(
        self,
        settings: ConstellationSettings,
        load: LoadControlInterceptor | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """Args:
        settings: ``sync_interval_seconds``, ``sync_interval_jitter``,
            ``pace_pressure_threshold``, ``pace_max_multiplier``.
        load: where the in-flight count and the device buckets are read; None: no pressure.
        rng: jitter source (seeded in tests).
        """
        self._base = settings.sync_interval_seconds
        self._jitter = settings.sync_interval_jitter
        self._threshold = settings.pace_pressure_threshold
        self._max_multiplier = settings.pace_max_multiplier
        self._load = load
        self._rng = rng or random.Random()

    def pressure(self, device_id: str) -> float:
        """Load in [0, 1]: the larger of the replica's concurrency use and the device's rate use."""
        if self._load is None:
            return 0.0
        return max(self._load.concurrency_used(), self._load.rate_used(device_id))

    def stretch(self, pressure: float) -> float:
        """Multiplier of the base pause for a given pressure, in [1, pace_max_multiplier]."""
        excess = (pressure - self._threshold) / (1.0 - self._threshold)
        return 1.0 + (self._max_multiplier - 1.0) * min(1.0, max(0.0, excess))

    def next_sync_after_ms(self, device_id: str) -> int:
        """The pause to ask of ``device_id``, in ms (jittered, stretched under pressure)."""
        jitter = self._rng.uniform(1.0 - self._jitter, 1.0 + self._jitter)
        seconds = self._base * self.stretch(self.pressure(device_id)) * jitter
        return min(MAX_PAUSE_MS, max(0, round(seconds * 1000)))
