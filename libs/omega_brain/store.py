"""The brain's local persistence: one SQLite file (WAL journal, ``synchronous=NORMAL``).

WAL with ``synchronous=NORMAL`` makes every committed transaction atomic and durable across a
crash of the process, and across a power cut up to the last checkpointed transactions (SQLite
never leaves a half-written transaction behind). All writes of one `Brain.observe` or one
`Brain.sync` happen in a single transaction, so reopening the file after a power cut restores a
consistent brain.

Schema (``PRAGMA user_version`` = `SCHEMA_VERSION`):

* ``meta(key TEXT PK, value TEXT)``: ``device_id`` the store belongs to; ``unconfirmed_send``, a
  sync request whose outcome is unknown (a lost reply), settled before the next delta.
* ``sync_state(key TEXT PK, value INTEGER)``: ``local_version``, ``acked_version``,
  ``global_version``, ``catalog_version``, ``syncs_ok``, ``syncs_failed``; and for the
  collaborative model ``model_version`` (0: no model), ``model_factors`` (factors per row, 0
  without a model), ``model_update_version`` (model version of the last acknowledged
  ``ItemFactorUpdate``; -1 before the first), ``model_update_items`` (items it covered) and
  ``model_bytes_down`` (bytes of every
  FetchModel reply received).
* ``events(id INTEGER PK, content_id, started_at_ms, completion, watch_seconds, bucket,
  outcome, local_version)``: raw viewing history; never leaves the device.
* ``patterns(bucket INTEGER PK, pattern_id UNIQUE, embedding BLOB NULL, successes, failures,
  neutral, sample_count, created_at_ms, updated_at_ms, changed_version, embedding_version)``:
  one row per context bucket; ``embedding`` is 384 little-endian float32 (NULL before the
  bucket's first success); ``changed_version`` / ``embedding_version`` are the local versions
  of the last change of the row / of its embedding.
* ``acked_patterns(pattern_id TEXT PK, sample_count, acked_version)``: patterns the server has
  acknowledged, with the sample count it knows.
* ``pending_views(content_id TEXT PK, views)``: per-content view counts not yet synced.
* ``catalog(position INTEGER PK, content_id UNIQUE, title, genres, embedding BLOB)``: the
  brain's own catalog (absent when it uses a shared `CatalogIndex`); ``genres`` is a JSON list,
  ``embedding`` 384 little-endian float16 (half the flash of float32; cosine error < 1e-3, below
  the 8-bit quantization of the HNSW index).
* ``global_patterns(pattern_key TEXT PK, bucket, embedding BLOB, quality, success_rate,
  source_count, round)``: federated patterns; ``bucket`` -1 means "no context: every bucket";
  ``embedding`` is float32 like ``patterns``.
* ``trending(content_id TEXT PK, score REAL)``: the last trending list received.
* ``model(id = 1, content_ids TEXT, codes BLOB, scales BLOB)``: the item-factor model of
  federated collaborative filtering in one row: the ids it knows in order, newline-separated
  (content ids the catalog lacks are kept: a later catalog may have them), their
  ``model_factors`` int8 codes each and one little-endian float32 scale each (a factor is
  ``codes * scale``, the wire's symmetric int8 quantization). One row, not one per item: every
  federated round changes every factor, and writing 1,682 rows per download cost 120 ms per
  device where one blob costs about 1 ms.

Migrations: every statement of the schema is ``CREATE TABLE IF NOT EXISTS`` and state keys are
``INSERT OR IGNORE``d with their defaults, so opening a store of an older schema adds what it
lacks and sets ``user_version``. Version 2 added ``model`` and the ``model_*`` state keys.

The events table grows by one small row per viewing (about 60 bytes: 10 viewings a day for ten
years is about 2 MB), so it is not pruned.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from omega_brain.errors import StoreError
from omega_brain.patterns import PatternState
from omega_protocol import EMBEDDING_DIM, quantize_int8

__all__ = [
    "SCHEMA_VERSION",
    "STATE_KEYS",
    "GlobalPatternRow",
    "PatternRow",
    "Store",
    "StoredCatalog",
    "StoredModel",
]

SCHEMA_VERSION = 2

STATE_KEYS = (
    "local_version",
    "acked_version",
    "global_version",
    "catalog_version",
    "syncs_ok",
    "syncs_failed",
    "model_version",
    "model_factors",
    "model_update_version",
    "model_update_items",
    "model_bytes_down",
    "server_version_known",
    "next_sync_at_ms",
    "global_page_version",
    "global_page_offset",
)

_STATE_DEFAULTS = {"model_update_version": -1}
"""Initial value of state keys that do not start at 0."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sync_state (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    content_id TEXT NOT NULL,
    started_at_ms INTEGER NOT NULL,
    completion REAL NOT NULL,
    watch_seconds REAL NOT NULL,
    bucket INTEGER NOT NULL,
    outcome INTEGER NOT NULL,
    local_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS patterns (
    bucket INTEGER PRIMARY KEY,
    pattern_id TEXT NOT NULL UNIQUE,
    embedding BLOB,
    successes INTEGER NOT NULL,
    failures INTEGER NOT NULL,
    neutral INTEGER NOT NULL,
    sample_count INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    changed_version INTEGER NOT NULL,
    embedding_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS acked_patterns (
    pattern_id TEXT PRIMARY KEY,
    sample_count INTEGER NOT NULL,
    acked_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pending_views (
    content_id TEXT PRIMARY KEY,
    views INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS catalog (
    position INTEGER PRIMARY KEY,
    content_id TEXT NOT NULL UNIQUE,
    title TEXT NOT NULL,
    genres TEXT NOT NULL,
    embedding BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS global_patterns (
    pattern_key TEXT PRIMARY KEY,
    bucket INTEGER NOT NULL,
    embedding BLOB NOT NULL,
    quality REAL NOT NULL,
    success_rate REAL NOT NULL,
    source_count INTEGER NOT NULL,
    round INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS trending (content_id TEXT PRIMARY KEY, score REAL NOT NULL);
CREATE TABLE IF NOT EXISTS model (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    content_ids TEXT NOT NULL,
    codes BLOB NOT NULL,
    scales BLOB NOT NULL
);
"""

_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")


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
class StoredCatalog:
    """The persisted catalog: ids, (n, 384) float32 embeddings, titles and genre lists."""

    content_ids: list[str]
    embeddings: npt.NDArray[np.float32]
    titles: list[str]
    genres: list[list[str]]


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


class Store:
    """A connection to one brain's SQLite file (not thread-safe: the `Brain` serializes calls).

    Args:
        path: file path, or ``":memory:"``.
        device_id: the device the store belongs to; recorded on first open and checked after.

    Raises:
        StoreError: the file cannot be opened or is not a brain store, was written by a newer
            schema, or belongs to another device.
    """

    def __init__(self, path: str | Path, device_id: str) -> None:
        self._path = str(path)
        try:
            self._conn = sqlite3.connect(
                self._path, timeout=5.0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {self._path!r}: {exc}") from exc
        try:
            self._init_schema(device_id)
        except BaseException:
            self._conn.close()
            raise

    def _init_schema(self, device_id: str) -> None:
        with self._guard("initializing the store"):
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"store schema {version} is newer than this brain's ({SCHEMA_VERSION})"
                )
            with self.transaction():
                # executescript() would commit the open transaction: run statements one by one.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                row = self._conn.execute("SELECT value FROM meta WHERE key='device_id'").fetchone()
                if row is None:
                    self._conn.execute(
                        "INSERT INTO meta (key, value) VALUES ('device_id', ?)", (device_id,)
                    )
                elif row[0] != device_id:
                    raise StoreError(
                        f"store {self._path!r} belongs to device {row[0]!r}, not {device_id!r}"
                    )
                self._conn.executemany(
                    "INSERT OR IGNORE INTO sync_state (key, value) VALUES (?, ?)",
                    [(k, _STATE_DEFAULTS.get(k, 0)) for k in STATE_KEYS],
                )

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"store error while {what}: {exc}") from exc

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the block in one ``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on any error).

        Raises:
            StoreError: when SQLite fails (the transaction is rolled back).
        """
        if self._conn.in_transaction:  # nested: the outer block commits
            yield
            return
        with self._guard("starting a transaction"):
            self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            with self._guard("committing"):
                self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:  # also after a failed COMMIT (e.g. disk full)
                with suppress(sqlite3.Error):
                    self._conn.rollback()
            raise

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with suppress(sqlite3.Error):
            self._conn.close()

    # ----------------------------------------------------------------------------- reads

    def state(self) -> dict[str, int]:
        """All ``sync_state`` values, keyed as `STATE_KEYS`."""
        with self._guard("reading sync state"):
            rows = self._conn.execute("SELECT key, value FROM sync_state").fetchall()
        values = {k: _STATE_DEFAULTS.get(k, 0) for k in STATE_KEYS}
        values.update({str(k): int(v) for k, v in rows})
        return values

    def patterns(self) -> dict[int, PatternRow]:
        """Every bucket's pattern row, keyed by bucket index."""
        with self._guard("reading patterns"):
            rows = self._conn.execute(
                "SELECT bucket, pattern_id, embedding, successes, failures, neutral,"
                " created_at_ms, updated_at_ms, changed_version, embedding_version FROM patterns"
            ).fetchall()
        out: dict[int, PatternRow] = {}
        for b, pid, blob, s, f, n, created, updated, changed, emb_v in rows:
            embedding = None if blob is None else _vector_from_blob(blob, _F32)
            state = PatternState(embedding=embedding, successes=s, failures=f, neutral=n)
            out[int(b)] = PatternRow(int(b), str(pid), state, created, updated, changed, emb_v)
        return out

    def acked(self) -> dict[str, int]:
        """Acknowledged pattern ids mapped to the sample count the server knows."""
        with self._guard("reading acknowledged patterns"):
            rows = self._conn.execute("SELECT pattern_id, sample_count FROM acked_patterns")
            return {str(pid): int(n) for pid, n in rows.fetchall()}

    def pending_views(self) -> dict[str, int]:
        """View counts not yet synced, by content id."""
        with self._guard("reading pending views"):
            rows = self._conn.execute("SELECT content_id, views FROM pending_views WHERE views > 0")
            return {str(cid): int(v) for cid, v in rows.fetchall()}

    def watched(self) -> set[str]:
        """Every content id with at least one observed event."""
        with self._guard("reading events"):
            rows = self._conn.execute("SELECT DISTINCT content_id FROM events").fetchall()
        return {str(r[0]) for r in rows}

    def event_count(self) -> int:
        """Number of stored events."""
        with self._guard("counting events"):
            return int(self._conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def catalog(self) -> StoredCatalog | None:
        """The persisted catalog in index order, or None when none was stored."""
        with self._guard("reading the catalog"):
            rows = self._conn.execute(
                "SELECT content_id, title, genres, embedding FROM catalog ORDER BY position"
            ).fetchall()
        if not rows:
            return None
        embeddings = np.empty((len(rows), EMBEDDING_DIM), dtype=np.float32)
        ids: list[str] = []
        titles: list[str] = []
        genres: list[list[str]] = []
        for i, (cid, title, genre_json, blob) in enumerate(rows):
            ids.append(str(cid))
            titles.append(str(title))
            genres.append(_genres_from_json(genre_json))
            embeddings[i] = _vector_from_blob(blob, _F16)
        return StoredCatalog(ids, embeddings, titles, genres)

    def global_patterns(self) -> list[GlobalPatternRow]:
        """Every stored global pattern."""
        with self._guard("reading global patterns"):
            rows = self._conn.execute(
                "SELECT pattern_key, bucket, embedding, quality, success_rate, source_count, round"
                " FROM global_patterns ORDER BY pattern_key"
            ).fetchall()
        return [
            GlobalPatternRow(str(k), int(b), _vector_from_blob(e, _F32), q, sr, int(n), int(r))
            for k, b, e, q, sr, n, r in rows
        ]

    def trending(self) -> list[tuple[str, float]]:
        """The stored trending list, highest score first."""
        with self._guard("reading trending content"):
            rows = self._conn.execute(
                "SELECT content_id, score FROM trending ORDER BY score DESC, content_id"
            ).fetchall()
        return [(str(c), float(s)) for c, s in rows]

    def viewings(self) -> list[tuple[str, float, int]]:
        """``(content_id, completion, bucket)`` of every stored event, oldest first.

        ``bucket`` is the context bucket index the event was filed under when observed (the
        bucket of its pattern, from the UTC offset in force then), in [0, 8).
        """
        with self._guard("reading events"):
            rows = self._conn.execute(
                "SELECT content_id, completion, bucket FROM events ORDER BY id"
            ).fetchall()
        return [(str(c), float(x), int(b)) for c, x, b in rows]

    def model(self) -> StoredModel:
        """The persisted item-factor model (no rows before the first fetch).

        Raises:
            StoreError: the stored blobs do not match ``model_factors`` or are not finite.
        """
        state = self.state()
        factors = state["model_factors"]
        with self._guard("reading the model"):
            row = self._conn.execute(
                "SELECT content_ids, codes, scales FROM model WHERE id = 1"
            ).fetchone()
        if row is None or not row[0]:
            return StoredModel(
                state["model_version"], factors, (), np.zeros((0, factors), np.float32)
            )
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
            * np.frombuffer(scales, dtype=_F32)[:, None]
        )
        if not np.all(np.isfinite(matrix)):
            raise StoreError("stored model has NaN or infinite values; the store is corrupt")
        return StoredModel(state["model_version"], factors, ids, matrix)

    def size_bytes(self) -> int:
        """Bytes used by the database plus its WAL file (pages in use for ``:memory:``)."""
        with self._guard("measuring the store"):
            pages = int(self._conn.execute("PRAGMA page_count").fetchone()[0])
            page_size = int(self._conn.execute("PRAGMA page_size").fetchone()[0])
        total = pages * page_size
        if self._path != ":memory:" and not self._path.startswith("file:"):
            with suppress(OSError):
                total += os.path.getsize(self._path + "-wal")
        return total

    # ---------------------------------------------------------------------------- writes

    def set_state(self, values: Mapping[str, int]) -> None:
        """Set ``sync_state`` keys (each must be one of `STATE_KEYS`)."""
        unknown = set(values) - set(STATE_KEYS)
        if unknown:
            raise StoreError(f"unknown sync state keys {sorted(unknown)}")
        with self._guard("writing sync state"):
            # An upsert: stores created before a key existed gain it on first write.
            self._conn.executemany(
                "INSERT INTO sync_state (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [(k, int(v)) for k, v in values.items()],
            )

    def insert_event(
        self,
        content_id: str,
        started_at_ms: int,
        completion: float,
        watch_seconds: float,
        bucket: int,
        outcome: int,
        local_version: int,
    ) -> None:
        """Append one viewing event."""
        with self._guard("writing an event"):
            self._conn.execute(
                "INSERT INTO events (content_id, started_at_ms, completion, watch_seconds,"
                " bucket, outcome, local_version) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (content_id, started_at_ms, completion, watch_seconds, bucket, outcome,
                 local_version),
            )  # fmt: skip

    def upsert_pattern(self, row: PatternRow) -> None:
        """Insert or replace the pattern of ``row.bucket``."""
        st = row.state
        blob = None if st.embedding is None else _blob(st.embedding, _F32)
        with self._guard("writing a pattern"):
            self._conn.execute(
                "INSERT OR REPLACE INTO patterns (bucket, pattern_id, embedding, successes,"
                " failures, neutral, sample_count, created_at_ms, updated_at_ms,"
                " changed_version, embedding_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (row.bucket, row.pattern_id, blob, st.successes, st.failures, st.neutral,
                 st.sample_count, row.created_at_ms, row.updated_at_ms, row.changed_version,
                 row.embedding_version),
            )  # fmt: skip

    def add_view(self, content_id: str, views: int = 1) -> None:
        """Count ``views`` more pending views of ``content_id``."""
        with self._guard("counting a view"):
            self._conn.execute(
                "INSERT INTO pending_views (content_id, views) VALUES (?, ?)"
                " ON CONFLICT(content_id) DO UPDATE SET views = views + excluded.views",
                (content_id, views),
            )

    def subtract_views(self, sent: Mapping[str, int]) -> None:
        """Remove views that were synced; views counted since stay pending."""
        with self._guard("clearing synced views"):
            self._conn.executemany(
                "UPDATE pending_views SET views = views - ? WHERE content_id = ?",
                [(int(v), cid) for cid, v in sent.items()],
            )
            self._conn.execute("DELETE FROM pending_views WHERE views <= 0")

    def mark_acked(self, items: Iterable[tuple[str, int]], version: int) -> None:
        """Record ``(pattern_id, sample_count)`` pairs as acknowledged at ``version``."""
        with self._guard("recording acknowledged patterns"):
            self._conn.executemany(
                "INSERT OR REPLACE INTO acked_patterns (pattern_id, sample_count, acked_version)"
                " VALUES (?, ?, ?)",
                [(pid, int(n), int(version)) for pid, n in items],
            )

    def unconfirmed_send(self) -> str | None:
        """The sync request whose outcome is unknown (JSON, see `Brain.sync`), if any."""
        with self._guard("reading the unconfirmed send"):
            row = self._conn.execute(
                "SELECT value FROM meta WHERE key = 'unconfirmed_send'"
            ).fetchone()
        return None if row is None else str(row[0])

    def set_unconfirmed_send(self, value: str | None) -> None:
        """Record (or, with None, clear) the sync request whose outcome is unknown."""
        with self._guard("writing the unconfirmed send"):
            if value is None:
                self._conn.execute("DELETE FROM meta WHERE key = 'unconfirmed_send'")
            else:
                self._conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('unconfirmed_send', ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (value,),
                )

    def forget_personal_data(self) -> None:
        """Delete what the device learned of its viewer: events, patterns, acknowledgements,
        pending view counts and the sync state (versions, counters). What came from the
        servers (catalog, global patterns, trending, the model) is kept. Call inside
        `transaction`; the freed pages are reclaimed by SQLite's next vacuum."""
        with self._guard("forgetting personal data"):
            for table in ("events", "patterns", "acked_patterns", "pending_views"):
                self._conn.execute(f"DELETE FROM {table}")
            self._conn.execute("DELETE FROM meta WHERE key = 'unconfirmed_send'")
            keep = ("global_version", "catalog_version", "model_version", "model_factors")
            self._conn.executemany(
                "UPDATE sync_state SET value = ? WHERE key = ?",
                [(_STATE_DEFAULTS.get(k, 0), k) for k in STATE_KEYS if k not in keep],
            )

    def clear_acked(self) -> None:
        """Forget every acknowledgement (the server lost this device's state)."""
        with self._guard("clearing acknowledged patterns"):
            self._conn.execute("DELETE FROM acked_patterns")

    def replace_catalog(
        self,
        content_ids: Sequence[str],
        embeddings: npt.NDArray[np.float32],
        titles: Sequence[str],
        genres: Sequence[Sequence[str]],
    ) -> None:
        """Replace the stored catalog; ``embeddings`` is (n, 384) float32."""
        rows = (
            (i, cid, title, json.dumps(list(g)), _blob(e, _F16))
            for i, (cid, title, g, e) in enumerate(
                zip(content_ids, titles, genres, embeddings, strict=True)
            )
        )
        with self._guard("writing the catalog"):
            self._conn.execute("DELETE FROM catalog")
            self._conn.executemany(
                "INSERT INTO catalog (position, content_id, title, genres, embedding)"
                " VALUES (?, ?, ?, ?, ?)",
                rows,
            )

    def replace_global_patterns(
        self, rows: Sequence[GlobalPatternRow], *, continuation: bool = False
    ) -> None:
        """Store global patterns: rows of a round already stored are replaced by the new copy of
        that round, and a key present in ``rows`` replaces the stored pattern of that key.

        ``continuation``: ``rows`` continue a transfer whose first part was stored already
        (a sync answer's later part): they are added, the rounds are not cleared.
        """
        rounds = [] if continuation else sorted({r.round for r in rows})
        with self._guard("writing global patterns"):
            self._conn.executemany(
                "DELETE FROM global_patterns WHERE round = ?", [(r,) for r in rounds]
            )
            self._conn.executemany(
                "INSERT OR REPLACE INTO global_patterns (pattern_key, bucket, embedding, quality,"
                " success_rate, source_count, round) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (r.pattern_key, r.bucket, _blob(r.embedding, _F32), r.quality,
                     r.success_rate, r.source_count, r.round)
                    for r in rows
                ],
            )  # fmt: skip

    def replace_trending(self, items: Sequence[tuple[str, float]]) -> None:
        """Replace the trending list with ``(content_id, score)`` pairs."""
        with self._guard("writing trending content"):
            self._conn.execute("DELETE FROM trending")
            self._conn.executemany(
                "INSERT OR REPLACE INTO trending (content_id, score) VALUES (?, ?)", items
            )

    def apply_model_rows(
        self,
        rows: Iterable[tuple[str, npt.NDArray[np.float32] | None, int]],
        *,
        replace: bool,
        factors: int,
    ) -> None:
        """Upsert item-factor rows; a row without a factor removes the item from the model.

        Args:
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
            self.model()  # validates what is stored
            with self._guard("reading the model"):
                row = self._conn.execute(
                    "SELECT content_ids, codes, scales FROM model WHERE id = 1"
                ).fetchone()
            if row is not None and row[0]:
                width = self.state()["model_factors"]
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
                merged[cid] = (codes[i].tobytes(), scales[i : i + 1].astype(_F32).tobytes())
        ids = sorted(merged)
        with self._guard("writing the model"):
            self._conn.execute(
                "INSERT OR REPLACE INTO model (id, content_ids, codes, scales) VALUES (1, ?, ?, ?)",
                (
                    "\n".join(ids),
                    b"".join(merged[c][0] for c in ids),
                    b"".join(merged[c][1] for c in ids),
                ),
            )


def _blob(vector: npt.NDArray[np.float32], dtype: np.dtype[np.floating]) -> bytes:
    return np.asarray(vector, dtype=dtype).tobytes()


def _vector_from_blob(blob: object, dtype: np.dtype[np.floating]) -> npt.NDArray[np.float32]:
    if not isinstance(blob, bytes) or len(blob) != EMBEDDING_DIM * dtype.itemsize:
        raise StoreError("stored embedding has the wrong size; the store is corrupt")
    vector = np.frombuffer(blob, dtype=dtype).astype(np.float32)
    if not np.all(np.isfinite(vector)):
        raise StoreError("stored embedding has NaN or infinite values; the store is corrupt")
    return vector


def _genres_from_json(text: object) -> list[str]:
    try:
        value = json.loads(str(text))
    except ValueError:
        return []
    return [str(g) for g in value] if isinstance(value, list) else []
