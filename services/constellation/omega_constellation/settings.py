"""Constellation settings, read from ``OMEGA_CONSTELLATION_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from omega_common.settings import ServiceSettings

__all__ = ["ConstellationSettings"]


class ConstellationSettings(ServiceSettings):
    """One replica of one shard."""

    model_config = SettingsConfigDict(
        env_prefix="OMEGA_CONSTELLATION_", extra="ignore", frozen=True
    )

    shard_id: str = Field("shard-0", description="This replica's shard id.")
    shard_ids: list[str] = Field(
        default_factory=lambda: ["shard-0"],
        min_length=1,
        description="Every shard id of the shard map (JSON list); devices hash over it.",
    )
    host: str = Field("127.0.0.1", description="Interface the gRPC server binds.")
    port: int = Field(
        50051, ge=0, le=65535, description="gRPC port; 0 picks a free port (logged at start)."
    )
    grace_seconds: float = Field(
        10.0, ge=0, description="Drain time for in-flight RPCs on SIGTERM."
    )
    max_delta_bytes: int = Field(
        256 * 1024, gt=0, description="Hard limit on a delta's decompressed size, in bytes."
    )
    max_request_bytes: int = Field(
        1024 * 1024, gt=0, description="gRPC receive limit per message, in bytes."
    )
    max_patterns_per_delta: int = Field(
        256, gt=0, description="Patterns (added + updated) per delta."
    )
    max_content_views_per_delta: int = Field(
        1024, ge=0, description="View-count entries per delta."
    )
    min_success_rate: float = Field(
        0.7,
        ge=0.0,
        le=1.0,
        description="Patterns below this success rate are not stored (quality threshold).",
    )
    max_global_patterns_per_sync: int = Field(
        256, ge=0, description="Global patterns sent in one sync response, best quality first."
    )
    trending_per_sync: int = Field(
        50, ge=0, description="Trending items sent in one sync response."
    )
    export_settle_ms: int = Field(
        1000,
        ge=0,
        description=(
            "ExportPatterns only returns rows stored at least this long ago (ms), so a "
            "transaction still committing cannot slip under the watermark."
        ),
    )
    catalog_path: Path | None = Field(
        None,
        description=(
            "An .npz catalog (content_ids, titles, genres, embeddings) loaded into "
            "content_embeddings at start-up when its contents changed."
        ),
    )
    db_pool_min_size: int = Field(2, ge=1, description="asyncpg pool minimum connections.")
    db_pool_max_size: int = Field(10, ge=1, description="asyncpg pool maximum connections.")
    db_timeout_seconds: float = Field(5.0, gt=0, description="Timeout of one database operation.")
