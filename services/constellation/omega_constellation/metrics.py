"""Prometheus metrics of the constellation (``omega_constellation_*``), one set per process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from omega_common.grpc_server import RpcMetrics
from omega_common.load_control import LoadMetrics

__all__ = [
    "CREDENTIALS_RELOADED",
    "DATABASE_UP",
    "DEVICE_RECOMMEND_P99",
    "DEVICE_SYNCS_FAILED",
    "GLOBAL_PATTERNS_HELD",
    "GLOBAL_VERSION",
    "LOAD",
    "MODEL_SNAPSHOTS_APPLIED",
    "MODEL_UPDATES_STORED",
    "MODEL_VERSION",
    "NEXT_SYNC_AFTER",
    "PATTERNS_STORED",
    "RPC",
    "SYNC_BATCH_REFUSED",
    "SYNC_BATCH_SECONDS",
    "SYNC_BATCH_SIZE",
    "SYNC_DUPLICATES",
    "SYNC_REDIRECTS",
    "SYNC_REQUEST_BYTES",
    "SYNC_RESPONSE_BYTES",
]

_SIZE_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536, 262144, 1048576)

RPC = RpcMetrics("constellation")
SYNC_REQUEST_BYTES = Histogram(
    "omega_constellation_sync_request_bytes",
    "Serialized SyncPatterns request size in bytes (what a device pushes).",
    buckets=_SIZE_BUCKETS,
)
SYNC_RESPONSE_BYTES = Histogram(
    "omega_constellation_sync_response_bytes",
    "Serialized SyncPatterns response size in bytes (what a device pulls).",
    buckets=_SIZE_BUCKETS,
)
PATTERNS_STORED = Counter(
    "omega_constellation_patterns_received_total", "Device patterns received in applied deltas."
)
SYNC_DUPLICATES = Counter(
    "omega_constellation_sync_duplicates_total", "Syncs answered as already applied (retries)."
)
SYNC_REDIRECTS = Counter(
    "omega_constellation_sync_redirects_total", "Syncs of devices that belong to another shard."
)
GLOBAL_VERSION = Gauge(
    "omega_constellation_global_version", "Federation round of the cached global patterns."
)
DEVICE_RECOMMEND_P99 = Histogram(
    "omega_constellation_device_recommend_p99_seconds",
    "Recommendation p99 latency reported by devices, in seconds.",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
)
DEVICE_SYNCS_FAILED = Counter(
    "omega_constellation_device_syncs_failed_total", "Failed syncs reported by devices."
)
MODEL_UPDATES_STORED = Counter(
    "omega_constellation_model_updates_received_total",
    "Devices' item-factor model updates stored by applied deltas.",
)
MODEL_SNAPSHOTS_APPLIED = Counter(
    "omega_constellation_model_snapshots_applied_total",
    "Whole-model snapshots from the federation worker that replaced a model behind its own.",
)
MODEL_VERSION = Gauge(
    "omega_constellation_model_version", "Version of the cached item-factor model (0: none)."
)
GLOBAL_PATTERNS_HELD = Gauge(
    "omega_constellation_global_patterns_held",
    "Global patterns held in memory for sync answers (bounded by max_global_patterns_held).",
)
DATABASE_UP = Gauge(
    "omega_constellation_database_up",
    "1 when the last readiness probe of the shard's Postgres answered, 0 when it did not.",
)
LOAD = LoadMetrics("constellation")
NEXT_SYNC_AFTER = Histogram(
    "omega_constellation_next_sync_after_seconds",
    "Pause before its next sync that sync answers ask of devices, in seconds.",
    buckets=(30, 60, 120, 240, 300, 360, 480, 600, 900, 1200, 1800, 3600, 7200),
)
SYNC_BATCH_SIZE = Histogram(
    "omega_constellation_sync_batch_size",
    "Deltas applied per group-commit transaction.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
SYNC_BATCH_SECONDS = Histogram(
    "omega_constellation_sync_batch_seconds",
    "Duration of one group-commit transaction (queue wait excluded), in seconds.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
SYNC_BATCH_REFUSED = Counter(
    "omega_constellation_sync_queue_refused_total",
    "Syncs refused with RESOURCE_EXHAUSTED because the group-commit queue was full.",
)
CREDENTIALS_RELOADED = Counter(
    "omega_constellation_credentials_reloaded_total",
    "Changes of the TLS files (what=tls) or the fleet keys file (what=fleet_keys) seen while "
    "running: outcome=ok when the new files are in use, refused when they were broken and the "
    "previous ones kept.",
    ["what", "outcome"],
)
for _what in ("tls", "fleet_keys"):
    for _outcome in ("ok", "refused"):
        CREDENTIALS_RELOADED.labels(_what, _outcome)  # exported as 0 from the start
