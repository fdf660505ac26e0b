"""Live Prometheus export of a fleet run (``omega-simulator fleet --metrics-port``).

The parent process keeps the latest cumulative figures each worker reports with its progress
(about once a second) and a custom collector sums them at every scrape: syncs by status
(``ok``, ``refused_as_expected`` and each failure status), the latency histogram (from the
scheduled time, open loop), bytes up and down, syncs scheduled and in flight. The server
listens on 127.0.0.1 only.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from omega_simulator.fleet_measure import LATENCY_BUCKETS_SECONDS

__all__ = ["FleetMetrics"]


class FleetMetrics(Collector):
    """The run's figures as Prometheus metrics, summed over the workers' latest progress."""

    def __init__(self, scenario_name: str) -> None:
        self.scenario = scenario_name
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._figures: dict[int, dict[str, Any]] = {}
        self._scheduled: dict[int, int] = {}
        self._lock = threading.Lock()
        self._server: Any = None
        self.port = 0

    def scheduled(self, worker: int, count: int) -> None:
        """Worker ``worker`` has ``count`` syncs scheduled."""
        with self._lock:
            self._scheduled[worker] = count

    def update(self, worker: int, figures: dict[str, Any]) -> None:
        """Worker ``worker``'s latest cumulative progress figures."""
        with self._lock:
            self._figures[worker] = figures

    def start(self, port: int) -> int:
        """Serve ``/metrics`` on 127.0.0.1:``port`` (0: any free port); returns the port."""
        self._server, _thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        self.port = int(self._server.server_port)
        return self.port

    def stop(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            figures = list(self._figures.values())
            scheduled = sum(self._scheduled.values())
        labels = ["scenario"]
        value = [self.scenario]
        syncs = CounterMetricFamily(
            "omega_fleet_syncs",
            "Syncs finished, by outcome (gRPC status name).",
            labels=[
                "scenario",
                "status",
            ],
        )
        statuses: dict[str, float] = {"ok": 0.0, "refused_as_expected": 0.0}
        for f in figures:
            statuses["ok"] += float(f.get("ok", 0))
            statuses["refused_as_expected"] += float(f.get("refused", 0))
            for status, n in f.get("errors", {}).items():
                statuses[status] = statuses.get(status, 0.0) + float(n)
        for status, n in sorted(statuses.items()):
            syncs.add_metric([self.scenario, status], n)
        yield syncs
        buckets = [0] * (len(LATENCY_BUCKETS_SECONDS) + 1)
        total = 0.0
        for f in figures:
            for i, n in enumerate(f.get("latency_buckets", ())):
                buckets[i] += int(n)
            total += float(f.get("latency_sum", 0.0))
        cumulative = []
        running = 0
        for bound, n in zip([*LATENCY_BUCKETS_SECONDS, float("inf")], buckets, strict=True):
            running += n
            cumulative.append(("+Inf" if bound == float("inf") else f"{bound:g}", running))
        latency = HistogramMetricFamily(
            "omega_fleet_sync_latency_seconds",
            "Answered syncs' latency from their scheduled time (open loop).",
            labels=labels,
        )
        latency.add_metric(value, cumulative, total)
        yield latency
        data = CounterMetricFamily(
            "omega_fleet_bytes",
            "Bytes of sync requests (up) and answers (down).",
            labels=[
                "scenario",
                "direction",
            ],
        )
        data.add_metric([self.scenario, "up"], sum(float(f.get("bytes_up", 0)) for f in figures))
        data.add_metric(
            [self.scenario, "down"], sum(float(f.get("bytes_down", 0)) for f in figures)
        )
        yield data
        gauge = GaugeMetricFamily(
            "omega_fleet_syncs_scheduled", "Syncs scheduled over the run.", labels=labels
        )
        gauge.add_metric(value, scheduled)
        yield gauge
        gauge = GaugeMetricFamily(
            "omega_fleet_syncs_in_flight", "Syncs sent and not answered yet.", labels=labels
        )
        gauge.add_metric(value, sum(float(f.get("inflight", 0)) for f in figures))
        yield gauge
