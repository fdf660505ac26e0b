"""Thin gRPC servicers: convert, call `ConstellationService`, convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from omega.v1 import federation_pb2, federation_pb2_grpc, patterns_pb2, sync_pb2, sync_pb2_grpc
from omega_constellation import metrics
from omega_constellation.bounds import check_id
from omega_constellation.converters import (
    DeltaLimits,
    MetricLimits,
    catalog_embeddings,
    catalog_query_from_request,
    delta_from_request,
    device_report_from_request,
    export_query_from_request,
    exported_model_update,
    global_patterns_page,
    int8_to_embedding,
    item_factor_row,
    model_query_from_request,
    publish_from_request,
    search_query_from_request,
    snapshot_from_request,
)
from omega_constellation.model import ModelPage
from omega_constellation.pacing import SyncPacer
from omega_constellation.service import ConstellationService, GlobalView
from omega_constellation.store import ExportRow
from omega_protocol import encode_payload, pattern_context

__all__ = ["ConstellationSyncServicer", "FederationServicer"]

_MODEL_PAGES_CACHED = 64
_ANSWER_OVERHEAD_BYTES = 160
"""Bytes of a sync answer outside its global patterns' message, at most: the answer's own
fields (about 60) and the payload's envelope and zstd frame (a frame of incompressible data is
a few bytes longer than its content)."""


class ConstellationSyncServicer(sync_pb2_grpc.ConstellationSyncServicer):
    """`omega.v1.ConstellationSync`: the device-facing API."""

    def __init__(self, service: ConstellationService, pacer: SyncPacer | None = None) -> None:
        """Args: service: the shard's logic; pacer: sets ``next_sync_after_ms`` of sync
        answers (default: the settings' pace without load information)."""
        self._service = service
        settings = service.settings
        self._pacer = pacer or SyncPacer(settings)
        self._limits = DeltaLimits(
            max_raw_bytes=settings.max_delta_bytes,
            max_patterns=settings.max_patterns_per_delta,
            max_content_views=settings.max_content_views_per_delta,
            max_views_per_content=settings.max_views_per_content,
            max_views_per_sync=settings.max_views_per_sync,
        )
        self._metric_limits = MetricLimits(
            max_count=settings.max_device_count,
            max_bytes=settings.max_device_bytes,
            max_latency_ms=settings.max_device_latency_ms,
        )
        self._payloads: dict[tuple[int, int, int], tuple[sync_pb2.CompressedPayload, int]] = {}
        self._model_pages: dict[tuple[int, int, str, int], sync_pb2.FetchModelResponse] = {}

    def _global_payload(
        self, view: GlobalView, since: int, page_version: int, offset: int
    ) -> tuple[sync_pb2.CompressedPayload | None, int]:
        """The compressed part of the GlobalPatterns newer than ``since`` that fits the answer
        budget, starting at ``offset`` when the device continues a transfer of this version;
        and the offset of the first pattern left for the next sync (0: none). Cached per
        view, ``since`` and start."""
        if since >= view.version:
            return None, 0
        start = offset if page_version == view.version else 0
        key = (view.version, since, start)
        cached = self._payloads.get(key)
        if cached is None:
            settings = self._service.settings
            newer = [p for p in view.patterns if p.round > since]
            newer = newer[: settings.max_global_patterns_per_sync]
            budget = settings.max_sync_answer_bytes - _ANSWER_OVERHEAD_BYTES
            message, next_offset = global_patterns_page(
                newer, view.trending[: settings.trending_per_sync], view.version, start, budget
            )
            cached = (encode_payload(message), next_offset)
            if len(self._payloads) > 256 or any(v != view.version for v, _, _ in self._payloads):
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
        pause_ms = self._pacer.next_sync_after_ms(delta.device_id)
        metrics.NEXT_SYNC_AFTER.observe(pause_ms / 1000.0)
        if decision.redirect_shard_id is not None:
            return sync_pb2.SyncPatternsResponse(
                redirect_shard_id=decision.redirect_shard_id, next_sync_after_ms=pause_ms
            )
        assert decision.outcome is not None and decision.view is not None
        outcome = decision.outcome
        response = sync_pb2.SyncPatternsResponse(
            acknowledged_version=outcome.acknowledged_version,
            global_version=decision.view.version,
            duplicate=outcome.duplicate,
            patterns_stored=outcome.patterns_stored,
            model_version=decision.model_version,
            next_sync_after_ms=pause_ms,
        )
        payload, next_offset = self._global_payload(
            decision.view,
            delta.since_global_version,
            delta.global_page_version,
            delta.global_page_offset,
        )
        if payload is not None:
            response.global_patterns.CopyFrom(payload)
            response.next_global_page_offset = next_offset
        metrics.SYNC_RESPONSE_BYTES.observe(response.ByteSize())
        return response

    async def FetchEmbeddings(
        self, request: sync_pb2.FetchEmbeddingsRequest, context: grpc.aio.ServicerContext
    ) -> sync_pb2.FetchEmbeddingsResponse:
        """A page of catalog items (changed since a version, or by ids)."""
        catalog = self._service.catalog
        query = catalog_query_from_request(request)
        rows, nxt = catalog.page(
            since_version=query.since_version,
            content_ids=query.content_ids,
            offset=query.offset,
            limit=query.limit,
        )
        embeddings = catalog_embeddings(
            [r.codes for r in rows], [r.scale for r in rows], query.encoding
        )
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
        query = model_query_from_request(request)
        page = await self._service.fetch_model(
            since=query.since, page_token=query.page_token, page_size=query.page_size
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
        """Record a device's health counters (each within the settings' sane ranges) as
        aggregate Prometheus metrics."""
        report = device_report_from_request(request, self._metric_limits)
        if report.recommend_p99_seconds > 0:
            metrics.DEVICE_RECOMMEND_P99.observe(report.recommend_p99_seconds)
        if report.syncs_failed:
            metrics.DEVICE_SYNCS_FAILED.inc(report.syncs_failed)
        return sync_pb2.ReportMetricsResponse()

    async def ForgetDevice(
        self, request: sync_pb2.ForgetDeviceRequest, context: grpc.aio.ServicerContext
    ) -> sync_pb2.ForgetDeviceResponse:
        """Delete the calling device's row, patterns and model update (one transaction)."""
        deleted = await self._service.forget(check_id(request.device_id, "device_id"))
        return sync_pb2.ForgetDeviceResponse(
            forgotten=deleted is not None, patterns_deleted=deleted or 0
        )

    async def SearchContent(
        self, request: sync_pb2.SearchContentRequest, context: grpc.aio.ServicerContext
    ) -> sync_pb2.SearchContentResponse:
        """Nearest catalog items to a query embedding, with genre and id filters."""
        query = search_query_from_request(request)
        hits = self._service.catalog.search(
            query.vector, query.k, genres=query.genres, exclude=query.exclude
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
        query = export_query_from_request(request)
        shard_id = self._service.settings.shard_id
        version = await self._service.store.global_version()
        watermark = query.since_ms
        pending: federation_pb2.PatternBatch | None = None
        async for batch in self._service.export(
            since_ms=query.since_ms,
            min_success_rate=query.min_success_rate,
            batch_size=query.batch_size,
        ):
            if pending is not None:
                yield pending
            # Rows come in device order: the watermark is the latest of any row so far.
            watermark = max(watermark, max(r.stored_at_ms for r in batch))
            pending = federation_pb2.PatternBatch(
                patterns=[_exported(r) for r in batch],
                watermark_ms=watermark,
                shard_id=shard_id,
                global_version=version,
            )
        async for updates in self._service.export_model_updates(batch_size=query.batch_size):
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
        views = await self._service.store.content_views_since(query.views_since_round)
        last.content_views.extend(
            patterns_pb2.ContentViewCount(content_id=c, views=min(n, 2**32 - 1)) for c, n in views
        )
        yield last

    async def PublishRound(
        self, request: federation_pb2.PublishRoundRequest, context: grpc.aio.ServicerContext
    ) -> federation_pb2.PublishRoundResponse:
        """Store a federation round once (a repeated round is acknowledged, not applied); the
        answer carries the shard's model version after it (the worker catches a shard whose
        model is behind up with PublishModelSnapshot)."""
        published = publish_from_request(request)
        version, stored, duplicate = await self._service.publish(
            published,
            epsilon=request.epsilon,
            cumulative_epsilon=request.cumulative_epsilon,
            noise_multiplier=request.noise_multiplier,
        )
        model = await self._service.store.model_state()
        return federation_pb2.PublishRoundResponse(
            global_version=version,
            patterns_stored=stored,
            duplicate=duplicate,
            model_version=model.version,
        )

    async def PublishModelSnapshot(
        self,
        request: federation_pb2.PublishModelSnapshotRequest,
        context: grpc.aio.ServicerContext,
    ) -> federation_pb2.PublishModelSnapshotResponse:
        """Replace the shard's model by a newer whole one (an older or equal one is a no-op)."""
        outcome = await self._service.publish_model_snapshot(snapshot_from_request(request))
        return federation_pb2.PublishModelSnapshotResponse(
            model_version=outcome.model_version,
            applied=outcome.applied,
            rows_stored=outcome.rows_stored,
        )
