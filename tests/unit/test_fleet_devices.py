"""Light synthetic devices and fleet measurements: deltas with the brain's codec and sizes,
device state across syncs, HDR histograms merged across workers."""

from __future__ import annotations

import numpy as np
import pytest

from omega.v1 import patterns_pb2, sync_pb2
from omega_brain import Brain, BrainConfig, CatalogIndex, ViewingEvent
from omega_protocol import (
    BUCKET_COUNT,
    PayloadError,
    bucket_from_timestamp,
    decode_embedding,
    decode_payload,
)
from omega_simulator.fleet_catalog import CatalogTaste, synthetic_catalog
from omega_simulator.fleet_devices import SIM_EPOCH_MS, DeviceFleet
from omega_simulator.fleet_measure import Recorder, latency_histogram, percentiles_ms
from omega_simulator.fleet_scenario import Scenario
from omega_simulator.fleet_worker import apply_churn, build_schedule

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


def _fleet(catalog: tuple[list[str], np.ndarray], **kw: float) -> DeviceFleet:
    ids, emb = catalog
    taste = CatalogTaste.from_embeddings(ids, emb, 20, seed=0)
    return DeviceFleet(np.arange(50, dtype=np.int64), taste, "dev", 4, views_per_day=500, **kw)


def test_malformed_syncs_carry_garbage_or_a_contradicted_version(
    catalog: tuple[list[str], np.ndarray],
) -> None:
    fleet = _fleet(catalog)
    fleet.advance(3, EVENING_MS, 3_600_000)
    garbage = sync_pb2.SyncPatternsRequest.FromString(fleet.malformed_request(3, EVENING_MS, 0))
    assert garbage.device_id == fleet.device_id(3) and garbage.delta.codec == sync_pb2.CODEC_ZSTD
    with pytest.raises(PayloadError):
        decode_payload(garbage.delta, patterns_pb2.PatternDelta)
    wrong = sync_pb2.SyncPatternsRequest.FromString(fleet.malformed_request(3, EVENING_MS, 1))
    delta = decode_payload(wrong.delta, patterns_pb2.PatternDelta)
    assert delta.added and wrong.local_version == delta.local_version + 1
    # a device with nothing to send yet still sends a refusable (non-pull) request
    assert (
        sync_pb2.SyncPatternsRequest.FromString(
            fleet.malformed_request(7, EVENING_MS, 1)
        ).local_version
        == 2
    )
    # the device's own state is untouched: its real delta is still pending
    assert fleet.request(3, EVENING_MS)[1] == delta.local_version


def test_factory_reset_pulls_then_numbers_past_the_shards_version(
    catalog: tuple[list[str], np.ndarray],
) -> None:
    fleet = _fleet(catalog)
    k = 1
    fleet.advance(k, EVENING_MS, 3_600_000)
    _, before = fleet.request(k, EVENING_MS)
    fleet.acknowledge(k, before, sync_pb2.SyncPatternsResponse(acknowledged_version=before))
    assert before > 0
    fleet.factory_reset(k)
    assert k in fleet.needs_pull
    assert (fleet.local_version[k], fleet.acked_version[k], fleet.samples[k].sum()) == (0, 0, 0)
    pull = sync_pb2.SyncPatternsRequest.FromString(fleet.pull_request(k))
    assert pull.local_version == 0 and pull.delta.codec == sync_pb2.CODEC_NONE
    empty = decode_payload(pull.delta, patterns_pb2.PatternDelta)
    assert empty == patterns_pb2.PatternDelta()
    fleet.advance(k, EVENING_MS + 3_600_000, 3_600_000)  # viewings of the new store
    since_reset = int(fleet.local_version[k])
    assert fleet.learn(k, sync_pb2.SyncPatternsResponse(acknowledged_version=before)) == before
    assert k not in fleet.needs_pull
    body, version = fleet.request(k, EVENING_MS + 3_600_000)
    assert version == max(since_reset, before) + 1 > before
    delta = decode_payload(
        sync_pb2.SyncPatternsRequest.FromString(body).delta, patterns_pb2.PatternDelta
    )
    assert delta.base_version == 0 and delta.local_version == version
    assert len(delta.added) == bin(int(fleet.changed[k])).count("1") >= 1
    fleet.acknowledge(k, version, sync_pb2.SyncPatternsResponse(acknowledged_version=version))
    assert fleet.acked_version[k] == version and fleet.changed[k] == 0


def test_a_stale_store_is_shown_behind_then_renumbers_and_resends_everything(
    catalog: tuple[list[str], np.ndarray],
) -> None:
    fleet = _fleet(catalog)
    k = 2
    version = 0
    for hour in range(3):  # three acknowledged syncs: something to roll back to
        fleet.advance(k, EVENING_MS + hour * 3_600_000, 3_600_000)
        _, version = fleet.request(k, EVENING_MS + hour * 3_600_000)
        answer = sync_pb2.SyncPatternsResponse(acknowledged_version=version)
        assert fleet.acknowledge(k, version, answer) is False
    assert version >= 2
    shard_version = version
    fleet.rollback(k)
    assert fleet.acked_version[k] == 1 == fleet.local_version[k]
    _, stale = fleet.request(k, EVENING_MS + 4 * 3_600_000)
    assert stale < shard_version
    # the shard answers as for a duplicate, naming its later version
    answer = sync_pb2.SyncPatternsResponse(acknowledged_version=shard_version, duplicate=True)
    assert fleet.acknowledge(k, stale, answer) is True
    assert fleet.local_version[k] == shard_version + 1 and fleet.acked_version[k] == 0
    body, resent = fleet.request(k, EVENING_MS + 4 * 3_600_000)
    delta = decode_payload(
        sync_pb2.SyncPatternsRequest.FromString(body).delta, patterns_pb2.PatternDelta
    )
    # every bucket the device has learned is sent again, from base 0, past the shard
    assert resent == shard_version + 1 and delta.base_version == 0
    assert len(delta.added) == int((fleet.samples[k] > 0).sum()) >= 1
    # an answer to an older sync of a device that has moved on is not taken for a stale store
    assert not fleet.acknowledge(k, stale, answer)


def test_clock_skew_offsets_the_pattern_timestamps(
    catalog: tuple[list[str], np.ndarray],
) -> None:
    assert _fleet(catalog).skew_ms is None
    fleet = _fleet(catalog, clock_skew_seconds=600.0)
    stamps = []
    for k in range(len(fleet)):
        fleet.advance(k, EVENING_MS, 3_600_000)
        delta = decode_payload(
            sync_pb2.SyncPatternsRequest.FromString(fleet.request(k, EVENING_MS)[0]).delta,
            patterns_pb2.PatternDelta,
        )
        for p in delta.added:
            assert p.created_at_ms == p.updated_at_ms == EVENING_MS + int(fleet.skew_ms[k])  # type: ignore[index]
            stamps.append(p.created_at_ms - EVENING_MS)
    assert stamps and max(abs(s) for s in stamps) <= 600_000
    assert len(set(stamps)) > len(stamps) // 2  # each device its own offset


def test_churn_drops_syncs_before_appearing_and_after_vanishing() -> None:
    scenario = Scenario(
        name="c", devices=1000, duration_seconds=20, time_compression=100, churn_fraction=0.2
    )
    times, device = build_schedule(scenario, 1000, np.random.default_rng(0))
    kept_t, kept_d, appeared, vanished = apply_churn(
        scenario, times, device, 1000, np.random.default_rng(1)
    )
    assert (appeared, vanished) == (100, 100)
    assert np.all(np.diff(kept_t) >= 0)
    full = np.bincount(device, minlength=1000)
    kept = np.bincount(kept_d, minlength=1000)
    assert np.count_nonzero(kept < full) >= 190  # nearly every churned device lost syncs
    assert np.count_nonzero(kept < full) <= 200
    assert np.count_nonzero(kept == full) >= 800
    # vanished devices keep an early prefix, appeared ones a late suffix
    for d in np.flatnonzero(kept < full)[:20]:
        t_all = times[device == d]
        t_kept = kept_t[kept_d == d]
        assert t_kept.size == 0 or (
            np.array_equal(t_kept, t_all[: t_kept.size])
            or np.array_equal(t_kept, t_all[-t_kept.size :])
        )
    none = scenario.with_overrides(churn_fraction=0.0)
    assert apply_churn(none, times, device, 1000, np.random.default_rng(1))[2:] == (0, 0)


def test_refused_syncs_are_accounted_apart_and_merge() -> None:
    rec = Recorder(1.0, 3)
    rec.schedule([0.5, 0.5, 1.5])
    rec.record_ok(0.5, 0.6, 100, 10, dup=False)
    rec.record_refused(0.5, 80)
    rec.record_failure(1.5, "UNAVAILABLE")
    rec.device_faults.update({"malformed_sent": 1, "malformed_refused": 1})
    merged = Recorder.from_dict(rec.to_dict())
    merged.merge(rec.to_dict())
    assert merged.total_refused == 2 and merged.device_faults["malformed_refused"] == 2
    assert merged.total_ok + merged.total_failed + merged.total_refused == merged.total_scheduled
    assert merged.bytes_up[0] == 360
