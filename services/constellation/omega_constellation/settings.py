"""Constellation settings, read from ``OMEGA_CONSTELLATION_*`` environment variables."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from omega_common.auth import FleetKeys, FleetKeysFile, TokenVerifier
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
    host: str = Field(
        "127.0.0.1",
        description="Interface the device listener, /metrics and the probe listener bind.",
    )
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
    max_views_per_content: int = Field(
        1000,
        ge=1,
        le=2**32,
        description=(
            "Views of one content id in one sync (summed over its entries); a delta above it "
            "is refused with INVALID_ARGUMENT. A TV watches an item a few times between syncs."
        ),
    )
    max_views_per_sync: int = Field(
        10_000,
        ge=1,
        le=2**40,
        description=(
            "Views of all content ids together in one sync; a delta above it is refused with "
            "INVALID_ARGUMENT, so one device cannot flood the shard's view counts."
        ),
    )
    max_version_step: int = Field(
        1_000_000,
        ge=1,
        le=2**63 - 1,
        description=(
            "Most a device's local version may advance in one sync over the last version the "
            "shard applied (a new device starts from 0); a bigger jump is refused with "
            "INVALID_ARGUMENT and nothing written, so a device sending 2^63 - 1 cannot wedge "
            "itself. A TV bumps its version once per viewing event."
        ),
    )
    max_round_step: int = Field(
        1_000,
        ge=1,
        le=2**62,
        description="Most a published round may advance the shard's global version; a bigger "
        "jump is refused (INVALID_ARGUMENT), so one bad PublishRound cannot make every later "
        "legitimate round a duplicate. A shard without rounds yet (new, or restored empty) "
        "takes any first round up to 2^53.",
    )
    min_published_sources: int = Field(
        1_000,
        ge=1,
        le=2**31 - 1,
        description="k-anonymity checked again by the shard: a published global pattern "
        "must have at least this many source devices (keep it equal to the worker's "
        "OMEGA_FEDERATION_MIN_SOURCES).",
    )
    max_published_patterns: int = Field(
        100_000, ge=0, le=10_000_000, description="Global patterns one PublishRound may carry."
    )
    max_published_trending: int = Field(
        10_000, ge=0, le=1_000_000, description="Trending items one PublishRound may carry."
    )
    max_device_count: int = Field(
        1_000_000_000,
        ge=0,
        le=2**63 - 1,
        description=(
            "Largest value of any counter in a ReportMetrics report (events observed, "
            "recommendations served, syncs ok/failed, patterns); a report above it is refused."
        ),
    )
    max_device_bytes: int = Field(
        1 << 40,
        ge=0,
        le=2**63 - 1,
        description="Largest store or memory size in a ReportMetrics report, in bytes.",
    )
    max_device_latency_ms: float = Field(
        60_000.0,
        gt=0,
        le=3_600_000.0,
        description="Largest recommendation latency in a ReportMetrics report, in ms.",
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
    max_sync_answer_bytes: int = Field(
        5120,
        ge=2048,
        le=4 << 20,
        description="Byte budget of one SyncPatterns answer: global patterns that do not fit "
        "are sent by the next syncs (best first; next_global_page_offset).",
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

    # Readiness, memory and load control (issue 6, items 6 and 7).
    db_probe_interval_seconds: float = Field(
        2.0,
        ge=0.05,
        le=300.0,
        description="Pause between two readiness probes of the database (SELECT 1), in "
        "seconds; gRPC health is NOT_SERVING from the first failed probe to the next success.",
    )
    db_probe_timeout_seconds: float = Field(
        1.0,
        ge=0.05,
        le=60.0,
        description="A readiness probe (connection from the pool + SELECT 1) taking longer "
        "than this, in seconds, counts as a failure.",
    )
    max_global_patterns_held: int = Field(
        10_000,
        ge=0,
        le=10_000_000,
        description="Global patterns held in memory for sync answers, at most (best quality "
        "first, only those a sync answer can send); at least max_global_patterns_per_sync.",
    )
    max_concurrent_rpcs: int = Field(
        256,
        ge=1,
        le=100_000,
        description="RPCs one server handles at once; past it gRPC answers RESOURCE_EXHAUSTED.",
    )
    max_pending_calls: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="Calls gRPC core holds for the device listener before the replica's event "
        "loop takes them (grpc.server.max_pending_requests; the hard limit is 3x). Past it, "
        "under overload, new calls are dropped at random, then all, before any handler runs: "
        "clients see CANCELLED (the brain retries it). Lower bounds the queueing delay of an "
        "overloaded replica (about this / its syncs per second); gRPC's default is 1000.",
    )
    sync_batch_max: int = Field(
        256,
        ge=1,
        le=10_000,
        description="Group commit: most syncs applied in one database transaction.",
    )
    sync_batch_max_wait_ms: float = Field(
        0.0,
        ge=0.0,
        le=1000.0,
        description="Group commit: how long a batch smaller than sync_batch_max waits for "
        "more syncs once a transaction slot is free, in ms (0: never; batches still grow "
        "under load, while the slots are busy).",
    )
    sync_batch_concurrency: int = Field(
        4,
        ge=1,
        le=64,
        description="Group commit: batches (transactions) running at once, at most, each on "
        "one pooled connection (keep it below db_pool_max_size). One runs at a time while "
        "batches are quick; another starts beside those older than sync_slow_batch_ms.",
    )
    sync_slow_batch_ms: float = Field(
        50.0,
        ge=0.0,
        le=60_000.0,
        description="Group commit: a batch running longer than this (waiting on a lock, a "
        "slow disk) lets the next batch start beside it, in ms.",
    )
    sync_queue_max: int = Field(
        4096,
        ge=1,
        le=1_000_000,
        description="Group commit: most syncs queued for a transaction; past it a sync is "
        "refused with RESOURCE_EXHAUSTED and a retry hint instead of waiting.",
    )
    device_rate_per_second: float = Field(
        2.0,
        ge=0.0,
        le=10_000.0,
        description="ConstellationSync calls one device may make per second, sustained, per "
        "replica (token bucket refill); the device is the one of the verified credential, or "
        "without credentials the request's device_id (SyncPatterns, ReportMetrics). 0 "
        "disables the rate limit. Over it: RESOURCE_EXHAUSTED with a retry-after-ms trailer.",
    )
    device_burst: int = Field(
        120,
        ge=1,
        le=1_000_000,
        description="Device RPCs one device may make at once (token bucket size), e.g. the "
        "catalog pages of a first start.",
    )
    rate_limit_max_devices: int = Field(
        100_000,
        ge=1,
        le=10_000_000,
        description="Devices whose token bucket a replica holds at most (least recently seen "
        "forgotten first; a forgotten device starts again with a full burst).",
    )
    sync_interval_seconds: float = Field(
        300.0,
        ge=1.0,
        le=86_400.0,
        description="Base pause a sync answer asks before the device's next sync "
        "(next_sync_after_ms), in seconds: the fleet's pace.",
    )
    sync_interval_jitter: float = Field(
        0.2,
        ge=0.0,
        le=0.9,
        description="Random spread of that pause, as a fraction: uniform in [1 - j, 1 + j] "
        "times the paced interval, so devices do not sync in lock-step.",
    )
    pace_pressure_threshold: float = Field(
        0.5,
        ge=0.0,
        le=0.99,
        description="Load (fraction of max_concurrent_rpcs in flight, or of the device's "
        "burst spent) above which sync answers stretch the pause, linearly up to "
        "pace_max_multiplier at full load.",
    )
    pace_max_multiplier: float = Field(
        4.0,
        ge=1.0,
        le=100.0,
        description="Largest stretch of the pause under full load (1: never stretched).",
    )

    @model_validator(mode="after")
    def _held_covers_one_answer(self) -> ConstellationSettings:
        if self.max_global_patterns_held < self.max_global_patterns_per_sync:
            raise ValueError(
                "max_global_patterns_held must be >= max_global_patterns_per_sync"
                f" ({self.max_global_patterns_held} < {self.max_global_patterns_per_sync})"
            )
        return self

    # Identity and the internal listener (issue 6). Secrets never live in the repository.
    federation_host: str = Field(
        "127.0.0.1",
        description="Interface of the internal listener serving the Federation API (to the "
        "federation worker only: mutual TLS and a service token).",
    )
    federation_port: int = Field(
        50061, ge=0, le=65535, description="Internal listener's port; 0 picks a free port."
    )
    probe_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Plaintext listener serving only grpc.health.v1, for Kubernetes' native "
        "grpc probes (the kubelet cannot present TLS to a probe): service '' follows the "
        "device listener's readiness (NOT_SERVING while Postgres is unreachable), service "
        "'liveness' is SERVING while the process answers. On host:probe_port; 0 picks a "
        "free port; unset: no such listener.",
    )
    auth: bool = Field(
        True,
        description="Require credentials: a device token on the device port, a service token "
        "on the internal listener. False only for tests and debugging.",
    )
    fleet_keys: SecretStr | None = Field(
        None,
        description='Fleet secrets as JSON {"<key id>": "<base64, >= 32 bytes>"}: every key id '
        "is accepted, so keys rotate by adding one, re-issuing, then removing the old one.",
    )
    fleet_keys_file: Path | None = Field(
        None, description="A file holding the fleet_keys JSON (e.g. a mounted Secret)."
    )
    fleet_key_id: str | None = Field(
        None, description="Key id new tokens are issued under; default: the last one listed."
    )
    token_max_age_seconds: float | None = Field(
        None, gt=0, description="Tokens older than this are refused; unset: no expiry."
    )
    federation_services: list[str] = Field(
        default_factory=lambda: ["federation-worker"],
        description="Service names whose tokens the internal listener accepts.",
    )
    credentials_recheck_seconds: float = Field(
        5.0,
        gt=0,
        le=3600,
        description=(
            "Least time between two checks (os.stat) of the TLS files and the fleet keys file "
            "for a rotation: a changed file set is re-read and used for new TLS handshakes / "
            "token checks without a restart; a broken one is refused and the old one kept."
        ),
    )

    def token_verifier(self, on_reload: Callable[[str], None] | None = None) -> TokenVerifier:
        """What the listeners check tokens with: with ``fleet_keys_file`` alone, a
        `FleetKeysFile` re-read when the file changes (checked at most every
        ``credentials_recheck_seconds``); else the fixed `keys`.

        Raises:
            ValueError, OSError: as `keys`.
        """
        if self.fleet_keys is None and self.fleet_keys_file is not None:
            return FleetKeysFile(
                self.fleet_keys_file,
                self.fleet_key_id,
                self.token_max_age_seconds,
                recheck_seconds=self.credentials_recheck_seconds,
                on_reload=on_reload,
            )
        return self.keys()

    def keys(self) -> FleetKeys:
        """The fleet keys from ``fleet_keys`` or ``fleet_keys_file``.

        Raises:
            ValueError: neither is set, or the keys are malformed.
        """
        if self.fleet_keys is not None:
            text = self.fleet_keys.get_secret_value()
        elif self.fleet_keys_file is not None:
            text = self.fleet_keys_file.read_text()
        else:
            raise ValueError(
                "credentials need OMEGA_CONSTELLATION_FLEET_KEYS or _FLEET_KEYS_FILE "
                "(or OMEGA_CONSTELLATION_AUTH=false for tests)"
            )
        return FleetKeys.from_json(text, self.fleet_key_id, self.token_max_age_seconds)
