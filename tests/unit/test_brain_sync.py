"""sync(): delta building, acknowledgement bookkeeping, retries, global patterns; catalog fetch.

The transport here is an in-process test double of the brain's own `SyncTransport` interface;
tests against real gRPC servers live in tests/integration.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import zstandard

from omega.v1 import patterns_pb2, sync_pb2
from omega_brain import (
    Brain,
    BrainConfig,
    BrainError,
    CatalogError,
    CatalogIndex,
    GrpcTransport,
    SyncError,
    ViewingEvent,
    fetch_catalog,
)
from omega_brain.patterns import normalize
from omega_brain.transport import backoff_seconds
from omega_protocol import (
    ContextBucket,
    bucket_from_timestamp,
    decode_embedding,
    decode_payload,
    encode_embedding,
    encode_payload,
)

TS = 1_700_000_000_000  # Tuesday 22:13 UTC: night/weekday
FAST = BrainConfig(base_backoff_seconds=0.0, max_backoff_seconds=0.0)


def make_catalog(n: int = 64, seed: int = 0) -> tuple[list[str], npt.NDArray[np.float32]]:
    rng = np.random.default_rng(seed)
    return [f"item-{i}" for i in range(n)], normalize(rng.standard_normal((n, 384)))


@pytest.fixture(scope="module")
def catalog() -> CatalogIndex:
    ids, x = make_catalog()
    return CatalogIndex(ids, x)


Step = Callable[[sync_pb2.SyncPatternsRequest], sync_pb2.SyncPatternsResponse]


class FakeShard:
    """A `SyncTransport` that records requests; behaviour per call can be scripted."""

    def __init__(self, catalog_items: tuple[list[str], npt.NDArray[np.float32]] | None = None):
        self.requests: list[sync_pb2.SyncPatternsRequest] = []
        self.pulls: list[sync_pb2.SyncPatternsRequest] = []
        self.server_version = 0  # the device's last version the shard applied (pull answer)
        self.script: list[Exception | Step] = []
        self.global_patterns: patterns_pb2.GlobalPatterns | None = None
        self.items = catalog_items
        self.catalog_version = 1
        self.fetches: list[sync_pb2.FetchEmbeddingsRequest] = []

    def deltas(self) -> list[patterns_pb2.PatternDelta]:
        return [decode_payload(r.delta, patterns_pb2.PatternDelta) for r in self.requests]

    def sync_patterns(
        self, request: sync_pb2.SyncPatternsRequest, timeout: float
    ) -> sync_pb2.SyncPatternsResponse:
        assert timeout == FAST.timeout_seconds
        copy = sync_pb2.SyncPatternsRequest()
        copy.CopyFrom(request)
        if (
            request.local_version == 0
            and not decode_payload(request.delta, patterns_pb2.PatternDelta).ListFields()
        ):
            # A pull (a new store learning its version, or nothing to send): answered
            # directly, without consuming the script.
            self.pulls.append(copy)
            ack = self.server_version
        else:
            self.requests.append(copy)
            if self.script:
                step = self.script.pop(0)
                if isinstance(step, Exception):
                    raise step
                return step(request)
            ack = request.local_version
        response = sync_pb2.SyncPatternsResponse(acknowledged_version=ack)
        if self.global_patterns is not None:
            response.global_patterns.CopyFrom(encode_payload(self.global_patterns))
            response.global_version = self.global_patterns.global_version
        return response

    def fetch_embeddings(
        self, request: sync_pb2.FetchEmbeddingsRequest, timeout: float
    ) -> sync_pb2.FetchEmbeddingsResponse:
        self.fetches.append(request)
        if self.script:
            step = self.script.pop(0)
            assert isinstance(step, Exception)
            raise step
        assert self.items is not None
        ids, x = self.items
        start = int(request.page_token or 0)
        end = min(start + request.page_size, len(ids))
        response = sync_pb2.FetchEmbeddingsResponse(catalog_version=self.catalog_version)
        for i in range(start, end):
            response.items.add(
                content_id=ids[i],
                title=f"Title {i}",
                genres=["drama", "comedy"] if i % 2 else ["news"],
                embedding=encode_embedding(x[i], request.encoding),
                catalog_version=self.catalog_version,
            )
        response.next_page_token = str(end) if end < len(ids) else ""
        return response


def unavailable() -> SyncError:
    return SyncError("down", code=grpc.StatusCode.UNAVAILABLE, retryable=True)


def session(brain: Brain, items: list[int], completion: float = 0.95, ts: int = TS) -> None:
    for i in items:
        brain.observe(ViewingEvent(f"item-{i}", ts, completion, 1200.0))


# ----------------------------------------------------------------------------- deltas


def test_first_sync_sends_added_patterns_and_views(catalog: CatalogIndex) -> None:
    shard = FakeShard()
    with Brain("tv-1", FAST, transport=shard, catalog=catalog) as brain:
        session(brain, [1, 2, 2])
        result = brain.sync()
        assert result.ok and result.error is None
        assert (result.attempts, result.patterns_sent, result.acknowledged_version) == (1, 1, 3)
        assert result.bytes_up == shard.requests[0].ByteSize()
        assert 0 < result.bytes_up <= 1024  # one viewing session fits in 1 KB
        assert result.bytes_down >= 0 and result.latency_seconds >= 0
        request = shard.requests[0]
        assert (request.device_id, request.local_version, request.since_global_version) == (
            "tv-1",
            3,
            0,
        )
        delta = shard.deltas()[0]
        assert (delta.local_version, delta.base_version) == (3, 0)
        assert len(delta.added) == 1 and not delta.updated and not delta.removed
        pattern = delta.added[0]
        assert pattern.sample_count == 3
        assert pattern.success_rate == pytest.approx(4 / 5)
        assert pattern.embedding.encoding == patterns_pb2.EMBEDDING_ENCODING_INT8
        local = brain._patterns[bucket_from_timestamp(TS).index].state.embedding
        assert local is not None
        assert float(decode_embedding(pattern.embedding) @ local) > 0.999
        expected = bucket_from_timestamp(TS)
        assert ContextBucket(pattern.context.time_slot, pattern.context.day_type) == expected
        assert {(v.content_id, v.views) for v in delta.content_views} == {
            ("item-1", 1),
            ("item-2", 2),
        }
        assert brain.stats().pending_view_count == 0


def test_nothing_is_resent_after_ack_then_updates_follow(catalog: CatalogIndex) -> None:
    shard = FakeShard()
    with Brain("tv-1", FAST, transport=shard, catalog=catalog) as brain:
        session(brain, [1, 2])
        assert brain.sync().ok
        second = brain.sync()
        assert second.ok and second.patterns_sent == 0
        delta = shard.deltas()[1]
        assert not delta.added and not delta.updated and not delta.content_views
        assert (delta.local_version, delta.base_version) == (2, 2)

        session(brain, [3], completion=0.5)  # neutral: samples change, embedding does not
        assert brain.sync().ok
        delta = shard.deltas()[2]
        assert not delta.added and len(delta.updated) == 1
        update = delta.updated[0]
        assert update.pattern_id == shard.deltas()[0].added[0].pattern_id
        assert update.additional_samples == 1
        assert not update.HasField("embedding")
        assert update.success_rate == pytest.approx(3 / 4)

        session(brain, [4, 5])  # successes move the embedding
        other_bucket = TS + 10 * 3600_000  # Wednesday 08:13 UTC: morning
        session(brain, [6], ts=other_bucket)
        result = brain.sync()
        assert result.ok and result.patterns_sent == 2
        delta = shard.deltas()[3]
        assert (delta.local_version, delta.base_version) == (6, 3)
        # The moved pattern is re-sent in full (the server upserts it), with its total count.
        assert not delta.updated and len(delta.added) == 2
        moved = next(p for p in delta.added if p.pattern_id == update.pattern_id)
        assert moved.sample_count == 5 and moved.HasField("embedding")
        new = next(p for p in delta.added if p.pattern_id != update.pattern_id)
        assert new.context.time_slot == patterns_pb2.TIME_SLOT_MORNING


def test_failures_only_bucket_is_not_sent_until_it_has_an_embedding(
    catalog: CatalogIndex,
) -> None:
    shard = FakeShard()
    with Brain("tv-1", FAST, transport=shard, catalog=catalog) as brain:
        session(brain, [1, 2], completion=0.05)
        result = brain.sync()
        assert result.ok and result.patterns_sent == 0
        assert len(shard.deltas()[0].content_views) == 2  # views still count for trends
        session(brain, [3])
        brain.sync()
        added = shard.deltas()[1].added
        assert len(added) == 1 and added[0].sample_count == 3
        assert added[0].success_rate == pytest.approx(2 / 5)


def test_retry_on_unavailable_then_success(catalog: CatalogIndex) -> None:
    shard = FakeShard()
    shard.script = [unavailable(), unavailable()]
    with Brain("tv-1", FAST, transport=shard, catalog=catalog) as brain:
        session(brain, [1])
        result = brain.sync()
        assert result.ok and result.attempts == 3
        assert result.acknowledged_version == 1
        # every attempt carried the same idempotency key
        assert {(r.device_id, r.local_version) for r in shard.requests} == {("tv-1", 1)}
        assert brain.stats().syncs_ok == 1


def test_retries_stop_after_max_attempts(catalog: CatalogIndex) -> None:
    shard = FakeShard()
    shard.script = [unavailable() for _ in range(20)]
    with Brain("tv-1", FAST, transport=shard, catalog=catalog) as brain:
        session(brain, [1])
        result = brain.sync()
        assert not result.ok and result.attempts == FAST.max_attempts
        assert result.error is not None and "UNAVAILABLE" in result.error
        assert result.acknowledged_version == 0
        assert brain.stats().syncs_failed == 1


@pytest.mark.parametrize(
    "error",
    [
        SyncError("bad", code=grpc.StatusCode.INVALID_ARGUMENT),
        RuntimeError("transport bug"),
    ],
)
def test_non_retryable_error_keeps_the_delta(catalog: CatalogIndex, error: Exception) -> None:
    shard = FakeShard()
    shard.script = [error]
    with Brain("tv-1", FAST, transport=shard, catalog=catalog) as brain:
        session(brain, [1, 2])
        failed = brain.sync()
        assert not failed.ok and failed.attempts == 1 and failed.error
        assert failed.patterns_sent == 1 and failed.bytes_down == 0
        stats = brain.stats()
        assert (stats.acked_version, stats.local_version, stats.pending_view_count) == (0, 2, 2)
        retried = brain.sync()
        assert retried.ok
        first, *again = shard.deltas()
        # The very same delta went again (an unknown outcome is first settled unchanged,
        # then the sync itself runs at the same version: nothing was observed since).
        assert again[0] == first
        assert all(d.local_version == first.local_version for d in again)
        assert len(first.added) == 1


def test_versions_advance_only_on_success_and_keep_concurrent_changes(
    catalog: CatalogIndex,
) -> None:
    shard = FakeShard()
    with Brain("tv-1", FAST, transport=shard, catalog=catalog) as brain:

        def observe_during_sync(
            request: sync_pb2.SyncPatternsRequest,
        ) -> sync_pb2.SyncPatternsResponse:
            session(brain, [9])  # arrives while the request is in flight
            return sync_pb2.SyncPatternsResponse(acknowledged_version=request.local_version)

        session(brain, [1])
        shard.script = [observe_during_sync]
        assert brain.sync().ok
        stats = brain.stats()
        assert (stats.acked_version, stats.local_version, stats.pending_view_count) == (1, 2, 1)
        brain.sync()
        delta = shard.deltas()[1]
        assert delta.base_version == 1 and delta.local_version == 2
        # The success moved the embedding: the pattern is re-sent in full with both samples.
        assert len(delta.added) == 1 and delta.added[0].sample_count == 2
        assert [(v.content_id, v.views) for v in delta.content_views] == [("item-9", 1)]


def test_ack_below_sent_version_is_not_applied(catalog: CatalogIndex) -> None:
    shard = FakeShard()
    with Brain("tv-1", FAST, transport=shard, catalog=catalog) as brain:
        session(brain, [1])
        assert brain.sync().ok
        session(brain, [2])
        # The server lost this device's state: it acknowledges nothing.
        shard.script = [lambda r: sync_pb2.SyncPatternsResponse(acknowledged_version=0)]
        result = brain.sync()
        assert not result.ok and result.error and "below the sent" in result.error
        assert result.acknowledged_version == 0
        assert brain.sync().ok
        delta = shard.deltas()[-1]
        assert len(delta.added) == 1 and delta.added[0].sample_count == 2  # re-sent in full


def test_ack_above_the_sent_version_is_not_taken_for_an_ack(catalog: CatalogIndex) -> None:
    # The shard holds a later version than the device sent (its store was replaced): the
    # delta was not applied, so nothing may be marked acknowledged; it is re-sent past it.
    shard = FakeShard()
    with Brain("tv-1", FAST, transport=shard, catalog=catalog) as brain:
        session(brain, [1])
        shard.script = [lambda r: sync_pb2.SyncPatternsResponse(acknowledged_version=40)]
        first = brain.sync()
        assert not first.ok and "above the sent" in (first.error or "")
        assert brain.stats().acked_version == 0
        second = brain.sync()
        assert second.ok and second.acknowledged_version == 41
        assert shard.requests[-1].local_version == 41
        assert [p.pattern_id for p in shard.deltas()[-1].added] == [
            p.pattern_id for p in shard.deltas()[0].added
        ]
        session(brain, [2])
        assert brain.stats().local_version == 42


def test_factory_reset_store_learns_the_server_version_and_resends(
    catalog: CatalogIndex,
) -> None:
    shard = FakeShard()
    shard.server_version = 57  # the device's previous life
    with Brain("tv-1", FAST, transport=shard, catalog=catalog) as brain:
        session(brain, [1, 2])
        result = brain.sync()
        assert result.ok and result.acknowledged_version == 58
        assert len(shard.pulls) == 1 and shard.pulls[0].local_version == 0
        assert [r.local_version for r in shard.requests] == [58]
        assert len(shard.deltas()[0].added) == result.patterns_sent > 0
        assert brain.sync().ok
        assert len(shard.pulls) == 1  # the version is learned once per store


@pytest.mark.parametrize("hostile", [2**63 - 1, 2**64 - 1, 1 << 54])
def test_an_implausible_server_version_cannot_wedge_the_device(
    catalog: CatalogIndex, hostile: int, tmp_path: Path
) -> None:
    shard = FakeShard()
    shard.server_version = hostile
    cfg = dataclasses.replace(FAST, store_path=tmp_path / "tv.db")
    with Brain("tv-1", cfg, transport=shard, catalog=catalog) as brain:
        session(brain, [1])
        assert brain.sync().ok  # the learning pull's answer is ignored
        shard.script = [lambda r: sync_pb2.SyncPatternsResponse(acknowledged_version=hostile)]
        session(brain, [2])
        result = brain.sync()
        assert not result.ok and "implausible" in (result.error or "")
        session(brain, [3])  # observe() keeps working
        local = brain.stats().local_version
        assert local < 100
    with Brain("tv-1", cfg, transport=shard, catalog=catalog) as reopened:
        session(reopened, [4])
        assert reopened.stats().local_version == local + 1
        assert reopened.sync().ok


def test_redirect_is_reported_and_nothing_applied(catalog: CatalogIndex) -> None:
    shard = FakeShard()
    shard.script = [lambda r: sync_pb2.SyncPatternsResponse(redirect_shard_id="shard-7")]
    with Brain("tv-1", FAST, transport=shard, catalog=catalog) as brain:
        session(brain, [1])
        result = brain.sync()
        assert not result.ok and result.redirect_shard_id == "shard-7"
        assert result.error and "shard-7" in result.error and result.attempts == 1
        assert brain.stats().acked_version == 0


def test_global_patterns_and_trends_are_applied(catalog: CatalogIndex) -> None:
    shard = FakeShard()
    _, x = make_catalog()
    msg = patterns_pb2.GlobalPatterns(global_version=5)
    evening = ContextBucket(patterns_pb2.TIME_SLOT_EVENING, patterns_pb2.DAY_TYPE_WEEKDAY)
    msg.patterns.add(
        pattern_key="k1", embedding=encode_embedding(x[3]), quality=2.0, context=evening.to_proto()
    )
    msg.patterns.add(pattern_key="k2", embedding=encode_embedding(x[4]), quality=1.0)  # no context
    msg.patterns.add(pattern_key="bad-dim", embedding=encode_embedding(x[5][:100]), quality=1.0)
    msg.patterns.add(pattern_key="", embedding=encode_embedding(x[5]), quality=1.0)
    msg.patterns.add(pattern_key="nan", embedding=encode_embedding(x[5]), quality=float("nan"))
    msg.trending.add(content_id="item-7", score=3.0)
    shard.global_patterns = msg
    with Brain("tv-1", FAST, transport=shard, catalog=catalog) as brain:
        result = brain.sync()
        assert result.ok and result.global_patterns_received == 2
        assert result.global_version == 5
        stats = brain.stats()
        assert (stats.global_pattern_count, stats.trending_count, stats.global_version) == (2, 1, 5)
        rows = {r.pattern_key: r for r in brain._store.global_patterns()}
        assert rows["k1"].bucket == evening.index and rows["k1"].round == 5
        assert rows["k2"].bucket == -1
        # The next request says which round the brain already has.
        shard.global_patterns = None
        brain.sync()
        assert shard.pulls[-1].since_global_version == 5  # nothing to send: a pull
        assert brain.stats().global_pattern_count == 2  # an empty reply keeps them


def test_bad_global_payload_is_refused_but_the_ack_counts(catalog: CatalogIndex) -> None:
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (8 << 20))
    payload = sync_pb2.CompressedPayload(codec=sync_pb2.CODEC_ZSTD, raw_size=1000, data=bomb)
    shard = FakeShard()
    shard.script = [
        lambda r: sync_pb2.SyncPatternsResponse(
            acknowledged_version=r.local_version, global_patterns=payload, global_version=9
        )
    ]
    with Brain("tv-1", FAST, transport=shard, catalog=catalog) as brain:
        session(brain, [1])
        result = brain.sync()
        assert not result.ok and result.error and "refused" in result.error
        assert result.acknowledged_version == 1  # the server did apply the delta
        assert result.global_version == 0  # so the round is asked for again


def test_sync_without_transport_raises(catalog: CatalogIndex) -> None:
    with Brain("tv-1", catalog=catalog) as brain:
        with pytest.raises(BrainError, match="transport"):
            brain.sync()
        with pytest.raises(BrainError, match="transport"):
            brain.fetch_catalog()


def test_sync_state_survives_reopen(tmp_path: Path, catalog: CatalogIndex) -> None:
    shard = FakeShard()
    cfg = BrainConfig(store_path=tmp_path / "tv.db", base_backoff_seconds=0.0)
    with Brain("tv-1", cfg, transport=shard, catalog=catalog) as brain:
        session(brain, [1, 2])
        assert brain.sync().ok
    with Brain("tv-1", cfg, transport=shard, catalog=catalog) as brain:
        session(brain, [3])
        assert brain.sync().ok
        delta = shard.deltas()[-1]
        assert not delta.updated and len(delta.added) == 1  # moved: re-sent in full
        assert delta.base_version == 2
        assert brain.stats().syncs_ok == 2


def test_backoff_is_full_jitter_below_an_exponential_cap() -> None:
    rng = random.Random(1)
    for retry, cap in [(1, 0.05), (2, 0.1), (3, 0.2), (10, 2.0), (500, 2.0)]:
        delays = [backoff_seconds(retry, 0.05, 2.0, rng) for _ in range(200)]
        assert all(0.0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.8 and min(delays) < cap * 0.2
    assert backoff_seconds(3, 0.0, 2.0, rng) == 0.0


def test_grpc_transport_wraps_connection_errors() -> None:
    transport = GrpcTransport("127.0.0.1:1", plaintext=True)  # nothing listens on port 1
    try:
        with pytest.raises(SyncError) as info:
            transport.sync_patterns(sync_pb2.SyncPatternsRequest(device_id="x"), 2.0)
        assert info.value.code is grpc.StatusCode.UNAVAILABLE and info.value.retryable
    finally:
        transport.close()
    with pytest.raises(SyncError):
        transport.fetch_embeddings(sync_pb2.FetchEmbeddingsRequest(), 1.0)  # closed channel


# ------------------------------------------------------------------------------ catalog


def test_fetch_catalog_pages_through_everything() -> None:
    ids, x = make_catalog(23)
    shard = FakeShard((ids, x))
    fetched = fetch_catalog(shard, page_size=5)
    assert len(shard.fetches) == 5 and fetched.content_ids == ids
    assert fetched.catalog_version == 1
    assert fetched.embeddings.shape == (23, 384) and fetched.embeddings.dtype == np.float32
    assert np.all(np.sum(fetched.embeddings * x, axis=1) > 0.999)
    assert fetched.titles[3] == "Title 3" and fetched.genres[3] == ["drama", "comedy"]
    index = CatalogIndex(fetched.content_ids, fetched.embeddings, titles=fetched.titles)
    assert index.search(x[4], 1)[0] == ["item-4"]


def test_fetch_catalog_refuses_bad_items_and_loops() -> None:
    class Bad(FakeShard):
        token = ""
        embedding = patterns_pb2.Embedding()

        def fetch_embeddings(
            self, request: sync_pb2.FetchEmbeddingsRequest, timeout: float
        ) -> sync_pb2.FetchEmbeddingsResponse:
            response = sync_pb2.FetchEmbeddingsResponse(next_page_token=self.token)
            response.items.add(content_id="a", embedding=self.embedding)
            return response

    bad = Bad()
    bad.token, bad.embedding = "", encode_embedding(np.zeros(10))
    with pytest.raises(CatalogError):
        fetch_catalog(bad)
    bad.token, bad.embedding = "same", encode_embedding(np.ones(384))
    with pytest.raises(SyncError, match="twice"):
        fetch_catalog(bad)


def test_brain_fetch_catalog_then_incremental_update(tmp_path: Path) -> None:
    ids, x = make_catalog(30)
    shard = FakeShard((ids, x))
    cfg = BrainConfig(store_path=tmp_path / "tv.db", catalog_page_size=7, base_backoff_seconds=0)
    with Brain("tv-1", cfg, transport=shard) as brain:
        shard.script = [unavailable()]  # the first page is retried
        assert brain.fetch_catalog() == 30
        assert brain.stats().catalog_version == 1
        assert brain.catalog is not None and brain.catalog.title_of("item-2") == "Title 2"
        session(brain, [1])
        # Version 2 changes one item and adds one.
        new_ids = ["item-5", "item-new"]
        new_x = normalize(np.random.default_rng(5).standard_normal((2, 384)))
        shard.items, shard.catalog_version = (new_ids, new_x), 2
        assert brain.fetch_catalog() == 31
        assert shard.fetches[-1].since_catalog_version == 1
        assert float(brain.catalog.embedding_of("item-5") @ new_x[0]) > 0.999
        shard.items = ([], np.zeros((0, 384), np.float32))
        assert brain.fetch_catalog() == 31  # nothing new: no rebuild
    with Brain("tv-1", cfg) as again:
        assert again.catalog is not None and len(again.catalog) == 31
        assert again.stats().catalog_version == 2


def test_failed_fetch_changes_nothing(tmp_path: Path) -> None:
    ids, x = make_catalog(10)
    shard = FakeShard((ids, x))
    shard.script = [SyncError("no", code=grpc.StatusCode.PERMISSION_DENIED)]
    with Brain("tv-1", FAST, transport=shard) as brain:
        with pytest.raises(SyncError):
            brain.fetch_catalog()
        assert brain.catalog is None and brain.stats().catalog_version == 0


def test_concurrent_observe_recommend_and_sync(catalog: CatalogIndex) -> None:
    shard = FakeShard()
    errors: list[BaseException] = []
    with Brain("tv-1", FAST, transport=shard, catalog=catalog) as brain:

        def run(work: Callable[[int], object]) -> None:
            try:
                for i in range(40):
                    work(i)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        workers = [
            threading.Thread(target=run, args=(lambda i: session(brain, [i % 60]),)),
            threading.Thread(target=run, args=(lambda i: session(brain, [(i * 7) % 60], 0.1),)),
            threading.Thread(target=run, args=(lambda i: brain.recommend(5, timestamp_ms=TS),)),
            threading.Thread(target=run, args=(lambda i: brain.sync(),)),
        ]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        assert not errors
        assert brain.sync().ok
        stats = brain.stats()
        assert stats.local_version == 80 and stats.acked_version == 80
        assert stats.pending_view_count == 0
        # Replaying the deltas as the server does (added: upsert of the full count, updated:
        # additional samples) counts every sample exactly once.
        counts: dict[str, int] = {}
        for delta in shard.deltas():
            for p in delta.added:
                counts[p.pattern_id] = p.sample_count
            for u in delta.updated:
                counts[u.pattern_id] += u.additional_samples
        assert sum(counts.values()) == 80
        views = sum(v.views for d in shard.deltas() for v in d.content_views)
        assert views == 80


def test_retries_stop_at_the_time_budget_and_honour_the_server_hint() -> None:
    from omega_brain.transport import RetryOutcome, call_with_retries

    now = [0.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    def down() -> None:
        raise SyncError("down", code=grpc.StatusCode.UNAVAILABLE, retryable=True)

    outcome = RetryOutcome()
    with pytest.raises(SyncError):
        call_with_retries(
            down,
            max_attempts=100,
            base_backoff_seconds=1.0,
            max_backoff_seconds=1.0,
            rng=random.Random(3),
            outcome=outcome,
            sleep=sleep,
            budget_seconds=10.0,
            clock=lambda: now[0],
        )
    assert sum(waits) <= 10.0 and outcome.attempts == len(waits) + 1 > 10

    def limited() -> None:
        raise SyncError(
            "slow down",
            code=grpc.StatusCode.RESOURCE_EXHAUSTED,
            retryable=True,
            retry_after_seconds=2.5,
        )

    waits.clear()
    with pytest.raises(SyncError):
        call_with_retries(
            limited,
            max_attempts=3,
            base_backoff_seconds=0.01,
            max_backoff_seconds=0.01,
            rng=random.Random(3),
            outcome=RetryOutcome(),
            sleep=sleep,
        )
    assert waits == [2.5, 2.5]  # the hint, longer than the backoff, is waited


def test_the_default_retries_ride_out_a_replica_restart() -> None:
    # A shard that refuses connections for 3 s (a replica restart), with the brain's default
    # retry settings: the sync's retries span it (seeded jitter, simulated time).
    from omega_brain.transport import RetryOutcome, call_with_retries

    cfg = BrainConfig()
    now = [0.0]

    def restarting() -> str:
        now[0] += 0.01
        if now[0] < 3.0:
            raise SyncError("refused", code=grpc.StatusCode.UNAVAILABLE, retryable=True)
        return "ok"

    for seed in range(50):
        now[0] = 0.0

        def sleep(seconds: float) -> None:
            now[0] += seconds

        assert (
            call_with_retries(
                restarting,
                max_attempts=cfg.max_attempts,
                base_backoff_seconds=cfg.base_backoff_seconds,
                max_backoff_seconds=cfg.max_backoff_seconds,
                rng=random.Random(seed),
                outcome=RetryOutcome(),
                sleep=sleep,
                budget_seconds=cfg.retry_budget_seconds,
                clock=lambda: now[0],
            )
            == "ok"
        )


def test_the_shard_s_pace_is_kept_for_the_host(catalog: CatalogIndex) -> None:
    shard = FakeShard()
    shard.script = [
        lambda r: sync_pb2.SyncPatternsResponse(
            acknowledged_version=r.local_version, next_sync_after_ms=300_000
        )
    ]
    with Brain("tv-1", FAST, transport=shard, catalog=catalog, clock=lambda: 1000.0) as brain:
        assert brain.stats().next_sync_at_ms == 0
        session(brain, [1])
        assert brain.sync().ok
        assert brain.stats().next_sync_at_ms == 1_000_000 + 300_000


def test_a_call_before_the_shard_s_pace_sends_nothing(catalog: CatalogIndex) -> None:
    shard = FakeShard()
    paced = lambda r: sync_pb2.SyncPatternsResponse(  # noqa: E731
        acknowledged_version=r.local_version, next_sync_after_ms=300_000
    )
    shard.script = [paced, paced]
    now = [1000.0]
    with Brain("tv-1", FAST, transport=shard, catalog=catalog, clock=lambda: now[0]) as brain:
        session(brain, [1])
        first = brain.sync()
        assert first.ok and first.next_sync_at_ms == 1_300_000
        session(brain, [2])
        now[0] = 1299.9  # 100 ms early
        early = brain.sync()
        assert early.paced and not early.ok and early.attempts == 0
        assert early.next_sync_at_ms == 1_300_000 and "100 ms" in (early.error or "")
        assert len(shard.requests) == 1 and brain.stats().syncs_failed == 0
        now[0] = 1300.0  # due: the new viewing goes out
        due = brain.sync()
        assert due.ok and not due.paced and due.patterns_sent > 0 and len(shard.requests) == 2


def test_a_clock_that_jumped_back_does_not_silence_the_device(catalog: CatalogIndex) -> None:
    shard = FakeShard()
    shard.script = [
        lambda r: sync_pb2.SyncPatternsResponse(
            acknowledged_version=r.local_version, next_sync_after_ms=300_000
        )
    ]
    now = [1_000_000.0]
    with Brain("tv-1", FAST, transport=shard, catalog=catalog, clock=lambda: now[0]) as brain:
        session(brain, [1])
        assert brain.sync().ok
        now[0] -= 7 * 3600  # the clock went back 7 h: the 5 min pause now looks like 7 h
        assert brain.sync().ok  # longer than max_sync_pause_seconds (6 h): sent anyway


def test_pacing_can_be_turned_off_for_replays(catalog: CatalogIndex) -> None:
    shard = FakeShard()
    paced = lambda r: sync_pb2.SyncPatternsResponse(  # noqa: E731
        acknowledged_version=r.local_version, next_sync_after_ms=300_000
    )
    shard.script = [paced, paced]
    config = dataclasses.replace(FAST, honour_sync_pace=False)
    with Brain("tv-1", config, transport=shard, catalog=catalog, clock=lambda: 1000.0) as brain:
        session(brain, [1])
        assert brain.sync().ok
        session(brain, [2])
        assert brain.sync().ok and len(shard.requests) == 2


def test_a_lost_reply_is_settled_before_newer_changes(catalog: CatalogIndex) -> None:
    # The shard applied version 2 but its answer was lost; two more viewings follow. The
    # next sync sends version 2 again unchanged (a duplicate for the shard), then version 4
    # with only what is new: no view or sample is counted twice.
    shard = FakeShard()
    applied: list[patterns_pb2.PatternDelta] = []

    def lost(r: sync_pb2.SyncPatternsRequest) -> sync_pb2.SyncPatternsResponse:
        applied.append(decode_payload(r.delta, patterns_pb2.PatternDelta))
        raise SyncError("deadline", code=grpc.StatusCode.DEADLINE_EXCEEDED, retryable=False)

    shard.script = [lost]
    with Brain("tv-1", FAST, transport=shard, catalog=catalog) as brain:
        session(brain, [1, 2])
        assert not brain.sync().ok
        session(brain, [3, 4])
        assert brain.sync().ok
        versions = [r.local_version for r in shard.requests]
        assert versions == [2, 2, 4]
        resent, newer = shard.deltas()[1:]
        assert resent == applied[0]
        assert sum(v.views for v in newer.content_views) == 2  # items 3 and 4 only
        assert brain.stats().acked_version == 4


# ----------------------------------------------------------------------------- redirects

NIGHT_A = TS  # Tuesday 22:13 UTC: night/weekday
MORNING = TS + 10 * 3600_000  # Wednesday 08:13 UTC: morning/weekday


def redirect_to(shard_id: str) -> Step:
    return lambda r: sync_pb2.SyncPatternsResponse(redirect_shard_id=shard_id)


class Router:
    """The firmware's transport: re-pointed at another shard after a redirect."""

    def __init__(self, target: FakeShard) -> None:
        self.target = target

    def sync_patterns(
        self, request: sync_pb2.SyncPatternsRequest, timeout: float
    ) -> sync_pb2.SyncPatternsResponse:
        return self.target.sync_patterns(request, timeout)


def _synced_then_redirected(brain: Brain, old: FakeShard) -> tuple[set[str], int]:
    """Two patterns and four views acknowledged by ``old``, one view pending; then ``old``
    redirects. Returns the pattern ids and the local version."""
    session(brain, [1, 2, 2])
    session(brain, [3], ts=MORNING)
    first = brain.sync()
    assert first.ok and first.patterns_sent == 2 and first.model_update_sent
    ids = {p.pattern_id for p in old.deltas()[0].added}
    assert len(ids) == 2
    session(brain, [4], completion=0.5)  # a view (and samples) the old shard never saw
    old.script = [redirect_to("shard-1")]
    result = brain.sync()
    assert not result.ok and result.redirect_shard_id == "shard-1"
    stats = brain.stats()
    assert (stats.acked_version, stats.syncs_redirected, stats.syncs_failed) == (0, 1, 1)
    assert stats.pending_view_count == 1
    assert brain._ctx.store.unconfirmed_send() is None  # nothing was applied
    assert brain._ctx.store.acked() == {}
    assert brain._ctx.state["server_version_known"] == 0
    return ids, stats.local_version


def _assert_full_resend(new: FakeShard, ids: set[str], local_version: int) -> None:
    """``new`` was first pulled, then sent every pattern from base 0 past its version, the
    pending view only and the model update."""
    assert [p.local_version for p in new.pulls] == [0]
    assert len(new.requests) == 1
    request, delta = new.requests[0], new.deltas()[0]
    expected = (
        local_version if new.server_version == 0 else max(local_version, new.server_version) + 1
    )
    assert request.local_version == delta.local_version == expected > new.server_version
    assert delta.base_version == 0
    assert not delta.updated
    assert {p.pattern_id for p in delta.added} == ids
    # Full patterns with their total sample counts: 3 + 1 at night, 1 in the morning.
    assert sorted(p.sample_count for p in delta.added) == [1, 4]
    assert all(p.HasField("embedding") for p in delta.added)
    # Views the old shard acknowledged were counted there: only the pending one is sent.
    assert [(v.content_id, v.views) for v in delta.content_views] == [("item-4", 1)]
    assert delta.HasField("model_update")  # sent again, as after a factory reset


@pytest.mark.parametrize("known_version", [0, 50], ids=["new-shard", "shard-knew-it"])
def test_a_redirected_device_sends_every_pattern_to_its_next_shard(
    catalog: CatalogIndex, tmp_path: Path, known_version: int
) -> None:
    # "new-shard": a shard added; "shard-knew-it": redirected back to a shard that held the
    # device before (a shard removed), at a version above the device's.
    old, new = FakeShard(), FakeShard()
    new.server_version = known_version
    router = Router(old)
    cfg = dataclasses.replace(FAST, store_path=tmp_path / "tv.db")
    with Brain("tv-1", cfg, transport=router, catalog=catalog) as brain:
        ids, local_version = _synced_then_redirected(brain, old)
        router.target = new
        result = brain.sync()
        assert result.ok and result.patterns_sent == 2
        _assert_full_resend(new, ids, local_version)
        assert result.acknowledged_version == new.requests[0].local_version
        stats = brain.stats()
        assert stats.pending_view_count == 0 and stats.syncs_redirected == 1
        # Then as usual: no second pull, nothing re-sent.
        again = brain.sync()
        assert again.ok and again.patterns_sent == 0 and len(new.pulls) == 1
        assert not new.deltas()[1].content_views


def test_a_redirect_is_remembered_across_a_restart(catalog: CatalogIndex, tmp_path: Path) -> None:
    # The firmware closes the brain on the redirect and opens it again on the same store
    # with a transport to the new shard.
    old, new = FakeShard(), FakeShard()
    cfg = dataclasses.replace(FAST, store_path=tmp_path / "tv.db")
    with Brain("tv-1", cfg, transport=old, catalog=catalog) as brain:
        ids, local_version = _synced_then_redirected(brain, old)
    with Brain("tv-1", cfg, transport=new, catalog=catalog) as brain:
        stats = brain.stats()
        assert (stats.acked_version, stats.syncs_redirected) == (0, 1)
        assert brain.sync().ok
        _assert_full_resend(new, ids, local_version)
    with Brain("tv-1", cfg, transport=new, catalog=catalog) as brain:
        assert brain.sync().ok and len(new.pulls) == 1  # learned once, not per open


def test_a_redirect_loop_does_not_grow_anything(catalog: CatalogIndex, tmp_path: Path) -> None:
    # Two shards with mismatched maps send the device to each other: each redirect only
    # rewrites the same state; the full re-send happens once, at the first accepted sync.
    old, a, b = FakeShard(), FakeShard(), FakeShard()
    router = Router(old)
    cfg = dataclasses.replace(FAST, store_path=tmp_path / "tv.db")
    with Brain("tv-1", cfg, transport=router, catalog=catalog) as brain:
        ids, local_version = _synced_then_redirected(brain, old)
        a.script = [redirect_to("shard-b") for _ in range(5)]
        b.script = [redirect_to("shard-a") for _ in range(5)]
        sizes = set()
        for i in range(10):
            router.target = a if i % 2 == 0 else b
            result = brain.sync()
            assert not result.ok and result.redirect_shard_id in ("shard-a", "shard-b")
            sizes.add(result.bytes_up)
        assert len(sizes) == 1  # the same request each time: nothing accumulates
        stats = brain.stats()
        assert (stats.local_version, stats.acked_version) == (local_version, 0)
        assert stats.syncs_redirected == 11 and stats.pending_view_count == 1
        assert brain._ctx.store.unconfirmed_send() is None
        final = FakeShard()
        router.target = final
        assert brain.sync().ok
        _assert_full_resend(final, ids, local_version)
