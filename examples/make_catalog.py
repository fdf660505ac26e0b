"""Write a synthetic catalog for the examples in the format of ``init``'s ``catalog_file``.

Usage: python examples/make_catalog.py OUT.npz [N_ITEMS]

The .npz holds ``content_ids`` (n,) str ("item-0" ...), ``embeddings`` (n, 384) float32 unit
rows drawn around 8 taste clusters, ``titles`` (n,) str and ``genres`` (n,) str ("|"-joined).
A real catalog comes from the shard (the ``sync`` op fetches it) or from your own embeddings.
"""

from __future__ import annotations

import sys

import numpy as np

GENRES = ["Drama", "Comedy", "Action", "Documentary", "Animation", "Thriller", "Romance", "Sci-Fi"]


def write_catalog(path: str, n: int = 200, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((len(GENRES), 384)).astype(np.float32)
    x = centers[np.arange(n) % len(GENRES)] + 0.6 * rng.standard_normal((n, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.savez(
        path,
        content_ids=np.array([f"item-{i}" for i in range(n)]),
        embeddings=x,
        titles=np.array([f"Title {i}" for i in range(n)]),
        genres=np.array([GENRES[i % len(GENRES)] for i in range(n)]),
    )


if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 3:
        sys.exit(__doc__)
    write_catalog(sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else 200)
