"""Light synthetic devices and fleet measurements: deltas with the brain's codec and sizes,
device state across syncs, HDR histograms merged across workers."""

from __future__ import annotations

import numpy as np
import pytest

from omega.v1 import patterns_pb2, sync_pb2
from omega_brain import Brain, BrainConfig, CatalogIndex, ViewingEvent
from omega_protocol import BUCKET_COUNT, bucket_from_timestamp, decode_embedding, decode_payload
from omega_simulator.fleet_catalog import CatalogTaste, synthetic_catalog
from omega_simulator.fleet_devices import SIM_EPOCH_MS, DeviceFleet
from omega_simulator.fleet_measure import Recorder, latency_histogram, percentiles_ms

EVENING_MS = SIM_EPOCH_MS + 19 * 3_600_000  # 19:00 of a Tuesday


class _Recorder:
    """A transport that acknowledges every delta and keeps the requests."""

    def __init__(self) -> None:
        self.requests: list[sync_pb2.SyncPatternsRequest] = []

    def sync_patterns(
        self, request: sync_pb2.SyncPatternsRequest, timeout: float
    ) -> sync_pb2.SyncPatternsResponse:
        self.requests.append(request)
        return sync_pb2.SyncPatternsResponse(acknowledged_version=request.local_version)

    def fetch_embeddings(self, request: object, timeout: float) -> object:
        raise NotImplementedError

    def fetch_model(self, request: object, timeout: float) -> object:
        raise NotImplementedError

    def forget_device(self, request: object, timeout: float) -> object:
        raise NotImplementedError


@pytest.fixture(scope="module")
def catalog() -> tuple[list[str], np.ndarray]:
    return synthetic_catalog(1000, 20, seed=3)


def _brain_session_request_bytes(ids: list[str], emb: np.ndarray, session: int) -> int:
    """A real brain's steady-state sync after a session of five viewings (its second sync, as
    in bench/sync_load.py: the first carries the one-off model contribution)."""
    recorder = _Recorder()
    with Brain(
        f"brain-{session}",
        BrainConfig(honour_sync_pace=False),
        transport=recorder,  # type: ignore[arg-type]
        catalog=CatalogIndex(ids, emb),
    ) as brain:
        for day in range(2):
            for i in range(5):
                started = EVENING_MS + day * 86_400_000 + i * 1_800_000
                item = ids[(session * 37 + day * 5 + i * 11) % len(ids)]
                brain.observe(ViewingEvent(item, started, completion=0.95))
            assert brain.sync().ok
    return len(recorder.requests[-1].SerializeToString())


def test_synthetic_session_delta_is_the_size_of_a_brains(
    catalog: tuple[list[str], np.ndarray],
) -> None:
    ids, emb = catalog
    brain_sizes = [_brain_session_request_bytes(ids, emb, s) for s in range(3)]
    taste = CatalogTaste.from_embeddings(ids, emb, 20, seed=0)
    fleet = DeviceFleet(np.arange(200, dtype=np.int64), taste, "sim", seed=1)
    sizes = []
    for k in range(len(fleet)):
        # one evening session of five viewings, as the brain's
        fleet.views_per_day = 0.0
        bucket = bucket_from_timestamp(EVENING_MS).index
        fleet.samples[k, bucket] = 5
        fleet.successes[k, bucket] = 4
        fleet.changed[k] = 1 << bucket
        fleet.pending_views[k] = 5
        fleet.local_version[k] = 5
        body, version = fleet.request(k, EVENING_MS)
        assert version == 5
        sizes.append(len(body))
    synthetic = float(np.median(sizes))
    real = float(np.median(brain_sizes))
    print(f"synthetic median {synthetic:.0f} B, brain {brain_sizes}")
    assert real / 2 <= synthetic <= real * 2, (synthetic, brain_sizes)


def test_delta_uses_the_brain_codec_and_acknowledgement_clears_it(
    catalog: tuple[list[str], np.ndarray],
) -> None:
    ids, emb = catalog
    taste = CatalogTaste.from_embeddings(ids, emb, 20, seed=0)
    fleet = DeviceFleet(np.array([5, 9], dtype=np.int64), taste, "dev", seed=4, views_per_day=500)
    k = 0
    fleet.advance(k, EVENING_MS, 3_600_000)  # an evening hour at 500 views/day: many
    assert fleet.local_version[k] > 0
    body, version = fleet.request(k, EVENING_MS)
    request = sync_pb2.SyncPatternsRequest.FromString(body)
    assert request.device_id == "dev-0000005"
    assert request.local_version == version
    assert request.delta.codec == sync_pb2.CODEC_ZSTD
    delta = decode_payload(request.delta, patterns_pb2.PatternDelta)
    assert delta.base_version == 0 and delta.local_version == version
    assert len(delta.added) == 1
    pattern = delta.added[0]
    assert pattern.embedding.encoding == patterns_pb2.EMBEDDING_ENCODING_INT8
    vector = decode_embedding(pattern.embedding)
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 0.01
    # the pattern points to the device's favourite clusters
    assert int(np.argmax(taste.centroids @ vector)) in set(fleet.favourites[k].tolist())
    assert sum(v.views for v in delta.content_views) == fleet.pending_views[k]
    assert {v.content_id for v in delta.content_views} <= set(ids)
    assert 0 <= pattern.success_rate <= 1
    fleet.acknowledge(k, version, sync_pb2.SyncPatternsResponse(acknowledged_version=version))
    empty = decode_payload(
        sync_pb2.SyncPatternsRequest.FromString(fleet.request(k, EVENING_MS)[0]).delta,
        patterns_pb2.PatternDelta,
    )
    assert not empty.added and not empty.content_views and empty.base_version == version
    assert fleet.samples.shape == (2, BUCKET_COUNT)


def test_global_pages_are_followed(catalog: tuple[list[str], np.ndarray]) -> None:
    ids, emb = catalog
    fleet = DeviceFleet(np.array([0]), CatalogTaste.from_embeddings(ids, emb, 4, 0), "d", 0)
    fleet.acknowledge(
        0, 0, sync_pb2.SyncPatternsResponse(global_version=3, next_global_page_offset=7)
    )
    request = sync_pb2.SyncPatternsRequest.FromString(fleet.request(0, EVENING_MS)[0])
    assert (request.since_global_version, request.global_page_version) == (0, 3)
    assert request.global_page_offset == 7
    fleet.acknowledge(0, 0, sync_pb2.SyncPatternsResponse(global_version=3))
    request = sync_pb2.SyncPatternsRequest.FromString(fleet.request(0, EVENING_MS)[0])
    assert (request.since_global_version, request.global_page_offset) == (3, 0)


def test_one_process_holds_a_hundred_thousand_devices(
    catalog: tuple[list[str], np.ndarray],
) -> None:
    ids, emb = catalog
    fleet = DeviceFleet(
        np.arange(100_000, dtype=np.int64), CatalogTaste.from_embeddings(ids, emb, 20, 0), "d", 0
    )
    state = sum(
        a.nbytes
        for a in vars(fleet).values()
        if isinstance(a, np.ndarray) and a.shape[:1] == (100_000,)
    )
    assert state < 100 * 100_000  # under 100 bytes per device


def test_hdr_histograms_merge_across_workers_exactly() -> None:
    rng = np.random.default_rng(0)
    samples = [rng.lognormal(-4.0, 1.0, 5000) for _ in range(3)]  # seconds
    workers = []
    for i, s in enumerate(samples):
        rec = Recorder(1.0, 5)
        rec.schedule([0.5] * len(s) + [1.5])
        for latency in s:
            rec.record_ok(0.5, 0.5 + float(latency), 100, 10, dup=False)
        rec.record_failure(1.5, "UNAVAILABLE" if i else "DEADLINE_EXCEEDED")
        rec.redirects += i
        workers.append(rec.to_dict())
    merged = Recorder(1.0, 5)
    for data in workers:
        merged.merge(data)
    reference = latency_histogram(3)
    for s in samples:
        for latency in s:
            reference.record_value(max(1, round(float(latency) * 1e6)))
    assert percentiles_ms(merged.latency) == percentiles_ms(reference)
    everything = np.concatenate(samples) * 1000.0
    assert percentiles_ms(merged.latency)["p99"] == pytest.approx(
        float(np.percentile(everything, 99)), rel=0.01
    )
    assert merged.total_scheduled == 15_003
    assert merged.total_ok == 15_000 and merged.total_failed == 3
    assert dict(merged.errors) == {"UNAVAILABLE": 2, "DEADLINE_EXCEEDED": 1}
    assert merged.window_errors["UNAVAILABLE"][1] == 2
    assert merged.redirects == 3
    assert merged.bytes_up[0] == 1_500_000
    assert merged.window_latency[0].get_total_count() == 15_000
    assert Recorder.from_dict(merged.to_dict()).to_dict() == merged.to_dict()
    with pytest.raises(ValueError, match="different windows"):
        Recorder(2.0, 5).merge(workers[0])
