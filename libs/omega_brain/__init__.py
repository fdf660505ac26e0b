"""The Exogenesis Omega TV brain: on-device pattern learning, recommendations and sync.

Typical use::

    from omega_brain import Brain, BrainConfig, GrpcTransport, ViewingEvent

    with Brain("tv-1", BrainConfig(store_path="brain.db"),
               transport=GrpcTransport("shard-0:50051")) as brain:
        brain.fetch_catalog()
        brain.observe(ViewingEvent("movie-42", started_at_ms=1_700_000_000_000, completion=0.95))
        brain.sync()
        for rec in brain.recommend(10):
            print(rec.content_id, rec.score, rec.reasons)

Firmware without Python bindings uses the JSON facade, `JsonBrain.handle`. The brain imports
nothing server-side: stdlib, numpy, faiss, grpc, protobuf, zstandard and `omega_protocol`.
The names below are the stable API; a test freezes them.
"""

from omega_brain.brain import Brain
from omega_brain.catalog import CatalogIndex
from omega_brain.config import BrainConfig
from omega_brain.errors import (
    BrainError,
    CatalogError,
    InvalidArgumentError,
    InvalidEventError,
    StoreError,
    SyncError,
    UnknownContentError,
)
from omega_brain.facade import JsonBrain
from omega_brain.models import BrainStats, Recommendation, SyncResult, ViewingEvent
from omega_brain.transport import FetchedCatalog, GrpcTransport, SyncTransport, fetch_catalog

__version__ = "0.1.0"

__all__ = [
    "Brain",
    "BrainConfig",
    "BrainError",
    "BrainStats",
    "CatalogError",
    "CatalogIndex",
    "FetchedCatalog",
    "GrpcTransport",
    "InvalidArgumentError",
    "InvalidEventError",
    "JsonBrain",
    "Recommendation",
    "StoreError",
    "SyncError",
    "SyncResult",
    "SyncTransport",
    "UnknownContentError",
    "ViewingEvent",
    "__version__",
    "fetch_catalog",
]
