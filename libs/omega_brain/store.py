"""The brain's local persistence: one SQLite file (WAL journal, ``synchronous=NORMAL``).

WAL with ``synchronous=NORMAL`` makes every committed transaction atomic and durable across a
crash of the process, and across a power cut up to the last checkpointed transactions (SQLite
never leaves a half-written transaction behind). All writes of one `Brain.observe` or one
`Brain.sync` happen in a single transaction, so reopening the file after a power cut restores a
consistent brain.

`Store` opens the file and runs transactions; each part of the work is its own module:

* `omega_brain.store_schema`: the tables (``PRAGMA user_version`` = `SCHEMA_VERSION`), the
  migrations of older stores, the ``sync_state`` keys (`STATE_KEYS`) and the checks made on
  opening (device, encryption key).
* `omega_brain.store_crypto`: encryption at rest (a store created with an ``encryption_key``):
  AES-256-GCM sealing with the row identity as associated data, HMAC row tokens, HKDF keys.
* `omega_brain.store_personal`: what the device learned of its viewer (events, history,
  patterns, pending views, acknowledgements, the unconfirmed send), sealed when encrypted.
* `omega_brain.store_catalog`: the brain's own catalog in chunks of int8 codes.
* `omega_brain.store_server_data`: global patterns, trending and the item-factor model.
* `omega_brain.store_rows`: the row types these return and the encodings they share.

The names other modules import (`Store`, the row types, `SCHEMA_VERSION`, `STATE_KEYS`,
`CATALOG_CHUNK_SLOTS`) are re-exported here.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import numpy.typing as npt

from omega_brain import store_catalog, store_schema, store_server_data
from omega_brain.errors import StoreError
from omega_brain.store_catalog import CATALOG_CHUNK_SLOTS, CatalogCodes, CatalogSlots
from omega_brain.store_crypto import Sealer
from omega_brain.store_personal import PersonalTables
from omega_brain.store_rows import GlobalPatternRow, HistoryRow, PatternRow, StoredModel, guard
from omega_brain.store_schema import SCHEMA_VERSION, STATE_KEYS

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
        self._sealer = Sealer(encryption_key) if encryption_key is not None else None
        try:
            self._conn = sqlite3.connect(
                self._path, timeout=5.0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {self._path!r}: {exc}") from exc
        self._personal = PersonalTables(self._conn, self._sealer)
        try:
            self._init_schema(device_id)
        except BaseException:
            self._conn.close()
            raise

    def _init_schema(self, device_id: str) -> None:
        with guard("initializing the store"):
            version, has_history = store_schema.prepare(self._conn)
            with self.transaction():
                store_schema.upgrade(
                    self._conn,
                    self._path,
                    device_id,
                    self._sealer,
                    version=version,
                    has_history=has_history,
                )

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the block in one ``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on any error).

        Raises:
            StoreError: when SQLite fails (the transaction is rolled back).
        """
        if self._conn.in_transaction:  # nested: the outer block commits
            yield
            return
        with guard("starting a transaction"):
            self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            with guard("committing"):
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

    def checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it (after large catalog writes, so
        the WAL does not keep a second copy of the catalog on flash). Best effort: a
        checkpoint blocked by a reader is retried by SQLite's automatic checkpoints."""
        if self._conn.in_transaction:
            return
        with suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def size_bytes(self) -> int:
        """Bytes used by the database plus its WAL file (pages in use for ``:memory:``)."""
        with guard("measuring the store"):
            pages = int(self._conn.execute("PRAGMA page_count").fetchone()[0])
            page_size = int(self._conn.execute("PRAGMA page_size").fetchone()[0])
        total = pages * page_size
        if self._path != ":memory:" and not self._path.startswith("file:"):
            with suppress(OSError):
                total += os.path.getsize(self._path + "-wal")
        return total

    # ------------------------------------------------------------------------ sync state

    def state(self) -> dict[str, int]:
        """All ``sync_state`` values, keyed as `STATE_KEYS`."""
        return store_schema.read_state(self._conn)

    def set_state(self, values: Mapping[str, int]) -> None:
        """Set ``sync_state`` keys (each must be one of `STATE_KEYS`)."""
        store_schema.write_state(self._conn, values)

    # ------------------------------------------------------------ personal data (sealed)

    def patterns(self) -> dict[int, PatternRow]:
        """Every bucket's pattern row, keyed by bucket index."""
        return self._personal.patterns()

    def acked(self) -> dict[str, int]:
        """Acknowledged pattern ids mapped to the sample count the server knows."""
        return self._personal.acked()

    def pending_views(self) -> dict[str, int]:
        """View counts not yet synced, by content id."""
        return self._personal.pending_views()

    def watched(self) -> set[str]:
        """Every content id with at least one observed event (compacted ones included)."""
        return {row.content_id for row in self.history()}

    def history(self) -> list[HistoryRow]:
        """Every ``history`` row: the aggregate of all events observed, compacted or not."""
        return self._personal.history()

    def event_count(self) -> int:
        """Number of stored events."""
        return self._personal.event_count()

    def viewings(self) -> list[tuple[str, float, int]]:
        """``(content_id, completion, bucket)`` of every stored event, oldest first.

        ``bucket`` is the context bucket index the event was filed under when observed (the
        bucket of its pattern, from the UTC offset in force then), in [0, 8).
        """
        return self._personal.viewings()

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
        return self._personal.insert_event(
            content_id,
            started_at_ms,
            completion,
            watch_seconds,
            bucket,
            outcome,
            local_version,
            keep=keep,
        )

    def upsert_pattern(self, row: PatternRow) -> None:
        """Insert or replace the pattern of ``row.bucket``."""
        self._personal.upsert_pattern(row)

    def add_view(self, content_id: str, views: int = 1) -> None:
        """Count ``views`` more pending views of ``content_id``."""
        self._personal.add_view(content_id, views)

    def subtract_views(self, sent: Mapping[str, int]) -> None:
        """Remove views that were synced; views counted since stay pending."""
        self._personal.subtract_views(sent)

    def mark_acked(self, items: Iterable[tuple[str, int]], version: int) -> None:
        """Record ``(pattern_id, sample_count)`` pairs as acknowledged at ``version``."""
        self._personal.mark_acked(items, version)

    def clear_acked(self) -> None:
        """Forget every acknowledgement (the server lost this device's state)."""
        self._personal.clear_acked()

    def unconfirmed_send(self) -> str | None:
        """The sync request whose outcome is unknown (JSON, see `Brain.sync`), if any."""
        return self._personal.unconfirmed_send()

    def set_unconfirmed_send(self, value: str | None) -> None:
        """Record (or, with None, clear) the sync request whose outcome is unknown."""
        self._personal.set_unconfirmed_send(value)

    def forget_personal_data(self) -> None:
        """Delete what the device learned of its viewer: events, patterns, acknowledgements,
        pending view counts and the sync state (versions, counters). What came from the
        servers (catalog, global patterns, trending, the model) is kept. Call inside
        `transaction`; the freed pages are reclaimed by SQLite's next vacuum."""
        self._personal.forget()

    # ---------------------------------------------------------------------------- catalog

    def catalog_slots(self) -> CatalogSlots | None:
        """The persisted catalog's slots (ids, titles, genres; no embeddings), or None when
        none was stored.

        Raises:
            StoreError: a chunk is missing or malformed (the store is corrupt).
        """
        return store_catalog.read_slots(self._conn)

    def catalog_codes(self) -> CatalogCodes:
        """Embeddings of every catalog slot (dead ones included), (S, 384) int8 + (S,) scales.

        Raises:
            StoreError: a chunk is malformed (the store is corrupt).
        """
        return store_catalog.read_codes(self._conn)

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
        return store_catalog.replace_catalog(self._conn, content_ids, titles, genres, codes)

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
        return store_catalog.update_catalog(
            self._conn, content_ids, titles, genres, appended, changed_slots
        )

    # ----------------------------------------------------------- what the servers sent

    def global_patterns(self) -> list[GlobalPatternRow]:
        """Every stored global pattern."""
        return store_server_data.read_global_patterns(self._conn)

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
        store_server_data.replace_global_patterns(
            self._conn, rows, continuation=continuation, keep=keep
        )

    def trending(self) -> list[tuple[str, float]]:
        """The stored trending list, highest score first."""
        return store_server_data.read_trending(self._conn)

    def replace_trending(
        self, items: Sequence[tuple[str, float]], *, keep: int | None = None
    ) -> None:
        """Replace the trending list with ``(content_id, score)`` pairs; with ``keep``, only
        the ``keep`` highest scores (ties: the smallest ids) are stored."""
        store_server_data.replace_trending(self._conn, items, keep=keep)

    def model(self) -> StoredModel:
        """The persisted item-factor model (no rows before the first fetch).

        Raises:
            StoreError: the stored blobs do not match ``model_factors`` or are not finite.
        """
        return store_server_data.read_model(self._conn)

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
        store_server_data.apply_model_rows(self._conn, rows, replace=replace, factors=factors)
