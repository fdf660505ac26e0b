"""The simulator's report: sync figures, federation figures and recommendation quality."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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

    def merge(self, other: SyncStats) -> None:
        """Add another collector's samples to this one."""
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

    @property
    def global_patterns_published(self) -> int:
        """Patterns in the last published round (what devices hold now)."""
        return int(self.rounds[-1].get("patterns_published", 0)) if self.rounds else 0

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
            "wall_seconds": self.wall_seconds,
            "settings": self.settings,
        }

    def write(self, folder: Path) -> Path:
        """Write the report as JSON under ``folder``; returns the file path."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "simulation-report.json"
        path.write_text(json.dumps(self.to_json(), indent=2, default=str))
        return path

    def render(self) -> str:
        """The human-readable report."""
        s = self.syncs.summary()
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
            f"privacy                 epsilon {last.get('cumulative_epsilon', 0.0):.2f} "
            f"cumulative over {len(self.rounds)} rounds",
            f"wall time               {self.wall_seconds:.1f} s",
            "",
            f"{'recommender':<22}{'users':>6}{'P@10':>8}{'R@20':>8}{'NDCG@10':>9}{'Cov@10':>8}",
        ]
        for q in self.quality:
            lines.append(
                f"{q.recommender:<22}{q.users:>6}{q.precision_at_10:>8.4f}{q.recall_at_20:>8.4f}"
                f"{q.ndcg_at_10:>9.4f}{q.coverage_at_10:>8.4f}"
            )
        if self.syncs.errors:
            lines += ["", "sync errors: " + json.dumps(self.syncs.errors)]
        return "\n".join(lines)
