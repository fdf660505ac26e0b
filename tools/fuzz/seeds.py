"""Valid requests the fuzzer starts from, and what reflection cannot say about them.

A seed is a well-formed request a shard accepts, serialized; hostile cases mutate its fields
(so a mutation reaches the checks deep inside the handler instead of failing on the first
missing field). Methods without a seed start from an empty message.

Two facts are not in the descriptors and live here:

- `NESTED_PAYLOADS`: ``bytes`` fields that carry another serialized message
  (`CompressedPayload.data` of ``SyncPatternsRequest.delta`` is a zstd-compressed
  `PatternDelta`); the fuzzer decodes them with `omega_protocol` and mutates the inner message.
- `LINKED_FIELDS`: fields that a valid request keeps equal (the request's and the delta's
  ``local_version``), so a hostile value can be set in both and get past the consistency check.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Final

import numpy as np
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from omega.v1 import events_pb2, federation_pb2, patterns_pb2, sync_pb2
from omega_protocol import encode_embedding, encode_payload
from omega_protocol.model_update import encode_item_factor_update

__all__ = ["LINKED_FIELDS", "NESTED_PAYLOADS", "SeedBuilder", "seed_builders"]

SeedBuilder = Callable[[random.Random, int], bytes]
"""(random source, case index) -> a serialized valid request."""

NESTED_PAYLOADS: Final[dict[tuple[str, str], str]] = {
    ("omega.v1.SyncPatternsRequest", "delta"): "omega.v1.PatternDelta",
}
"""(message, CompressedPayload field) -> full name of the message inside the payload."""

LINKED_FIELDS: Final[dict[str, list[tuple[str, str]]]] = {
    "omega.v1.SyncPatternsRequest": [("local_version", "delta/local_version")],
}
"""message -> pairs of slot paths a valid request keeps equal (``/`` enters a payload)."""

_FACTORS: Final[int] = 8


def _unit(rng: random.Random, dim: int = 384) -> np.ndarray:
    v = np.random.default_rng(rng.getrandbits(32)).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def _context() -> patterns_pb2.PatternContext:
    return patterns_pb2.PatternContext(
        time_slot=patterns_pb2.TIME_SLOT_EVENING,
        day_type=patterns_pb2.DAY_TYPE_WEEKEND,
        content_type="movie",
        genre_hints=["Drama"],
    )


def _sync(catalog_ids: Sequence[str]) -> SeedBuilder:
    def build(rng: random.Random, index: int) -> bytes:
        ids = list(catalog_ids[:2]) or ["c0000", "c0001"]
        update = encode_item_factor_update(
            1, ids, [0.6, 0.8][: len(ids)], _unit(rng, _FACTORS) * 0.5
        )
        delta = patterns_pb2.PatternDelta(
            added=[
                patterns_pb2.ViewingPattern(
                    pattern_id="p-evening",
                    embedding=encode_embedding(_unit(rng)),
                    success_rate=0.9,
                    sample_count=5,
                    context=_context(),
                    created_at_ms=1_700_000_000_000,
                    updated_at_ms=1_700_000_100_000,
                )
            ],
            updated=[
                patterns_pb2.PatternUpdate(
                    pattern_id="p-morning",
                    success_rate=0.8,
                    additional_samples=2,
                    embedding=encode_embedding(_unit(rng)),
                    updated_at_ms=1_700_000_100_000,
                )
            ],
            removed=["p-night"],
            content_views=[patterns_pb2.ContentViewCount(content_id=ids[0], views=2)],
            local_version=1,
            base_version=0,
            model_update=update,
        )
        request = sync_pb2.SyncPatternsRequest(
            device_id=f"fuzz-{index}",
            local_version=1,
            since_global_version=0,
            delta=encode_payload(delta),
        )
        return request.SerializeToString()

    return build


def _fetch_embeddings(catalog_ids: Sequence[str]) -> SeedBuilder:
    def build(rng: random.Random, index: int) -> bytes:
        return sync_pb2.FetchEmbeddingsRequest(
            since_catalog_version=0,
            content_ids=list(catalog_ids[:2]),
            encoding=rng.choice(list(patterns_pb2.EmbeddingEncoding.values())[1:]),
            page_size=5,
            page_token=rng.choice(["", "1"]),
        ).SerializeToString()

    return build


def _fetch_model(rng: random.Random, index: int) -> bytes:
    return sync_pb2.FetchModelRequest(since_model_version=0, page_size=10).SerializeToString()


def _report_metrics(rng: random.Random, index: int) -> bytes:
    return sync_pb2.ReportMetricsRequest(
        device_id=f"fuzz-{index}",
        metrics=events_pb2.DeviceMetrics(
            events_observed=100,
            recommendations_served=40,
            syncs_ok=20,
            syncs_failed=1,
            pattern_count=3,
            recommend_p99_ms=4.5,
            store_bytes=1 << 20,
            memory_bytes=64 << 20,
        ),
        reported_at_ms=1_700_000_000_000,
    ).SerializeToString()


def _forget(rng: random.Random, index: int) -> bytes:
    return sync_pb2.ForgetDeviceRequest(device_id=f"fuzz-{index}").SerializeToString()


def _search(catalog_ids: Sequence[str]) -> SeedBuilder:
    def build(rng: random.Random, index: int) -> bytes:
        return sync_pb2.SearchContentRequest(
            query=encode_embedding(_unit(rng)),
            k=5,
            genres=["Drama"],
            exclude_content_ids=list(catalog_ids[:1]),
        ).SerializeToString()

    return build


def _export(rng: random.Random, index: int) -> bytes:
    return federation_pb2.ExportPatternsRequest(
        since_updated_at_ms=0, min_success_rate=0.5, batch_size=50, views_since_round=0
    ).SerializeToString()


def _publish(catalog_ids: Sequence[str]) -> SeedBuilder:
    def build(rng: random.Random, index: int) -> bytes:
        ids = list(catalog_ids[:2]) or ["c0000", "c0001"]
        return federation_pb2.PublishRoundRequest(
            round=index + 1,
            patterns=[
                patterns_pb2.GlobalPattern(
                    pattern_key="evening-weekend-0",
                    embedding=encode_embedding(_unit(rng)),
                    quality=0.8,
                    source_count=1200,
                    context=_context(),
                    success_rate=0.85,
                    round=index + 1,
                )
            ],
            trending=[patterns_pb2.TrendingContent(content_id=c, score=0.5) for c in ids],
            epsilon=1.0,
            cumulative_epsilon=2.0,
            delta=1e-5,
            item_factors=[
                patterns_pb2.ItemFactorRow(
                    content_id=c,
                    factor=encode_embedding(_unit(rng, _FACTORS)),
                    model_version=index + 1,
                )
                for c in ids
            ],
            factors=_FACTORS,
            noise_multiplier=1.1,
        ).SerializeToString()

    return build


def _snapshot(catalog_ids: Sequence[str]) -> SeedBuilder:
    def build(rng: random.Random, index: int) -> bytes:
        ids = list(catalog_ids[:2]) or ["c0000", "c0001"]
        return federation_pb2.PublishModelSnapshotRequest(
            model_version=index + 1,
            factors=_FACTORS,
            item_factors=[
                patterns_pb2.ItemFactorRow(
                    content_id=c,
                    factor=encode_embedding(_unit(rng, _FACTORS)),
                    model_version=index + 1,
                )
                for c in ids
            ],
        ).SerializeToString()

    return build


def _health(rng: random.Random, index: int) -> bytes:
    request = health_pb2.HealthCheckRequest(service=rng.choice(["", "omega.v1.ConstellationSync"]))
    return bytes(request.SerializeToString())


def _reflection(rng: random.Random, index: int) -> bytes:
    choice = rng.randrange(3)
    if choice == 0:
        request = reflection_pb2.ServerReflectionRequest(list_services="")
    elif choice == 1:
        request = reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="omega.v1.ConstellationSync"
        )
    else:
        request = reflection_pb2.ServerReflectionRequest(file_by_filename="omega/v1/sync.proto")
    return bytes(request.SerializeToString())


def seed_builders(catalog_ids: Sequence[str]) -> dict[str, SeedBuilder]:
    """Seed builders by method path.

    Args:
        catalog_ids: Content ids the shard's catalog holds (seeds name them so that views and
            model updates are accepted); may be empty.
    """
    return {
        "/omega.v1.ConstellationSync/SyncPatterns": _sync(catalog_ids),
        "/omega.v1.ConstellationSync/FetchEmbeddings": _fetch_embeddings(catalog_ids),
        "/omega.v1.ConstellationSync/FetchModel": _fetch_model,
        "/omega.v1.ConstellationSync/ReportMetrics": _report_metrics,
        "/omega.v1.ConstellationSync/SearchContent": _search(catalog_ids),
        "/omega.v1.ConstellationSync/ForgetDevice": _forget,
        "/omega.v1.Federation/ExportPatterns": _export,
        "/omega.v1.Federation/PublishRound": _publish(catalog_ids),
        "/omega.v1.Federation/PublishModelSnapshot": _snapshot(catalog_ids),
        "/grpc.health.v1.Health/Check": _health,
        "/grpc.health.v1.Health/Watch": _health,
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _reflection,
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": _reflection,
    }
