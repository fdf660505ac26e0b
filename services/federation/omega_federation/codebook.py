"""Spherical k-means codebook that turns embeddings into pattern keys.

A pattern key is ``(context bucket, nearest centroid)``. The codebook is trained with faiss k-means
on unit embeddings (``spherical=True`` re-normalizes centroids after every iteration, so clusters
follow cosine similarity) and assigns by largest inner product.

Privacy note: centroids are not noised. Train the codebook on public data (catalog content
embeddings) or on earlier rounds' published patterns, not on the raw export of the round it keys,
otherwise the differential-privacy guarantee of ``federated_average`` does not cover it.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, Final

import faiss
import numpy as np
import numpy.typing as npt

MIN_POINTS_PER_CENTROID: Final[int] = 39
"""faiss warns below 39 training points per centroid; ``train`` lowers k to stay above it."""

MAX_POINTS_PER_CENTROID: Final[int] = 256
"""Training sample cap per centroid (faiss's default); larger inputs are subsampled first."""

_MAGIC: Final[bytes] = b"OMCB"
_FORMAT_VERSION: Final[int] = 1
_HEADER: Final = struct.Struct("<4sHHII")  # magic, version, flags (0), k, dim
_TRAILER: Final = struct.Struct("<I")  # CRC-32 of header + payload
_NORM_TOLERANCE: Final[float] = 1e-3
_ASSIGN_CHUNK_ROWS: Final[int] = 65_536


def _as_matrix(embeddings: npt.ArrayLike, name: str = "embeddings") -> npt.NDArray[np.float32]:
    arr = np.asarray(embeddings)
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise ValueError(f"{name} must have shape (n, dim) with dim >= 1, got {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    return np.asarray(arr, dtype=np.float32)


def _normalized(x: npt.NDArray[np.float32], name: str) -> npt.NDArray[np.float32]:
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))[:, None]  # no float64 copy
    if np.any(norms == 0.0):
        raise ValueError(f"{name} contain zero vectors, which have no direction")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


class Codebook:
    """k-means centroids over unit embeddings, used to key patterns.

    Attributes:
        centroids: ``(k, dim)`` float32, L2-normalized, read-only (``dim`` is 384 in Omega).
    """

    __slots__ = ("_index", "centroids")

    centroids: npt.NDArray[np.float32]

    def __init__(self, centroids: npt.ArrayLike) -> None:
        """Wrap given centroids (rows are L2-normalized on the way in).

        Args:
            centroids: ``(k, dim)`` array-like, finite, no zero rows; ``k, dim >= 1``.

        Raises:
            ValueError: On a wrong shape, non-finite values or zero rows.
        """
        mat = _normalized(_as_matrix(centroids, "centroids"), "centroids")
        if mat.shape[0] < 1:
            raise ValueError("a codebook needs at least one centroid")
        mat.setflags(write=False)
        self.centroids = mat
        self._index: Any = None

    @property
    def k(self) -> int:
        """Number of centroids."""
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.centroids.shape[1])

    def __repr__(self) -> str:
        return f"Codebook(k={self.k}, dim={self.dim})"

    @classmethod
    def train(cls, embeddings: npt.ArrayLike, k: int, seed: int = 0, niter: int = 20) -> Codebook:
        """Train a spherical k-means codebook with faiss.

        ``k`` is lowered to ``max(1, min(k, n // 39))`` so every centroid has at least 39 training
        points (no faiss warning, no degenerate clusters); with fewer than 78 points (or ``n < k``)
        this gives a single centroid, the normalized mean direction, computed without faiss. Inputs
        larger than ``256 * k`` rows are first subsampled (seeded), as faiss would do, which also
        bounds the memory of the normalized copy.

        Args:
            embeddings: ``(n, dim)`` float32 (other numeric dtypes are converted), finite, no zero
                rows; rows are L2-normalized before training. ``n >= 1``.
            k: Requested number of centroids, ``>= 1``.
            seed: Seed for subsampling and faiss initialization (deterministic for a given input).
            niter: k-means iterations, ``>= 1``.

        Returns:
            The trained codebook, ``k_effective <= k`` centroids.

        Raises:
            ValueError: On an empty or malformed input, ``k < 1`` or ``niter < 1``.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if niter < 1:
            raise ValueError(f"niter must be >= 1, got {niter}")
        x = _as_matrix(embeddings)
        n, dim = x.shape
        if n == 0:
            raise ValueError("cannot train a codebook on zero embeddings")
        k_eff = max(1, min(k, n // MIN_POINTS_PER_CENTROID))
        cap = k_eff * MAX_POINTS_PER_CENTROID
        if n > cap:
            rows = np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))
            x = x[rows]
        unit = _normalized(x, "embeddings")
        if k_eff == 1:
            mean = unit.astype(np.float64).sum(axis=0)
            if np.linalg.norm(mean) <= 1e-9 * unit.shape[0]:
                mean = unit[0].astype(np.float64)  # directions cancel out: any member will do
            return cls(mean[None, :])
        kmeans = faiss.Kmeans(
            dim,
            k_eff,
            niter=niter,
            seed=seed,
            spherical=True,
            verbose=False,
            max_points_per_centroid=MAX_POINTS_PER_CENTROID,
            min_points_per_centroid=1,
        )
        kmeans.train(unit)
        return cls(np.asarray(kmeans.centroids, dtype=np.float32).reshape(k_eff, dim))

    def _flat_index(self) -> Any:
        if self._index is None:
            index = faiss.IndexFlatIP(self.dim)
            index.add(np.ascontiguousarray(self.centroids))
            self._index = index
        return self._index

    def assign(self, embeddings: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """Nearest centroid of each row by inner product (cosine for unit rows).

        Works in chunks of 65,536 rows, so memory stays bounded for millions of rows.

        Args:
            embeddings: ``(n, dim)`` float32 (other numeric dtypes are converted); need not be
                normalized (the arg-max of the inner product does not depend on a row's norm).

        Returns:
            ``(n,)`` int64 centroid indices in ``[0, k)``.

        Raises:
            ValueError: On a wrong shape/dimension or rows faiss cannot place (NaN).
        """
        arr = np.asarray(embeddings)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"embeddings must have shape (n, {self.dim}), got {arr.shape}")
        n = arr.shape[0]
        out = np.empty(n, dtype=np.int64)
        if n == 0:
            return out
        if self.k == 1:
            out.fill(0)
            return out
        index = self._flat_index()
        for start in range(0, n, _ASSIGN_CHUNK_ROWS):
            chunk = np.ascontiguousarray(arr[start : start + _ASSIGN_CHUNK_ROWS], dtype=np.float32)
            _, labels = index.search(chunk, 1)
            out[start : start + chunk.shape[0]] = labels[:, 0]
        if out.min() < 0:
            raise ValueError("embeddings contain rows that cannot be assigned (NaN?)")
        return out

    def to_bytes(self) -> bytes:
        """Serialize as ``header | float32 little-endian centroids | CRC-32``.

        Header (16 bytes, little-endian): magic ``b"OMCB"``, format version (u16, 1), flags (u16,
        0), k (u32), dim (u32). Size: ``20 + 4 * k * dim`` bytes (393,236 for 256 x 384).

        Returns:
            The encoded codebook.
        """
        header = _HEADER.pack(_MAGIC, _FORMAT_VERSION, 0, self.k, self.dim)
        payload = np.ascontiguousarray(self.centroids, dtype="<f4").tobytes()
        crc = zlib.crc32(payload, zlib.crc32(header))
        return header + payload + _TRAILER.pack(crc)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Codebook:
        """Decode ``to_bytes`` output, validating every field.

        Args:
            data: Encoded codebook.

        Returns:
            The codebook.

        Raises:
            ValueError: On a wrong magic, unknown version or flags, a size that does not match
                ``k`` and ``dim``, a CRC mismatch, non-finite values or centroids that are not
                unit vectors (tolerance 1e-3).
        """
        raw = bytes(data)
        if len(raw) < _HEADER.size + _TRAILER.size:
            raise ValueError("codebook data too short")
        magic, version, flags, k, dim = _HEADER.unpack_from(raw)
        if magic != _MAGIC:
            raise ValueError("not a codebook (bad magic)")
        if version != _FORMAT_VERSION:
            raise ValueError(f"unsupported codebook format version {version}")
        if flags != 0:
            raise ValueError(f"unsupported codebook flags {flags:#x}")
        if k < 1 or dim < 1:
            raise ValueError(f"invalid codebook shape ({k}, {dim})")
        expected = _HEADER.size + 4 * k * dim + _TRAILER.size
        if len(raw) != expected:
            raise ValueError(f"codebook data has {len(raw)} bytes, expected {expected}")
        body_end = expected - _TRAILER.size
        (crc,) = _TRAILER.unpack_from(raw, body_end)
        if zlib.crc32(raw[:body_end]) != crc:
            raise ValueError("codebook checksum mismatch")
        centroids = np.frombuffer(raw, dtype="<f4", count=k * dim, offset=_HEADER.size)
        centroids = centroids.reshape(k, dim).astype(np.float32)
        if not np.isfinite(centroids).all():
            raise ValueError("codebook contains non-finite values")
        norms = np.linalg.norm(centroids.astype(np.float64), axis=1)
        if np.any(np.abs(norms - 1.0) > _NORM_TOLERANCE):
            raise ValueError("codebook centroids are not unit vectors")
        return cls(centroids)
