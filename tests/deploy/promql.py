"""Support of the Prometheus and Grafana tests: promtool, the expressions of the alert rules
and of the dashboard, the metric names they read, and the names the services export.

Used by tests/deploy/test_prometheus_rules.py, tests/deploy/test_grafana_dashboard.py and
tests/integration/test_prometheus_live.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

from tests.deploy.helpers import DEPLOY

PROMETHEUS_DIR = DEPLOY / "prometheus"
RULES_FILE = PROMETHEUS_DIR / "rules" / "omega-alerts.yml"
RULES_TEST_FILE = PROMETHEUS_DIR / "tests" / "omega-alerts.test.yml"
DASHBOARD_FILE = DEPLOY / "grafana" / "dashboards" / "omega-overview.json"
DATASOURCE_UID = "omega-prometheus"  # deploy/grafana/provisioning/datasources/prometheus.yaml

INSTALL_HINT = "run `bash tools/install-system-deps.sh` (Debian package prometheus) to install it"

# Series Prometheus itself writes for every target (not exported by a service).
SCRAPE_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"bool", "offset", "inf", "nan"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'")
_IDENTIFIER = re.compile(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*")


def system_tool(name: str) -> str:
    """Path of a tool of Debian's ``prometheus`` package (on PATH or /usr/bin), or skip."""
    found = shutil.which(name) or (
        f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None
    )
    if found is None:
        pytest.skip(f"{name} is not installed: {INSTALL_HINT}")
    return found


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``promtool args...`` (skips the test when promtool is missing)."""
    return subprocess.run(
        [system_tool("promtool"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )


def load_rules(path: Path = RULES_FILE) -> list[dict[str, Any]]:
    """Every rule of a rules file, each with its group's name under ``group``."""
    document = yaml.safe_load(path.read_text())
    return [
        {**rule, "group": group["name"]} for group in document["groups"] for rule in group["rules"]
    ]


def load_dashboard(path: Path = DASHBOARD_FILE) -> dict[str, Any]:
    """The dashboard JSON."""
    dashboard: dict[str, Any] = json.loads(path.read_text())
    return dashboard


def dashboard_expressions(dashboard: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(``panel title / refId``, PromQL) of every target of every panel."""
    board = load_dashboard() if dashboard is None else dashboard
    return [
        (f"{panel['title']} / {target['refId']}", str(target["expr"]))
        for panel in board["panels"]
        for target in panel.get("targets", [])
    ]


def rule_expressions() -> list[tuple[str, str]]:
    """(alert name, PromQL) of every rule."""
    return [(str(rule.get("alert") or rule["record"]), str(rule["expr"])) for rule in load_rules()]


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (a small PromQL scanner, enough for ours).

    Strings, label matchers, range and subquery brackets and the label lists of
    ``by``/``without``/``on``/``ignoring``/``group_*`` are removed; what remains of the
    identifiers, less function and aggregation names (followed by ``(``) and keywords, are
    metric names.
    """
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    # Gone with their keyword, so an aggregation such as `sum by (le) (...)` reads as a call.
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    names: set[str] = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group(0)
        if word.lower() in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue
        names.add(word)
    return names


@cache
def exported_names() -> frozenset[str]:
    """Every sample name the services can export: what their metrics modules register.

    Imports the constellation's and the federation worker's metrics modules (which create the
    libs/omega_common metrics too) and reads the default registry, as their /metrics
    endpoints do: a counter ``x`` is exported as ``x_total``, a histogram as ``x_bucket``,
    ``x_count`` and ``x_sum``; the registry's own process and Python collectors included.
    """
    import omega_constellation.metrics
    import omega_federation.metrics

    assert omega_constellation.metrics.RPC and omega_federation.metrics.ROUNDS
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
        "stateset": ("",),
        "unknown": ("",),
    }
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
        names.update(sample.name for sample in family.samples)
    return frozenset(names)


def recording_rules_file(expressions: list[tuple[str, str]], path: Path) -> Path:
    """Write ``expressions`` as recording rules, so ``promtool check rules`` parses them."""
    rules = [
        {"record": f"omega_check:expression_{i}", "expr": expr}
        for i, (_, expr) in enumerate(expressions)
    ]
    path.write_text(yaml.safe_dump({"groups": [{"name": "parse-check", "rules": rules}]}))
    return path
