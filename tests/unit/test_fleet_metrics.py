"""Live Prometheus export of a fleet run: the workers' latest progress, summed at a scrape."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from omega_simulator.fleet_measure import Recorder
from omega_simulator.fleet_metrics import FleetMetrics


def _progress(rec: Recorder, inflight: int) -> dict[str, object]:
    return {
        "ok": rec.total_ok,
        "failed": rec.total_failed,
        "inflight": inflight,
        "bytes_up": sum(rec.bytes_up),
        "bytes_down": sum(rec.bytes_down),
        "refused": rec.total_refused,
        "errors": dict(rec.errors),
        "latency_buckets": list(rec.latency_buckets),
        "latency_sum": rec.latency_sum,
    }


def test_scrape_sums_the_workers_latest_figures() -> None:
    a, b = Recorder(1.0, 2), Recorder(1.0, 2)
    a.record_ok(0.0, 0.003, 100, 10, dup=False)  # 3 ms
    a.record_ok(0.0, 0.040, 100, 10, dup=False)  # 40 ms
    b.record_ok(0.0, 0.300, 200, 20, dup=False)  # 300 ms
    b.record_failure(0.0, "UNAVAILABLE", 50)
    b.record_refused(0.0, 70)
    metrics = FleetMetrics("unit")
    metrics.scheduled(0, 10)
    metrics.scheduled(1, 5)
    metrics.update(0, {"ok": 1})  # superseded by the next progress of worker 0
    metrics.update(0, _progress(a, 2))
    metrics.update(1, _progress(b, 1))
    port = metrics.start(0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    finally:
        metrics.stop()
    samples = {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "scenario"))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("omega_fleet_syncs_total", (("status", "ok"),))] == 3
    assert samples[("omega_fleet_syncs_total", (("status", "UNAVAILABLE"),))] == 1
    assert samples[("omega_fleet_syncs_total", (("status", "refused_as_expected"),))] == 1
    assert samples[("omega_fleet_bytes_total", (("direction", "up"),))] == 520
    assert samples[("omega_fleet_bytes_total", (("direction", "down"),))] == 40
    lat = "omega_fleet_sync_latency_seconds"
    assert samples[(f"{lat}_bucket", (("le", "0.005"),))] == 1
    assert samples[(f"{lat}_bucket", (("le", "0.05"),))] == 2
    assert samples[(f"{lat}_bucket", (("le", "0.5"),))] == 3
    assert samples[(f"{lat}_bucket", (("le", "+Inf"),))] == 3
    assert samples[(f"{lat}_count", ())] == 3
    assert abs(samples[(f"{lat}_sum", ())] - 0.343) < 1e-6
    assert samples[("omega_fleet_syncs_scheduled", ())] == 15
    assert samples[("omega_fleet_syncs_in_flight", ())] == 3
