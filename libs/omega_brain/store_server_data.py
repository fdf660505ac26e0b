"""What the servers sent, stored plain: global patterns, the trending list and the
item-factor model.

``model(id = 1, content_ids TEXT, codes BLOB, scales BLOB)`` holds the item-factor model of
federated collaborative filtering in one row: the ids it knows in order, newline-separated
(content ids the catalog lacks are kept: a later catalog may have them), their
``model_factors`` int8 codes each and one little-endian float32 scale each (a factor is
``codes * scale``, the wire's symmetric int8 quantization). One row, not one per item: every
federated round changes every factor, and writing 1,682 rows per download cost 120 ms per
device where one blob costs about 1 ms.

The functions take the store's connection; `omega_brain.store.Store` calls them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from omega_brain.errors import StoreError
from omega_brain.store_rows import F32, GlobalPatternRow, StoredModel, blob, guard, vector_from_blob
from omega_brain.store_schema import read_state
from omega_protocol import quantize_int8

__all__ = [
    "apply_model_rows",
    "read_global_patterns",
    "read_model",
    "read_trending",
    "replace_global_patterns",
    "replace_trending",
]


def read_global_patterns(conn: sqlite3.Connection) -> list[GlobalPatternRow]:
    """Every stored global pattern."""
    with guard("reading global patterns"):
        rows = conn.execute(
            "SELECT pattern_key, bucket, embedding, quality, success_rate, source_count, round"
            " FROM global_patterns ORDER BY pattern_key"
        ).fetchall()
    return [
        GlobalPatternRow(str(k), int(b), vector_from_blob(e, F32), q, sr, int(n), int(r))
        for k, b, e, q, sr, n, r in rows
    ]


def read_trending(conn: sqlite3.Connection) -> list[tuple[str, float]]:
    """The stored trending list, highest score first."""
    with guard("reading trending content"):
        rows = conn.execute(
            "SELECT content_id, score FROM trending ORDER BY score DESC, content_id"
        ).fetchall()
    return [(str(c), float(s)) for c, s in rows]


def read_model(conn: sqlite3.Connection) -> StoredModel:
    """The persisted item-factor model (no rows before the first fetch).

    Raises:
        StoreError: the stored blobs do not match ``model_factors`` or are not finite.
    """
    state = read_state(conn)
    factors = state["model_factors"]
    with guard("reading the model"):
        row = conn.execute("SELECT content_ids, codes, scales FROM model WHERE id = 1").fetchone()
    if row is None or not row[0]:
        return StoredModel(state["model_version"], factors, (), np.zeros((0, factors), np.float32))
    ids = tuple(str(row[0]).split("\n"))
    codes, scales = row[1], row[2]
    if (
        not isinstance(codes, bytes)
        or not isinstance(scales, bytes)
        or len(codes) != len(ids) * factors
        or len(scales) != len(ids) * 4
    ):
        raise StoreError("stored model has the wrong size; the store is corrupt")
    matrix = (
        np.frombuffer(codes, dtype=np.int8).reshape(len(ids), factors).astype(np.float32)
        * np.frombuffer(scales, dtype=F32)[:, None]
    )
    if not np.all(np.isfinite(matrix)):
        raise StoreError("stored model has NaN or infinite values; the store is corrupt")
    return StoredModel(state["model_version"], factors, ids, matrix)


def replace_global_patterns(
    conn: sqlite3.Connection,
    rows: Sequence[GlobalPatternRow],
    *,
    continuation: bool = False,
    keep: int | None = None,
) -> None:
    """Store global patterns: rows of a round already stored are replaced by the new copy of
    that round, and a key present in ``rows`` replaces the stored pattern of that key.

    ``continuation``: ``rows`` continue a transfer whose first part was stored already
    (a sync answer's later part): they are added, the rounds are not cleared.
    ``keep``: at most this many patterns stay stored, those of the newest rounds (then the
    highest quality, then the smallest key) first (`BrainConfig.max_global_patterns`).
    """
    rounds = [] if continuation else sorted({r.round for r in rows})
    with guard("writing global patterns"):
        conn.executemany("DELETE FROM global_patterns WHERE round = ?", [(r,) for r in rounds])
        conn.executemany(
            "INSERT OR REPLACE INTO global_patterns (pattern_key, bucket, embedding, quality,"
            " success_rate, source_count, round) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (r.pattern_key, r.bucket, blob(r.embedding, F32), r.quality,
                 r.success_rate, r.source_count, r.round)
                for r in rows
            ],
        )  # fmt: skip
        if keep is not None:
            conn.execute(
                "DELETE FROM global_patterns WHERE pattern_key NOT IN (SELECT pattern_key"
                " FROM global_patterns ORDER BY round DESC, quality DESC, pattern_key"
                " LIMIT ?)",
                (int(keep),),
            )


def replace_trending(
    conn: sqlite3.Connection, items: Sequence[tuple[str, float]], *, keep: int | None = None
) -> None:
    """Replace the trending list with ``(content_id, score)`` pairs; with ``keep``, only
    the ``keep`` highest scores (ties: the smallest ids) are stored."""
    if keep is not None and len(items) > keep:
        items = sorted(items, key=lambda item: (-item[1], item[0]))[:keep]
    with guard("writing trending content"):
        conn.execute("DELETE FROM trending")
        conn.executemany("INSERT OR REPLACE INTO trending (content_id, score) VALUES (?, ?)", items)


def apply_model_rows(
    conn: sqlite3.Connection,
    rows: Iterable[tuple[str, npt.NDArray[np.float32] | None, int]],
    *,
    replace: bool,
    factors: int,
) -> None:
    """Upsert item-factor rows; a row without a factor removes the item from the model.

    Args:
        conn: the store's connection.
        rows: ``(content_id, factor or None, model_version)``; factors are (factors,)
            float32, stored as int8 codes and a scale. Content ids must not contain a
            newline (the shard refuses such ids).
        replace: drop the stored model first (a full model, fetched since version 0).
        factors: factors per row of the model after this update.

    Raises:
        StoreError: a content id contains a newline, or a factor has the wrong size.
    """
    merged: dict[str, tuple[bytes, bytes]] = {}
    if not replace:
        read_model(conn)  # validates what is stored
        with guard("reading the model"):
            row = conn.execute(
                "SELECT content_ids, codes, scales FROM model WHERE id = 1"
            ).fetchone()
        if row is not None and row[0]:
            width = read_state(conn)["model_factors"]
            for i, cid in enumerate(str(row[0]).split("\n")):
                merged[cid] = (row[1][i * width : (i + 1) * width], row[2][4 * i : 4 * i + 4])
    kept: list[tuple[str, npt.NDArray[np.float32]]] = []
    for cid, factor, _version in rows:
        if "\n" in cid:
            raise StoreError(f"content id {cid[:40]!r} contains a newline")
        if factor is None:
            merged.pop(cid, None)
        else:
            if np.shape(factor) != (factors,):
                raise StoreError(f"factor of {cid[:40]!r} has shape {np.shape(factor)}")
            kept.append((cid, np.asarray(factor, dtype=np.float32)))
    if kept:
        # One quantization for the whole batch (per-row numpy calls dominated a download).
        codes, scales = quantize_int8(np.stack([f for _, f in kept]))
        for i, (cid, _) in enumerate(kept):
            merged[cid] = (codes[i].tobytes(), scales[i : i + 1].astype(F32).tobytes())
    ids = sorted(merged)
    with guard("writing the model"):
        conn.execute(
            "INSERT OR REPLACE INTO model (id, content_ids, codes, scales) VALUES (1, ?, ?, ?)",
            (
                "\n".join(ids),
                b"".join(merged[c][0] for c in ids),
                b"".join(merged[c][1] for c in ids),
            ),
        )
