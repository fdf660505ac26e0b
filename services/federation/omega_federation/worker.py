"""One federation round over gRPC, and the periodic loop.

A round (ARCHITECTURE.md section 4):
1. take the round lock (Postgres advisory lock in the worker's own database);
2. resume a round checkpointed as ``aggregated`` (publish its stored payload), or
3. export from every shard, patterns stored since that shard's watermark with success rate
   >= the round threshold, and view counts since the last round;
4. group by (context bucket, codebook centroid), keep groups with >= ``min_sources`` devices,
   quality-weighted federated averaging with differential privacy (`aggregation`), streamed:
   each export batch is aggregated as it arrives (whole devices), so a round holds per-group
   sums, not its patterns;
5. trends from noisy view counts, decayed per hour (`trends`);
6. the collaborative model: create it or take one noisy subspace-iteration step from the
   devices' model updates, charged to its privacy ledger (`model_round`);
7. checkpoint the round, publish it to every shard (idempotent per round);
8. send the whole model to every shard whose model version is behind the worker's (a shard
   added later or restored; `model_catchup`: a failure is logged and retried next round);
9. mark the round published.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import structlog

from omega.v1 import federation_pb2, federation_pb2_grpc, patterns_pb2, sync_pb2, sync_pb2_grpc
from omega_common.errors import UnavailableError
from omega_federation import metrics
from omega_federation.accounting import calibrate_noise_multiplier
from omega_federation.aggregation import (
    AggregatedPattern,
    Contributions,
    GroupAccumulator,
    release_round,
)
from omega_federation.codebook import Codebook
from omega_federation.model_catchup import CatchUpReport, catch_up_models, shard_model_versions
from omega_federation.model_round import ModelSettings, ModelState, model_round
from omega_federation.privacy import PrivacyAccountant, PrivacyParams
from omega_federation.rpc import call_shard
from omega_federation.settings import FederationSettings
from omega_federation.state import RoundRecord, ShardMark, WorkerState
from omega_federation.trends import trend_scores
from omega_protocol import (
    EMBEDDING_DIM,
    ContextBucket,
    bucket_from_context,
    decode_embedding,
    dequantize_int8,
    encode_embedding,
)
from omega_protocol.model_update import (
    ItemFactorContribution,
    ModelUpdateError,
    decode_item_factor_update,
)

__all__ = ["RoundReport", "run_periodic", "run_round"]

_log = structlog.get_logger(component="federation")


@dataclass
class RoundReport:
    """What one call of `run_round` did."""

    round_id: int | None
    status: str  # "published", "resumed", "skipped_locked", "nothing_to_do"
    exported_patterns: int = 0
    groups_total: int = 0
    patterns_published: int = 0
    trending_published: int = 0
    trend_source: str = ""
    """"model_counts" (the model's count release) or "view_counts" (the legacy pipeline)."""
    epsilon: float = 0.0
    cumulative_epsilon: float = 0.0
    seconds: float = 0.0
    shards: dict[str, int] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    """The collaborative model's figures (`ModelRoundResult.figures` and export counts)."""


@dataclass
class _Export:
    """What a round took from the shards: pattern sums, view counts, model updates."""

    accumulator: GroupAccumulator | None  # None: the patterns pipeline is off this round
    patterns: int = 0
    views: dict[str, int] = field(default_factory=dict)
    model_updates: dict[str, ItemFactorContribution] = field(default_factory=dict)
    malformed_model_updates: int = 0

    def merge(self, other: _Export) -> None:
        """Add one shard's completed export."""
        if self.accumulator is not None and other.accumulator is not None:
            self.accumulator.merge(other.accumulator)
        self.patterns += other.patterns
        for content_id, views in other.views.items():
            self.views[content_id] = self.views.get(content_id, 0) + views
        self.model_updates.update(other.model_updates)
        self.malformed_model_updates += other.malformed_model_updates


@dataclass
class _Rows:
    """Exported patterns not aggregated yet (columns)."""

    device_keys: list[str] = field(default_factory=list)
    buckets: list[int] = field(default_factory=list)
    codes: list[bytes] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.device_keys)

    def split_last_device(self) -> _Rows:
        """Remove the rows of the last device (it may go on in the next batch); return them."""
        last = self.device_keys[-1]
        cut = len(self.device_keys)
        while cut > 0 and self.device_keys[cut - 1] == last:
            cut -= 1
        rest = _Rows(
            self.device_keys[cut:],
            self.buckets[cut:],
            self.codes[cut:],
            self.scales[cut:],
            self.rates[cut:],
            self.samples[cut:],
        )
        for column in (
            self.device_keys,
            self.buckets,
            self.codes,
            self.scales,
            self.rates,
            self.samples,
        ):
            del column[cut:]
        return rest

    def contributions(self) -> Contributions:
        n = len(self.codes)
        codes = np.frombuffer(b"".join(self.codes), dtype=np.int8).reshape(n, EMBEDDING_DIM)
        embeddings = dequantize_int8(codes, np.asarray(self.scales, dtype=np.float32))
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        embeddings /= np.maximum(norms, 1e-12)
        return Contributions(
            device_keys=np.asarray(self.device_keys, dtype=object),
            buckets=np.asarray(self.buckets, dtype=np.int32),
            embeddings=embeddings.astype(np.float32, copy=False),
            success_rates=np.asarray(self.rates, dtype=np.float32),
            sample_counts=np.maximum(np.asarray(self.samples, dtype=np.int64), 1),
        )


async def _export_shard(
    shard_id: str,
    stub: federation_pb2_grpc.FederationStub,
    mark: ShardMark,
    settings: FederationSettings,
    codebook: Codebook | None,
    privacy: PrivacyParams,
) -> tuple[ShardMark, _Export]:
    """Stream one shard's export into its own `_Export` (retried whole on failure).

    The shard sends a device's patterns consecutively (ordered by device), so each batch is
    aggregated at once as whole devices, holding back only the last device's rows until the
    next batch shows where it ends: memory stays at one batch plus the per-group sums
    (`GroupAccumulator`), whatever the number of patterns.
    """

    async def once() -> tuple[_Export, int, int]:
        sink = _Export(
            GroupAccumulator(
                codebook,
                clipping_norm=privacy.clipping_norm,
                max_groups=privacy.max_patterns_per_device,
            )
            if codebook is not None
            else None
        )
        version, watermark = 0, mark.watermark_ms
        pending = _Rows()
        call = stub.ExportPatterns(
            federation_pb2.ExportPatternsRequest(
                since_updated_at_ms=mark.watermark_ms,
                min_success_rate=settings.min_success_rate,
                batch_size=settings.export_batch_size,
                views_since_round=mark.views_round,
            ),
            timeout=settings.rpc_timeout_seconds,
        )
        async for batch in call:
            version = batch.global_version
            watermark = max(watermark, batch.watermark_ms)
            _take_batch(shard_id, batch, sink, pending)
            if sink.accumulator is not None and len(pending):
                tail = pending.split_last_device()
                if len(pending):
                    await asyncio.to_thread(sink.accumulator.add, pending.contributions())
                pending = tail
        if sink.accumulator is not None and len(pending):
            await asyncio.to_thread(sink.accumulator.add, pending.contributions())
        return sink, version, watermark

    sink, shard_version, watermark = await call_shard(
        f"export from {shard_id}", settings.rpc_attempts, once
    )
    # Views tagged with rounds up to the shard's current version are now counted.
    return ShardMark(watermark, shard_version + 1), sink


def _take_batch(
    shard_id: str, batch: federation_pb2.PatternBatch, sink: _Export, pending: _Rows
) -> None:
    """Move one export batch into ``sink`` (views, model updates, the pattern count) and its
    usable patterns into ``pending`` (only when the patterns pipeline is on)."""
    for exported in batch.patterns:
        p = exported.pattern
        if (
            p.embedding.encoding != patterns_pb2.EMBEDDING_ENCODING_INT8
            or p.embedding.dim != EMBEDDING_DIM
        ):
            continue
        try:
            bucket = bucket_from_context(p.context).index
        except ValueError:
            continue  # a shard validated contexts on write; skip anything odd
        sink.patterns += 1
        if sink.accumulator is None:
            continue
        pending.device_keys.append(f"{shard_id}/{exported.device_key}")
        pending.buckets.append(bucket)
        pending.codes.append(p.embedding.data)
        pending.scales.append(p.embedding.scale)
        pending.rates.append(min(max(p.success_rate, 0.0), 1.0))
        pending.samples.append(p.sample_count)
    for view in batch.content_views:
        sink.views[view.content_id] = sink.views.get(view.content_id, 0) + view.views
    for exported_update in batch.model_updates:
        try:
            update = decode_item_factor_update(exported_update.update)
        except ModelUpdateError:
            sink.malformed_model_updates += 1  # a shard validated it on write
            continue
        sink.model_updates[f"{shard_id}/{exported_update.device_key}"] = update


def _publish_request(
    round_id: int,
    patterns: list[AggregatedPattern],
    trending: list[tuple[str, float]],
    epsilon: float,
    cumulative_epsilon: float,
    delta: float,
) -> federation_pb2.PublishRoundRequest:
    return federation_pb2.PublishRoundRequest(
        round=round_id,
        patterns=[
            patterns_pb2.GlobalPattern(
                pattern_key=p.pattern_key,
                embedding=encode_embedding(p.embedding),
                quality=p.quality,
                source_count=p.source_count,
                success_rate=p.success_rate,
                context=ContextBucket.from_index(p.bucket).to_proto(),
                round=round_id,
            )
            for p in patterns
        ],
        trending=[patterns_pb2.TrendingContent(content_id=c, score=s) for c, s in trending],
        epsilon=epsilon,
        cumulative_epsilon=cumulative_epsilon,
        delta=delta,
    )


async def _publish(
    channels: Mapping[str, grpc.aio.Channel],
    request: federation_pb2.PublishRoundRequest,
    settings: FederationSettings,
    model_version: int,
) -> tuple[dict[str, int], CatchUpReport]:
    """Publish a round to every shard, then catch up the shards whose model is behind
    ``model_version`` (the worker's, after this round; see `model_catchup`).

    Returns:
        (shard id -> patterns stored, the catch-up's report).

    Raises:
        UnavailableError: a shard could not take the round (a failed catch-up does not raise).
    """

    async def one(
        shard_id: str, stub: federation_pb2_grpc.FederationStub
    ) -> tuple[str, federation_pb2.PublishRoundResponse]:
        response = await call_shard(
            f"publish to {shard_id}",
            settings.rpc_attempts,
            lambda: stub.PublishRound(request, timeout=settings.rpc_timeout_seconds),
        )
        return shard_id, response

    stubs = {s: federation_pb2_grpc.FederationStub(c) for s, c in channels.items()}
    responses = dict(await asyncio.gather(*(one(s, stub) for s, stub in stubs.items())))
    catch_up = await catch_up_models(
        channels, shard_model_versions(responses), model_version, settings
    )
    return {s: r.patterns_stored for s, r in responses.items()}, catch_up


async def run_round(
    settings: FederationSettings,
    state: WorkerState,
    channels: Mapping[str, grpc.aio.Channel],
) -> RoundReport:
    """Run (or resume) one round against every shard in ``channels``.

    Raises:
        UnavailableError: a shard could not be reached after retries (nothing is published,
            the round is not recorded, watermarks do not move). A shard that could not be
            sent the model it lacks does not raise: it is logged, counted in the round's
            ``model_snapshots_failed`` and tried again next round (`model_catchup`).
    """
    started = time.perf_counter()
    if not await state.try_lock():
        _log.info("round_skipped", reason="another worker holds the round lock")
        return RoundReport(None, "skipped_locked")
    try:
        latest = await state.latest()
        if latest is not None and latest.status == "aggregated":
            return await _resume(latest, channels, settings, state, started)
        return await _new_round(latest, channels, settings, state, started)
    finally:
        await state.unlock()


async def _resume(
    record: RoundRecord,
    channels: Mapping[str, grpc.aio.Channel],
    settings: FederationSettings,
    state: WorkerState,
    started: float,
) -> RoundReport:
    request = federation_pb2.PublishRoundRequest.FromString(record.payload)
    model_version = ModelState.from_dict(record.model).version
    stored, catch_up = await _publish(channels, request, settings, model_version)
    await state.mark_published(
        record.round_id, {**record.figures, **catch_up.figures(), "resumed": True}
    )
    metrics.ROUNDS.labels("resumed").inc()
    _log.info("round_resumed", round=record.round_id)
    return RoundReport(
        record.round_id,
        "resumed",
        patterns_published=len(request.patterns),
        trending_published=len(request.trending),
        epsilon=request.epsilon,
        cumulative_epsilon=request.cumulative_epsilon,
        seconds=time.perf_counter() - started,
        shards=stored,
        model=catch_up.figures(),
    )


async def _new_round(
    latest: RoundRecord | None,
    channels: Mapping[str, grpc.aio.Channel],
    settings: FederationSettings,
    state: WorkerState,
    started: float,
) -> RoundReport:
    round_id = (latest.round_id if latest else 0) + 1
    stubs = {s: federation_pb2_grpc.FederationStub(c) for s, c in channels.items()}
    marks = dict(latest.marks) if latest else {}
    params = PrivacyParams(
        epsilon=settings.epsilon,
        delta=settings.delta,
        clipping_norm=settings.clipping_norm,
        mechanism=settings.mechanism,
        max_patterns_per_device=settings.max_patterns_per_device,
    )
    codebook = await _codebook(state, channels, settings) if settings.patterns_enabled else None
    results = await asyncio.gather(
        *(
            _export_shard(s, stub, marks.get(s, ShardMark()), settings, codebook, params)
            for s, stub in stubs.items()
        )
    )
    new_marks = {s: r[0] for s, r in zip(stubs, results, strict=True)}
    per_shard = {s: r[1].patterns for s, r in zip(stubs, results, strict=True)}
    sink = _Export(
        GroupAccumulator(
            codebook,
            clipping_norm=params.clipping_norm,
            max_groups=params.max_patterns_per_device,
        )
        if codebook is not None
        else None
    )
    for _, shard_sink in results:
        sink.merge(shard_sink)
    exported = sink.patterns
    metrics.PATTERNS_EXPORTED.inc(exported)

    accountant = (
        PrivacyAccountant.from_dict(latest.privacy)
        if latest and latest.privacy
        else PrivacyAccountant()
    )
    rng = np.random.default_rng(None if settings.seed is None else [settings.seed, round_id])
    patterns: list[AggregatedPattern] = []
    groups_total = 0
    epsilon = 0.0
    if exported and sink.accumulator is not None:
        result = release_round(
            sink.accumulator,
            min_sources=settings.min_sources,
            privacy=params,
            accountant=accountant,
            rng=rng,
        )
        patterns = result.patterns
        groups_total = result.groups_total
        epsilon = result.privacy.epsilon if result.privacy else 0.0

    model_state = ModelState.from_dict(latest.model if latest else None)
    model_figures: dict[str, Any] = {}
    model_rows: list[patterns_pb2.ItemFactorRow] = []
    item_counts: dict[str, float] = {}
    noise = 0.0
    if settings.model_factors > 0:
        # The catalog is only read by the round that creates the model (its count release).
        catalog_ids = (await _catalog(channels, settings))[0] if model_state.version == 0 else []
        noise = _model_noise_multiplier(settings)
        stepped = await asyncio.to_thread(
            model_round,
            round_id,
            model_state,
            list(sink.model_updates.values()),
            catalog_ids,
            ModelSettings(
                factors=settings.model_factors,
                active_items=settings.model_active_items,
                noise_multiplier=noise,
                delta=settings.model_delta,
                epsilon_budget=settings.model_epsilon_budget,
                min_devices=settings.model_min_devices,
            ),
            rng,
        )
        model_state = stepped.state
        model_rows, item_counts = stepped.rows, stepped.item_counts
        model_figures = {
            **stepped.figures(),
            "model_updates_exported": len(sink.model_updates),
            "model_updates_malformed": sink.malformed_model_updates,
            "model_noise_multiplier": noise,
            "model_rows_published": len(stepped.rows),
        }
    trending = _trending(latest, settings, sink.views, item_counts, rng)
    request = _publish_request(
        round_id,
        patterns,
        trending,
        epsilon,
        accountant.cumulative_epsilon,
        settings.delta,
    )
    if settings.model_factors > 0:
        request.item_factors.extend(model_rows)
        request.factors = model_state.factors
        request.noise_multiplier = noise
    figures: dict[str, Any] = {
        "exported_patterns": exported,
        "per_shard": per_shard,
        "groups_total": groups_total,
        "patterns": len(patterns),
        "trending": len(trending),
        # Where the trending counts came from: the legacy view counts, or the model's release.
        "trend_source": "view_counts" if settings.patterns_enabled else "model_counts",
        "epsilon": epsilon,
        "cumulative_epsilon": accountant.cumulative_epsilon,
        **model_figures,
        "finished_at": time.time(),
    }
    await state.save_aggregated(
        round_id,
        new_marks,
        request.SerializeToString(),
        accountant.to_dict(),
        figures,
        model_state.to_dict(),
    )
    stored, catch_up = await _publish(channels, request, settings, model_state.version)
    figures.update(catch_up.figures())
    model_figures.update(catch_up.figures())
    await state.mark_published(round_id, figures)
    seconds = time.perf_counter() - started
    metrics.ROUNDS.labels("published").inc()
    metrics.ROUND_SECONDS.observe(seconds)
    metrics.CUMULATIVE_EPSILON.set(accountant.cumulative_epsilon)
    if model_state.ledger is not None:
        metrics.MODEL_EPSILON.set(model_state.ledger.epsilon)
        metrics.MODEL_EPSILON_BUDGET.set(model_state.ledger.epsilon_budget)
    _log.info(
        "round_published",
        round=round_id,
        seconds=round(seconds, 3),
        **{k: v for k, v in figures.items() if k != "finished_at"},
    )
    return RoundReport(
        round_id,
        "published",
        exported_patterns=exported,
        groups_total=groups_total,
        patterns_published=len(patterns),
        trending_published=len(trending),
        trend_source=figures["trend_source"],
        epsilon=epsilon,
        cumulative_epsilon=accountant.cumulative_epsilon,
        seconds=seconds,
        shards=stored,
        model=model_figures,
    )


def _trending(
    latest: RoundRecord | None,
    settings: FederationSettings,
    views: Mapping[str, int],
    item_counts: Mapping[str, float],
    rng: np.random.Generator,
) -> list[tuple[str, float]]:
    """This round's trending list: the previous one decayed plus this round's noisy counts.

    With ``patterns_enabled`` the counts are the shards' view counts with Laplace noise (the
    legacy pipeline, outside the model's ledger). Otherwise they are the collaborative model's
    count release (``item_counts``; Gaussian, per-device L2 norm <= 1, already charged to the
    ledger), present in the round that created the model and empty in later rounds, which only
    decay the list. Either way the list is re-published every round (a publish replaces it).
    """
    previous = _previous_trending(latest)
    hours = 0.0
    if latest is not None:
        hours = max(
            0.0, (time.time() - float(latest.figures.get("finished_at", time.time()))) / 3600
        )
    if settings.patterns_enabled:
        counts: Mapping[str, float] = views
        noise_scale = settings.trend_noise_scale
    else:
        counts, noise_scale = item_counts, 0.0
    return trend_scores(
        counts,
        previous,
        hours,
        decay_per_hour=settings.trend_decay_per_hour,
        noise_scale=noise_scale,
        rng=rng,
        top_n=settings.trending_top_n,
    )


def _previous_trending(latest: RoundRecord | None) -> dict[str, float]:
    if latest is None:
        return {}
    request = federation_pb2.PublishRoundRequest.FromString(latest.payload)
    return {t.content_id: t.score for t in request.trending}


async def _catalog(
    channels: Mapping[str, grpc.aio.Channel], settings: FederationSettings
) -> tuple[list[str], np.ndarray]:
    """Every catalog item of the first shard that answers, via FetchEmbeddings.

    Returns:
        ``(content ids, (n, 384) float32 embeddings)`` in the shard's paging order.

    Raises:
        UnavailableError: no shard answered.
    """
    last: Exception | None = None
    for shard_id, channel in sorted(channels.items()):
        stub = sync_pb2_grpc.ConstellationSyncStub(channel)
        ids: list[str] = []
        rows: list[np.ndarray] = []
        token = ""
        try:
            while True:
                page = await stub.FetchEmbeddings(
                    sync_pb2.FetchEmbeddingsRequest(page_size=1000, page_token=token),
                    timeout=settings.rpc_timeout_seconds,
                )
                ids += [item.content_id for item in page.items]
                rows += [decode_embedding(item.embedding) for item in page.items]
                token = page.next_page_token
                if not token:
                    break
        except grpc.aio.AioRpcError as exc:
            last = UnavailableError(f"catalog from {shard_id}: {exc.code().name}")
            continue
        if rows:
            return ids, np.stack(rows)
    if last is not None:
        raise last
    return [], np.zeros((0, EMBEDDING_DIM), dtype=np.float32)


def _model_noise_multiplier(settings: FederationSettings) -> float:
    """The configured z, or the one that spends the budget over the planned releases."""
    if settings.model_noise_multiplier is not None:
        return settings.model_noise_multiplier
    return calibrate_noise_multiplier(
        settings.model_epsilon_budget, settings.model_delta, settings.model_planned_releases
    )


async def _codebook(
    state: WorkerState,
    channels: Mapping[str, grpc.aio.Channel],
    settings: FederationSettings,
) -> Codebook | None:
    """The stored codebook, or a new one trained once and then kept stable across rounds.

    It is trained on the public catalog embeddings (fetched from a shard), so the pattern keys
    cost no privacy budget and do not depend on a round's data (a condition of the DP
    guarantee, see `aggregation.federated_average`): device patterns live in the same space,
    being running means of content embeddings. With an empty catalog there is nothing public
    to train on: None, and the round publishes no patterns (logged).
    """
    data = await state.codebook()
    if data is not None:
        return Codebook.from_bytes(data)
    _, public = await _catalog(channels, settings)
    if len(public) == 0:
        _log.warning("patterns_skipped", reason="empty catalog: no public data for a codebook")
        return None
    codebook = await asyncio.to_thread(
        Codebook.train, public, settings.codebook_size, settings.seed or 0
    )
    await state.save_codebook(codebook.to_bytes())
    return codebook


async def run_periodic(
    settings: FederationSettings,
    state: WorkerState,
    channels: Mapping[str, grpc.aio.Channel],
    stop: asyncio.Event,
    refresh: Callable[[], Awaitable[Mapping[str, grpc.aio.Channel]]] | None = None,
) -> int:
    """Run a round every ``interval_seconds`` until ``stop`` is set; returns rounds published.

    A failed round (a shard down) is logged and retried at the next tick. ``refresh``, when
    given, is awaited before each round for the channels to use (the worker's
    `ShardChannels.refresh`, which re-opens them after a certificate or token rotation).
    """
    published = 0
    metrics.ROUND_INTERVAL.set(settings.interval_seconds)
    while not stop.is_set():
        tick = time.monotonic()
        if refresh is not None:
            channels = await refresh()
        try:
            report = await run_round(settings, state, channels)
            if report.status in ("published", "resumed"):
                published += 1
                metrics.LAST_SUCCESS.set_to_current_time()
        except UnavailableError as exc:
            metrics.ROUNDS.labels("failed").inc()
            _log.warning("round_failed", error=str(exc))
        wait = max(0.0, settings.interval_seconds - (time.monotonic() - tick))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=wait)
    return published
