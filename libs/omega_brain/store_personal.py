"""What the store knows of its viewer: events, the per-item history, the patterns, pending
view counts, acknowledgements and the unconfirmed send; sealed in an encrypted store.

In an encrypted store (`omega_brain.store_crypto`) the plain columns of a sealed row hold
placeholders: an event's values, a pattern's counts, times and embedding (`_PATTERN_STATS`
then the embedding's float32 bytes), a history row and a pending view count are JSON or
packed bytes sealed in the row's ``sealed`` column, and ``history`` and ``pending_views`` rows
are keyed by the `Sealer.token` of their content id (and bucket).
"""

from __future__ import annotations

import sqlite3
import struct
from collections.abc import Iterable, Mapping

from omega_brain.errors import StoreError
from omega_brain.patterns import PatternState
from omega_brain.store_crypto import (
    UNCONFIRMED_SEND_AD,
    Sealer,
    event_ad,
    history_ad,
    pattern_ad,
    pending_views_ad,
)
from omega_brain.store_rows import (
    F32,
    SUCCESS,
    HistoryRow,
    PatternRow,
    blob,
    guard,
    json_bytes,
    json_list,
    vector_from_blob,
)
from omega_brain.store_schema import STATE_DEFAULTS, STATE_KEYS
from omega_protocol import EMBEDDING_DIM

__all__ = ["PersonalTables"]

_PATTERN_STATS = struct.Struct("<qqqqq")
"""Sealed pattern: successes, failures, neutral, created_at_ms, updated_at_ms, then the
embedding's float32 bytes (none before the first success)."""


class PersonalTables:
    """The viewer's rows of one store, read and written through its connection.

    Args:
        conn: the store's connection (transactions are the caller's).
        sealer: the store's sealer, None for a plain store.
    """

    __slots__ = ("_conn", "_sealer")

    def __init__(self, conn: sqlite3.Connection, sealer: Sealer | None) -> None:
        self._conn = conn
        self._sealer = sealer

    def _unseal(self, data: object, ad: bytes, what: str) -> bytes:
        assert self._sealer is not None
        return self._sealer.open(data, ad, what=what)

    # ----------------------------------------------------------------------------- reads

    def patterns(self) -> dict[int, PatternRow]:
        """Every bucket's pattern row, keyed by bucket index."""
        with guard("reading patterns"):
            rows = self._conn.execute(
                "SELECT bucket, pattern_id, embedding, successes, failures, neutral,"
                " created_at_ms, updated_at_ms, changed_version, embedding_version, sealed"
                " FROM patterns"
            ).fetchall()
        out: dict[int, PatternRow] = {}
        for b, pid, data, s, f, n, created, updated, changed, emb_v, sealed in rows:
            if self._sealer is not None:
                plain = self._unseal(sealed, pattern_ad(int(b), str(pid)), "a stored pattern")
                if len(plain) not in (_PATTERN_STATS.size, _PATTERN_STATS.size + 4 * EMBEDDING_DIM):
                    raise StoreError("a sealed pattern has the wrong size; the store is corrupt")
                s, f, n, created, updated = _PATTERN_STATS.unpack_from(plain)
                rest = plain[_PATTERN_STATS.size :]
                data = rest if rest else None
            embedding = None if data is None else vector_from_blob(data, F32)
            state = PatternState(embedding=embedding, successes=s, failures=f, neutral=n)
            out[int(b)] = PatternRow(int(b), str(pid), state, created, updated, changed, emb_v)
        return out

    def acked(self) -> dict[str, int]:
        """Acknowledged pattern ids mapped to the sample count the server knows."""
        with guard("reading acknowledged patterns"):
            rows = self._conn.execute("SELECT pattern_id, sample_count FROM acked_patterns")
            return {str(pid): int(n) for pid, n in rows.fetchall()}

    def pending_views(self) -> dict[str, int]:
        """View counts not yet synced, by content id."""
        if self._sealer is not None:
            with guard("reading pending views"):
                sealed = self._conn.execute(
                    "SELECT content_id, sealed FROM pending_views"
                ).fetchall()
            out: dict[str, int] = {}
            for token, data in sealed:
                cid, views = self._pending_of(str(token), data)
                if views > 0:
                    out[cid] = views
            return out
        with guard("reading pending views"):
            rows = self._conn.execute("SELECT content_id, views FROM pending_views WHERE views > 0")
            return {str(cid): int(v) for cid, v in rows.fetchall()}

    def _pending_of(self, token: str, data: object) -> tuple[str, int]:
        plain = self._unseal(data, pending_views_ad(token), "a pending view count")
        cid, views = json_list(plain, 2, "a pending view count")
        return str(cid), int(views)

    def history(self) -> list[HistoryRow]:
        """Every ``history`` row: the aggregate of all events observed, compacted or not."""
        with guard("reading the viewing history"):
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

    def _history_of(self, token: str, data: object) -> HistoryRow:
        plain = self._unseal(data, history_ad(token), "a history row")
        c, b, v, ok, x = json_list(plain, 5, "a history row")
        return HistoryRow(str(c), int(b), int(v), int(ok), float(x))

    def event_count(self) -> int:
        """Number of stored events."""
        with guard("counting events"):
            return int(self._conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def viewings(self) -> list[tuple[str, float, int]]:
        """``(content_id, completion, bucket)`` of every stored event, oldest first."""
        with guard("reading events"):
            rows = self._conn.execute(
                "SELECT content_id, completion, bucket, id, sealed FROM events ORDER BY id"
            ).fetchall()
        if self._sealer is None:
            return [(str(c), float(x), int(b)) for c, x, b, _, _ in rows]
        out = []
        for _c, _x, _b, event_id, sealed in rows:
            plain = self._unseal(sealed, event_ad(int(event_id)), "a stored event")
            c, _start, x, _watch, b, _outcome = json_list(plain, 6, "a stored event")
            out.append((str(c), float(x), int(b)))
        return out

    def unconfirmed_send(self) -> str | None:
        """The sync request whose outcome is unknown (JSON, see `Brain.sync`), if any."""
        with guard("reading the unconfirmed send"):
            row = self._conn.execute(
                "SELECT value FROM meta WHERE key = 'unconfirmed_send'"
            ).fetchone()
        if row is None:
            return None
        if self._sealer is not None:
            plain = self._unseal(row[0], UNCONFIRMED_SEND_AD, "the unconfirmed send")
            return plain.decode("utf-8", errors="replace")
        return str(row[0])

    # ---------------------------------------------------------------------------- writes

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
        with guard("writing an event"):
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
                sealed = self._sealer.seal(json_bytes(list(values)), event_ad(event_id))
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
                content_id, bucket, int(outcome == SUCCESS), float(completion)
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
            json_bytes([content_id, bucket, new.views, new.successes, new.best_completion]),
            history_ad(token),
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
        data = None if st.embedding is None else blob(st.embedding, F32)
        if self._sealer is not None:
            plain = _PATTERN_STATS.pack(
                st.successes, st.failures, st.neutral, row.created_at_ms, row.updated_at_ms
            ) + (data or b"")
            sealed = self._sealer.seal(plain, pattern_ad(row.bucket, row.pattern_id))
            with guard("writing a pattern"):
                self._conn.execute(
                    "INSERT OR REPLACE INTO patterns (bucket, pattern_id, embedding, successes,"
                    " failures, neutral, sample_count, created_at_ms, updated_at_ms,"
                    " changed_version, embedding_version, sealed)"
                    " VALUES (?, ?, NULL, 0, 0, 0, 0, 0, 0, ?, ?, ?)",
                    (row.bucket, row.pattern_id, row.changed_version, row.embedding_version,
                     sealed),
                )  # fmt: skip
            return
        with guard("writing a pattern"):
            self._conn.execute(
                "INSERT OR REPLACE INTO patterns (bucket, pattern_id, embedding, successes,"
                " failures, neutral, sample_count, created_at_ms, updated_at_ms,"
                " changed_version, embedding_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (row.bucket, row.pattern_id, data, st.successes, st.failures, st.neutral,
                 st.sample_count, row.created_at_ms, row.updated_at_ms, row.changed_version,
                 row.embedding_version),
            )  # fmt: skip

    def add_view(self, content_id: str, views: int = 1) -> None:
        """Count ``views`` more pending views of ``content_id``."""
        if self._sealer is not None:
            with guard("counting a view"):
                self._set_pending(content_id, views)
            return
        with guard("counting a view"):
            self._conn.execute(
                "INSERT INTO pending_views (content_id, views) VALUES (?, ?)"
                " ON CONFLICT(content_id) DO UPDATE SET views = views + excluded.views",
                (content_id, views),
            )

    def subtract_views(self, sent: Mapping[str, int]) -> None:
        """Remove views that were synced; views counted since stay pending."""
        if self._sealer is not None:
            with guard("clearing synced views"):
                for cid, v in sent.items():
                    self._set_pending(cid, -int(v))
            return
        with guard("clearing synced views"):
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
        sealed = self._sealer.seal(json_bytes([content_id, views]), pending_views_ad(token))
        self._conn.execute(
            "INSERT OR REPLACE INTO pending_views (content_id, views, sealed) VALUES (?, 1, ?)",
            (token, sealed),
        )

    def mark_acked(self, items: Iterable[tuple[str, int]], version: int) -> None:
        """Record ``(pattern_id, sample_count)`` pairs as acknowledged at ``version``."""
        with guard("recording acknowledged patterns"):
            self._conn.executemany(
                "INSERT OR REPLACE INTO acked_patterns (pattern_id, sample_count, acked_version)"
                " VALUES (?, ?, ?)",
                [(pid, int(n), int(version)) for pid, n in items],
            )

    def set_unconfirmed_send(self, value: str | None) -> None:
        """Record (or, with None, clear) the sync request whose outcome is unknown."""
        with guard("writing the unconfirmed send"):
            if value is None:
                self._conn.execute("DELETE FROM meta WHERE key = 'unconfirmed_send'")
            else:
                stored: str | bytes = value
                if self._sealer is not None:
                    stored = self._sealer.seal(value.encode(), UNCONFIRMED_SEND_AD)
                self._conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('unconfirmed_send', ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (stored,),
                )

    def clear_acked(self) -> None:
        """Forget every acknowledgement (the server lost this device's state)."""
        with guard("clearing acknowledged patterns"):
            self._conn.execute("DELETE FROM acked_patterns")

    def forget(self) -> None:
        """Delete the viewer's rows and reset the personal sync state (see
        `Store.forget_personal_data`)."""
        with guard("forgetting personal data"):
            for table in ("events", "history", "patterns", "acked_patterns", "pending_views"):
                self._conn.execute(f"DELETE FROM {table}")
            self._conn.execute("DELETE FROM meta WHERE key = 'unconfirmed_send'")
            keep = ("global_version", "catalog_version", "model_version", "model_factors")
            self._conn.executemany(
                "UPDATE sync_state SET value = ? WHERE key = ?",
                [(STATE_DEFAULTS.get(k, 0), k) for k in STATE_KEYS if k not in keep],
            )
