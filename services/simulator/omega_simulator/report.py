"""The simulator's report: sync figures, federation figures and recommendation quality."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from omega_simulator.fleet_run import FleetRun

__all__ = ["QualityRow", "SimulationReport", "SyncStats"]


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else 0.0


@dataclass
class SyncStats:
    """Per-sync samples collected during a replay."""

    ok: int = 0
    failed: int = 0
    bytes_up: list[int] = field(default_factory=list)
    bytes_down: list[int] = field(default_factory=list)
    latency_seconds: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    model_bytes_down: list[int] = field(default_factory=list)
    """Bytes of each model download (one per device per new model version)."""

    def merge(self, other: SyncStats) -> None:
        """Add another collector's samples to this one."""
        self.model_bytes_down += other.model_bytes_down
        self.ok += other.ok
        self.failed += other.failed
        self.bytes_up += other.bytes_up
        self.bytes_down += other.bytes_down
        self.latency_seconds += other.latency_seconds
        for k, v in other.errors.items():
            self.errors[k] = self.errors.get(k, 0) + v

    def summary(self) -> dict[str, float]:
        """Median/p95 bytes per sync and p50/p99 latency in milliseconds."""
        return {
            "bytes_up_median": _pct(self.bytes_up, 50),
            "bytes_up_p95": _pct(self.bytes_up, 95),
            "bytes_down_median": _pct(self.bytes_down, 50),
            "bytes_down_p95": _pct(self.bytes_down, 95),
            "latency_ms_p50": _pct(self.latency_seconds, 50) * 1000,
            "latency_ms_p99": _pct(self.latency_seconds, 99) * 1000,
            "bytes_down_max": float(max(self.bytes_down, default=0)),
            "model_downloads": float(len(self.model_bytes_down)),
            "model_bytes_per_download_median": _pct(self.model_bytes_down, 50),
            "model_bytes_per_download_p95": _pct(self.model_bytes_down, 95),
        }


@dataclass(frozen=True)
class QualityRow:
    """Ranking metrics of one recommender on the chronological hold-out."""

    recommender: str
    users: int
    precision_at_10: float
    recall_at_20: float
    ndcg_at_10: float
    coverage_at_10: float


@dataclass
class SimulationReport:
    """Everything `make run` prints."""

    devices: int
    shards: int
    events_replayed: int
    syncs: SyncStats
    patterns_stored: int
    rounds: list[dict[str, Any]]
    quality: list[QualityRow]
    wall_seconds: float
    settings: dict[str, Any]
    other_runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Other replays merged into this report (`add_run`): their privacy and sync figures."""
    privacy_curve: list[dict[str, float]] = field(default_factory=list)
    """Precision@10 per epsilon budget (``omega_simulator.privacy_plot``)."""
    fleet: FleetRun | None = None
    """This replay's syncs as a closed-loop fleet run (`omega_simulator.replay_fleet`), for
    `omega_simulator.fleet_report.write_report`; not part of `to_json`."""

    FEDERATED = "brain, federated"
    """Name `replay_movielens` gives the federated brain's quality row."""

    def label_federated(self, name: str) -> None:
        """Rename this run's federated-brain quality row (e.g. to say it ran with DP)."""
        self.quality = [
            replace(q, recommender=name) if q.recommender == self.FEDERATED else q
            for q in self.quality
        ]

    def add_run(self, name: str, other: SimulationReport) -> None:
        """Add another replay's federated-brain row as ``name``, and its figures."""
        self.quality += [
            replace(q, recommender=name) for q in other.quality if q.recommender == self.FEDERATED
        ]
        self.other_runs[name] = {
            "privacy": other.privacy,
            "syncs_ok": other.syncs.ok,
            "syncs_failed": other.syncs.failed,
            **other.syncs.summary(),
            "rounds": other.rounds,
            "wall_seconds": other.wall_seconds,
        }

    def add_central(self, row: QualityRow) -> None:
        """Insert the centrally trained reference right after the popularity row."""
        self.quality.insert(1 if self.quality else 0, row)

    @property
    def privacy(self) -> dict[str, Any]:
        """The collaborative model's privacy over the whole replay (per device).

        ``epsilon_per_round``: epsilon of each model release; ``cumulative_epsilon``: what the
        worker's ledger (dp-accounting, RDP) charged in all; ``delta``; ``noise_multiplier``.
        """
        model = [r.get("model") or {} for r in self.rounds]
        released = [m for m in model if m.get("model_action") in ("created", "stepped")]
        last = model[-1] if model else {}
        return {
            "epsilon_per_round": [float(m.get("model_epsilon_round", 0.0)) for m in released],
            "cumulative_epsilon": float(last.get("model_cumulative_epsilon") or 0.0),
            "delta": last.get("model_delta"),
            "noise_multiplier": float(last.get("model_noise_multiplier") or 0.0),
            "releases": len(released),
        }

    @property
    def global_patterns_published(self) -> int:
        """Patterns of the last round that published any (shards keep them: devices hold them)."""
        published = [int(r.get("patterns_published", 0)) for r in self.rounds]
        return next((n for n in reversed(published) if n > 0), 0)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (raw per-sync samples are summarized, not included)."""
        return {
            "devices": self.devices,
            "shards": self.shards,
            "events_replayed": self.events_replayed,
            "syncs_ok": self.syncs.ok,
            "syncs_failed": self.syncs.failed,
            "sync_errors": self.syncs.errors,
            **self.syncs.summary(),
            "patterns_stored": self.patterns_stored,
            "global_patterns_published": self.global_patterns_published,
            "rounds": self.rounds,
            "quality": [asdict(q) for q in self.quality],
            "privacy": self.privacy,
            "privacy_curve": self.privacy_curve,
            "other_runs": self.other_runs,
            "wall_seconds": self.wall_seconds,
            "settings": self.settings,
        }

    def write(self, folder: Path) -> Path:
        """Write the report as JSON under ``folder``; returns the file path."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "simulation-report.json"
        path.write_text(json.dumps(self.to_json(), indent=2, default=str))
        return path

    def _pattern_privacy_line(self, last: dict[str, Any]) -> str:
        legacy = any(
            r.get("patterns_published") or r.get("trend_source") == "view_counts"
            for r in self.rounds
        )
        if not legacy:
            return (
                "pattern privacy         none: no global patterns; trending is the model's "
                "count release, in its ledger"
            )
        return (
            f"pattern privacy         epsilon {last.get('cumulative_epsilon', 0.0):.2f} "
            f"cumulative over {len(self.rounds)} rounds (global patterns, zCDP; trends Laplace)"
        )

    def render(self) -> str:
        """The human-readable report."""
        s = self.syncs.summary()
        p = self.privacy
        last = self.rounds[-1] if self.rounds else {}
        lines = [
            "Exogenesis Omega — MovieLens 100K replay",
            "=" * 60,
            f"devices                 {self.devices} on {self.shards} shards",
            f"events replayed         {self.events_replayed}",
            f"syncs ok / failed       {self.syncs.ok} / {self.syncs.failed}",
            f"bytes up per sync       median {s['bytes_up_median']:.0f}, "
            f"p95 {s['bytes_up_p95']:.0f}",
            f"bytes down per sync     median {s['bytes_down_median']:.0f}, "
            f"p95 {s['bytes_down_p95']:.0f}",
            f"sync latency            p50 {s['latency_ms_p50']:.2f} ms, "
            f"p99 {s['latency_ms_p99']:.2f} ms",
            f"patterns stored         {self.patterns_stored}",
            f"federation rounds       {len(self.rounds)}",
            f"global patterns         {self.global_patterns_published} in the last round",
            f"bytes down max          {s['bytes_down_max']:.0f}",
            f"model downloads         {s['model_downloads']:.0f}, bytes per device per round"
            f" median {s['model_bytes_per_download_median']:.0f},"
            f" p95 {s['model_bytes_per_download_p95']:.0f}",
            self._pattern_privacy_line(last),
            f"model privacy           epsilon {p['cumulative_epsilon']:.2f} cumulative per device"
            f" over {p['releases']} releases (RDP), delta {p['delta']},"
            f" noise multiplier {p['noise_multiplier']:.3f}",
            f"wall time               {self.wall_seconds:.1f} s",
            "",
            f"{'recommender':<34}{'users':>6}{'P@10':>8}{'R@20':>8}{'NDCG@10':>9}{'Cov@10':>8}",
        ]
        for q in self.quality:
            lines.append(
                f"{q.recommender:<34}{q.users:>6}{q.precision_at_10:>8.4f}{q.recall_at_20:>8.4f}"
                f"{q.ndcg_at_10:>9.4f}{q.coverage_at_10:>8.4f}"
            )
        if self.syncs.errors:
            lines += ["", "sync errors: " + json.dumps(self.syncs.errors)]
        return "\n".join(lines)
