"""Group commit over a real Postgres: a batch applies exactly what the same deltas applied one
by one would, refuses per delta, and the committer coalesces, orders, bounds and isolates."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence

import asyncpg
import pytest

from omega_common.errors import InvalidArgumentError, ResourceExhaustedError
from omega_constellation.converters import (
    ModelUpdateRecord,
    PatternStatsUpdate,
    StoredPattern,
    ValidatedDelta,
)
from omega_constellation.group_commit import GroupCommitter
from omega_constellation.store import ShardStore, SyncOutcome

pytestmark = pytest.mark.integration

NOW = 1_795_300_000_000
RULES = {"shard_id": "shard-0", "min_success_rate": 0.3, "now_ms": NOW, "max_version_step": 50}


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[ShardStore]:
    s = await ShardStore.open(database_url)
    yield s
    await s.close()


def pattern(rng: random.Random, pid: str) -> StoredPattern:
    codes = bytes(rng.randrange(256) for _ in range(384))
    return StoredPattern(
        pattern_id=pid,
        codes=codes,
        scale=rng.uniform(0.001, 0.01),
        success_rate=rng.choice([0.1, 0.5, 0.9, 1.0]),
        sample_count=rng.randrange(1, 20),
        time_slot=rng.randrange(1, 5),
        day_type=rng.randrange(1, 3),
        content_type=rng.choice(["", "movie"]),
        genre_hints=rng.sample(["Drama", "Comedy", 'Sci "Fi"', "{x,y}"], rng.randrange(0, 3)),
        created_at_ms=NOW - 1000,
        updated_at_ms=NOW,
    )


def random_delta(rng: random.Random, device: str, version: int) -> ValidatedDelta:
    """Upserts (a repeated id included), updates (repeated, some with embeddings, some of
    unknown patterns, some below the threshold), removals and view counts."""
    pids = [f"p{i}" for i in range(4)]
    upserts = [pattern(rng, rng.choice(pids)) for _ in range(rng.randrange(0, 3))]
    updates = [
        PatternStatsUpdate(
            pattern_id=rng.choice(pids),
            success_rate=rng.choice([0.2, 0.6, 0.95]),
            additional_samples=rng.randrange(0, 5),
            codes=bytes(rng.randrange(256) for _ in range(384)) if rng.random() < 0.3 else None,
            scale=0.005 if rng.random() < 0.3 else None,
            updated_at_ms=NOW + version,
        )
        for _ in range(rng.randrange(0, 3))
    ]
    updates = [
        u
        if (u.codes is None) == (u.scale is None)
        else PatternStatsUpdate(
            u.pattern_id, u.success_rate, u.additional_samples, None, None, u.updated_at_ms
        )
        for u in updates
    ]
    removed = rng.sample(pids, rng.randrange(0, 2))
    views = [(f"c{rng.randrange(10):04d}", rng.randrange(1, 4)) for _ in range(rng.randrange(0, 4))]
    merged: dict[str, int] = {}
    for c, n in views:
        merged[c] = merged.get(c, 0) + n
    update = None
    if rng.random() < 0.3:
        update = ModelUpdateRecord(model_version=0, direction_dim=None, payload=b"\x01\x02")
    return ValidatedDelta(
        device_id=device,
        local_version=version,
        since_global_version=0,
        upserts=upserts,
        updates=updates,
        removed=removed,
        content_views=sorted(merged.items()),
        model_update=update,
    )


async def snapshot(dsn: str) -> dict[str, list[tuple[object, ...]]]:
    conn = await asyncpg.connect(dsn)
    try:
        return {
            "devices": [
                tuple(r)
                for r in await conn.fetch(
                    "SELECT device_id, device_key, last_local_version, pattern_count"
                    " FROM devices ORDER BY 1"
                )
            ],
            "patterns": [
                tuple(r)
                for r in await conn.fetch(
                    "SELECT device_id, pattern_id, embedding, embedding_scale, success_rate,"
                    " sample_count, time_slot, day_type, content_type, genre_hints, version,"
                    " created_at_ms, updated_at_ms, stored_at_ms FROM device_patterns ORDER BY 1, 2"
                )
            ],
            "views": [
                tuple(r) for r in await conn.fetch("SELECT * FROM content_views ORDER BY 1, 2")
            ],
            "updates": [
                tuple(r)
                for r in await conn.fetch(
                    "SELECT device_id, model_version, payload FROM model_updates ORDER BY 1"
                )
            ],
        }
    finally:
        await conn.close()


async def test_a_batch_applies_what_the_deltas_applied_one_by_one_would(
    make_database: object,
) -> None:
    rng = random.Random(11)
    devices = [f"tv-{i}" for i in range(12)]
    rounds = [
        [random_delta(rng, d, v) for d in rng.sample(devices, rng.randrange(3, 12))]
        for v in range(1, 7)
    ]
    dsns = [await make_database(), await make_database()]  # type: ignore[operator]
    one, batched = await ShardStore.open(dsns[0]), await ShardStore.open(dsns[1])
    try:
        for deltas in rounds:
            alone = [await one.apply_delta(d, **RULES) for d in deltas]  # type: ignore[arg-type]
            together = await batched.apply_batch(deltas, **RULES)  # type: ignore[arg-type]
            assert together == alone
        assert await snapshot(dsns[1]) == await snapshot(dsns[0])
        state = await snapshot(dsns[1])
        assert state["patterns"] and state["views"] and state["updates"]  # every path ran
        # Again: every delta is now a duplicate and nothing changes.
        again = await batched.apply_batch(rounds[-1], **RULES)  # type: ignore[arg-type]
        assert all(isinstance(o, SyncOutcome) and o.duplicate for o in again)
        assert await snapshot(dsns[1]) == state
    finally:
        await one.close()
        await batched.close()


async def test_a_refused_delta_writes_nothing_and_the_rest_of_its_batch_lands(
    store: ShardStore, database_url: str
) -> None:
    rng = random.Random(3)
    ok = random_delta(rng, "tv-ok", 1)
    too_far = random_delta(rng, "tv-new", 10_000)  # a new device jumping 10,000 versions
    results = await store.apply_batch([too_far, ok], **RULES)  # type: ignore[arg-type]
    assert isinstance(results[0], InvalidArgumentError)
    assert "more than 50 ahead" in str(results[0])
    assert isinstance(results[1], SyncOutcome) and results[1].acknowledged_version == 1
    state = await snapshot(database_url)
    assert [d[0] for d in state["devices"]] == ["tv-ok"]  # not even tv-new's row
    assert all(p[0] == "tv-ok" for p in state["patterns"])
    with pytest.raises(ValueError, match="one delta per device"):
        await store.apply_batch([ok, ok], **RULES)  # type: ignore[arg-type]


async def test_committer_coalesces_concurrent_syncs_and_keeps_each_device_in_order(
    store: ShardStore, database_url: str
) -> None:
    batches: list[list[tuple[str, int]]] = []

    async def apply(deltas: Sequence[ValidatedDelta]) -> list[SyncOutcome | InvalidArgumentError]:
        batches.append([(d.device_id, d.local_version) for d in deltas])
        return await store.apply_batch(deltas, **RULES)  # type: ignore[arg-type]

    committer = GroupCommitter(apply, max_batch=64, max_concurrent_batches=1)
    rng = random.Random(5)
    deltas = [random_delta(rng, f"tv-{i % 20}", i // 20 + 1) for i in range(200)]
    try:
        outcomes = await asyncio.gather(*(committer.submit(d) for d in deltas))
    finally:
        await committer.close()
    assert all(not o.duplicate for o in outcomes)  # every version applied, none out of order
    assert len(batches) < len(deltas) / 4  # coalesced
    assert max(len(b) for b in batches) <= 20  # one delta per device per batch
    for b in batches:
        assert len({d for d, _ in b}) == len(b)
    seen: dict[str, int] = {}
    for b in batches:
        for device, version in b:
            assert version == seen.get(device, 0) + 1  # each device's versions in order
            seen[device] = version
    state = await snapshot(database_url)
    assert {d[0]: d[2] for d in state["devices"]} == {f"tv-{i}": 10 for i in range(20)}


def outcome(d: ValidatedDelta) -> SyncOutcome:
    return SyncOutcome(d.local_version, False, 0, 0)


async def test_committer_refuses_past_its_queue_bound_with_a_retry_hint() -> None:
    release = asyncio.Event()

    async def stuck(deltas: Sequence[ValidatedDelta]) -> list[SyncOutcome | InvalidArgumentError]:
        await release.wait()
        return [outcome(d) for d in deltas]

    committer = GroupCommitter(stuck, max_pending=2, max_concurrent_batches=1)
    rng = random.Random(1)
    first = asyncio.ensure_future(committer.submit(random_delta(rng, "tv-0", 1)))
    await asyncio.sleep(0.01)  # tv-0's batch is running (stuck)
    queued = [
        asyncio.ensure_future(committer.submit(random_delta(rng, f"tv-{i}", 1))) for i in (1, 2)
    ]
    await asyncio.sleep(0.01)
    with pytest.raises(ResourceExhaustedError) as err:
        await committer.submit(random_delta(rng, "tv-3", 1))
    assert err.value.retry_after_seconds > 0
    release.set()
    assert [o.acknowledged_version for o in await asyncio.gather(first, *queued)] == [1, 1, 1]
    await committer.close()


async def test_a_slow_batch_does_not_hold_the_others_hostage() -> None:
    release = asyncio.Event()

    async def apply(deltas: Sequence[ValidatedDelta]) -> list[SyncOutcome | InvalidArgumentError]:
        if any(d.device_id == "tv-slow" for d in deltas):
            await release.wait()  # a batch waiting on a row lock
        return [outcome(d) for d in deltas]

    committer = GroupCommitter(apply, max_concurrent_batches=2, slow_batch_seconds=0.05)
    rng = random.Random(2)
    slow = asyncio.ensure_future(committer.submit(random_delta(rng, "tv-slow", 1)))
    await asyncio.sleep(0.01)
    fast = await asyncio.wait_for(committer.submit(random_delta(rng, "tv-fast", 1)), 2.0)
    assert fast.acknowledged_version == 1 and not slow.done()
    # Both slots taken (the slow one and none free): the slow device's next delta waits
    # for its running batch, the others keep flowing.
    later = asyncio.ensure_future(committer.submit(random_delta(rng, "tv-slow", 2)))
    other = await asyncio.wait_for(committer.submit(random_delta(rng, "tv-other", 1)), 2.0)
    assert other.acknowledged_version == 1 and not later.done()
    release.set()
    assert (await slow).acknowledged_version == 1 and (await later).acknowledged_version == 2
    await committer.close()


async def test_a_failed_batch_fails_each_of_its_syncs_and_the_next_batch_runs() -> None:
    fail = [True]

    async def apply(deltas: Sequence[ValidatedDelta]) -> list[SyncOutcome | InvalidArgumentError]:
        if fail[0]:
            fail[0] = False
            raise OSError("connection refused")
        return [outcome(d) for d in deltas]

    committer = GroupCommitter(apply, max_concurrent_batches=1)
    rng = random.Random(4)
    with pytest.raises(OSError):
        await committer.submit(random_delta(rng, "tv-0", 1))
    assert (await committer.submit(random_delta(rng, "tv-0", 1))).acknowledged_version == 1
    await committer.close()
    with pytest.raises(RuntimeError, match="closed"):
        await committer.submit(random_delta(rng, "tv-0", 2))


async def test_repeated_ids_in_one_delta_apply_in_order(
    store: ShardStore, database_url: str
) -> None:
    rng = random.Random(9)
    first, last = pattern(rng, "p0"), pattern(rng, "p0")
    first = StoredPattern(**{**_fields(first), "success_rate": 0.9, "sample_count": 5})
    last = StoredPattern(**{**_fields(last), "success_rate": 0.9, "sample_count": 7})
    base = ValidatedDelta("tv", 1, 0, [first, last], [], [], [("c0001", 2), ("c0001", 3)])
    await store.apply_delta(base, **RULES)  # type: ignore[arg-type]
    codes = bytes(range(128)) * 3
    updates = [
        PatternStatsUpdate("p0", 0.8, 2, codes, 0.004, NOW + 1),
        PatternStatsUpdate("p0", 0.7, 3, None, None, NOW + 2),
    ]
    await store.apply_delta(ValidatedDelta("tv", 2, 0, [], updates, [], []), **RULES)  # type: ignore[arg-type]
    [row] = (await snapshot(database_url))["patterns"]
    # The last upsert wins; the updates add 2 + 3 samples; the embedding of the first update
    # stays (the second keeps it); the rate and time are the last update's.
    assert row[2] == codes and row[3] == pytest.approx(0.004)
    assert (row[4], row[5], row[12]) == (pytest.approx(0.7), 7 + 5, NOW + 2)
    assert (await snapshot(database_url))["views"] == [("c0001", 0, 5)]


def _fields(p: StoredPattern) -> dict[str, object]:
    return {f: getattr(p, f) for f in StoredPattern.__slots__}  # type: ignore[attr-defined]
