"""deploy/prometheus: the alert rules pass ``promtool check rules``, their unit tests pass
``promtool test rules``, each alert's firing case really depends on its rule, the rules read
only metrics the services export, and the compose stack loads them.

promtool comes from Debian's ``prometheus`` package (tools/install-system-deps.sh); the
promtool tests skip, saying so, only when it is not installed.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.helpers import DEPLOY
from tests.deploy.promql import (
    PROMETHEUS_DIR,
    RULES_FILE,
    RULES_TEST_FILE,
    SCRAPE_SERIES,
    exported_names,
    load_rules,
    metric_names,
    promtool,
)

ALERTS = {
    "OmegaReplicaDown",
    "OmegaSyncLatencyP99High",
    "OmegaSyncErrorRatioHigh",
    "OmegaDatabaseDown",
    "OmegaFederationRoundFailing",
    "OmegaFederationRoundLate",
    "OmegaModelCatchUpFailing",
    "OmegaPrivacyBudgetNearlySpent",
}
# Metrics the rules may read besides the services' own: Prometheus' `up`, and the process
# start time prometheus_client exports from every process.
OTHER_METRICS = SCRAPE_SERIES | {"process_start_time_seconds"}


def _output(done: Any) -> str:
    return f"exit {done.returncode}\n{done.stdout}{done.stderr}"


def test_rules_pass_promtool_check() -> None:
    done = promtool("check", "rules", str(RULES_FILE))
    assert done.returncode == 0, _output(done)
    assert f"SUCCESS: {len(ALERTS)} rules found" in done.stdout, _output(done)


def test_prometheus_config_loads_the_rules() -> None:
    # `check config` resolves rule_files against the config's folder and checks them too.
    done = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert done.returncode == 0, _output(done)
    assert "1 rule files found" in done.stdout, _output(done)
    assert f"SUCCESS: {len(ALERTS)} rules found" in done.stdout, _output(done)


def test_rule_unit_tests_pass() -> None:
    done = promtool("test", "rules", str(RULES_TEST_FILE))
    assert done.returncode == 0, _output(done)
    assert "SUCCESS" in done.stdout, _output(done)


def test_every_alert_is_tested_firing_and_quiet() -> None:
    document = yaml.safe_load(RULES_TEST_FILE.read_text())
    assert document["rule_files"] == ["../rules/omega-alerts.yml"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in document["tests"]:
        for case in test.get("alert_rule_test", []):
            (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    assert firing == ALERTS
    assert quiet == ALERTS


@pytest.mark.parametrize("alert", sorted(ALERTS))
def test_the_firing_case_fails_without_its_rule(alert: str, tmp_path: Path) -> None:
    """Mutation check: with the alert's condition made impossible, `promtool test` fails, so
    the unit tests really exercise each rule (not a vacuous pass)."""
    document = yaml.safe_load(RULES_FILE.read_text())
    (rule,) = (r for g in document["groups"] for r in g["rules"] if r.get("alert") == alert)
    rule["expr"] = f"({rule['expr']}) and on () vector(0) > 1"
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "rules" / RULES_FILE.name).write_text(yaml.safe_dump(document))
    shutil.copy(RULES_TEST_FILE, tmp_path / "tests" / RULES_TEST_FILE.name)
    done = promtool("test", "rules", str(tmp_path / "tests" / RULES_TEST_FILE.name))
    assert done.returncode != 0, _output(done)
    assert f"alertname: {alert}," in done.stdout + done.stderr, _output(done)


def test_rules_have_severity_and_operator_annotations() -> None:
    rules = load_rules()
    assert {r["alert"] for r in rules} == ALERTS
    for rule in rules:
        assert rule["alert"].startswith("Omega"), rule
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["labels"]["component"], rule["alert"]
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook"}, rule["alert"]
        assert annotations["runbook"] == "deploy/README.md#alerts"


def test_rules_read_only_metrics_the_services_export() -> None:
    exported = exported_names()
    for rule in load_rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        unknown = sorted(names - exported - OTHER_METRICS)
        assert not unknown, f"{rule['alert']} reads metrics nobody exports: {unknown}"


def test_metric_name_scanner() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (shard, le) (rate(a_bucket{method="x",le=~"1e3"}[5m])))'
        " > 0.05 and on (job) b_count offset 1m unless c or time() - d > 3 * e{job='f'}"
    ) == {"a_bucket", "b_count", "c", "d", "e"}


def test_the_sync_latency_target_is_the_architecture_target() -> None:
    architecture = (DEPLOY.parents[1] / "shared" / "ARCHITECTURE.md").resolve()
    if architecture.is_file():  # shared design notes beside the repository, when present
        assert re.search(r"constellation sync latency \| p99 < 50 ms", architecture.read_text())
    (rule,) = (r for r in load_rules() if r["alert"] == "OmegaSyncLatencyP99High")
    assert re.search(r"\)\)\)\s*> 0\.05\s", rule["expr"]), rule["expr"]
    # 0.05 is a bucket boundary of the sync latency histogram: the quantile is exact there.
    from omega_constellation.metrics import RPC

    assert 0.05 in RPC.duration._upper_bounds
