"""deploy/grafana/dashboards/omega-overview.json: its structure, the panels an SRE needs, and
queries that read only metrics the services export and that Prometheus' parser accepts.

Parsing uses ``promtool check rules`` on the expressions written as recording rules (promtool
has no offline query command); tests/integration/test_prometheus_live.py evaluates them
against a live Prometheus. Only the parse check skips when promtool is missing.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.helpers import DEPLOY
from tests.deploy.promql import (
    DATASOURCE_UID,
    SCRAPE_SERIES,
    dashboard_expressions,
    exported_names,
    load_dashboard,
    metric_names,
    promtool,
    recording_rules_file,
)

DASHBOARD = load_dashboard()
PANELS: list[dict[str, Any]] = DASHBOARD["panels"]
GRID_COLUMNS = 24
PANEL_TYPES = {"stat", "timeseries"}


def _panel(title: str) -> dict[str, Any]:
    (panel,) = (p for p in PANELS if p["title"] == title)
    return panel


def _exprs(title: str) -> list[str]:
    return [t["expr"] for t in _panel(title)["targets"]]


def test_dashboard_metadata() -> None:
    assert DASHBOARD["uid"] == "omega-overview"
    assert DASHBOARD["title"] == "Omega overview"
    assert isinstance(DASHBOARD["schemaVersion"], int) and DASHBOARD["schemaVersion"] >= 36
    assert DASHBOARD["editable"] is False  # provisioned: changes go through the repository
    assert DASHBOARD["templating"] == {"list": []}  # no variables: queries run as written
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )
    assert provider["datasources"][0]["uid"] == DATASOURCE_UID


def test_panels_are_well_formed() -> None:
    ids = [p["id"] for p in PANELS]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    assert len({p["title"] for p in PANELS}) == len(PANELS), "titles are unique"
    for panel in PANELS:
        title = panel["title"]
        assert panel["type"] in PANEL_TYPES, title
        assert panel["description"].strip(), title
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, title
        assert panel["fieldConfig"]["defaults"]["unit"], title
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), title
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], title
            assert target["expr"].strip() and "$" not in target["expr"], title
            assert "legendFormat" in target, title


def test_panels_fit_the_grid_without_overlapping() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in PANELS:
        grid = panel["gridPos"]
        x, y, w, h = grid["x"], grid["y"], grid["w"], grid["h"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= GRID_COLUMNS, panel["title"]
        for cell in itertools.product(range(x, x + w), range(y, y + h)):
            assert cell not in cells, f"{panel['title']} overlaps {cells[cell]}"
            cells[cell] = panel["title"]


def test_the_panels_an_sre_needs() -> None:
    syncs = _exprs("Syncs per second")
    assert all(
        'rate(omega_constellation_rpc_handled_total{method="SyncPatterns"}[5m])' in e for e in syncs
    )
    latency = _exprs("Sync latency p50 / p99")
    assert [e.split(",")[0] for e in latency] == [
        "histogram_quantile(0.5",
        "histogram_quantile(0.99",
    ]
    assert all("omega_constellation_rpc_duration_seconds_bucket" in e for e in latency)
    target = _panel("Sync latency p50 / p99")["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert target[-1]["value"] == 0.05  # the 50 ms p99 target, drawn as a line
    (errors,) = _exprs("Sync errors by gRPC status")
    assert errors.startswith("sum by (code)") and 'code!="OK"' in errors
    for title in ("Active devices (estimate)", "Active devices by shard (estimate)"):
        assert any("omega_constellation_next_sync_after_seconds_sum" in e for e in _exprs(title))
    assert any(
        "omega_constellation_patterns_received_total" in e for e in _exprs("Patterns per second")
    )
    assert any("omega_constellation_model_version" in e for e in _exprs("Model version"))
    assert any(
        "omega_federation_rounds_total" in e for e in _exprs("Federation rounds per hour by status")
    )
    epsilon = " ".join(_exprs("Epsilon spent"))
    for name in (
        "omega_federation_model_cumulative_epsilon",
        "omega_federation_model_epsilon_budget",
        "omega_federation_cumulative_epsilon",
    ):
        assert name in epsilon


def test_every_expression_reads_only_exported_metrics() -> None:
    exported = exported_names()
    expressions = dashboard_expressions(DASHBOARD)
    assert len(expressions) >= len(PANELS)
    for where, expr in expressions:
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = sorted(names - exported - SCRAPE_SERIES)
        assert not unknown, f"{where}: {unknown} are not exported by any service ({expr})"


def test_exported_names_account_for_suffixes() -> None:
    exported = exported_names()
    # A counter with labels and no child yet, a histogram, a gauge, the process collector.
    for name in (
        "omega_constellation_rpc_handled_total",
        "omega_constellation_rpc_duration_seconds_bucket",
        "omega_constellation_rpc_duration_seconds_count",
        "omega_constellation_rpc_duration_seconds_sum",
        "omega_constellation_database_up",
        "omega_federation_rounds_total",
        "process_start_time_seconds",
    ):
        assert name in exported, name
    assert "omega_constellation_rpc_handled" not in exported
    assert "omega_constellation_rpc_duration_seconds" not in exported


def test_every_expression_parses(tmp_path: Path) -> None:
    expressions = dashboard_expressions(DASHBOARD)
    rules = recording_rules_file(expressions, tmp_path / "dashboard-rules.yml")
    done = promtool("check", "rules", str(rules))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(expressions)} rules found" in done.stdout
    # The check really parses: a broken expression is refused.
    broken = recording_rules_file([("broken", "sum(rate(x[5m])")], tmp_path / "broken.yml")
    assert promtool("check", "rules", str(broken)).returncode != 0
