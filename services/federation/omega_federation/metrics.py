"""Prometheus metrics of the federation worker (``omega_federation_*``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "CREDENTIALS_RELOADED",
    "CUMULATIVE_EPSILON",
    "LAST_SUCCESS",
    "MODEL_EPSILON",
    "MODEL_EPSILON_BUDGET",
    "MODEL_SNAPSHOTS",
    "PATTERNS_EXPORTED",
    "ROUNDS",
    "ROUND_INTERVAL",
    "ROUND_SECONDS",
]

ROUNDS = Counter("omega_federation_rounds_total", "Rounds by outcome.", ["status"])
for _status in ("published", "resumed", "failed"):
    ROUNDS.labels(_status)  # exported as 0 from the start, so increase() sees the first one
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
LAST_SUCCESS = Gauge(
    "omega_federation_last_success_timestamp_seconds",
    "Unix time of the last round published or resumed by the periodic worker, in seconds.",
)
ROUND_INTERVAL = Gauge(
    "omega_federation_round_interval_seconds",
    "Configured time between round starts of the periodic worker, in seconds.",
)
MODEL_EPSILON = Gauge(
    "omega_federation_model_cumulative_epsilon",
    "Differential privacy epsilon the collaborative model's ledger has spent, all rounds.",
)
MODEL_EPSILON_BUDGET = Gauge(
    "omega_federation_model_epsilon_budget",
    "Cumulative epsilon the collaborative model's ledger may spend (+Inf: no limit).",
)
MODEL_SNAPSHOTS = Counter(
    "omega_federation_model_snapshots_total",
    "Whole-model snapshots sent to shards whose model was behind the worker's, by outcome "
    "(sent: the shard took it; failed: retried next round).",
    ["status"],
)
for _status in ("sent", "failed"):
    MODEL_SNAPSHOTS.labels(_status)
CREDENTIALS_RELOADED = Counter(
    "omega_federation_credentials_reloaded_total",
    "Changes of the worker's TLS or service token files seen by the periodic worker: "
    "outcome=ok when its channels were re-opened with them, refused when they were broken and "
    "the old channels kept.",
    ["outcome"],
)
for _outcome in ("ok", "refused"):
    CREDENTIALS_RELOADED.labels(_outcome)
