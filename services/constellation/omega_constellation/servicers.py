"""Thin gRPC servicers: convert, call `ConstellationService`, convert back."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import grpc
import numpy as np

from omega.v1 import federation_pb2, federation_pb2_grpc, patterns_pb2, sync_pb2, sync_pb2_grpc
from omega_common.errors import InvalidArgumentError
from omega_constellation import metrics
from omega_constellation.converters import (
    DeltaLimits,
    delta_from_request,
    embedding_to_int8,
    exported_model_update,
    global_patterns_message,
    int8_to_embedding,
    item_factor_row,
    publish_from_request,
)
from omega_constellation.model import ModelPage
from omega_constellation.service import ConstellationService, GlobalView
from omega_constellation.store import ExportRow
from omega_protocol import (
    decode_embedding,
    dequantize_int8,
    encode_embeddings,
    encode_payload,
    pattern_context,
)

__all__ = ["ConstellationSyncServicer", "FederationServicer"]

_MAX_PAGE = 1000
_MODEL_PAGES_CACHED = 64


class ConstellationSyncServicer(sync_pb2_grpc.ConstellationSyncServicer):
    """`omega.v1.ConstellationSync`: the device-facing API."""

    def __init__(self, service: ConstellationService) -> None:
        self._service = service
        settings = service.settings
        self._limits = DeltaLimits(
            max_raw_bytes=settings.max_delta_bytes,
            max_patterns=settings.max_patterns_per_delta,
            max_content_views=settings.max_content_views_per_delta,
        )
        self._payloads: dict[tuple[int, int], sync_pb2.CompressedPayload] = {}
        self._model_pages: dict[tuple[int, int, str, int], sync_pb2.FetchModelResponse] = {}

    def _global_payload(self, view: GlobalView, since: int) -> sync_pb2.CompressedPayload | None:
        """The compressed GlobalPatterns newer than ``since`` (cached per view and since)."""
        if since >= view.version:
            return None
        key = (view.version, since)
        cached = self._payloads.get(key)
        if cached is None:
            settings = self._service.settings
            newer = [p for p in view.patterns if p.round > since]
            message = global_patterns_message(
                newer[: settings.max_global_patterns_per_sync],
                view.trending[: settings.trending_per_sync],
                view.version,
            )
            cached = encode_payload(message)
            if len(self._payloads) > 64 or any(v != view.version for v, _ in self._payloads):
                self._payloads.clear()
            self._payloads[key] = cached
        return cached

    async def SyncPatterns(
        self, request: sync_pb2.SyncPatternsRequest, context: grpc.aio.ServicerContext
    ) -> sync_pb2.SyncPatternsResponse:
        """Validate and apply a device's delta (with its model update, if any); answer with the
        ack, newer global patterns and the current model version."""
        metrics.SYNC_REQUEST_BYTES.observe(request.ByteSize())
        delta = delta_from_request(
            request,
            self._limits,
            catalog=self._service.catalog,
            model=self._service.model.state,
        )
        decision = await self._service.sync(delta)
        if decision.redirect_shard_id is not None:
            return sync_pb2.SyncPatternsResponse(redirect_shard_id=decision.redirect_shard_id)
        assert decision.outcome is not None and decision.view is not None
        outcome = decision.outcome
        response = sync_pb2.SyncPatternsResponse(
            acknowledged_version=outcome.acknowledged_version,
            global_version=decision.view.version,
            duplicate=outcome.duplicate,
            patterns_stored=outcome.patterns_stored,
            model_version=decision.model_version,
        )
        payload = self._global_payload(decision.view, delta.since_global_version)
        if payload is not None:
            response.global_patterns.CopyFrom(payload)
        metrics.SYNC_RESPONSE_BYTES.observe(response.ByteSize())
        return response

    async def FetchEmbeddings(
        self, request: sync_pb2.FetchEmbeddingsRequest, context: grpc.aio.ServicerContext
    ) -> sync_pb2.FetchEmbeddingsResponse:
        """A page of catalog items (changed since a version, or by ids)."""
        catalog = self._service.catalog
        try:
            offset = int(request.page_token) if request.page_token else 0
        except ValueError as exc:
            raise InvalidArgumentError("page_token is not one this server issued") from exc
        if offset < 0:
            raise InvalidArgumentError("page_token is not one this server issued")
        encoding = request.encoding or patterns_pb2.EMBEDDING_ENCODING_INT8
        if encoding not in (
            patterns_pb2.EMBEDDING_ENCODING_INT8,
            patterns_pb2.EMBEDDING_ENCODING_FLOAT16,
            patterns_pb2.EMBEDDING_ENCODING_FLOAT32,
        ):
            raise InvalidArgumentError(f"unknown embedding encoding {encoding}")
        limit = min(request.page_size or 500, _MAX_PAGE)
        rows, nxt = catalog.page(
            since_version=request.since_catalog_version,
            content_ids=list(request.content_ids),
            offset=offset,
            limit=limit,
        )
        if encoding == patterns_pb2.EMBEDDING_ENCODING_INT8:
            embeddings = [int8_to_embedding(r.codes, r.scale) for r in rows]
        else:
            codes = np.frombuffer(b"".join(r.codes for r in rows), dtype=np.int8)
            vectors = dequantize_int8(codes.reshape(len(rows), -1), [r.scale for r in rows])
            embeddings = encode_embeddings(vectors, encoding) if rows else []
        return sync_pb2.FetchEmbeddingsResponse(
            items=[
                sync_pb2.ContentItem(
                    content_id=r.content_id,
                    title=r.title,
                    genres=r.genres,
                    embedding=e,
                    catalog_version=r.catalog_version,
                )
                for r, e in zip(rows, embeddings, strict=True)
            ],
            catalog_version=catalog.version,
            next_page_token="" if nxt is None else str(nxt),
        )

    def _model_response(self, page: ModelPage) -> sync_pb2.FetchModelResponse:
        return sync_pb2.FetchModelResponse(
            model_version=page.version,
            factors=page.factors,
            rows=[item_factor_row(r) for r in page.rows],
            next_page_token=page.next_token,
        )

    async def FetchModel(
        self, request: sync_pb2.FetchModelRequest, context: grpc.aio.ServicerContext
    ) -> sync_pb2.FetchModelResponse:
        """A page of item-factor rows changed after ``since_model_version`` (INT8 factors).

        Pages are answered from the in-memory model and cached per (version, since, token,
        size): after a publish most devices ask for the same pages. A fetch that straddles a
        publication fails with ABORTED (see `omega_constellation.model`).
        """
        page = await self._service.fetch_model(
            since=request.since_model_version,
            page_token=request.page_token,
            page_size=request.page_size,
        )
        key = (page.version, request.since_model_version, request.page_token, request.page_size)
        response = self._model_pages.get(key)
        if response is None:
            response = self._model_response(page)
            if len(self._model_pages) >= _MODEL_PAGES_CACHED or any(
                k[0] != page.version for k in self._model_pages
            ):
                self._model_pages.clear()
            self._model_pages[key] = response
        return response

    async def ReportMetrics(
        self, request: sync_pb2.ReportMetricsRequest, context: grpc.aio.ServicerContext
    ) -> sync_pb2.ReportMetricsResponse:
        """Record a device's health counters as aggregate Prometheus metrics."""
        if not request.device_id:
            raise InvalidArgumentError("device_id is required")
        m = request.metrics
        if not math.isfinite(m.recommend_p99_ms) or m.recommend_p99_ms < 0:
            raise InvalidArgumentError("recommend_p99_ms must be a finite number >= 0")
        if m.recommend_p99_ms > 0:
            metrics.DEVICE_RECOMMEND_P99.observe(m.recommend_p99_ms / 1000.0)
        if m.syncs_failed:
            metrics.DEVICE_SYNCS_FAILED.inc(m.syncs_failed)
        return sync_pb2.ReportMetricsResponse()

    async def SearchContent(
        self, request: sync_pb2.SearchContentRequest, context: grpc.aio.ServicerContext
    ) -> sync_pb2.SearchContentResponse:
        """Nearest catalog items to a query embedding, with genre and id filters."""
        if not request.HasField("query"):
            raise InvalidArgumentError("query embedding is required")
        embedding_to_int8(request.query, "query")  # validates dimension and values
        query = decode_embedding(request.query)
        hits = self._service.catalog.search(
            query,
            request.k or 10,
            genres=list(request.genres),
            exclude=list(request.exclude_content_ids),
        )
        return sync_pb2.SearchContentResponse(
            results=[
                sync_pb2.ScoredContent(content_id=h.content_id, title=h.title, score=h.score)
                for h in hits
            ]
        )


def _exported(row: ExportRow) -> federation_pb2.ExportedPattern:
    p = row.pattern
    return federation_pb2.ExportedPattern(
        device_key=row.device_key,
        pattern=patterns_pb2.ViewingPattern(
            pattern_id=p.pattern_id,
            embedding=int8_to_embedding(p.codes, p.scale),
            success_rate=p.success_rate,
            sample_count=p.sample_count,
            context=pattern_context(p.time_slot, p.day_type, p.content_type, p.genre_hints),
            created_at_ms=p.created_at_ms,
            updated_at_ms=p.updated_at_ms,
        ),
    )


class FederationServicer(federation_pb2_grpc.FederationServicer):
    """`omega.v1.Federation`: the internal API the federation worker calls on every shard."""

    def __init__(self, service: ConstellationService) -> None:
        self._service = service

    async def ExportPatterns(
        self, request: federation_pb2.ExportPatternsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[federation_pb2.PatternBatch]:
        """Stream stored patterns above a watermark, then every stored model update.

        Pattern batches come first, then batches of model updates (device keys, never device
        ids); view counts ride on the last message of the stream.
        """
        if request.since_updated_at_ms < 0:
            raise InvalidArgumentError("since_updated_at_ms must be >= 0")
        if not math.isfinite(request.min_success_rate) or not 0 <= request.min_success_rate <= 1:
            raise InvalidArgumentError("min_success_rate must be a finite number in [0, 1]")
        shard_id = self._service.settings.shard_id
        version = await self._service.store.global_version()
        watermark = request.since_updated_at_ms
        pending: federation_pb2.PatternBatch | None = None
        async for batch in self._service.export(
            since_ms=request.since_updated_at_ms,
            min_success_rate=request.min_success_rate,
            batch_size=request.batch_size or 1000,
        ):
            if pending is not None:
                yield pending
            watermark = max(watermark, batch[-1].stored_at_ms)
            pending = federation_pb2.PatternBatch(
                patterns=[_exported(r) for r in batch],
                watermark_ms=watermark,
                shard_id=shard_id,
                global_version=version,
            )
        async for updates in self._service.export_model_updates(
            batch_size=request.batch_size or 1000
        ):
            if pending is not None:
                yield pending
            pending = federation_pb2.PatternBatch(
                model_updates=[exported_model_update(u.device_key, u.payload) for u in updates],
                watermark_ms=watermark,
                shard_id=shard_id,
                global_version=version,
            )
        last = pending or federation_pb2.PatternBatch(
            watermark_ms=watermark, shard_id=shard_id, global_version=version
        )
        views = await self._service.store.content_views_since(request.views_since_round)
        last.content_views.extend(
            patterns_pb2.ContentViewCount(content_id=c, views=min(n, 2**32 - 1)) for c, n in views
        )
        yield last

    async def PublishRound(
        self, request: federation_pb2.PublishRoundRequest, context: grpc.aio.ServicerContext
    ) -> federation_pb2.PublishRoundResponse:
        """Store a federation round once (a repeated round is acknowledged, not applied)."""
        published = publish_from_request(request)
        version, stored, duplicate = await self._service.publish(
            published,
            epsilon=request.epsilon,
            cumulative_epsilon=request.cumulative_epsilon,
            noise_multiplier=request.noise_multiplier,
        )
        return federation_pb2.PublishRoundResponse(
            global_version=version, patterns_stored=stored, duplicate=duplicate
        )
