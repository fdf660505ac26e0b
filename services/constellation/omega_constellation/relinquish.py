"""Delete the rows of devices a shard no longer owns, after shards were added or removed.

Devices belong to the shard `omega_protocol.shard_for` names over the shard ids. After the
map changes, a shard's replicas redirect the devices that moved, and the brain, redirected,
re-sends everything it holds to its new shard; the old shard keeps their rows until this
runs (``omega-constellation relinquish-moved``, deploy/OPERATIONS.md "Adding a shard"). Left
there, they would be data kept without purpose about devices that are served elsewhere.

The scan is keyset-paginated over ``devices`` in device id order, ``batch_size`` ids at a time,
each batch deleted in its own transaction (``device_patterns`` and ``model_updates`` follow by
``ON DELETE CASCADE``), so it holds no long transaction and can be interrupted and run again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from omega_protocol import shard_for

__all__ = ["RelinquishReport", "relinquish_moved_devices"]


@dataclass
class RelinquishReport:
    """What a run found and deleted.

    Attributes:
        scanned: devices looked at.
        moved: devices that belong to another shard (deleted unless ``dry_run``).
        patterns: their patterns (deleted with them unless ``dry_run``).
        by_owner: moved devices per owning shard id.
        dry_run: nothing was deleted.
    """

    scanned: int = 0
    moved: int = 0
    patterns: int = 0
    by_owner: dict[str, int] = field(default_factory=dict)
    dry_run: bool = False


async def relinquish_moved_devices(
    conn: asyncpg.Connection,
    shard_id: str,
    shard_ids: Sequence[str],
    *,
    batch_size: int = 1000,
    dry_run: bool = False,
) -> RelinquishReport:
    """Delete every device of this shard's database that ``shard_for`` gives to another shard.

    Run it once every replica of every shard serves the new map (a replica still on the old
    map could accept a moved device's sync meanwhile; the next run removes that too).

    Args:
        conn: a connection to the shard's database (schema migrated).
        shard_id: this shard's id.
        shard_ids: the current shard ids (the map the replicas serve).
        batch_size: device ids per scan step and delete transaction, >= 1.
        dry_run: count, delete nothing.

    Returns:
        What was found and (unless ``dry_run``) deleted.

    Raises:
        ValueError: ``shard_id`` not in ``shard_ids`` (a wrong map would delete everything),
            or ``batch_size`` < 1.
        asyncpg.PostgresError, OSError: the database failed; batches already committed stay
            deleted, the rest is untouched (run again).
    """
    if shard_id not in shard_ids:
        raise ValueError(f"shard {shard_id!r} is not in the shard ids {list(shard_ids)}")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    report = RelinquishReport(dry_run=dry_run)
    after = ""
    while True:
        ids = [
            r["device_id"]
            for r in await conn.fetch(
                "SELECT device_id FROM devices WHERE device_id > $1 ORDER BY device_id LIMIT $2",
                after,
                batch_size,
            )
        ]
        if not ids:
            return report
        after = ids[-1]
        report.scanned += len(ids)
        owners = {d: shard_for(d, shard_ids) for d in ids}
        moved = [d for d, owner in owners.items() if owner != shard_id]
        if not moved:
            continue
        async with conn.transaction():
            report.patterns += int(
                await conn.fetchval(
                    "SELECT count(*) FROM device_patterns WHERE device_id = ANY($1::text[])",
                    moved,
                )
            )
            if not dry_run:
                await conn.execute("DELETE FROM devices WHERE device_id = ANY($1::text[])", moved)
        report.moved += len(moved)
        for d in moved:
            report.by_owner[owners[d]] = report.by_owner.get(owners[d], 0) + 1
