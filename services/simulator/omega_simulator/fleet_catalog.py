"""The catalog's structure as the synthetic devices see it: content ids grouped in clusters.

A device's taste is a few favourite clusters; what it watches are items of those clusters and
its patterns' embeddings are mixes of their centroids. The clusters come from the catalog's
embeddings (a few rounds of k-means), read from a catalog file (the shards' ``.npz``) or
fetched from a shard with ``FetchEmbeddings``; `synthetic_catalog` makes a clustered one for
local runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt

from omega.v1 import patterns_pb2, sync_pb2, sync_pb2_grpc
from omega_protocol import EMBEDDING_DIM, decode_embedding

__all__ = ["CatalogTaste", "fetch_catalog", "load_catalog_file", "synthetic_catalog"]

_KMEANS_SAMPLE = 20_000
_KMEANS_ROUNDS = 10


@dataclass(frozen=True)
class CatalogTaste:
    """Content ids by cluster and the clusters' centroids.

    Attributes:
        content_ids: (n,) str, the catalog's ids.
        labels: (n,) int32, the cluster of each item.
        centroids: (k, 384) float32, L2-normalized.
    """

    content_ids: npt.NDArray[np.str_]
    labels: npt.NDArray[np.int32]
    centroids: npt.NDArray[np.float32]

    @property
    def clusters(self) -> int:
        """Number of clusters (k)."""
        return int(self.centroids.shape[0])

    def members(self) -> list[npt.NDArray[np.int32]]:
        """Item positions of each cluster (a cluster may be empty)."""
        return [np.flatnonzero(self.labels == c).astype(np.int32) for c in range(self.clusters)]

    @classmethod
    def from_embeddings(
        cls, content_ids: list[str], embeddings: npt.NDArray[np.float32], k: int, seed: int
    ) -> CatalogTaste:
        """Cluster ``embeddings`` ((n, 384) float32) into ``min(k, n)`` groups (k-means,
        cosine, a few rounds on a sample of at most 20,000 items)."""
        if len(content_ids) == 0 or len(content_ids) != embeddings.shape[0]:
            raise ValueError("the catalog is empty or its ids and embeddings differ in length")
        x = embeddings.astype(np.float32)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        rng = np.random.default_rng(seed)
        k = min(k, x.shape[0])
        sample = x if x.shape[0] <= _KMEANS_SAMPLE else x[rng.choice(x.shape[0], _KMEANS_SAMPLE)]
        centroids = sample[rng.choice(sample.shape[0], k, replace=False)].copy()
        for _ in range(_KMEANS_ROUNDS):
            assign = np.argmax(sample @ centroids.T, axis=1)
            for c in range(k):
                chosen = sample[assign == c]
                if chosen.shape[0]:
                    centroids[c] = chosen.mean(axis=0)
            centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        labels = np.argmax(x @ centroids.T, axis=1).astype(np.int32)
        return cls(np.array(content_ids), labels, centroids.astype(np.float32))


def synthetic_catalog(
    n_items: int = 2000, clusters: int = 40, seed: int = 0
) -> tuple[list[str], npt.NDArray[np.float32]]:
    """A clustered random catalog: ``(ids, (n, 384) float32 unit embeddings)``."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, EMBEDDING_DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    which = rng.integers(0, clusters, n_items)
    emb = centres[which] + 0.6 * rng.standard_normal((n_items, EMBEDDING_DIM)).astype(
        np.float32
    ) / np.sqrt(EMBEDDING_DIM)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return [f"sim{i:06d}" for i in range(n_items)], emb.astype(np.float32)


def write_catalog_npz(path: Path, ids: list[str], embeddings: npt.NDArray[np.float32]) -> None:
    """Write a catalog in the shards' ``.npz`` layout (ids, titles, genres, embeddings)."""
    np.savez(
        path,
        content_ids=np.array(ids),
        titles=np.array([f"Simulated title {i}" for i in range(len(ids))]),
        genres=np.array(["Drama" if i % 2 else "Comedy" for i in range(len(ids))]),
        embeddings=embeddings,
    )


def load_catalog_file(path: Path) -> tuple[list[str], npt.NDArray[np.float32]]:
    """Read a shards' catalog ``.npz`` (``content_ids``, ``embeddings``).

    Raises:
        OSError: unreadable; KeyError: a missing array.
    """
    with np.load(path) as npz:
        return [str(c) for c in npz["content_ids"]], npz["embeddings"].astype(np.float32)


def fetch_catalog(
    channel: grpc.Channel,
    metadata: tuple[tuple[str, str], ...] = (),
    timeout_seconds: float = 30.0,
    page_size: int = 1000,
) -> tuple[list[str], npt.NDArray[np.float32]]:
    """Every catalog item of a shard over ``FetchEmbeddings`` (int8, paged).

    Raises:
        grpc.RpcError: the shard refused or failed.
    """
    stub = sync_pb2_grpc.ConstellationSyncStub(channel)
    ids: list[str] = []
    vectors: list[npt.NDArray[np.float32]] = []
    token = ""
    while True:
        page: sync_pb2.FetchEmbeddingsResponse = stub.FetchEmbeddings(
            sync_pb2.FetchEmbeddingsRequest(
                encoding=patterns_pb2.EMBEDDING_ENCODING_INT8,
                page_size=page_size,
                page_token=token,
            ),
            timeout=timeout_seconds,
            metadata=metadata,
        )
        for item in page.items:
            ids.append(item.content_id)
            vectors.append(decode_embedding(item.embedding))
        token = page.next_page_token
        if not token:
            break
    if not ids:
        return [], np.zeros((0, EMBEDDING_DIM), np.float32)
    return ids, np.stack(vectors).astype(np.float32)
