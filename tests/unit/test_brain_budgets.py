"""Memory and disk budgets of the brain: validation, compaction of old events (learning and
ranking unchanged), the ``history`` table of stores that predate it, and the caps on global
patterns and trending items."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from omega.v1 import patterns_pb2
from omega_brain import Brain, BrainConfig, CatalogIndex, ViewingEvent
from omega_brain.collaborative import InteractionWeights
from omega_brain.model import build_model_update, device_preferences
from omega_brain.store import GlobalPatternRow, HistoryRow, Store
from omega_protocol import decode_payload
from tests.unit.test_brain_model import EVENING, MORNING, TS, ModelShard, make_catalog, planted_rows

# Repeats, abandoned and half-watched viewings, in two buckets: 40 events over 15 items.
HISTORY = [
    (item, when, completion)
    for n in range(40)
    for item, when, completion in [
        (
            (n * 7) % 15 + (0 if n % 3 else 40),
            EVENING if n % 2 else MORNING,
            (0.95, 0.5, 0.1, 0.85)[n % 4],
        )
    ]
]


@pytest.fixture(scope="module")
def catalog() -> CatalogIndex:
    ids, x = make_catalog()
    return CatalogIndex(ids, x)


def _config(path: Path, **overrides: object) -> BrainConfig:
    return BrainConfig(
        store_path=path,
        base_backoff_seconds=0.0,
        max_backoff_seconds=0.0,
        model_context_weight=0.5,
        **overrides,  # type: ignore[arg-type]
    )


def _replay(brain: Brain) -> None:
    for item, when, completion in HISTORY:
        brain.observe(ViewingEvent(f"item-{item}", when, completion, 600.0))


def _stored_events(path: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT local_version, content_id FROM events ORDER BY id")
        return [(int(v), str(c)) for v, c in rows]


def _model_updates(shard: ModelShard) -> list[bytes]:
    out = []
    for request in shard.requests:
        delta = decode_payload(request.delta, patterns_pb2.PatternDelta)
        out.append(delta.model_update.SerializeToString(deterministic=True))
    return out


def _rankings(brain: Brain) -> list[object]:
    return [
        brain.recommend(10, timestamp_ms=when, use_global=use_global)
        for when in (EVENING, MORNING, TS)
        for use_global in (True, False)
    ]


# ------------------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_events_kept": 0},
        {"max_events_kept": -5},
        {"max_events_kept": 1.5},
        {"max_events_kept": True},
        {"max_global_patterns": 0},
        {"max_trending_items": 0},
        {"max_trending_items": "10"},
        {"encryption_key": b"short"},
        {"encryption_key": "00" * 32},
        {"encryption_key": bytearray(32)},
    ],
)
def test_budgets_are_validated(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(overrides))):
        BrainConfig(**overrides)  # type: ignore[arg-type]


def test_budget_defaults() -> None:
    config = BrainConfig()
    assert config.max_events_kept == 20_000
    assert config.max_global_patterns == 4096
    assert config.max_trending_items == 2000
    assert config.encryption_key is None


# ------------------------------------------------------------------------------ compaction


def test_old_events_are_compacted_in_the_observe_transaction(
    tmp_path: Path, catalog: CatalogIndex
) -> None:
    path = tmp_path / "brain.db"
    with Brain("tv", _config(path, max_events_kept=5), catalog=catalog) as brain:
        for n in range(12):
            brain.observe(ViewingEvent(f"item-{n}", TS, 0.9, 60.0))
            assert brain.stats().events_observed == min(n + 1, 5)
        assert brain.stats().watched_count == 12  # the watched set survives compaction
        assert brain.stats().local_version == 12
    assert _stored_events(path) == [(v, f"item-{v - 1}") for v in range(8, 13)]
    with Brain("tv", _config(path, max_events_kept=5), catalog=catalog) as reopened:
        assert reopened.stats().watched_count == 12
        recs = reopened.recommend(20, timestamp_ms=TS)
        assert not {r.content_id for r in recs} & {f"item-{n}" for n in range(12)}


@pytest.mark.parametrize("budget", [100, 6, 1])
def test_compaction_changes_neither_ranking_nor_model_update(
    tmp_path: Path, catalog: CatalogIndex, budget: int
) -> None:
    """A history that fits the budget (100) and two that do not: the compacted brain ranks,
    steers and contributes to the model exactly as the one that kept every event."""
    shards = [ModelShard(), ModelShard()]
    for shard in shards:
        shard.publish(1, planted_rows(1))
    full = Brain("tv", _config(tmp_path / "full.db"), transport=shards[0], catalog=catalog)
    small_path = tmp_path / "small.db"
    small_cfg = _config(small_path, max_events_kept=budget)
    small = Brain("tv", small_cfg, transport=shards[1], catalog=catalog)
    with full, small:
        _replay(full)
        _replay(small)
        assert small.stats().events_observed == min(budget, len(HISTORY))
        assert full.stats().events_observed == len(HISTORY)
        assert _rankings(small) == _rankings(full)  # no model yet: patterns and trends
        for brain in (full, small):
            assert brain.sync().model_version == 1
            assert brain.sync().ok  # the update with the model's direction
        assert _model_updates(shards[1]) == _model_updates(shards[0])
        assert any(_model_updates(shards[0]))
        assert _rankings(small) == _rankings(full)
        expected = _rankings(full)
        # The preferences are those of the raw viewings (the model module's definition).
        raw = [(f"item-{item}", completion) for item, _, completion in HISTORY]
        reference = device_preferences(raw, catalog, InteractionWeights())
        prefs = small._ctx.preferences()
        assert prefs is not None
        assert np.array_equal(prefs.items, reference.items)
        assert np.array_equal(prefs.p, reference.p)
        assert (prefs.success_rate, prefs.samples) == (reference.success_rate, reference.samples)
        update = build_model_update(prefs, catalog, small._ctx.aligned_model(), 1)
        ref_update = build_model_update(reference, catalog, small._ctx.aligned_model(), 1)
        assert update == ref_update
    with Brain("tv", small_cfg, transport=shards[1], catalog=catalog) as reopened:
        assert _rankings(reopened) == expected


def test_compaction_beyond_the_budget_keeps_learning(tmp_path: Path, catalog: CatalogIndex) -> None:
    """Far past the budget: the store stays at the budget, new viewings still count."""
    with Brain("tv", _config(tmp_path / "b.db", max_events_kept=3), catalog=catalog) as brain:
        for n in range(200):
            brain.observe(ViewingEvent(f"item-{n % 50}", TS, 0.9, 60.0))
        stats = brain.stats()
        assert (stats.events_observed, stats.watched_count, stats.local_version) == (3, 50, 200)
        prefs = brain._ctx.preferences()
        assert prefs is not None and prefs.samples == 200 and prefs.items.size == 50
        brain.observe(ViewingEvent("item-300", TS, 0.9, 60.0))
        assert "item-300" not in {r.content_id for r in brain.recommend(50, timestamp_ms=TS)}


def test_forget_erases_the_history(tmp_path: Path, catalog: CatalogIndex) -> None:
    path = tmp_path / "f.db"
    with Brain("tv", _config(path, max_events_kept=2), catalog=catalog) as brain:
        _replay(brain)
        brain.forget()
        assert brain.stats().watched_count == 0
    store = Store(path, "tv")
    try:
        assert store.history() == [] and store.event_count() == 0
    finally:
        store.close()


def test_a_store_without_history_gains_it_from_its_events(tmp_path: Path) -> None:
    """A store written before ``history`` existed: the table is filled from the events."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE events (id INTEGER PRIMARY KEY, content_id TEXT NOT NULL,"
            " started_at_ms INTEGER NOT NULL, completion REAL NOT NULL,"
            " watch_seconds REAL NOT NULL, bucket INTEGER NOT NULL, outcome INTEGER NOT NULL,"
            " local_version INTEGER NOT NULL)"
        )
        conn.executemany(
            "INSERT INTO events (content_id, started_at_ms, completion, watch_seconds, bucket,"
            " outcome, local_version) VALUES (?, 0, ?, 60, ?, ?, ?)",
            [("a", 0.9, 2, 1, 1), ("a", 0.5, 2, 0, 2), ("b", 0.1, 4, 2, 3), ("a", 0.95, 4, 1, 4)],
        )
        conn.execute("PRAGMA user_version = 3")
    conn.close()
    store = Store(path, "tv")
    try:
        assert store.history() == [
            HistoryRow("a", 2, 2, 1, 0.9),
            HistoryRow("a", 4, 1, 1, 0.95),
            HistoryRow("b", 4, 1, 0, 0.1),
        ]
        assert store.watched() == {"a", "b"}
        with store.transaction():
            row = store.insert_event("b", 0, 0.85, 60.0, 4, 1, 5, keep=2)
        assert row == HistoryRow("b", 4, 2, 1, 0.85)
        assert [c for c, _, _ in store.viewings()] == ["a", "b"]
    finally:
        store.close()


# --------------------------------------------------------------------- global data caps


def _global(key: str, round_: int, quality: float) -> GlobalPatternRow:
    vector = np.zeros(384, dtype=np.float32)
    vector[0] = 1.0
    return GlobalPatternRow(key, -1, vector, quality, 0.5, 3, round_)


def test_global_patterns_and_trending_are_capped() -> None:
    store = Store(":memory:", "tv")
    try:
        with store.transaction():
            store.replace_global_patterns([_global("r1-a", 1, 0.9), _global("r1-b", 1, 0.1)])
            store.replace_global_patterns(
                [_global("r2-a", 2, 0.2), _global("r2-b", 2, 0.8)], keep=3
            )
        assert [r.pattern_key for r in store.global_patterns()] == ["r1-a", "r2-a", "r2-b"]
        with store.transaction():
            store.replace_global_patterns([_global("r3-a", 3, 0.5)], keep=2)
        assert [r.pattern_key for r in store.global_patterns()] == ["r2-b", "r3-a"]
        with store.transaction():
            store.replace_trending([("x", 1.0), ("y", 3.0), ("z", 2.0), ("w", 2.0)], keep=3)
        assert store.trending() == [("y", 3.0), ("w", 2.0), ("z", 2.0)]
    finally:
        store.close()
