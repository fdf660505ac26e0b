"""Encryption at rest of the personal data (`BrainConfig.encryption_key`, AES-256-GCM)."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from omega_brain import Brain, BrainConfig, CatalogIndex, StoreError, ViewingEvent
from omega_brain.facade import JsonBrain
from omega_brain.patterns import normalize
from omega_brain.store import Store

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
TS = 1_700_000_000_000
SECRET = "secret-show-4711"


@pytest.fixture(scope="module")
def catalog() -> CatalogIndex:
    rng = np.random.default_rng(3)
    ids = [f"secret-show-{4700 + i}" for i in range(60)]
    return CatalogIndex(ids, normalize(rng.standard_normal((60, 384)).astype(np.float32)))


def _config(path: Path, key: bytes | None = KEY) -> BrainConfig:
    return BrainConfig(store_path=path, encryption_key=key, max_events_kept=3)


def _watch(brain: Brain) -> None:
    for n, cid in enumerate([SECRET, "secret-show-4712", SECRET, "secret-show-4720"] * 2):
        brain.observe(ViewingEvent(cid, TS + n * 60_000, (0.95, 0.5, 0.1)[n % 3], 600.0))


def _raw_bytes(path: Path) -> bytes:
    data = b""
    for suffix in ("", "-wal"):
        file = Path(str(path) + suffix)
        if file.exists():
            data += file.read_bytes()
    return data


def test_round_trip(tmp_path: Path, catalog: CatalogIndex) -> None:
    path = tmp_path / "brain.db"
    with Brain("tv", _config(path), catalog=catalog) as brain:
        _watch(brain)
        before = brain.recommend(10, timestamp_ms=TS)
        stats = brain.stats()
        brain._ctx.store.set_unconfirmed_send('{"local_version": 8}')
    with Brain("tv", _config(path), catalog=catalog) as reopened:
        assert reopened.recommend(10, timestamp_ms=TS) == before
        again = reopened.stats()
        assert (again.watched_count, again.pattern_count, again.pending_view_count) == (
            stats.watched_count,
            stats.pattern_count,
            stats.pending_view_count,
        )
        store = reopened._ctx.store
        assert store.pending_views() == {SECRET: 4, "secret-show-4712": 2, "secret-show-4720": 2}
        assert store.unconfirmed_send() == '{"local_version": 8}'
        assert [c for c, _, _ in store.viewings()] == [
            "secret-show-4712",
            SECRET,
            "secret-show-4720",
        ]
        with store.transaction():
            store.subtract_views({SECRET: 4, "secret-show-4712": 1})
        assert store.pending_views() == {"secret-show-4712": 1, "secret-show-4720": 2}
        assert {r.content_id for r in store.history()} == {
            SECRET,
            "secret-show-4712",
            "secret-show-4720",
        }


def test_no_plaintext_content_id_on_disk(tmp_path: Path, catalog: CatalogIndex) -> None:
    plain_path = tmp_path / "plain.db"
    with Brain("tv", _config(plain_path, None), catalog=catalog) as brain:
        _watch(brain)
        assert SECRET.encode() in _raw_bytes(plain_path)  # the check can see it
    path = tmp_path / "sealed.db"
    with Brain("tv", _config(path), catalog=catalog) as brain:
        # Only personal data on disk: a shared catalog is not persisted in the store.
        _watch(brain)
        brain._ctx.store.set_unconfirmed_send(json.dumps({"views": {SECRET: 2}}))
        assert Path(str(path) + "-wal").exists()
        on_disk = _raw_bytes(path)
        assert SECRET.encode() not in on_disk and b"secret-show" not in on_disk
        assert KEY not in on_disk and KEY.hex().encode() not in on_disk
    assert b"secret-show" not in _raw_bytes(path)


def test_wrong_or_missing_key_is_refused(tmp_path: Path, catalog: CatalogIndex) -> None:
    path = tmp_path / "brain.db"
    with Brain("tv", _config(path), catalog=catalog) as brain:
        _watch(brain)
    with pytest.raises(StoreError, match="wrong encryption key"):
        Brain("tv", _config(path, OTHER_KEY), catalog=catalog)
    with pytest.raises(StoreError, match="encrypted; an encryption key is required"):
        Brain("tv", _config(path, None), catalog=catalog)
    with Brain("tv", _config(path), catalog=catalog) as brain:  # still opens with its key
        assert brain.stats().watched_count == 3


def test_plain_store_is_not_opened_with_a_key(tmp_path: Path, catalog: CatalogIndex) -> None:
    path = tmp_path / "brain.db"
    with Brain("tv", _config(path, None), catalog=catalog) as brain:
        _watch(brain)
    with pytest.raises(StoreError, match="not encrypted"):
        Brain("tv", _config(path), catalog=catalog)
    with Brain("tv", _config(path, None), catalog=catalog) as brain:  # unchanged
        assert brain.stats().watched_count == 3


@pytest.mark.parametrize("table", ["events", "history", "patterns", "pending_views"])
def test_tampered_ciphertext_is_a_store_error(
    tmp_path: Path, catalog: CatalogIndex, table: str
) -> None:
    path = tmp_path / "brain.db"
    with Brain("tv", _config(path), catalog=catalog) as brain:
        _watch(brain)
    with sqlite3.connect(path) as conn:
        rowid, blob = conn.execute(f"SELECT rowid, sealed FROM {table} LIMIT 1").fetchone()
        flipped = bytearray(blob)
        flipped[-1] ^= 1
        conn.execute(f"UPDATE {table} SET sealed = ? WHERE rowid = ?", (bytes(flipped), rowid))
    conn.close()
    store = Store(path, "tv", encryption_key=KEY)
    try:
        with pytest.raises(StoreError, match="does not decrypt"):
            {
                "events": store.viewings,
                "history": store.history,
                "patterns": store.patterns,
                "pending_views": store.pending_views,
            }[table]()
    finally:
        store.close()
    if table in ("history", "patterns"):  # read when the brain opens
        with pytest.raises(StoreError):
            Brain("tv", _config(path), catalog=catalog).close()


def test_a_value_moved_to_another_row_does_not_decrypt(
    tmp_path: Path, catalog: CatalogIndex
) -> None:
    """The row identity is the associated data: swapping two valid ciphertexts is caught."""
    path = tmp_path / "brain.db"
    with Brain("tv", _config(path), catalog=catalog) as brain:
        _watch(brain)
    with sqlite3.connect(path) as conn:
        (a, blob_a), (b, blob_b) = conn.execute(
            "SELECT rowid, sealed FROM history LIMIT 2"
        ).fetchall()
        conn.execute("UPDATE history SET sealed = ? WHERE rowid = ?", (blob_b, a))
        conn.execute("UPDATE history SET sealed = ? WHERE rowid = ?", (blob_a, b))
    conn.close()
    with pytest.raises(StoreError, match="does not decrypt"):
        Brain("tv", _config(path), catalog=catalog)


def test_key_is_never_shown(tmp_path: Path, catalog: CatalogIndex) -> None:
    config = _config(tmp_path / "brain.db")
    assert "encryption_key" not in repr(config)
    assert KEY.hex() not in repr(config) and repr(KEY) not in repr(config)
    with Brain("tv", config, catalog=catalog) as brain:
        stats = dataclasses.asdict(brain.stats())
        assert KEY.hex() not in repr(stats) and repr(KEY) not in repr(stats)
        assert KEY.hex() not in repr(brain._ctx.store._sealer)
    with pytest.raises(ValueError) as excinfo:
        BrainConfig(encryption_key=KEY[:31])
    assert repr(KEY[:31]) not in str(excinfo.value) and "31" in str(excinfo.value)


def test_facade_takes_the_key_as_hex(tmp_path: Path, catalog: CatalogIndex) -> None:
    facade = JsonBrain(catalog=catalog)
    path = str(tmp_path / "brain.db")

    def init(key: object) -> dict[str, object]:
        request = {"op": "init", "device_id": "tv", "store_path": path}
        if key is not None:
            request["config"] = {"encryption_key": key}
        return dict(json.loads(facade.handle(json.dumps(request))))

    assert init(KEY.hex())["ok"] is True
    observe = {"op": "observe", "content_id": SECRET, "started_at_ms": TS, "completion": 0.9}
    assert json.loads(facade.handle(json.dumps(observe)))["ok"] is True
    facade.handle(json.dumps({"op": "shutdown"}))
    bad = init("zz" * 32)
    assert bad["ok"] is False and bad["error"]["code"] == 1  # type: ignore[index]
    assert "zz" * 32 not in json.dumps(bad)
    wrong = init(OTHER_KEY.hex())
    assert wrong["ok"] is False and wrong["error"]["code"] == 7  # type: ignore[index]
    assert OTHER_KEY.hex() not in json.dumps(wrong)
    missing = init(None)
    assert missing["ok"] is False and missing["error"]["code"] == 7  # type: ignore[index]
    assert init(KEY.hex())["ok"] is True
    facade.handle(json.dumps({"op": "shutdown"}))
    assert b"secret-show" not in _raw_bytes(Path(path))
    assert os.path.exists(path)
