"""Simulator settings, read from ``OMEGA_SIMULATOR_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["SimulatorSettings"]


class SimulatorSettings(BaseSettings):
    """A MovieLens replay: one device per user, ratings in time order as viewing events."""

    model_config = SettingsConfigDict(env_prefix="OMEGA_SIMULATOR_", extra="ignore", frozen=True)

    shards: dict[str, str] = Field(
        default_factory=dict,
        description="Shard id -> gRPC address as JSON; empty: `run` starts its own shards.",
    )
    shard_count: int = Field(2, ge=1, description="Shards `run` starts when none are given.")
    plaintext: bool = Field(
        False, description="`replay`: the shards serve without TLS (tests and debugging)."
    )
    tls_ca_file: Path | None = Field(
        None, description="`replay`: PEM CA of the shards' certificates (unset: system roots)."
    )
    fleet_keys_file: Path | None = Field(
        None,
        description="`replay`: the fleet keys JSON the simulated devices' tokens are issued "
        "with (unset: devices send no credential).",
    )
    phases: int = Field(4, ge=1, description="Training history split into this many phases.")
    sync_every_events: int = Field(5, ge=1, description="A device syncs after this many events.")
    workers: int = Field(4, ge=1, description="Threads replaying devices concurrently.")
    max_users: int | None = Field(None, ge=1, description="Replay only the first N users (tests).")
    train_fraction: float = Field(
        0.8, gt=0, lt=1, description="Chronological split (ARCHITECTURE.md 8)."
    )
    min_sources: int = Field(
        3, ge=1, description="k-anonymity of the federation rounds `run` runs."
    )
    epsilon: float = Field(
        8.0,
        gt=0,
        description=(
            "DP epsilon per round of the federation worker. 943 devices are a tiny fleet: at "
            "epsilon 1 the noise needed hides every group (production fleets have millions)."
        ),
    )
    # Defaults of the model knobs: chosen on the MovieLens validation split
    # (bench/collaborative_quality.py; README "Federated collaborative filtering").
    codebook_size: int = Field(4, ge=1, description="Codebook centroids (pattern keys per bucket).")
    clipping_norm: float = Field(5.0, gt=0, description="Per-device weight clip of the rounds.")
    max_patterns_per_device: int = Field(2, ge=1, description="Groups a device may join per round.")
    seed: int = Field(42, description="Seed of the federation worker's noise.")
    patterns: bool = Field(
        False,
        description="Legacy pipeline: also publish averaged global context patterns, and "
        "trends from view counts (their own DP, outside the model's ledger). Off: trending "
        "comes from the model's count release and the model's cumulative epsilon is each "
        "device's whole privacy loss over the replay.",
    )
    model_factors: int = Field(
        8, ge=1, le=256, description="Factors of the collaborative model in the DP run."
    )
    model_active_items: int = Field(250, ge=1, description="Items in the model (DP run).")
    model_rounds: int = Field(
        2, ge=1, description="Model steps after the round that creates it (DP run)."
    )
    model_epsilon: float = Field(
        8.0,
        gt=0,
        description="Cumulative epsilon per device of the model over the whole replay; the "
        "noise multiplier is calibrated for 1 + model_rounds releases at model_delta.",
    )
    model_delta: float = Field(1e-5, gt=0, lt=1, description="Delta per device of the model.")
    clean_model_factors: int = Field(
        32, ge=1, le=256, description="Factors of the model in the run without noise."
    )
    clean_model_rounds: int = Field(
        8,
        ge=0,
        description="Model steps of the run without noise; 0 skips that run. 8: the fewest "
        "rounds within 1% of the best validation precision@10 (4: 0.0992, 8: 0.1012, "
        "16: 0.1019), each round costing every device a model download.",
    )
    brain: dict[str, Any] = Field(
        default_factory=dict,
        description='BrainConfig overrides as JSON, e.g. {"trend_weight": 0.5}.',
    )
    export_settle_ms: int = Field(300, ge=0, description="Shards' export settle time (ms).")
    output_dir: Path = Field(Path("reports"), description="Where the JSON report is written.")
    work_dir: Path | None = Field(
        None, description="Device stores and logs; a temporary folder when unset."
    )
