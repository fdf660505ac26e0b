"""The shard's catalog in memory: paging for FetchEmbeddings and search for SearchContent.

Exact inner-product search (faiss ``IndexFlatIP``) is used: shard catalogs are tens of
thousands of items at most, where a flat scan costs well under a millisecond per query and
needs no training or tuning.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import numpy.typing as npt

from omega_common.errors import InvalidArgumentError
from omega_constellation.store import CatalogRow
from omega_protocol import EMBEDDING_DIM, dequantize_int8, quantize_int8

__all__ = ["Catalog", "Hit", "read_catalog_file"]


def read_catalog_file(path: Path) -> tuple[list[CatalogRow], str]:
    """Read an ``.npz`` catalog into rows (int8 embeddings) and its content digest.

    The file holds ``content_ids`` (n,) str, ``titles`` (n,) str, ``genres`` (n,) str with
    genres separated by ``|``, and ``embeddings`` (n, 384) float32.

    Raises:
        ValueError: missing arrays, mismatched lengths, a wrong dimension or NaN values.
    """
    raw = path.read_bytes()
    with np.load(path, allow_pickle=False) as data:
        missing = {"content_ids", "titles", "genres", "embeddings"} - set(data.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)}")
        ids = [str(x) for x in data["content_ids"]]
        titles = [str(x) for x in data["titles"]]
        genres = [str(x) for x in data["genres"]]
        embeddings = np.asarray(data["embeddings"], dtype=np.float32)
    if embeddings.shape != (len(ids), EMBEDDING_DIM) or not len(ids) == len(titles) == len(genres):
        raise ValueError(f"{path}: inconsistent shapes {embeddings.shape}, {len(ids)} ids")
    if not np.all(np.isfinite(embeddings)):
        raise ValueError(f"{path}: embeddings contain NaN or infinite values")
    codes, scales = quantize_int8(embeddings)
    rows = [
        CatalogRow(
            content_id=ids[i],
            title=titles[i],
            genres=[g for g in genres[i].split("|") if g],
            codes=codes[i].tobytes(),
            scale=float(scales[i]),
            catalog_version=0,
        )
        for i in range(len(ids))
    ]
    return rows, hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True, slots=True)
class Hit:
    """A search result: cosine similarity ``score``."""

    content_id: str
    title: str
    score: float


class Catalog:
    """Immutable snapshot of the catalog with an exact inner-product index."""

    def __init__(self, version: int, rows: Sequence[CatalogRow]) -> None:
        self.version = version
        self.rows = sorted(rows, key=lambda r: r.content_id)
        self._position = {r.content_id: i for i, r in enumerate(self.rows)}
        self._genres = [frozenset(r.genres) for r in self.rows]
        self._index = faiss.IndexFlatIP(EMBEDDING_DIM)
        if self.rows:
            codes = np.frombuffer(b"".join(r.codes for r in self.rows), dtype=np.int8)
            vectors = dequantize_int8(
                codes.reshape(len(self.rows), EMBEDDING_DIM), [r.scale for r in self.rows]
            )
            faiss.normalize_L2(vectors)
            self._index.add(vectors)

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, content_id: object) -> bool:
        return content_id in self._position

    def page(
        self, *, since_version: int, content_ids: Sequence[str], offset: int, limit: int
    ) -> tuple[list[CatalogRow], int | None]:
        """Rows changed after ``since_version`` (or the given ids), from ``offset``.

        Returns:
            (rows, next offset or None on the last page).
        """
        if content_ids:
            selected = [self.rows[self._position[c]] for c in content_ids if c in self._position]
        else:
            selected = [r for r in self.rows if r.catalog_version > since_version]
        page = selected[offset : offset + limit]
        nxt = offset + limit if offset + limit < len(selected) else None
        return page, nxt

    def search(
        self,
        query: npt.NDArray[np.float32],
        k: int,
        *,
        genres: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> list[Hit]:
        """The ``k`` items nearest to ``query`` ((384,) float32) by cosine similarity.

        Raises:
            InvalidArgumentError: ``k`` outside [1, 1000].
        """
        if not 1 <= k <= 1000:
            raise InvalidArgumentError("k must be in [1, 1000]")
        if not self.rows:
            return []
        q = np.asarray(query, dtype=np.float32).reshape(1, -1).copy()
        faiss.normalize_L2(q)
        wanted = frozenset(genres)
        skip = frozenset(exclude)
        fetch = min(len(self.rows), k + len(skip) + (k * 20 if wanted else 0))
        scores, positions = self._index.search(q, fetch)
        hits: list[Hit] = []
        for score, pos in zip(scores[0], positions[0], strict=True):
            if pos < 0:
                break
            row = self.rows[int(pos)]
            if row.content_id in skip or (wanted and not wanted & self._genres[int(pos)]):
                continue
            hits.append(Hit(row.content_id, row.title, float(score)))
            if len(hits) == k:
                break
        return hits
