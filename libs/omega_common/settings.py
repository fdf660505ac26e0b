"""Base class for the services' settings (pydantic-settings, read from the environment)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ServiceSettings"]


class ServiceSettings(BaseSettings):
    """Fields every service has. Subclasses set ``env_prefix="OMEGA_<SERVICE>_"``."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    log_level: str = Field("INFO", description="Log level: DEBUG, INFO, WARNING or ERROR.")
    log_json: bool = Field(True, description="JSON log lines (True) or console text (False).")
    database_url: str | None = Field(
        None,
        description=(
            "asyncpg DSN of this service's Postgres database. Unset: an embedded Postgres "
            "(pgserver) is started under the cache folder and a database named after the "
            "service is used."
        ),
    )
    metrics_port: int = Field(
        0, description="Port of the Prometheus /metrics HTTP endpoint; 0 disables it."
    )
