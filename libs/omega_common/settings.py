"""Base class for the services' settings (pydantic-settings, read from the environment)."""

from __future__ import annotations

from pathlib import Path

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
        0,
        ge=0,
        le=65535,
        description="Port of the Prometheus /metrics HTTP endpoint; 0 disables it (the "
        "federation worker serves it in periodic mode only).",
    )
    plaintext: bool = Field(
        False,
        description="Serve and call gRPC without TLS. Only for tests and debugging: without "
        "it the service refuses to start unless the TLS files below are set.",
    )
    tls_cert_file: Path | None = Field(
        None,
        description="PEM certificate of this service: the server certificate of a shard, the "
        "client certificate of the federation worker (mutual TLS).",
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle trusted for peers: the servers' CA for a client; for a "
        "shard, the CA that signs the federation worker's client certificate.",
    )

    def require_tls_files(self, *names: str) -> None:
        """Check that TLS is configured unless ``plaintext`` is set.

        Args:
            names: the fields this service needs (e.g. ``"tls_cert_file"``).

        Raises:
            ValueError: one of them is unset while ``plaintext`` is false.
        """
        if self.plaintext:
            return
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            prefix = str(self.model_config.get("env_prefix", ""))
            wanted = ", ".join(prefix + n.upper() for n in missing)
            raise ValueError(f"TLS needs {wanted} (or {prefix}PLAINTEXT=true for tests)")
