"""Light synthetic devices: a whole fleet slice in a few numpy arrays, no `Brain` per device.

Each device has a taste (a few favourite catalog clusters with weights), a completion
propensity, and the state a brain keeps for its syncs: local and acknowledged versions,
per-context-bucket sample and success counts, the buckets whose pattern changed since the
last acknowledged version, the views not yet acknowledged and the global version and page it
has pulled. Between two syncs a device watches a Poisson number of items (``views_per_day``
shaped by the hour of the simulated day: prime time dominates). Every viewing bumps the local
version and changes its bucket's pattern, as `Brain.observe` does.

A sync's delta is built like the brain's (`omega_brain.sync_delta.build_request`): each
changed bucket's pattern as a full `ViewingPattern` (int8 embedding via
`omega_protocol.encode_embedding`, the bucket's context, success rate and sample count)
plus per-content view counts, serialized with `omega_protocol.encode_payload` (zstd from 64
bytes up). The pattern embedding is a mix
of the device's favourite cluster centroids with a fixed per-device, per-bucket offset.
Not modelled: the once-per-model-version `ItemFactorUpdate` (no model exists in a fresh
fleet run) and catalog or model fetches.

Device-behaviour faults (`Scenario` settings, applied by `omega_simulator.fleet_worker`):
`malformed_request` builds a sync the shard must refuse (garbage bytes in the delta's
payload, or a request whose local version the delta contradicts); `factory_reset` wipes a
device's store, after which `needs_pull` devices send `pull_request` (version 0, empty delta)
and `learn` numbers their new changes past the acknowledged version, as
`SyncClient._learn_server_version` does; `rollback` puts a device's versions back as a store
restored from an older backup (stale versions), after which `acknowledge` renumbers its
changes past the shard's version as the brain does; ``clock_skew_seconds`` gives each device a
fixed clock offset in [-skew, +skew] on its patterns' timestamps.

Memory: about 60 bytes per device plus one shared catalog, so one process holds 1M devices.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt

from omega.v1 import patterns_pb2, sync_pb2
from omega_protocol import (
    BUCKET_COUNT,
    EMBEDDING_DIM,
    ContextBucket,
    bucket_from_timestamp,
    encode_embedding,
    encode_payload,
)
from omega_simulator.fleet_catalog import CatalogTaste

__all__ = ["HOUR_WEIGHTS", "SIM_EPOCH_MS", "DeviceFleet", "device_id"]

SIM_EPOCH_MS = int(datetime(2026, 1, 13, tzinfo=UTC).timestamp() * 1000)
"""Midnight (UTC) of the simulated first day, a Tuesday; devices keep UTC local time."""

_HOURS = np.array(
    [2, 1, 0.5, 0.3, 0.3, 0.5, 1.5, 2.5, 2, 1.5, 1.5, 2, 3, 3, 2.5, 2.5, 3, 4, 6, 9, 10, 9, 6, 4],
    dtype=np.float64,
)
HOUR_WEIGHTS: npt.NDArray[np.float64] = _HOURS * 24.0 / _HOURS.sum()
"""Relative viewing intensity of each hour of the day (mean 1): evenings dominate."""

_COMPRESS_MIN_BYTES = 64  # as the brain: below this a zstd frame header costs more than it saves
_PATTERN_SPREAD = 0.35  # norm of a pattern's offset from its taste mix (before normalizing)
_CONTEXTS = [ContextBucket.from_index(b).to_proto() for b in range(BUCKET_COUNT)]


def device_id(prefix: str, index: int) -> str:
    """The id of device ``index`` of a run whose devices are named ``prefix``."""
    return f"{prefix}-{index:07d}"


class DeviceFleet:
    """The devices ``indices`` of a fleet.

    Args:
        indices: (n,) global device numbers this fleet slice simulates.
        taste: the catalog's clusters.
        prefix: device ids are ``{prefix}-{index:07d}``.
        seed: seed of tastes and viewings (the same seed and index give the same taste).
        favourite_clusters: clusters per device taste.
        views_per_day: mean viewings per device per simulated day.
        clock_skew_seconds: each device's clock is off by a fixed offset drawn uniformly in
            [-skew, +skew] seconds (0: no skew, no memory spent on it).
    """

    def __init__(
        self,
        indices: npt.NDArray[np.int64],
        taste: CatalogTaste,
        prefix: str,
        seed: int,
        favourite_clusters: int = 3,
        views_per_day: float = 6.0,
        clock_skew_seconds: float = 0.0,
    ) -> None:
        n = int(indices.shape[0])
        self.indices = indices.astype(np.int64)
        self.prefix = prefix
        self.seed = seed
        self.views_per_day = views_per_day
        self.taste = taste
        self._members = taste.members()
        nonempty = np.array([c for c, m in enumerate(self._members) if m.size], dtype=np.int16)
        if nonempty.size == 0:
            raise ValueError("the catalog has no items")
        rng = np.random.default_rng([seed, 1])
        f = min(favourite_clusters, nonempty.size)
        self.favourites = nonempty[rng.integers(0, nonempty.size, (n, f))].astype(np.int16)
        w = rng.dirichlet(np.ones(f), n) if f > 1 else np.ones((n, 1))
        self.favourite_weights = w.astype(np.float32)
        self.completion = rng.beta(6.0, 2.0, n).astype(np.float32)  # mean 0.75
        self.local_version = np.zeros(n, np.uint32)
        self.acked_version = np.zeros(n, np.uint32)
        self.samples = np.zeros((n, BUCKET_COUNT), np.uint16)
        self.successes = np.zeros((n, BUCKET_COUNT), np.uint16)
        self.changed = np.zeros(n, np.uint8)  # bit b: bucket b's pattern changed since the ack
        self.pending_views = np.zeros(n, np.uint16)
        self.global_version = np.zeros(n, np.uint32)
        self.page_version = np.zeros(n, np.uint32)
        self.page_offset = np.zeros(n, np.uint32)
        self.last_sim_ms = np.full(n, -1, np.int64)
        self._rng = np.random.default_rng([seed, 2, int(indices[0]) if n else 0])
        self.skew_ms: npt.NDArray[np.int32] | None = None
        if clock_skew_seconds > 0:
            skew = np.random.default_rng([seed, 6, int(indices[0]) if n else 0])
            limit = clock_skew_seconds * 1000.0
            self.skew_ms = np.rint(skew.uniform(-limit, limit, n)).astype(np.int32)
        self.needs_pull: set[int] = set()  # factory-reset devices that have not pulled yet

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def device_id(self, k: int) -> str:
        """The id of the ``k``-th device of this slice."""
        return device_id(self.prefix, int(self.indices[k]))

    def watch(self, k: int, sim_ms: int, window_ms: float) -> int:
        """Viewings of device ``k`` in the ``window_ms`` before ``sim_ms``; returns how many."""
        hour = int((sim_ms // 3_600_000) % 24)
        lam = self.views_per_day * HOUR_WEIGHTS[hour] * window_ms / 86_400_000.0
        views = int(self._rng.poisson(lam)) if lam > 0 else 0
        if views == 0:
            return 0
        bucket = bucket_from_timestamp(sim_ms).index
        done = int((self._rng.random(views) < self.completion[k]).sum())
        self.samples[k, bucket] = min(65_535, int(self.samples[k, bucket]) + views)
        self.successes[k, bucket] = min(65_535, int(self.successes[k, bucket]) + done)
        self.changed[k] |= np.uint8(1 << bucket)
        self.pending_views[k] = min(65_535, int(self.pending_views[k]) + views)
        self.local_version[k] += np.uint32(views)
        return views

    def advance(self, k: int, sim_ms: int, default_window_ms: float) -> None:
        """Let device ``k`` live until ``sim_ms`` (its viewings since its last sync)."""
        last = int(self.last_sim_ms[k])
        window = default_window_ms if last < 0 else max(0.0, float(sim_ms - last))
        self.last_sim_ms[k] = sim_ms
        self.watch(k, sim_ms, window)

    def pattern_embedding(self, k: int, bucket: int) -> npt.NDArray[np.float32]:
        """(384,) float32 unit vector: the device's taste mix plus a per-bucket offset."""
        mix = self.favourite_weights[k] @ self.taste.centroids[self.favourites[k]]
        noise = np.random.default_rng([self.seed, 3, int(self.indices[k]), bucket])
        offset = noise.standard_normal(EMBEDDING_DIM).astype(np.float32)
        v = mix + offset * (_PATTERN_SPREAD / np.sqrt(EMBEDDING_DIM))
        out: npt.NDArray[np.float32] = (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)
        return out

    def _viewed_ids(self, k: int, count: int) -> list[tuple[str, int]]:
        rng = np.random.default_rng(
            [self.seed, 4, int(self.indices[k]), int(self.acked_version[k])]
        )
        p = self.favourite_weights[k].astype(np.float64)
        clusters = rng.choice(self.favourites[k], count, p=p / p.sum())
        views: Counter[str] = Counter()
        for c in clusters:
            members = self._members[int(c)]
            views[str(self.taste.content_ids[int(members[rng.integers(0, members.size)])])] += 1
        return sorted(views.items())

    def delta(self, k: int, sim_ms: int) -> patterns_pb2.PatternDelta:
        """Device ``k``'s `PatternDelta` since its acknowledged version."""
        delta = patterns_pb2.PatternDelta(
            local_version=int(self.local_version[k]), base_version=int(self.acked_version[k])
        )
        changed = int(self.changed[k])
        stamp = sim_ms if self.skew_ms is None else max(0, sim_ms + int(self.skew_ms[k]))
        for bucket in range(BUCKET_COUNT):
            if not changed & (1 << bucket):
                continue
            samples = int(self.samples[k, bucket])
            delta.added.append(
                patterns_pb2.ViewingPattern(
                    pattern_id=f"{self.seed & 0xFFFFFFFF:08x}{int(self.indices[k]):016x}"
                    f"{bucket:08x}",
                    embedding=encode_embedding(self.pattern_embedding(k, bucket)),
                    success_rate=int(self.successes[k, bucket]) / max(samples, 1),
                    sample_count=samples,
                    context=_CONTEXTS[bucket],
                    created_at_ms=stamp,
                    updated_at_ms=stamp,
                )
            )
        pending = int(self.pending_views[k])
        if pending:
            for content_id, count in self._viewed_ids(k, pending):
                delta.content_views.add(content_id=content_id, views=count)
        return delta

    def request(self, k: int, sim_ms: int) -> tuple[bytes, int]:
        """Device ``k``'s serialized `SyncPatternsRequest` and the local version it carries."""
        delta = self.delta(k, sim_ms)
        payload = encode_payload(delta, compress=delta.ByteSize() >= _COMPRESS_MIN_BYTES)
        version = int(self.local_version[k])
        request = sync_pb2.SyncPatternsRequest(
            device_id=self.device_id(k),
            local_version=version,
            since_global_version=int(self.global_version[k]),
            delta=payload,
            global_page_version=int(self.page_version[k]),
            global_page_offset=int(self.page_offset[k]),
        )
        return request.SerializeToString(), version

    def acknowledge(self, k: int, sent_version: int, answer: sync_pb2.SyncPatternsResponse) -> bool:
        """Apply an answer (not a redirect) to the sync that carried ``sent_version``.

        An answer acknowledging *more* than was sent, while the device has changed nothing
        since, means the shard holds a later version than this store (restored from a
        backup, `rollback`): as `omega_brain.sync_delta.apply_response` does, the device
        numbers its changes past the shard's version and re-sends every pattern it has.

        Returns:
            True when the answer showed the store was behind the shard (and it renumbered).
        """
        acked = int(answer.acknowledged_version)
        behind = acked > sent_version and int(self.local_version[k]) == sent_version
        if behind:
            self.local_version[k] = np.uint32(acked + 1)
            self.acked_version[k] = 0
            self.changed[k] = np.uint8(
                sum(1 << b for b in range(BUCKET_COUNT) if self.samples[k, b] > 0)
            )
        else:
            if acked >= sent_version and int(self.local_version[k]) == sent_version:
                self.changed[k] = 0
                self.pending_views[k] = 0
            self.acked_version[k] = max(int(self.acked_version[k]), min(acked, sent_version))
        if answer.next_global_page_offset:
            self.page_version[k] = answer.global_version
            self.page_offset[k] = answer.next_global_page_offset
        else:
            self.global_version[k] = max(int(self.global_version[k]), int(answer.global_version))
            self.page_version[k] = 0
            self.page_offset[k] = 0
        return behind

    def malformed_request(self, k: int, sim_ms: int, kind: int) -> bytes:
        """A sync of device ``k`` the shard must refuse with INVALID_ARGUMENT.

        Args:
            kind: 0: the delta's payload is garbage (zstd codec, random bytes); 1: the request
                carries a local version one above the delta's own.
        """
        version = max(1, int(self.local_version[k]))
        if kind == 0:
            junk = np.random.default_rng([self.seed, 7, int(self.indices[k]), version])
            payload = sync_pb2.CompressedPayload(
                codec=sync_pb2.CODEC_ZSTD, data=b"\x00junk" + junk.bytes(59)
            )
            sent = version
        else:
            delta = self.delta(k, sim_ms)
            delta.local_version = version
            delta.base_version = min(int(delta.base_version), version)
            payload = encode_payload(delta, compress=delta.ByteSize() >= _COMPRESS_MIN_BYTES)
            sent = version + 1
        request = sync_pb2.SyncPatternsRequest(
            device_id=self.device_id(k),
            local_version=sent,
            since_global_version=int(self.global_version[k]),
            delta=payload,
        )
        return request.SerializeToString()

    def factory_reset(self, k: int) -> None:
        """Wipe device ``k``'s store: versions, patterns, pending views and global state back
        to zero; its next sync starts with a pull (`needs_pull`)."""
        for name in (
            "local_version",
            "acked_version",
            "changed",
            "pending_views",
            "global_version",
            "page_version",
            "page_offset",
        ):
            getattr(self, name)[k] = 0
        self.samples[k] = 0
        self.successes[k] = 0
        self.needs_pull.add(k)

    def rollback(self, k: int) -> None:
        """Restore device ``k``'s store from its oldest backup: its acknowledged version goes
        back to 1 (changes not yet acknowledged stay pending on top), so its next syncs
        carry versions the shard has already applied: the shard answers them as duplicates
        acknowledging its later version, and the device must renumber (`acknowledge`) or its
        new changes are never applied. (When its new changes carry it past the shard's
        version anyway, the shard simply applies them.)"""
        acked = int(self.acked_version[k])
        back = min(acked, 1)
        self.local_version[k] = np.uint32(back + int(self.local_version[k]) - acked)
        self.acked_version[k] = np.uint32(back)

    def pull_request(self, k: int) -> bytes:
        """Device ``k``'s pull: version 0, an empty uncompressed delta (it writes nothing; the
        answer acknowledges the last version the shard applied for this device)."""
        request = sync_pb2.SyncPatternsRequest(
            device_id=self.device_id(k),
            local_version=0,
            since_global_version=int(self.global_version[k]),
            delta=encode_payload(patterns_pb2.PatternDelta(), compress=False),
        )
        return request.SerializeToString()

    def learn(self, k: int, answer: sync_pb2.SyncPatternsResponse) -> int:
        """Apply the answer to device ``k``'s pull: changes since the reset are numbered past
        the version the shard acknowledges (everything re-sent from base 0). Returns that
        acknowledged version."""
        last = int(answer.acknowledged_version)
        if int(self.acked_version[k]) < last:
            self.local_version[k] = np.uint32(max(int(self.local_version[k]), last) + 1)
            self.acked_version[k] = 0
        self.needs_pull.discard(k)
        return last
