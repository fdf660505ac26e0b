"""The shard's Postgres store (asyncpg): device patterns, views, global patterns, catalog, model.

Every public coroutine is one transaction. Writes are batched with ``executemany``; embeddings
are int8 ``bytea`` plus a ``real`` scale (ARCHITECTURE.md section 3).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from omega_common.db import apply_migrations, load_migrations
from omega_common.errors import InvalidArgumentError
from omega_constellation.converters import (
    GlobalPatternRow,
    ItemFactorRecord,
    ModelState,
    PatternStatsUpdate,
    StoredPattern,
    TrendingRow,
    ValidatedDelta,
    ValidatedRound,
    ValidatedSnapshot,
)
from omega_constellation.global_selection import SyncAnswerFilter

__all__ = [
    "MAX_FIRST_ROUND",
    "CatalogRow",
    "ExportRow",
    "ExportedUpdateRow",
    "ShardStore",
    "SnapshotOutcome",
    "SyncOutcome",
    "device_key",
]

_GLOBAL_VERSION = "global_version"
_CATALOG_VERSION = "catalog_version"
_CATALOG_DIGEST = "catalog_digest"
_MODEL_VERSION = "model_version"
_MODEL_FACTORS = "model_factors"


MAX_FIRST_ROUND = 2**53
"""The largest first round a shard without rounds accepts (a shard added when the fleet is at
round 1,500 takes round 1,500): exact in a double, and far beyond any real round count, so a
bad first round still cannot make every later round a duplicate."""


def device_key(device_id: str) -> str:
    """Opaque key the federation worker sees instead of the device id (16 hex chars)."""
    return hashlib.blake2b(device_id.encode(), digest_size=8, person=b"omega-device").hexdigest()


@dataclass(frozen=True, slots=True)
class SyncOutcome:
    """What applying one delta did."""

    acknowledged_version: int
    duplicate: bool
    patterns_stored: int  # patterns the shard holds for the device after this sync
    global_version: int
    model_version: int = 0  # the shard's model version when the sync was applied


@dataclass(frozen=True, slots=True)
class SnapshotOutcome:
    """What publishing a model snapshot did (`ShardStore.publish_model_snapshot`).

    Attributes:
        model_version: The shard's model version after the call.
        applied: False when the shard already held that version or a newer one.
        rows_stored: Rows written (0 when not applied).
    """

    model_version: int
    applied: bool
    rows_stored: int


@dataclass(frozen=True, slots=True)
class ExportRow:
    """One exported device pattern."""

    device_key: str
    pattern: StoredPattern
    stored_at_ms: int


@dataclass(frozen=True, slots=True)
class ExportedUpdateRow:
    """One device's stored model update: ``payload`` is a serialized `ItemFactorUpdate`."""

    device_key: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class CatalogRow:
    """One catalog item with its int8 embedding."""

    content_id: str
    title: str
    genres: list[str]
    codes: bytes
    scale: float
    catalog_version: int


class ShardStore:
    """Data access for one shard's database."""

    def __init__(self, pool: asyncpg.Pool, timeout_seconds: float = 5.0) -> None:
        self._pool = pool
        self._timeout = timeout_seconds

    @classmethod
    async def open(
        cls, dsn: str, *, min_size: int = 2, max_size: int = 10, timeout_seconds: float = 5.0
    ) -> ShardStore:
        """Connect a pool and apply pending schema migrations.

        Raises:
            OSError, asyncpg.PostgresError: the database is unreachable or a migration failed.
        """
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            command_timeout=timeout_seconds,
            reset=_no_session_state,
        )
        async with pool.acquire() as conn:
            await apply_migrations(conn, load_migrations("omega_constellation"))
        return cls(pool, timeout_seconds)

    async def close(self) -> None:
        """Close the pool (waits for connections in use)."""
        await self._pool.close()

    async def ping(self, timeout_seconds: float | None = None) -> None:
        """``SELECT 1`` through the pool (the readiness probe).

        Args:
            timeout_seconds: bound on acquiring a connection and on the query each; default:
                the store's operation timeout.

        Raises:
            OSError, asyncpg errors, TimeoutError: the database did not answer in time.
        """
        timeout = self._timeout if timeout_seconds is None else timeout_seconds
        async with self._pool.acquire(timeout=timeout) as conn:
            await conn.fetchval("SELECT 1", timeout=timeout)

    # ---- device sync -------------------------------------------------------------------------

    async def apply_delta(
        self,
        delta: ValidatedDelta,
        *,
        shard_id: str,
        min_success_rate: float,
        now_ms: int,
        max_version_step: int | None = None,
    ) -> SyncOutcome:
        """Apply one validated delta exactly once per (device id, local version).

        The batch of one of `apply_batch` (same rules and arguments).

        Raises:
            InvalidArgumentError: see `apply_batch`; nothing is written.
        """
        [result] = await self.apply_batch(
            [delta],
            shard_id=shard_id,
            min_success_rate=min_success_rate,
            now_ms=now_ms,
            max_version_step=max_version_step,
        )
        if isinstance(result, InvalidArgumentError):
            raise result
        return result

    async def apply_batch(
        self,
        deltas: Sequence[ValidatedDelta],
        *,
        shard_id: str,
        min_success_rate: float,
        now_ms: int,
        max_version_step: int | None = None,
    ) -> list[SyncOutcome | InvalidArgumentError]:
        """Apply validated deltas of distinct devices in one transaction (group commit).

        Each delta is applied exactly once per (device id, local version): a version at or
        below the device's last applied one is a duplicate and writes nothing. Local version
        0 (an empty delta, checked by the converter) is a pull: nothing is written and the
        answer acknowledges the device's last applied version (0 if none), so a device whose
        store is new (factory reset) learns where to continue.

        Patterns below ``min_success_rate`` are not stored (an existing row is deleted).
        View counts are tagged with the shard's current global version. A model update
        replaces the device's previous one.

        Set-based: every statement covers the whole batch (arrays through ``unnest``), so a
        batch costs about ten round trips and one commit whatever its size. Device rows are
        locked in device id order and view counts written in content id order, so concurrent
        batches (of this replica or another on the same database) cannot deadlock.

        Args:
            deltas: Deltas of distinct devices (a device's next delta waits for the next
                batch; `omega_constellation.group_commit` guarantees it).
            shard_id: This shard, recorded with a new device.
            min_success_rate: Quality threshold of stored patterns.
            now_ms: The time recorded as ``stored_at_ms``, in ms since the epoch.
            max_version_step: Most a local version may exceed the device's last applied
                version (0 for a new device); None: no bound. Compared under the device
                row's lock, so concurrent syncs cannot slip past it.

        Returns:
            One entry per delta, in order: its `SyncOutcome`, or an `InvalidArgumentError`
            when its local version jumps by more than ``max_version_step`` or its model
            update's direction was computed against the current model version but has another
            factor count. A refused delta writes nothing (not even a new device's row); the
            others are applied.

        Raises:
            ValueError: two deltas of one device.
            asyncpg.PostgresError, OSError: the database failed; nothing was written.
        """
        ids = [d.device_id for d in deltas]
        if len(set(ids)) != len(ids):
            raise ValueError("a batch holds at most one delta per device")
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            state = await conn.fetch(
                "SELECT key, value FROM shard_state WHERE key = ANY($1::text[])",
                [_GLOBAL_VERSION, _MODEL_VERSION, _MODEL_FACTORS],
            )
            values = {r["key"]: int(r["value"]) for r in state}
            global_version = values.get(_GLOBAL_VERSION, 0)
            model = ModelState(values.get(_MODEL_VERSION, 0), values.get(_MODEL_FACTORS, 0))
            writes = [d for d in deltas if d.local_version > 0]
            inserted: set[str] = set()
            if writes:
                order = sorted(d.device_id for d in writes)
                rows = await conn.fetch(
                    "INSERT INTO devices (device_id, device_key, shard_id)"
                    " SELECT d, k, $3 FROM unnest($1::text[], $2::text[]) AS t(d, k) ORDER BY d"
                    " ON CONFLICT (device_id) DO NOTHING RETURNING device_id",
                    order,
                    [device_key(d) for d in order],
                    shard_id,
                )
                inserted = {r["device_id"] for r in rows}
            known = {
                r["device_id"]: (int(r["last_local_version"]), int(r["pattern_count"]))
                for r in await conn.fetch(
                    "SELECT device_id, last_local_version, pattern_count FROM devices"
                    " WHERE device_id = ANY($1::text[]) ORDER BY device_id"
                    + (" FOR UPDATE" if writes else ""),
                    ids,
                )
            }
            results: list[SyncOutcome | InvalidArgumentError | None] = []
            apply: list[ValidatedDelta] = []
            refused_new: list[str] = []
            for d in deltas:
                last, count = known.get(d.device_id, (0, 0))
                if d.local_version == 0 or d.local_version <= last:
                    duplicate = d.local_version > 0
                    results.append(
                        SyncOutcome(last, duplicate, count, global_version, model.version)
                    )
                    continue
                error = _refusal(d, last, model, max_version_step)
                if error is not None:
                    results.append(error)
                    if d.device_id in inserted:
                        refused_new.append(d.device_id)
                    continue
                results.append(None)
                apply.append(d)
            if refused_new:
                await conn.execute(
                    "DELETE FROM devices WHERE device_id = ANY($1::text[])", refused_new
                )
            stored: dict[str, int] = {}
            if apply:
                stored = await self._write_batch(
                    conn, apply, _float32(min_success_rate), global_version, now_ms
                )
        by_device = {d.device_id: d for d in apply}
        return [
            r
            if r is not None
            else SyncOutcome(
                by_device[d.device_id].local_version,
                False,
                stored[d.device_id],
                global_version,
                model.version,
            )
            for d, r in zip(deltas, results, strict=True)
        ]

    @staticmethod
    async def _write_batch(
        conn: asyncpg.Connection,
        deltas: Sequence[ValidatedDelta],
        threshold: float,
        global_version: int,
        now_ms: int,
    ) -> dict[str, int]:
        """The writes of `apply_batch` for accepted deltas; returns each device's pattern count.

        ``threshold`` is the quality threshold rounded to float32, as rates travel and are
        stored (a rate of exactly the threshold, 7/10 against 0.7, would otherwise count as
        below it).
        """
        updates = [(d, d.model_update) for d in deltas if d.model_update is not None]
        if updates:
            await conn.execute(
                "INSERT INTO model_updates (device_id, model_version, payload, stored_at_ms)"
                " SELECT d, v, p, $4 FROM unnest($1::text[], $2::bigint[], $3::bytea[])"
                " AS t(d, v, p) ORDER BY d"
                " ON CONFLICT (device_id) DO UPDATE SET"
                " model_version = EXCLUDED.model_version, payload = EXCLUDED.payload,"
                " stored_at_ms = EXCLUDED.stored_at_ms",
                [d.device_id for d, _ in updates],
                [u.model_version for _, u in updates],
                [u.payload for _, u in updates],
                now_ms,
            )
        keep: dict[tuple[str, str], tuple[ValidatedDelta, StoredPattern]] = {}
        changed: dict[tuple[str, str], tuple[ValidatedDelta, PatternStatsUpdate, int]] = {}
        drop: list[tuple[str, str]] = []
        views: dict[str, int] = {}
        for d in deltas:
            for p in d.upserts:  # a repeated pattern id: the last one wins, as applied in order
                if p.success_rate >= threshold:
                    keep[(d.device_id, p.pattern_id)] = (d, p)
                else:
                    drop.append((d.device_id, p.pattern_id))
            for u in d.updates:
                key = (d.device_id, u.pattern_id)
                if u.success_rate < threshold:
                    drop.append(key)
                    continue
                # Repeated updates of one pattern add their samples; the rest is the last's.
                earlier = changed.get(key)
                samples = u.additional_samples + (earlier[2] if earlier else 0)
                codes_from = u if u.codes is not None or earlier is None else earlier[1]
                merged = PatternStatsUpdate(
                    u.pattern_id,
                    u.success_rate,
                    samples,
                    codes_from.codes,
                    codes_from.scale,
                    u.updated_at_ms,
                )
                changed[key] = (d, merged, samples)
            drop.extend((d.device_id, r) for r in d.removed)
            for content_id, n in d.content_views:
                views[content_id] = views.get(content_id, 0) + n
        if keep:
            rows = list(keep.values())
            await conn.execute(
                "INSERT INTO device_patterns (device_id, pattern_id, embedding,"
                " embedding_scale, success_rate, sample_count, time_slot, day_type,"
                " content_type, genre_hints, version, created_at_ms, updated_at_ms,"
                " stored_at_ms)"
                " SELECT d, p, e, s, r, n, ts, dt, ct,"
                " ARRAY(SELECT jsonb_array_elements_text(g::jsonb)), v, ca, ua, $14"
                " FROM unnest($1::text[], $2::text[], $3::bytea[], $4::real[], $5::real[],"
                " $6::bigint[], $7::smallint[], $8::smallint[], $9::text[], $10::text[],"
                " $11::bigint[], $12::bigint[], $13::bigint[])"
                " AS t(d, p, e, s, r, n, ts, dt, ct, g, v, ca, ua)"
                " ON CONFLICT (device_id, pattern_id) DO UPDATE SET"
                " embedding = EXCLUDED.embedding, embedding_scale = EXCLUDED.embedding_scale,"
                " success_rate = EXCLUDED.success_rate, sample_count = EXCLUDED.sample_count,"
                " time_slot = EXCLUDED.time_slot, day_type = EXCLUDED.day_type,"
                " content_type = EXCLUDED.content_type, genre_hints = EXCLUDED.genre_hints,"
                " version = EXCLUDED.version, updated_at_ms = EXCLUDED.updated_at_ms,"
                " stored_at_ms = EXCLUDED.stored_at_ms",
                [d.device_id for d, _ in rows],
                [p.pattern_id for _, p in rows],
                [p.codes for _, p in rows],
                [p.scale for _, p in rows],
                [p.success_rate for _, p in rows],
                [p.sample_count for _, p in rows],
                [p.time_slot for _, p in rows],
                [p.day_type for _, p in rows],
                [p.content_type for _, p in rows],
                [json.dumps(p.genre_hints) for _, p in rows],
                [d.local_version for d, _ in rows],
                [p.created_at_ms for _, p in rows],
                [p.updated_at_ms for _, p in rows],
                now_ms,
            )
        if changed:
            # Updates to patterns this shard never stored (they were below the threshold)
            # match no row: the device sends the full pattern again when its embedding moves.
            ups = list(changed.values())
            await conn.execute(
                "UPDATE device_patterns AS p SET success_rate = u.r,"
                " sample_count = p.sample_count + u.n,"
                " embedding = COALESCE(u.e, p.embedding),"
                " embedding_scale = COALESCE(u.s, p.embedding_scale),"
                " version = u.v, updated_at_ms = u.ua, stored_at_ms = $9"
                " FROM unnest($1::text[], $2::text[], $3::real[], $4::bigint[], $5::bytea[],"
                " $6::real[], $7::bigint[], $8::bigint[]) AS u(d, pid, r, n, e, s, v, ua)"
                " WHERE p.device_id = u.d AND p.pattern_id = u.pid",
                [d.device_id for d, _, _ in ups],
                [u.pattern_id for _, u, _ in ups],
                [u.success_rate for _, u, _ in ups],
                [u.additional_samples for _, u, _ in ups],
                [u.codes for _, u, _ in ups],
                [u.scale for _, u, _ in ups],
                [d.local_version for d, _, _ in ups],
                [u.updated_at_ms for _, u, _ in ups],
                now_ms,
            )
        if drop:
            await conn.execute(
                "DELETE FROM device_patterns AS p USING unnest($1::text[], $2::text[])"
                " AS t(d, pid) WHERE p.device_id = t.d AND p.pattern_id = t.pid",
                [d for d, _ in drop],
                [pid for _, pid in drop],
            )
        if views:
            content = sorted(views)
            await conn.execute(
                "INSERT INTO content_views (content_id, round, views)"
                " SELECT c, $2, n FROM unnest($1::text[], $3::bigint[]) AS t(c, n) ORDER BY c"
                " ON CONFLICT (content_id, round) DO UPDATE"
                " SET views = content_views.views + EXCLUDED.views",
                content,
                global_version,
                [views[c] for c in content],
            )
        counts = await conn.fetch(
            "UPDATE devices AS d SET last_local_version = u.v, last_sync_at = now(),"
            " pattern_count = (SELECT count(*) FROM device_patterns AS p"
            " WHERE p.device_id = d.device_id)"
            " FROM unnest($1::text[], $2::bigint[]) AS u(id, v) WHERE d.device_id = u.id"
            " RETURNING d.device_id, d.pattern_count",
            [d.device_id for d in deltas],
            [d.local_version for d in deltas],
        )
        return {r["device_id"]: int(r["pattern_count"]) for r in counts}

    # ---- global patterns ---------------------------------------------------------------------

    @staticmethod
    async def _global_version(conn: asyncpg.Connection) -> int:
        value = await conn.fetchval("SELECT value FROM shard_state WHERE key = $1", _GLOBAL_VERSION)
        return int(value) if value is not None else 0

    async def forget_device(self, device_id: str) -> int | None:
        """Delete the device's row, patterns and model update in one transaction.

        Returns:
            The number of patterns deleted, or None when the shard held nothing for it.
        """
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT device_id FROM devices WHERE device_id = $1 FOR UPDATE", device_id
            )
            if row is None:
                return None
            patterns = await conn.fetchval(
                "SELECT count(*) FROM device_patterns WHERE device_id = $1", device_id
            )
            # device_patterns and model_updates reference devices ON DELETE CASCADE.
            await conn.execute("DELETE FROM devices WHERE device_id = $1", device_id)
        return int(patterns)

    async def global_version(self) -> int:
        """The last published federation round (0 before the first)."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            return await self._global_version(conn)

    async def load_global(
        self,
        *,
        per_sync: int | None = None,
        max_patterns: int | None = None,
        max_trending: int | None = None,
    ) -> tuple[int, list[GlobalPatternRow], list[TrendingRow]]:
        """(version, global patterns best quality first, trending best score first).

        Without bounds every row is loaded. With ``per_sync``, only the patterns some sync
        answer sends (see `omega_constellation.global_selection`), at most ``max_patterns``:
        keys and rounds are streamed best first from a server-side cursor and the scan stops
        as soon as no further pattern can be kept, then only the kept rows are fetched with
        their embeddings (``LIMIT``), so memory stays O(max_patterns). One snapshot.

        Args:
            per_sync: patterns one sync answer sends at most (``max_global_patterns_per_sync``).
            max_patterns: patterns kept at most, best quality first.
            max_trending: trending items kept at most, best score first (``LIMIT``).
        """
        async with (
            self._pool.acquire(timeout=self._timeout) as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            version = await self._global_version(conn)
            if per_sync is None and max_patterns is None:
                patterns = await conn.fetch(
                    "SELECT pattern_key, round, embedding, embedding_scale, quality,"
                    " success_rate, source_count, time_slot, day_type FROM global_patterns"
                    " ORDER BY quality DESC, pattern_key"
                )
            else:
                rounds = [
                    r["round"]
                    for r in await conn.fetch("SELECT DISTINCT round FROM global_patterns")
                ]
                selector = SyncAnswerFilter(
                    rounds, per_sync if per_sync is not None else 2**62, max_patterns
                )
                keys: list[str] = []
                if not selector.done:
                    async for r in conn.cursor(
                        "SELECT pattern_key, round FROM global_patterns"
                        " ORDER BY quality DESC, pattern_key",
                        prefetch=1000,
                    ):
                        if selector.offer(r["round"]):
                            keys.append(r["pattern_key"])
                        if selector.done:
                            break
                patterns = await conn.fetch(
                    "SELECT pattern_key, round, embedding, embedding_scale, quality,"
                    " success_rate, source_count, time_slot, day_type FROM global_patterns"
                    " WHERE pattern_key = ANY($1::text[]) ORDER BY quality DESC, pattern_key"
                    " LIMIT $2::bigint",
                    keys,
                    len(keys),
                )
            trending = await conn.fetch(
                "SELECT content_id, score FROM trending ORDER BY score DESC, content_id"
                " LIMIT $1::bigint",
                max_trending,
            )
        return (
            version,
            [
                GlobalPatternRow(
                    pattern_key=r["pattern_key"],
                    round=r["round"],
                    codes=bytes(r["embedding"]),
                    scale=r["embedding_scale"],
                    quality=r["quality"],
                    success_rate=r["success_rate"],
                    source_count=r["source_count"],
                    time_slot=r["time_slot"],
                    day_type=r["day_type"],
                )
                for r in patterns
            ],
            [TrendingRow(content_id=r["content_id"], score=r["score"]) for r in trending],
        )

    async def publish_round(
        self,
        published: ValidatedRound,
        *,
        epsilon: float,
        cumulative_epsilon: float,
        noise_multiplier: float = 0.0,
        max_round_step: int = 2**62,
    ) -> tuple[int, int, bool]:
        """Store a federation round once; returns (global version, patterns stored, duplicate).

        A round at or below the current global version is acknowledged without writing, so a
        worker re-running a crashed round cannot double-apply it. A round with model rows
        also makes them the new model version (= the round) in the same transaction: see
        `_publish_model`.

        Raises:
            InvalidArgumentError: the round is more than ``max_round_step`` past the current
                global version, or, on a shard without rounds yet, above `MAX_FIRST_ROUND`
                (nothing written).
        """
        round_id, patterns, trending = published.round, published.patterns, published.trending
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            await conn.execute("LOCK TABLE published_rounds IN EXCLUSIVE MODE")
            current = await self._global_version(conn)
            if round_id <= current:
                return current, 0, True
            if current == 0 and round_id > MAX_FIRST_ROUND:
                raise InvalidArgumentError(
                    f"round {round_id} is above {MAX_FIRST_ROUND}, the most a shard's first"
                    " round may be"
                )
            if current > 0 and round_id - current > max_round_step:
                # A shard that never had a round (new, or restored empty) takes the worker's
                # current round, however far the fleet is; after that, rounds step.
                raise InvalidArgumentError(
                    f"round {round_id} is more than {max_round_step} past the current version"
                    f" {current}"
                )
            if patterns:
                await conn.executemany(
                    "INSERT INTO global_patterns (pattern_key, round, embedding, embedding_scale,"
                    " quality, success_rate, source_count, time_slot, day_type)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                    " ON CONFLICT (pattern_key) DO UPDATE SET round = EXCLUDED.round,"
                    " embedding = EXCLUDED.embedding, embedding_scale = EXCLUDED.embedding_scale,"
                    " quality = EXCLUDED.quality, success_rate = EXCLUDED.success_rate,"
                    " source_count = EXCLUDED.source_count, time_slot = EXCLUDED.time_slot,"
                    " day_type = EXCLUDED.day_type, updated_at = now()",
                    [
                        (
                            p.pattern_key,
                            round_id,
                            p.codes,
                            p.scale,
                            p.quality,
                            p.success_rate,
                            p.source_count,
                            p.time_slot,
                            p.day_type,
                        )
                        for p in patterns
                    ],
                )
            await conn.execute("DELETE FROM trending")
            if trending:
                await conn.executemany(
                    "INSERT INTO trending (content_id, round, score) VALUES ($1, $2, $3)",
                    [(t.content_id, round_id, t.score) for t in trending],
                )
            await conn.execute(
                "INSERT INTO published_rounds (round, patterns, trending, epsilon,"
                " cumulative_epsilon, model_rows, model_factors, noise_multiplier)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                round_id,
                len(patterns),
                len(trending),
                epsilon,
                cumulative_epsilon,
                len(published.item_factors),
                published.factors,
                noise_multiplier,
            )
            if published.item_factors:
                await self._publish_model(conn, round_id, published)
            await self._set_state(conn, _GLOBAL_VERSION, str(round_id))
            return round_id, len(patterns), False

    async def _publish_model(
        self, conn: asyncpg.Connection, round_id: int, published: ValidatedRound
    ) -> None:
        """Upsert a round's model rows as model version ``round_id``.

        When the factor count changes, rows the round does not carry are of the old size: they
        are marked as left the model (NULL factor, changed in this version) so that no fetch
        mixes sizes. Model updates computed against older versions are deleted (consumed by
        this round or stale).
        """
        previous = await self._model_state(conn)
        await conn.executemany(
            "INSERT INTO item_factors (content_id, factor, factor_scale, model_version)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (content_id) DO UPDATE SET"
            " factor = EXCLUDED.factor, factor_scale = EXCLUDED.factor_scale,"
            " model_version = EXCLUDED.model_version",
            [(r.content_id, r.codes, r.scale, round_id) for r in published.item_factors],
        )
        if previous.factors and previous.factors != published.factors:
            await conn.execute(
                "UPDATE item_factors SET factor = NULL, factor_scale = NULL, model_version = $1"
                " WHERE model_version < $1 AND factor IS NOT NULL",
                round_id,
            )
        await conn.execute("DELETE FROM model_updates WHERE model_version < $1", round_id)
        await self._set_state(conn, _MODEL_VERSION, str(round_id))
        await self._set_state(conn, _MODEL_FACTORS, str(published.factors))

    # ---- item-factor model -------------------------------------------------------------------

    async def publish_model_snapshot(self, snapshot: ValidatedSnapshot) -> SnapshotOutcome:
        """Make the stored model exactly ``snapshot`` (the whole model at a newer version).

        One transaction, serialized with `publish_round`. Rows keep their own versions (so a
        new shard holds what the others do, version for version), except a row whose content
        differs from the stored one while its snapshot version is not above the shard's
        current model version: it gets the snapshot's version, so that every device of this
        shard (at most at the current version) fetches it. Rows the shard holds with a factor
        that the snapshot lacks leave the model (NULL factor, the snapshot's version). Device
        model updates computed against older versions are deleted, as a round's model does.

        Returns:
            The outcome; ``applied`` is False (nothing written) when the shard's model version
            is already at or above the snapshot's: a repeated snapshot is a no-op, and an
            older one never moves the model backwards.

        Raises:
            InvalidArgumentError: the snapshot's version is above the shard's global version
                (the worker publishes the round before the model; nothing written).
        """
        version, rows = snapshot.model_version, snapshot.item_factors
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            await conn.execute("LOCK TABLE published_rounds IN EXCLUSIVE MODE")
            held = await self._model_state(conn)
            if version <= held.version:
                return SnapshotOutcome(held.version, applied=False, rows_stored=0)
            global_version = await self._global_version(conn)
            if version > global_version:
                raise InvalidArgumentError(
                    f"model version {version} is above the shard's global version"
                    f" {global_version}: publish the round first"
                )
            ids = [r.content_id for r in rows]
            await conn.execute(
                "INSERT INTO item_factors (content_id, factor, factor_scale, model_version)"
                " SELECT * FROM unnest($1::text[], $2::bytea[], $3::real[], $4::bigint[])"
                " ON CONFLICT (content_id) DO UPDATE SET factor = EXCLUDED.factor,"
                " factor_scale = EXCLUDED.factor_scale, model_version = CASE"
                "  WHEN item_factors.factor IS NOT DISTINCT FROM EXCLUDED.factor"
                "   AND item_factors.factor_scale IS NOT DISTINCT FROM EXCLUDED.factor_scale"
                "   THEN GREATEST(item_factors.model_version, EXCLUDED.model_version)"
                "  WHEN EXCLUDED.model_version > $5 THEN EXCLUDED.model_version"
                "  ELSE $6 END",
                ids,
                [r.codes for r in rows],
                [r.scale for r in rows],
                [r.model_version for r in rows],
                held.version,
                version,
            )
            await conn.execute(
                "UPDATE item_factors f SET factor = NULL, factor_scale = NULL, model_version = $1"
                " WHERE f.factor IS NOT NULL AND NOT EXISTS"
                " (SELECT 1 FROM unnest($2::text[]) AS s(content_id)"
                "  WHERE s.content_id = f.content_id)",
                version,
                ids,
            )
            await conn.execute("DELETE FROM model_updates WHERE model_version < $1", version)
            await self._set_state(conn, _MODEL_VERSION, str(version))
            await self._set_state(conn, _MODEL_FACTORS, str(snapshot.factors))
        return SnapshotOutcome(version, applied=True, rows_stored=len(rows))

    @staticmethod
    async def _model_state(conn: asyncpg.Connection) -> ModelState:
        rows = await conn.fetch(
            "SELECT key, value FROM shard_state WHERE key = ANY($1::text[])",
            [_MODEL_VERSION, _MODEL_FACTORS],
        )
        values = {r["key"]: int(r["value"]) for r in rows}
        return ModelState(values.get(_MODEL_VERSION, 0), values.get(_MODEL_FACTORS, 0))

    async def model_state(self) -> ModelState:
        """The current model version (0 before the first) and its factor count."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            return await self._model_state(conn)

    async def load_model(self) -> tuple[ModelState, list[ItemFactorRecord]]:
        """(model state, every row of ``item_factors`` in content id order), one snapshot."""
        async with (
            self._pool.acquire(timeout=self._timeout) as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            state = await self._model_state(conn)
            rows = await conn.fetch(
                "SELECT content_id, factor, factor_scale, model_version FROM item_factors"
                " ORDER BY content_id"
            )
        return state, [
            ItemFactorRecord(
                content_id=r["content_id"],
                codes=None if r["factor"] is None else bytes(r["factor"]),
                scale=r["factor_scale"],
                model_version=r["model_version"],
            )
            for r in rows
        ]

    async def export_model_updates(
        self, *, batch_size: int, max_batch_bytes: int = 8 << 20
    ) -> AsyncIterator[list[ExportedUpdateRow]]:
        """Yield every stored model update (one per device), in batches.

        Rows come from a server-side cursor, so memory stays bounded; a batch ends at
        ``batch_size`` rows or once its payloads reach ``max_batch_bytes``.
        """
        async with (
            self._pool.acquire(timeout=self._timeout) as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            batch: list[ExportedUpdateRow] = []
            size = 0
            async for r in conn.cursor(
                "SELECT d.device_key, m.payload FROM model_updates m JOIN devices d"
                " USING (device_id) ORDER BY m.device_id",
                prefetch=max(min(batch_size, 1000), 100),
            ):
                row = ExportedUpdateRow(device_key=r["device_key"], payload=bytes(r["payload"]))
                batch.append(row)
                size += len(row.payload)
                if len(batch) >= batch_size or size >= max_batch_bytes:
                    yield batch
                    batch, size = [], 0
            if batch:
                yield batch

    @staticmethod
    async def _set_state(conn: asyncpg.Connection, key: str, value: str) -> None:
        await conn.execute(
            "INSERT INTO shard_state (key, value) VALUES ($1, $2)"
            " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            key,
            value,
        )

    # ---- federation export -------------------------------------------------------------------

    async def export_patterns(
        self,
        *,
        since_ms: int,
        until_ms: int,
        min_success_rate: float,
        batch_size: int,
    ) -> AsyncIterator[list[ExportRow]]:
        """Yield batches of patterns stored in (since_ms, until_ms] with enough success.

        Rows come from a server-side cursor (memory stays bounded) in device order: a
        device's patterns are consecutive, so the federation worker aggregates each batch at
        once, as whole devices (`omega_federation.aggregation.GroupAccumulator`).
        """
        async with (
            self._pool.acquire(timeout=self._timeout) as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            cursor = await conn.cursor(
                "SELECT d.device_key, p.pattern_id, p.embedding, p.embedding_scale,"
                " p.success_rate, p.sample_count, p.time_slot, p.day_type, p.content_type,"
                " p.genre_hints, p.created_at_ms, p.updated_at_ms, p.stored_at_ms"
                " FROM device_patterns p JOIN devices d USING (device_id)"
                # real against real: the threshold rounded as the stored rates are.
                " WHERE p.stored_at_ms > $1 AND p.stored_at_ms <= $2"
                " AND p.success_rate >= $3::real"
                " ORDER BY p.device_id, p.pattern_id",
                since_ms,
                until_ms,
                min_success_rate,
            )
            while rows := await cursor.fetch(batch_size):
                yield [_export_row(r) for r in rows]

    async def content_views_since(self, round_id: int) -> list[tuple[str, int]]:
        """Summed view counts per content for rounds >= ``round_id``."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(
                "SELECT content_id, sum(views)::bigint AS views FROM content_views"
                " WHERE round >= $1 GROUP BY content_id ORDER BY content_id",
                round_id,
            )
        return [(r["content_id"], int(r["views"])) for r in rows]

    # ---- catalog -----------------------------------------------------------------------------

    async def catalog_digest(self) -> str | None:
        """Digest of the catalog file last loaded (None when no catalog was loaded)."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            value: str | None = await conn.fetchval(
                "SELECT value FROM shard_state WHERE key = $1", _CATALOG_DIGEST
            )
            return value

    async def replace_catalog(self, rows: Sequence[CatalogRow], digest: str) -> int:
        """Upsert catalog items under a new catalog version; returns that version."""
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            current = await conn.fetchval(
                "SELECT value FROM shard_state WHERE key = $1", _CATALOG_VERSION
            )
            version = int(current or 0) + 1
            await conn.executemany(
                "INSERT INTO content_embeddings (content_id, title, genres, embedding,"
                " embedding_scale, catalog_version) VALUES ($1, $2, $3, $4, $5, $6)"
                " ON CONFLICT (content_id) DO UPDATE SET title = EXCLUDED.title,"
                " genres = EXCLUDED.genres, embedding = EXCLUDED.embedding,"
                " embedding_scale = EXCLUDED.embedding_scale,"
                " catalog_version = EXCLUDED.catalog_version"
                " WHERE (content_embeddings.title, content_embeddings.genres,"
                " content_embeddings.embedding) IS DISTINCT FROM"
                " (EXCLUDED.title, EXCLUDED.genres, EXCLUDED.embedding)",
                [(r.content_id, r.title, r.genres, r.codes, r.scale, version) for r in rows],
            )
            await self._set_state(conn, _CATALOG_VERSION, str(version))
            await self._set_state(conn, _CATALOG_DIGEST, digest)
            return version

    async def load_catalog(self) -> tuple[int, list[CatalogRow]]:
        """(catalog version, every item sorted by content id)."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            version = await conn.fetchval(
                "SELECT value FROM shard_state WHERE key = $1", _CATALOG_VERSION
            )
            rows = await conn.fetch(
                "SELECT content_id, title, genres, embedding, embedding_scale, catalog_version"
                " FROM content_embeddings ORDER BY content_id"
            )
        return int(version or 0), [
            CatalogRow(
                content_id=r["content_id"],
                title=r["title"],
                genres=list(r["genres"]),
                codes=bytes(r["embedding"]),
                scale=r["embedding_scale"],
                catalog_version=r["catalog_version"],
            )
            for r in rows
        ]


async def _no_session_state(conn: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing to reset.

    The shard never changes session state (no SET, LISTEN, advisory lock or cursor outside a
    transaction), so asyncpg's default reset query (``pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL``), a round trip on every release, is skipped; asyncpg still rolls
    back a transaction left open before calling this.
    """


def _refusal(
    delta: ValidatedDelta, last: int, model: ModelState, max_version_step: int | None
) -> InvalidArgumentError | None:
    """Why a delta ahead of the device's last version must not be applied, else None."""
    if max_version_step is not None and delta.local_version - last > max_version_step:
        return InvalidArgumentError(
            f"local_version {delta.local_version} is more than {max_version_step} ahead"
            f" of the last applied version {last}"
        )
    update = delta.model_update
    # Authoritative re-check of the converter's: another replica may have published a model
    # since this one cached its version.
    if (
        update is not None
        and update.direction_dim is not None
        and update.model_version == model.version
        and update.direction_dim != model.factors
    ):
        return InvalidArgumentError(
            f"model_update.direction: {update.direction_dim} factors, the model has {model.factors}"
        )
    return None


def _float32(value: float) -> float:
    """``value`` rounded to the nearest float32 (the wire and column type of success rates)."""
    rounded: float = struct.unpack("<f", struct.pack("<f", value))[0]
    return rounded


def _export_row(r: Any) -> ExportRow:
    return ExportRow(
        device_key=r["device_key"],
        pattern=StoredPattern(
            pattern_id=r["pattern_id"],
            codes=bytes(r["embedding"]),
            scale=r["embedding_scale"],
            success_rate=r["success_rate"],
            sample_count=r["sample_count"],
            time_slot=r["time_slot"],
            day_type=r["day_type"],
            content_type=r["content_type"],
            genre_hints=list(r["genre_hints"]),
            created_at_ms=r["created_at_ms"],
            updated_at_ms=r["updated_at_ms"],
        ),
        stored_at_ms=r["stored_at_ms"],
    )
