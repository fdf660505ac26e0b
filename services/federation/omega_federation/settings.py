"""Federation worker settings, read from ``OMEGA_FEDERATION_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from omega_common.settings import ServiceSettings

__all__ = ["FederationSettings"]


class FederationSettings(ServiceSettings):
    """One federation worker (only one runs a round at a time: a Postgres advisory lock)."""

    model_config = SettingsConfigDict(env_prefix="OMEGA_FEDERATION_", extra="ignore", frozen=True)

    shards: dict[str, str] = Field(
        default_factory=lambda: {"shard-0": "127.0.0.1:50061"},
        description="Shard id -> address of its internal (federation) listener, as JSON: "
        '{"shard-0": "host:port", ...}.',
    )
    interval_seconds: float = Field(
        300.0, gt=0, description="Time between round starts (periodic)."
    )
    min_success_rate: float = Field(
        0.8, ge=0.0, le=1.0, description="Round threshold on exported patterns."
    )
    min_sources: int = Field(
        1000,
        ge=1,
        description="Patterns pipeline (patterns_enabled): k-anonymity, distinct devices a "
        "group needs to be published (the model has model_min_devices).",
    )
    codebook_size: int = Field(
        64,
        ge=1,
        description="Patterns pipeline (patterns_enabled): k-means centroids of the "
        "pattern-key codebook.",
    )
    epsilon: float = Field(
        1.0,
        gt=0,
        description="Patterns pipeline (patterns_enabled): differential privacy budget per "
        "round (epsilon); the model has its own ledger (model_epsilon_budget).",
    )
    delta: float = Field(
        1e-6,
        gt=0,
        lt=1,
        description="Patterns pipeline (patterns_enabled): differential privacy delta per "
        "round (Gaussian).",
    )
    clipping_norm: float = Field(
        20.0,
        gt=0,
        description="Patterns pipeline (patterns_enabled): per-device clip of the weight "
        "success_rate x sample_count.",
    )
    mechanism: Literal["gaussian", "laplace"] = Field(
        "gaussian", description="Patterns pipeline (patterns_enabled): DP noise."
    )
    max_patterns_per_device: int = Field(
        8,
        ge=1,
        description="Patterns pipeline (patterns_enabled): groups one device may join per round.",
    )
    trend_decay_per_hour: float = Field(0.95, gt=0, le=1, description="Trend score decay per hour.")
    trend_noise_scale: float = Field(
        1.0,
        ge=0,
        description="Legacy pipeline (patterns_enabled): Laplace scale of the noise added to "
        "per-content view counts.",
    )
    trending_top_n: int = Field(100, ge=0, description="Trending items published per round.")
    export_batch_size: int = Field(2000, gt=0, description="Patterns per ExportPatterns batch.")
    rpc_timeout_seconds: float = Field(120.0, gt=0, description="Deadline of one shard RPC.")
    rpc_attempts: int = Field(3, ge=1, description="Attempts per shard RPC on UNAVAILABLE.")
    seed: int | None = Field(None, description="RNG seed for reproducible rounds (tests).")
    service_token: SecretStr | None = Field(
        None,
        description="The worker's credential for the shards' internal listener "
        "(`omega-constellation issue-token --service federation-worker`).",
    )
    service_token_file: Path | None = Field(
        None, description="A file holding service_token (e.g. a mounted Secret)."
    )

    def token(self) -> str | None:
        """The service token from ``service_token`` or ``service_token_file``, if any."""
        if self.service_token is not None:
            return self.service_token.get_secret_value()
        if self.service_token_file is not None:
            return self.service_token_file.read_text().strip()
        return None

    patterns_enabled: bool = Field(
        False,
        description="Legacy pipeline: also publish averaged global context patterns, and take "
        "trends from the shards' view counts with Laplace noise (their own DP, zCDP and "
        "Laplace, outside the model's ledger). The default (false) releases only the "
        "collaborative model, whose count release also gives the trending list, so the "
        "model's ledger is each device's whole privacy loss.",
    )

    # The collaborative model (federated subspace iteration, omega_federation.model_round).
    # Defaults: the values chosen on the MovieLens validation split at epsilon 8
    # (bench/collaborative_quality.py, README "Federated collaborative filtering").
    model_factors: int = Field(
        8, ge=0, le=256, description="Factors per item of the global model; 0 disables it."
    )
    model_active_items: int = Field(
        250, ge=1, description="Items in the model: the top ones by the first noisy counts."
    )
    model_noise_multiplier: float | None = Field(
        None,
        ge=0,
        description="Gaussian noise multiplier z of every model release (sensitivity 1); 0 "
        "releases exact sums (no privacy); unset: calibrated so that "
        "model_planned_releases releases spend model_epsilon_budget.",
    )
    model_epsilon_budget: float = Field(
        8.0, gt=0, description="Cumulative epsilon per device the model may spend, all rounds."
    )
    model_delta: float = Field(
        1e-5, gt=0, lt=1, description="Delta per device of the model's releases, all rounds."
    )
    model_planned_releases: int = Field(
        3, ge=1, description="Releases the budget is planned for (1 count release + steps)."
    )
    model_min_devices: int = Field(
        1, ge=1, description="Devices a round needs before it releases anything for the model."
    )
