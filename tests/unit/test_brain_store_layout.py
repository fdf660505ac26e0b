"""The store's on-disk format is frozen at schema 4: a store written before `omega_brain.store`
was split into modules (store_schema, store_crypto, store_personal, store_catalog,
store_server_data) opens and reads the same after it, and the split writes the same rows.

The fixtures at the end of this file were taken from the single-module ``store.py``: `LAYOUT` is
the ``sqlite_master`` of a new store, and `ROWS_PLAIN` / `ROWS_ENCRYPTED` the rows of every table
after `_write_personal` (and, plain only, `_write_public`) under `KEY`. Plain rows are
deterministic, so the new code must write them byte for byte; sealed values carry a random
nonce, so encrypted rows must match except the ciphertexts, and the old ciphertexts must open.

State keys added since (`ADDED_STATE_KEYS`) keep schema 4, as the code base adds state keys: a
new store writes them with their defaults (`_current`), and a store written before them (the
fixtures as taken) opens, reads them as their defaults and gains their rows.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from omega_brain import StoreError
from omega_brain.patterns import PatternState, normalize
from omega_brain.store import SCHEMA_VERSION, STATE_KEYS, CatalogCodes, PatternRow, Store

KEY = bytes(range(32))
DEVICE = "tv-7"
TABLES = (
    "meta",
    "sync_state",
    "events",
    "history",
    "patterns",
    "acked_patterns",
    "pending_views",
    "catalog_chunks",
    "global_patterns",
    "trending",
    "model",
)
SEALED = "<sealed>"
ADDED_STATE_KEYS = (("syncs_redirected", 0),)
"""``sync_state`` rows added after the fixtures were taken, with their defaults."""


def _write_personal(store: Store) -> None:
    with store.transaction():
        store.insert_event("movie-1", 1000, 0.9, 3600.0, 3, 1, 1)
        store.insert_event("movie-2", 2000, 0.2, 60.0, 3, 2, 2)
        store.insert_event("movie-1", 3000, 0.5, 1800.0, 5, 3, 3, keep=2)
        embedding = np.zeros(384, np.float32)
        embedding[:3] = (0.6, 0.8, 0.0)
        store.upsert_pattern(PatternRow(3, "pat-3", PatternState(None, 0, 2, 1), 1000, 2000, 2, 0))
        store.upsert_pattern(
            PatternRow(5, "pat-5", PatternState(embedding, 1, 0, 0), 3000, 3000, 3, 3)
        )
        store.add_view("movie-1", 2)
        store.add_view("movie-2")
        store.subtract_views({"movie-2": 1})
        store.mark_acked([("pat-3", 3)], 2)
        store.set_unconfirmed_send('{"request":1}')
        store.set_state({"local_version": 3, "syncs_ok": 1})


def _write_public(store: Store) -> None:
    with store.transaction():
        store.replace_trending([("movie-9", 2.5), ("movie-8", 1.0)])
        factors = [np.array([0.5, -1.0, 0.25, 0.0], np.float32), np.arange(1, 5, dtype=np.float32)]
        store.apply_model_rows(
            [("movie-1", factors[0], 1), ("movie-2", factors[1], 1)], replace=True, factors=4
        )
        store.set_state({"model_version": 1, "model_factors": 4})
        x = np.zeros((3, 384), np.float32)
        x[0, 0] = 1.0
        x[1, 1] = 1.0
        x[2, :2] = (0.6, 0.8)
        store.replace_catalog(
            ["movie-1", "", "movie-3"],
            ["One", "Dead", "Three"],
            [["Drama"], [], ["Comedy", "Drama"]],
            CatalogCodes.quantize(normalize(x)),
        )


def _layout(conn: sqlite3.Connection) -> str:
    rows = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name")
    return "\n".join(
        f"{t} {n}" + (f" ON {tb}" if tb != n else "") + (f": {sql}" if sql else "")
        for t, n, tb, sql in rows
    )


def _rows(path: Path) -> dict[str, list[tuple[object, ...]]]:
    conn = sqlite3.connect(path)
    try:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in TABLES}
    finally:
        conn.close()


def _current(rows: dict[str, list[tuple[object, ...]]]) -> dict[str, list[tuple[object, ...]]]:
    """The fixture's rows as a store of today writes them: plus `ADDED_STATE_KEYS`."""
    return {**rows, "sync_state": sorted([*rows["sync_state"], *ADDED_STATE_KEYS])}


def _mask_sealed(rows: dict[str, list[tuple[object, ...]]]) -> dict[str, list[tuple[object, ...]]]:
    """Sealed values (random nonces) replaced by their length; every other value kept."""

    def mask(table: str, row: tuple[object, ...]) -> tuple[object, ...]:
        if table == "meta" and row[0] == "key_check":
            return (row[0], (SEALED, len(str(row[1]))))
        return tuple((SEALED, len(v)) if isinstance(v, bytes) else v for v in row)

    return {table: [mask(table, r) for r in table_rows] for table, table_rows in rows.items()}


def _restore(path: Path, rows: dict[str, list[tuple[object, ...]]]) -> Path:
    """Write a schema 4 file holding ``rows`` (a store as the single-module code left it)."""
    conn = sqlite3.connect(path)
    try:
        for part in LAYOUT.split("CREATE TABLE ")[1:]:
            conn.execute("CREATE TABLE " + part[: part.rindex(")") + 1])
        for table, table_rows in rows.items():
            for row in table_rows:
                marks = ", ".join("?" * len(row))
                conn.execute(f"INSERT INTO {table} VALUES ({marks})", row)
        conn.execute("PRAGMA user_version = 4")
        conn.commit()
    finally:
        conn.close()
    return path


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
def test_new_store_has_the_schema_4_layout(tmp_path: Path, key: bytes | None) -> None:
    path = tmp_path / "brain.db"
    Store(path, DEVICE, encryption_key=key).close()
    conn = sqlite3.connect(path)
    try:
        assert _layout(conn) == LAYOUT.rstrip("\n")
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        state = dict(conn.execute("SELECT key, value FROM sync_state").fetchall())
        meta = {k for (k,) in conn.execute("SELECT key FROM meta")}
    finally:
        conn.close()
    assert state == {k: -1 if k == "model_update_version" else 0 for k in STATE_KEYS}
    assert meta == ({"device_id"} if key is None else {"device_id", "encryption", "key_check"})


def test_plain_rows_are_written_byte_for_byte_as_before(tmp_path: Path) -> None:
    path = tmp_path / "brain.db"
    store = Store(path, DEVICE)
    _write_personal(store)
    _write_public(store)
    store.close()
    assert _rows(path) == _current(ROWS_PLAIN)


def test_encrypted_rows_match_as_before_but_for_the_nonces(tmp_path: Path) -> None:
    path = tmp_path / "brain.db"
    store = Store(path, DEVICE, encryption_key=KEY)
    _write_personal(store)
    store.close()
    rows = _rows(path)
    assert _mask_sealed(rows) == _mask_sealed(_current(ROWS_ENCRYPTED))
    assert rows["history"][0][0] == ROWS_ENCRYPTED["history"][0][0]  # the same HMAC tokens
    assert rows["events"][0][-1] != ROWS_ENCRYPTED["events"][0][-1]  # a fresh nonce


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
def test_store_written_before_the_split_opens_and_reads_the_same(
    tmp_path: Path, key: bytes | None
) -> None:
    path = _restore(tmp_path / "old.db", ROWS_PLAIN if key is None else ROWS_ENCRYPTED)
    store = Store(path, DEVICE, encryption_key=key)
    try:
        state = store.state()
        assert (state["local_version"], state["syncs_ok"]) == (3, 1)
        assert all(state[k] == v for k, v in ADDED_STATE_KEYS)  # read as their defaults
        patterns = store.patterns()
        assert sorted(patterns) == [3, 5]
        p3, p5 = patterns[3], patterns[5]
        assert (p3.pattern_id, p3.created_at_ms, p3.updated_at_ms) == ("pat-3", 1000, 2000)
        assert (p3.changed_version, p3.embedding_version) == (2, 0)
        assert p3.state == PatternState(None, successes=0, failures=2, neutral=1)
        assert (p5.pattern_id, p5.state.successes, p5.state.sample_count) == ("pat-5", 1, 1)
        assert p5.state.embedding is not None
        np.testing.assert_allclose(p5.state.embedding[:3], [0.6, 0.8, 0.0], atol=1e-7)
        assert store.acked() == {"pat-3": 3}
        assert store.pending_views() == {"movie-1": 2}
        history = sorted((h.content_id, h.bucket, h.views, h.successes) for h in store.history())
        assert history == [("movie-1", 3, 1, 1), ("movie-1", 5, 1, 0), ("movie-2", 3, 1, 0)]
        assert store.viewings() == [("movie-2", 0.2, 3), ("movie-1", 0.5, 5)]
        assert store.event_count() == 2
        assert store.unconfirmed_send() == '{"request":1}'
        with store.transaction():  # rows keyed as before: the new event joins the old row
            row = store.insert_event("movie-1", 4000, 0.95, 3000.0, 3, 1, 4)
            store.add_view("movie-1")
        assert (row.views, row.successes, row.best_completion) == (2, 2, 0.95)
        assert store.pending_views() == {"movie-1": 3}
        if key is None:
            assert store.trending() == [("movie-9", 2.5), ("movie-8", 1.0)]
            model = store.model()
            assert (model.version, model.factors, model.content_ids) == (
                1,
                4,
                ("movie-1", "movie-2"),
            )
            np.testing.assert_allclose(model.rows[1], [1, 2, 3, 4], rtol=0.01)
            slots = store.catalog_slots()
            assert slots is not None
            assert slots.content_ids == ["movie-1", "", "movie-3"]
            assert slots.genres == [["Drama"], [], ["Comedy", "Drama"]]
            assert slots.digest == ROWS_PLAIN["meta"][0][1]
            assert store.catalog_codes().vectors()[2, :2] == pytest.approx([0.6, 0.8], abs=0.01)
    finally:
        store.close()
    # Opening added the later state keys with their defaults; nothing else changed.
    assert (
        _rows(path)["sync_state"]
        == _current(ROWS_PLAIN if key is None else ROWS_ENCRYPTED)["sync_state"]
    )


def test_encrypted_store_written_before_the_split_still_checks_its_key(tmp_path: Path) -> None:
    path = _restore(tmp_path / "old.db", ROWS_ENCRYPTED)
    with pytest.raises(StoreError, match="wrong encryption key"):
        Store(path, DEVICE, encryption_key=bytes(range(1, 33)))
    with pytest.raises(StoreError, match="an encryption key is required"):
        Store(path, DEVICE)


# --------------------------------------------------------------------------------- fixtures

LAYOUT = """\
index sqlite_autoindex_acked_patterns_1 ON acked_patterns
index sqlite_autoindex_global_patterns_1 ON global_patterns
index sqlite_autoindex_history_1 ON history
index sqlite_autoindex_meta_1 ON meta
index sqlite_autoindex_patterns_1 ON patterns
index sqlite_autoindex_pending_views_1 ON pending_views
index sqlite_autoindex_sync_state_1 ON sync_state
index sqlite_autoindex_trending_1 ON trending
table acked_patterns: CREATE TABLE acked_patterns (
    pattern_id TEXT PRIMARY KEY,
    sample_count INTEGER NOT NULL,
    acked_version INTEGER NOT NULL
)
table catalog_chunks: CREATE TABLE catalog_chunks (
    chunk INTEGER PRIMARY KEY,
    meta BLOB NOT NULL,
    codes BLOB NOT NULL,
    scales BLOB NOT NULL,
    sha BLOB NOT NULL
)
table events: CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    content_id TEXT NOT NULL,
    started_at_ms INTEGER NOT NULL,
    completion REAL NOT NULL,
    watch_seconds REAL NOT NULL,
    bucket INTEGER NOT NULL,
    outcome INTEGER NOT NULL,
    local_version INTEGER NOT NULL,
    sealed BLOB
)
table global_patterns: CREATE TABLE global_patterns (
    pattern_key TEXT PRIMARY KEY,
    bucket INTEGER NOT NULL,
    embedding BLOB NOT NULL,
    quality REAL NOT NULL,
    success_rate REAL NOT NULL,
    source_count INTEGER NOT NULL,
    round INTEGER NOT NULL
)
table history: CREATE TABLE history (
    content_id TEXT NOT NULL,
    bucket INTEGER NOT NULL,
    views INTEGER NOT NULL,
    successes INTEGER NOT NULL,
    best_completion REAL NOT NULL,
    sealed BLOB,
    PRIMARY KEY (content_id, bucket)
)
table meta: CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)
table model: CREATE TABLE model (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    content_ids TEXT NOT NULL,
    codes BLOB NOT NULL,
    scales BLOB NOT NULL
)
table patterns: CREATE TABLE patterns (
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
)
table pending_views: CREATE TABLE pending_views (
    content_id TEXT PRIMARY KEY,
    views INTEGER NOT NULL,
    sealed BLOB
)
table sync_state: CREATE TABLE sync_state (key TEXT PRIMARY KEY, value INTEGER NOT NULL)
table trending: CREATE TABLE trending (content_id TEXT PRIMARY KEY, score REAL NOT NULL)
"""
"""``sqlite_master`` of a new store (plain or encrypted), as schema 4 wrote it."""


ROWS_PLAIN: dict[str, list[tuple[object, ...]]] = {
    "meta": [
        (
            "catalog_digest",
            "3005329fdc6234dbd469de4d6a8c6d0972bb63a21dca4e707344e455ca7d2ad4",
        ),
        (
            "device_id",
            "tv-7",
        ),
        (
            "unconfirmed_send",
            '{"request":1}',
        ),
    ],
    "sync_state": [
        (
            "acked_version",
            0,
        ),
        (
            "catalog_version",
            0,
        ),
        (
            "global_page_offset",
            0,
        ),
        (
            "global_page_version",
            0,
        ),
        (
            "global_version",
            0,
        ),
        (
            "local_version",
            3,
        ),
        (
            "model_bytes_down",
            0,
        ),
        (
            "model_factors",
            4,
        ),
        (
            "model_update_items",
            0,
        ),
        (
            "model_update_version",
            -1,
        ),
        (
            "model_version",
            1,
        ),
        (
            "next_sync_at_ms",
            0,
        ),
        (
            "server_version_known",
            0,
        ),
        (
            "syncs_failed",
            0,
        ),
        (
            "syncs_ok",
            1,
        ),
    ],
    "events": [
        (
            2,
            "movie-2",
            2000,
            0.2,
            60.0,
            3,
            2,
            2,
            None,
        ),
        (
            3,
            "movie-1",
            3000,
            0.5,
            1800.0,
            5,
            3,
            3,
            None,
        ),
    ],
    "history": [
        (
            "movie-1",
            3,
            1,
            1,
            0.9,
            None,
        ),
        (
            "movie-1",
            5,
            1,
            0,
            0.5,
            None,
        ),
        (
            "movie-2",
            3,
            1,
            0,
            0.2,
            None,
        ),
    ],
    "patterns": [
        (
            3,
            "pat-3",
            None,
            0,
            2,
            1,
            3,
            1000,
            2000,
            2,
            0,
            None,
        ),
        (
            5,
            "pat-5",
            bytes.fromhex(
                "9a99193fcdcc4c3f0000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000000000000000000000000000000000000000000000000000"
                "00000000000000000000000000000000"
            ),
            1,
            0,
            0,
            1,
            3000,
            3000,
            3,
            3,
            None,
        ),
    ],
    "acked_patterns": [
        (
            "pat-3",
            3,
            2,
        ),
    ],
    "pending_views": [
        (
            "movie-1",
            2,
            None,
        ),
    ],
    "catalog_chunks": [
        (
            0,
            bytes.fromhex(
                "28b52ffd20536d0200c4035b5b226d6f7669652d31222c22222c33225d2c5b224f6e65222c224465"
                "6164222c2254687265655b224472616d61436f6d65647972616d61225d5d5d05004b452115c0250c"
                "3ac308d9ac03"
            ),
            bytes.fromhex("28b52ffd6080038d0000287f007f005f03042c7c834be801cc07b0"),
            bytes.fromhex("0402013c0402013ca069ce3b"),
            bytes.fromhex("573b173e58815ec80e423c2b85cee7a3e31acedc4d173cb6025f2c062bcb15c5"),
        ),
    ],
    "global_patterns": [],
    "trending": [
        (
            "movie-8",
            1.0,
        ),
        (
            "movie-9",
            2.5,
        ),
    ],
    "model": [
        (
            1,
            "movie-1\nmovie-2",
            bytes.fromhex("4081200020405f7f"),
            bytes.fromhex("0402013c0402013d"),
        ),
    ],
}


ROWS_ENCRYPTED: dict[str, list[tuple[object, ...]]] = {
    "meta": [
        (
            "device_id",
            "tv-7",
        ),
        (
            "encryption",
            "aes-256-gcm",
        ),
        (
            "key_check",
            "d712522a50eabb1a7fc659a3276de0c65bde3d797d2168f0cf8ecbbd16b766c5ed6215802ca9acf289d760b1ceb44f2e0441abe1",
        ),
        (
            "unconfirmed_send",
            bytes.fromhex(
                "d1a2a9927e8d06ac603bbc4c380270f4ce783f67a027942ba70ed0bce678f5e186a885577487c85e52"
            ),
        ),
    ],
    "sync_state": [
        (
            "acked_version",
            0,
        ),
        (
            "catalog_version",
            0,
        ),
        (
            "global_page_offset",
            0,
        ),
        (
            "global_page_version",
            0,
        ),
        (
            "global_version",
            0,
        ),
        (
            "local_version",
            3,
        ),
        (
            "model_bytes_down",
            0,
        ),
        (
            "model_factors",
            0,
        ),
        (
            "model_update_items",
            0,
        ),
        (
            "model_update_version",
            -1,
        ),
        (
            "model_version",
            0,
        ),
        (
            "next_sync_at_ms",
            0,
        ),
        (
            "server_version_known",
            0,
        ),
        (
            "syncs_failed",
            0,
        ),
        (
            "syncs_ok",
            1,
        ),
    ],
    "events": [
        (
            2,
            "",
            0,
            0.0,
            0.0,
            0,
            0,
            2,
            bytes.fromhex(
                "1f7a80126e824f4be24b482aab8f7d8166aeb89cf69459b71495e376f04df938c3b93c9466b77dca"
                "025bdc69b185aad45b6ecfb2e7dcf8ffe1"
            ),
        ),
        (
            3,
            "",
            0,
            0.0,
            0.0,
            0,
            0,
            3,
            bytes.fromhex(
                "615d1dc51b52ad092a2e1d986f40b0b3fa065119e20ae41bfb45e529b6a7312b9ea47ccd03f9e6c9"
                "7756bd7fa1ce24b75734832e1ace798a3f5f64"
            ),
        ),
    ],
    "history": [
        (
            "~398225542856e193859ed4ccb3490b9180a18019eee83d2566e9a2bd13125bb6",
            0,
            0,
            0,
            0.0,
            bytes.fromhex(
                "67774839d7ce68a7d7419280e7c7c4b29c866ac10ad6c3d6f0a50417ae09ef4068217356aa927b45"
                "a5c2d579a997d0a2b7"
            ),
        ),
        (
            "~453973c9e457a1d9065cdb549936217c75f971259a3e91a30b1412f61b844383",
            0,
            0,
            0,
            0.0,
            bytes.fromhex(
                "fec3fd1b0a2fa9576527fd7af530fa7cc745d8de361acaaa0d4df29ef9da0f969011ff05c50ae0b7"
                "42187ea81a9022ce34"
            ),
        ),
        (
            "~d82b0a57d5dea028ba20f75a329f82615d2d96953989666771a5451dc757c09d",
            0,
            0,
            0,
            0.0,
            bytes.fromhex(
                "80a8c2ea2afb28627a78218cb269d7ad57956e992f2262e62225d2670ae22034647b318ed258f265"
                "69d4997a5d478c723d"
            ),
        ),
    ],
    "patterns": [
        (
            3,
            "pat-3",
            None,
            0,
            0,
            0,
            0,
            0,
            0,
            2,
            0,
            bytes.fromhex(
                "1cf2d7d072265550977bb60122ff5e6d153b38d32bd30e2a8820f21dda86d01a6c00e6e17532ad0b"
                "9c9521ac474bbe1cf07a96d00a2593f44f2f254af3d6eb3b8565ecf0"
            ),
        ),
        (
            5,
            "pat-5",
            None,
            0,
            0,
            0,
            0,
            0,
            0,
            3,
            3,
            bytes.fromhex(
                "af00a177b38a159a03c2cb7c0e1119f91e5fbeb73d286d3f74506760b28291714dee968d4b28485f"
                "859008a1a17d40945b1f36f4611cad32b3c8f9460fbbb42f0b4402016a617d9f6e61a5842e7e4666"
                "7caab534861aef68582781ffdd2797c06c648cc3bfc6274313803817728d348b662d168f7dc115e6"
                "2b088895ced8d1fcd5b236095aa84ff05559143e0125149105c51a72a0e32a5cd751a28bcb1f5582"
                "8a9b3176fac2116a82cb01a259a8c119441a1f550bcc0d476b9a64b6dec83fc3b3bf422e67e1e20b"
                "70e2bcc0a64a57f5787ff7f3923142a9054702064a6b085e1f7f63fcf4be14079f5a2a7a90506763"
                "ab551e387f782d4f51ba1e2117d6a8f4183b3c0cb9bbf29ac5c4d24306a363121ffec93c939b354e"
                "38401ba52d1dfb2702b0f29a42799bdf6f3566cf1a9e561981bb3c43631c12ed7b3f0572483a582e"
                "00611fcf410ef4c3a972665ef53249257ac3f4877b0da8c1fdd7a08cdc6fa3cc09714049a0c26ef3"
                "a18bf0505c0ba6d72b77a9ec2d72a5962e5ca24cfe4230aa8f4e0e5fa0727ada810fd3074fd39de0"
                "ef1c7ff82132eebc5205cb3055166cffee24c77039a90206aa25e14d41a5dbaecaad4bcca6f82b90"
                "99b488baa09d7bdd95d803f7d1848b07b757da6bc016f9ccc7baff4f3cdd7e7eafeb193fdb1f3e27"
                "7374b1a3ce5050a1190ccc3134e285e7d08ce72a7ce3298dceca700a27f86ea211e38b7ad39888b5"
                "ce306ba200417e3fe8635b762c045f23e108874055f7bbf8e3f67a299007f0528afffb0de5b3899c"
                "4682d4cdd559dbf8e0f32526ed015b6f04c69ad92a6e3b3b834290d20412c5376407f97b5a89fd02"
                "797d35cd9c0adc128ffd42d6e18292cc1d783a4c1e2eb225a6866982dcb0b1dcc025b848e4d499aa"
                "ca14a6acaedadd8d84364e05eb373fda013d3471be62aceae75fae23ba66f5445d3b0b9c988b524a"
                "9fd8a482adaf2cf5567d56e30a75894d81a218f39b650119e89554c68600e0982eaf3ba1aacaa610"
                "f6754e9f7d495a299fba3047b4939957d287c41fe42bcb67bd1a78e420eeb5c89722f2f113614b0d"
                "1aaeccab431a20b88d6ffa0637fe9ab0e1d0be89114a878d948d8a778719b499f3dd96af4bc9c9e7"
                "492791346b9ea4cf7314e031e8b6e86ae8a932d0555ed6e2cce602f9f6fb5b96533f3db276387f83"
                "dd76b6a0cebaaa9ae9d06c6ac0e1b1ff8c1877c0737c570a4fee342ca53500136fcc05402be65175"
                "3450e309ed3a7f19d21322ff07f3cb23f1bc334afc70b0bc8d534fc8f3b7fcc29fc7dbebf1f908a7"
                "2bdc5308888fac403a7d25bf471d8144808d4f02bd0fcb2a5f532c1d77360cdfa9ac4875f095afc9"
                "9eb1f6c1ee7aebb8359e1cc2e129a17ff5c412449484bfc2f0a2cbc0472588186266ba8e9ecb58b6"
                "3d9b701ebce577afc2f764eb0d468ffb975d49fbcfde709ad82b4db687fc865653391c0e0c492ebd"
                "155053c32fee70f0f358d04ab6bced23b6a07a30692c05c8785c7247cf686d4d638fadcb79838529"
                "beb6c68b80556c2b92d50093a46c97b8483dbfc80034090254fa2724bd18a2d57bafb9b7c62abc89"
                "1d42165db58a0ce263ad8662c1f1906e43ef0ee1e7f88a1630b8a21ae1f58ce3f414fe2871fa0ff7"
                "c80c74b02f1270c6768a7323d1232f1c04575df79eb183c352389575029d3fb3d7411851fb1e4d12"
                "64c6adf14050afad1a316181d2d8b71b491f346bd9b804ca3d3ececbb4f9512e865a09d738a5f039"
                "174976f899a7ed7003777efbdf7f173826698bc050058188ef4fb522aea85d7179e0f8eddea05895"
                "a5e9441d548c0b23b25a5b8c501305ceee72f71da4c86c9faa92fbe0beb96736d908d657b8943bf5"
                "33e6720375e9a38cb99b169b706850e58b489996332ec3d84f226bfdb9a2099b77e23246d2516262"
                "7d48e341ee9f3416a82f7c22e18564defc44cb1e526b3226520e3d55c7afe134fe06b30c8a20bd39"
                "ab345c8cae5b930c36fea6918616d4dcc7eeca9ddb3fdf919b8388e8a3a245644d9dcdcf3ed5a9f2"
                "291f63b74ed2bf8b5a19033bbfed7593ec1e472182da0234718fa92ccb908156addfc48522c643fa"
                "39781b201a578c944057626de5ab3462a929addedf12f27d9a4db5a87ce066d0f498cad73cccac9e"
                "e9c5eef683f39eff34744b0dc3d52c8eca6b227b0a6bbd874b4d5b16360a86662d52dd8c71986748"
                "8f17bac734faf11d1b1cdaf56d534e2d3828f68458720bdbaf9c982619823b808e64166b6084ce32"
                "213571cc"
            ),
        ),
    ],
    "acked_patterns": [
        (
            "pat-3",
            3,
            2,
        ),
    ],
    "pending_views": [
        (
            "~00daef64eaa44c3023fcb0d241b8e1faf0fd31e8fe0fe2ca0e6ed3e211b5d465",
            1,
            bytes.fromhex(
                "c888e9eb1f934a5322497b02cf479c536e04ae2d065b13fe672430ff7f2d2b62719dca3f32d4824713"
            ),
        ),
    ],
    "catalog_chunks": [],
    "global_patterns": [],
    "trending": [],
    "model": [],
}
