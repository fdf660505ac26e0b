"""The store's own catalog: ``catalog_chunks`` rows of int8 codes in zstd frames.

``catalog_chunks(chunk INTEGER PK, meta BLOB, codes BLOB, scales BLOB, sha BLOB)`` holds the
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

The functions take the store's connection; `omega_brain.store.Store` calls them inside its
transactions.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import zstandard

from omega_brain.errors import StoreError
from omega_brain.patterns import normalize
from omega_brain.store_rows import F32, guard
from omega_protocol import EMBEDDING_DIM, quantize_int8

__all__ = [
    "CATALOG_CHUNK_SLOTS",
    "CatalogCodes",
    "CatalogSlots",
    "read_codes",
    "read_slots",
    "replace_catalog",
    "update_catalog",
]

CATALOG_CHUNK_SLOTS = 1024
"""Catalog slots per ``catalog_chunks`` row (about 400 KB of codes)."""

_BLOCK_ROWS = 4096


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


def read_slots(conn: sqlite3.Connection) -> CatalogSlots | None:
    """The persisted catalog's slots (ids, titles, genres; no embeddings), or None when
    none was stored.

    Raises:
        StoreError: a chunk is missing or malformed (the store is corrupt).
    """
    with guard("reading the catalog"):
        rows = conn.execute("SELECT chunk, meta FROM catalog_chunks ORDER BY chunk").fetchall()
        digest = conn.execute("SELECT value FROM meta WHERE key = 'catalog_digest'").fetchone()
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


def read_codes(conn: sqlite3.Connection) -> CatalogCodes:
    """Embeddings of every catalog slot (dead ones included), (S, 384) int8 + (S,) scales.

    Raises:
        StoreError: a chunk is malformed (the store is corrupt).
    """
    with guard("reading catalog embeddings"):
        rows = conn.execute("SELECT codes, scales FROM catalog_chunks ORDER BY chunk").fetchall()
    parts = [_chunk_codes(codes, scales) for codes, scales in rows]
    if not parts:
        return _no_codes()
    return CatalogCodes(
        np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts])
    )


def replace_catalog(
    conn: sqlite3.Connection,
    content_ids: Sequence[str],
    titles: Sequence[str],
    genres: Sequence[Sequence[str]],
    codes: CatalogCodes,
) -> str:
    """Replace the stored catalog: slot i holds item i. Call inside a transaction.

    Returns:
        The new catalog digest (also written to ``meta``).
    """
    n = len(content_ids)
    if not len(titles) == len(genres) == len(codes) == n:
        raise StoreError("catalog columns have different lengths")
    with guard("writing the catalog"):
        conn.execute("DELETE FROM catalog_chunks")
        for start in range(0, n, CATALOG_CHUNK_SLOTS):
            end = min(n, start + CATALOG_CHUNK_SLOTS)
            _write_chunk(
                conn,
                start // CATALOG_CHUNK_SLOTS,
                content_ids[start:end],
                titles[start:end],
                genres[start:end],
                CatalogCodes(codes.codes[start:end], codes.scales[start:end]),
            )
        return _write_catalog_digest(conn)


def update_catalog(
    conn: sqlite3.Connection,
    content_ids: Sequence[str],
    titles: Sequence[str],
    genres: Sequence[Sequence[str]],
    appended: CatalogCodes,
    changed_slots: Iterable[int],
) -> str:
    """Rewrite only the chunks that change. Call inside a transaction.

    Args:
        conn: the store's connection.
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
    with guard("reading the catalog"):
        existing = int(conn.execute("SELECT COUNT(*) FROM catalog_chunks").fetchone()[0])
    touched = {s // CATALOG_CHUNK_SLOTS for s in changed_slots if 0 <= s < first_new}
    touched.update(range(first_new // CATALOG_CHUNK_SLOTS, -(-total // CATALOG_CHUNK_SLOTS)))
    with guard("writing the catalog"):
        for chunk in sorted(touched):
            start = chunk * CATALOG_CHUNK_SLOTS
            end = min(total, start + CATALOG_CHUNK_SLOTS)
            if chunk < existing:
                row = conn.execute(
                    "SELECT codes, scales FROM catalog_chunks WHERE chunk = ?", (chunk,)
                ).fetchone()
                old = _chunk_codes(row[0], row[1])
                keep = max(0, min(first_new, end) - start)
                old = CatalogCodes(old.codes[:keep], old.scales[:keep])
            else:
                old = _no_codes()
            lo = max(0, start - first_new)
            hi = max(lo, end - first_new)
            codes = CatalogCodes(
                np.concatenate([old.codes, appended.codes[lo:hi]]),
                np.concatenate([old.scales, appended.scales[lo:hi]]),
            )
            _write_chunk(
                conn, chunk, content_ids[start:end], titles[start:end], genres[start:end], codes
            )
        return _write_catalog_digest(conn)


def _no_codes() -> CatalogCodes:
    return CatalogCodes(np.zeros((0, EMBEDDING_DIM), np.int8), np.zeros((0,), np.float32))


def _write_chunk(
    conn: sqlite3.Connection,
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
    scale_blob = np.asarray(codes.scales, dtype=F32).tobytes()
    sha = hashlib.sha256(meta + code_blob + scale_blob).digest()
    conn.execute(
        "INSERT OR REPLACE INTO catalog_chunks (chunk, meta, codes, scales, sha)"
        " VALUES (?, ?, ?, ?, ?)",
        (chunk, meta, code_blob, scale_blob, sha),
    )


def _write_catalog_digest(conn: sqlite3.Connection) -> str:
    digest = hashlib.sha256()
    for (sha,) in conn.execute("SELECT sha FROM catalog_chunks ORDER BY chunk"):
        digest.update(sha)
    value = digest.hexdigest()
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('catalog_digest', ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (value,),
    )
    return value


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
        s = np.frombuffer(scales, dtype=F32).copy()
        c = np.frombuffer(raw, dtype=np.int8).reshape(s.shape[0], EMBEDDING_DIM).copy()
    except (ValueError, TypeError, zstandard.ZstdError) as exc:
        raise StoreError(f"stored catalog codes are malformed ({exc}); store corrupt") from exc
    if not np.all(np.isfinite(s)):
        raise StoreError("stored catalog scales are not finite; the store is corrupt")
    return CatalogCodes(c, s)
