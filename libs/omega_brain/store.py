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
  outcome, local_version, sealed)``: raw viewing history; never leaves the device. Only the
  newest ``keep`` events are kept (`BrainConfig.max_events_kept`): the insert that passes
  the budget deletes the oldest in its transaction.
* ``history(content_id, bucket, views, successes, best_completion, sealed; PK (content_id,
  bucket))``: what learning and ranking need from every event ever observed, compaction or
  not: per content id and context bucket the number of viewings, of successful ones and the
  highest completion. Written in the same transaction as each event.
* ``patterns(bucket INTEGER PK, pattern_id UNIQUE, embedding BLOB NULL, successes, failures,
  neutral, sample_count, created_at_ms, updated_at_ms, changed_version, embedding_version)``:
  one row per context bucket; ``embedding`` is 384 little-endian float32 (NULL before the
  bucket's first success); ``changed_version`` / ``embedding_version`` are the local versions
  of the last change of the row / of its embedding.
* ``acked_patterns(pattern_id TEXT PK, sample_count, acked_version)``: patterns the server has
  acknowledged, with the sample count it knows.
* ``pending_views(content_id TEXT PK, views, sealed)``: per-content view counts not yet synced.
* ``catalog_chunks(chunk INTEGER PK, meta BLOB, codes BLOB, scales BLOB, sha BLOB)``: the
  brain's own catalog (absent when it uses a shared `CatalogIndex`) as numbered *slots*, slot
  ``s`` in chunk ``s // CATALOG_CHUNK_SLOTS``; slot ``s`` is row ``s`` of the persisted faiss
  index (`omega_brain.index_file`). ``meta`` is a zstd frame of the JSON ``[ids, titles,
  genres]`` of the chunk's slots (id ``""``: a dead slot, an item removed or replaced since the
  index was built; its codes stay so that a rebuild reproduces the same rows); ``codes`` a zstd
  frame of the slots' 384 int8 codes each and ``scales`` one little-endian float32 each (the
  wire's symmetric int8 quantization, `omega_protocol.quantize_int8`: 388 bytes an item, a
  quarter of float32; cosine to the original > 0.999); ``sha`` the SHA-256 of the three blobs.
  One row per 1,024 slots rather than one per item: a 100K catalog is then about 37 MB instead
  of 47 MB (SQLite's per-row and per-page overhead on 388-byte rows), and reads in 50 ms.
  ``meta['catalog_digest']`` (SHA-256 over the chunk hashes in order, written in the same
  transaction as the chunks) names the catalog a persisted index belongs to.
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

Encryption at rest (a store created with an ``encryption_key``; ``meta['encryption']`` =
``aes-256-gcm`` and ``meta['key_check']``, a sealed known value that tells a wrong key from a
damaged row): the personal values of ``events``, ``patterns`` (embedding, counts, times),
``history``, ``pending_views`` and the unconfirmed send are sealed with AES-256-GCM, a random
96-bit nonce per value (``nonce || ciphertext || tag`` in the row's ``sealed`` column, the
plain columns holding placeholders) and the table and row identity as associated data, so a
value moved to another row does not decrypt. Rows keyed by a content id are keyed by a token,
``~`` + HMAC-SHA256 of the id under a key derived from the host's (HKDF), so equal ids find
their row without the id on disk. Catalog, global patterns, trending and the model are public
and stay plain, as do versions and pattern ids (the server knows them).

Migrations: every statement of the schema is ``CREATE TABLE IF NOT EXISTS`` and state keys are
``INSERT OR IGNORE``d with their defaults, so opening a store of an older schema adds what it
lacks and sets ``user_version``. Version 2 added ``model`` and the ``model_*`` state keys;
version 3 replaced the per-item float16 ``catalog`` table with ``catalog_chunks`` (a version 2
catalog is converted when the store opens). A store without ``history`` gains it (filled
from its events) and the ``sealed`` columns when it opens; this additive change kept version
3 (a test pins it), so a brain older than it opens such a store without noticing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from omega_brain.errors import StoreError
from omega_brain.patterns import PatternState, normalize
from omega_protocol import EMBEDDING_DIM, quantize_int8

__all__ = [
    "CATALOG_CHUNK_SLOTS",
    "SCHEMA_VERSION",
    "STATE_KEYS",
    "CatalogCodes",
    "CatalogSlots",
    "GlobalPatternRow",
    "HistoryRow",
    "PatternRow",
    "Store",
    "StoredModel",
]

SCHEMA_VERSION = 4

CATALOG_CHUNK_SLOTS = 1024
"""Catalog slots per ``catalog_chunks`` row (about 400 KB of codes)."""

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
    local_version INTEGER NOT NULL,
    sealed BLOB
);
CREATE TABLE IF NOT EXISTS history (
    content_id TEXT NOT NULL,
    bucket INTEGER NOT NULL,
    views INTEGER NOT NULL,
    successes INTEGER NOT NULL,
    best_completion REAL NOT NULL,
    sealed BLOB,
    PRIMARY KEY (content_id, bucket)
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
    embedding_version INTEGER NOT NULL,
    sealed BLOB
);
CREATE TABLE IF NOT EXISTS acked_patterns (
    pattern_id TEXT PRIMARY KEY,
    sample_count INTEGER NOT NULL,
    acked_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pending_views (
    content_id TEXT PRIMARY KEY,
    views INTEGER NOT NULL,
    sealed BLOB
);
CREATE TABLE IF NOT EXISTS catalog_chunks (
    chunk INTEGER PRIMARY KEY,
    meta BLOB NOT NULL,
    codes BLOB NOT NULL,
    scales BLOB NOT NULL,
    sha BLOB NOT NULL
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
_BLOCK_ROWS = 4096
_SUCCESS = 1
"""``Outcome.SUCCESS`` as stored in ``events.outcome``."""
_CIPHER = "aes-256-gcm"
_KEY_CHECK = b"omega-brain key check v1"
_NONCE_BYTES = 12
_TAG_BYTES = 16
_PATTERN_STATS = struct.Struct("<qqqqq")
"""Sealed pattern: successes, failures, neutral, created_at_ms, updated_at_ms, then the
embedding's float32 bytes (none before the first success)."""


class _Sealer:
    """AES-256-GCM for the values of one encrypted store, and the HMAC row tokens.

    Args:
        key: the host's 32-byte key; two subkeys are derived from it with HKDF-SHA256 (one
            for AES-GCM, one for tokens), so the raw key is used for nothing else.
    """

    __slots__ = ("_aead", "_token_key")

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != 32:
            raise StoreError("the encryption key must be 32 bytes")
        self._aead = AESGCM(_derive(key, b"omega-brain store aes-256-gcm"))
        self._token_key = _derive(key, b"omega-brain store row tokens")

    def __repr__(self) -> str:
        return "_Sealer(<key hidden>)"

    def seal(self, plaintext: bytes, ad: bytes) -> bytes:
        """``nonce || ciphertext || tag`` of ``plaintext`` bound to ``ad``."""
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, ad)

    def open(self, blob: object, ad: bytes, *, what: str) -> bytes:
        """The plaintext of a sealed value.

        Raises:
            StoreError: the value is not a sealed blob, or does not authenticate (another
                key, tampered bytes, or moved from another row).
        """
        if not isinstance(blob, bytes) or len(blob) < _NONCE_BYTES + _TAG_BYTES:
            raise StoreError(f"{what} is not encrypted as expected; the store is corrupt")
        try:
            return self._aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], ad)
        except InvalidTag:
            raise StoreError(
                f"{what} does not decrypt: the store is damaged or was tampered with"
            ) from None

    def token(self, text: str) -> str:
        """The row key standing for ``text`` (deterministic, reveals nothing without the key)."""
        return "~" + hmac.new(self._token_key, text.encode(), hashlib.sha256).hexdigest()


def _derive(key: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(key)


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
class CatalogSlots:
    """The persisted catalog's slots without their embeddings.

    Attributes:
        content_ids: (S,) id per slot, ``""`` for a dead slot.
        titles: (S,) title per slot.
        genres: (S,) genre list per slot.
        digest: ``meta['catalog_digest']``, the hex SHA-256 naming this catalog.
    """

    content_ids: list[str]
    titles: list[str]
    genres: list[list[str]]
    digest: str

    @property
    def live(self) -> int:
        """Number of live (non-dead) slots."""
        return sum(1 for c in self.content_ids if c)


@dataclass(frozen=True, slots=True)
class CatalogCodes:
    """Embeddings of catalog slots as the wire's int8 quantization.

    Attributes:
        codes: (m, 384) int8.
        scales: (m,) float32; a slot's embedding is ``codes * scale``.
    """

    codes: npt.NDArray[np.int8]
    scales: npt.NDArray[np.float32]

    @staticmethod
    def quantize(unit: npt.NDArray[np.float32]) -> CatalogCodes:
        """Quantize (m, 384) float32 rows (already L2-normalized), a block of rows at a time
        (whole-array temporaries of a 100K catalog would cost 150 MB each)."""
        m = unit.shape[0]
        codes = np.empty((m, EMBEDDING_DIM), dtype=np.int8)
        scales = np.empty((m,), dtype=np.float32)
        for start in range(0, m, _BLOCK_ROWS):
            end = min(m, start + _BLOCK_ROWS)
            codes[start:end], scales[start:end] = quantize_int8(unit[start:end])
        return CatalogCodes(codes, scales)

    def vectors(self) -> npt.NDArray[np.float32]:
        """(m, 384) float32 unit rows: what the catalog index holds (deterministic: the
        same codes always give the same floats)."""
        m = len(self)
        out = np.empty((m, EMBEDDING_DIM), dtype=np.float32)
        for start in range(0, m, _BLOCK_ROWS):
            end = min(m, start + _BLOCK_ROWS)
            block = self.codes[start:end].astype(np.float32) * self.scales[start:end, None]
            out[start:end] = normalize(block)
        return out

    def __len__(self) -> int:
        return int(self.codes.shape[0])


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
        encryption_key: 32 bytes to create (or open) an encrypted store, None for a plain one.

    Raises:
        StoreError: the file cannot be opened or is not a brain store, was written by a newer
            schema, or belongs to another device; or it is encrypted and the key is missing
            or wrong, or it is plain and a key was given.
    """

    def __init__(
        self, path: str | Path, device_id: str, *, encryption_key: bytes | None = None
    ) -> None:
        self._path = str(path)
        self._sealer = _Sealer(encryption_key) if encryption_key is not None else None
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
            had_history = self._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'history'"
            ).fetchone()
            with self.transaction():
                # executescript() would commit the open transaction: run statements one by one.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
                if version < 3:
                    self._migrate_float16_catalog()
                if had_history is None:
                    self._migrate_history()
                self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                row = self._conn.execute("SELECT value FROM meta WHERE key='device_id'").fetchone()
                self._check_encryption(is_new=row is None)
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

    def _migrate_float16_catalog(self) -> None:
        """Schema 2 -> 3: the per-item float16 ``catalog`` table becomes ``catalog_chunks``."""
        exists = self._conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'catalog'"
        ).fetchone()
        if exists is None:
            return
        rows = self._conn.execute(
            "SELECT content_id, title, genres, embedding FROM catalog ORDER BY position"
        ).fetchall()
        if rows:
            x = np.stack([_vector_from_blob(r[3], _F16) for r in rows])
            self.replace_catalog(
                [str(r[0]) for r in rows],
                [str(r[1]) for r in rows],
                [_genres_from_json(r[2]) for r in rows],
                CatalogCodes.quantize(normalize(x)),
            )
        self._conn.execute("DROP TABLE catalog")

    def _migrate_history(self) -> None:
        """A store without ``history``: the ``sealed`` columns, and ``history`` from the
        stored events (such a store is never encrypted)."""
        for table in ("events", "patterns", "pending_views"):
            columns = {r[1] for r in self._conn.execute(f"PRAGMA table_info({table})")}
            if "sealed" not in columns:
                self._conn.execute(f"ALTER TABLE {table} ADD COLUMN sealed BLOB")
        self._conn.execute(
            "INSERT OR IGNORE INTO history (content_id, bucket, views, successes,"
            " best_completion) SELECT content_id, bucket, COUNT(*), SUM(outcome = ?),"
            " MAX(completion) FROM events GROUP BY content_id, bucket",
            (_SUCCESS,),
        )

    def _check_encryption(self, *, is_new: bool) -> None:
        """Refuse a key that does not match the store (see the module docstring)."""
        rows = dict(
            self._conn.execute(
                "SELECT key, value FROM meta WHERE key IN ('encryption', 'key_check')"
            ).fetchall()
        )
        sealer = self._sealer
        if "encryption" not in rows:
            if sealer is None:
                return
            if not is_new:
                raise StoreError(
                    f"store {self._path!r} is not encrypted; it cannot be opened with an"
                    " encryption key (it is never converted in place)"
                )
            self._conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [
                    ("encryption", _CIPHER),
                    ("key_check", sealer.seal(_KEY_CHECK, b"meta:key_check").hex()),
                ],
            )
            return
        if rows["encryption"] != _CIPHER:
            raise StoreError(f"store {self._path!r} uses unknown encryption {rows['encryption']!r}")
        if sealer is None:
            raise StoreError(f"store {self._path!r} is encrypted; an encryption key is required")
        try:
            check = bytes.fromhex(str(rows.get("key_check", "")))
        except ValueError:
            check = b""
        try:
            ok = sealer.open(check, b"meta:key_check", what="the key check") == _KEY_CHECK
        except StoreError:
            ok = False
        if not ok:
            raise StoreError(f"wrong encryption key for store {self._path!r}")

    def _unseal(self, blob: object, ad: bytes, what: str) -> bytes:
        assert self._sealer is not None
        return self._sealer.open(blob, ad, what=what)

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
                " created_at_ms, updated_at_ms, changed_version, embedding_version, sealed"
                " FROM patterns"
            ).fetchall()
        out: dict[int, PatternRow] = {}
        for b, pid, blob, s, f, n, created, updated, changed, emb_v, sealed in rows:
            if self._sealer is not None:
                plain = self._unseal(sealed, _pattern_ad(int(b), str(pid)), "a stored pattern")
                if len(plain) not in (_PATTERN_STATS.size, _PATTERN_STATS.size + 4 * EMBEDDING_DIM):
                    raise StoreError("a sealed pattern has the wrong size; the store is corrupt")
                s, f, n, created, updated = _PATTERN_STATS.unpack_from(plain)
                rest = plain[_PATTERN_STATS.size :]
                blob = rest if rest else None
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
        if self._sealer is not None:
            with self._guard("reading pending views"):
                sealed = self._conn.execute(
                    "SELECT content_id, sealed FROM pending_views"
                ).fetchall()
            out: dict[str, int] = {}
            for token, blob in sealed:
                cid, views = self._pending_of(str(token), blob)
                if views > 0:
                    out[cid] = views
            return out
        with self._guard("reading pending views"):
            rows = self._conn.execute("SELECT content_id, views FROM pending_views WHERE views > 0")
            return {str(cid): int(v) for cid, v in rows.fetchall()}

    def _pending_of(self, token: str, blob: object) -> tuple[str, int]:
        plain = self._unseal(blob, b"pending_views:" + token.encode(), "a pending view count")
        cid, views = _json_list(plain, 2, "a pending view count")
        return str(cid), int(views)

    def watched(self) -> set[str]:
        """Every content id with at least one observed event (compacted ones included)."""
        return {row.content_id for row in self.history()}

    def history(self) -> list[HistoryRow]:
        """Every ``history`` row: the aggregate of all events observed, compacted or not."""
        with self._guard("reading the viewing history"):
            rows = self._conn.execute(
                "SELECT content_id, bucket, views, successes, best_completion, sealed"
                " FROM history ORDER BY content_id, bucket"
            ).fetchall()
        if self._sealer is None:
            return [
                HistoryRow(str(c), int(b), int(v), int(ok), float(x)) for c, b, v, ok, x, _ in rows
            ]
        out = []
        for token, _b, _v, _ok, _x, sealed in rows:
            out.append(self._history_of(str(token), sealed))
        return out

    def _history_of(self, token: str, blob: object) -> HistoryRow:
        plain = self._unseal(blob, b"history:" + token.encode(), "a history row")
        c, b, v, ok, x = _json_list(plain, 5, "a history row")
        return HistoryRow(str(c), int(b), int(v), int(ok), float(x))

    def event_count(self) -> int:
        """Number of stored events."""
        with self._guard("counting events"):
            return int(self._conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def catalog_slots(self) -> CatalogSlots | None:
        """The persisted catalog's slots (ids, titles, genres; no embeddings), or None when
        none was stored.

        Raises:
            StoreError: a chunk is missing or malformed (the store is corrupt).
        """
        with self._guard("reading the catalog"):
            rows = self._conn.execute(
                "SELECT chunk, meta FROM catalog_chunks ORDER BY chunk"
            ).fetchall()
            digest = self._conn.execute(
                "SELECT value FROM meta WHERE key = 'catalog_digest'"
            ).fetchone()
        if not rows:
            return None
        ids: list[str] = []
        titles: list[str] = []
        genres: list[list[str]] = []
        for i, (chunk, blob) in enumerate(rows):
            c_ids, c_titles, c_genres = _chunk_meta(blob)
            last = i == len(rows) - 1
            if chunk != i or (not last and len(c_ids) != CATALOG_CHUNK_SLOTS):
                raise StoreError("stored catalog chunks are not contiguous; the store is corrupt")
            ids += c_ids
            titles += c_titles
            genres += c_genres
        return CatalogSlots(ids, titles, genres, str(digest[0]) if digest else "")

    def catalog_codes(self) -> CatalogCodes:
        """Embeddings of every catalog slot (dead ones included), (S, 384) int8 + (S,) scales.

        Raises:
            StoreError: a chunk is malformed (the store is corrupt).
        """
        with self._guard("reading catalog embeddings"):
            rows = self._conn.execute(
                "SELECT codes, scales FROM catalog_chunks ORDER BY chunk"
            ).fetchall()
        parts = [_chunk_codes(codes, scales) for codes, scales in rows]
        if not parts:
            return CatalogCodes(np.zeros((0, EMBEDDING_DIM), np.int8), np.zeros((0,), np.float32))
        return CatalogCodes(
            np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts])
        )

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
                "SELECT content_id, completion, bucket, id, sealed FROM events ORDER BY id"
            ).fetchall()
        if self._sealer is None:
            return [(str(c), float(x), int(b)) for c, x, b, _, _ in rows]
        out = []
        for _c, _x, _b, event_id, sealed in rows:
            plain = self._unseal(sealed, b"events:%d" % int(event_id), "a stored event")
            c, _start, x, _watch, b, _outcome = _json_list(plain, 6, "a stored event")
            out.append((str(c), float(x), int(b)))
        return out

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
        *,
        keep: int | None = None,
    ) -> HistoryRow:
        """Append one viewing event, add it to its ``history`` row and, with ``keep``,
        delete the oldest events past the newest ``keep`` (compaction). Call inside
        `transaction` so that the three happen together.

        Returns:
            The event's ``history`` row after the event.
        """
        with self._guard("writing an event"):
            last = self._conn.execute("SELECT MAX(id) FROM events").fetchone()[0]
            event_id = int(last or 0) + 1
            values = (content_id, started_at_ms, completion, watch_seconds, bucket, outcome)
            if self._sealer is None:
                self._conn.execute(
                    "INSERT INTO events (id, content_id, started_at_ms, completion,"
                    " watch_seconds, bucket, outcome, local_version)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (event_id, *values, local_version),
                )
            else:
                sealed = self._sealer.seal(_json_bytes(list(values)), b"events:%d" % event_id)
                self._conn.execute(
                    "INSERT INTO events (id, content_id, started_at_ms, completion,"
                    " watch_seconds, bucket, outcome, local_version, sealed)"
                    " VALUES (?, '', 0, 0, 0, 0, 0, ?, ?)",
                    (event_id, local_version, sealed),
                )
            if keep is not None and event_id > keep:
                # Ids grow by one per event, so this keeps the newest ``keep`` (an index range).
                self._conn.execute("DELETE FROM events WHERE id <= ?", (event_id - keep,))
            return self._add_to_history(
                content_id, bucket, int(outcome == _SUCCESS), float(completion)
            )

    def _add_to_history(
        self, content_id: str, bucket: int, success: int, completion: float
    ) -> HistoryRow:
        if self._sealer is None:
            row = self._conn.execute(
                "INSERT INTO history (content_id, bucket, views, successes, best_completion)"
                " VALUES (?, ?, 1, ?, ?) ON CONFLICT (content_id, bucket) DO UPDATE SET"
                " views = views + 1, successes = successes + excluded.successes,"
                " best_completion = MAX(best_completion, excluded.best_completion)"
                " RETURNING views, successes, best_completion",
                (content_id, bucket, success, completion),
            ).fetchone()
            return HistoryRow(content_id, bucket, int(row[0]), int(row[1]), float(row[2]))
        token = self._sealer.token(f"{content_id}\x00{bucket}")
        found = self._conn.execute(
            "SELECT sealed FROM history WHERE content_id = ?", (token,)
        ).fetchone()
        old = (
            self._history_of(token, found[0])
            if found is not None
            else HistoryRow(content_id, bucket, 0, 0, 0.0)
        )
        new = HistoryRow(
            content_id,
            bucket,
            old.views + 1,
            old.successes + success,
            max(old.best_completion, completion) if old.views else completion,
        )
        sealed = self._sealer.seal(
            _json_bytes([content_id, bucket, new.views, new.successes, new.best_completion]),
            b"history:" + token.encode(),
        )
        self._conn.execute(
            "INSERT OR REPLACE INTO history (content_id, bucket, views, successes,"
            " best_completion, sealed) VALUES (?, 0, 0, 0, 0, ?)",
            (token, sealed),
        )
        return new

    def upsert_pattern(self, row: PatternRow) -> None:
        """Insert or replace the pattern of ``row.bucket``."""
        st = row.state
        blob = None if st.embedding is None else _blob(st.embedding, _F32)
        if self._sealer is not None:
            plain = _PATTERN_STATS.pack(
                st.successes, st.failures, st.neutral, row.created_at_ms, row.updated_at_ms
            ) + (blob or b"")
            sealed = self._sealer.seal(plain, _pattern_ad(row.bucket, row.pattern_id))
            with self._guard("writing a pattern"):
                self._conn.execute(
                    "INSERT OR REPLACE INTO patterns (bucket, pattern_id, embedding, successes,"
                    " failures, neutral, sample_count, created_at_ms, updated_at_ms,"
                    " changed_version, embedding_version, sealed)"
                    " VALUES (?, ?, NULL, 0, 0, 0, 0, 0, 0, ?, ?, ?)",
                    (row.bucket, row.pattern_id, row.changed_version, row.embedding_version,
                     sealed),
                )  # fmt: skip
            return
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
        if self._sealer is not None:
            with self._guard("counting a view"):
                self._set_pending(content_id, views)
            return
        with self._guard("counting a view"):
            self._conn.execute(
                "INSERT INTO pending_views (content_id, views) VALUES (?, ?)"
                " ON CONFLICT(content_id) DO UPDATE SET views = views + excluded.views",
                (content_id, views),
            )

    def subtract_views(self, sent: Mapping[str, int]) -> None:
        """Remove views that were synced; views counted since stay pending."""
        if self._sealer is not None:
            with self._guard("clearing synced views"):
                for cid, v in sent.items():
                    self._set_pending(cid, -int(v))
            return
        with self._guard("clearing synced views"):
            self._conn.executemany(
                "UPDATE pending_views SET views = views - ? WHERE content_id = ?",
                [(int(v), cid) for cid, v in sent.items()],
            )
            self._conn.execute("DELETE FROM pending_views WHERE views <= 0")

    def _set_pending(self, content_id: str, delta: int) -> None:
        """Encrypted stores: add ``delta`` to the sealed pending count of ``content_id``
        (the row is deleted when the count drops to 0 or below)."""
        assert self._sealer is not None
        token = self._sealer.token(content_id)
        found = self._conn.execute(
            "SELECT sealed FROM pending_views WHERE content_id = ?", (token,)
        ).fetchone()
        views = delta + (self._pending_of(token, found[0])[1] if found is not None else 0)
        if views <= 0:
            self._conn.execute("DELETE FROM pending_views WHERE content_id = ?", (token,))
            return
        sealed = self._sealer.seal(
            _json_bytes([content_id, views]), b"pending_views:" + token.encode()
        )
        self._conn.execute(
            "INSERT OR REPLACE INTO pending_views (content_id, views, sealed) VALUES (?, 1, ?)",
            (token, sealed),
        )

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
        if row is None:
            return None
        if self._sealer is not None:
            plain = self._unseal(row[0], b"meta:unconfirmed_send", "the unconfirmed send")
            return plain.decode("utf-8", errors="replace")
        return str(row[0])

    def set_unconfirmed_send(self, value: str | None) -> None:
        """Record (or, with None, clear) the sync request whose outcome is unknown."""
        with self._guard("writing the unconfirmed send"):
            if value is None:
                self._conn.execute("DELETE FROM meta WHERE key = 'unconfirmed_send'")
            else:
                stored: str | bytes = value
                if self._sealer is not None:
                    stored = self._sealer.seal(value.encode(), b"meta:unconfirmed_send")
                self._conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('unconfirmed_send', ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (stored,),
                )

    def forget_personal_data(self) -> None:
        """Delete what the device learned of its viewer: events, patterns, acknowledgements,
        pending view counts and the sync state (versions, counters). What came from the
        servers (catalog, global patterns, trending, the model) is kept. Call inside
        `transaction`; the freed pages are reclaimed by SQLite's next vacuum."""
        with self._guard("forgetting personal data"):
            for table in ("events", "history", "patterns", "acked_patterns", "pending_views"):
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
        titles: Sequence[str],
        genres: Sequence[Sequence[str]],
        codes: CatalogCodes,
    ) -> str:
        """Replace the stored catalog: slot i holds item i. Call inside `transaction`.

        Returns:
            The new catalog digest (also written to ``meta``).
        """
        n = len(content_ids)
        if not len(titles) == len(genres) == len(codes) == n:
            raise StoreError("catalog columns have different lengths")
        with self._guard("writing the catalog"):
            self._conn.execute("DELETE FROM catalog_chunks")
            for start in range(0, n, CATALOG_CHUNK_SLOTS):
                end = min(n, start + CATALOG_CHUNK_SLOTS)
                self._write_chunk(
                    start // CATALOG_CHUNK_SLOTS,
                    content_ids[start:end],
                    titles[start:end],
                    genres[start:end],
                    CatalogCodes(codes.codes[start:end], codes.scales[start:end]),
                )
            return self._write_catalog_digest()

    def update_catalog(
        self,
        content_ids: Sequence[str],
        titles: Sequence[str],
        genres: Sequence[Sequence[str]],
        appended: CatalogCodes,
        changed_slots: Iterable[int],
    ) -> str:
        """Rewrite only the chunks that change. Call inside `transaction`.

        Args:
            content_ids: (S',) id of every slot after the update (``""``: dead); the first
                S' - len(appended) slots exist already, the rest are appended.
            titles: (S',) title per slot.
            genres: (S',) genre list per slot.
            appended: embeddings of the appended slots, in slot order.
            changed_slots: existing slots whose id, title or genres changed.

        Returns:
            The new catalog digest (also written to ``meta``).
        """
        total = len(content_ids)
        first_new = total - len(appended)
        with self._guard("reading the catalog"):
            existing = int(self._conn.execute("SELECT COUNT(*) FROM catalog_chunks").fetchone()[0])
        touched = {s // CATALOG_CHUNK_SLOTS for s in changed_slots if 0 <= s < first_new}
        touched.update(range(first_new // CATALOG_CHUNK_SLOTS, -(-total // CATALOG_CHUNK_SLOTS)))
        with self._guard("writing the catalog"):
            for chunk in sorted(touched):
                start = chunk * CATALOG_CHUNK_SLOTS
                end = min(total, start + CATALOG_CHUNK_SLOTS)
                if chunk < existing:
                    row = self._conn.execute(
                        "SELECT codes, scales FROM catalog_chunks WHERE chunk = ?", (chunk,)
                    ).fetchone()
                    old = _chunk_codes(row[0], row[1])
                    keep = max(0, min(first_new, end) - start)
                    old = CatalogCodes(old.codes[:keep], old.scales[:keep])
                else:
                    old = CatalogCodes(
                        np.zeros((0, EMBEDDING_DIM), np.int8), np.zeros((0,), np.float32)
                    )
                lo = max(0, start - first_new)
                hi = max(lo, end - first_new)
                codes = CatalogCodes(
                    np.concatenate([old.codes, appended.codes[lo:hi]]),
                    np.concatenate([old.scales, appended.scales[lo:hi]]),
                )
                self._write_chunk(
                    chunk, content_ids[start:end], titles[start:end], genres[start:end], codes
                )
            return self._write_catalog_digest()

    def _write_chunk(
        self,
        chunk: int,
        content_ids: Sequence[str],
        titles: Sequence[str],
        genres: Sequence[Sequence[str]],
        codes: CatalogCodes,
    ) -> None:
        if not len(content_ids) == len(titles) == len(genres) == len(codes):
            raise StoreError(f"catalog chunk {chunk} has columns of different lengths")
        meta_json = json.dumps(
            [list(content_ids), list(titles), [list(g) for g in genres]], separators=(",", ":")
        )
        compressor = zstandard.ZstdCompressor(level=3, write_content_size=True)
        meta = compressor.compress(meta_json.encode())
        code_blob = compressor.compress(np.ascontiguousarray(codes.codes, np.int8).tobytes())
        scale_blob = np.asarray(codes.scales, dtype=_F32).tobytes()
        sha = hashlib.sha256(meta + code_blob + scale_blob).digest()
        self._conn.execute(
            "INSERT OR REPLACE INTO catalog_chunks (chunk, meta, codes, scales, sha)"
            " VALUES (?, ?, ?, ?, ?)",
            (chunk, meta, code_blob, scale_blob, sha),
        )

    def _write_catalog_digest(self) -> str:
        digest = hashlib.sha256()
        for (sha,) in self._conn.execute("SELECT sha FROM catalog_chunks ORDER BY chunk"):
            digest.update(sha)
        value = digest.hexdigest()
        self._conn.execute(
            "INSERT INTO meta (key, value) VALUES ('catalog_digest', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (value,),
        )
        return value

    def checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it (after large catalog writes, so
        the WAL does not keep a second copy of the catalog on flash). Best effort: a
        checkpoint blocked by a reader is retried by SQLite's automatic checkpoints."""
        if self._conn.in_transaction:
            return
        with suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def replace_global_patterns(
        self,
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
            if keep is not None:
                self._conn.execute(
                    "DELETE FROM global_patterns WHERE pattern_key NOT IN (SELECT pattern_key"
                    " FROM global_patterns ORDER BY round DESC, quality DESC, pattern_key"
                    " LIMIT ?)",
                    (int(keep),),
                )

    def replace_trending(
        self, items: Sequence[tuple[str, float]], *, keep: int | None = None
    ) -> None:
        """Replace the trending list with ``(content_id, score)`` pairs; with ``keep``, only
        the ``keep`` highest scores (ties: the smallest ids) are stored."""
        if keep is not None and len(items) > keep:
            items = sorted(items, key=lambda item: (-item[1], item[0]))[:keep]
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


def _pattern_ad(bucket: int, pattern_id: str) -> bytes:
    return f"patterns:{bucket}:{pattern_id}".encode()


def _json_bytes(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _json_list(plain: bytes, length: int, what: str) -> list[Any]:
    try:
        value = json.loads(plain)
    except ValueError:
        value = None
    if not isinstance(value, list) or len(value) != length:
        raise StoreError(f"{what} decrypts to a malformed value; the store is corrupt")
    return value


def _blob(vector: npt.NDArray[np.float32], dtype: np.dtype[np.floating]) -> bytes:
    return np.asarray(vector, dtype=dtype).tobytes()


def _vector_from_blob(blob: object, dtype: np.dtype[np.floating]) -> npt.NDArray[np.float32]:
    if not isinstance(blob, bytes) or len(blob) != EMBEDDING_DIM * dtype.itemsize:
        raise StoreError("stored embedding has the wrong size; the store is corrupt")
    vector = np.frombuffer(blob, dtype=dtype).astype(np.float32)
    if not np.all(np.isfinite(vector)):
        raise StoreError("stored embedding has NaN or infinite values; the store is corrupt")
    return vector


def _chunk_meta(blob: object) -> tuple[list[str], list[str], list[list[str]]]:
    try:
        if not isinstance(blob, bytes):
            raise ValueError("not a blob")
        ids, titles, genres = json.loads(zstandard.ZstdDecompressor().decompress(blob))
        if not (len(ids) == len(titles) == len(genres)):
            raise ValueError("columns of different lengths")
        return (
            [str(c) for c in ids],
            [str(t) for t in titles],
            [[str(g) for g in gs] for gs in genres],
        )
    except (ValueError, TypeError, zstandard.ZstdError) as exc:
        raise StoreError(f"stored catalog chunk is malformed ({exc}); store corrupt") from exc


def _chunk_codes(codes: object, scales: object) -> CatalogCodes:
    try:
        if not isinstance(codes, bytes) or not isinstance(scales, bytes):
            raise ValueError("not a blob")
        raw = zstandard.ZstdDecompressor().decompress(codes)
        s = np.frombuffer(scales, dtype=_F32).copy()
        c = np.frombuffer(raw, dtype=np.int8).reshape(s.shape[0], EMBEDDING_DIM).copy()
    except (ValueError, TypeError, zstandard.ZstdError) as exc:
        raise StoreError(f"stored catalog codes are malformed ({exc}); store corrupt") from exc
    if not np.all(np.isfinite(s)):
        raise StoreError("stored catalog scales are not finite; the store is corrupt")
    return CatalogCodes(c, s)


def _genres_from_json(text: object) -> list[str]:
    try:
        value = json.loads(str(text))
    except ValueError:
        return []
    return [str(g) for g in value] if isinstance(value, list) else []
