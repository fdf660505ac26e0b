"""Plain data the brain takes and returns."""

from __future__ import annotations

from dataclasses import dataclass

from omega.v1 import events_pb2

__all__ = ["BrainStats", "Recommendation", "SyncResult", "ViewingEvent"]


@dataclass(frozen=True, slots=True)
class ViewingEvent:
    """One viewing on the device (validated by `Brain.observe`, not here).

    Attributes:
        content_id: catalog id of what was watched.
        started_at_ms: start time in milliseconds since the Unix epoch (UTC), >= 0.
        completion: fraction watched in [0, 1]: >= 0.8 success, < 0.2 failure.
        watch_seconds: seconds watched, >= 0 (kept in the history; not used for learning).
    """

    content_id: str
    started_at_ms: int
    completion: float
    watch_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Recommendation:
    """One recommended item.

    Attributes:
        content_id: catalog id.
        score: relevance: cosine similarity to the query plus the trend bonus (or the
            normalized trending score alone on a trending-only cold start); with the
            collaborative model, the model score normalized to a maximum of 1 (the scaled
            content similarity for items the model does not know) plus the trend bonus. The
            list is in MMR order, which may differ slightly from score order.
        reasons: why, strongest first, e.g. ``("matches your evening/weekend viewing",
            "trending")``; never empty.
    """

    content_id: str
    score: float
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What one `Brain.sync` call did.

    Attributes:
        ok: True when the server applied the delta and its reply was fully applied.
        attempts: RPC attempts made (1 + retries).
        bytes_up: serialized size of the request, in bytes.
        bytes_down: serialized size of the last response, in bytes (0 when none arrived).
        latency_seconds: duration of the last attempt, in seconds.
        acknowledged_version: the brain's acknowledged local version after the call.
        global_version: the brain's global (federation round) version after the call.
        patterns_sent: patterns in the request's delta (added + updated).
        global_patterns_received: valid global patterns stored from the reply.
        error: why the call did not fully succeed, else None.
        redirect_shard_id: set when the replica said the device belongs to another shard;
            nothing was applied and the caller should sync with that shard instead. The
            brain has forgotten its shard-side state: its next accepted sync re-sends every
            pattern (see `Brain.sync`).
        server_pattern_count: patterns the shard stores for this device after the call (only
            those above its quality threshold); 0 when no reply was applied.
        model_version: the brain's collaborative-model version after the call (0: none).
        model_update_sent: the request carried the device's model update (``ItemFactorUpdate``);
            it counts as delivered only when ``ok``.
        model_rows_received: item-factor rows applied from FetchModel during the call.
        model_bytes_down: serialized size of the FetchModel replies received during the call,
            in bytes (not included in ``bytes_down``).
        model_error: why fetching the model failed (the sync itself still succeeded; the
            fetch is tried again at the next sync), else None.
        paced: the call was made before the time the shard asked for and nothing was sent
            (``ok`` False, ``attempts`` 0; see `BrainConfig.honour_sync_pace`).
        next_sync_at_ms: when the shard asked this device to sync next, ms since the epoch
            (0: no request); call `Brain.sync` again at or after it.
    """

    ok: bool
    attempts: int
    bytes_up: int
    bytes_down: int
    latency_seconds: float
    acknowledged_version: int
    global_version: int
    patterns_sent: int
    global_patterns_received: int
    error: str | None = None
    redirect_shard_id: str | None = None
    server_pattern_count: int = 0
    model_version: int = 0
    model_update_sent: bool = False
    model_rows_received: int = 0
    model_bytes_down: int = 0
    model_error: str | None = None
    paced: bool = False
    next_sync_at_ms: int = 0


@dataclass(frozen=True, slots=True)
class BrainStats:
    """Counters and sizes of one brain (see `Brain.stats`).

    Attributes:
        device_id: the device.
        events_observed: viewing events stored.
        pattern_count: context buckets with a learned embedding.
        global_pattern_count: global patterns stored.
        trending_count: trending items stored.
        catalog_size: items in the catalog index (0 without a catalog).
        watched_count: distinct content ids observed.
        pending_view_count: distinct content ids with views not yet synced.
        local_version: bumped by every observed event.
        acked_version: last local version the server acknowledged.
        global_version: last federation round received.
        catalog_version: catalog version of the last fetch (0: none or loaded locally).
        recommendations_served: recommend() calls since the brain was opened.
        syncs_ok: successful syncs (persisted).
        syncs_failed: failed syncs (persisted).
        recommend_p50_ms: median recommend() latency over the last 1024 calls, in ms.
        recommend_p99_ms: 99th percentile of the same, in ms.
        store_bytes: size of the SQLite database plus its WAL, in bytes.
        model_version: version of the collaborative model (0: none).
        model_items: items the model has rows for (some may not be in the catalog).
        model_bytes_down: bytes of every FetchModel reply received (persisted).
        next_sync_at_ms: when the shard asked this device to sync next (its last answer's
            ``next_sync_after_ms`` after the brain's clock, ms since the epoch; 0: no
            request yet). Host schedulers should not sync before it, except for a user's
            explicit action.
        syncs_redirected: sync answers that named another shard (``redirect_shard_id``;
            persisted, also counted in ``syncs_failed``). Each one left the store as a new
            store of a known device, so the next accepted sync re-sends every pattern (see
            `Brain.sync`).
    """

    device_id: str
    events_observed: int
    pattern_count: int
    global_pattern_count: int
    trending_count: int
    catalog_size: int
    watched_count: int
    pending_view_count: int
    local_version: int
    acked_version: int
    global_version: int
    catalog_version: int
    recommendations_served: int
    syncs_ok: int
    syncs_failed: int
    recommend_p50_ms: float
    recommend_p99_ms: float
    store_bytes: int
    model_version: int = 0
    model_items: int = 0
    model_bytes_down: int = 0
    next_sync_at_ms: int = 0
    syncs_redirected: int = 0

    def to_proto(self) -> events_pb2.DeviceMetrics:
        """The counters as an `omega.v1.DeviceMetrics` for ``ReportMetrics``."""
        return events_pb2.DeviceMetrics(
            events_observed=self.events_observed,
            recommendations_served=self.recommendations_served,
            syncs_ok=self.syncs_ok,
            syncs_failed=self.syncs_failed,
            pattern_count=self.pattern_count,
            recommend_p99_ms=self.recommend_p99_ms,
            store_bytes=self.store_bytes,
        )
