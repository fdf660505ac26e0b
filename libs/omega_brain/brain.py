"""The TV brain: learns viewing patterns on the device, recommends, and syncs with its shard.

A `Brain` is safe to call from several threads (calls are serialized by a lock; the network
part of `sync` runs outside it). Raw viewing history stays in the local store; only pattern
deltas, per-content view counts and, once per collaborative-model version, the model update
(preference weights over the items watched and one factor-sized direction, see
`omega_brain.model`) are sent.
"""

from __future__ import annotations

import base64
import json
import math
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from omega.v1 import patterns_pb2, sync_pb2
from omega_brain.catalog import CatalogIndex
from omega_brain.catalog_keeper import CatalogKeeper
from omega_brain.collaborative import InteractionWeights, score_items, steer_factor, user_factor
from omega_brain.config import BrainConfig
from omega_brain.errors import (
    BrainError,
    InvalidArgumentError,
    InvalidEventError,
    StoreError,
    SyncError,
    UnknownContentError,
)
from omega_brain.index_file import index_path
from omega_brain.model import (
    AlignedModel,
    Preferences,
    align_model,
    build_model_update,
    device_preferences,
)
from omega_brain.models import BrainStats, Recommendation, SyncResult, ViewingEvent
from omega_brain.patterns import Outcome, PatternState, apply_event, classify, normalize
from omega_brain.ranking import GlobalSet, blend_global, mmr, model_relevance, top_unexcluded
from omega_brain.store import GlobalPatternRow, PatternRow, Store
from omega_brain.transport import (
    FetchedModel,
    FetchProgress,
    RetryOutcome,
    SyncTransport,
    call_with_retries,
    download_model,
    fetch_catalog,
)
from omega_protocol import (
    EMBEDDING_DIM,
    ContextBucket,
    EmbeddingError,
    PayloadError,
    bucket_from_context,
    bucket_from_timestamp,
    decode_embedding,
    decode_payload,
    encode_embedding,
    encode_payload,
)

__all__ = ["Brain"]

REASON_TRENDING = "trending"
REASON_GLOBAL = "liked by similar viewers"
REASON_HISTORY = "matches your viewing history"
REASON_MODEL = "viewers with your taste watched this"
REASON_DISCOVER = "something new to try"

_REFUSED_BEFORE_WRITING = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.NOT_FOUND,
    }
)
"""Answers the shard gives before writing anything: the send needs no settling."""
_MAX_ADOPTED_VERSION = 1 << 53
"""Largest shard version a device will number past (a factory-reset store continuing
after its old self); far below the signed 64-bit range, so no answer can wedge it."""
_UINT32_MAX = 2**32 - 1
_LATENCY_WINDOW = 1024
_COMPRESS_MIN_BYTES = 64  # below this the zstd frame header costs more than it saves


@dataclass(frozen=True, slots=True)
class _Query:
    """The parts of one recommendation query (vectors are (384,) float32 unit)."""

    local: npt.NDArray[np.float32] | None
    local_weight: float
    local_reason: str
    glob: npt.NDArray[np.float32] | None
    global_weight: float


@dataclass(frozen=True, slots=True)
class _Trends:
    """Trending items of the current catalog: rows and scores normalized to (0, 1]."""

    positions: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float32]
    by_position: dict[int, float]
    dense: npt.NDArray[np.float32]
    """(n_catalog,) float32: the normalized score of every catalog row (0: not trending)."""


@dataclass(frozen=True, slots=True)
class _Sent:
    """What a sync request carried, for bookkeeping once it is acknowledged."""

    local_version: int
    patterns: list[tuple[str, int]]
    views: dict[str, int]
    model_update_version: int | None
    """The model version of the carried ItemFactorUpdate, None when there was none."""
    model_update_items: int = 0
    """How many items the carried ItemFactorUpdate covered."""


class Brain:
    """One TV's brain.

    Args:
        device_id: the device's stable id (non-empty, at most 256 characters).
        config: settings (defaults: `BrainConfig()`, an in-memory store).
        transport: how to reach the shard; without one `sync` and `fetch_catalog` raise
            `BrainError` and everything else works offline.
        catalog: a prebuilt, possibly shared, catalog index. Without one the brain uses the
            catalog persisted in its store, if any (see `load_catalog` / `fetch_catalog`),
            and its index persisted beside the store file (``<store>.faiss``, see
            `omega_brain.catalog_keeper`), so opening does not rebuild it.
        clock: wall clock in seconds since the epoch (default `time.time`); used for "now"
            in `recommend` and for pattern timestamps.

    Raises:
        InvalidArgumentError: a bad device id.
        StoreError: the store cannot be opened, or belongs to another device.
    """

    def __init__(
        self,
        device_id: str,
        config: BrainConfig | None = None,
        *,
        transport: SyncTransport | None = None,
        catalog: CatalogIndex | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(device_id, str) or not device_id or len(device_id) > 256:
            raise InvalidArgumentError("device_id must be a non-empty string of <= 256 chars")
        if config is not None and not isinstance(config, BrainConfig):
            raise InvalidArgumentError("config must be a BrainConfig")
        if catalog is not None and not isinstance(catalog, CatalogIndex):
            raise InvalidArgumentError("catalog must be a CatalogIndex")
        self._device_id = device_id
        self._config = config or BrainConfig()
        self._transport = transport
        self._clock = clock
        self._lock = threading.RLock()
        self._sync_lock = threading.Lock()
        self._rng = random.Random()
        self._latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)
        self._recommend_calls = 0
        self._closed = False
        self._owns_catalog = False
        self._global_by_bucket: dict[int, GlobalSet] = {}
        self._global_any: GlobalSet | None = None
        self._global_count = 0
        self._trending: list[tuple[str, float]] = []
        self._trend_cache: _Trends | None = None
        self._weights = InteractionWeights(
            success_completion=self._config.success_completion,
            failure_completion=self._config.failure_completion,
        )
        self._prefs_cache: Preferences | None = None
        self._context_prefs_cache: dict[int, Preferences] = {}
        self._aligned_cache: tuple[AlignedModel | None] | None = None
        self._store = Store(self._config.store_path, device_id)
        cfg = self._config
        self._keeper = CatalogKeeper(
            self._store,
            index_path(cfg.store_path),
            hnsw_m=cfg.hnsw_m,
            ef_search=cfg.ef_search,
            ef_construction=cfg.hnsw_ef_construction,
            exact_max_items=cfg.exact_search_max_items,
        )
        try:
            self._state = self._store.state()
            self._patterns = self._store.patterns()
            self._watched = self._store.watched()
            self._viewings: list[tuple[str, float]] = []
            self._viewings_by_bucket: dict[int, list[tuple[str, float]]] = {}
            for content_id, completion, bucket in self._store.viewings():
                self._viewings.append((content_id, completion))
                self._viewings_by_bucket.setdefault(bucket, []).append((content_id, completion))
            self._model = self._store.model()
            self._catalog = catalog
            if catalog is None:
                self._catalog = self._keeper.open()
                self._owns_catalog = self._catalog is not None
            self._reload_global()
        except BaseException:
            self._store.close()
            raise

    # ------------------------------------------------------------------ properties

    @property
    def device_id(self) -> str:
        """The device id given at construction."""
        return self._device_id

    @property
    def config(self) -> BrainConfig:
        """The settings in use."""
        return self._config

    @property
    def catalog(self) -> CatalogIndex | None:
        """The catalog index in use, or None before one is loaded."""
        return self._catalog

    # ------------------------------------------------------------------ catalog

    def load_catalog(
        self,
        content_ids: Sequence[str],
        embeddings: npt.ArrayLike,
        titles: Sequence[str] | None = None,
        genres: Sequence[Sequence[str]] | None = None,
    ) -> None:
        """Replace the catalog: persist it to the store and update this brain's own index.

        Embeddings are normalized and stored as the wire's int8 codes with a per-item scale;
        the index holds those codes decoded and renormalized, so a reopened brain (or a
        rebuilt index) searches exactly the same vectors. When a catalog is loaded already,
        only the changes are applied: new and changed items are added to the index, removed
        ones hidden (see `omega_brain.catalog_keeper`); the index file beside the store is
        rewritten atomically.

        Args:
            content_ids: n distinct non-empty ids.
            embeddings: (n, 384) float, finite, non-zero rows.
            titles: n titles, or None.
            genres: n genre lists, or None.

        Raises:
            CatalogError: bad shapes, values or ids (nothing is changed).
            StoreError: the store could not be written.
            BrainError: the brain is closed.
        """
        with self._lock:
            self._check_open()
            index = self._keeper.replace(content_ids, embeddings, titles, genres, catalog_version=0)
            self._state["catalog_version"] = 0
            self._set_catalog(index)

    def fetch_catalog(self) -> int:
        """Download catalog changes from the shard and apply them to this brain's own index.

        The first call downloads everything; later calls ask only for items changed since
        the last catalog version and apply them incrementally (new and changed items added
        to the index, the stored catalog rewritten only where it changed; see
        `omega_brain.catalog_keeper`).

        Returns:
            The number of items in the catalog afterwards.

        Raises:
            BrainError: no transport configured, or the brain is closed.
            SyncError: the download failed (after retries); nothing is changed.
            CatalogError: the server sent unusable items; nothing is changed.
            StoreError: the store could not be written.
        """
        transport = self._require_transport()
        cfg = self._config
        with self._sync_lock:
            with self._lock:
                self._check_open()
                since = self._state["catalog_version"]  # > 0 only after a stored fetch
            fetched = fetch_catalog(
                transport,
                page_size=cfg.catalog_page_size,
                since_catalog_version=since,
                timeout_seconds=cfg.timeout_seconds,
                **self._retry_policy(),
            )
            with self._lock:
                self._check_open()
                version = max(fetched.catalog_version, since)
                current = self._catalog
                if not fetched.content_ids and self._owns_catalog and current is not None:
                    self._store.set_state({"catalog_version": version})
                    self._state["catalog_version"] = version
                    return len(current)
                if not fetched.content_ids:
                    return len(current) if current is not None else 0
                # Since version 0 the answer is the whole catalog; later, only changes.
                apply = self._keeper.upsert if since else self._keeper.replace
                index = apply(
                    fetched.content_ids,
                    fetched.embeddings,
                    fetched.titles,
                    fetched.genres,
                    catalog_version=version,
                )
                self._state["catalog_version"] = version
                self._set_catalog(index)
                return len(index)

    # ------------------------------------------------------------------ learning

    def observe(self, event: ViewingEvent) -> None:
        """Learn from one viewing and record it (one store transaction).

        Updates the pattern of the event's context bucket (see `omega_brain.patterns`),
        bumps the local version, records the event and counts a view of the content.

        Args:
            event: the viewing.

        Raises:
            InvalidEventError: not a ViewingEvent, empty content id, completion not a finite
                number in [0, 1], started_at_ms not an int >= 0, watch_seconds negative or
                not finite.
            UnknownContentError: the content is not in the catalog (or there is no catalog).
            StoreError: the store could not be written (nothing is changed).
            BrainError: the brain is closed.
        """
        content_id, started_at_ms, completion, watch_seconds = _validate_event(event)
        cfg = self._config
        with self._lock:
            self._check_open()
            if self._catalog is None:
                raise UnknownContentError(f"no catalog loaded; cannot observe {content_id!r}")
            content = self._catalog.embedding_of(content_id)
            bucket = bucket_from_timestamp(started_at_ms, cfg.utc_offset_minutes).index
            outcome = classify(completion, cfg.success_completion, cfg.failure_completion)
            version = self._state["local_version"] + 1
            now_ms = self._now_ms()
            old = self._patterns.get(bucket)
            old_state = old.state if old is not None else PatternState()
            state = apply_event(
                old_state,
                content,
                outcome,
                min_step=cfg.min_step,
                failure_step=cfg.failure_step,
            )
            moved = outcome is Outcome.SUCCESS or (
                outcome is Outcome.FAILURE and old_state.embedding is not None
            )
            row = PatternRow(
                bucket=bucket,
                pattern_id=old.pattern_id if old is not None else uuid.uuid4().hex,
                state=state,
                created_at_ms=old.created_at_ms if old is not None else now_ms,
                updated_at_ms=now_ms,
                changed_version=version,
                embedding_version=version if moved else (old.embedding_version if old else 0),
            )
            with self._store.transaction():
                self._store.insert_event(
                    content_id,
                    started_at_ms,
                    completion,
                    watch_seconds,
                    bucket,
                    int(outcome),
                    version,
                )
                self._store.upsert_pattern(row)
                self._store.add_view(content_id)
                self._store.set_state({"local_version": version})
            self._patterns[bucket] = row
            self._state["local_version"] = version
            self._watched.add(content_id)
            self._viewings.append((content_id, completion))
            self._viewings_by_bucket.setdefault(bucket, []).append((content_id, completion))
            self._prefs_cache = None
            self._context_prefs_cache.pop(bucket, None)

    # ------------------------------------------------------------------ recommending

    def recommend(
        self,
        k: int = 10,
        *,
        timestamp_ms: int | None = None,
        use_global: bool = True,
        exclude_watched: bool = True,
    ) -> list[Recommendation]:
        """Recommend up to ``k`` items for a moment in time.

        The query is the local pattern of the moment's context bucket (else the
        sample-weighted mean of all local patterns), weighted by ``local_weight x its success
        rate``, blended with the nearest good global patterns of the bucket, weighted by
        ``global_weight x their success rate``. Candidates are the query's nearest catalog
        items (``k x candidate_multiplier`` + the watched count) plus the top trending items;
        each scores ``cos(item, query) + trend_weight x trend`` (trend: trending score / the
        highest one, 0 when not trending), watched items are dropped, and MMR picks the final
        order. Cold start: global patterns and trends; with neither local nor global patterns,
        trending items alone; with nothing at all, an empty list.

        With the collaborative model (a fetched item-factor model ``V`` and a non-zero user
        factor ``x = V_S^T p`` from all the device's viewings; ``use_global`` True), every
        catalog item is scored instead. The moment's context bucket steers the factor: with
        ``model_context_weight`` (beta) > 0 and viewings in that bucket the model knows, ``x``
        becomes ``x / |x| + beta x_c / |x_c|``, ``x_c`` folded in from that bucket's viewings
        only (what the viewer watches at this time of day; an item the steer raises gets the
        reason "matches your <bucket> viewing"). Scores: ``V x`` divided by its largest
        absolute value, items the model does not know scored by content similarity to the
        query above (only the ``k x candidate_multiplier`` nearest, scaled to at most
        ``model_cold_weight``), plus ``model_trend_weight x trend`` (see
        `omega_brain.ranking.model_relevance`); watched items are dropped, MMR re-ranks the
        ``k x candidate_multiplier`` best. Always ``k`` items when the catalog has ``k``
        unwatched ones.

        Args:
            k: number of items wanted, >= 0.
            timestamp_ms: the moment (ms since epoch, UTC); default now.
            use_global: False ignores global patterns, trends and the collaborative model
                (local learning only).
            exclude_watched: drop content the device has observed.

        Returns:
            At most ``k`` recommendations (fewer when the catalog runs out).

        Raises:
            InvalidArgumentError: k or timestamp_ms is not an int >= 0.
            BrainError: the brain is closed.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
            raise InvalidArgumentError(f"k must be an int >= 0, got {k!r}")
        if timestamp_ms is not None and (
            isinstance(timestamp_ms, bool)
            or not isinstance(timestamp_ms, int | np.integer)
            or timestamp_ms < 0
        ):
            raise InvalidArgumentError(f"timestamp_ms must be an int >= 0, got {timestamp_ms!r}")
        start = time.perf_counter()
        with self._lock:
            self._check_open()
            if k == 0:
                return []
            ts = int(timestamp_ms) if timestamp_ms is not None else self._now_ms()
            bucket = bucket_from_timestamp(ts, self._config.utc_offset_minutes)
            result = self._recommend(int(k), bucket, use_global, exclude_watched)
            self._recommend_calls += 1
            self._latencies.append(time.perf_counter() - start)
            return result

    def _recommend(
        self, k: int, bucket: ContextBucket, use_global: bool, exclude_watched: bool
    ) -> list[Recommendation]:
        cfg = self._config
        watched: set[str] = self._watched if exclude_watched else set()
        catalog = self._catalog
        trends = self._trends() if use_global else None
        if catalog is None or len(catalog) == 0:
            return self._trending_without_catalog(k, watched) if use_global else []
        query = self._query(bucket, use_global)
        if use_global:
            with_model = self._recommend_with_model(k, catalog, query, trends, watched, bucket)
            if with_model is not None:
                return with_model
        if query is None:
            if trends is None or trends.positions.size == 0:
                return []
            return self._trending_only(catalog, trends, k, watched)
        q = _query_vector(query)
        pool = self._candidates(catalog, q, k, watched)
        if trends is not None:
            extra = [
                int(p)
                for p in trends.positions[: k * cfg.candidate_multiplier]
                if int(p) not in pool and catalog.content_id_at(int(p)) not in watched
            ]
            pool.update(dict.fromkeys(extra))
        if not pool:
            return []
        positions = np.fromiter(pool, dtype=np.int64, count=len(pool))
        vectors = catalog.vectors(positions)
        trend = np.zeros(len(positions), dtype=np.float32)
        if trends is not None:
            trend = np.array(
                [trends.by_position.get(int(p), 0.0) for p in positions], dtype=np.float32
            )
        relevance = vectors @ q + np.float32(cfg.trend_weight) * trend
        order = mmr(vectors, relevance, k, cfg.mmr_lambda)
        total = query.local_weight + query.global_weight
        out: list[Recommendation] = []
        for i in order:
            contributions: list[tuple[float, str]] = []
            if query.local is not None:
                share = query.local_weight / total
                contributions.append((share * float(vectors[i] @ query.local), query.local_reason))
            if query.glob is not None:
                share = query.global_weight / total
                contributions.append((share * float(vectors[i] @ query.glob), REASON_GLOBAL))
            if trend[i] > 0:
                contributions.append((cfg.trend_weight * float(trend[i]), REASON_TRENDING))
            reasons = tuple(r for c, r in sorted(contributions, key=lambda t: -t[0]) if c > 0)
            if not reasons:
                reasons = (query.local_reason if query.local is not None else REASON_GLOBAL,)
            cid = catalog.content_id_at(int(positions[i]))
            out.append(Recommendation(cid, float(relevance[i]), reasons))
        return out

    def _recommend_with_model(
        self,
        k: int,
        catalog: CatalogIndex,
        query: _Query | None,
        trends: _Trends | None,
        watched: set[str],
        bucket: ContextBucket,
    ) -> list[Recommendation] | None:
        """Whole-catalog ranking with the collaborative model; None without a model or with
        a zero user factor (the caller then ranks as without a model).

        With ``model_context_weight > 0`` the user factor is steered towards the factor of
        the viewings of ``bucket`` (`steer_factor`), and an item whose score that steer raises
        gets the bucket's reason.
        """
        cfg = self._config
        model = self._aligned_model()
        prefs = self._preferences()
        if model is None or prefs is None or prefs.items.size == 0:
            return None
        x = user_factor(model.matrix, prefs.items, prefs.p)
        if not np.any(x):
            return None
        steer: npt.NDArray[np.float32] | None = None  # the context's part of the factor
        if cfg.model_context_weight > 0.0:
            context = self._context_preferences(bucket.index)
            if context is not None and context.items.size:
                x_context = user_factor(model.matrix, context.items, context.p)
                steered = steer_factor(x, x_context, cfg.model_context_weight)
                if steered is not x:
                    scale = cfg.model_context_weight / float(np.linalg.norm(x_context))
                    steer = (np.float32(scale) * x_context).astype(np.float32)
                    x = steered
        cold_positions: npt.NDArray[np.int64] | None = None
        cold_similarity: npt.NDArray[np.float32] | None = None
        if query is not None and cfg.model_cold_weight > 0.0:
            q = _query_vector(query)
            pool = self._candidates(catalog, q, k, watched)
            cold_positions = np.fromiter(pool, dtype=np.int64, count=len(pool))
            cold_similarity = catalog.vectors(cold_positions) @ q
        scored = model_relevance(
            score_items(model.matrix, x),
            model.known,
            trend=trends.dense if trends is not None else None,
            trend_weight=cfg.model_trend_weight,
            cold_positions=cold_positions,
            cold_similarity=cold_similarity,
            cold_weight=cfg.model_cold_weight,
        )
        excluded = np.zeros(len(catalog), dtype=bool)
        if watched:
            excluded[[catalog.position_of(c) for c in watched if c in catalog]] = True
        positions = top_unexcluded(scored.total, excluded, max(k * cfg.candidate_multiplier, k))
        if positions.size == 0:
            return []
        vectors = catalog.vectors(positions)
        order = mmr(vectors, scored.total[positions], k, cfg.mmr_lambda)
        content_reason = REASON_GLOBAL
        if query is not None and query.local is not None:
            content_reason = query.local_reason
        context_reason = _bucket_reason(bucket)
        out: list[Recommendation] = []
        for i in order:
            p = int(positions[i])
            context_part = 0.0
            if steer is not None and model.known[p]:
                context_part = float(model.matrix[p] @ steer) / scored.scale
            parts = (
                (float(scored.model[p]) - context_part, REASON_MODEL),
                (context_part, context_reason),
                (float(scored.content[p]), content_reason),
                (float(scored.trend[p]), REASON_TRENDING),
            )
            reasons = tuple(
                dict.fromkeys(r for c, r in sorted(parts, key=lambda t: -t[0]) if c > 0)
            )
            out.append(
                Recommendation(
                    catalog.content_id_at(p), float(scored.total[p]), reasons or (REASON_DISCOVER,)
                )
            )
        return out

    def _query(self, bucket: ContextBucket, use_global: bool) -> _Query | None:
        cfg = self._config
        local: npt.NDArray[np.float32] | None = None
        local_rate = 0.0
        reason = REASON_HISTORY
        row = self._patterns.get(bucket.index)
        if row is not None and row.state.embedding is not None:
            local, local_rate = row.state.embedding, row.state.success_rate
            reason = _bucket_reason(bucket)
        else:
            learned = [r.state for r in self._patterns.values() if r.state.embedding is not None]
            if learned:
                w = np.array([s.sample_count for s in learned], dtype=np.float32)
                stacked = np.stack([s.embedding for s in learned if s.embedding is not None])
                mean = normalize((w[:, None] * stacked).sum(axis=0))
                if np.any(mean):
                    local = mean
                    local_rate = float(
                        (w * np.array([s.success_rate for s in learned])).sum() / w.sum()
                    )
        glob: npt.NDArray[np.float32] | None = None
        global_rate = 0.0
        if use_global:
            candidates = self._global_by_bucket.get(bucket.index) or self._global_any
            if candidates is not None:
                blended = blend_global(candidates, local, cfg.global_top_n)
                if blended is not None:
                    glob, global_rate = blended
        local_weight = cfg.local_weight * local_rate if local is not None else 0.0
        global_weight = cfg.global_weight * global_rate if glob is not None else 0.0
        if local_weight <= 0 and global_weight <= 0:
            # A zero weight (e.g. local_weight=0 config) must not hide a pattern we do have.
            if local is None and glob is None:
                return None
            local_weight = 1.0 if local is not None else 0.0
            global_weight = 1.0 if glob is not None else 0.0
        return _Query(
            local if local_weight > 0 else None,
            local_weight,
            reason,
            glob if global_weight > 0 else None,
            global_weight,
        )

    def _candidates(
        self, catalog: CatalogIndex, q: npt.NDArray[np.float32], k: int, watched: set[str]
    ) -> dict[int, None]:
        """The ``k x candidate_multiplier`` nearest unwatched rows to ``q``, best first.

        Searches ``k x candidate_multiplier + len(watched)`` neighbours (enough even if every
        watched item is among them); if HNSW still comes back short of k, searches wider.
        Returns an insertion-ordered set (dict keys).
        """
        wanted = k * self._config.candidate_multiplier
        n = min(len(catalog), wanted + len(watched))
        while True:
            positions, _ = catalog.search_positions(q, n)
            pool: dict[int, None] = {}
            for p in positions[0]:
                if p >= 0 and catalog.content_id_at(int(p)) not in watched:
                    pool[int(p)] = None
                    if len(pool) == wanted:
                        return pool
            if len(pool) >= k or n >= len(catalog):
                return pool
            n = min(len(catalog), n * 4)

    def _trending_only(
        self, catalog: CatalogIndex, trends: _Trends, k: int, watched: set[str]
    ) -> list[Recommendation]:
        keep = [
            i
            for i, p in enumerate(trends.positions)
            if catalog.content_id_at(int(p)) not in watched
        ][: max(k * self._config.candidate_multiplier, k)]
        if not keep:
            return []
        positions = trends.positions[keep]
        relevance = trends.scores[keep]
        order = mmr(catalog.vectors(positions), relevance, k, self._config.mmr_lambda)
        return [
            Recommendation(
                catalog.content_id_at(int(positions[i])), float(relevance[i]), (REASON_TRENDING,)
            )
            for i in order
        ]

    def _trending_without_catalog(self, k: int, watched: set[str]) -> list[Recommendation]:
        items = [(c, s) for c, s in self._trending if c not in watched and s > 0][:k]
        if not items:
            return []
        peak = self._trending[0][1]  # sorted by score, highest first
        return [Recommendation(c, s / peak, (REASON_TRENDING,)) for c, s in items]

    # ------------------------------------------------------------------ syncing

    def sync(self) -> SyncResult:
        """Push the pattern delta, pull global patterns and trends; retries retryable errors.

        The delta holds every pattern changed since the last acknowledged version:
        never-acknowledged patterns and patterns whose embedding moved in ``added`` (full
        `ViewingPattern`, int8 embedding, upserted by the server), acknowledged ones whose
        statistics alone changed in ``updated`` (success rate, samples since the
        acknowledgement), and the pending per-content view counts. Retries use full
        jitter exponential backoff, only for retryable errors (UNAVAILABLE,
        DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED).

        When the server acknowledges the sent local version (or a later one), the sent
        patterns are marked acknowledged, the sent views cleared and ``acked_version`` set to
        the sent version; if the server reports a version above the device's (a restored or
        reset device), the local version jumps past it so later deltas are not taken for
        duplicates. An acknowledgement below the sent version means the delta was not
        applied: nothing advances, and if it is even below the previous acknowledgement (the
        server lost the device's state) every pattern is re-sent in full next time. Global
        patterns replace stored ones of the same key and round; a non-empty trending list
        replaces the stored one. On any failure nothing advances and the same delta (plus
        newer changes) is sent next time.

        Global patterns arrive in parts when they exceed the shard's answer budget (5 KB by
        default): a part is stored at once, and the global version is adopted with the last
        part (``next_global_page_offset`` 0); the next syncs ask for the rest.

        Pace: every answer may ask for a pause before the next sync (``next_sync_after_ms``,
        kept as ``next_sync_at_ms``); with `BrainConfig.honour_sync_pace` a call made earlier
        sends nothing and returns ``paced=True`` (``ok`` False, ``attempts`` 0, nothing
        counted as failed). Firmware schedules its next call at ``next_sync_at_ms``.

        A reply with ``redirect_shard_id`` is not applied: the result has ``ok=False`` and
        ``redirect_shard_id`` set, and the caller re-routes (e.g. a new transport).

        Collaborative model: once per model version (0 included: a device without a model
        still sends its weights once, for the fleet's per-item counts) the delta carries the
        device's ``ItemFactorUpdate`` built from all its viewings (`build_model_update`); it
        counts as sent only when the delta is acknowledged. When a successful reply names a
        model version above the device's, the rows changed since are fetched (FetchModel,
        paged, same retries) and applied in one transaction; a failed fetch leaves the sync
        successful (``model_error`` says why) and is tried again at the next sync. Model bytes
        are counted in ``model_bytes_down``, not ``bytes_down``.

        Returns:
            What happened; network and server failures give ``ok=False`` and ``error``.

        Raises:
            BrainError: no transport is configured, or the brain is closed.
            StoreError: the store could not be written.
        """
        transport = self._require_transport()
        cfg = self._config
        with self._sync_lock:
            paced = self._paced_result()
            if paced is not None:
                return paced
            if not self._state["server_version_known"] and self._state["local_version"] > 0:
                failed = self._learn_server_version(transport)
                if failed is not None:
                    return failed
            failed = self._settle_unconfirmed(transport)
            if failed is not None:
                return failed
            with self._lock:
                self._check_open()
                request, sent = self._build_request()
            patterns_sent = len(sent.patterns)
            outcome = RetryOutcome()
            try:
                response = call_with_retries(
                    lambda: transport.sync_patterns(request, cfg.timeout_seconds),
                    **self._retry_policy(),
                    outcome=outcome,
                )
            except SyncError as exc:
                code = f" [{exc.code.name}]" if exc.code is not None else ""
                message = f"{exc}{code} after {outcome.attempts} attempt(s)"
                if exc.code not in _REFUSED_BEFORE_WRITING and sent.local_version > 0:
                    self._record_unconfirmed(request, sent)
                return self._sync_failed(request, sent, outcome, patterns_sent, message, 0, None)
            if not isinstance(response, sync_pb2.SyncPatternsResponse):
                return self._sync_failed(
                    request,
                    sent,
                    outcome,
                    patterns_sent,
                    "transport returned a non-response",
                    0,
                    None,
                )
            bytes_down = response.ByteSize()
            if response.redirect_shard_id:
                message = f"device belongs to shard {response.redirect_shard_id!r}"
                return self._sync_failed(
                    request,
                    sent,
                    outcome,
                    patterns_sent,
                    message,
                    bytes_down,
                    response.redirect_shard_id,
                )
            with self._lock:
                self._check_open()
                received, error = self._apply_response(sent, response)
                since_model = self._state["model_version"]
            fetched_rows, model_bytes, model_error = 0, 0, None
            if error is None and int(response.model_version) > since_model:
                fetched_rows, model_bytes, model_error = self._update_model(transport, since_model)
            with self._lock:
                self._check_open()
                return SyncResult(
                    ok=error is None,
                    attempts=outcome.attempts,
                    bytes_up=request.ByteSize(),
                    bytes_down=bytes_down,
                    latency_seconds=outcome.last_latency_seconds,
                    acknowledged_version=self._state["acked_version"],
                    global_version=self._state["global_version"],
                    patterns_sent=patterns_sent,
                    global_patterns_received=received,
                    error=error,
                    server_pattern_count=response.patterns_stored,
                    model_version=self._state["model_version"],
                    model_update_sent=sent.model_update_version is not None,
                    model_rows_received=fetched_rows,
                    model_bytes_down=model_bytes,
                    model_error=model_error,
                    next_sync_at_ms=self._state["next_sync_at_ms"],
                )

    def _paced_result(self) -> SyncResult | None:
        """The result of a call made before the shard's requested time, else None."""
        with self._lock:
            self._check_open()
            due = int(self._state["next_sync_at_ms"])
            if not self._config.honour_sync_pace or due <= 0:
                return None
            wait_ms = due - self._now_ms()
            if wait_ms <= 0 or wait_ms > self._config.max_sync_pause_seconds * 1000.0:
                return None  # due, or a clock that went backwards: sync now
            return SyncResult(
                ok=False,
                attempts=0,
                bytes_up=0,
                bytes_down=0,
                latency_seconds=0.0,
                acknowledged_version=self._state["acked_version"],
                global_version=self._state["global_version"],
                patterns_sent=0,
                global_patterns_received=0,
                error=f"paced: the shard asked for the next sync in {wait_ms} ms",
                model_version=self._state["model_version"],
                paced=True,
                next_sync_at_ms=due,
            )

    def forget(self) -> bool:
        """Right to be forgotten: erase this device's data on its shard, then on the device.

        The shard deletes the device's row, patterns and model update in one transaction
        (``ForgetDevice``, retried like a sync); then the local store drops events, patterns,
        pending views and sync state in one transaction, keeping what came from the servers
        (catalog, global patterns, trending, the model). Aggregates the federation already
        published cannot be recalled. Without a transport only the local data is erased.

        Returns:
            True when the shard held data for the device (False: nothing there, or offline).

        Raises:
            SyncError: the shard could not be reached or refused (nothing local is erased,
                so the call can be repeated).
            BrainError: the brain is closed; StoreError: the store could not be written.
        """
        forgotten = False
        with self._sync_lock:
            if self._transport is not None:
                transport = self._transport
                forget = getattr(transport, "forget_device", None)
                if forget is None:
                    raise SyncError("the transport cannot forget devices (no forget_device)")
                request = sync_pb2.ForgetDeviceRequest(device_id=self._device_id)
                response = call_with_retries(
                    lambda: forget(request, self._config.timeout_seconds),
                    **self._retry_policy(),
                    outcome=RetryOutcome(),
                )
                forgotten = bool(getattr(response, "forgotten", False))
            with self._lock:
                self._check_open()
                with self._store.transaction():
                    self._store.forget_personal_data()
                self._state = self._store.state()
                self._patterns = {}
                self._watched = set()
                self._viewings = []
                self._viewings_by_bucket = {}
                self._prefs_cache = None
                self._context_prefs_cache = {}
        return forgotten

    def _record_unconfirmed(self, request: sync_pb2.SyncPatternsRequest, sent: _Sent) -> None:
        """Keep a send whose outcome is unknown (the shard may have applied it, its answer
        lost), so that the next sync settles it before numbering newer changes: views and
        added samples are increments, and sending them again in a newer delta would count
        them twice."""
        record = {
            "request": base64.b64encode(request.SerializeToString()).decode("ascii"),
            "local_version": sent.local_version,
            "patterns": sent.patterns,
            "views": sent.views,
            "model_update_version": sent.model_update_version,
            "model_update_items": sent.model_update_items,
        }
        with self._lock:
            if not self._closed:
                self._store.set_unconfirmed_send(json.dumps(record))

    def _settle_unconfirmed(self, transport: SyncTransport) -> SyncResult | None:
        """Send the recorded unconfirmed request again, unchanged (the shard applies a
        ``(device, version)`` once), and book its answer as its own (called in `sync`).

        Returns:
            None when there was nothing to settle or it is settled; a failed `SyncResult`
            when the shard cannot be reached (the record is kept for the next sync).
        """
        with self._lock:
            self._check_open()
            text = self._store.unconfirmed_send()
        if text is None:
            return None
        try:
            record = json.loads(text)
            request = sync_pb2.SyncPatternsRequest.FromString(base64.b64decode(record["request"]))
            sent = _Sent(
                int(record["local_version"]),
                [(str(p), int(n)) for p, n in record["patterns"]],
                {str(c): int(v) for c, v in record["views"].items()},
                None
                if record["model_update_version"] is None
                else int(record["model_update_version"]),
                int(record["model_update_items"]),
            )
        except (ValueError, KeyError, TypeError, DecodeError):
            sent = None  # unreadable: drop it (its changes are re-sent as not acknowledged)
        if sent is None or sent.local_version <= self._state["acked_version"]:
            with self._lock:
                self._store.set_unconfirmed_send(None)
            return None
        outcome = RetryOutcome()
        try:
            response = call_with_retries(
                lambda: transport.sync_patterns(request, self._config.timeout_seconds),
                **self._retry_policy(),
                outcome=outcome,
            )
        except SyncError as exc:
            if exc.code in _REFUSED_BEFORE_WRITING:
                with self._lock:
                    self._store.set_unconfirmed_send(None)
                return None
            code = f" [{exc.code.name}]" if exc.code is not None else ""
            message = f"settling the unconfirmed send: {exc}{code}"
            return self._sync_failed(request, sent, outcome, len(sent.patterns), message, 0, None)
        with self._lock:
            self._check_open()
            if isinstance(response, sync_pb2.SyncPatternsResponse) and (
                not response.redirect_shard_id
            ):
                self._apply_response(sent, response)
            self._store.set_unconfirmed_send(None)
        return None

    def _learn_server_version(self, transport: SyncTransport) -> SyncResult | None:
        """Before this store's first delta, ask the shard for the device's last version.

        A pull (version 0, empty delta) writes nothing; its answer acknowledges the last
        version the shard applied for this device id. A new store of a device the shard
        knows (factory reset) numbers its changes past it, so they are applied rather than
        taken for duplicates, and the patterns it learns replace the old ones. Called in
        `sync` under the sync lock.

        Returns:
            None when learned (or nothing to learn); a failed `SyncResult` otherwise.
        """
        cfg = self._config
        request = sync_pb2.SyncPatternsRequest(
            device_id=self._device_id,
            local_version=0,
            since_global_version=self._state["global_version"],
            delta=encode_payload(patterns_pb2.PatternDelta(), compress=False),
        )
        outcome = RetryOutcome()
        try:
            response = call_with_retries(
                lambda: transport.sync_patterns(request, cfg.timeout_seconds),
                **self._retry_policy(),
                outcome=outcome,
            )
        except SyncError as exc:
            code = f" [{exc.code.name}]" if exc.code is not None else ""
            message = f"{exc}{code} after {outcome.attempts} attempt(s)"
            empty = _Sent(0, [], {}, None, 0)
            return self._sync_failed(request, empty, outcome, 0, message, 0, None)
        if not isinstance(response, sync_pb2.SyncPatternsResponse) or response.redirect_shard_id:
            return None  # the real sync reports the redirect (or the bad transport)
        last = int(response.acknowledged_version)
        with self._lock:
            self._check_open()
            updates = {"server_version_known": 1}
            if self._state["acked_version"] < last <= _MAX_ADOPTED_VERSION:
                # The shard applied versions this store never saw acknowledged: re-send
                # everything, numbered past them.
                updates["local_version"] = max(self._state["local_version"], last) + 1
                updates["acked_version"] = 0
                updates["model_update_version"] = -1
                updates["model_update_items"] = 0
            with self._store.transaction():
                if "acked_version" in updates:
                    self._store.clear_acked()
                self._store.set_state(updates)
            self._state.update(updates)
        return None

    def _update_model(self, transport: SyncTransport, since: int) -> tuple[int, int, str | None]:
        """Fetch and apply the model rows changed since ``since`` (called in `sync`, without
        the brain lock); returns (rows applied, bytes received, error or None).

        A fetch answering another factor count than the stored model's cannot be applied as
        a change: the whole model is fetched again and replaces it.
        """
        cfg = self._config
        progress = FetchProgress()

        def fetch(since_version: int) -> FetchedModel:
            return download_model(
                transport,
                since_model_version=since_version,
                page_size=cfg.model_page_size,
                timeout_seconds=cfg.timeout_seconds,
                **self._retry_policy(),
                progress=progress,
            )

        rows = 0
        error: str | None = None
        try:
            fetched = fetch(since)
            if since > 0 and fetched.factors not in (0, self._state["model_factors"]):
                fetched = fetch(0)
            with self._lock:
                self._check_open()
                rows = self._apply_model(fetched)
        except SyncError as exc:  # also a transport without fetch_model (wrapped as one)
            code = f" [{exc.code.name}]" if exc.code is not None else ""
            error = f"model not updated: {exc}{code}"
        except StoreError as exc:  # rolled back; the sync's own writes are already committed
            error = f"model not updated: {exc}"
        with self._lock:
            if not self._closed and progress.bytes_down:
                total = self._state["model_bytes_down"] + progress.bytes_down
                self._store.set_state({"model_bytes_down": total})
                self._state["model_bytes_down"] = total
        return rows, progress.bytes_down, error

    def _apply_model(self, fetched: FetchedModel) -> int:
        """Store fetched rows in one transaction and refresh the in-memory model.

        Returns:
            The number of rows applied (0 when the fetch is not newer than the stored model).
        """
        if fetched.model_version <= self._state["model_version"]:
            return 0  # the server's model is not newer (e.g. a lagging replica)
        updates = {"model_version": fetched.model_version}
        if fetched.factors:
            updates["model_factors"] = fetched.factors
        with self._store.transaction():
            self._store.apply_model_rows(
                fetched.rows,
                replace=fetched.since_model_version == 0,
                factors=fetched.factors or self._state["model_factors"],
            )
            self._store.set_state(updates)
        self._state.update(updates)
        self._model = self._store.model()
        self._aligned_cache = None
        return len(fetched.rows)

    def _build_request(self) -> tuple[sync_pb2.SyncPatternsRequest, _Sent]:
        acked_version = self._state["acked_version"]
        model_update = self._model_update()
        if model_update is not None and self._state["local_version"] <= acked_version:
            # The shard skips a delta whose local version it has applied (a retry), so a
            # model update with no new viewing needs a version of its own.
            self._store.set_state({"local_version": acked_version + 1})
            self._state["local_version"] = acked_version + 1
        local_version = self._state["local_version"]
        acked = self._store.acked()
        delta = patterns_pb2.PatternDelta(local_version=local_version, base_version=acked_version)
        if model_update is not None:
            delta.model_update.CopyFrom(model_update)
        sent_patterns: list[tuple[str, int]] = []
        for bucket in sorted(self._patterns):
            row = self._patterns[bucket]
            st = row.state
            if st.embedding is None:
                continue
            known = acked.get(row.pattern_id)
            if known is not None and row.changed_version <= acked_version:
                continue
            if known is None or row.embedding_version > acked_version:
                # New, or its embedding moved: the full pattern, which the server upserts. The
                # server may not hold it at all (it drops patterns below its quality
                # threshold), so an update of the embedding alone could be lost.
                delta.added.append(
                    patterns_pb2.ViewingPattern(
                        pattern_id=row.pattern_id,
                        embedding=encode_embedding(st.embedding),
                        success_rate=st.success_rate,
                        sample_count=min(st.sample_count, _UINT32_MAX),
                        context=ContextBucket.from_index(bucket).to_proto(),
                        created_at_ms=row.created_at_ms,
                        updated_at_ms=row.updated_at_ms,
                    )
                )
            else:
                delta.updated.append(
                    patterns_pb2.PatternUpdate(
                        pattern_id=row.pattern_id,
                        success_rate=st.success_rate,
                        additional_samples=min(max(st.sample_count - known, 0), _UINT32_MAX),
                        updated_at_ms=row.updated_at_ms,
                    )
                )
            sent_patterns.append((row.pattern_id, st.sample_count))
        views = {c: min(v, _UINT32_MAX) for c, v in sorted(self._store.pending_views().items())}
        for content_id, count in views.items():
            delta.content_views.add(content_id=content_id, views=count)
        payload = encode_payload(delta, compress=delta.ByteSize() >= _COMPRESS_MIN_BYTES)
        request = sync_pb2.SyncPatternsRequest(
            device_id=self._device_id,
            local_version=local_version,
            since_global_version=self._state["global_version"],
            delta=payload,
            global_page_version=self._state["global_page_version"],
            global_page_offset=self._state["global_page_offset"],
        )
        sent_model = self._state["model_version"] if model_update is not None else None
        sent_items = len(model_update.content_ids) if model_update is not None else 0
        return request, _Sent(local_version, sent_patterns, views, sent_model, sent_items)

    def _model_update(self) -> patterns_pb2.ItemFactorUpdate | None:
        """The device's ItemFactorUpdate, when it has one to send.

        Once per model version (-1: never sent; 0, no model yet, counts as a version), and
        again at the same version each time the device's history has doubled since the last
        acknowledged contribution (the shard keeps the latest, so the next round sees the
        device's whole history at the cost of about twice the bytes of one contribution).
        """
        version = self._state["model_version"]
        prefs = self._preferences()
        if prefs is None or self._catalog is None:
            return None
        sent_items = self._state["model_update_items"]
        if self._state["model_update_version"] >= version and prefs.items.size < 2 * max(
            1, sent_items
        ):
            return None
        return build_model_update(prefs, self._catalog, self._aligned_model(), version)

    def _apply_response(
        self, sent: _Sent, response: sync_pb2.SyncPatternsResponse
    ) -> tuple[int, str | None]:
        """Apply an acknowledged reply in one transaction; returns (patterns stored, error)."""
        errors: list[str] = []
        rows: list[GlobalPatternRow] = []
        trending: list[tuple[str, float]] = []
        payload_round = 0
        payload_ok = True
        if response.HasField("global_patterns") and response.global_patterns.ByteSize() > 0:
            try:
                decoded = decode_payload(
                    response.global_patterns,
                    patterns_pb2.GlobalPatterns,
                    max_raw_bytes=self._config.max_global_payload_bytes,
                )
                rows, trending = _global_rows(decoded)
                payload_round = int(decoded.global_version)
            except PayloadError as exc:
                payload_ok = False
                errors.append(f"global patterns refused: {exc}")
        ack = int(response.acknowledged_version)
        updates: dict[str, int] = {}
        with self._store.transaction():
            if sent.local_version == 0:
                # A pull (nothing to send yet): the answer names the device's last version
                # on the shard; later changes are numbered past it (see
                # `_learn_server_version`).
                updates["server_version_known"] = 1
                if self._state["acked_version"] < ack <= _MAX_ADOPTED_VERSION:
                    self._store.clear_acked()
                    updates["local_version"] = max(self._state["local_version"], ack)
                    updates["acked_version"] = 0
            elif ack > sent.local_version:
                # The shard holds a later version than the one sent, so it did not apply this
                # delta (it answered as for a duplicate): this store is newer than the
                # device's server state (a factory reset, a restored backup). Nothing is
                # marked acknowledged; the next delta, numbered past the shard's version,
                # re-sends everything. The acknowledged version is never taken from the
                # server, and an implausible one (past `_MAX_ADOPTED_VERSION`) is not
                # followed at all, so a bad answer cannot wedge the device.
                if ack > _MAX_ADOPTED_VERSION:
                    errors.append(f"server acknowledged an implausible version {ack}; ignored")
                else:
                    errors.append(
                        f"server holds version {ack}, above the sent {sent.local_version};"
                        " the device's changes are re-sent past it"
                    )
                    self._store.clear_acked()
                    updates["local_version"] = ack + 1
                    updates["acked_version"] = 0
                    updates["model_update_version"] = -1
                    updates["model_update_items"] = 0
            elif ack == sent.local_version:
                self._store.mark_acked(sent.patterns, sent.local_version)
                self._store.subtract_views(sent.views)
                updates["acked_version"] = sent.local_version
                if sent.model_update_version is not None:
                    updates["model_update_version"] = sent.model_update_version
                    updates["model_update_items"] = sent.model_update_items
            else:
                errors.append(
                    f"server acknowledged version {ack}, below the sent {sent.local_version};"
                    " the delta will be sent again"
                )
                if ack < self._state["acked_version"]:
                    self._store.clear_acked()
                    updates["acked_version"] = 0
                    updates["model_update_version"] = -1  # send it again with the rest
                    updates["model_update_items"] = 0
            if payload_ok:
                if rows:
                    page_version = self._state["global_page_version"]
                    continuation = self._state["global_page_offset"] > 0 and page_version == int(
                        response.global_version
                    )
                    self._store.replace_global_patterns(rows, continuation=continuation)
                if trending:
                    self._store.replace_trending(trending)
                if response.next_global_page_offset:
                    # Part of the global patterns: the rest comes with the next syncs; the
                    # version is adopted with the last part.
                    updates["global_page_version"] = int(response.global_version)
                    updates["global_page_offset"] = int(response.next_global_page_offset)
                else:
                    updates["global_page_version"] = 0
                    updates["global_page_offset"] = 0
                    new_global = max(int(response.global_version), payload_round)
                    if new_global > self._state["global_version"]:
                        updates["global_version"] = new_global
            if response.next_sync_after_ms:
                updates["next_sync_at_ms"] = self._now_ms() + int(response.next_sync_after_ms)
            counter = "syncs_failed" if errors else "syncs_ok"
            updates[counter] = self._state[counter] + 1
            self._store.set_state(updates)
        self._state.update(updates)
        if rows or trending:
            self._reload_global()
        return len(rows), "; ".join(errors) if errors else None

    def _sync_failed(
        self,
        request: sync_pb2.SyncPatternsRequest,
        sent: _Sent,
        outcome: RetryOutcome,
        patterns_sent: int,
        error: str,
        bytes_down: int,
        redirect: str | None,
    ) -> SyncResult:
        with self._lock:
            if not self._closed:
                failed = self._state["syncs_failed"] + 1
                self._store.set_state({"syncs_failed": failed})
                self._state["syncs_failed"] = failed
            return SyncResult(
                ok=False,
                attempts=outcome.attempts,
                bytes_up=request.ByteSize(),
                bytes_down=bytes_down,
                latency_seconds=outcome.last_latency_seconds,
                acknowledged_version=self._state["acked_version"],
                global_version=self._state["global_version"],
                patterns_sent=patterns_sent,
                global_patterns_received=0,
                error=error,
                redirect_shard_id=redirect,
                model_version=self._state["model_version"],
                model_update_sent=sent.model_update_version is not None,
                next_sync_at_ms=self._state["next_sync_at_ms"],
            )

    # ------------------------------------------------------------------ stats & lifecycle

    def stats(self) -> BrainStats:
        """Counters, versions, recommend latency and store size.

        Raises:
            BrainError: the brain is closed.
            StoreError: the store could not be read.
        """
        with self._lock:
            self._check_open()
            lat = np.array(self._latencies, dtype=np.float64) * 1000.0
            p50, p99 = (
                (float(np.percentile(lat, 50)), float(np.percentile(lat, 99)))
                if lat.size
                else (0.0, 0.0)
            )
            return BrainStats(
                device_id=self._device_id,
                events_observed=self._store.event_count(),
                pattern_count=sum(
                    1 for r in self._patterns.values() if r.state.embedding is not None
                ),
                global_pattern_count=self._global_count,
                trending_count=len(self._trending),
                catalog_size=len(self._catalog) if self._catalog is not None else 0,
                watched_count=len(self._watched),
                pending_view_count=len(self._store.pending_views()),
                local_version=self._state["local_version"],
                acked_version=self._state["acked_version"],
                global_version=self._state["global_version"],
                catalog_version=self._state["catalog_version"],
                recommendations_served=self._recommend_calls,
                syncs_ok=self._state["syncs_ok"],
                syncs_failed=self._state["syncs_failed"],
                recommend_p50_ms=p50,
                recommend_p99_ms=p99,
                store_bytes=self._store.size_bytes(),
                model_version=self._state["model_version"],
                model_items=len(self._model.content_ids),
                model_bytes_down=self._state["model_bytes_down"],
                next_sync_at_ms=self._state["next_sync_at_ms"],
            )

    def close(self) -> None:
        """Close the store (idempotent). The transport and a shared catalog stay open."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._store.close()

    def __enter__(self) -> Brain:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _retry_policy(self) -> dict[str, Any]:
        """The retry arguments every call to the shard shares (attempts, backoff, jitter)."""
        cfg = self._config
        return {
            "max_attempts": cfg.max_attempts,
            "base_backoff_seconds": cfg.base_backoff_seconds,
            "max_backoff_seconds": cfg.max_backoff_seconds,
            "budget_seconds": cfg.retry_budget_seconds,
            "rng": self._rng,
        }

    def _check_open(self) -> None:
        if self._closed:
            raise BrainError("the brain is closed")

    def _require_transport(self) -> SyncTransport:
        if self._transport is None:
            raise BrainError("no transport configured: pass transport= to Brain")
        return self._transport

    def _now_ms(self) -> int:
        now = float(self._clock())
        return max(int(now * 1000), 0) if math.isfinite(now) else 0

    def _set_catalog(self, index: CatalogIndex) -> None:
        self._catalog = index
        self._owns_catalog = True
        self._trend_cache = None
        self._prefs_cache = None
        self._context_prefs_cache = {}
        self._aligned_cache = None

    def _aligned_model(self) -> AlignedModel | None:
        """The model laid over the current catalog (cached), or None without either."""
        if self._aligned_cache is None:
            catalog = self._catalog
            aligned = align_model(self._model, catalog) if catalog is not None else None
            self._aligned_cache = (aligned,)
        return self._aligned_cache[0]

    def _preferences(self) -> Preferences | None:
        """The device's preferences over the current catalog (cached), None without one."""
        if self._catalog is None:
            return None
        if self._prefs_cache is None:
            self._prefs_cache = device_preferences(self._viewings, self._catalog, self._weights)
        return self._prefs_cache

    def _context_preferences(self, bucket: int) -> Preferences | None:
        """The device's preferences from the viewings of one context bucket (cached per
        bucket), None without a catalog."""
        if self._catalog is None:
            return None
        prefs = self._context_prefs_cache.get(bucket)
        if prefs is None:
            prefs = device_preferences(
                self._viewings_by_bucket.get(bucket, ()), self._catalog, self._weights
            )
            self._context_prefs_cache[bucket] = prefs
        return prefs

    def _reload_global(self) -> None:
        """Rebuild the in-memory global-pattern and trending caches from the store."""
        rows = self._store.global_patterns()
        by_bucket: dict[int, list[GlobalPatternRow]] = {}
        for row in rows:
            by_bucket.setdefault(row.bucket, []).append(row)
        anywhere = by_bucket.get(-1, [])
        self._global_by_bucket = {}
        for bucket, bucket_rows in by_bucket.items():
            if bucket >= 0:
                self._global_by_bucket[bucket] = _global_set(bucket_rows + anywhere)
        self._global_any = _global_set(rows) if rows else None
        self._global_count = len(rows)
        self._trending = self._store.trending()
        self._trend_cache = None

    def _trends(self) -> _Trends:
        if self._trend_cache is None:
            catalog = self._catalog
            items = [
                (catalog.position_of(c), s)
                for c, s in self._trending
                if catalog is not None and c in catalog and s > 0
            ]
            peak = max((s for _, s in items), default=1.0)
            positions = np.array([p for p, _ in items], dtype=np.int64)
            scores = np.array([s / peak for _, s in items], dtype=np.float32)
            dense = np.zeros(len(catalog) if catalog is not None else 0, dtype=np.float32)
            dense[positions] = scores
            self._trend_cache = _Trends(
                positions,
                scores,
                {int(p): float(s) for p, s in zip(positions, scores, strict=True)},
                dense,
            )
        return self._trend_cache


def _bucket_reason(bucket: ContextBucket) -> str:
    """The reason of a context bucket's part, e.g. ``"matches your evening/weekday viewing"``."""
    return f"matches your {bucket.name} viewing"


def _query_vector(query: _Query) -> npt.NDArray[np.float32]:
    """The (384,) unit pattern query: local and global parts mixed by their weights."""
    mix = np.zeros(EMBEDDING_DIM, dtype=np.float32)
    if query.local is not None:
        mix += np.float32(query.local_weight) * query.local
    if query.glob is not None:
        mix += np.float32(query.global_weight) * query.glob
    q = normalize(mix)
    if not np.any(q):  # local and global exactly opposite: trust the viewer
        q = query.local if query.local is not None else normalize(mix)
    return q


def _validate_event(event: object) -> tuple[str, int, float, float]:
    if not isinstance(event, ViewingEvent):
        raise InvalidEventError(f"expected a ViewingEvent, got {type(event).__name__}")
    cid = event.content_id
    if not isinstance(cid, str) or not cid:
        raise InvalidEventError("content_id must be a non-empty string")
    ts = event.started_at_ms
    if isinstance(ts, bool) or not isinstance(ts, int | np.integer) or ts < 0:
        raise InvalidEventError(f"started_at_ms must be an int >= 0, got {ts!r}")
    if int(ts) > 2**53:
        raise InvalidEventError(f"started_at_ms {ts} is out of range")
    completion = _finite(event.completion, "completion")
    if not 0.0 <= completion <= 1.0:
        raise InvalidEventError(f"completion must be in [0, 1], got {completion}")
    watch = _finite(event.watch_seconds, "watch_seconds")
    if watch < 0:
        raise InvalidEventError(f"watch_seconds must be >= 0, got {watch}")
    return cid, int(ts), completion, watch


def _finite(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InvalidEventError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidEventError(f"{name} must be finite, got {value!r}")
    return number


def _global_rows(
    message: patterns_pb2.GlobalPatterns,
) -> tuple[list[GlobalPatternRow], list[tuple[str, float]]]:
    """Valid global patterns and trending items of a reply; malformed entries are skipped."""
    rows: dict[str, GlobalPatternRow] = {}
    for p in message.patterns:
        if not p.pattern_key:
            continue
        try:
            vector = normalize(decode_embedding(p.embedding))
        except EmbeddingError:
            continue
        quality, rate = float(p.quality), float(p.success_rate)
        if not np.any(vector) or not math.isfinite(quality) or not math.isfinite(rate):
            continue
        try:
            bucket = bucket_from_context(p.context).index
        except ValueError:
            bucket = -1  # no usable context: the pattern applies to every bucket
        rows[p.pattern_key] = GlobalPatternRow(
            pattern_key=p.pattern_key,
            bucket=bucket,
            embedding=vector,
            quality=max(quality, 0.0),
            success_rate=min(max(rate, 0.0), 1.0),
            source_count=int(p.source_count),
            round=int(p.round) or int(message.global_version),
        )
    trending: dict[str, float] = {}
    for t in message.trending:
        score = float(t.score)
        if t.content_id and math.isfinite(score):
            trending[t.content_id] = max(score, trending.get(t.content_id, -math.inf))
    return list(rows.values()), sorted(trending.items(), key=lambda kv: (-kv[1], kv[0]))


def _global_set(rows: Sequence[GlobalPatternRow]) -> GlobalSet:
    return GlobalSet.build(
        np.stack([r.embedding for r in rows]),
        np.array([r.quality for r in rows], dtype=np.float32),
        np.array([r.success_rate for r in rows], dtype=np.float32),
    )
