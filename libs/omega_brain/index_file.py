"""The catalog's faiss index persisted beside the store, so that opening a brain never rebuilds it.

File ``<store>.faiss`` (`index_path`): the bytes of ``faiss.write_index`` followed by a trailer::

    faiss index bytes | trailer (UTF-8 JSON) | trailer length (8 bytes, little-endian) | MAGIC

The JSON trailer records which catalog the index belongs to and how it was built:
``format``, ``catalog_digest`` (the store's ``meta['catalog_digest']``, written in the same
transaction as the catalog), ``slots`` (rows; dead slots included), ``exact``, ``hnsw_m``,
``ef_construction``, ``dim``, and ``faiss_bytes`` / ``faiss_sha256`` (length and SHA-256 of the
faiss part). faiss reads the file from its start and ignores the trailer.

Writing (`write_index_file`): to ``<store>.faiss.tmp``, ``fsync``, atomic ``os.replace`` onto the
final name, ``fsync`` of the directory. A crash leaves either the old file or the new one, plus
at most a temp file that nothing reads (the next write truncates it).

Reading (`read_index_file`): the trailer must parse and match what the store expects (digest,
slot count, index type and parameters), the file size must add up, and the faiss part must hash
to ``faiss_sha256`` (about 45 ms for the 65 MB of a 100K HNSW SQ8 index) before faiss sees a
byte: faiss aborts the process on some malformed input, so a truncated or corrupt file must
never reach it. The index is then memory-mapped (``IO_FLAG_MMAP_IFC``): opening costs a few
milliseconds, only the HNSW graph (about 28 MB at 100K) is read into memory, and the codes are
file pages the kernel shares and can evict. A mapped index must never be modified (faiss aborts
on ``add``): updates go through `read_owned_copy`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss

from omega_protocol import EMBEDDING_DIM

__all__ = [
    "FORMAT",
    "MAGIC",
    "IndexHeader",
    "index_path",
    "read_index_file",
    "read_owned_copy",
    "write_index_file",
]

MAGIC = b"OMEGAIX\x01"
FORMAT = 1
_TAIL = struct.Struct("<Q")
_MAX_TRAILER_BYTES = 1 << 16
_HASH_BLOCK = 1 << 20


@dataclass(frozen=True, slots=True)
class IndexHeader:
    """What an index file must record to be used for a catalog.

    Attributes:
        catalog_digest: the store's catalog digest the index was built for.
        slots: rows of the index (the catalog's slots, dead ones included).
        exact: a flat index (True) or HNSW with 8-bit scalar quantization (False).
        hnsw_m: HNSW degree (0 for a flat index).
        ef_construction: HNSW build beam width (0 for a flat index).
    """

    catalog_digest: str
    slots: int
    exact: bool
    hnsw_m: int
    ef_construction: int


def index_path(store_path: str | os.PathLike[str]) -> Path | None:
    """``<store>.faiss`` for a store file; None for ``:memory:`` and ``file:`` URI stores."""
    text = os.fspath(store_path)
    if not text or text == ":memory:" or text.startswith("file:"):
        return None
    return Path(text + ".faiss")


def write_index_file(path: Path, index: faiss.Index, header: IndexHeader) -> None:
    """Write ``index`` and its trailer to ``path`` atomically (temp file, fsync, rename).

    Raises:
        OSError: the file could not be written (``path`` is then unchanged).
    """
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    try:
        with open(tmp, "r+b") as f:
            digest = hashlib.sha256()
            size = 0
            while block := f.read(_HASH_BLOCK):
                digest.update(block)
                size += len(block)
            trailer = json.dumps(
                {
                    "format": FORMAT,
                    **asdict(header),
                    "dim": EMBEDDING_DIM,
                    "faiss_bytes": size,
                    "faiss_sha256": digest.hexdigest(),
                },
                sort_keys=True,
            ).encode()
            f.seek(size)
            f.write(trailer + _TAIL.pack(len(trailer)) + MAGIC)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def read_index_file(
    path: Path, expected: IndexHeader, *, checksum: bool = True
) -> tuple[faiss.Index | None, str]:
    """The index in ``path`` if it is intact and belongs to ``expected``'s catalog.

    Never raises for a bad file: a missing, stale, truncated or corrupt file gives
    ``(None, reason)``.

    Args:
        path: the index file.
        expected: what the trailer must record.
        checksum: verify the faiss part's SHA-256 (False only right after this process
            wrote and fsynced the file).

    Returns:
        ``(index, "ok")`` with the index memory-mapped (read-only: never modify it), or
        ``(None, reason)``.
    """
    faiss_bytes, reason = _verify(path, expected, checksum=checksum)
    if faiss_bytes is None:
        return None, reason
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    except (RuntimeError, MemoryError) as exc:  # faiss raises RuntimeError for its own errors
        return None, f"unreadable: {exc}"
    return _checked(index, expected)


def read_owned_copy(path: Path, expected: IndexHeader) -> faiss.Index | None:
    """A modifiable in-memory copy of the index in ``path`` (None if the file does not
    verify against ``expected``)."""
    faiss_bytes, _ = _verify(path, expected)
    if faiss_bytes is None:
        return None
    try:
        index = faiss.read_index(str(path))
    except (RuntimeError, MemoryError):
        return None
    return _checked(index, expected)[0]


def _checked(index: faiss.Index, expected: IndexHeader) -> tuple[faiss.Index | None, str]:
    # read_index returns the concrete class already (and owns it: a downcast_index proxy
    # would not, and the C++ index would be freed with the original proxy).
    kind = faiss.IndexFlatIP if expected.exact else faiss.IndexHNSWSQ
    if not isinstance(index, kind) or index.d != EMBEDDING_DIM:
        return None, f"index type {type(index).__name__}, dimension {index.d}"
    if int(index.ntotal) != expected.slots:
        return None, f"index has {int(index.ntotal)} rows, the catalog {expected.slots} slots"
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None, "index metric is not inner product"
    return index, "ok"


def _verify(path: Path, expected: IndexHeader, *, checksum: bool = True) -> tuple[int | None, str]:
    """Checks the trailer and the faiss part's hash; returns the faiss part's length."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            tail = _TAIL.size + len(MAGIC)
            if size < tail:
                return None, "truncated"
            f.seek(size - tail)
            end = f.read(tail)
            if end[_TAIL.size :] != MAGIC:
                return None, "no trailer (truncated or not an index file)"
            (trailer_len,) = _TAIL.unpack(end[: _TAIL.size])
            if trailer_len > min(_MAX_TRAILER_BYTES, size - tail):
                return None, "bad trailer length"
            f.seek(size - tail - trailer_len)
            try:
                trailer = json.loads(f.read(trailer_len))
            except ValueError:
                return None, "unreadable trailer"
            if not isinstance(trailer, dict) or trailer.get("format") != FORMAT:
                return None, "unknown format"
            recorded = {k: trailer.get(k) for k in asdict(expected)}
            if recorded != asdict(expected) or trailer.get("dim") != EMBEDDING_DIM:
                return None, "stale: built for another catalog or other index settings"
            faiss_bytes = trailer.get("faiss_bytes")
            if not isinstance(faiss_bytes, int) or faiss_bytes + trailer_len + tail != size:
                return None, "size does not add up"
            if not checksum:
                return faiss_bytes, "ok"
            f.seek(0)
            digest = hashlib.sha256()
            left = faiss_bytes
            while left > 0:
                block = f.read(min(_HASH_BLOCK, left))
                if not block:
                    return None, "truncated"
                digest.update(block)
                left -= len(block)
            if digest.hexdigest() != trailer.get("faiss_sha256"):
                return None, "corrupt: checksum mismatch"
            return faiss_bytes, "ok"
    except FileNotFoundError:
        return None, "missing"
    except OSError as exc:
        return None, f"unreadable: {exc}"


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
