"""Proto <-> domain conversion for the constellation, with all request validation.

Servicers call these and nothing else touches ``*_pb2`` types; the logic and the store work on
the dataclasses defined here. Validation happens completely before any write, so a malformed
delta is rejected with INVALID_ARGUMENT and nothing is half-written.
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from omega.v1 import federation_pb2, patterns_pb2, sync_pb2
from omega_common.errors import InvalidArgumentError
from omega_protocol import (
    EMBEDDING_DIM,
    EmbeddingError,
    PayloadError,
    decode_embedding,
    decode_payload,
    pattern_context,
    quantize_int8,
)
from omega_protocol.model_update import (
    MAX_CONTENT_ID_CHARS,
    MAX_MODEL_FACTORS,
    ModelUpdateError,
    decode_item_factor_update,
)

__all__ = [
    "DeltaLimits",
    "GlobalPatternRow",
    "ItemFactorRecord",
    "ModelState",
    "ModelUpdateRecord",
    "PatternStatsUpdate",
    "StoredPattern",
    "TrendingRow",
    "ValidatedDelta",
    "ValidatedRound",
    "delta_from_request",
    "embedding_to_int8",
    "exported_model_update",
    "global_patterns_message",
    "int8_to_embedding",
    "item_factor_row",
    "publish_from_request",
]

_MAX_ID_CHARS = 128
_VALID_SLOTS = frozenset(patterns_pb2.TimeSlot.values()) - {patterns_pb2.TIME_SLOT_UNSPECIFIED}
_VALID_DAYS = frozenset(patterns_pb2.DayType.values()) - {patterns_pb2.DAY_TYPE_UNSPECIFIED}


@dataclass(frozen=True, slots=True)
class DeltaLimits:
    """Bounds a delta must respect."""

    max_raw_bytes: int
    max_patterns: int
    max_content_views: int


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


def _check_id(value: str, what: str) -> str:
    if not value or len(value) > _MAX_ID_CHARS:
        raise InvalidArgumentError(f"{what} must have 1 to {_MAX_ID_CHARS} characters")
    return value


def _check_rate(value: float, what: str) -> float:
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InvalidArgumentError(f"{what} must be a finite number in [0, 1], got {value}")
    return value


def embedding_to_int8(embedding: patterns_pb2.Embedding, what: str) -> tuple[bytes, float]:
    """Validate a wire embedding and return it as (int8 codes, scale).

    INT8 input is passed through unchanged (no re-quantization error); float input is quantized.

    Raises:
        InvalidArgumentError: wrong dimension, bad length or encoding, non-finite or zero vector.
    """
    try:
        vector = decode_embedding(embedding, EMBEDDING_DIM)
    except EmbeddingError as exc:
        raise InvalidArgumentError(f"{what}: {exc}") from exc
    if float(np.dot(vector, vector)) < 1e-12:
        raise InvalidArgumentError(f"{what}: embedding is the zero vector")
    if embedding.encoding == patterns_pb2.EMBEDDING_ENCODING_INT8:
        return bytes(embedding.data), float(embedding.scale)
    codes, scale = quantize_int8(vector)
    return codes.tobytes(), float(scale)


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
    _check_id(p.pattern_id, f"{what}.pattern_id")
    if not p.HasField("embedding"):
        raise InvalidArgumentError(f"{what}: embedding is missing")
    codes, scale = embedding_to_int8(p.embedding, what)
    ctx = p.context
    if ctx.time_slot not in _VALID_SLOTS or ctx.day_type not in _VALID_DAYS:
        raise InvalidArgumentError(f"{what}: context needs a time slot and a day type")
    if len(ctx.genre_hints) > 16 or any(len(g) > 64 for g in ctx.genre_hints):
        raise InvalidArgumentError(f"{what}: at most 16 genre hints of 64 characters")
    if len(ctx.content_type) > 64:
        raise InvalidArgumentError(f"{what}: content_type longer than 64 characters")
    if p.created_at_ms < 0 or p.updated_at_ms < 0:
        raise InvalidArgumentError(f"{what}: negative timestamp")
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
    _check_id(u.pattern_id, f"{what}.pattern_id")
    codes: bytes | None = None
    scale: float | None = None
    if u.HasField("embedding"):
        codes, scale = embedding_to_int8(u.embedding, what)
    if u.updated_at_ms < 0:
        raise InvalidArgumentError(f"{what}: negative timestamp")
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

    Args:
        request: The device's request.
        limits: Size bounds.
        catalog: The shard's catalog content ids; a model update may name only these.
        model: The shard's current model; a model update's direction computed against this
            version must have its factor count.

    Raises:
        InvalidArgumentError: a bad device id or version (0 is allowed only for an empty
            delta: a pull that writes nothing), an undecodable or oversized payload
            (zstd bomb), too many patterns, a wrong dimension, NaN values, rates outside
            [0, 1], duplicate ids or inconsistent versions; a malformed model update (see
            `omega_protocol.model_update.decode_item_factor_update`), one naming content ids
            outside the catalog or with a direction of the wrong factor count.
    """
    device_id = _check_id(request.device_id, "device_id")
    if not request.HasField("delta"):
        raise InvalidArgumentError("delta is missing")
    try:
        delta = decode_payload(
            request.delta, patterns_pb2.PatternDelta, max_raw_bytes=limits.max_raw_bytes
        )
    except PayloadError as exc:
        raise InvalidArgumentError(f"delta: {exc}") from exc
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
    removed = [_check_id(r, "removed pattern id") for r in delta.removed]
    _unique([*(p.pattern_id for p in upserts), *(u.pattern_id for u in updates), *removed], "delta")
    views: dict[str, int] = {}
    for v in delta.content_views:
        _check_id(v.content_id, "content_views.content_id")
        views[v.content_id] = views.get(v.content_id, 0) + v.views
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
        content_views=sorted((c, n) for c, n in views.items() if n > 0),
        model_update=model_update,
    )


def global_patterns_message(
    patterns: Sequence[GlobalPatternRow], trending: Sequence[TrendingRow], version: int
) -> patterns_pb2.GlobalPatterns:
    """Build the `GlobalPatterns` message sent down to devices."""
    return patterns_pb2.GlobalPatterns(
        patterns=[
            patterns_pb2.GlobalPattern(
                pattern_key=p.pattern_key,
                embedding=int8_to_embedding(p.codes, p.scale),
                quality=p.quality,
                source_count=p.source_count,
                success_rate=p.success_rate,
                context=pattern_context(p.time_slot, p.day_type),
                round=p.round,
            )
            for p in patterns
        ],
        trending=[
            patterns_pb2.TrendingContent(content_id=t.content_id, score=t.score) for t in trending
        ],
        global_version=version,
    )


def _item_factors(request: federation_pb2.PublishRoundRequest) -> list[ItemFactorRecord]:
    """Validate the model rows of a round (a row without a factor left the model)."""
    factors = request.factors
    if not 1 <= factors <= MAX_MODEL_FACTORS:
        raise InvalidArgumentError(f"factors must be in [1, {MAX_MODEL_FACTORS}], got {factors}")
    rows: list[ItemFactorRecord] = []
    for i, row in enumerate(request.item_factors):
        what = f"item_factors[{i}]"
        cid = row.content_id
        if not cid or len(cid) > MAX_CONTENT_ID_CHARS or "\x00" in cid:
            raise InvalidArgumentError(
                f"{what}.content_id must have 1 to {MAX_CONTENT_ID_CHARS} characters, no NUL"
            )
        codes: bytes | None = None
        scale: float | None = None
        if row.HasField("factor"):
            try:
                vector = decode_embedding(row.factor, factors)
            except EmbeddingError as exc:
                raise InvalidArgumentError(f"{what}.factor: {exc}") from exc
            if row.factor.encoding == patterns_pb2.EMBEDDING_ENCODING_INT8:
                codes, scale = bytes(row.factor.data), float(row.factor.scale)
            else:
                q, s = quantize_int8(vector)
                codes, scale = q.tobytes(), float(s)
        rows.append(ItemFactorRecord(cid, codes, scale, request.round))
    _unique((r.content_id for r in rows), "item_factors")
    return rows


def publish_from_request(request: federation_pb2.PublishRoundRequest) -> ValidatedRound:
    """Validate a `PublishRoundRequest` into rows to store.

    Raises:
        InvalidArgumentError: round 0, bad embeddings, contexts, scores or duplicate keys; model
            rows with a factor count outside [1, 256], factors of another dimension or with
            non-finite values, empty, overlong or repeated content ids.
    """
    if request.round == 0:
        raise InvalidArgumentError("round must be >= 1")
    if not math.isfinite(request.noise_multiplier) or request.noise_multiplier < 0:
        raise InvalidArgumentError("noise_multiplier must be a finite number >= 0")
    rows: list[GlobalPatternRow] = []
    for i, p in enumerate(request.patterns):
        what = f"patterns[{i}]"
        _check_id(p.pattern_key, f"{what}.pattern_key")
        codes, scale = embedding_to_int8(p.embedding, what)
        if p.context.time_slot not in _VALID_SLOTS or p.context.day_type not in _VALID_DAYS:
            raise InvalidArgumentError(f"{what}: context needs a time slot and a day type")
        if not math.isfinite(p.quality) or p.quality < 0:
            raise InvalidArgumentError(f"{what}: quality must be finite and >= 0")
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
    _unique((r.pattern_key for r in rows), "patterns")
    trending: list[TrendingRow] = []
    for t in request.trending:
        _check_id(t.content_id, "trending.content_id")
        if not math.isfinite(t.score):
            raise InvalidArgumentError("trending score must be finite")
        trending.append(TrendingRow(content_id=t.content_id, score=t.score))
    _unique((t.content_id for t in trending), "trending")
    item_factors = _item_factors(request) if request.item_factors else []
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
