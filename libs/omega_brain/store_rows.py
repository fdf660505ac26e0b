"""What the store's modules share: the row types they return, the encodings of stored values,
and `guard`, which turns SQLite errors into `StoreError`."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from omega_brain.errors import StoreError
from omega_brain.patterns import PatternState
from omega_protocol import EMBEDDING_DIM

__all__ = [
    "F16",
    "F32",
    "SUCCESS",
    "GlobalPatternRow",
    "HistoryRow",
    "PatternRow",
    "StoredModel",
    "blob",
    "guard",
    "json_bytes",
    "json_list",
    "vector_from_blob",
]

F32 = np.dtype("<f4")
F16 = np.dtype("<f2")
SUCCESS = 1
"""``Outcome.SUCCESS`` as stored in ``events.outcome``."""


@contextmanager
def guard(what: str) -> Iterator[None]:
    """Raise `StoreError` naming ``what`` the store was doing when SQLite fails."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(f"store error while {what}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class PatternRow:
    """One row of ``patterns``: a bucket's learned state plus sync bookkeeping."""

    bucket: int
    pattern_id: str
    state: PatternState
    created_at_ms: int
    updated_at_ms: int
    changed_version: int
    embedding_version: int


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """One row of ``history``: every viewing of one content id in one context bucket.

    Attributes:
        content_id: the content.
        bucket: context bucket index in [0, 8) the viewings were filed under.
        views: number of viewings.
        successes: viewings classified as a success when observed.
        best_completion: the highest completion in [0, 1].
    """

    content_id: str
    bucket: int
    views: int
    successes: int
    best_completion: float


@dataclass(frozen=True, slots=True)
class GlobalPatternRow:
    """One row of ``global_patterns``; ``embedding`` is (384,) float32, unit length."""

    pattern_key: str
    bucket: int
    embedding: npt.NDArray[np.float32]
    quality: float
    success_rate: float
    source_count: int
    round: int


@dataclass(frozen=True, slots=True)
class StoredModel:
    """The persisted item-factor model.

    Attributes:
        version: model version (0: no model).
        factors: factors per item (0 without rows).
        content_ids: (m,) ids of the items the model knows, in content id order.
        rows: (m, factors) float32 item factors, row i for ``content_ids[i]``.
    """

    version: int
    factors: int
    content_ids: tuple[str, ...]
    rows: npt.NDArray[np.float32]


def json_bytes(value: object) -> bytes:
    """Compact JSON of ``value`` (the plaintext of a sealed row)."""
    return json.dumps(value, separators=(",", ":")).encode()


def json_list(plain: bytes, length: int, what: str) -> list[Any]:
    """The JSON list of ``length`` items in ``plain``.

    Raises:
        StoreError: ``plain`` is not such a list.
    """
    try:
        value = json.loads(plain)
    except ValueError:
        value = None
    if not isinstance(value, list) or len(value) != length:
        raise StoreError(f"{what} decrypts to a malformed value; the store is corrupt")
    return value


def blob(vector: npt.NDArray[np.float32], dtype: np.dtype[np.floating]) -> bytes:
    """The little-endian bytes of ``vector`` as ``dtype``."""
    return np.asarray(vector, dtype=dtype).tobytes()


def vector_from_blob(data: object, dtype: np.dtype[np.floating]) -> npt.NDArray[np.float32]:
    """A stored (384,) embedding of ``dtype`` as float32.

    Raises:
        StoreError: the blob has the wrong size or non-finite values.
    """
    if not isinstance(data, bytes) or len(data) != EMBEDDING_DIM * dtype.itemsize:
        raise StoreError("stored embedding has the wrong size; the store is corrupt")
    vector = np.frombuffer(data, dtype=dtype).astype(np.float32)
    if not np.all(np.isfinite(vector)):
        raise StoreError("stored embedding has NaN or infinite values; the store is corrupt")
    return vector
