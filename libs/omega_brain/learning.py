"""Learning on the device: a viewing event becomes a stored event and a pattern update.

`Learner.observe` validates a `ViewingEvent`, moves the pattern of the event's context bucket
(`omega_brain.patterns`), bumps the local version and records the event, its history row and
its view in one store transaction (which also compacts the events past
`BrainConfig.max_events_kept`), then updates the in-memory history of the `BrainContext`.
`Learner.forget` erases that personal history (the device side of `Brain.forget`).
"""

from __future__ import annotations

import math
import uuid

import numpy as np

from omega_brain.context import BrainContext
from omega_brain.errors import InvalidEventError, UnknownContentError
from omega_brain.models import ViewingEvent
from omega_brain.patterns import Outcome, PatternState, apply_event, classify
from omega_brain.store import PatternRow
from omega_protocol import bucket_from_timestamp

__all__ = ["Learner", "validate_event"]


class Learner:
    """Turns viewings into patterns (see `Brain.observe`); callers hold ``ctx.lock``."""

    def __init__(self, ctx: BrainContext) -> None:
        self._ctx = ctx

    def observe(
        self, content_id: str, started_at_ms: int, completion: float, watch_seconds: float
    ) -> None:
        """Learn from one validated viewing (see `validate_event`) in one store transaction.

        Raises:
            UnknownContentError: the content is not in the catalog (or there is no catalog).
            StoreError: the store could not be written (nothing is changed).
        """
        ctx = self._ctx
        cfg = ctx.config
        if ctx.catalog is None:
            raise UnknownContentError(f"no catalog loaded; cannot observe {content_id!r}")
        content = ctx.catalog.embedding_of(content_id)
        bucket = bucket_from_timestamp(started_at_ms, cfg.utc_offset_minutes).index
        outcome = classify(completion, cfg.success_completion, cfg.failure_completion)
        version = ctx.state["local_version"] + 1
        now_ms = ctx.now_ms()
        old = ctx.patterns.get(bucket)
        old_state = old.state if old is not None else PatternState()
        state = apply_event(
            old_state,
            content,
            outcome,
            min_step=cfg.min_step,
            failure_step=cfg.failure_step,
        )
        moved = outcome is Outcome.SUCCESS or (
            outcome is Outcome.FAILURE and old_state.embedding is not None
        )
        row = PatternRow(
            bucket=bucket,
            pattern_id=old.pattern_id if old is not None else uuid.uuid4().hex,
            state=state,
            created_at_ms=old.created_at_ms if old is not None else now_ms,
            updated_at_ms=now_ms,
            changed_version=version,
            embedding_version=version if moved else (old.embedding_version if old else 0),
        )
        store = ctx.store
        with store.transaction():
            seen = store.insert_event(
                content_id,
                started_at_ms,
                completion,
                watch_seconds,
                bucket,
                int(outcome),
                version,
                keep=ctx.events_kept,
            )
            store.upsert_pattern(row)
            store.add_view(content_id)
            store.set_state({"local_version": version})
        ctx.patterns[bucket] = row
        ctx.state["local_version"] = version
        ctx.watched.add(content_id)
        ctx.history.setdefault(bucket, {})[content_id] = seen
        ctx.prefs_cache = None
        ctx.context_prefs_cache.pop(bucket, None)

    def forget(self) -> None:
        """Erase events, patterns, pending views and sync state, in the store (one
        transaction) and in memory; what came from the servers stays.

        Raises:
            StoreError: the store could not be written.
        """
        ctx = self._ctx
        with ctx.store.transaction():
            ctx.store.forget_personal_data()
        ctx.state = ctx.store.state()
        ctx.patterns = {}
        ctx.watched = set()
        ctx.history = {}
        ctx.prefs_cache = None
        ctx.context_prefs_cache = {}


def validate_event(event: object) -> tuple[str, int, float, float]:
    """Check a `ViewingEvent`.

    Returns:
        (content_id, started_at_ms, completion, watch_seconds).

    Raises:
        InvalidEventError: see `Brain.observe`.
    """
    if not isinstance(event, ViewingEvent):
        raise InvalidEventError(f"expected a ViewingEvent, got {type(event).__name__}")
    cid = event.content_id
    if not isinstance(cid, str) or not cid:
        raise InvalidEventError("content_id must be a non-empty string")
    ts = event.started_at_ms
    if isinstance(ts, bool) or not isinstance(ts, int | np.integer) or ts < 0:
        raise InvalidEventError(f"started_at_ms must be an int >= 0, got {ts!r}")
    if int(ts) > 2**53:
        raise InvalidEventError(f"started_at_ms {ts} is out of range")
    completion = _finite(event.completion, "completion")
    if not 0.0 <= completion <= 1.0:
        raise InvalidEventError(f"completion must be in [0, 1], got {completion}")
    watch = _finite(event.watch_seconds, "watch_seconds")
    if watch < 0:
        raise InvalidEventError(f"watch_seconds must be >= 0, got {watch}")
    return cid, int(ts), completion, watch


def _finite(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InvalidEventError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidEventError(f"{name} must be finite, got {value!r}")
    return number
