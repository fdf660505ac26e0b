"""The store's schema (``PRAGMA user_version`` = `SCHEMA_VERSION`), its migrations, the
``sync_state`` keys, and the checks made when a store opens (device, encryption key).

Tables (personal values of encrypted stores are sealed, see `omega_brain.store_crypto`):

* ``meta(key TEXT PK, value TEXT)``: ``device_id`` the store belongs to; ``unconfirmed_send``, a
  sync request whose outcome is unknown (a lost reply), settled before the next delta.
* ``sync_state(key TEXT PK, value INTEGER)``: ``local_version``, ``acked_version``,
  ``global_version``, ``catalog_version``, ``syncs_ok``, ``syncs_failed``; and for the
  collaborative model ``model_version`` (0: no model), ``model_factors`` (factors per row, 0
  without a model), ``model_update_version`` (model version of the last acknowledged
  ``ItemFactorUpdate``; -1 before the first), ``model_update_items`` (items it covered) and
  ``model_bytes_down`` (bytes of every FetchModel reply received); ``server_version_known``
  (0: the next sync first pulls to learn the shard's last version for the device: a new
  store, or one redirected to another shard), ``next_sync_at_ms`` (the shard's pace),
  ``global_page_version`` / ``global_page_offset`` (a global-pattern transfer in parts) and
  ``syncs_redirected`` (sync answers naming another shard).
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
  brain's own catalog in chunks of int8 codes, see `omega_brain.store_catalog`.
* ``global_patterns(pattern_key TEXT PK, bucket, embedding BLOB, quality, success_rate,
  source_count, round)``: federated patterns; ``bucket`` -1 means "no context: every bucket";
  ``embedding`` is float32 like ``patterns``.
* ``trending(content_id TEXT PK, score REAL)``: the last trending list received.
* ``model(id = 1, content_ids TEXT, codes BLOB, scales BLOB)``: the item-factor model of
  federated collaborative filtering in one row, see `omega_brain.store_server_data`.

Migrations: every statement of the schema is ``CREATE TABLE IF NOT EXISTS`` and state keys are
``INSERT OR IGNORE``d with their defaults, so opening a store of an older schema adds what it
lacks and sets ``user_version``. Version 2 added ``model`` and the ``model_*`` state keys;
version 3 replaced the per-item float16 ``catalog`` table with ``catalog_chunks`` (a version 2
catalog is converted when the store opens). A store without ``history`` gains it (filled
from its events) and the ``sealed`` columns when it opens; this additive change kept version
3 (a test pins it), so a brain older than it opens such a store without noticing. State keys
added later (``syncs_redirected``) keep version 4 the same way: a store that lacks one gains it
with its default when it opens (``INSERT OR IGNORE``), and an older brain ignores it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping

import numpy as np

from omega_brain.errors import StoreError
from omega_brain.patterns import normalize
from omega_brain.store_catalog import CatalogCodes, replace_catalog
from omega_brain.store_crypto import CIPHER, KEY_CHECK, KEY_CHECK_AD, Sealer
from omega_brain.store_rows import F16, SUCCESS, guard, vector_from_blob

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "STATE_DEFAULTS",
    "STATE_KEYS",
    "prepare",
    "read_state",
    "upgrade",
    "write_state",
]

SCHEMA_VERSION = 4

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
    "syncs_redirected",
)

STATE_DEFAULTS = {"model_update_version": -1}
"""Initial value of state keys that do not start at 0."""

SCHEMA = """
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


def prepare(conn: sqlite3.Connection) -> tuple[int, bool]:
    """Set the journal (outside any transaction) and read what the file holds.

    Returns:
        ``(user_version, has_history)`` of the file as found (0, False for a new file).

    Raises:
        sqlite3.Error: SQLite fails (the caller guards).
        StoreError: the file was written by a newer schema.
    """
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise StoreError(f"store schema {version} is newer than this brain's ({SCHEMA_VERSION})")
    had_history = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'history'"
    ).fetchone()
    return version, had_history is not None


def upgrade(
    conn: sqlite3.Connection,
    path: str,
    device_id: str,
    sealer: Sealer | None,
    *,
    version: int,
    has_history: bool,
) -> None:
    """Create what the file lacks, migrate, and check device and key. Call inside the
    transaction that opens the store, with what `prepare` found.

    Raises:
        sqlite3.Error: SQLite fails (the caller guards).
        StoreError: the store belongs to another device, or the key does not match it.
    """
    # executescript() would commit the open transaction: run statements one by one.
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    if version < 3:
        _migrate_float16_catalog(conn)
    if not has_history:
        _migrate_history(conn)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    row = conn.execute("SELECT value FROM meta WHERE key='device_id'").fetchone()
    _check_encryption(conn, path, sealer, is_new=row is None)
    if row is None:
        conn.execute("INSERT INTO meta (key, value) VALUES ('device_id', ?)", (device_id,))
    elif row[0] != device_id:
        raise StoreError(f"store {path!r} belongs to device {row[0]!r}, not {device_id!r}")
    conn.executemany(
        "INSERT OR IGNORE INTO sync_state (key, value) VALUES (?, ?)",
        [(k, STATE_DEFAULTS.get(k, 0)) for k in STATE_KEYS],
    )


def read_state(conn: sqlite3.Connection) -> dict[str, int]:
    """All ``sync_state`` values, keyed as `STATE_KEYS`."""
    with guard("reading sync state"):
        rows = conn.execute("SELECT key, value FROM sync_state").fetchall()
    values = {k: STATE_DEFAULTS.get(k, 0) for k in STATE_KEYS}
    values.update({str(k): int(v) for k, v in rows})
    return values


def write_state(conn: sqlite3.Connection, values: Mapping[str, int]) -> None:
    """Set ``sync_state`` keys (each must be one of `STATE_KEYS`)."""
    unknown = set(values) - set(STATE_KEYS)
    if unknown:
        raise StoreError(f"unknown sync state keys {sorted(unknown)}")
    with guard("writing sync state"):
        # An upsert: stores created before a key existed gain it on first write.
        conn.executemany(
            "INSERT INTO sync_state (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [(k, int(v)) for k, v in values.items()],
        )


def _migrate_float16_catalog(conn: sqlite3.Connection) -> None:
    """Schema 2 -> 3: the per-item float16 ``catalog`` table becomes ``catalog_chunks``."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'catalog'"
    ).fetchone()
    if exists is None:
        return
    rows = conn.execute(
        "SELECT content_id, title, genres, embedding FROM catalog ORDER BY position"
    ).fetchall()
    if rows:
        x = np.stack([vector_from_blob(r[3], F16) for r in rows])
        replace_catalog(
            conn,
            [str(r[0]) for r in rows],
            [str(r[1]) for r in rows],
            [_genres_from_json(r[2]) for r in rows],
            CatalogCodes.quantize(normalize(x)),
        )
    conn.execute("DROP TABLE catalog")


def _migrate_history(conn: sqlite3.Connection) -> None:
    """A store without ``history``: the ``sealed`` columns, and ``history`` from the
    stored events (such a store is never encrypted)."""
    for table in ("events", "patterns", "pending_views"):
        columns = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        if "sealed" not in columns:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN sealed BLOB")
    conn.execute(
        "INSERT OR IGNORE INTO history (content_id, bucket, views, successes,"
        " best_completion) SELECT content_id, bucket, COUNT(*), SUM(outcome = ?),"
        " MAX(completion) FROM events GROUP BY content_id, bucket",
        (SUCCESS,),
    )


def _check_encryption(
    conn: sqlite3.Connection, path: str, sealer: Sealer | None, *, is_new: bool
) -> None:
    """Refuse a key that does not match the store; mark a new encrypted store."""
    rows = dict(
        conn.execute("SELECT key, value FROM meta WHERE key IN ('encryption', 'key_check')")
    )
    if "encryption" not in rows:
        if sealer is None:
            return
        if not is_new:
            raise StoreError(
                f"store {path!r} is not encrypted; it cannot be opened with an"
                " encryption key (it is never converted in place)"
            )
        conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [("encryption", CIPHER), ("key_check", sealer.seal(KEY_CHECK, KEY_CHECK_AD).hex())],
        )
        return
    if rows["encryption"] != CIPHER:
        raise StoreError(f"store {path!r} uses unknown encryption {rows['encryption']!r}")
    if sealer is None:
        raise StoreError(f"store {path!r} is encrypted; an encryption key is required")
    try:
        check = bytes.fromhex(str(rows.get("key_check", "")))
    except ValueError:
        check = b""
    try:
        ok = sealer.open(check, KEY_CHECK_AD, what="the key check") == KEY_CHECK
    except StoreError:
        ok = False
    if not ok:
        raise StoreError(f"wrong encryption key for store {path!r}")


def _genres_from_json(text: object) -> list[str]:
    try:
        value = json.loads(str(text))
    except ValueError:
        return []
    return [str(g) for g in value] if isinstance(value, list) else []
