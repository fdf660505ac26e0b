"""The worker's own Postgres state: round checkpoints, the codebook, the round lock."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import asyncpg

from omega_common.db import apply_migrations, load_migrations

__all__ = ["ROUND_LOCK_KEY", "RoundRecord", "ShardMark", "WorkerState"]

ROUND_LOCK_KEY = 0x0E6A_F0ED
"""pg_advisory_lock key held for the duration of a round."""


@dataclass(frozen=True, slots=True)
class ShardMark:
    """How far a shard has been exported."""

    watermark_ms: int = 0
    views_round: int = 0


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """One checkpointed round."""

    round_id: int
    status: str
    marks: dict[str, ShardMark]
    payload: bytes
    privacy: dict[str, Any]
    figures: dict[str, Any]
    model: dict[str, Any]


class WorkerState:
    """Data access over the worker's database; one connection, held while the lock is held."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    @classmethod
    async def open(cls, dsn: str) -> WorkerState:
        """Connect and apply migrations."""
        conn = await asyncpg.connect(dsn)
        await apply_migrations(conn, load_migrations("omega_federation"))
        await conn.set_type_codec("jsonb", encoder=_dumps, decoder=json.loads, schema="pg_catalog")
        return cls(conn)

    async def close(self) -> None:
        """Close the connection (which also releases the round lock)."""
        await self._conn.close()

    async def try_lock(self) -> bool:
        """Take the round lock (session level) if no other worker holds it."""
        return bool(await self._conn.fetchval("SELECT pg_try_advisory_lock($1)", ROUND_LOCK_KEY))

    async def unlock(self) -> None:
        """Release the round lock taken by `try_lock`."""
        await self._conn.execute("SELECT pg_advisory_unlock($1)", ROUND_LOCK_KEY)

    async def latest(self) -> RoundRecord | None:
        """The highest round, whatever its status."""
        row = await self._conn.fetchrow(
            "SELECT round_id, status, watermarks, payload, privacy, figures, model"
            " FROM federation_rounds ORDER BY round_id DESC LIMIT 1"
        )
        return None if row is None else _record(row)

    async def latest_published(self) -> RoundRecord | None:
        """The highest round that reached every shard, or None."""
        row = await self._conn.fetchrow(
            "SELECT round_id, status, watermarks, payload, privacy, figures, model"
            " FROM federation_rounds WHERE status = 'published' ORDER BY round_id DESC LIMIT 1"
        )
        return None if row is None else _record(row)

    async def save_aggregated(
        self,
        round_id: int,
        marks: dict[str, ShardMark],
        payload: bytes,
        privacy: dict[str, Any],
        figures: dict[str, Any],
        model: dict[str, Any] | None = None,
    ) -> None:
        """Checkpoint a computed round before publishing it (``model``: `ModelState` dict)."""
        await self._conn.execute(
            "INSERT INTO federation_rounds (round_id, status, watermarks, payload, privacy,"
            " figures, model, started_at) VALUES ($1, 'aggregated', $2, $3, $4, $5, $6, now())",
            round_id,
            {
                k: {"watermark_ms": m.watermark_ms, "views_round": m.views_round}
                for k, m in marks.items()
            },
            payload,
            privacy,
            figures,
            model or {},
        )

    async def mark_published(self, round_id: int, figures: dict[str, Any]) -> None:
        """Record that round ``round_id`` reached every shard, with its final figures."""
        await self._conn.execute(
            "UPDATE federation_rounds SET status = 'published', figures = $2, finished_at = now()"
            " WHERE round_id = $1",
            round_id,
            figures,
        )

    async def codebook(self) -> bytes | None:
        """The newest serialized `Codebook`, or None before the first round."""
        value: bytes | None = await self._conn.fetchval(
            "SELECT data FROM codebooks ORDER BY codebook_id DESC LIMIT 1"
        )
        return value

    async def save_codebook(self, data: bytes) -> None:
        """Store a serialized `Codebook`; it becomes the one `codebook` returns."""
        await self._conn.execute("INSERT INTO codebooks (data) VALUES ($1)", data)


def _finite(value: Any) -> Any:
    """JSON has no Infinity/NaN: write them as strings (``float("Infinity")`` reads them back)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value).replace("inf", "Infinity")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    return json.dumps(_finite(value), allow_nan=False)


def _record(row: Any) -> RoundRecord:
    marks = {
        shard: ShardMark(int(m["watermark_ms"]), int(m["views_round"]))
        for shard, m in row["watermarks"].items()
    }
    return RoundRecord(
        round_id=row["round_id"],
        status=row["status"],
        marks=marks,
        payload=bytes(row["payload"]),
        privacy=row["privacy"],
        figures=row["figures"],
        model=row["model"],
    )
