"""The state a brain's parts share, passed to each of them explicitly.

`Brain` opens one `BrainContext` and hands it to its learner (`omega_brain.learning`), its
recommender (`omega_brain.recommender`) and its sync client (`omega_brain.sync_client`). It
holds the store, the in-memory copy of the store's versions (``state``), the locks, the
learned history, the catalog and collaborative model in use, and the caches derived from
them (the device's preferences, the model laid over the catalog, global patterns and trends),
with the rules that keep those caches valid. Nothing here talks to the shard or ranks.

Locking: ``lock`` (re-entrant) serializes every read and write of this state; ``sync_lock``
serializes the calls to the shard (sync, catalog fetch, forget), whose network part runs
without ``lock``.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from omega_brain.catalog import CatalogIndex
from omega_brain.catalog_keeper import CatalogKeeper
from omega_brain.collaborative import InteractionWeights, preference_vector
from omega_brain.config import BrainConfig
from omega_brain.errors import BrainError
from omega_brain.index_file import index_path
from omega_brain.model import AlignedModel, Preferences, align_model
from omega_brain.ranking import GlobalSet
from omega_brain.store import GlobalPatternRow, HistoryRow, PatternRow, Store, StoredModel

__all__ = ["BrainContext", "GlobalCache", "Trends", "history_preferences"]


@dataclass(frozen=True, slots=True)
class Trends:
    """Trending items of the current catalog: rows and scores normalized to (0, 1]."""

    positions: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float32]
    by_position: dict[int, float]
    dense: npt.NDArray[np.float32]
    """(n_catalog,) float32: the normalized score of every catalog row (0: not trending)."""


class GlobalCache:
    """The stored global patterns (per context bucket) and trending items, in memory."""

    def __init__(self) -> None:
        self.by_bucket: dict[int, GlobalSet] = {}
        self.anywhere: GlobalSet | None = None
        self.count = 0
        self.trending: list[tuple[str, float]] = []
        self._trend_cache: Trends | None = None

    def reload(self, store: Store) -> None:
        """Rebuild the in-memory global-pattern and trending caches from the store."""
        rows = store.global_patterns()
        by_bucket: dict[int, list[GlobalPatternRow]] = {}
        for row in rows:
            by_bucket.setdefault(row.bucket, []).append(row)
        anywhere = by_bucket.get(-1, [])
        self.by_bucket = {}
        for bucket, bucket_rows in by_bucket.items():
            if bucket >= 0:
                self.by_bucket[bucket] = _global_set(bucket_rows + anywhere)
        self.anywhere = _global_set(rows) if rows else None
        self.count = len(rows)
        self.trending = store.trending()
        self._trend_cache = None

    def forget_trends(self) -> None:
        """Drop the trends laid over the catalog (the catalog changed)."""
        self._trend_cache = None

    def trends(self, catalog: CatalogIndex | None) -> Trends:
        """The trending items laid over ``catalog`` (cached until `reload` or
        `forget_trends`)."""
        if self._trend_cache is None:
            items = [
                (catalog.position_of(c), s)
                for c, s in self.trending
                if catalog is not None and c in catalog and s > 0
            ]
            peak = max((s for _, s in items), default=1.0)
            positions = np.array([p for p, _ in items], dtype=np.int64)
            scores = np.array([s / peak for _, s in items], dtype=np.float32)
            dense = np.zeros(len(catalog) if catalog is not None else 0, dtype=np.float32)
            dense[positions] = scores
            self._trend_cache = Trends(
                positions,
                scores,
                {int(p): float(s) for p, s in zip(positions, scores, strict=True)},
                dense,
            )
        return self._trend_cache


class BrainContext:
    """One brain's shared state (see the module docstring).

    Use `open`; the constructor expects an open store and keeper.

    Attributes:
        state: the store's versions and counters (`Store.state`), kept in step with it.
        patterns: the local pattern of each context bucket (bucket index -> row).
        watched: content ids the device has observed.
        history: per context bucket, the `HistoryRow` of each content id viewed there: the
            aggregate of every observed event (the store's ``history`` table), which is all
            the preferences need, so compacting old events changes nothing here.
        events_kept: the budget of raw events in the store (`BrainConfig.max_events_kept`).
        catalog: the catalog index in use, or None; ``owns_catalog`` when it is the
            brain's own (persisted) rather than one passed in.
        model: the stored collaborative model.
        globals: global patterns and trends.
    """

    def __init__(
        self,
        device_id: str,
        config: BrainConfig,
        clock: Callable[[], float],
        store: Store,
        keeper: CatalogKeeper,
        catalog: CatalogIndex | None,
    ) -> None:
        self.device_id = device_id
        self.config = config
        self.clock = clock
        self.lock = threading.RLock()
        self.sync_lock = threading.Lock()
        self.rng = random.Random()
        self.closed = False
        self.owns_catalog = False
        self.globals = GlobalCache()
        self.weights = InteractionWeights(
            success_completion=config.success_completion,
            failure_completion=config.failure_completion,
        )
        self.prefs_cache: Preferences | None = None
        self.context_prefs_cache: dict[int, Preferences] = {}
        self.aligned_cache: tuple[AlignedModel | None] | None = None
        self.store = store
        self.keeper = keeper
        self.events_kept = config.max_events_kept
        self.state: dict[str, int] = store.state()
        self.patterns: dict[int, PatternRow] = store.patterns()
        self.history: dict[int, dict[str, HistoryRow]] = {}
        for row in store.history():
            self.history.setdefault(row.bucket, {})[row.content_id] = row
        self.watched: set[str] = {c for rows in self.history.values() for c in rows}
        self.model: StoredModel = store.model()
        self.catalog = catalog
        if catalog is None:
            self.catalog = keeper.open()
            self.owns_catalog = self.catalog is not None
        self.globals.reload(store)

    @classmethod
    def open(
        cls,
        device_id: str,
        config: BrainConfig,
        clock: Callable[[], float],
        catalog: CatalogIndex | None,
    ) -> BrainContext:
        """Open the store (and the catalog index persisted beside it) and load the state.

        Raises:
            StoreError: the store cannot be opened, or belongs to another device.
        """
        store = Store(config.store_path, device_id, encryption_key=config.encryption_key)
        keeper = CatalogKeeper(
            store,
            index_path(config.store_path),
            hnsw_m=config.hnsw_m,
            ef_search=config.ef_search,
            ef_construction=config.hnsw_ef_construction,
            exact_max_items=config.exact_search_max_items,
        )
        try:
            return cls(device_id, config, clock, store, keeper, catalog)
        except BaseException:
            store.close()
            raise

    # ------------------------------------------------------------------ small rules

    def check_open(self) -> None:
        """Raises `BrainError` once the brain is closed."""
        if self.closed:
            raise BrainError("the brain is closed")

    def now_ms(self) -> int:
        """The clock in ms since the epoch (0 for a clock that is not finite)."""
        now = float(self.clock())
        return max(int(now * 1000), 0) if math.isfinite(now) else 0

    def retry_policy(self) -> dict[str, Any]:
        """The retry arguments every call to the shard shares (attempts, backoff, jitter)."""
        cfg = self.config
        return {
            "max_attempts": cfg.max_attempts,
            "base_backoff_seconds": cfg.base_backoff_seconds,
            "max_backoff_seconds": cfg.max_backoff_seconds,
            "budget_seconds": cfg.retry_budget_seconds,
            "rng": self.rng,
        }

    # ------------------------------------------------------------------ catalog, model, caches

    def set_catalog(self, index: CatalogIndex) -> None:
        """Use ``index`` as the brain's own catalog; drops what was derived from the old one."""
        self.catalog = index
        self.owns_catalog = True
        self.globals.forget_trends()
        self.prefs_cache = None
        self.context_prefs_cache = {}
        self.aligned_cache = None

    def set_model(self, model: StoredModel) -> None:
        """Use ``model`` as the collaborative model (drops the cached alignment)."""
        self.model = model
        self.aligned_cache = None

    def aligned_model(self) -> AlignedModel | None:
        """The model laid over the current catalog (cached), or None without either."""
        if self.aligned_cache is None:
            catalog = self.catalog
            aligned = align_model(self.model, catalog) if catalog is not None else None
            self.aligned_cache = (aligned,)
        return self.aligned_cache[0]

    def preferences(self) -> Preferences | None:
        """The device's preferences over the current catalog (cached), None without one."""
        if self.catalog is None:
            return None
        if self.prefs_cache is None:
            rows = [r for bucket_rows in self.history.values() for r in bucket_rows.values()]
            self.prefs_cache = history_preferences(rows, self.catalog, self.weights)
        return self.prefs_cache

    def context_preferences(self, bucket: int) -> Preferences | None:
        """The device's preferences from the viewings of one context bucket (cached per
        bucket), None without a catalog."""
        if self.catalog is None:
            return None
        prefs = self.context_prefs_cache.get(bucket)
        if prefs is None:
            rows = list(self.history.get(bucket, {}).values())
            prefs = history_preferences(rows, self.catalog, self.weights)
            self.context_prefs_cache[bucket] = prefs
        return prefs

    def reload_global(self) -> None:
        """Rebuild the in-memory global-pattern and trending caches from the store."""
        self.globals.reload(self.store)

    def trends(self) -> Trends:
        """The trending items laid over the current catalog (cached)."""
        return self.globals.trends(self.catalog)


def history_preferences(
    rows: Sequence[HistoryRow], catalog: CatalogIndex, weights: InteractionWeights
) -> Preferences:
    """`omega_brain.model.device_preferences` of the viewings that ``rows`` aggregate.

    The same result as from the raw viewings: an item's weight is that of its best viewing
    (a weight never falls as completion rises, so that is the weight of the best completion),
    the sample count is the number of viewings of catalog items and the success rate counts
    the viewings that were successes when observed (the same as recounting them unless
    `BrainConfig.success_completion` changed since).

    Args:
        rows: history rows (one content id may appear in several buckets).
        catalog: the catalog; ids it lacks are skipped.
        weights: weight of a viewing by completion.
    """
    best: dict[int, float] = {}
    successes = 0
    samples = 0
    for row in rows:
        if row.content_id not in catalog:
            continue
        position = catalog.position_of(row.content_id)
        best[position] = max(best.get(position, 0.0), row.best_completion)
        successes += row.successes
        samples += row.views
    items, p = preference_vector(best.items(), weights)
    return Preferences(items, p, successes / samples if samples else 0.0, samples)


def _global_set(rows: Sequence[GlobalPatternRow]) -> GlobalSet:
    return GlobalSet.build(
        np.stack([r.embedding for r in rows]),
        np.array([r.quality for r in rows], dtype=np.float32),
        np.array([r.success_rate for r in rows], dtype=np.float32),
    )
