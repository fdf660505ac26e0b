"""The constellation's logic: apply deltas, route devices, cache global patterns and catalog.

No protobuf here: servicers convert with `omega_constellation.converters`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from omega_common.errors import FailedPreconditionError
from omega_constellation import metrics
from omega_constellation.catalog import Catalog, read_catalog_file
from omega_constellation.converters import GlobalPatternRow, TrendingRow, ValidatedDelta
from omega_constellation.settings import ConstellationSettings
from omega_constellation.store import ExportRow, ShardStore, SyncOutcome
from omega_protocol import shard_for

__all__ = ["ConstellationService", "GlobalView", "SyncDecision"]


@dataclass(frozen=True, slots=True)
class GlobalView:
    """An immutable snapshot of the shard's global patterns and trends."""

    version: int
    patterns: list[GlobalPatternRow]
    trending: list[TrendingRow]


@dataclass(frozen=True, slots=True)
class SyncDecision:
    """Outcome of a sync: applied (``outcome``) or sent elsewhere (``redirect_shard_id``)."""

    outcome: SyncOutcome | None
    redirect_shard_id: str | None
    view: GlobalView | None


class ConstellationService:
    """One shard replica's behaviour over its `ShardStore`."""

    def __init__(self, store: ShardStore, settings: ConstellationSettings) -> None:
        self.store = store
        self.settings = settings
        self._view = GlobalView(0, [], [])
        self._view_lock = asyncio.Lock()
        self._catalog = Catalog(0, [])

    async def start(self) -> None:
        """Load the catalog (from the configured file when it changed) and the global view."""
        path = self.settings.catalog_path
        if path is not None:
            rows, digest = await asyncio.to_thread(read_catalog_file, path)
            if await self.store.catalog_digest() != digest:
                await self.store.replace_catalog(rows, digest)
        version, rows = await self.store.load_catalog()
        self._catalog = await asyncio.to_thread(Catalog, version, rows)
        await self.refresh_global(force=True)

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
        """Reload the global view when the database has a newer round than the cache."""
        if not force and version is not None and version <= self._view.version:
            return self._view
        async with self._view_lock:
            if force or version is None or version > self._view.version:
                v, patterns, trending = await self.store.load_global()
                self._view = GlobalView(v, patterns, trending)
                metrics.GLOBAL_VERSION.set(v)
        return self._view

    async def sync(self, delta: ValidatedDelta) -> SyncDecision:
        """Apply a device's delta here, or name the shard it belongs to."""
        owner = shard_for(delta.device_id, self.settings.shard_ids)
        if owner != self.settings.shard_id:
            metrics.SYNC_REDIRECTS.inc()
            return SyncDecision(None, owner, None)
        outcome = await self.store.apply_delta(
            delta,
            shard_id=self.settings.shard_id,
            min_success_rate=self.settings.min_success_rate,
            now_ms=int(time.time() * 1000),
        )
        if outcome.duplicate:
            metrics.SYNC_DUPLICATES.inc()
        else:
            metrics.PATTERNS_STORED.inc(len(delta.upserts) + len(delta.updates))
        view = await self.refresh_global(outcome.global_version)
        return SyncDecision(outcome, None, view)

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

    async def publish(
        self,
        round_id: int,
        patterns: list[GlobalPatternRow],
        trending: list[TrendingRow],
        *,
        epsilon: float,
        cumulative_epsilon: float,
    ) -> tuple[int, int, bool]:
        """Store a round; returns (global version, patterns stored, duplicate)."""
        result = await self.store.publish_round(
            round_id, patterns, trending, epsilon=epsilon, cumulative_epsilon=cumulative_epsilon
        )
        await self.refresh_global(result[0])
        return result
