"""The collaborative model in the brain: store, FetchModel, the model update in the delta,
and whole-catalog ranking.

The shard is an in-process test double of the brain's `SyncTransport`; the real FetchModel
server is tested in tests/integration.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from omega.v1 import patterns_pb2, sync_pb2
from omega_brain import Brain, BrainConfig, CatalogIndex, Recommendation, SyncError, ViewingEvent
from omega_brain.brain import REASON_MODEL
from omega_brain.collaborative import InteractionWeights, preference_vector, update_direction
from omega_brain.model import align_model, build_model_update, device_preferences
from omega_brain.patterns import normalize
from omega_brain.ranking import model_relevance, top_unexcluded
from omega_brain.store import SCHEMA_VERSION, Store, StoredModel
from omega_brain.transport import FetchProgress, download_model
from omega_protocol import decode_payload, encode_embedding, encode_payload
from omega_protocol.model_update import ItemFactorContribution, decode_item_factor_update

TS = 1_700_000_000_000  # Tuesday 22:13 UTC: night/weekday
FAST = BrainConfig(base_backoff_seconds=0.0, max_backoff_seconds=0.0)
N_CLUSTERS = 8
FACTORS = 2

Row = tuple[npt.NDArray[np.float32] | None, int]


def make_catalog(n: int = 400, seed: int = 0) -> tuple[list[str], npt.NDArray[np.float32]]:
    """Items in 8 content clusters: item i belongs to cluster i % 8."""
    rng = np.random.default_rng(seed)
    centers = normalize(rng.standard_normal((N_CLUSTERS, 384)))
    x = centers[np.arange(n) % N_CLUSTERS] + 0.04 * rng.standard_normal((n, 384))
    return [f"item-{i}" for i in range(n)], normalize(x)


@pytest.fixture(scope="module")
def catalog() -> CatalogIndex:
    ids, x = make_catalog()
    return CatalogIndex(ids, x)


def planted_rows(version: int = 1) -> dict[str, Row]:
    """Two orthonormal taste columns over 80 items: A = items 0..39, B = items 40..79.

    Both mix all 8 content clusters (item i is in content cluster i % 8), so the model's
    tastes are not what content similarity finds.
    """
    rows: dict[str, Row] = {}
    for i in range(80):
        factor = np.zeros(FACTORS, dtype=np.float32)
        factor[0 if i < 40 else 1] = 1.0 / math.sqrt(40)
        rows[f"item-{i}"] = (factor, version)
    return rows


class ModelShard:
    """A `SyncTransport` with a collaborative model; failures can be scripted per call."""

    def __init__(self, factors: int = FACTORS) -> None:
        self.requests: list[sync_pb2.SyncPatternsRequest] = []
        self.fetches: list[sync_pb2.FetchModelRequest] = []
        self.fetch_bytes = 0
        self.sync_script: list[Exception | Callable[[sync_pb2.SyncPatternsRequest], int]] = []
        self.fetch_script: list[Exception] = []
        self.on_page: Callable[[ModelShard, int], None] | None = None
        self.model_version = 0
        self.factors = factors
        self.rows: dict[str, Row] = {}
        self.global_patterns: patterns_pb2.GlobalPatterns | None = None

    def publish(self, version: int, rows: dict[str, Row], factors: int | None = None) -> None:
        self.model_version = version
        self.rows.update(rows)
        if factors is not None:
            self.factors = factors

    def updates(self) -> list[ItemFactorContribution | None]:
        out: list[ItemFactorContribution | None] = []
        for r in self.requests:
            delta = decode_payload(r.delta, patterns_pb2.PatternDelta)
            out.append(
                decode_item_factor_update(delta.model_update)
                if delta.HasField("model_update")
                else None
            )
        return out

    def sync_patterns(
        self, request: sync_pb2.SyncPatternsRequest, timeout: float
    ) -> sync_pb2.SyncPatternsResponse:
        copy = sync_pb2.SyncPatternsRequest()
        copy.CopyFrom(request)
        if request.local_version == 0:  # a pull: a new store learning its version
            return sync_pb2.SyncPatternsResponse(model_version=self.model_version)
        self.requests.append(copy)
        ack = request.local_version
        if self.sync_script:
            step = self.sync_script.pop(0)
            if isinstance(step, Exception):
                raise step
            ack = step(request)
        response = sync_pb2.SyncPatternsResponse(
            acknowledged_version=ack, model_version=self.model_version
        )
        if self.global_patterns is not None:
            response.global_patterns.CopyFrom(encode_payload(self.global_patterns))
            response.global_version = self.global_patterns.global_version
        return response

    def fetch_embeddings(
        self, request: sync_pb2.FetchEmbeddingsRequest, timeout: float
    ) -> sync_pb2.FetchEmbeddingsResponse:
        raise AssertionError("not used")

    def fetch_model(
        self, request: sync_pb2.FetchModelRequest, timeout: float
    ) -> sync_pb2.FetchModelResponse:
        self.fetches.append(request)
        if self.fetch_script:
            raise self.fetch_script.pop(0)
        start = int(request.page_token or 0)
        if self.on_page is not None:
            self.on_page(self, start)
        changed = sorted(
            cid for cid, (_, v) in self.rows.items() if v > request.since_model_version
        )
        if request.since_model_version == 0:  # a full model: no removals
            changed = [c for c in changed if self.rows[c][0] is not None]
        end = min(start + max(request.page_size, 1), len(changed))
        response = sync_pb2.FetchModelResponse(
            model_version=self.model_version, factors=self.factors
        )
        for cid in changed[start:end]:
            factor, version = self.rows[cid]
            row = response.rows.add(content_id=cid, model_version=version)
            if factor is not None:
                row.factor.CopyFrom(encode_embedding(factor))
        response.next_page_token = str(end) if end < len(changed) else ""
        self.fetch_bytes += response.ByteSize()
        return response


def unavailable() -> SyncError:
    return SyncError("down", code=grpc.StatusCode.UNAVAILABLE, retryable=True)


def watch(brain: Brain, items: list[int], completion: float = 0.95) -> None:
    for i in items:
        brain.observe(ViewingEvent(f"item-{i}", TS, completion, 600.0))


def rows_of(store_model: StoredModel) -> dict[str, npt.NDArray[np.float32]]:
    return dict(zip(store_model.content_ids, store_model.rows, strict=True))


# ------------------------------------------------------------------------------- store


def test_model_rows_are_applied_incrementally_and_persist(tmp_path: Path) -> None:
    path = tmp_path / "brain.db"
    ids, x = make_catalog(100)
    shard = ModelShard()
    shard.publish(1, planted_rows(1))
    config = BrainConfig(store_path=path, base_backoff_seconds=0.0, model_page_size=7)
    with Brain("tv-1", config, transport=shard) as brain:
        brain.load_catalog(ids, x)
        result = brain.sync()
        assert result.ok and result.model_error is None
        assert (result.model_version, result.model_rows_received) == (1, 80)
        assert shard.fetches[0].since_model_version == 0 and len(shard.fetches) == 12
        stats = brain.stats()
        assert (stats.model_version, stats.model_items) == (1, 80)

        # Version 2: item 3 leaves the model, item 4 moves, item 90 joins, unknown-9 joins.
        moved = np.array([0.1, -0.2], dtype=np.float32)
        shard.publish(
            2,
            {
                "item-3": (None, 2),
                "item-4": (moved, 2),
                "item-90": (np.array([0.0, 0.15], dtype=np.float32), 2),
                "unknown-9": (np.array([0.3, 0.0], dtype=np.float32), 2),
            },
        )
        before = len(shard.fetches)
        result = brain.sync()
        assert result.ok and (result.model_version, result.model_rows_received) == (2, 4)
        assert {f.since_model_version for f in shard.fetches[before:]} == {1}
        assert brain.stats().model_items == 81  # 80 - item-3 + item-90 + unknown-9
        rows = rows_of(brain._model)
        assert "item-3" not in rows and "unknown-9" in rows
        np.testing.assert_allclose(rows["item-4"], moved, atol=0.2 / 127)
        np.testing.assert_allclose(rows["item-5"], [1 / math.sqrt(40), 0.0], atol=1e-6)
        aligned = brain._aligned_model()
        assert aligned is not None and aligned.known_count == 80  # 79 + item-90; not unknown-9
        assert not aligned.known[3] and aligned.known[90]


def test_model_store_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "brain.db"
    ids, x = make_catalog(100)
    shard = ModelShard()
    shard.publish(1, planted_rows(1))
    config = BrainConfig(store_path=path, base_backoff_seconds=0.0)
    with Brain("tv-1", config, transport=shard) as brain:
        brain.load_catalog(ids, x)
        assert brain.sync().ok
        shard.publish(2, {"item-3": (None, 2), "item-4": (np.array([0.1, -0.2]), 2)})
        assert brain.sync().model_version == 2
        watch(brain, [0, 1])
        expected = brain.recommend(10)

    store = Store(path, "tv-1")
    try:
        model = store.model()
        state = store.state()
    finally:
        store.close()
    rows = rows_of(model)
    assert (model.version, model.factors, state["model_version"]) == (2, 2, 2)
    assert "item-3" not in rows and len(rows) == 79
    np.testing.assert_allclose(rows["item-4"], [0.1, -0.2], atol=0.2 / 127)
    np.testing.assert_allclose(rows["item-0"], [1 / math.sqrt(40), 0.0], atol=1e-6)

    with Brain("tv-1", config, transport=shard) as again:
        stats = again.stats()
        assert (stats.model_version, stats.model_items) == (2, 79)
        assert again.recommend(10) == expected
        fetches = len(shard.fetches)
        assert again.sync().ok and len(shard.fetches) == fetches  # current: nothing fetched


def test_version_1_store_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    Store(path, "tv-1").close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE model")
    conn.execute("DELETE FROM sync_state WHERE key LIKE 'model_%'")
    conn.execute("UPDATE sync_state SET value = 5 WHERE key = 'local_version'")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    store = Store(path, "tv-1")
    try:
        state = store.state()
        assert state["local_version"] == 5
        assert (state["model_version"], state["model_update_version"]) == (0, -1)
        assert store.model().content_ids == ()
        version = store._conn.execute("PRAGMA user_version").fetchone()[0]
        assert version == SCHEMA_VERSION == 4
    finally:
        store.close()


# ------------------------------------------------------------------------------- fetching


def test_fetch_restarts_once_when_the_version_moves() -> None:
    shard = ModelShard()
    shard.publish(1, planted_rows(1))

    def bump_once(s: ModelShard, start: int) -> None:
        if start > 0 and s.model_version == 1:
            s.publish(2, {"item-0": (np.array([0.5, 0.5], dtype=np.float32), 2)})

    shard.on_page = bump_once
    progress = FetchProgress()
    fetched = download_model(shard, page_size=50, progress=progress)
    assert progress.restarts == 1 and fetched.model_version == 2
    assert len(fetched.rows) == 80 and fetched.bytes_down == shard.fetch_bytes
    row = dict((c, f) for c, f, _ in fetched.rows)["item-0"]
    assert row is not None and row[0] == pytest.approx(0.5, abs=0.01)

    def bump_always(s: ModelShard, start: int) -> None:
        if start > 0:
            s.model_version += 1

    shard.on_page = bump_always
    with pytest.raises(SyncError, match="moved twice"):
        download_model(shard, page_size=50)


def test_malformed_model_replies_are_refused() -> None:
    shard = ModelShard()
    shard.publish(1, {"item-0": (np.ones(3, dtype=np.float32), 1)})  # 3 values, 2 factors
    with pytest.raises(SyncError, match="bad factor"):
        download_model(shard)
    shard = ModelShard(factors=0)
    shard.publish(1, {"item-0": (np.ones(2, dtype=np.float32), 1)})
    with pytest.raises(SyncError, match="out of range"):
        download_model(shard)


def test_fetch_failure_keeps_the_sync_and_retries_next_time(catalog: CatalogIndex) -> None:
    shard = ModelShard()
    shard.publish(1, planted_rows(1))
    shard.fetch_script = [SyncError("no", code=grpc.StatusCode.INTERNAL)]
    with Brain("tv-1", FAST, transport=shard, catalog=catalog) as brain:
        watch(brain, [0, 1])
        result = brain.sync()
        assert result.ok and result.error is None
        assert result.model_error is not None and "INTERNAL" in result.model_error
        assert result.model_version == 0 and result.acknowledged_version == 2
        assert brain.stats().syncs_ok == 1

        result = brain.sync()
        assert result.ok and result.model_error is None and result.model_version == 1


def test_transport_without_fetch_model(catalog: CatalogIndex) -> None:
    class OldShard:
        def sync_patterns(
            self, request: sync_pb2.SyncPatternsRequest, timeout: float
        ) -> sync_pb2.SyncPatternsResponse:
            return sync_pb2.SyncPatternsResponse(
                acknowledged_version=request.local_version, model_version=3
            )

        def fetch_embeddings(
            self, request: sync_pb2.FetchEmbeddingsRequest, timeout: float
        ) -> sync_pb2.FetchEmbeddingsResponse:
            return sync_pb2.FetchEmbeddingsResponse()

    with Brain("tv-1", FAST, transport=OldShard(), catalog=catalog) as brain:  # type: ignore[arg-type]
        result = brain.sync()
        assert result.ok and result.model_error is not None and result.model_version == 0


def test_factor_count_change_refetches_the_whole_model(catalog: CatalogIndex) -> None:
    shard = ModelShard()
    shard.publish(1, planted_rows(1))
    with Brain("tv-1", FAST, transport=shard, catalog=catalog) as brain:
        assert brain.sync().model_version == 1
        shard.rows = {f"item-{i}": (np.full(3, 0.1 * (i + 1), np.float32), 2) for i in range(5)}
        shard.publish(2, {}, factors=3)
        result = brain.sync()
        assert result.ok and result.model_version == 2 and result.model_error is None
        assert [f.since_model_version for f in shard.fetches[-2:]] == [1, 0]
        assert brain.stats().model_items == 5
        assert brain._model.factors == 3


def test_model_bytes_are_counted_separately(tmp_path: Path, catalog: CatalogIndex) -> None:
    shard = ModelShard()
    shard.publish(1, planted_rows(1))
    config = BrainConfig(store_path=tmp_path / "b.db", base_backoff_seconds=0.0)
    with Brain("tv-1", config, transport=shard, catalog=catalog) as brain:
        result = brain.sync()
        response_size = sync_pb2.SyncPatternsResponse(
            acknowledged_version=0, model_version=1
        ).ByteSize()
        assert result.bytes_down == response_size
        assert result.model_bytes_down == shard.fetch_bytes > 1000
        assert brain.stats().model_bytes_down == shard.fetch_bytes
        again = brain.sync()
        assert again.model_bytes_down == 0 and again.model_rows_received == 0
    with Brain("tv-1", config, transport=shard, catalog=catalog) as brain:
        assert brain.stats().model_bytes_down == shard.fetch_bytes


# ------------------------------------------------------------------------ model update


def test_first_sync_sends_weights_without_direction(catalog: CatalogIndex) -> None:
    shard = ModelShard()
    with Brain("tv-1", FAST, transport=shard, catalog=catalog) as brain:
        watch(brain, [5], 0.95)
        watch(brain, [7], 0.5)  # partial: weight 0.5
        watch(brain, [9], 0.1)  # abandoned: weight 0, not sent
        brain.observe(ViewingEvent("item-5", TS, 0.3))  # a repeat keeps the highest weight
        result = brain.sync()
        assert result.ok and result.model_update_sent
        update = shard.updates()[0]
        assert update is not None and update.direction is None and update.model_version == 0
        assert update.content_ids == ("item-5", "item-7")
        assert float(np.linalg.norm(update.weights)) == pytest.approx(1.0, abs=0.01)
        np.testing.assert_allclose(update.weights, np.array([2, 1]) / math.sqrt(5), atol=0.01)

        result = brain.sync()  # sent for version 0 already
        assert result.ok and not result.model_update_sent and shard.updates()[1] is None
        watch(brain, [11])
        assert brain.sync().ok and shard.updates()[2] is None


def test_no_update_without_a_weighted_viewing(catalog: CatalogIndex) -> None:
    shard = ModelShard()
    with Brain("tv-1", FAST, transport=shard, catalog=catalog) as brain:
        assert not brain.sync().model_update_sent
        watch(brain, [1], 0.05)
        assert not brain.sync().model_update_sent
        watch(brain, [2], 0.9)
        assert brain.sync().model_update_sent
        updates = shard.updates()  # the first sync, with nothing to send, was a pull
        assert len(updates) == 2 and updates[0] is None and updates[1] is not None


def test_direction_once_per_model_version(catalog: CatalogIndex) -> None:
    shard = ModelShard()
    with Brain("tv-1", FAST, transport=shard, catalog=catalog) as brain:
        watch(brain, [0, 1, 2, 50])
        assert brain.sync().model_update_sent  # weights for version 0
        shard.publish(1, planted_rows(1))
        first = brain.sync()  # nothing to send; the answer names model 1: fetched
        assert not first.model_update_sent and first.model_version == 1

        second = brain.sync()
        assert second.ok and second.model_update_sent
        update = shard.updates()[2]
        assert update is not None and update.model_version == 1 and update.direction is not None
        # No new viewing: the request still gets a local version the shard has not applied.
        assert shard.requests[2].local_version > shard.requests[1].local_version
        # The direction is update_direction over the catalog-aligned model.
        prefs = device_preferences(
            [(f"item-{i}", 0.95) for i in (0, 1, 2, 50)], catalog, InteractionWeights()
        )
        aligned = align_model(brain._model, catalog)
        assert aligned is not None
        expected = update_direction(aligned.matrix, prefs.items, prefs.p, weight=1.0)
        assert expected is not None
        np.testing.assert_allclose(update.direction, expected, atol=0.01)
        assert float(np.linalg.norm(update.weights)) == pytest.approx(1.0, abs=0.01)

        assert not brain.sync().model_update_sent  # once per version
        shard.publish(2, {"item-0": (np.array([0.2, 0.1], dtype=np.float32), 2)})
        assert brain.sync().model_version == 2
        assert brain.sync().model_update_sent
        latest = shard.updates()[-1]
        assert latest is not None and latest.model_version == 2
        assert not brain.sync().model_update_sent


def test_failed_sync_resends_the_model_update(catalog: CatalogIndex) -> None:
    shard = ModelShard()
    shard.publish(1, planted_rows(1))
    with Brain("tv-1", FAST, transport=shard, catalog=catalog) as brain:
        watch(brain, [0, 1])
        assert brain.sync().model_version == 1

        shard.sync_script = [unavailable()] * FAST.max_attempts
        failed = brain.sync()
        assert not failed.ok and failed.model_update_sent

        # Acknowledged below the sent version, both when the unknown outcome is settled and
        # for the sync itself: not applied.
        shard.sync_script = [lambda r: 0, lambda r: 0]
        below = brain.sync()
        assert not below.ok and below.model_update_sent

        ok = brain.sync()
        assert ok.ok and ok.model_update_sent
        sent = [u for u in shard.updates() if u is not None and u.direction is not None]
        # The failed attempts, the settling resend, the refused sync and the good one.
        assert len(sent) == FAST.max_attempts + 3
        assert not brain.sync().model_update_sent


def test_update_keeps_the_highest_weights() -> None:
    ids, x = make_catalog(50)
    catalog = CatalogIndex(ids, x)
    viewings = [(f"item-{i}", 0.5) for i in range(10)] + [("item-20", 0.9), ("item-30", 0.9)]
    viewings.append(("not-in-catalog", 0.9))
    prefs = device_preferences(viewings, catalog, InteractionWeights())
    assert prefs.samples == 12 and prefs.success_rate == pytest.approx(2 / 12)
    message = build_model_update(prefs, catalog, None, 0, max_items=5)
    assert message is not None
    update = decode_item_factor_update(message)
    assert update.content_ids == ("item-0", "item-1", "item-2", "item-20", "item-30")
    assert float(np.linalg.norm(update.weights)) == pytest.approx(1.0, abs=0.01)
    np.testing.assert_allclose(update.weights, np.array([1, 1, 1, 2, 2]) / math.sqrt(11), atol=0.01)


# ----------------------------------------------------------------------------- recommend


def fresh_brain(
    catalog: CatalogIndex, shard: ModelShard | None = None, **overrides: object
) -> Brain:
    config = BrainConfig(base_backoff_seconds=0.0, max_backoff_seconds=0.0, **overrides)  # type: ignore[arg-type]
    return Brain("tv", config, transport=shard or ModelShard(), catalog=catalog)


def test_planted_model_ranks_the_taste_cluster_first(catalog: CatalogIndex) -> None:
    shard = ModelShard()
    with fresh_brain(catalog, shard) as with_model, fresh_brain(catalog) as without:
        for brain in (with_model, without):
            watch(brain, [0, 1, 2, 3])  # taste A, content clusters 0-3
            assert brain.sync().ok
        today = without.recommend(10, timestamp_ms=TS)
        assert with_model.recommend(10, timestamp_ms=TS) == today  # no model yet

        shard.publish(1, planted_rows(1))
        assert with_model.sync().model_version == 1
        recs = with_model.recommend(10, timestamp_ms=TS)
        assert len(recs) == 10
        positions = [int(r.content_id.split("-")[1]) for r in recs]
        assert all(4 <= p < 40 for p in positions), positions  # the rest of taste A
        assert all(r.reasons[0] == REASON_MODEL for r in recs)
        assert recs[0].score == pytest.approx(1.0, abs=0.01)
        # Content similarity alone finds content clusters 0-3 all over the catalog.
        today_positions = [int(r.content_id.split("-")[1]) for r in today]
        assert sum(p < 40 for p in today_positions) < 5
        assert without.recommend(10, timestamp_ms=TS) == today


def test_zero_user_factor_keeps_todays_ranking(catalog: CatalogIndex) -> None:
    shard = ModelShard()
    shard.publish(1, planted_rows(1))
    with fresh_brain(catalog, shard) as with_model, fresh_brain(catalog) as without:
        for brain in (with_model, without):
            watch(brain, [100, 101, 102])  # items the model does not know
            watch(brain, [5], 0.1)  # known, but abandoned: no weight
        assert with_model.sync().model_version == 1
        assert with_model.recommend(10, timestamp_ms=TS) == without.recommend(10, timestamp_ms=TS)
        assert with_model.recommend(10, use_global=False) == without.recommend(10, use_global=False)


def test_cold_items_can_appear(catalog: CatalogIndex) -> None:
    shard = ModelShard()
    shard.publish(1, {f"item-{i}": (np.array([1.0, 0.0], dtype=np.float32), 1) for i in (0, 8)})
    with fresh_brain(catalog, shard, mmr_lambda=1.0, model_cold_weight=0.5) as brain:
        watch(brain, [0])
        assert brain.sync().model_version == 1
        recs = brain.recommend(5, timestamp_ms=TS)
        assert recs[0].content_id == "item-8" and recs[0].reasons[0] == REASON_MODEL
        # The others are content neighbours of the pattern (content cluster 0), scored by
        # model_cold_weight times their similarity relative to the nearest one.
        assert all(int(r.content_id.split("-")[1]) % N_CLUSTERS == 0 for r in recs[1:])
        assert all(0 < r.score <= 0.5 + 1e-6 for r in recs[1:])
        assert all(REASON_MODEL not in r.reasons for r in recs[1:])


EVENING = TS - 3 * 3_600_000  # Tuesday 19:13 UTC: evening/weekday
MORNING = TS - 13 * 3_600_000  # Tuesday 09:13 UTC: morning/weekday
EVENING_REASON = "matches your evening/weekday viewing"
MORNING_REASON = "matches your morning/weekday viewing"


def watch_at(brain: Brain, items: list[int], timestamp_ms: int) -> None:
    for i in items:
        brain.observe(ViewingEvent(f"item-{i}", timestamp_ms, 0.95, 600.0))


def taste_of(recs: list[Recommendation]) -> set[str]:
    """Which planted taste each recommended item belongs to: A (items 0..39), B (40..79)."""
    return {"A" if int(r.content_id.split("-")[1]) < 40 else "B" for r in recs}


def context_brain(catalog: CatalogIndex, weight: float, **overrides: object) -> Brain:
    """A brain whose evenings are taste A (6 viewings) and mornings taste B (3 viewings), with
    the planted model, which knows both tastes."""
    shard = ModelShard()
    shard.publish(1, planted_rows(1))
    brain = fresh_brain(catalog, shard, model_context_weight=weight, **overrides)
    watch_at(brain, [0, 1, 2, 3, 4, 5], EVENING)
    watch_at(brain, [40, 41, 42], MORNING)
    assert brain.sync().model_version == 1
    return brain


def test_context_steers_the_ranking_to_the_moments_taste(catalog: CatalogIndex) -> None:
    with context_brain(catalog, 1.0) as brain:
        evening = brain.recommend(10, timestamp_ms=EVENING + 60_000)
        morning = brain.recommend(10, timestamp_ms=MORNING + 60_000)
        assert taste_of(evening) == {"A"}, [r.content_id for r in evening]
        assert taste_of(morning) == {"B"}, [r.content_id for r in morning]
        # The steer is what lifts taste B in the morning: it says so, first.
        assert all(r.reasons[0] == MORNING_REASON for r in morning)
        assert all(REASON_MODEL in r.reasons for r in evening)
        assert all(EVENING_REASON in r.reasons for r in evening)
        assert all(r.score <= 1.0 + 1e-5 for r in morning + evening)


def test_without_the_context_weight_the_whole_history_ranks(catalog: CatalogIndex) -> None:
    with context_brain(catalog, 0.0) as brain:
        evening = brain.recommend(10, timestamp_ms=EVENING + 60_000)
        morning = brain.recommend(10, timestamp_ms=MORNING + 60_000)
        assert taste_of(evening) == taste_of(morning) == {"A"}  # 6 viewings of A, 3 of B
        assert [r.content_id for r in evening] == [r.content_id for r in morning]
        assert all(r.reasons == (REASON_MODEL,) for r in evening + morning)


def test_a_bucket_without_viewings_is_not_steered(catalog: CatalogIndex) -> None:
    with context_brain(catalog, 1.0) as steered, context_brain(catalog, 0.0) as plain:
        # TS is Tuesday night: no viewing in that bucket, so the whole history ranks.
        assert steered.recommend(10, timestamp_ms=TS) == plain.recommend(10, timestamp_ms=TS)
        # Afternoon: the bucket has only an item the model does not know.
        afternoon = TS - 8 * 3_600_000  # Tuesday 14:13 UTC
        watch_at(steered, [100], afternoon)
        watch_at(plain, [100], afternoon)
        assert steered.recommend(10, timestamp_ms=afternoon) == plain.recommend(
            10, timestamp_ms=afternoon
        )


def test_context_steer_follows_new_viewings_and_survives_reopen(
    tmp_path: Path, catalog: CatalogIndex
) -> None:
    shard = ModelShard()
    shard.publish(1, planted_rows(1))
    config = BrainConfig(store_path=tmp_path / "brain.db", model_context_weight=1.0)
    with Brain("tv", config, transport=shard, catalog=catalog) as brain:
        watch_at(brain, [0, 1, 2, 3, 4, 5], EVENING)
        assert brain.sync().model_version == 1
        assert taste_of(brain.recommend(10, timestamp_ms=MORNING)) == {"A"}  # no morning yet
        watch_at(brain, [40, 41, 42], MORNING)  # the morning's cached preferences are renewed
        assert taste_of(brain.recommend(10, timestamp_ms=MORNING)) == {"B"}
        before = brain.recommend(10, timestamp_ms=MORNING)
    with Brain("tv", config, transport=shard, catalog=catalog) as reopened:
        assert reopened.recommend(10, timestamp_ms=MORNING) == before


def test_store_viewings_carry_the_bucket(tmp_path: Path) -> None:
    store = Store(tmp_path / "brain.db", "tv")
    with store.transaction():
        store.insert_event("item-1", MORNING, 0.9, 60.0, 2, 1, 1)
        store.insert_event("item-2", EVENING, 0.1, 6.0, 4, 2, 2)
    assert store.viewings() == [("item-1", 0.9, 2), ("item-2", 0.1, 4)]
    store.close()


@pytest.mark.parametrize(
    "rows",
    [
        {},  # a model version without rows
        {"elsewhere-1": (np.array([1.0, 0.0], dtype=np.float32), 1)},  # unknown ids only
        planted_rows(1),
    ],
)
def test_recommend_returns_k_unwatched_items(rows: dict[str, Row]) -> None:
    ids, x = make_catalog(30)
    catalog = CatalogIndex(ids, x)
    shard = ModelShard()
    shard.publish(1, rows)
    with fresh_brain(catalog, shard, model_trend_weight=0.3) as brain:
        assert brain.recommend(10) == []  # nothing at all: nothing to recommend
        watch(brain, list(range(20)))
        result = brain.sync()
        assert result.ok and result.model_version == 1 and result.model_error is None
        for k in (1, 5, 10):
            recs = brain.recommend(k)
            assert len(recs) == k
            assert all(int(r.content_id.split("-")[1]) >= 20 for r in recs)
            assert len({r.content_id for r in recs}) == k and all(r.reasons for r in recs)
        assert len(brain.recommend(15)) == 10  # only 10 unwatched items
        assert len(brain.recommend(15, exclude_watched=False)) == 15


def test_cold_start_with_a_model_returns_k(catalog: CatalogIndex) -> None:
    shard = ModelShard()
    shard.publish(1, planted_rows(1))
    with fresh_brain(catalog, shard) as brain:
        brain.observe(ViewingEvent("item-1", TS, 0.05))  # one abandoned viewing
        assert brain.sync().model_version == 1
        # No pattern, no trends: as without a model, nothing to go on.
        assert brain.recommend(10, timestamp_ms=TS) == []

        trending = patterns_pb2.GlobalPatterns(global_version=2)
        for i in range(100, 130):
            trending.trending.add(content_id=f"item-{i}", score=float(200 - i))
        shard.global_patterns = trending
        assert brain.sync().ok
        recs = brain.recommend(10, timestamp_ms=TS)
        assert len(recs) == 10 and all(r.reasons == ("trending",) for r in recs)


# ------------------------------------------------------------------------ pure helpers


def test_model_relevance_parts() -> None:
    scores = np.array([2.0, -4.0, 0.0, 0.0, 0.0], dtype=np.float32)
    known = np.array([True, True, False, False, False])
    trend = np.array([0.0, 0.0, 0.0, 1.0, 0.5], dtype=np.float32)
    r = model_relevance(
        scores,
        known,
        trend=trend,
        trend_weight=0.2,
        cold_positions=np.array([0, 2, 3], dtype=np.int64),
        cold_similarity=np.array([0.9, 0.4, 0.2], dtype=np.float32),
        cold_weight=0.5,
    )
    np.testing.assert_allclose(r.model, [0.5, -1.0, 0, 0, 0])
    np.testing.assert_allclose(r.content, [0, 0, 0.5, 0.25, 0])  # known item 0 is not cold
    np.testing.assert_allclose(r.trend, [0, 0, 0, 0.2, 0.1])
    np.testing.assert_allclose(r.total, r.model + r.content + r.trend)
    assert r.scale == 4.0  # what V x was divided by
    assert (
        model_relevance(np.zeros(3, np.float32), known[:3], trend=None, trend_weight=0).scale == 1
    )


def test_top_unexcluded_breaks_ties_by_position() -> None:
    relevance = np.array([0.0, 1.0, 0.0, 0.5, 0.0, 1.0], dtype=np.float32)
    excluded = np.array([False, True, False, False, False, False])
    assert top_unexcluded(relevance, excluded, 3).tolist() == [5, 3, 0]
    assert top_unexcluded(relevance, excluded, 10).tolist() == [5, 3, 0, 2, 4]
    assert top_unexcluded(relevance, np.ones(6, dtype=bool), 3).tolist() == []
    assert top_unexcluded(relevance, excluded, 0).tolist() == []


def test_user_factor_over_aligned_model_matches_bench_usage() -> None:
    ids, x = make_catalog(100)
    catalog = CatalogIndex(ids, x)
    rows = planted_rows(1)
    model = StoredModel(
        1,
        FACTORS,
        tuple(rows),
        np.stack([f for f, _ in rows.values() if f is not None]),
    )
    aligned = align_model(model, catalog)
    assert aligned is not None and aligned.known_count == 80
    assert aligned.matrix.shape == (100, FACTORS) and not aligned.known[80:].any()
    items, p = preference_vector([(0, 1.0), (1, 1.0)], InteractionWeights())
    prefs = device_preferences([("item-0", 1.0), ("item-1", 1.0)], catalog, InteractionWeights())
    np.testing.assert_array_equal(prefs.items, items)
    np.testing.assert_allclose(prefs.p, p)
    assert align_model(StoredModel(0, 0, (), np.zeros((0, 0), np.float32)), catalog) is None


@pytest.mark.parametrize(
    "overrides",
    [
        {"model_trend_weight": -0.1},
        {"model_trend_weight": float("nan")},
        {"model_cold_weight": -1.0},
        {"model_context_weight": -0.25},
        {"model_context_weight": float("nan")},
        {"model_context_weight": True},
        {"model_page_size": 0},
        {"model_page_size": 1.5},
    ],
)
def test_model_config_is_validated(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(overrides))):
        BrainConfig(**overrides)  # type: ignore[arg-type]
