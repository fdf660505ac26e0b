"""The constellation's logic: apply deltas, route devices, cache global patterns, catalog, model.

No protobuf here: servicers convert with `omega_constellation.converters`.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from omega_common.errors import FailedPreconditionError, InvalidArgumentError
from omega_constellation import metrics
from omega_constellation.catalog import Catalog, read_catalog_file
from omega_constellation.converters import (
    GlobalPatternRow,
    ModelState,
    TrendingRow,
    ValidatedDelta,
    ValidatedRound,
    ValidatedSnapshot,
)
from omega_constellation.group_commit import GroupCommitter
from omega_constellation.model import ModelPage, ModelView
from omega_constellation.settings import ConstellationSettings
from omega_constellation.store import (
    ExportedUpdateRow,
    ExportRow,
    ShardStore,
    SnapshotOutcome,
    SyncOutcome,
)
from omega_protocol import shard_for

__all__ = ["ConstellationService", "GlobalView", "SyncDecision"]


@dataclass(frozen=True, slots=True)
class GlobalView:
    """An immutable snapshot of the shard's global patterns and trends.

    Bounded: ``patterns`` holds at most ``max_global_patterns_held`` rows, only those some sync
    answer sends (see `omega_constellation.global_selection`), best quality first;
    ``trending`` holds the ``trending_per_sync`` best items.
    """

    version: int
    patterns: list[GlobalPatternRow]
    trending: list[TrendingRow]


@dataclass(frozen=True, slots=True)
class SyncDecision:
    """Outcome of a sync: applied (``outcome``) or sent elsewhere (``redirect_shard_id``)."""

    outcome: SyncOutcome | None
    redirect_shard_id: str | None
    view: GlobalView | None
    model_version: int = 0


class ConstellationService:
    """One shard replica's behaviour over its `ShardStore`."""

    def __init__(self, store: ShardStore, settings: ConstellationSettings) -> None:
        self.store = store
        self.settings = settings
        self._view = GlobalView(0, [], [])
        self._view_lock = asyncio.Lock()
        self._catalog = Catalog(0, [])
        self._model = ModelView(ModelState(0, 0), [])
        self._model_lock = asyncio.Lock()
        self._committer = GroupCommitter(
            functools.partial(
                self._apply_batch,
                shard_id=settings.shard_id,
                min_success_rate=settings.min_success_rate,
                max_version_step=settings.max_version_step,
            ),
            max_batch=settings.sync_batch_max,
            max_wait_seconds=settings.sync_batch_max_wait_ms / 1000.0,
            max_pending=settings.sync_queue_max,
            max_concurrent_batches=settings.sync_batch_concurrency,
            slow_batch_seconds=settings.sync_slow_batch_ms / 1000.0,
        )

    async def _apply_batch(
        self,
        deltas: Sequence[ValidatedDelta],
        *,
        shard_id: str,
        min_success_rate: float,
        max_version_step: int | None,
    ) -> list[SyncOutcome | InvalidArgumentError]:
        return await self.store.apply_batch(
            deltas,
            shard_id=shard_id,
            min_success_rate=min_success_rate,
            now_ms=int(time.time() * 1000),
            max_version_step=max_version_step,
        )

    async def close(self) -> None:
        """Finish running batches (queued syncs fail), then close the database pool."""
        await self._committer.close()
        await self.store.close()

    async def start(self) -> None:
        """Load the catalog (from the configured file when it changed), global view and model."""
        path = self.settings.catalog_path
        if path is not None:
            rows, digest = await asyncio.to_thread(read_catalog_file, path)
            if await self.store.catalog_digest() != digest:
                await self.store.replace_catalog(rows, digest)
        version, rows = await self.store.load_catalog()
        self._catalog = await asyncio.to_thread(Catalog, version, rows)
        await self.refresh_global(force=True)
        await self.refresh_model(force=True)

    @property
    def global_view(self) -> GlobalView:
        """The cached global patterns and trends (refreshed when a newer round is seen)."""
        return self._view

    @property
    def catalog(self) -> Catalog:
        """The catalog snapshot served by FetchEmbeddings and SearchContent."""
        return self._catalog

    async def refresh_global(
        self, version: int | None = None, *, force: bool = False
    ) -> GlobalView:
        """Reload the global view when the database has a newer round than the cache.

        Loading is bounded: only the patterns some sync answer sends, at most
        ``max_global_patterns_held`` of them, and the ``trending_per_sync`` best trends are
        read (see `ShardStore.load_global`).
        """
        if not force and version is not None and version <= self._view.version:
            return self._view
        async with self._view_lock:
            if force or version is None or version > self._view.version:
                settings = self.settings
                v, patterns, trending = await self.store.load_global(
                    per_sync=settings.max_global_patterns_per_sync,
                    max_patterns=settings.max_global_patterns_held,
                    max_trending=settings.trending_per_sync,
                )
                self._view = GlobalView(v, patterns, trending)
                metrics.GLOBAL_VERSION.set(v)
                metrics.GLOBAL_PATTERNS_HELD.set(len(patterns))
        return self._view

    @property
    def model(self) -> ModelView:
        """The cached item-factor model (refreshed when a newer version is seen)."""
        return self._model

    async def refresh_model(self, version: int | None = None, *, force: bool = False) -> ModelView:
        """Reload the model when the database has a newer version than the cache."""
        if not force and version is not None and version <= self._model.version:
            return self._model
        async with self._model_lock:
            if force or version is None or version > self._model.version:
                state, rows = await self.store.load_model()
                self._model = await asyncio.to_thread(ModelView, state, rows)
                metrics.MODEL_VERSION.set(state.version)
        return self._model

    async def fetch_model(self, *, since: int, page_token: str, page_size: int) -> ModelPage:
        """One page of the model rows changed after ``since`` (see `ModelView.page`).

        The model version is read from the database on every call (one primary-key lookup),
        so a replica that did not receive the latest PublishRound still serves it.
        """
        state = await self.store.model_state()
        view = await self.refresh_model(state.version)
        return view.page(since=since, page_token=page_token, page_size=page_size)

    async def forget(self, device_id: str) -> int | None:
        """Delete what this shard keeps about ``device_id`` (see `ShardStore.forget_device`),
        also when the device now belongs to another shard: erasure is always the device's
        right, and a device that moved after resharding may still have rows here."""
        return await self.store.forget_device(device_id)

    async def sync(self, delta: ValidatedDelta) -> SyncDecision:
        """Apply a device's delta here, or name the shard it belongs to."""
        owner = shard_for(delta.device_id, self.settings.shard_ids)
        if owner != self.settings.shard_id:
            metrics.SYNC_REDIRECTS.inc()
            return SyncDecision(None, owner, None)
        if delta.local_version == 0:
            # A pull writes nothing: one read, outside the group commit.
            [pulled] = await self._apply_batch(
                [delta],
                shard_id=self.settings.shard_id,
                min_success_rate=self.settings.min_success_rate,
                max_version_step=self.settings.max_version_step,
            )
            assert isinstance(pulled, SyncOutcome)
            outcome = pulled
        else:
            outcome = await self._committer.submit(delta)
        if outcome.duplicate:
            metrics.SYNC_DUPLICATES.inc()
        else:
            metrics.PATTERNS_STORED.inc(len(delta.upserts) + len(delta.updates))
            if delta.model_update is not None:
                metrics.MODEL_UPDATES_STORED.inc()
        view = await self.refresh_global(outcome.global_version)
        model = await self.refresh_model(outcome.model_version)
        return SyncDecision(outcome, None, view, model.version)

    async def export(
        self, *, since_ms: int, min_success_rate: float, batch_size: int
    ) -> AsyncIterator[list[ExportRow]]:
        """Batches of stored patterns for the federation worker (see `ShardStore`)."""
        if batch_size <= 0:
            raise FailedPreconditionError("batch_size must be positive")
        until_ms = int(time.time() * 1000) - self.settings.export_settle_ms
        async for batch in self.store.export_patterns(
            since_ms=since_ms,
            until_ms=until_ms,
            min_success_rate=min_success_rate,
            batch_size=min(batch_size, 10_000),
        ):
            yield batch

    async def export_model_updates(
        self, *, batch_size: int
    ) -> AsyncIterator[list[ExportedUpdateRow]]:
        """Batches of every stored model update (see `ShardStore.export_model_updates`)."""
        if batch_size <= 0:
            raise FailedPreconditionError("batch_size must be positive")
        async for batch in self.store.export_model_updates(batch_size=min(batch_size, 10_000)):
            yield batch

    async def publish(
        self,
        published: ValidatedRound,
        *,
        epsilon: float,
        cumulative_epsilon: float,
        noise_multiplier: float = 0.0,
    ) -> tuple[int, int, bool]:
        """Store a round; returns (global version, patterns stored, duplicate).

        Raises:
            InvalidArgumentError: more patterns or trending items than the settings allow, a
                pattern with fewer source devices than
                ``min_published_sources``, or a round too far past the current version
                (`ShardStore.publish_round`). Nothing is written.
        """
        s = self.settings
        if len(published.patterns) > s.max_published_patterns:
            raise InvalidArgumentError(
                f"patterns: {len(published.patterns)} > {s.max_published_patterns}"
            )
        if len(published.trending) > s.max_published_trending:
            raise InvalidArgumentError(
                f"trending: {len(published.trending)} > {s.max_published_trending}"
            )
        for i, p in enumerate(published.patterns):
            if p.source_count < s.min_published_sources:
                raise InvalidArgumentError(
                    f"patterns[{i}].source_count {p.source_count} is below the k-anonymity"
                    f" threshold {s.min_published_sources}"
                )
        result = await self.store.publish_round(
            published,
            epsilon=epsilon,
            cumulative_epsilon=cumulative_epsilon,
            noise_multiplier=noise_multiplier,
            max_round_step=s.max_round_step,
        )
        await self.refresh_global(result[0])
        if published.item_factors:
            await self.refresh_model(published.round)
        return result

    async def publish_model_snapshot(self, snapshot: ValidatedSnapshot) -> SnapshotOutcome:
        """Replace the stored model by a newer whole one (`ShardStore.publish_model_snapshot`)
        and serve it at once.

        Raises:
            InvalidArgumentError: the snapshot's version is above the shard's global version
                (nothing written).
        """
        outcome = await self.store.publish_model_snapshot(snapshot)
        if outcome.applied:
            metrics.MODEL_SNAPSHOTS_APPLIED.inc()
            await self.refresh_model(outcome.model_version)
        return outcome
