"""The catalog index persisted beside the store: reopened without a rebuild, updated in place,
and rebuilt (never trusted, never a crash) when the file is missing, stale or damaged."""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import numpy.typing as npt
import pytest

import omega_brain.catalog_keeper as keeper_module
from omega_brain import Brain, BrainConfig, CatalogIndex
from omega_brain.catalog_keeper import REBUILD_DEAD_FRACTION, CatalogKeeper
from omega_brain.index_file import IndexHeader, read_index_file
from omega_brain.store import CatalogCodes, Store
from tests.unit.test_brain_sync import FakeShard

FloatArray = npt.NDArray[np.float32]


def make_catalog(n: int, seed: int = 0) -> tuple[list[str], FloatArray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((8, 384)).astype(np.float32)
    x = centers[np.arange(n) % 8] + 0.7 * rng.standard_normal((n, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return [f"item-{i}" for i in range(n)], x


def unit(x: FloatArray) -> FloatArray:
    out: FloatArray = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    return out


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """HNSW builds are deterministic on one thread only (faiss adds in parallel otherwise)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(params=["hnsw", "flat"])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> BrainConfig:
    # exact_search_max_items=0 gives small catalogs the HNSW SQ8 index large ones get.
    exact_max = 0 if request.param == "hnsw" else 5000
    return BrainConfig(
        store_path=tmp_path / "tv.db",
        exact_search_max_items=exact_max,
        hnsw_m=8,
        hnsw_ef_construction=40,
        ef_search=64,
        base_backoff_seconds=0.0,
    )


def index_file(config: BrainConfig) -> Path:
    return Path(str(config.store_path) + ".faiss")


def keeper(brain: Brain) -> CatalogKeeper:
    return brain._keeper


def results(catalog: CatalogIndex | None, queries: FloatArray, k: int = 10) -> list[list[str]]:
    assert catalog is not None
    ids, _ = catalog.search_batch(queries, k)
    return ids


def forbid_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> faiss.Index:
        raise AssertionError("the index was rebuilt")

    monkeypatch.setattr(keeper_module, "build_faiss_index", refuse)


def test_reopen_maps_the_index_file_and_never_builds(
    config: BrainConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, x = make_catalog(400)
    queries = unit(x[:20] + 0.3 * x[20:40])
    with Brain("tv-1", config) as brain:
        brain.load_catalog(ids, x, titles=[f"T{i}" for i in range(400)])
        assert keeper(brain).counters.full_builds == 1
        before = results(brain.catalog, queries)
        vectors = brain.catalog.vectors(np.arange(400)) if brain.catalog else None
    assert index_file(config).is_file()

    forbid_builds(monkeypatch)
    with Brain("tv-1", config) as again:
        counters = keeper(again).counters
        assert (counters.file_loads, counters.full_builds) == (1, 0)
        catalog = again.catalog
        assert catalog is not None and len(catalog) == 400
        assert catalog.parts().source == index_file(config)  # served from the mapped file
        assert results(catalog, queries) == before
        np.testing.assert_array_equal(catalog.vectors(np.arange(400)), vectors)
        assert catalog.title_of("item-7") == "T7"


def damage_missing(path: Path, stale: Path) -> None:
    path.unlink()


def damage_truncated(path: Path, stale: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def damage_truncated_tail(path: Path, stale: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-3])


def damage_flipped_byte(path: Path, stale: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x40
    path.write_bytes(bytes(data))


def damage_empty(path: Path, stale: Path) -> None:
    path.write_bytes(b"")


def damage_garbage(path: Path, stale: Path) -> None:
    path.write_bytes(os.urandom(50_000))


def damage_stale(path: Path, stale: Path) -> None:
    shutil.copyfile(stale, path)  # a valid index file, of the catalog before the last change


@pytest.mark.parametrize(
    "damage",
    [
        damage_missing,
        damage_truncated,
        damage_truncated_tail,
        damage_flipped_byte,
        damage_empty,
        damage_garbage,
        damage_stale,
    ],
)
def test_bad_index_file_is_rebuilt_with_identical_results(
    config: BrainConfig, damage: object, tmp_path: Path
) -> None:
    ids, x = make_catalog(300)
    _, before = make_catalog(300, seed=1)
    stale = tmp_path / "stale.faiss"
    queries = unit(x[:25] + 0.5 * x[100:125])
    with Brain("tv-1", config) as brain:
        brain.load_catalog(ids, before)
        shutil.copyfile(index_file(config), stale)
        brain.load_catalog(ids, x)  # every embedding changes: a fresh build
        assert keeper(brain).counters.full_builds == 2
    with Brain("tv-1", config) as clean:  # the intact file
        assert keeper(clean).counters.file_loads == 1
        expected = results(clean.catalog, queries)
        assert clean.catalog is not None
        expected_vectors = clean.catalog.vectors(np.arange(len(clean.catalog)))

    assert callable(damage)
    damage(index_file(config), stale)
    with Brain("tv-1", config) as rebuilt:
        counters = keeper(rebuilt).counters
        assert (counters.file_loads, counters.full_builds) == (0, 1)
        assert counters.last_rebuild_reason.startswith("index file")
        assert results(rebuilt.catalog, queries) == expected
        assert rebuilt.catalog is not None
        np.testing.assert_array_equal(
            rebuilt.catalog.vectors(np.arange(len(rebuilt.catalog))), expected_vectors
        )
    with Brain("tv-1", config) as healed:  # the rebuild rewrote the file
        assert keeper(healed).counters.file_loads == 1
        assert results(healed.catalog, queries) == expected


def test_rebuild_equals_a_fresh_build(config: BrainConfig, tmp_path: Path) -> None:
    ids, x = make_catalog(300)
    queries = unit(x[:30] + 0.4 * x[200:230])
    with Brain("tv-1", config) as brain:
        brain.load_catalog(ids, x)
        fresh = results(brain.catalog, queries)
    index_file(config).unlink()
    with Brain("tv-1", config) as rebuilt:
        assert results(rebuilt.catalog, queries) == fresh
    other = BrainConfig(**{**config.__dict__, "store_path": tmp_path / "other.db"})
    with Brain("tv-2", other) as second:  # the same catalog loaded on another store
        second.load_catalog(ids, x)
        assert results(second.catalog, queries) == fresh


def test_an_index_file_of_another_store_is_not_used(config: BrainConfig, tmp_path: Path) -> None:
    ids, x = make_catalog(200)
    other = BrainConfig(**{**config.__dict__, "store_path": tmp_path / "other.db"})
    with Brain("tv-2", other) as brain:
        brain.load_catalog(ids, unit(x + 0.2))
    with Brain("tv-1", config) as brain:
        brain.load_catalog(ids, x)
    shutil.copyfile(index_file(other), index_file(config))
    with Brain("tv-1", config) as brain:
        counters = keeper(brain).counters
        assert (counters.file_loads, counters.full_builds) == (0, 1)
        assert "stale" in counters.last_rebuild_reason
        assert brain.catalog is not None
        assert float(brain.catalog.embedding_of("item-3") @ x[3]) > 0.999


def test_incremental_load_catalog_adds_replaces_and_removes(
    config: BrainConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, x = make_catalog(300)
    with Brain("tv-1", config) as brain:
        brain.load_catalog(ids, x, titles=[f"T{i}" for i in range(300)])
        forbid_builds(monkeypatch)
        # Version 2: items 5-7 change, 10 and 11 leave, two new ones arrive, one new title.
        # New embeddings from the same model: mixtures of two catalog items.
        changed = unit(x[[200, 201, 202]] + x[[50, 61, 72]])
        new = unit(x[[250, 251]] + x[[33, 46]])
        keep = [i for i in range(300) if i not in (10, 11)]
        ids2 = [ids[i] for i in keep] + ["new-a", "new-b"]
        x2 = np.concatenate([x[keep], new])
        x2[5:8] = changed
        titles2 = [f"T{i}" for i in keep] + ["A", "B"]
        titles2[0] = "renamed"
        brain.load_catalog(ids2, x2, titles=titles2)

        counters = keeper(brain).counters
        assert (counters.full_builds, counters.incremental_updates) == (1, 1)
        catalog = brain.catalog
        assert catalog is not None and len(catalog) == 300
        assert set(catalog.content_ids) == set(ids2)
        slots = catalog.parts().slot_ids
        assert len(slots) == 305 and sum(1 for s in slots if not s) == 5  # 3 replaced, 2 gone
        assert catalog.title_of("item-0") == "renamed" and catalog.title_of("new-b") == "B"
        for cid, vector in [("item-5", changed[0]), ("item-7", changed[2]), ("new-a", new[0])]:
            assert float(catalog.embedding_of(cid) @ vector) > 0.99  # 8-bit codes (HNSW SQ8)
            top, _ = catalog.search(vector, 1)
            assert top == [cid]  # new rows are searchable
        # Removed items and the old rows of changed ones never come back, even for their
        # own old embeddings, and every query still gets k results.
        found, _ = catalog.search_batch(np.concatenate([x[[10, 11, 5, 6]], x[:40]]), 20)
        assert all(len(row) == 20 for row in found)
        assert not {"item-10", "item-11"} & {c for row in found for c in row}
        positions, _ = catalog.search_positions(x[[5, 6]], 30)
        assert (positions >= 0).all() and (positions < 300).all()

    with Brain("tv-1", config) as again:  # the update was persisted with its index file
        counters = keeper(again).counters
        assert (counters.file_loads, counters.full_builds) == (1, 0)
        assert again.catalog is not None and set(again.catalog.content_ids) == set(ids2)
        assert again.catalog.search(new[1], 1)[0] == ["new-b"]


def test_past_the_dead_threshold_the_index_is_rebuilt_compact(config: BrainConfig) -> None:
    ids, x = make_catalog(200)
    removed = int(200 * REBUILD_DEAD_FRACTION)  # with the 5 below: past the threshold
    with Brain("tv-1", config) as brain:
        brain.load_catalog(ids, x)
        brain.load_catalog(ids[:195], x[:195])  # 5 dead slots of 200: incremental
        counters = keeper(brain).counters
        assert (counters.full_builds, counters.incremental_updates) == (1, 1)
        brain.load_catalog(ids[removed:195], x[removed:195])
        assert (counters.full_builds, counters.incremental_updates) == (2, 1)
        assert "dead" in counters.last_rebuild_reason
        assert brain.catalog is not None and all(brain.catalog.parts().slot_ids)
        assert list(brain.catalog.content_ids) == ids[removed:195]


def test_items_outside_the_quantizer_range_rebuild_hnsw(config: BrainConfig) -> None:
    ids, x = make_catalog(200)
    odd = np.zeros((1, 384), dtype=np.float32)
    odd[0, :6] = [0.7, 0.5, 0.35, 0.25, 0.2, 0.15]  # far beyond the trained value ranges
    odd = unit(odd)
    with Brain("tv-1", config) as brain:
        brain.load_catalog(ids, x)
        brain.load_catalog([*ids, "odd"], np.concatenate([x, odd]))
        counters = keeper(brain).counters
        assert brain.catalog is not None
        if brain.catalog.exact:  # a flat index stores the floats: nothing to retrain
            assert (counters.full_builds, counters.incremental_updates) == (1, 1)
        else:
            assert (counters.full_builds, counters.incremental_updates) == (2, 0)
            assert "quantizer" in counters.last_rebuild_reason
        assert float(brain.catalog.embedding_of("odd") @ odd[0]) > 0.99


def test_unchanged_catalog_changes_nothing(config: BrainConfig) -> None:
    ids, x = make_catalog(150)
    with Brain("tv-1", config) as brain:
        brain.load_catalog(ids, x)
        first = brain.catalog
        stamp = index_file(config).stat().st_mtime_ns
        brain.load_catalog(ids, x)
        counters = keeper(brain).counters
        assert (counters.full_builds, counters.incremental_updates) == (1, 0)
        assert brain.catalog is first
        assert index_file(config).stat().st_mtime_ns == stamp


def test_fetch_catalog_applies_changes_incrementally(
    config: BrainConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, x = make_catalog(120)
    shard = FakeShard((ids, x))
    cfg = BrainConfig(**{**config.__dict__, "catalog_page_size": 50})
    with Brain("tv-1", cfg, transport=shard) as brain:
        assert brain.fetch_catalog() == 120
        forbid_builds(monkeypatch)
        new_x = unit(x[[30, 40]] + x[[61, 77]])
        shard.items, shard.catalog_version = (["item-5", "item-new"], new_x), 2
        assert brain.fetch_catalog() == 121
        assert shard.fetches[-1].since_catalog_version == 1
        counters = keeper(brain).counters
        assert (counters.full_builds, counters.incremental_updates) == (1, 1)
        assert brain.catalog is not None
        assert brain.catalog.search(new_x[1], 1)[0] == ["item-new"]
        assert float(brain.catalog.embedding_of("item-5") @ new_x[0]) > 0.99
        assert brain.catalog.title_of("item-new") == "Title 1"
    with Brain("tv-1", cfg) as again:
        assert keeper(again).counters.file_loads == 1
        assert again.stats().catalog_version == 2 and again.catalog is not None
        assert len(again.catalog) == 121


def test_leftover_temp_file_is_ignored(
    config: BrainConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, x = make_catalog(150)
    with Brain("tv-1", config) as brain:
        brain.load_catalog(ids, x)
        expected = results(brain.catalog, x[:10])
    tmp = Path(str(index_file(config)) + ".tmp")
    tmp.write_bytes(os.urandom(10_000))  # a write killed before its rename
    forbid_builds(monkeypatch)
    with Brain("tv-1", config) as brain:
        assert keeper(brain).counters.file_loads == 1
        assert results(brain.catalog, x[:10]) == expected
        brain.load_catalog(ids[:149], x[:149])  # the next write reuses and renames it
    assert not tmp.exists()


def test_crash_between_store_commit_and_file_rename(
    config: BrainConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, x = make_catalog(200)
    with Brain("tv-1", config) as brain:
        brain.load_catalog(ids, x)

    def crash(path: Path, index: faiss.Index, header: IndexHeader) -> None:
        Path(str(path) + ".tmp").write_bytes(b"half-written")
        raise OSError("power cut")

    monkeypatch.setattr(keeper_module, "write_index_file", crash)
    with Brain("tv-1", config) as brain:
        brain.load_catalog(ids[:195], x[:195])  # committed to the store; the file is old
        assert keeper(brain).counters.file_write_failures == 1
        assert brain.catalog is not None and len(brain.catalog) == 195
        expected = results(brain.catalog, x[:15])
    monkeypatch.undo()
    faiss.omp_set_num_threads(1)
    with Brain("tv-1", config) as brain:  # the old file names the old catalog: rebuilt
        counters = keeper(brain).counters
        assert (counters.file_loads, counters.full_builds) == (0, 1)
        assert "stale" in counters.last_rebuild_reason
        assert brain.catalog is not None and len(brain.catalog) == 195
        assert set(results(brain.catalog, x[:15], 5)[0]) <= set(ids[:195])
        assert len(results(brain.catalog, x[:15])) == len(expected)


def test_memory_store_keeps_an_in_memory_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ids, x = make_catalog(100)
    with Brain("tv-1", BrainConfig()) as brain:
        assert keeper(brain).path is None
        brain.load_catalog(ids, x)
        brain.load_catalog(ids[:99], x[:99])
        assert keeper(brain).counters.incremental_updates == 1
        assert brain.catalog is not None and brain.catalog.parts().source is None
        assert brain.catalog.search(x[3], 1)[0] == ["item-3"]
    assert list(tmp_path.iterdir()) == []


def test_read_index_file_checks_the_header(config: BrainConfig) -> None:
    ids, x = make_catalog(100)
    with Brain("tv-1", config) as brain:
        brain.load_catalog(ids, x)
        header = keeper(brain)._header
    assert header is not None
    path = index_file(config)
    assert read_index_file(path, header)[1] == "ok"
    for wrong in (
        IndexHeader(header.catalog_digest, 99, header.exact, header.hnsw_m, header.ef_construction),
        IndexHeader("0" * 64, 100, header.exact, header.hnsw_m, header.ef_construction),
        IndexHeader(header.catalog_digest, 100, header.exact, header.hnsw_m + 1, 7),
    ):
        index, reason = read_index_file(path, wrong)
        assert index is None and reason.startswith("stale")


def test_store_keeps_int8_codes_in_chunks(tmp_path: Path) -> None:
    ids, x = make_catalog(2500)
    store = Store(tmp_path / "s.db", "tv")
    try:
        with store.transaction():
            store.replace_catalog(ids, [""] * 2500, [[] for _ in ids], CatalogCodes.quantize(x))
        rows = store._conn.execute("SELECT COUNT(*) FROM catalog_chunks").fetchone()[0]
        assert rows == 3  # 1024 slots a row
        codes = store.catalog_codes()
        assert codes.codes.dtype == np.int8 and codes.codes.shape == (2500, 384)
        assert float(np.min(np.sum(codes.vectors() * x, axis=1))) > 0.999
        slots = store.catalog_slots()
        assert slots is not None and slots.content_ids == ids and len(slots.digest) == 64
    finally:
        store.close()


def test_version_2_float16_catalog_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    Store(path, "tv-1").close()
    ids, x = make_catalog(50)
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE catalog_chunks")
    conn.execute("DELETE FROM meta WHERE key = 'catalog_digest'")
    conn.execute(
        "CREATE TABLE catalog (position INTEGER PRIMARY KEY, content_id TEXT NOT NULL UNIQUE,"
        " title TEXT NOT NULL, genres TEXT NOT NULL, embedding BLOB NOT NULL)"
    )
    conn.executemany(
        "INSERT INTO catalog VALUES (?, ?, ?, ?, ?)",
        [(i, c, f"T{i}", '["news"]', x[i].astype("<f2").tobytes()) for i, c in enumerate(ids)],
    )
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    with Brain("tv-1", BrainConfig(store_path=path)) as brain:
        catalog = brain.catalog
        assert catalog is not None and list(catalog.content_ids) == ids
        assert catalog.genres_of("item-4") == ("news",) and catalog.title_of("item-4") == "T4"
        assert float(catalog.embedding_of("item-9") @ x[9]) > 0.999
    tables = {
        r[0]
        for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type='table'")
    }
    assert "catalog" not in tables and "catalog_chunks" in tables


def test_update_across_chunks_keeps_store_and_index_aligned(tmp_path: Path) -> None:
    ids, x = make_catalog(2500)  # three store chunks; a flat index (fast)
    config = BrainConfig(store_path=tmp_path / "tv.db")
    with Brain("tv-1", config) as brain:
        brain.load_catalog(ids, x)
        shas = dict(brain._store._conn.execute("SELECT chunk, sha FROM catalog_chunks"))
        x2 = x.copy()
        x2[[3, 1500]] = unit(x[[7, 9]] + x[[11, 13]])
        brain.load_catalog([*ids, "new"], np.concatenate([x2, x[20:21]]))
        assert keeper(brain).counters.incremental_updates == 1
        after = dict(brain._store._conn.execute("SELECT chunk, sha FROM catalog_chunks"))
        # only chunks 0 (item 3), 1 (item 1500) and 2 (the appended slots) are rewritten
        assert {c for c in shas if shas[c] != after[c]} == {0, 1, 2} and set(after) == {0, 1, 2}
        slots = brain._store.catalog_slots()
        codes = brain._store.catalog_codes()
        assert slots is not None and len(slots.content_ids) == len(codes) == 2503
        assert slots.content_ids[3] == "" and slots.content_ids[2500:] == [
            "item-3",
            "item-1500",
            "new",
        ]
        np.testing.assert_array_equal(
            codes.codes[:2500][[0, 2499]], CatalogCodes.quantize(x[[0, 2499]]).codes
        )
    with Brain("tv-1", config) as again:
        catalog = again.catalog
        assert keeper(again).counters.file_loads == 1 and catalog is not None
        for cid, vector in [
            ("item-3", x2[3]),
            ("item-1500", x2[1500]),
            ("new", x[20]),
            ("item-9", x[9]),
        ]:
            assert float(catalog.embedding_of(cid) @ vector) > 0.999
