"""The catalog index and recommend(): watched filter, k, cold start, local vs global, MMR."""

from __future__ import annotations

import threading

import numpy as np
import numpy.typing as npt
import pytest

from omega.v1 import patterns_pb2, sync_pb2
from omega_brain import (
    Brain,
    BrainConfig,
    CatalogError,
    CatalogIndex,
    InvalidArgumentError,
    UnknownContentError,
    ViewingEvent,
)
from omega_brain.brain import REASON_GLOBAL, REASON_HISTORY, REASON_TRENDING
from omega_brain.patterns import normalize
from omega_brain.ranking import GlobalSet, blend_global, mmr
from omega_protocol import bucket_from_timestamp, encode_embedding, encode_payload

TS = 1_700_000_000_000  # Tuesday 22:13 UTC: night/weekday
BUCKET = bucket_from_timestamp(TS)
N_CLUSTERS = 8


def make_catalog(
    n: int = 400, seed: int = 0
) -> tuple[list[str], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Items in 8 clusters: item i belongs to cluster i % 8. Returns ids, items, centers."""
    rng = np.random.default_rng(seed)
    centers = normalize(rng.standard_normal((N_CLUSTERS, 384)))
    x = centers[np.arange(n) % N_CLUSTERS] + 0.04 * rng.standard_normal((n, 384))
    return [f"item-{i}" for i in range(n)], normalize(x), centers


@pytest.fixture(scope="module")
def data() -> tuple[list[str], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    return make_catalog()


@pytest.fixture(scope="module")
def catalog(
    data: tuple[list[str], npt.NDArray[np.float32], npt.NDArray[np.float32]],
) -> CatalogIndex:
    ids, x, _ = data
    return CatalogIndex(ids, x)


def cluster(content_id: str) -> int:
    return int(content_id.split("-")[1]) % N_CLUSTERS


class CannedTransport:
    """Acknowledges every delta and hands out one crafted GlobalPatterns payload."""

    def __init__(self, global_patterns: patterns_pb2.GlobalPatterns) -> None:
        self.payload = encode_payload(global_patterns)
        self.version = global_patterns.global_version

    def sync_patterns(
        self, request: sync_pb2.SyncPatternsRequest, timeout: float
    ) -> sync_pb2.SyncPatternsResponse:
        return sync_pb2.SyncPatternsResponse(
            acknowledged_version=request.local_version,
            global_patterns=self.payload,
            global_version=self.version,
        )

    def fetch_embeddings(
        self, request: sync_pb2.FetchEmbeddingsRequest, timeout: float
    ) -> sync_pb2.FetchEmbeddingsResponse:
        return sync_pb2.FetchEmbeddingsResponse()


def global_patterns(
    centers: npt.NDArray[np.float32],
    clusters: list[int],
    trending: list[tuple[str, float]] = (),  # type: ignore[assignment]
    bucket_context: patterns_pb2.PatternContext | None = None,
) -> patterns_pb2.GlobalPatterns:
    msg = patterns_pb2.GlobalPatterns(global_version=3)
    for c in clusters:
        msg.patterns.add(
            pattern_key=f"g-{c}",
            embedding=encode_embedding(centers[c]),
            quality=5.0,
            source_count=10,
            context=bucket_context or BUCKET.to_proto(),
            success_rate=0.9,
            round=3,
        )
    for cid, score in trending:
        msg.trending.add(content_id=cid, score=score)
    return msg


def brain_with_global(catalog: CatalogIndex, msg: patterns_pb2.GlobalPatterns) -> Brain:
    brain = Brain("tv", transport=CannedTransport(msg), catalog=catalog)
    result = brain.sync()
    assert result.ok, result.error
    return brain


def watch_cluster(brain: Brain, c: int, count: int = 4, ts: int = TS) -> list[str]:
    ids = [f"item-{c + N_CLUSTERS * j}" for j in range(count)]
    for cid in ids:
        brain.observe(ViewingEvent(cid, ts, 0.95))
    return ids


# ------------------------------------------------------------------------------ catalog


def test_catalog_search_and_lookup(
    data: tuple[list[str], npt.NDArray[np.float32], npt.NDArray[np.float32]],
    catalog: CatalogIndex,
) -> None:
    ids, x, _ = data
    assert len(catalog) == 400 and catalog.exact
    found, scores = catalog.search(x[5], 3)
    assert found[0] == "item-5" and scores[0] == pytest.approx(1.0, abs=1e-5)
    assert all(cluster(c) == 5 for c in found)
    assert scores.dtype == np.float32 and np.all(np.diff(scores) <= 1e-6)
    np.testing.assert_allclose(catalog.embedding_of("item-7"), x[7], atol=1e-6)
    assert "item-7" in catalog and "nope" not in catalog
    with pytest.raises(UnknownContentError):
        catalog.embedding_of("nope")
    batch_ids, batch_scores = catalog.search_batch(x[:3], 2)
    assert [row[0] for row in batch_ids] == ids[:3] and batch_scores.shape == (3, 2)
    found, _ = catalog.search(x[0], 10_000)
    assert len(found) == 400


@pytest.mark.parametrize(
    "query", [np.zeros(10), np.full(384, np.nan), np.zeros((2, 384)), "abc", np.zeros((1, 1, 384))]
)
def test_catalog_search_rejects_bad_queries(catalog: CatalogIndex, query: object) -> None:
    with pytest.raises(InvalidArgumentError):
        catalog.search(query, 3)  # type: ignore[arg-type]


def test_catalog_search_rejects_bad_k(catalog: CatalogIndex) -> None:
    for k in (0, -1, True, 2.5):
        with pytest.raises(InvalidArgumentError):
            catalog.search(np.ones(384, dtype=np.float32), k)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ids", "embeddings"),
    [
        (["a", "b"], np.ones((3, 384))),
        (["a", "a"], np.ones((2, 384))),
        (["a", ""], np.ones((2, 384))),
        (["a"], np.ones((1, 383))),
        (["a"], np.zeros((1, 384))),
        (["a"], np.full((1, 384), np.inf)),
        (["a"], [["x"] * 384]),
    ],
)
def test_catalog_rejects_bad_data(ids: list[str], embeddings: object) -> None:
    with pytest.raises(CatalogError):
        CatalogIndex(ids, embeddings)  # type: ignore[arg-type]


def test_hnsw_catalog_recall_against_exact() -> None:
    rng = np.random.default_rng(3)
    centers = normalize(rng.standard_normal((40, 384)))
    x = normalize(centers[rng.integers(0, 40, 3000)] + 0.08 * rng.standard_normal((3000, 384)))
    ids = [str(i) for i in range(3000)]
    hnsw = CatalogIndex(ids, x, exact_max_items=0, hnsw_m=16)
    exact = CatalogIndex(ids, x)
    assert not hnsw.exact and exact.exact
    queries = normalize(x[:50] + 0.05 * rng.standard_normal((50, 384)))
    got, _ = hnsw.search_batch(queries, 10)
    want, _ = exact.search_batch(queries, 10)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)])
    assert recall >= 0.9
    # reconstructed 8-bit vectors stay close to the originals
    assert float(hnsw.embedding_of("5") @ x[5]) > 0.995


def test_catalog_is_safe_for_concurrent_readers(catalog: CatalogIndex) -> None:
    queries = normalize(np.random.default_rng(9).standard_normal((16, 384)))
    expected = [catalog.search(q, 5)[0] for q in queries]
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for _ in range(20):
                for q, want in zip(queries, expected, strict=True):
                    assert catalog.search(q, 5)[0] == want
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# ------------------------------------------------------------------------------ recommend


def test_recommend_excludes_watched_and_respects_k(catalog: CatalogIndex) -> None:
    with Brain("tv", catalog=catalog) as brain:
        watched = watch_cluster(brain, 2, count=6)
        for k in (1, 5, 10, 30):
            recs = brain.recommend(k, timestamp_ms=TS)
            assert len(recs) == k
            ids = [r.content_id for r in recs]
            assert len(set(ids)) == k
            assert not set(ids) & set(watched)
        top = brain.recommend(5, timestamp_ms=TS)
        assert all(cluster(r.content_id) == 2 for r in top)
        assert all(r.reasons == (f"matches your {BUCKET.name} viewing",) for r in top)
        with_watched = brain.recommend(3, timestamp_ms=TS, exclude_watched=False)
        assert {r.content_id for r in with_watched} & set(watched)
        assert brain.recommend(0) == []
        assert len(brain.recommend(1000, timestamp_ms=TS)) == len(catalog) - len(watched)
        with pytest.raises(InvalidArgumentError):
            brain.recommend(-1)
        with pytest.raises(InvalidArgumentError):
            brain.recommend(True)
        with pytest.raises(InvalidArgumentError):
            brain.recommend(3, timestamp_ms=-5)
        stats = brain.stats()
        assert stats.recommendations_served >= 5
        assert 0 < stats.recommend_p50_ms <= stats.recommend_p99_ms


def test_heavy_viewer_still_gets_k_items() -> None:
    ids, x, _ = make_catalog(200)
    with Brain("tv", BrainConfig(candidate_multiplier=1)) as brain:
        brain.load_catalog(ids, x)
        for cid in ids[:190]:
            brain.observe(ViewingEvent(cid, TS, 0.95))
        recs = brain.recommend(10, timestamp_ms=TS)
        assert sorted(r.content_id for r in recs) == sorted(ids[190:])


def test_other_buckets_are_the_fallback(catalog: CatalogIndex) -> None:
    with Brain("tv", catalog=catalog) as brain:
        watch_cluster(brain, 4)
        morning = TS + 8 * 3600_000  # Wednesday 06:13 UTC
        assert bucket_from_timestamp(morning) != BUCKET
        recs = brain.recommend(3, timestamp_ms=morning)
        assert all(cluster(r.content_id) == 4 for r in recs)
        assert all(r.reasons == (REASON_HISTORY,) for r in recs)


def test_cold_start_without_anything_is_empty(catalog: CatalogIndex) -> None:
    with Brain("tv", catalog=catalog) as brain:
        assert brain.recommend(5, timestamp_ms=TS) == []
    with Brain("tv") as brain:  # no catalog either
        assert brain.recommend(5) == []


def test_cold_start_uses_global_patterns(
    data: tuple[list[str], npt.NDArray[np.float32], npt.NDArray[np.float32]],
    catalog: CatalogIndex,
) -> None:
    _, _, centers = data
    with brain_with_global(catalog, global_patterns(centers, [6])) as brain:
        recs = brain.recommend(5, timestamp_ms=TS)
        assert len(recs) == 5
        assert all(cluster(r.content_id) == 6 for r in recs)
        assert all(r.reasons == (REASON_GLOBAL,) for r in recs)
        assert brain.recommend(5, timestamp_ms=TS, use_global=False) == []
        stats = brain.stats()
        assert (stats.global_pattern_count, stats.global_version) == (1, 3)


def test_cold_start_with_trending_only(catalog: CatalogIndex) -> None:
    trending = [("item-11", 50.0), ("item-22", 80.0), ("item-33", 10.0), ("unknown", 99.0)]
    msg = patterns_pb2.GlobalPatterns(global_version=2)
    for cid, score in trending:
        msg.trending.add(content_id=cid, score=score)
    with brain_with_global(catalog, msg) as brain:
        recs = brain.recommend(10, timestamp_ms=TS)
        assert {r.content_id for r in recs} == {"item-11", "item-22", "item-33"}
        assert recs[0].content_id == "item-22" and recs[0].score == pytest.approx(1.0)
        assert all(r.reasons == (REASON_TRENDING,) for r in recs)
        brain.observe(ViewingEvent("item-22", TS, 0.5))
        assert "item-22" not in {r.content_id for r in brain.recommend(10, timestamp_ms=TS)}


def test_trending_without_a_catalog() -> None:
    msg = patterns_pb2.GlobalPatterns(global_version=2)
    msg.trending.add(content_id="a", score=2.0)
    msg.trending.add(content_id="b", score=4.0)
    brain = Brain("tv", transport=CannedTransport(msg))
    assert brain.sync().ok
    recs = brain.recommend(5)
    assert [(r.content_id, r.score) for r in recs] == [("b", 1.0), ("a", 0.5)]
    assert brain.recommend(5, use_global=False) == []
    brain.close()


def test_global_patterns_blend_into_local_and_use_global_false_ignores_them(
    data: tuple[list[str], npt.NDArray[np.float32], npt.NDArray[np.float32]],
    catalog: CatalogIndex,
) -> None:
    _, _, centers = data
    # The viewer likes cluster 1; the crowd's pattern nearest to that is a mix of 1 and 3.
    mixed = normalize(centers[1] + centers[3])
    msg = global_patterns(centers, [5], trending=[("item-15", 100.0)])  # cluster 7
    msg.patterns.add(
        pattern_key="mix",
        embedding=encode_embedding(mixed),
        quality=5.0,
        source_count=10,
        context=BUCKET.to_proto(),
        success_rate=0.9,
        round=3,
    )
    cfg = BrainConfig(global_weight=2.0, trend_weight=0.5)
    brain = Brain("tv", cfg, transport=CannedTransport(msg), catalog=catalog)
    assert brain.sync().ok
    watch_cluster(brain, 1)
    local_only = brain.recommend(8, timestamp_ms=TS, use_global=False)
    assert all(cluster(r.content_id) == 1 for r in local_only)
    assert all(r.reasons == (f"matches your {BUCKET.name} viewing",) for r in local_only)
    blended = brain.recommend(20, timestamp_ms=TS)
    clusters = {cluster(r.content_id) for r in blended}
    assert 3 in clusters and 5 not in clusters  # only the global pattern nearest the viewer's
    assert 3 not in {cluster(r.content_id) for r in brain.recommend(20, use_global=False)}
    assert any(REASON_GLOBAL in r.reasons for r in blended)
    assert any(r.content_id == "item-15" and REASON_TRENDING in r.reasons for r in blended)
    brain.close()


def test_mmr_prefers_diversity_and_lambda_one_is_relevance_order() -> None:
    a, b = normalize(np.eye(384, dtype=np.float32)[0]), normalize(np.eye(384, dtype=np.float32)[1])
    vectors = np.stack([a, a, a, b])
    relevance = np.array([1.0, 0.99, 0.98, 0.9], dtype=np.float32)
    assert list(mmr(vectors, relevance, 2, 1.0)) == [0, 1]
    assert list(mmr(vectors, relevance, 2, 0.5)) == [0, 3]
    assert list(mmr(vectors, relevance, 10, 0.5))[:2] == [0, 3]
    assert len(mmr(vectors, relevance, 10, 0.5)) == 4
    assert mmr(vectors, relevance, 0, 0.5).size == 0


def test_blend_global_picks_nearest_good_patterns() -> None:
    eye = np.eye(384, dtype=np.float32)
    patterns = GlobalSet.build(
        eye[:3], np.array([1.0, 4.0, 2.0], np.float32), np.array([0.9, 0.8, 0.7], np.float32)
    )
    vector, rate = blend_global(patterns, eye[0], top_n=1) or (None, 0.0)
    assert vector is not None and vector[0] == pytest.approx(1.0) and rate == pytest.approx(0.9)
    vector, _ = blend_global(patterns, None, top_n=1) or (None, 0.0)
    assert vector is not None and vector[1] == pytest.approx(1.0)  # highest quality
    assert blend_global(patterns, -eye[0] - eye[1] - eye[2], top_n=3) is None
