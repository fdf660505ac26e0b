"""Prometheus metrics of the federation worker (``omega_federation_*``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["CUMULATIVE_EPSILON", "PATTERNS_EXPORTED", "ROUNDS", "ROUND_SECONDS"]

ROUNDS = Counter("omega_federation_rounds_total", "Rounds by outcome.", ["status"])
ROUND_SECONDS = Histogram(
    "omega_federation_round_duration_seconds",
    "Wall time of a published round, in seconds.",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
PATTERNS_EXPORTED = Counter(
    "omega_federation_patterns_exported_total", "Device patterns exported from shards."
)
CUMULATIVE_EPSILON = Gauge(
    "omega_federation_cumulative_epsilon", "Differential privacy epsilon spent over all rounds."
)
