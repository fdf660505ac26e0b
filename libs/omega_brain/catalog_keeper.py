"""The brain's own catalog over time: opened without rebuilding, updated without rebuilding.

`CatalogKeeper` joins three things: the catalog in the store (`Store.catalog_slots`, int8
codes in numbered slots), the faiss index file beside it (`omega_brain.index_file`) and the
`CatalogIndex` the brain searches. Slot ``s`` of the store is row ``s`` of the index.

* **Open** (`open`): the index file is used when its trailer names the store's catalog digest
  and slot count and the current index settings and its checksum holds; it is memory-mapped,
  so a 100K catalog opens in about 0.1 s instead of a 10-15 s rebuild. A missing, stale,
  truncated or corrupt file is rebuilt from the store's codes (the same vectors, so the same
  rows) and rewritten; the reason is kept in `KeeperCounters.last_rebuild_reason`.
* **Update** (`replace` for a whole catalog, as ``load_catalog`` and a full ``fetch_catalog``
  give; `upsert` for the items changed since a catalog version, as ``FetchEmbeddings`` gives):
  the new items are compared with the stored ones (int8 codes, titles, genres). New items and
  items whose embedding changed get new slots appended to a copy of the index (HNSW supports
  ``add``); replaced and removed items leave dead slots that searches skip (`CatalogIndex`).
  Only the touched store chunks are rewritten. A full rebuild (which also compacts the slots)
  happens only when dead slots would pass `REBUILD_DEAD_FRACTION` of all slots, when the
  catalog crosses the exact-search size, or when there is no catalog yet.

Crash safety: the store is written in one transaction (catalog chunks, digest and catalog
version together), then the index file atomically (temp file, fsync, rename). A crash between
the two leaves a file naming the previous digest: the next open sees it is stale and rebuilds.
Nothing ever reads the temp file. Stores at ``:memory:`` have no file: their index lives in
memory only (and an in-memory store starts empty anyway).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from omega_brain.catalog import CatalogIndex, IndexParts, build_faiss_index, check_catalog
from omega_brain.index_file import (
    IndexHeader,
    read_index_file,
    read_owned_copy,
    write_index_file,
)
from omega_brain.store import CatalogCodes, Store

__all__ = ["MIN_CODE_COSINE", "REBUILD_DEAD_FRACTION", "CatalogKeeper", "KeeperCounters"]

REBUILD_DEAD_FRACTION = 0.2
"""An update that would leave more than this share of the index's slots dead rebuilds the
index from scratch (compacting the slots) instead: dead slots cost memory, disk and search
work (HNSW still walks them)."""


MIN_CODE_COSINE = 0.99
"""An incremental update whose new rows the HNSW index's 8-bit scalar quantizer (trained on
the catalog when the index was built) would store with a cosine below this to the original
rebuilds the index instead, retraining the quantizer: new items far outside the trained value
ranges would otherwise be clipped. Items from the same embedding model stay far above it
(0.9997 at worst for held-out items of the 100K benchmark catalog)."""


@dataclass(slots=True)
class KeeperCounters:
    """What the keeper did since it was created (for tests, stats and benchmarks).

    Attributes:
        full_builds: faiss indexes built from scratch (a new catalog, a compaction, or a
            rebuild of a missing/stale/corrupt file).
        incremental_updates: catalog updates applied to a copy of the current index.
        file_loads: indexes opened from the index file.
        file_write_failures: index files that could not be written (the next open rebuilds).
        last_rebuild_reason: why the last full build happened.
    """

    full_builds: int = 0
    incremental_updates: int = 0
    file_loads: int = 0
    file_write_failures: int = 0
    last_rebuild_reason: str = ""


class CatalogKeeper:
    """Opens and updates a brain's own catalog (store + index file + `CatalogIndex`).

    Not thread-safe: the `Brain` calls it under its lock.

    Args:
        store: the brain's store.
        path: the index file (``<store>.faiss``), or None to keep the index in memory only.
        hnsw_m: HNSW degree.
        ef_search: HNSW search beam width.
        ef_construction: HNSW build beam width.
        exact_max_items: catalogs up to this many items get a flat (exact) index.
    """

    def __init__(
        self,
        store: Store,
        path: Path | None,
        *,
        hnsw_m: int,
        ef_search: int,
        ef_construction: int,
        exact_max_items: int,
    ) -> None:
        self._store = store
        self._path = path
        self._m = hnsw_m
        self._ef_search = ef_search
        self._ef_construction = ef_construction
        self._exact_max = exact_max_items
        self._current: CatalogIndex | None = None
        self._header: IndexHeader | None = None
        self.counters = KeeperCounters()

    @property
    def path(self) -> Path | None:
        """The index file, or None for an in-memory store."""
        return self._path

    def open(self) -> CatalogIndex | None:
        """The stored catalog's index: from the index file, or rebuilt when the file is
        missing, stale, truncated or corrupt. None when the store holds no catalog.

        Raises:
            StoreError: the stored catalog is unreadable.
        """
        slots = self._store.catalog_slots()
        if slots is None:
            return None
        header = self._expected(slots.digest, len(slots.content_ids), slots.live)
        reason = "in-memory store"
        if self._path is not None:
            index, reason = read_index_file(self._path, header)
            if index is not None:
                self.counters.file_loads += 1
                return self._adopt(
                    CatalogIndex.from_slots(
                        slots.content_ids,
                        slots.titles,
                        slots.genres,
                        index,
                        exact=header.exact,
                        ef_search=self._ef_search,
                        source=self._path,
                    ),
                    header,
                )
        built = self._build(self._store.catalog_codes(), header.exact, f"index file {reason}")
        return self._publish(built, header, slots.content_ids, slots.titles, slots.genres)

    def replace(
        self,
        content_ids: Sequence[str],
        embeddings: npt.ArrayLike,
        titles: Sequence[str] | None,
        genres: Sequence[Sequence[str]] | None,
        *,
        catalog_version: int,
    ) -> CatalogIndex:
        """Make the catalog exactly these items (others are removed) and store
        ``catalog_version`` with it, updating the index incrementally where that pays.

        Args:
            content_ids: n distinct non-empty ids.
            embeddings: (n, 384) float, finite, non-zero rows (normalized here).
            titles: n titles, or None.
            genres: n genre lists, or None.
            catalog_version: the catalog version to record in the same transaction.

        Raises:
            CatalogError: bad shapes, values or ids (nothing is changed).
            StoreError: the store could not be written (nothing is changed).
        """
        return self._apply(content_ids, embeddings, titles, genres, catalog_version, True)

    def upsert(
        self,
        content_ids: Sequence[str],
        embeddings: npt.ArrayLike,
        titles: Sequence[str] | None,
        genres: Sequence[Sequence[str]] | None,
        *,
        catalog_version: int,
    ) -> CatalogIndex:
        """Add or replace these items (others stay); see `replace` for the arguments."""
        return self._apply(content_ids, embeddings, titles, genres, catalog_version, False)

    # ------------------------------------------------------------------ internals

    def _apply(
        self,
        content_ids: Sequence[str],
        embeddings: npt.ArrayLike,
        titles: Sequence[str] | None,
        genres: Sequence[Sequence[str]] | None,
        version: int,
        remove_missing: bool,
    ) -> CatalogIndex:
        ids, x = check_catalog(content_ids, embeddings, titles, genres)
        new_titles = [str(t) for t in titles] if titles is not None else [""] * len(ids)
        new_genres = (
            [[str(g) for g in gs] for gs in genres] if genres is not None else [[] for _ in ids]
        )
        codes = CatalogCodes.quantize(x)
        current = self._current
        if current is None or self._header is None:
            return self._full(ids, new_titles, new_genres, codes, version, "no catalog yet")
        parts = current.parts()
        slot_ids = list(parts.slot_ids)
        slot_titles = list(parts.titles) if parts.titles is not None else [""] * len(slot_ids)
        slot_genres = (
            [list(g) for g in parts.genres] if parts.genres is not None else [[] for _ in slot_ids]
        )
        slot_of = {cid: s for s, cid in enumerate(slot_ids) if cid}
        stored = self._store.catalog_codes()
        if len(stored) != len(slot_ids):
            return self._full_merged(
                ids, new_titles, new_genres, codes, version, remove_missing, parts,
                "the store and the index disagree",
            )  # fmt: skip
        known = np.array([slot_of.get(c, -1) for c in ids], dtype=np.int64)
        same = np.zeros(len(ids), dtype=bool)
        hit = known >= 0
        if hit.any():
            at = known[hit]
            same[hit] = np.all(codes.codes[hit] == stored.codes[at], axis=1) & (
                codes.scales[hit] == stored.scales[at]
            )
        kill: set[int] = set()
        meta_changed: set[int] = set()
        append: list[int] = []
        for i in range(len(ids)):
            s = int(known[i])
            if s < 0:
                append.append(i)
            elif not same[i]:
                kill.add(s)
                append.append(i)
            elif slot_titles[s] != new_titles[i] or slot_genres[s] != new_genres[i]:
                slot_titles[s], slot_genres[s] = new_titles[i], new_genres[i]
                meta_changed.add(s)
        if remove_missing:
            wanted = set(ids)
            kill.update(s for cid, s in slot_of.items() if cid not in wanted)
        dead = sum(1 for c in slot_ids if not c) + len(kill)
        total = len(slot_ids) + len(append)
        live = total - dead
        added = CatalogCodes(codes.codes[append], codes.scales[append])
        added_vectors = added.vectors()
        if (live <= self._exact_max) != parts.exact:
            reason = "the catalog crossed the exact-search size"
        elif dead > REBUILD_DEAD_FRACTION * total:
            reason = f"{dead} of {total} slots would be dead"
        elif (
            append
            and not parts.exact
            and _code_cosine(parts.index, added_vectors) < MIN_CODE_COSINE
        ):
            reason = "new items fall outside the quantizer's trained ranges"
        else:
            reason = ""
        if reason:
            return self._full_merged(
                ids, new_titles, new_genres, codes, version, remove_missing, parts, reason
            )
        if not kill and not append and not meta_changed:
            with self._store.transaction():
                self._store.set_state({"catalog_version": version})
            return current
        for s in kill:
            slot_ids[s], slot_titles[s], slot_genres[s] = "", "", []
        index = parts.index
        if append:
            index = self._mutable_copy(parts, self._header)
            index.add(added_vectors)
        slot_ids += [ids[i] for i in append]
        slot_titles += [new_titles[i] for i in append]
        slot_genres += [new_genres[i] for i in append]
        with self._store.transaction():
            digest = self._store.update_catalog(
                slot_ids, slot_titles, slot_genres, added, kill | meta_changed
            )
            self._store.set_state({"catalog_version": version})
        self._store.checkpoint()
        self.counters.incremental_updates += 1
        header = IndexHeader(digest, total, parts.exact, self._header.hnsw_m,
                             self._header.ef_construction)  # fmt: skip
        return self._publish(index, header, slot_ids, slot_titles, slot_genres)

    def _full_merged(
        self,
        ids: list[str],
        titles: list[str],
        genres: list[list[str]],
        codes: CatalogCodes,
        version: int,
        remove_missing: bool,
        parts: IndexParts,
        reason: str,
    ) -> CatalogIndex:
        """A full rebuild; for an upsert, of the live items (updated in place) plus new ones."""
        if remove_missing:
            return self._full(ids, titles, genres, codes, version, reason)
        stored = self._store.catalog_codes()
        live = [s for s, c in enumerate(parts.slot_ids) if c]
        m_ids = [parts.slot_ids[s] for s in live]
        m_titles = [parts.titles[s] if parts.titles is not None else "" for s in live]
        m_genres = [list(parts.genres[s]) if parts.genres is not None else [] for s in live]
        m_codes = list(stored.codes[live]) if len(stored) == len(parts.slot_ids) else None
        m_scales = list(stored.scales[live]) if m_codes is not None else None
        if m_codes is None or m_scales is None:  # no usable stored codes: the update alone
            return self._full(ids, titles, genres, codes, version, reason)
        position = {c: i for i, c in enumerate(m_ids)}
        for i, cid in enumerate(ids):
            p = position.get(cid)
            if p is None:
                position[cid] = len(m_ids)
                m_ids.append(cid)
                m_titles.append(titles[i])
                m_genres.append(genres[i])
                m_codes.append(codes.codes[i])
                m_scales.append(codes.scales[i])
            else:
                m_titles[p], m_genres[p] = titles[i], genres[i]
                m_codes[p], m_scales[p] = codes.codes[i], codes.scales[i]
        merged = CatalogCodes(
            np.stack(m_codes).astype(np.int8), np.asarray(m_scales, dtype=np.float32)
        )
        return self._full(m_ids, m_titles, m_genres, merged, version, reason)

    def _full(
        self,
        ids: list[str],
        titles: list[str],
        genres: list[list[str]],
        codes: CatalogCodes,
        version: int,
        reason: str,
    ) -> CatalogIndex:
        exact = len(ids) <= self._exact_max
        index = self._build(codes, exact, reason)
        with self._store.transaction():
            digest = self._store.replace_catalog(ids, titles, genres, codes)
            self._store.set_state({"catalog_version": version})
        self._store.checkpoint()
        header = self._expected(digest, len(ids), len(ids))
        return self._publish(index, header, ids, titles, genres)

    def _build(self, codes: CatalogCodes, exact: bool, reason: str) -> faiss.Index:
        self.counters.full_builds += 1
        self.counters.last_rebuild_reason = reason
        return build_faiss_index(
            codes.vectors(), exact, self._m, self._ef_search, self._ef_construction
        )

    def _expected(self, digest: str, slots: int, live: int) -> IndexHeader:
        exact = live <= self._exact_max
        return IndexHeader(
            catalog_digest=digest,
            slots=slots,
            exact=exact,
            hnsw_m=0 if exact else self._m,
            ef_construction=0 if exact else self._ef_construction,
        )

    def _publish(
        self,
        index: faiss.Index,
        header: IndexHeader,
        slot_ids: Sequence[str],
        titles: Sequence[str],
        genres: Sequence[Sequence[str]],
    ) -> CatalogIndex:
        """Write the index file, then serve the index memory-mapped from it (which frees the
        in-memory copy); keep the in-memory index when there is no file or it failed."""
        source: Path | None = None
        if self._path is not None:
            try:
                write_index_file(self._path, index, header)
            except OSError as exc:
                self.counters.file_write_failures += 1
                self.counters.last_rebuild_reason = f"index file not written: {exc}"
            else:
                mapped, _ = read_index_file(self._path, header, checksum=False)
                if mapped is not None:
                    index, source = mapped, self._path
        catalog = CatalogIndex.from_slots(
            slot_ids,
            titles,
            genres,
            index,
            exact=header.exact,
            ef_search=self._ef_search,
            source=source,
        )
        return self._adopt(catalog, header)

    def _adopt(self, catalog: CatalogIndex, header: IndexHeader) -> CatalogIndex:
        self._current, self._header = catalog, header
        return catalog

    @staticmethod
    def _mutable_copy(parts: IndexParts, header: IndexHeader) -> faiss.Index:
        """A copy of the current index that may be modified (a mapped index must not be)."""
        if parts.source is None:
            return faiss.clone_index(parts.index)
        owned = read_owned_copy(parts.source, header)
        if owned is not None:
            return owned
        return faiss.deserialize_index(faiss.serialize_index(parts.index))


def _code_cosine(index: faiss.Index, vectors: npt.NDArray[np.float32]) -> float:
    """Lowest cosine between unit ``vectors`` and their codes in an HNSW index's storage."""
    hnsw: Any = index
    storage = faiss.downcast_index(hnsw.storage)  # a view owned by ``index`` (kept alive)
    decoded = storage.sa_decode(storage.sa_encode(vectors))
    norms = np.maximum(np.linalg.norm(decoded, axis=1), 1e-12)
    return float(np.min(np.sum(decoded * vectors, axis=1) / norms))
