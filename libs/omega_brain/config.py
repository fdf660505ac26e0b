"""Configuration of one TV brain."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BrainConfig"]

_MAX_UTC_OFFSET_MINUTES = 14 * 60
ENCRYPTION_KEY_BYTES = 32
"""Length of `BrainConfig.encryption_key` (AES-256)."""


@dataclass(frozen=True)
class BrainConfig:
    """Settings of a `Brain`; every field has a default that works on a TV.

    Raises:
        ValueError: from ``__post_init__`` when a field is out of range (the message names it).
    """

    store_path: str | Path = ":memory:"
    """SQLite file of the local store; ``":memory:"`` keeps everything in RAM (tests, simulator)."""

    success_completion: float = 0.8
    """A viewing with completion >= this counts as a success."""
    failure_completion: float = 0.2
    """A viewing with completion < this counts as a failure."""
    min_step: float = 0.02
    """Lower bound of the running-mean step on success, so old patterns keep adapting."""
    failure_step: float = 0.05
    """How far a pattern moves away from content the viewer abandoned, in (0, 0.5]."""

    hnsw_m: int = 32
    """HNSW graph degree of the catalog index (large catalogs only)."""
    hnsw_ef_construction: int = 40
    """HNSW build-time beam width."""
    ef_search: int = 128
    """HNSW search beam width; faiss uses max(ef_search, k)."""
    exact_search_max_items: int = 5000
    """Catalogs up to this size use an exact flat inner-product index (see `CatalogIndex`).

    This is the index's memory budget: the index type follows the catalog size, an exact
    flat index (1,536 bytes of float32 an item) up to this size and HNSW over SQ8 codes above
    (384 bytes of codes an item plus about ``2 x hnsw_m`` 4-byte graph links), persisted
    beside the store and memory-mapped at reopen."""

    candidate_multiplier: int = 5
    """recommend() asks the index for k * this many candidates (plus the watched count); with
    the collaborative model, MMR re-ranks the k * this many best-scored unwatched items."""
    local_weight: float = 1.0
    """Weight of the device's own pattern in the query (scaled by its success rate)."""
    global_weight: float = 0.5
    """Weight of the matching global patterns in the query (scaled by their success rate)."""
    global_top_n: int = 3
    """At most this many global patterns are blended into one query."""
    trend_weight: float = 0.5
    """Added to an item's score times its trending score normalized to [0, 1].

    0.5 came from a sweep over {0.2, 0.5, 1.0, 2.0} on the MovieLens replay (see README):
    0.2 lets content similarity dominate (precision@10 0.067), 1.0-2.0 collapse towards
    plain popularity (coverage@10 0.05); 0.5 keeps both (precision@10 0.077, coverage 0.07).
    """
    mmr_lambda: float = 0.7
    """MMR trade-off: 1.0 ranks by relevance only, lower values favour diversity."""
    model_trend_weight: float = 0.0
    """With the collaborative model: weight of the trending score (normalized to [0, 1]) added
    to the model score (normalized to a maximum of 1).

    0 as chosen by the validation search of ``bench/collaborative_quality.py`` (from {0, 0.2})
    at epsilon 8; without a model, `trend_weight` applies as before.
    """
    model_cold_weight: float = 0.0
    """With the collaborative model: the best item the model does not know scores this, the
    others in proportion to their content similarity to the pattern query (see
    `omega_brain.ranking.model_relevance`), so new items can still be recommended. 0 (the
    default) leaves them to the trend prior. Measured on the MovieLens replay, 0.5 cost half
    the precision (no-noise run: 0.068 instead of 0.127 precision@10): the model's scores are
    normalized by the device's best item, usually already watched, so the best unwatched known
    items score about 0.5 and content matches (genre-level, 0.017 precision@10 on their own)
    crowded them out. Raise it only with a validation set that has cold items.
    """
    model_context_weight: float = 0.0
    """With the collaborative model: how far the context bucket of the recommendation moment
    (time slot x day type) steers the ranking. The user factor becomes
    ``x / |x| + model_context_weight x x_c / |x_c|`` with ``x`` folded in from every viewing
    and ``x_c`` from the viewings of that bucket only (`omega_brain.collaborative.steer_factor`);
    a bucket without a viewing the model knows is not steered. 0 ranks by the whole history,
    exactly as without this setting.

    0 as chosen by the validation search of ``bench/collaborative_quality.py`` (weights
    {0, 0.25, 0.5, 1} at the epsilon-8 model, MMR 0.7; the rule, fixed before the search: a
    weight replaces 0 only if it gains more than 0.002 validation precision@10). The best, 1,
    gained 0.0017 (0.0929 vs 0.0912; 0.25: +0.0016), under the bar. On MovieLens a user's
    ratings mostly fall in one session: for 671 of the 911 validated users the bucket's
    viewings are the whole history and for 5 the bucket is empty, so the steer changes only
    235 rankings; the data carries little time-of-day signal. Raise it with viewing histories
    that span times of day.
    """
    model_page_size: int = 1000
    """Item-factor rows per FetchModel page."""

    max_attempts: int = 14
    """sync(): attempts per call, including the first."""
    base_backoff_seconds: float = 0.25
    """sync(): backoff cap of the first retry; doubles per retry (full jitter below the cap)."""
    max_backoff_seconds: float = 2.0
    """sync(): upper bound of any single backoff."""
    retry_budget_seconds: float = 15.0
    """sync(): retries stop when the next one would start later than this after the first
    attempt. With the defaults a shard that stays down is retried for about 11 s on average
    (full jitter); the chance that the retries end within a 3 s replica restart is below
    1e-4 (2e-3 with 10 attempts), so a restart does not fail syncs."""
    timeout_seconds: float = 5.0
    """Deadline of one RPC attempt."""
    honour_sync_pace: bool = True
    """sync(): a call made before the time the shard's last answer asked for
    (``next_sync_after_ms``, kept as `BrainStats.next_sync_at_ms`) sends nothing and returns
    ``ok=False``, ``attempts=0``, ``paced=True``. The shard stretches the pause under load, so
    honouring it is how a fleet backs off together. False: every call is sent (replays that
    compress time, tests)."""
    max_sync_pause_seconds: float = 6 * 3600.0
    """sync(): a recorded pause still longer than this is taken for a clock that jumped
    backwards and ignored (the call is sent), so a skewed clock cannot silence a device."""
    max_global_payload_bytes: int = 4 << 20
    """Refuse global-pattern payloads that decompress to more than this (zstd bombs)."""
    catalog_page_size: int = 500
    """Items per FetchEmbeddings page."""

    utc_offset_minutes: int = 0
    """The device's offset from UTC, for the morning/afternoon/evening/night buckets."""

    max_events_kept: int = 20_000
    """Disk budget of the raw viewing history: the events table keeps the newest this many
    events; the observe that passes it deletes the oldest in its own transaction. What
    learning and ranking need from the history (the watched set and, per content id and
    context bucket, the view count, success count and best completion) lives in the compact
    ``history`` table, which compaction does not touch, so recommendations and the model
    update are the same before and after. About 60 bytes an event: 20,000 events (ten years
    at 5 viewings a day) is about 1.2 MB."""
    max_global_patterns: int = 4096
    """Budget of stored global patterns (384 float32 each, about 1.6 KB): past it, the
    patterns of the oldest federation rounds (then the lowest quality) are dropped, so rounds
    whose patterns the shard never replaces cannot accumulate. 4096 is about 6.5 MB."""
    max_trending_items: int = 2000
    """Budget of the stored trending list: only the this many highest-scored items of a
    received list are kept (recommend() uses the top ones)."""
    encryption_key: bytes | None = field(default=None, repr=False)
    """Encryption at rest of the personal data (AES-256-GCM): 32 bytes supplied by the
    host (e.g. from the TV's secure storage), or None for a plain store. Encrypted: the
    events' content ids, times and completions, the patterns' embeddings, counts and times,
    the compact history, the pending view counts and the unconfirmed sync request; the
    catalog, global patterns, trending and the model are public and stay plain. A store is
    created encrypted or plain and stays so: opening an encrypted store without its key (or
    with another key), or a plain store with a key, raises `StoreError`. Never shown in
    ``repr`` or stats."""

    def __post_init__(self) -> None:
        path = self.store_path
        if not isinstance(path, str | Path) or str(path) == "":
            raise ValueError("store_path must be a non-empty str or Path (or ':memory:')")
        _check_range("success_completion", self.success_completion, 0.0, 1.0)
        _check_range("failure_completion", self.failure_completion, 0.0, 1.0)
        if self.failure_completion > self.success_completion:
            raise ValueError("failure_completion must be <= success_completion")
        _check_range("min_step", self.min_step, 0.0, 1.0)
        _check_range("failure_step", self.failure_step, 0.0, 0.5, low_open=True)
        _check_int("hnsw_m", self.hnsw_m, 2, 256)
        _check_int("hnsw_ef_construction", self.hnsw_ef_construction, 1, 4096)
        _check_int("ef_search", self.ef_search, 1, 65536)
        _check_int("exact_search_max_items", self.exact_search_max_items, 0, 10_000_000)
        _check_int("candidate_multiplier", self.candidate_multiplier, 1, 1000)
        _check_range("local_weight", self.local_weight, 0.0, 1e6)
        _check_range("global_weight", self.global_weight, 0.0, 1e6)
        if self.local_weight == 0.0 and self.global_weight == 0.0:
            raise ValueError("local_weight and global_weight cannot both be 0")
        _check_int("global_top_n", self.global_top_n, 1, 1000)
        _check_range("trend_weight", self.trend_weight, 0.0, 1e6)
        _check_range("mmr_lambda", self.mmr_lambda, 0.0, 1.0)
        _check_range("model_trend_weight", self.model_trend_weight, 0.0, 1e6)
        _check_range("model_cold_weight", self.model_cold_weight, 0.0, 1e6)
        _check_range("model_context_weight", self.model_context_weight, 0.0, 1e6)
        _check_int("model_page_size", self.model_page_size, 1, 100_000)
        _check_int("max_attempts", self.max_attempts, 1, 100)
        _check_range("base_backoff_seconds", self.base_backoff_seconds, 0.0, 3600.0)
        _check_range("max_backoff_seconds", self.max_backoff_seconds, 0.0, 3600.0)
        _check_range("retry_budget_seconds", self.retry_budget_seconds, 0.0, 86400.0)
        _check_range("timeout_seconds", self.timeout_seconds, 0.0, 3600.0, low_open=True)
        if not isinstance(self.honour_sync_pace, bool):
            raise ValueError("honour_sync_pace must be a bool")
        _check_range("max_sync_pause_seconds", self.max_sync_pause_seconds, 0.0, 30 * 86400.0)
        _check_int("max_global_payload_bytes", self.max_global_payload_bytes, 1, 1 << 31)
        _check_int("catalog_page_size", self.catalog_page_size, 1, 100_000)
        _check_int(
            "utc_offset_minutes",
            self.utc_offset_minutes,
            -_MAX_UTC_OFFSET_MINUTES,
            _MAX_UTC_OFFSET_MINUTES,
        )
        _check_int("max_events_kept", self.max_events_kept, 1, 100_000_000)
        _check_int("max_global_patterns", self.max_global_patterns, 1, 1_000_000)
        _check_int("max_trending_items", self.max_trending_items, 1, 1_000_000)
        key = self.encryption_key
        if key is not None and (not isinstance(key, bytes) or len(key) != ENCRYPTION_KEY_BYTES):
            # Never put the value in the message: it may be a near-miss of the real key.
            raise ValueError(
                f"encryption_key must be None or {ENCRYPTION_KEY_BYTES} bytes"
                f" (got {type(key).__name__}"
                + (f" of length {len(key)})" if isinstance(key, bytes | str) else ")")
            )


def _check_range(name: str, value: object, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
