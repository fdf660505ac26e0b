"""The learning rule, event validation and the SQLite store (persistence, power cuts)."""

from __future__ import annotations

import math
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omega_brain import (
    Brain,
    BrainConfig,
    CatalogIndex,
    InvalidEventError,
    StoreError,
    UnknownContentError,
    ViewingEvent,
)
from omega_brain.errors import BrainError
from omega_brain.patterns import (
    Outcome,
    PatternState,
    apply_event,
    classify,
    normalize,
    success_rate,
)
from omega_protocol import bucket_from_timestamp

TS = 1_700_000_000_000  # a Tuesday, 22:13 UTC: night/weekday


def make_catalog(n: int = 120, seed: int = 0) -> tuple[list[str], npt.NDArray[np.float32]]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((6, 384)).astype(np.float32)
    x = centers[np.arange(n) % 6] + 0.6 * rng.standard_normal((n, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return [f"item-{i}" for i in range(n)], x


@pytest.fixture(scope="module")
def catalog() -> CatalogIndex:
    ids, x = make_catalog()
    return CatalogIndex(ids, x)


def unit(seed: int) -> npt.NDArray[np.float32]:
    return normalize(np.random.default_rng(seed).standard_normal(384))


def cos(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ------------------------------------------------------------------------- learning rule


@pytest.mark.parametrize(
    ("completion", "outcome"),
    [
        (1.0, Outcome.SUCCESS),
        (0.8, Outcome.SUCCESS),
        (0.7999, Outcome.NEUTRAL),
        (0.5, Outcome.NEUTRAL),
        (0.2, Outcome.NEUTRAL),
        (0.1999, Outcome.FAILURE),
        (0.0, Outcome.FAILURE),
    ],
)
def test_classify_thresholds(completion: float, outcome: Outcome) -> None:
    assert classify(completion) is outcome


def test_success_rate_is_laplace_smoothed() -> None:
    assert success_rate(0, 0) == 0.5
    assert success_rate(3, 1) == pytest.approx(4 / 6)
    assert success_rate(1, 0) == pytest.approx(2 / 3)
    assert 0 < success_rate(0, 10_000) < success_rate(10_000, 0) < 1


def test_first_success_creates_pattern_at_content() -> None:
    c = unit(1)
    state = apply_event(PatternState(), c, Outcome.SUCCESS)
    assert state.embedding is not None
    np.testing.assert_allclose(state.embedding, c, atol=1e-6)
    assert (state.successes, state.failures, state.neutral, state.sample_count) == (1, 0, 0, 1)


def test_embedding_moves_toward_liked_content_as_running_mean() -> None:
    a, b = unit(1), unit(2)
    state = apply_event(PatternState(), a, Outcome.SUCCESS)
    state = apply_event(state, b, Outcome.SUCCESS)
    assert state.embedding is not None
    # step 1/2: the normalized midpoint of a and b.
    np.testing.assert_allclose(state.embedding, normalize(a + b), atol=1e-5)
    before = cos(state.embedding, b)
    after_state = apply_event(state, b, Outcome.SUCCESS)
    assert after_state.embedding is not None
    assert cos(after_state.embedding, b) > before
    assert after_state.success_rate == pytest.approx(success_rate(3, 0))


def test_min_step_bounds_the_running_mean() -> None:
    a, b = unit(1), unit(2)
    state = PatternState(embedding=a, successes=10_000)
    moved = apply_event(state, b, Outcome.SUCCESS, min_step=0.1)
    assert moved.embedding is not None
    np.testing.assert_allclose(moved.embedding, normalize(0.9 * a + 0.1 * b), atol=1e-5)


def test_failure_moves_away_and_neutral_keeps_embedding() -> None:
    a, b = unit(1), unit(2)
    state = apply_event(PatternState(), a, Outcome.SUCCESS)
    state = apply_event(state, b, Outcome.SUCCESS)
    assert state.embedding is not None
    failed = apply_event(state, b, Outcome.FAILURE, failure_step=0.05)
    assert failed.embedding is not None
    assert cos(failed.embedding, b) < cos(state.embedding, b)
    assert cos(failed.embedding, state.embedding) > 0.99  # only slightly
    assert (failed.successes, failed.failures) == (2, 1)
    assert failed.success_rate == pytest.approx(3 / 5)
    neutral = apply_event(failed, b, Outcome.NEUTRAL)
    assert neutral.embedding is failed.embedding
    assert neutral.sample_count == 4 and neutral.success_rate == failed.success_rate


def test_failures_before_any_success_keep_counts_without_embedding() -> None:
    state = apply_event(PatternState(), unit(1), Outcome.FAILURE)
    state = apply_event(state, unit(2), Outcome.NEUTRAL)
    assert state.embedding is None
    assert (state.failures, state.neutral, state.sample_count) == (1, 1, 2)
    state = apply_event(state, unit(3), Outcome.SUCCESS)
    assert state.embedding is not None
    np.testing.assert_allclose(state.embedding, unit(3), atol=1e-6)
    assert state.success_rate == pytest.approx(2 / 4)


def test_opposite_content_at_half_step_restarts_at_content() -> None:
    a = unit(1)
    state = PatternState(embedding=a, successes=1)
    moved = apply_event(state, -a, Outcome.SUCCESS)
    assert moved.embedding is not None
    assert math.isclose(float(np.linalg.norm(moved.embedding)), 1.0, rel_tol=1e-5)


events_strategy = st.lists(
    st.tuples(st.integers(0, 119), st.floats(0.0, 1.0), st.integers(0, 7 * 24 * 3600)),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(events=events_strategy, seed=st.integers(0, 2**16))
def test_property_rule_keeps_unit_norm_and_rate_in_open_interval(
    events: list[tuple[int, float, int]], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    state = PatternState()
    for _, completion, _ in events:
        content = normalize(rng.standard_normal(384))
        state = apply_event(state, content, classify(completion), min_step=0.02)
        if state.embedding is not None:
            assert abs(float(np.linalg.norm(state.embedding)) - 1.0) < 1e-4
            assert state.embedding.dtype == np.float32
        assert 0.0 < state.success_rate < 1.0
    assert state.sample_count == len(events)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(events=events_strategy)
def test_property_brain_patterns_stay_valid(
    catalog: CatalogIndex, events: list[tuple[int, float, int]]
) -> None:
    with Brain("tv-prop", catalog=catalog) as brain:
        for item, completion, offset_s in events:
            brain.observe(ViewingEvent(f"item-{item}", TS + offset_s * 1000, completion))
        patterns = brain._patterns  # white-box: the learned state itself
        assert sum(r.state.sample_count for r in patterns.values()) == len(events)
        for row in patterns.values():
            assert 0.0 < row.state.success_rate < 1.0
            if row.state.embedding is not None:
                assert abs(float(np.linalg.norm(row.state.embedding)) - 1.0) < 1e-4
        assert brain.stats().local_version == len(events)


# ---------------------------------------------------------------------------- observe()


@pytest.mark.parametrize(
    "event",
    [
        ViewingEvent("item-1", TS, float("nan")),
        ViewingEvent("item-1", TS, float("inf")),
        ViewingEvent("item-1", TS, 1.01),
        ViewingEvent("item-1", TS, -0.01),
        ViewingEvent("item-1", -1, 0.5),
        ViewingEvent("item-1", True, 0.5),
        ViewingEvent("item-1", 1.5, 0.5),  # type: ignore[arg-type]
        ViewingEvent("item-1", TS, "0.5"),  # type: ignore[arg-type]
        ViewingEvent("item-1", TS, 0.5, watch_seconds=-1.0),
        ViewingEvent("item-1", TS, 0.5, watch_seconds=float("nan")),
        ViewingEvent("", TS, 0.5),
        ViewingEvent(None, TS, 0.5),  # type: ignore[arg-type]
    ],
)
def test_observe_rejects_invalid_events(catalog: CatalogIndex, event: ViewingEvent) -> None:
    with Brain("tv", catalog=catalog) as brain:
        with pytest.raises(InvalidEventError):
            brain.observe(event)
        assert brain.stats().local_version == 0


def test_observe_rejects_non_events_and_unknown_content(catalog: CatalogIndex) -> None:
    with Brain("tv", catalog=catalog) as brain:
        with pytest.raises(InvalidEventError):
            brain.observe({"content_id": "item-1"})  # type: ignore[arg-type]
        with pytest.raises(UnknownContentError):
            brain.observe(ViewingEvent("missing", TS, 1.0))
        assert brain.stats().events_observed == 0
    with Brain("tv-no-catalog") as brain, pytest.raises(UnknownContentError):
        brain.observe(ViewingEvent("item-1", TS, 1.0))


def test_observe_accepts_numpy_scalars(catalog: CatalogIndex) -> None:
    with Brain("tv", catalog=catalog) as brain:
        brain.observe(ViewingEvent("item-1", np.int64(TS), np.float32(0.9)))  # type: ignore[arg-type]
        assert brain.stats().local_version == 1


def test_observe_updates_the_bucket_of_the_event(catalog: CatalogIndex) -> None:
    with Brain("tv", catalog=catalog) as brain:
        brain.observe(ViewingEvent("item-1", TS, 0.95))
        brain.observe(ViewingEvent("item-2", TS + 3600_000 * 12, 0.95))  # next day 10:13 UTC
        buckets = set(brain._patterns)
        assert buckets == {
            bucket_from_timestamp(TS).index,
            bucket_from_timestamp(TS + 3600_000 * 12).index,
        }
        stats = brain.stats()
        assert (stats.pattern_count, stats.watched_count, stats.pending_view_count) == (2, 2, 2)


def test_utc_offset_moves_the_bucket(catalog: CatalogIndex) -> None:
    cfg = BrainConfig(utc_offset_minutes=-5 * 60)  # 22:13 UTC is 17:13 local: evening
    with Brain("tv", cfg, catalog=catalog) as brain:
        brain.observe(ViewingEvent("item-1", TS, 0.95))
        assert set(brain._patterns) == {bucket_from_timestamp(TS, -300).index}
        assert bucket_from_timestamp(TS, -300).name == "evening/weekday"


def test_closed_brain_raises_brain_error(catalog: CatalogIndex) -> None:
    brain = Brain("tv", catalog=catalog)
    brain.close()
    brain.close()  # idempotent
    with pytest.raises(BrainError, match="closed"):
        brain.observe(ViewingEvent("item-1", TS, 1.0))
    with pytest.raises(BrainError):
        brain.recommend()


# ----------------------------------------------------------------------------- the store


def _history() -> list[ViewingEvent]:
    return [
        ViewingEvent(f"item-{i}", TS + i * 60_000, c, 30.0)
        for i, c in [(0, 0.95), (6, 0.9), (12, 0.1), (1, 0.5), (18, 1.0), (7, 0.05)]
    ]


def test_reopen_restores_the_brain(tmp_path: Path) -> None:
    ids, x = make_catalog()
    path = tmp_path / "tv.db"
    with Brain("tv", BrainConfig(store_path=path)) as brain:
        brain.load_catalog(ids, x, titles=[f"T{i}" for i in ids], genres=[["drama"]] * len(ids))
        for event in _history():
            brain.observe(event)
        before_recs = brain.recommend(5, timestamp_ms=TS)
        before = brain.stats()
        before_patterns = brain._patterns
    with Brain("tv", BrainConfig(store_path=str(path))) as again:
        assert again.catalog is not None and len(again.catalog) == len(ids)
        assert again.catalog.title_of("item-3") == "Titem-3"
        assert again.catalog.genres_of("item-3") == ("drama",)
        after = again.stats()
        for field in ("events_observed", "pattern_count", "watched_count", "local_version"):
            assert getattr(after, field) == getattr(before, field)
        for bucket, row in before_patterns.items():
            restored = again._patterns[bucket]
            assert restored.pattern_id == row.pattern_id
            assert restored.state.sample_count == row.state.sample_count
            np.testing.assert_array_equal(restored.state.embedding, row.state.embedding)
        assert again.recommend(5, timestamp_ms=TS) == before_recs


def test_survives_a_power_cut(tmp_path: Path) -> None:
    """Copy the database and its WAL while the brain is open (never closed): a power cut."""
    ids, x = make_catalog()
    live = tmp_path / "live.db"
    brain = Brain("tv", BrainConfig(store_path=live))
    brain.load_catalog(ids, x)
    for event in _history():
        brain.observe(event)
    expected = brain.recommend(5, timestamp_ms=TS)
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(live) + suffix)
        if src.exists():
            shutil.copyfile(src, crashed / ("tv.db" + suffix))
    assert Path(str(live) + "-wal").exists()  # the data really is (partly) in the WAL
    with Brain("tv", BrainConfig(store_path=crashed / "tv.db")) as restored:
        stats = restored.stats()
        assert stats.local_version == len(_history())
        assert stats.events_observed == len(_history())
        assert restored.recommend(5, timestamp_ms=TS) == expected
    brain.close()


def test_store_is_wal_with_normal_sync(tmp_path: Path) -> None:
    path = tmp_path / "tv.db"
    with Brain("tv", BrainConfig(store_path=path)) as brain:
        conn = brain._store._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert brain.stats().store_bytes > 0


def test_store_belongs_to_one_device(tmp_path: Path) -> None:
    path = tmp_path / "tv.db"
    Brain("tv-1", BrainConfig(store_path=path)).close()
    with pytest.raises(StoreError, match="tv-1"):
        Brain("tv-2", BrainConfig(store_path=path))


def test_corrupt_store_raises_store_error(tmp_path: Path) -> None:
    path = tmp_path / "tv.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError):
        Brain("tv", BrainConfig(store_path=path))


def test_store_from_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tv.db"
    Brain("tv", BrainConfig(store_path=path)).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        Brain("tv", BrainConfig(store_path=path))


def test_failed_write_changes_nothing(catalog: CatalogIndex) -> None:
    with Brain("tv", catalog=catalog) as brain:
        brain.observe(ViewingEvent("item-1", TS, 0.95))
        brain._store._conn.execute("DROP TABLE pending_views")  # the last write will fail
        with pytest.raises(StoreError):
            brain.observe(ViewingEvent("item-2", TS, 0.95))
        assert brain._store.event_count() == 1
        assert brain._state["local_version"] == 1  # stats() would read the dropped table
        assert brain._store.state()["local_version"] == 1
        assert "item-2" not in brain._watched


def test_shared_catalog_is_not_persisted(tmp_path: Path, catalog: CatalogIndex) -> None:
    path = tmp_path / "tv.db"
    with Brain("tv", BrainConfig(store_path=path), catalog=catalog) as brain:
        brain.observe(ViewingEvent("item-1", TS, 0.95))
    with Brain("tv", BrainConfig(store_path=path)) as again:
        assert again.catalog is None
        assert again.recommend(5, timestamp_ms=TS) == []  # nothing to rank, no crash
