"""Proto <-> domain conversion for the constellation, with all request validation.

Servicers call these and nothing else touches ``*_pb2`` types; the logic and the store work on
the dataclasses defined here. Validation happens completely before any write, so a malformed
delta is rejected with INVALID_ARGUMENT and nothing is half-written. Every field of every
request is bounded here (with the primitives of `omega_constellation.bounds`): ids, uint64
versions, timestamps, floats, embedding norms, counts and sizes.
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from omega.v1 import federation_pb2, patterns_pb2, sync_pb2
from omega_common.errors import InvalidArgumentError
from omega_constellation.bounds import (
    MAX_CONTENT_ID_CHARS,
    MAX_PAGE_TOKEN_CHARS,
    check_finite,
    check_id,
    check_int8_unit_norm,
    check_int64,
    check_text,
    check_timestamp_ms,
    check_unit_norm,
)
from omega_protocol import (
    EMBEDDING_DIM,
    EmbeddingError,
    PayloadError,
    decode_embedding,
    decode_payload,
    dequantize_int8,
    encode_embeddings,
    pattern_context,
    quantize_int8,
)
from omega_protocol.model_update import (
    MAX_MODEL_FACTORS,
    MAX_UPDATE_ITEMS,
    ModelUpdateError,
    decode_item_factor_update,
)

__all__ = [
    "CatalogQuery",
    "DeltaLimits",
    "DeviceReport",
    "ExportQuery",
    "GlobalPatternRow",
    "ItemFactorRecord",
    "MetricLimits",
    "ModelQuery",
    "ModelState",
    "ModelUpdateRecord",
    "PatternStatsUpdate",
    "SearchQuery",
    "StoredPattern",
    "TrendingRow",
    "ValidatedDelta",
    "ValidatedRound",
    "ValidatedSnapshot",
    "catalog_embeddings",
    "catalog_query_from_request",
    "delta_from_request",
    "device_report_from_request",
    "embedding_to_int8",
    "export_query_from_request",
    "exported_model_update",
    "global_patterns_page",
    "int8_to_embedding",
    "item_factor_row",
    "model_query_from_request",
    "publish_from_request",
    "search_query_from_request",
    "snapshot_from_request",
]

_MAX_PAGE: Final[int] = 1000
"""Most catalog items one FetchEmbeddings page carries, whatever the client asks."""
_MAX_FILTER_IDS: Final[int] = 1000
"""Most content ids a FetchEmbeddings or SearchContent request may list."""
_MAX_FILTER_GENRES: Final[int] = 64
"""Most genres a SearchContent request may list."""
_MAX_GENRE_CHARS: Final[int] = 64
"""Longest genre or content type, in characters."""
_MAX_FACTOR_NORM: Final[float] = 1e3
"""Largest L2 norm of a published model row. The rows of a model with orthonormal columns have
norm <= 1; the bound only keeps the devices' float32 arithmetic far from overflow."""
_MAX_SOURCE_COUNT: Final[int] = 2**31 - 1
"""Largest source count of a global pattern (a Postgres ``integer``)."""
_VALID_SLOTS = frozenset(patterns_pb2.TimeSlot.values()) - {patterns_pb2.TIME_SLOT_UNSPECIFIED}
_VALID_DAYS = frozenset(patterns_pb2.DayType.values()) - {patterns_pb2.DAY_TYPE_UNSPECIFIED}


@dataclass(frozen=True, slots=True)
class DeltaLimits:
    """Bounds a delta must respect (from `ConstellationSettings`).

    Attributes:
        max_raw_bytes: Decompressed size of the delta, in bytes.
        max_patterns: Patterns added plus updated.
        max_content_views: View-count entries.
        max_views_per_content: Views of one content id (summed over its entries).
        max_views_per_sync: Views of all content ids together.
    """

    max_raw_bytes: int
    max_patterns: int
    max_content_views: int
    max_views_per_content: int
    max_views_per_sync: int


@dataclass(frozen=True, slots=True)
class StoredPattern:
    """A device pattern as stored: int8 embedding codes (384 bytes) plus scale."""

    pattern_id: str
    codes: bytes
    scale: float
    success_rate: float
    sample_count: int
    time_slot: int
    day_type: int
    content_type: str
    genre_hints: list[str]
    created_at_ms: int
    updated_at_ms: int


@dataclass(frozen=True, slots=True)
class PatternStatsUpdate:
    """A change to a stored pattern; ``codes``/``scale`` are None when the embedding is kept."""

    pattern_id: str
    success_rate: float
    additional_samples: int
    codes: bytes | None
    scale: float | None
    updated_at_ms: int


@dataclass(frozen=True, slots=True)
class ModelState:
    """The shard's current item-factor model: its version (0: none yet) and factor count."""

    version: int
    factors: int


@dataclass(frozen=True, slots=True)
class ModelUpdateRecord:
    """A device's validated `ItemFactorUpdate`, as stored in ``model_updates``.

    Attributes:
        model_version: The model version the update was computed against (0: no model).
        direction_dim: Factor count of the update's direction; None without a direction.
        payload: The serialized `omega.v1.ItemFactorUpdate`, exported to the worker as is.
    """

    model_version: int
    direction_dim: int | None
    payload: bytes


@dataclass(frozen=True, slots=True)
class ItemFactorRecord:
    """One row of the item-factor model.

    Attributes:
        content_id: The catalog item.
        codes: (factors,) int8 codes as bytes; None when the item left the model.
        scale: The int8 scale (``factor ~= codes * scale``); None with ``codes``.
        model_version: The model version that last changed the row.
    """

    content_id: str
    codes: bytes | None
    scale: float | None
    model_version: int


@dataclass(frozen=True, slots=True)
class ValidatedDelta:
    """A sync request that passed every check."""

    device_id: str
    local_version: int
    since_global_version: int
    upserts: list[StoredPattern]
    updates: list[PatternStatsUpdate]
    removed: list[str]
    content_views: list[tuple[str, int]]
    model_update: ModelUpdateRecord | None = None
    global_page_version: int = 0  # the part of a global-patterns transfer asked for
    global_page_offset: int = 0


@dataclass(frozen=True, slots=True)
class ValidatedRound:
    """A `PublishRoundRequest` that passed every check.

    Attributes:
        round: The federation round (>= 1); also the model version of ``item_factors``.
        patterns: Global patterns to upsert.
        trending: The new trending list (replaces the old one).
        item_factors: Model rows that changed in this round (empty: the model is untouched).
        factors: Factor count of the model (0 when ``item_factors`` is empty).
    """

    round: int
    patterns: list[GlobalPatternRow]
    trending: list[TrendingRow]
    item_factors: list[ItemFactorRecord]
    factors: int


@dataclass(frozen=True, slots=True)
class ValidatedSnapshot:
    """A `PublishModelSnapshotRequest` that passed every check: the whole model at one version.

    Attributes:
        model_version: The version of the model (>= 1).
        factors: Factors per item.
        item_factors: Every row, each with the version that last changed it (<=
            ``model_version``); a row without codes has left the model.
    """

    model_version: int
    factors: int
    item_factors: list[ItemFactorRecord]


@dataclass(frozen=True, slots=True)
class GlobalPatternRow:
    """A global pattern as stored in ``global_patterns``."""

    pattern_key: str
    round: int
    codes: bytes
    scale: float
    quality: float
    success_rate: float
    source_count: int
    time_slot: int
    day_type: int


@dataclass(frozen=True, slots=True)
class TrendingRow:
    """One trending content id with its score."""

    content_id: str
    score: float


def _check_rate(value: float, what: str) -> float:
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InvalidArgumentError(f"{what} must be a finite number in [0, 1], got {value}")
    return value


def embedding_to_int8(embedding: patterns_pb2.Embedding, what: str) -> tuple[bytes, float]:
    """Validate a wire embedding that should be a unit vector; return it as (int8 codes, scale).

    INT8 input is passed through unchanged (no re-quantization error); float input is quantized.
    Whatever the encoding, the decoded vector must have an L2 norm in [0.5, 2]: a finite but
    huge INT8 scale (or huge floats) would otherwise be stored and overflow float32 later.

    Raises:
        InvalidArgumentError: wrong dimension, bad length or encoding, a negative or non-finite
            scale, non-finite values, the zero vector or a norm outside [0.5, 2].
    """
    if embedding.encoding == patterns_pb2.EMBEDDING_ENCODING_INT8:
        # What devices send: checked on the codes themselves, never decoded to floats
        # (the same checks as `decode_embedding` + `check_unit_norm`; 4x cheaper).
        data = bytes(embedding.data)
        if embedding.dim != EMBEDDING_DIM or len(data) != EMBEDDING_DIM:
            raise InvalidArgumentError(
                f"{what}: embedding has dimension {embedding.dim} and {len(data)} bytes,"
                f" expected {EMBEDDING_DIM} int8 codes"
            )
        scale = float(embedding.scale)
        if not math.isfinite(scale) or scale < 0:
            raise InvalidArgumentError(f"{what}: invalid int8 scale {embedding.scale}")
        check_int8_unit_norm(data, scale, what)
        return data, scale
    try:
        vector = decode_embedding(embedding, EMBEDDING_DIM)
    except EmbeddingError as exc:
        raise InvalidArgumentError(f"{what}: {exc}") from exc
    check_unit_norm(vector, what)
    codes, scales = quantize_int8(vector)
    return codes.tobytes(), float(scales)


def int8_to_embedding(codes: bytes, scale: float) -> patterns_pb2.Embedding:
    """Stored int8 codes and scale as a wire `Embedding` (no conversion)."""
    return patterns_pb2.Embedding(
        encoding=patterns_pb2.EMBEDDING_ENCODING_INT8,
        dim=len(codes),
        scale=scale,
        data=codes,
    )


def _pattern(p: patterns_pb2.ViewingPattern, i: int) -> StoredPattern:
    what = f"added[{i}]"
    check_id(p.pattern_id, f"{what}.pattern_id")
    if not p.HasField("embedding"):
        raise InvalidArgumentError(f"{what}: embedding is missing")
    codes, scale = embedding_to_int8(p.embedding, what)
    ctx = p.context
    if ctx.time_slot not in _VALID_SLOTS or ctx.day_type not in _VALID_DAYS:
        raise InvalidArgumentError(f"{what}: context needs a time slot and a day type")
    if len(ctx.genre_hints) > 16:
        raise InvalidArgumentError(f"{what}: at most 16 genre hints")
    for j, genre in enumerate(ctx.genre_hints):
        check_text(genre, f"{what}.context.genre_hints[{j}]", _MAX_GENRE_CHARS)
    check_text(ctx.content_type, f"{what}.context.content_type", _MAX_GENRE_CHARS)
    check_timestamp_ms(p.created_at_ms, f"{what}.created_at_ms")
    check_timestamp_ms(p.updated_at_ms, f"{what}.updated_at_ms")
    return StoredPattern(
        pattern_id=p.pattern_id,
        codes=codes,
        scale=scale,
        success_rate=_check_rate(p.success_rate, f"{what}.success_rate"),
        sample_count=p.sample_count,
        time_slot=ctx.time_slot,
        day_type=ctx.day_type,
        content_type=ctx.content_type,
        genre_hints=list(ctx.genre_hints),
        created_at_ms=p.created_at_ms,
        updated_at_ms=p.updated_at_ms,
    )


def _update(u: patterns_pb2.PatternUpdate, i: int) -> PatternStatsUpdate:
    what = f"updated[{i}]"
    check_id(u.pattern_id, f"{what}.pattern_id")
    codes: bytes | None = None
    scale: float | None = None
    if u.HasField("embedding"):
        codes, scale = embedding_to_int8(u.embedding, what)
    check_timestamp_ms(u.updated_at_ms, f"{what}.updated_at_ms")
    return PatternStatsUpdate(
        pattern_id=u.pattern_id,
        success_rate=_check_rate(u.success_rate, f"{what}.success_rate"),
        additional_samples=u.additional_samples,
        codes=codes,
        scale=scale,
        updated_at_ms=u.updated_at_ms,
    )


def _unique(ids: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for key in ids:
        if key in seen:
            raise InvalidArgumentError(f"{key[:40]!r} appears twice in {what}")
        seen.add(key)


def _model_update(
    update: patterns_pb2.ItemFactorUpdate, catalog: Container[str], model: ModelState
) -> ModelUpdateRecord:
    """Validate a device's `ItemFactorUpdate` against the catalog and the current model."""
    check_int64(update.model_version, "model_update.model_version")
    for i, content_id in enumerate(update.content_ids[:MAX_UPDATE_ITEMS]):
        check_id(content_id, f"model_update.content_ids[{i}]", MAX_CONTENT_ID_CHARS)
    expected = model.factors if update.model_version == model.version and model.version else None
    try:
        decoded = decode_item_factor_update(update, expected_factors=expected)
    except ModelUpdateError as exc:
        raise InvalidArgumentError(str(exc)) from exc
    for content_id in decoded.content_ids:
        if content_id not in catalog:
            raise InvalidArgumentError(
                f"model_update: content id {content_id[:40]!r} is not in the shard's catalog"
            )
    return ModelUpdateRecord(
        model_version=decoded.model_version,
        direction_dim=None if decoded.direction is None else int(decoded.direction.shape[0]),
        payload=update.SerializeToString(deterministic=True),
    )


def delta_from_request(
    request: sync_pb2.SyncPatternsRequest,
    limits: DeltaLimits,
    *,
    catalog: Container[str],
    model: ModelState,
) -> ValidatedDelta:
    """Decode and validate a `SyncPatternsRequest` completely.

    View counts of content ids that are not in ``catalog`` are dropped, not refused: the
    catalog can change between a device's viewing and its sync (an item removed, a shard
    serving another catalog), and refusing the whole delta would make the device retry it
    forever. The ids are still validated and their views still count towards the limits.

    Args:
        request: The device's request.
        limits: Size and count bounds.
        catalog: The shard's catalog content ids; view counts and a model update may name
            only these.
        model: The shard's current model; a model update's direction computed against this
            version must have its factor count.

    Raises:
        InvalidArgumentError: a bad device id (empty, too long, control characters) or
            version (above 2^63 - 1; 0 is allowed only for an empty delta: a pull that writes
            nothing), an undecodable or oversized payload (zstd bomb), too many patterns or
            view entries, more views per content id or per sync than ``limits`` allow, a
            wrong dimension, NaN values, an embedding that is not a unit vector (a huge INT8
            scale), rates outside [0, 1], timestamps outside [0, 2100), duplicate ids or
            inconsistent versions; a malformed model update (see
            `omega_protocol.model_update.decode_item_factor_update`), one naming content ids
            outside the catalog or with a direction of the wrong factor count.
    """
    device_id = check_id(request.device_id, "device_id")
    check_int64(request.local_version, "local_version")
    check_int64(request.since_global_version, "since_global_version")
    check_int64(request.global_page_version, "global_page_version")
    if not request.HasField("delta"):
        raise InvalidArgumentError("delta is missing")
    try:
        delta = decode_payload(
            request.delta, patterns_pb2.PatternDelta, max_raw_bytes=limits.max_raw_bytes
        )
    except PayloadError as exc:
        raise InvalidArgumentError(f"delta: {exc}") from exc
    check_int64(delta.base_version, "delta.base_version")
    if delta.local_version != request.local_version:
        raise InvalidArgumentError(
            f"delta.local_version {delta.local_version} != request {request.local_version}"
        )
    if delta.base_version > delta.local_version:
        raise InvalidArgumentError("delta.base_version must not exceed local_version")
    if request.local_version == 0 and (
        delta.added
        or delta.updated
        or delta.removed
        or delta.content_views
        or delta.HasField("model_update")
    ):
        # Version 0 is a pull: a device that has learned nothing yet (a new or factory-reset
        # store) asks for the global state. It may not write anything.
        raise InvalidArgumentError("local_version must be >= 1 for a delta that carries data")
    if len(delta.added) + len(delta.updated) > limits.max_patterns:
        raise InvalidArgumentError(f"more than {limits.max_patterns} patterns in one delta")
    if len(delta.content_views) > limits.max_content_views:
        raise InvalidArgumentError(f"more than {limits.max_content_views} content view entries")
    upserts = [_pattern(p, i) for i, p in enumerate(delta.added)]
    updates = [_update(u, i) for i, u in enumerate(delta.updated)]
    removed = [check_id(r, f"removed[{i}]") for i, r in enumerate(delta.removed)]
    _unique([*(p.pattern_id for p in upserts), *(u.pattern_id for u in updates), *removed], "delta")
    views = _content_views(delta.content_views, limits, catalog)
    model_update = (
        _model_update(delta.model_update, catalog, model)
        if delta.HasField("model_update")
        else None
    )
    return ValidatedDelta(
        device_id=device_id,
        local_version=request.local_version,
        since_global_version=request.since_global_version,
        upserts=upserts,
        updates=updates,
        removed=removed,
        content_views=views,
        model_update=model_update,
        global_page_version=request.global_page_version,
        global_page_offset=request.global_page_offset,
    )


def _content_views(
    entries: Sequence[patterns_pb2.ContentViewCount], limits: DeltaLimits, catalog: Container[str]
) -> list[tuple[str, int]]:
    """Views per catalog content id, sorted by id (unknown ids dropped, see the caller).

    Raises:
        InvalidArgumentError: a bad content id, more views of one id or in all than allowed.
    """
    views: dict[str, int] = {}
    total = 0
    for i, v in enumerate(entries):
        check_id(v.content_id, f"content_views[{i}].content_id", MAX_CONTENT_ID_CHARS)
        count = views.get(v.content_id, 0) + v.views
        if count > limits.max_views_per_content:
            raise InvalidArgumentError(
                f"content_views[{i}].views: more than {limits.max_views_per_content} views of"
                f" {v.content_id[:40]!r} in one sync"
            )
        views[v.content_id] = count
        total += v.views
        if total > limits.max_views_per_sync:
            raise InvalidArgumentError(
                f"content_views: more than {limits.max_views_per_sync} views in one sync"
            )
    return sorted((c, n) for c, n in views.items() if n > 0 and c in catalog)


_FIELD_OVERHEAD = 6
"""Bytes a repeated message field adds to its element's size, at most (tag and length)."""


def global_patterns_page(
    patterns: Sequence[GlobalPatternRow],
    trending: Sequence[TrendingRow],
    version: int,
    start: int,
    budget_bytes: int,
) -> tuple[patterns_pb2.GlobalPatterns, int]:
    """The part of a sync answer's global content that fits ``budget_bytes``.

    Trending items go first, within half the budget (a list of 50 short ids is about
    600 bytes); then ``patterns[start:]`` (best first) while they fit. At least one pattern is
    sent when one is left, so every answer makes progress.

    Args:
        patterns: The patterns newer than the device's version, best first.
        trending: The trending list to send.
        version: The shard's global version (the message's ``global_version``).
        start: Index in ``patterns`` of the first pattern to send.
        budget_bytes: Most bytes of the serialized (uncompressed) message.

    Returns:
        The message and the index of the first pattern left out (0 when none is left).
    """
    message = patterns_pb2.GlobalPatterns(global_version=version)
    used = message.ByteSize()
    for t in trending:
        trend = patterns_pb2.TrendingContent(content_id=t.content_id, score=t.score)
        size = trend.ByteSize() + _FIELD_OVERHEAD
        if used + size > budget_bytes // 2:
            break
        message.trending.append(trend)
        used += size
    end = start
    for p in patterns[start:]:
        item = patterns_pb2.GlobalPattern(
            pattern_key=p.pattern_key,
            embedding=int8_to_embedding(p.codes, p.scale),
            quality=p.quality,
            source_count=p.source_count,
            success_rate=p.success_rate,
            context=pattern_context(p.time_slot, p.day_type),
            round=p.round,
        )
        size = item.ByteSize() + _FIELD_OVERHEAD
        if used + size > budget_bytes and end > start:
            break
        message.patterns.append(item)
        used += size
        end += 1
    return message, (end if end < len(patterns) else 0)


def _item_factors(
    item_factors: Sequence[patterns_pb2.ItemFactorRow],
    factors: int,
    version: int,
    *,
    own_versions: bool = False,
) -> list[ItemFactorRecord]:
    """Validate model rows (a row without a factor left the model).

    Args:
        item_factors: The wire rows.
        factors: Factors per item of every row.
        version: The model version the rows belong to.
        own_versions: Keep each row's ``model_version`` (the version that last changed it,
            in [1, ``version``]; 0 means ``version``), as a snapshot does; otherwise (a round)
            every row gets ``version``.

    Raises:
        InvalidArgumentError: see `publish_from_request`; with ``own_versions`` also a row
            version above ``version``.
    """
    if not 1 <= factors <= MAX_MODEL_FACTORS:
        raise InvalidArgumentError(f"factors must be in [1, {MAX_MODEL_FACTORS}], got {factors}")
    _unique((r.content_id for r in item_factors), "item_factors")  # cheap checks first
    rows: list[ItemFactorRecord] = []
    for i, row in enumerate(item_factors):
        what = f"item_factors[{i}]"
        cid = check_id(row.content_id, f"{what}.content_id", MAX_CONTENT_ID_CHARS)
        check_int64(row.model_version, f"{what}.model_version")
        row_version = version
        if own_versions and row.model_version:
            if row.model_version > version:
                raise InvalidArgumentError(
                    f"{what}.model_version {row.model_version} is above the snapshot's"
                    f" version {version}"
                )
            row_version = row.model_version
        codes: bytes | None = None
        scale: float | None = None
        if row.HasField("factor"):
            try:
                vector = decode_embedding(row.factor, factors)
            except EmbeddingError as exc:
                raise InvalidArgumentError(f"{what}.factor: {exc}") from exc
            norm = float(np.linalg.norm(vector.astype(np.float64)))
            if norm > _MAX_FACTOR_NORM:
                raise InvalidArgumentError(
                    f"{what}.factor: L2 norm {norm:.3g} is above {_MAX_FACTOR_NORM:g}"
                )
            if row.factor.encoding == patterns_pb2.EMBEDDING_ENCODING_INT8:
                codes, scale = bytes(row.factor.data), float(row.factor.scale)
            else:
                q, s = quantize_int8(vector)
                codes, scale = q.tobytes(), float(s)
        rows.append(ItemFactorRecord(cid, codes, scale, row_version))
    return rows


def snapshot_from_request(
    request: federation_pb2.PublishModelSnapshotRequest,
) -> ValidatedSnapshot:
    """Validate a `PublishModelSnapshotRequest` (the whole model at one version).

    Raises:
        InvalidArgumentError: model version 0 or above 2^63 - 1, no rows, or rows refused as
            a round's are (`publish_from_request`), or a row version above the snapshot's.
    """
    if request.model_version == 0:
        raise InvalidArgumentError("model_version must be >= 1")
    check_int64(request.model_version, "model_version")
    if not request.item_factors:
        raise InvalidArgumentError("a model snapshot needs at least one row")
    rows = _item_factors(
        request.item_factors, request.factors, request.model_version, own_versions=True
    )
    return ValidatedSnapshot(
        model_version=request.model_version, factors=request.factors, item_factors=rows
    )


def publish_from_request(request: federation_pb2.PublishRoundRequest) -> ValidatedRound:
    """Validate a `PublishRoundRequest` into rows to store.

    Raises:
        InvalidArgumentError: round 0 or above 2^63 - 1; epsilon or cumulative_epsilon NaN or
            negative (infinity means no privacy guarantee and is allowed), delta outside
            [0, 1], a negative or non-finite noise multiplier; bad ids (empty, too long,
            control characters), embeddings that are not unit vectors, contexts, scores,
            source counts above 2^31 - 1 or duplicate keys; model rows with a factor count
            outside [1, 256], factors of another dimension, with non-finite values or an L2
            norm above 1000, empty, overlong or repeated content ids.
    """
    if request.round == 0:
        raise InvalidArgumentError("round must be >= 1")
    check_int64(request.round, "round")
    for name, value in (
        ("epsilon", request.epsilon),
        ("cumulative_epsilon", request.cumulative_epsilon),
    ):
        if math.isnan(value) or value < 0:
            raise InvalidArgumentError(f"{name} must be >= 0 (infinity: no guarantee), not NaN")
    check_finite(request.delta, "delta", 0.0, 1.0)
    check_finite(request.noise_multiplier, "noise_multiplier", 0.0, math.inf)
    # Repeated keys first: cheap, and a hostile round of 10,000 copies is refused before any
    # embedding is decoded.
    _unique((p.pattern_key for p in request.patterns), "patterns")
    _unique((t.content_id for t in request.trending), "trending")
    rows: list[GlobalPatternRow] = []
    for i, p in enumerate(request.patterns):
        what = f"patterns[{i}]"
        check_id(p.pattern_key, f"{what}.pattern_key")
        check_int64(p.round, f"{what}.round")
        codes, scale = embedding_to_int8(p.embedding, what)
        if p.context.time_slot not in _VALID_SLOTS or p.context.day_type not in _VALID_DAYS:
            raise InvalidArgumentError(f"{what}: context needs a time slot and a day type")
        check_finite(p.quality, f"{what}.quality", 0.0, math.inf)
        if p.source_count > _MAX_SOURCE_COUNT:
            raise InvalidArgumentError(f"{what}.source_count must be at most {_MAX_SOURCE_COUNT}")
        rows.append(
            GlobalPatternRow(
                pattern_key=p.pattern_key,
                round=request.round,
                codes=codes,
                scale=scale,
                quality=p.quality,
                success_rate=_check_rate(p.success_rate, f"{what}.success_rate"),
                source_count=p.source_count,
                time_slot=p.context.time_slot,
                day_type=p.context.day_type,
            )
        )
    trending: list[TrendingRow] = []
    for i, t in enumerate(request.trending):
        check_id(t.content_id, f"trending[{i}].content_id", MAX_CONTENT_ID_CHARS)
        if not math.isfinite(t.score):
            raise InvalidArgumentError(f"trending[{i}].score must be finite")
        trending.append(TrendingRow(content_id=t.content_id, score=t.score))
    item_factors = (
        _item_factors(request.item_factors, request.factors, request.round)
        if request.item_factors
        else []
    )
    return ValidatedRound(
        round=request.round,
        patterns=rows,
        trending=trending,
        item_factors=item_factors,
        factors=request.factors if item_factors else 0,
    )


def item_factor_row(row: ItemFactorRecord) -> patterns_pb2.ItemFactorRow:
    """A stored model row as the wire `ItemFactorRow` (INT8 factor; none when removed)."""
    message = patterns_pb2.ItemFactorRow(content_id=row.content_id, model_version=row.model_version)
    if row.codes is not None and row.scale is not None:
        message.factor.CopyFrom(int8_to_embedding(row.codes, row.scale))
    return message


def exported_model_update(device_key: str, payload: bytes) -> federation_pb2.ExportedModelUpdate:
    """A stored model update (serialized `ItemFactorUpdate`) as the worker sees it."""
    return federation_pb2.ExportedModelUpdate(
        device_key=device_key, update=patterns_pb2.ItemFactorUpdate.FromString(payload)
    )


@dataclass(frozen=True, slots=True)
class CatalogQuery:
    """A validated `FetchEmbeddingsRequest`.

    Attributes:
        since_version: Items changed after this catalog version (ignored with ``content_ids``).
        content_ids: The items wanted (empty: by version).
        encoding: The `EmbeddingEncoding` of the answer (INT8, FLOAT16 or FLOAT32).
        offset: Position in the selection where the page starts (from the page token).
        limit: Items per page, in [1, 1000].
    """

    since_version: int
    content_ids: list[str]
    encoding: int
    offset: int
    limit: int


def catalog_query_from_request(request: sync_pb2.FetchEmbeddingsRequest) -> CatalogQuery:
    """Validate a `FetchEmbeddingsRequest`.

    Raises:
        InvalidArgumentError: a version above 2^63 - 1, more than 1000 content ids or a bad
            one, an unknown encoding, a page token this server did not issue.
    """
    since = check_int64(request.since_catalog_version, "since_catalog_version")
    if len(request.content_ids) > _MAX_FILTER_IDS:
        raise InvalidArgumentError(f"content_ids: more than {_MAX_FILTER_IDS} ids")
    ids = [
        check_id(c, f"content_ids[{i}]", MAX_CONTENT_ID_CHARS)
        for i, c in enumerate(request.content_ids)
    ]
    offset = 0
    if request.page_token:
        token = check_id(request.page_token, "page_token", MAX_PAGE_TOKEN_CHARS)
        if not token.isascii() or not token.isdigit() or len(token) > 18:
            raise InvalidArgumentError("page_token is not one this server issued")
        offset = int(token)
    encoding = request.encoding or patterns_pb2.EMBEDDING_ENCODING_INT8
    if encoding not in (
        patterns_pb2.EMBEDDING_ENCODING_INT8,
        patterns_pb2.EMBEDDING_ENCODING_FLOAT16,
        patterns_pb2.EMBEDDING_ENCODING_FLOAT32,
    ):
        raise InvalidArgumentError(f"encoding: unknown embedding encoding {encoding}")
    limit = min(request.page_size or 500, _MAX_PAGE)
    return CatalogQuery(since, ids, encoding, offset, limit)


def catalog_embeddings(
    codes: Sequence[bytes], scales: Sequence[float], encoding: int
) -> list[patterns_pb2.Embedding]:
    """Catalog rows' stored int8 embeddings in the requested wire encoding.

    Args:
        codes: (n,) int8 codes of 384 bytes each.
        scales: (n,) their scales.
        encoding: An `EmbeddingEncoding`: INT8 is passed through, FLOAT16/FLOAT32 decoded.

    Returns:
        (n,) embeddings; empty for an empty page whatever the encoding.
    """
    if encoding == patterns_pb2.EMBEDDING_ENCODING_INT8:
        return [int8_to_embedding(c, s) for c, s in zip(codes, scales, strict=True)]
    if not codes:
        return []
    stacked = np.frombuffer(b"".join(codes), dtype=np.int8).reshape(len(codes), EMBEDDING_DIM)
    return encode_embeddings(dequantize_int8(stacked, list(scales)), encoding)


@dataclass(frozen=True, slots=True)
class ModelQuery:
    """A validated `FetchModelRequest` (see `omega_constellation.model.ModelView.page`)."""

    since: int
    page_token: str
    page_size: int


def model_query_from_request(request: sync_pb2.FetchModelRequest) -> ModelQuery:
    """Validate a `FetchModelRequest` (the token itself is decoded by the model view).

    Raises:
        InvalidArgumentError: a version above 2^63 - 1; a page token too long or with control
            characters.
    """
    since = check_int64(request.since_model_version, "since_model_version")
    if request.page_token:
        check_id(request.page_token, "page_token", MAX_PAGE_TOKEN_CHARS)
    return ModelQuery(since, request.page_token, request.page_size)


@dataclass(frozen=True, slots=True)
class MetricLimits:
    """Sane ranges of a device's `DeviceMetrics` (from `ConstellationSettings`).

    Attributes:
        max_count: Largest value of a counter (events, recommendations, syncs, patterns).
        max_bytes: Largest store or memory size, in bytes.
        max_latency_ms: Largest recommendation latency, in ms.
    """

    max_count: int
    max_bytes: int
    max_latency_ms: float


@dataclass(frozen=True, slots=True)
class DeviceReport:
    """What the shard records of a `ReportMetricsRequest` (aggregate metrics only).

    Attributes:
        device_id: The reporting device (never a metric label).
        recommend_p99_seconds: Its recommendation p99 latency in seconds (0: not measured).
        syncs_failed: Its failed syncs counter.
    """

    device_id: str
    recommend_p99_seconds: float
    syncs_failed: int


def device_report_from_request(
    request: sync_pb2.ReportMetricsRequest, limits: MetricLimits
) -> DeviceReport:
    """Validate a `ReportMetricsRequest`: every counter, size and latency within ``limits``.

    Raises:
        InvalidArgumentError: a bad device id (empty, too long, control characters), a counter
            above ``limits.max_count``, a size above ``limits.max_bytes``, a latency NaN,
            negative or above ``limits.max_latency_ms``, a timestamp outside [0, 2100).
    """
    device_id = check_id(request.device_id, "device_id")
    check_timestamp_ms(request.reported_at_ms, "reported_at_ms")
    m = request.metrics
    for name, value in (
        ("events_observed", m.events_observed),
        ("recommendations_served", m.recommendations_served),
        ("syncs_ok", m.syncs_ok),
        ("syncs_failed", m.syncs_failed),
        ("pattern_count", m.pattern_count),
    ):
        if value > limits.max_count:
            raise InvalidArgumentError(f"metrics.{name} must be at most {limits.max_count}")
    for name, value in (("store_bytes", m.store_bytes), ("memory_bytes", m.memory_bytes)):
        if value > limits.max_bytes:
            raise InvalidArgumentError(f"metrics.{name} must be at most {limits.max_bytes}")
    p99 = check_finite(m.recommend_p99_ms, "metrics.recommend_p99_ms", 0.0, limits.max_latency_ms)
    return DeviceReport(device_id, p99 / 1000.0, m.syncs_failed)


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """A validated `SearchContentRequest`.

    Attributes:
        vector: (384,) float32, the query (a unit vector up to int8 rounding).
        k: Results wanted (the catalog checks [1, 1000]).
        genres: Only items with one of these genres (empty: any).
        exclude: Content ids never returned.
    """

    vector: npt.NDArray[np.float32]
    k: int
    genres: list[str]
    exclude: list[str]


def search_query_from_request(request: sync_pb2.SearchContentRequest) -> SearchQuery:
    """Validate a `SearchContentRequest`.

    Raises:
        InvalidArgumentError: no query, a query that is not a unit 384-d vector (see
            `embedding_to_int8`), more than 64 genres or 1000 excluded ids, bad genres or ids.
    """
    if not request.HasField("query"):
        raise InvalidArgumentError("query embedding is required")
    embedding_to_int8(request.query, "query")  # dimension, values, norm
    if len(request.genres) > _MAX_FILTER_GENRES:
        raise InvalidArgumentError(f"genres: more than {_MAX_FILTER_GENRES}")
    if len(request.exclude_content_ids) > _MAX_FILTER_IDS:
        raise InvalidArgumentError(f"exclude_content_ids: more than {_MAX_FILTER_IDS} ids")
    genres = [check_text(g, f"genres[{i}]", _MAX_GENRE_CHARS) for i, g in enumerate(request.genres)]
    exclude = [
        check_id(c, f"exclude_content_ids[{i}]", MAX_CONTENT_ID_CHARS)
        for i, c in enumerate(request.exclude_content_ids)
    ]
    return SearchQuery(decode_embedding(request.query), request.k or 10, genres, exclude)


@dataclass(frozen=True, slots=True)
class ExportQuery:
    """A validated `ExportPatternsRequest`.

    Attributes:
        since_ms: Patterns stored after this time (ms since the epoch; 0: all).
        min_success_rate: Patterns below this rate are not exported.
        batch_size: Rows per streamed batch (0 in the request: 1000; the service caps it).
        views_since_round: View counts of rounds >= this one ride on the last batch.
    """

    since_ms: int
    min_success_rate: float
    batch_size: int
    views_since_round: int


def export_query_from_request(request: federation_pb2.ExportPatternsRequest) -> ExportQuery:
    """Validate an `ExportPatternsRequest`.

    Raises:
        InvalidArgumentError: a watermark outside [0, 2100), a rate NaN or outside [0, 1], a
            round above 2^63 - 1.
    """
    return ExportQuery(
        since_ms=check_timestamp_ms(request.since_updated_at_ms, "since_updated_at_ms"),
        min_success_rate=check_finite(request.min_success_rate, "min_success_rate", 0.0, 1.0),
        batch_size=request.batch_size or 1000,
        views_since_round=check_int64(request.views_since_round, "views_since_round"),
    )
