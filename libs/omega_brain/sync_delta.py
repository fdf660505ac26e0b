"""What a sync sends and how the shard's answer is booked (the version rules).

`build_request` turns the patterns changed since the last acknowledged version, the pending
view counts and (once per model version) the device's model update into a
`SyncPatternsRequest`; `apply_response` books an answer in one store transaction
(acknowledgements, versions past a reset device's old self, paged global patterns, trends,
the pace); `apply_model` stores fetched collaborative-model rows. No network here: the
conversation with the shard (retries, unconfirmed sends, model fetch) is
`omega_brain.sync_client`. Every function expects ``ctx.lock`` held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from omega.v1 import patterns_pb2, sync_pb2
from omega_brain.context import BrainContext
from omega_brain.model import build_model_update
from omega_brain.patterns import normalize
from omega_brain.store import GlobalPatternRow
from omega_brain.transport import FetchedModel
from omega_protocol import (
    ContextBucket,
    EmbeddingError,
    PayloadError,
    bucket_from_context,
    decode_embedding,
    decode_payload,
    encode_embedding,
    encode_payload,
)

__all__ = ["MAX_ADOPTED_VERSION", "Sent", "apply_model", "apply_response", "build_request"]

MAX_ADOPTED_VERSION = 1 << 53
"""Largest shard version a device will number past (a factory-reset store continuing
after its old self); far below the signed 64-bit range, so no answer can wedge it."""
_UINT32_MAX = 2**32 - 1
_COMPRESS_MIN_BYTES = 64  # below this the zstd frame header costs more than it saves


@dataclass(frozen=True, slots=True)
class Sent:
    """What a sync request carried, for bookkeeping once it is acknowledged."""

    local_version: int
    patterns: list[tuple[str, int]]
    views: dict[str, int]
    model_update_version: int | None
    """The model version of the carried ItemFactorUpdate, None when there was none."""
    model_update_items: int = 0
    """How many items the carried ItemFactorUpdate covered."""


def apply_model(ctx: BrainContext, fetched: FetchedModel) -> int:
    """Store fetched rows in one transaction and refresh the in-memory model.

    Returns:
        The number of rows applied (0 when the fetch is not newer than the stored model).
    """
    if fetched.model_version <= ctx.state["model_version"]:
        return 0  # the server's model is not newer (e.g. a lagging replica)
    updates = {"model_version": fetched.model_version}
    if fetched.factors:
        updates["model_factors"] = fetched.factors
    with ctx.store.transaction():
        ctx.store.apply_model_rows(
            fetched.rows,
            replace=fetched.since_model_version == 0,
            factors=fetched.factors or ctx.state["model_factors"],
        )
        ctx.store.set_state(updates)
    ctx.state.update(updates)
    ctx.set_model(ctx.store.model())
    return len(fetched.rows)


def build_request(ctx: BrainContext) -> tuple[sync_pb2.SyncPatternsRequest, Sent]:
    """The next sync request: the delta since the acknowledged version, and what it carries."""
    acked_version = ctx.state["acked_version"]
    model_update = _model_update(ctx)
    if model_update is not None and ctx.state["local_version"] <= acked_version:
        # The shard skips a delta whose local version it has applied (a retry), so a
        # model update with no new viewing needs a version of its own.
        ctx.store.set_state({"local_version": acked_version + 1})
        ctx.state["local_version"] = acked_version + 1
    local_version = ctx.state["local_version"]
    acked = ctx.store.acked()
    delta = patterns_pb2.PatternDelta(local_version=local_version, base_version=acked_version)
    if model_update is not None:
        delta.model_update.CopyFrom(model_update)
    sent_patterns: list[tuple[str, int]] = []
    for bucket in sorted(ctx.patterns):
        row = ctx.patterns[bucket]
        st = row.state
        if st.embedding is None:
            continue
        known = acked.get(row.pattern_id)
        if known is not None and row.changed_version <= acked_version:
            continue
        if known is None or row.embedding_version > acked_version:
            # New, or its embedding moved: the full pattern, which the server upserts. The
            # server may not hold it at all (it drops patterns below its quality
            # threshold), so an update of the embedding alone could be lost.
            delta.added.append(
                patterns_pb2.ViewingPattern(
                    pattern_id=row.pattern_id,
                    embedding=encode_embedding(st.embedding),
                    success_rate=st.success_rate,
                    sample_count=min(st.sample_count, _UINT32_MAX),
                    context=ContextBucket.from_index(bucket).to_proto(),
                    created_at_ms=row.created_at_ms,
                    updated_at_ms=row.updated_at_ms,
                )
            )
        else:
            delta.updated.append(
                patterns_pb2.PatternUpdate(
                    pattern_id=row.pattern_id,
                    success_rate=st.success_rate,
                    additional_samples=min(max(st.sample_count - known, 0), _UINT32_MAX),
                    updated_at_ms=row.updated_at_ms,
                )
            )
        sent_patterns.append((row.pattern_id, st.sample_count))
    views = {c: min(v, _UINT32_MAX) for c, v in sorted(ctx.store.pending_views().items())}
    for content_id, count in views.items():
        delta.content_views.add(content_id=content_id, views=count)
    payload = encode_payload(delta, compress=delta.ByteSize() >= _COMPRESS_MIN_BYTES)
    request = sync_pb2.SyncPatternsRequest(
        device_id=ctx.device_id,
        local_version=local_version,
        since_global_version=ctx.state["global_version"],
        delta=payload,
        global_page_version=ctx.state["global_page_version"],
        global_page_offset=ctx.state["global_page_offset"],
    )
    sent_model = ctx.state["model_version"] if model_update is not None else None
    sent_items = len(model_update.content_ids) if model_update is not None else 0
    return request, Sent(local_version, sent_patterns, views, sent_model, sent_items)


def _model_update(ctx: BrainContext) -> patterns_pb2.ItemFactorUpdate | None:
    """The device's ItemFactorUpdate, when it has one to send.

    Once per model version (-1: never sent; 0, no model yet, counts as a version), and
    again at the same version each time the device's history has doubled since the last
    acknowledged contribution (the shard keeps the latest, so the next round sees the
    device's whole history at the cost of about twice the bytes of one contribution).
    """
    version = ctx.state["model_version"]
    prefs = ctx.preferences()
    if prefs is None or ctx.catalog is None:
        return None
    sent_items = ctx.state["model_update_items"]
    if ctx.state["model_update_version"] >= version and prefs.items.size < 2 * max(1, sent_items):
        return None
    return build_model_update(prefs, ctx.catalog, ctx.aligned_model(), version)


def apply_response(
    ctx: BrainContext, sent: Sent, response: sync_pb2.SyncPatternsResponse
) -> tuple[int, str | None]:
    """Apply an acknowledged reply in one transaction; returns (patterns stored, error)."""
    errors: list[str] = []
    rows: list[GlobalPatternRow] = []
    trending: list[tuple[str, float]] = []
    payload_round = 0
    payload_ok = True
    if response.HasField("global_patterns") and response.global_patterns.ByteSize() > 0:
        try:
            decoded = decode_payload(
                response.global_patterns,
                patterns_pb2.GlobalPatterns,
                max_raw_bytes=ctx.config.max_global_payload_bytes,
            )
            rows, trending = _global_rows(decoded)
            payload_round = int(decoded.global_version)
        except PayloadError as exc:
            payload_ok = False
            errors.append(f"global patterns refused: {exc}")
    ack = int(response.acknowledged_version)
    updates: dict[str, int] = {}
    with ctx.store.transaction():
        if sent.local_version == 0:
            # A pull (nothing to send yet): the answer names the device's last version
            # on the shard; later changes are numbered past it (see
            # `SyncClient._learn_server_version`).
            updates["server_version_known"] = 1
            if ctx.state["acked_version"] < ack <= MAX_ADOPTED_VERSION:
                ctx.store.clear_acked()
                updates["local_version"] = max(ctx.state["local_version"], ack)
                updates["acked_version"] = 0
        elif ack > sent.local_version:
            # The shard holds a later version than the one sent, so it did not apply this
            # delta (it answered as for a duplicate): this store is newer than the
            # device's server state (a factory reset, a restored backup). Nothing is
            # marked acknowledged; the next delta, numbered past the shard's version,
            # re-sends everything. The acknowledged version is never taken from the
            # server, and an implausible one (past `MAX_ADOPTED_VERSION`) is not
            # followed at all, so a bad answer cannot wedge the device.
            if ack > MAX_ADOPTED_VERSION:
                errors.append(f"server acknowledged an implausible version {ack}; ignored")
            else:
                errors.append(
                    f"server holds version {ack}, above the sent {sent.local_version};"
                    " the device's changes are re-sent past it"
                )
                ctx.store.clear_acked()
                updates["local_version"] = ack + 1
                updates["acked_version"] = 0
                updates["model_update_version"] = -1
                updates["model_update_items"] = 0
        elif ack == sent.local_version:
            ctx.store.mark_acked(sent.patterns, sent.local_version)
            ctx.store.subtract_views(sent.views)
            updates["acked_version"] = sent.local_version
            if sent.model_update_version is not None:
                updates["model_update_version"] = sent.model_update_version
                updates["model_update_items"] = sent.model_update_items
        else:
            errors.append(
                f"server acknowledged version {ack}, below the sent {sent.local_version};"
                " the delta will be sent again"
            )
            if ack < ctx.state["acked_version"]:
                ctx.store.clear_acked()
                updates["acked_version"] = 0
                updates["model_update_version"] = -1  # send it again with the rest
                updates["model_update_items"] = 0
        if payload_ok:
            if rows:
                page_version = ctx.state["global_page_version"]
                continuation = ctx.state["global_page_offset"] > 0 and page_version == int(
                    response.global_version
                )
                ctx.store.replace_global_patterns(
                    rows, continuation=continuation, keep=ctx.config.max_global_patterns
                )
            if trending:
                ctx.store.replace_trending(trending, keep=ctx.config.max_trending_items)
            if response.next_global_page_offset:
                # Part of the global patterns: the rest comes with the next syncs; the
                # version is adopted with the last part.
                updates["global_page_version"] = int(response.global_version)
                updates["global_page_offset"] = int(response.next_global_page_offset)
            else:
                updates["global_page_version"] = 0
                updates["global_page_offset"] = 0
                new_global = max(int(response.global_version), payload_round)
                if new_global > ctx.state["global_version"]:
                    updates["global_version"] = new_global
        if response.next_sync_after_ms:
            updates["next_sync_at_ms"] = ctx.now_ms() + int(response.next_sync_after_ms)
        counter = "syncs_failed" if errors else "syncs_ok"
        updates[counter] = ctx.state[counter] + 1
        ctx.store.set_state(updates)
    ctx.state.update(updates)
    if rows or trending:
        ctx.reload_global()
    return len(rows), "; ".join(errors) if errors else None


def _global_rows(
    message: patterns_pb2.GlobalPatterns,
) -> tuple[list[GlobalPatternRow], list[tuple[str, float]]]:
    """Valid global patterns and trending items of a reply; malformed entries are skipped."""
    rows: dict[str, GlobalPatternRow] = {}
    for p in message.patterns:
        if not p.pattern_key:
            continue
        try:
            vector = normalize(decode_embedding(p.embedding))
        except EmbeddingError:
            continue
        quality, rate = float(p.quality), float(p.success_rate)
        if not np.any(vector) or not math.isfinite(quality) or not math.isfinite(rate):
            continue
        try:
            bucket = bucket_from_context(p.context).index
        except ValueError:
            bucket = -1  # no usable context: the pattern applies to every bucket
        rows[p.pattern_key] = GlobalPatternRow(
            pattern_key=p.pattern_key,
            bucket=bucket,
            embedding=vector,
            quality=max(quality, 0.0),
            success_rate=min(max(rate, 0.0), 1.0),
            source_count=int(p.source_count),
            round=int(p.round) or int(message.global_version),
        )
    trending: dict[str, float] = {}
    for t in message.trending:
        score = float(t.score)
        if t.content_id and math.isfinite(score):
            trending[t.content_id] = max(score, trending.get(t.content_id, -math.inf))
    return list(rows.values()), sorted(trending.items(), key=lambda kv: (-kv[1], kv[0]))
