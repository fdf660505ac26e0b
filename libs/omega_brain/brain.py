"""The TV brain: learns viewing patterns on the device, recommends, and syncs with its shard.

A `Brain` is safe to call from several threads (calls are serialized by a lock; the network
part of `sync` runs outside it). Raw viewing history stays in the local store; only pattern
deltas, per-content view counts and, once per collaborative-model version, the model update
(preference weights over the items watched and one factor-sized direction, see
`omega_brain.model`) are sent.

`Brain` wires its parts and holds none of their logic: the shared state (store, versions,
locks, learned history, catalog, model and their caches) is one `BrainContext`
(`omega_brain.context`), passed to the learner (`omega_brain.learning`), the recommender
(`omega_brain.recommender`, over `omega_brain.ranking`) and the sync client
(`omega_brain.sync_client`, over `omega_brain.sync_delta`); the catalog and its index are
kept by `omega_brain.catalog_keeper`, the store is `omega_brain.store`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from types import TracebackType

import numpy as np
import numpy.typing as npt

from omega_brain.catalog import CatalogIndex
from omega_brain.catalog_keeper import CatalogKeeper
from omega_brain.config import BrainConfig
from omega_brain.context import BrainContext
from omega_brain.errors import InvalidArgumentError
from omega_brain.learning import Learner, validate_event
from omega_brain.model import AlignedModel
from omega_brain.models import BrainStats, Recommendation, SyncResult, ViewingEvent
from omega_brain.recommender import REASON_DISCOVER as REASON_DISCOVER
from omega_brain.recommender import REASON_GLOBAL as REASON_GLOBAL
from omega_brain.recommender import REASON_HISTORY as REASON_HISTORY
from omega_brain.recommender import REASON_MODEL as REASON_MODEL
from omega_brain.recommender import REASON_TRENDING as REASON_TRENDING
from omega_brain.recommender import Recommender
from omega_brain.store import PatternRow, Store, StoredModel
from omega_brain.sync_client import SyncClient
from omega_brain.transport import SyncTransport
from omega_protocol import bucket_from_timestamp

__all__ = ["Brain"]


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
        self._ctx = BrainContext.open(device_id, config or BrainConfig(), clock, catalog)
        self._learner = Learner(self._ctx)
        self._recommender = Recommender(self._ctx)
        self._sync = SyncClient(self._ctx, transport)

    # ------------------------------------------------------------------ properties

    @property
    def device_id(self) -> str:
        """The device id given at construction."""
        return self._ctx.device_id

    @property
    def config(self) -> BrainConfig:
        """The settings in use."""
        return self._ctx.config

    @property
    def catalog(self) -> CatalogIndex | None:
        """The catalog index in use, or None before one is loaded."""
        return self._ctx.catalog

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
        ctx = self._ctx
        with ctx.lock:
            ctx.check_open()
            index = ctx.keeper.replace(content_ids, embeddings, titles, genres, catalog_version=0)
            ctx.state["catalog_version"] = 0
            ctx.set_catalog(index)

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
        return self._sync.fetch_catalog()

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
        content_id, started_at_ms, completion, watch_seconds = validate_event(event)
        with self._ctx.lock:
            self._ctx.check_open()
            self._learner.observe(content_id, started_at_ms, completion, watch_seconds)

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
        ctx = self._ctx
        with ctx.lock:
            ctx.check_open()
            if k == 0:
                return []
            ts = int(timestamp_ms) if timestamp_ms is not None else ctx.now_ms()
            bucket = bucket_from_timestamp(ts, ctx.config.utc_offset_minutes)
            result = self._recommender.recommend(int(k), bucket, use_global, exclude_watched)
            self._recommender.record(time.perf_counter() - start)
            return result

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

        A reply with ``redirect_shard_id`` (the device belongs to another shard: one was
        added or removed) is not applied: the result has ``ok=False`` and
        ``redirect_shard_id`` set, and the caller re-routes (e.g. closes the brain and opens
        it on the same store with a transport to that shard). The brain then forgets its
        shard-side state, durably and in one transaction (``syncs_redirected`` counts it): the
        acknowledgements and the unconfirmed send are dropped and the server version marked
        unknown. Its next sync, on whatever transport and also after a restart, behaves as
        for a new store of a known device: it first pulls to learn the shard's last version
        for the device, then sends every pattern it holds from base 0, numbered past that
        version, and its model update again. View counts the old shard acknowledged are not
        sent again (they were counted there); pending ones are. A device redirected back
        (a shard removed) is handled the same way, and a device bounced between two shards
        only rewrites this state on each redirect.

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
        return self._sync.sync()

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
        ctx = self._ctx
        with ctx.sync_lock:
            forgotten = self._sync.forget_on_shard()
            with ctx.lock:
                ctx.check_open()
                self._learner.forget()
        return forgotten

    # ------------------------------------------------------------------ stats & lifecycle

    def stats(self) -> BrainStats:
        """Counters, versions, recommend latency and store size.

        Raises:
            BrainError: the brain is closed.
            StoreError: the store could not be read.
        """
        ctx = self._ctx
        with ctx.lock:
            ctx.check_open()
            lat = np.array(self._recommender.latencies, dtype=np.float64) * 1000.0
            p50, p99 = (
                (float(np.percentile(lat, 50)), float(np.percentile(lat, 99)))
                if lat.size
                else (0.0, 0.0)
            )
            return BrainStats(
                device_id=ctx.device_id,
                events_observed=ctx.store.event_count(),
                pattern_count=sum(
                    1 for r in ctx.patterns.values() if r.state.embedding is not None
                ),
                global_pattern_count=ctx.globals.count,
                trending_count=len(ctx.globals.trending),
                catalog_size=len(ctx.catalog) if ctx.catalog is not None else 0,
                watched_count=len(ctx.watched),
                pending_view_count=len(ctx.store.pending_views()),
                local_version=ctx.state["local_version"],
                acked_version=ctx.state["acked_version"],
                global_version=ctx.state["global_version"],
                catalog_version=ctx.state["catalog_version"],
                recommendations_served=self._recommender.calls,
                syncs_ok=ctx.state["syncs_ok"],
                syncs_failed=ctx.state["syncs_failed"],
                recommend_p50_ms=p50,
                recommend_p99_ms=p99,
                store_bytes=ctx.store.size_bytes(),
                model_version=ctx.state["model_version"],
                model_items=len(ctx.model.content_ids),
                model_bytes_down=ctx.state["model_bytes_down"],
                next_sync_at_ms=ctx.state["next_sync_at_ms"],
                syncs_redirected=ctx.state["syncs_redirected"],
            )

    def close(self) -> None:
        """Close the store (idempotent). The transport and a shared catalog stay open."""
        with self._ctx.lock:
            if not self._ctx.closed:
                self._ctx.closed = True
                self._ctx.store.close()

    def __enter__(self) -> Brain:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ white-box access
    # For tests and benchmarks that inspect or install the learned state; not public API.

    @property
    def _store(self) -> Store:
        return self._ctx.store

    @property
    def _keeper(self) -> CatalogKeeper:
        return self._ctx.keeper

    @property
    def _state(self) -> dict[str, int]:
        return self._ctx.state

    @property
    def _patterns(self) -> dict[int, PatternRow]:
        return self._ctx.patterns

    @property
    def _watched(self) -> set[str]:
        return self._ctx.watched

    @property
    def _model(self) -> StoredModel:
        return self._ctx.model

    @_model.setter
    def _model(self, model: StoredModel) -> None:
        self._ctx.model = model

    @property
    def _aligned_cache(self) -> tuple[AlignedModel | None] | None:
        return self._ctx.aligned_cache

    @_aligned_cache.setter
    def _aligned_cache(self, cache: tuple[AlignedModel | None] | None) -> None:
        self._ctx.aligned_cache = cache

    def _aligned_model(self) -> AlignedModel | None:
        return self._ctx.aligned_model()
