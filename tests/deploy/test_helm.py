"""helm/omega: the chart, checked without a cluster and without a helm binary.

Two layers:

* Static, always: Chart.yaml; every values file (merged over values.yaml as Helm merges)
  validates against values.schema.json with ``jsonschema``, and the schema really refuses bad
  values; every ``.Values.a.b`` path a template reads exists in values.yaml; the settings a
  values file passes are fields of the settings classes.
* Rendered, when the ``helm-python-sdk`` package (dev extras) is installed: the chart is
  rendered by Helm's own Go engine (Helm v4, bundled as a shared library; no cluster, no
  network) in a child process, for values.yaml and each values file, and ``helm lint
  --strict`` runs on it. The rendered objects then go through kubernetes-validate and the
  same invariant checks as k8s/ (tests/deploy/test_k8s.py).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from functools import cache
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.helpers import ROOT
from tests.deploy.test_k8s import (
    DOCS as K8S_DOCS,
)
from tests.deploy.test_k8s import (
    K8S_VERSIONS,
    PROBE_PORT_ENV,
    SETTINGS_CLASSES,
    SKIPPED_CRDS,
    Doc,
    by_name,
    check_constellation_probes,
    check_federation_cronjob,
    check_hpa_and_pdb,
    check_network_policies,
    check_no_secret_values,
    check_pods_are_restricted,
    check_postgres,
    check_settings_and_wiring,
    compose_image,
    of_kind,
    pod_templates,
    referenced_secrets,
    validation_errors,
)

CHART = ROOT / "helm" / "omega"
TEMPLATES = CHART / "templates"
SCHEMA: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
DEFAULTS: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
VALUES_FILES = ["values.yaml", "values-dev.yaml", "values-staging.yaml", "values-prod.yaml"]
ALERTS_FILE = CHART / "files" / "omega-alerts.yml"
RELEASE = "omega"


def overrides(name: str) -> dict[str, Any]:
    """What ``helm install -f <name>`` passes on top of values.yaml."""
    if name == "values.yaml":
        return {}
    loaded = yaml.safe_load((CHART / name).read_text())
    assert isinstance(loaded, dict)
    return loaded


def merged(over: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Helm's coalescing of user values over the chart defaults: maps merge key by key,
    anything else (lists included) is replaced; a null removes the key."""
    out = copy.deepcopy(DEFAULTS if base is None else base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(value, out[key])
        else:
            out[key] = copy.deepcopy(value)
    return out


def schema_errors(values: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return sorted(
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(values)
    )


# ---------------------------------------------------------------------------------------------
# Static checks


def test_chart_yaml_is_a_v2_application_chart_of_this_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == CHART.name
    assert chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"]), "SemVer 2"
    project = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert project is not None and chart["appVersion"] == project.group(1)
    assert chart["kubeVersion"].startswith(f">={K8S_VERSIONS[0]}")
    for required in (
        "values.yaml",
        "values.schema.json",
        "templates/_helpers.tpl",
        "templates/NOTES.txt",
        "README.md",
    ):
        assert (CHART / required).is_file(), required


def test_values_schema_is_a_valid_draft7_schema() -> None:
    jsonschema.Draft7Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("name", VALUES_FILES)
def test_every_values_file_validates_against_the_schema(name: str) -> None:
    assert schema_errors(merged(overrides(name))) == []


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"shards": [{"name": "shard-0", "replicas": 2}]}, "a shard without its database"),
        ({"shards": []}, "no shard"),
        ({"shards": [{"name": "Shard_0", "replicas": 1, "database": "x"}]}, "bad shard name"),
        ({"constellation": {"settings": {"database_url": "postgresql://u:p@h/d"}}}, "DSN"),
        ({"constellation": {"settings": {"fleet_keys": "{}"}}}, "a secret as a value"),
        ({"federation": {"settings": {"service_token": "x"}}}, "a secret as a value"),
        ({"constellation": {"replicas": 3}}, "a misspelt key"),
        ({"constellation": {"readinessProbe": {"kind": "grpcTLS"}}}, "the removed probe kind"),
        ({"constellation": {"settings": {"probe_port": 50071}}}, "the chart sets probe_port"),
        ({"constellation": {"ports": {"probe": 0}}}, "no probe port"),
        ({"constellation": {"ports": {"probe": None}}}, "no probe port"),
        ({"constellation": {"probes": {"liveness": {"service": ""}}}}, "a probe's service"),
        ({"constellation": {"probes": {"readiness": {"exec": {}}}}}, "a probe's handler"),
        ({"constellation": {"probes": {"startup": {"failureThreshold": 0}}}}, "no start-up"),
        ({"constellation": {"probes": {"startup": None}}}, "no start-up timings"),
        ({"federation": {"mode": "daemon"}}, "an unknown worker mode"),
        ({"database": {"cnpg": {"enabled": False}}}, "no host without CloudNativePG"),
        ({"secrets": {"database": None}}, "a missing Secret name"),
    ],
)
def test_schema_refuses_bad_values(change: dict[str, Any], reason: str) -> None:
    assert schema_errors(merged(change)), reason


def _value_paths(template: str) -> set[tuple[str, ...]]:
    return {
        tuple(m.split(".")[1:])
        for m in re.findall(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", template)
    }


def test_every_values_path_a_template_reads_exists_in_values_yaml() -> None:
    paths: set[tuple[str, ...]] = set()
    for template in TEMPLATES.iterdir():
        paths |= _value_paths(template.read_text())
    assert len(paths) > 20
    missing = []
    for path in sorted(paths):
        node: Any = DEFAULTS
        for part in path:
            if not isinstance(node, dict) or part not in node:
                missing.append(".".join(path))
                break
            node = node[part]
    assert missing == []


def test_values_paths_check_catches_a_typo() -> None:
    assert _value_paths("{{ .Values.constelation.ports.grpc }}") == {
        ("constelation", "ports", "grpc")
    }


@pytest.mark.parametrize("name", VALUES_FILES)
def test_settings_in_values_are_fields_of_the_settings_classes(name: str) -> None:
    values = merged(overrides(name))
    for section, cls in SETTINGS_CLASSES.items():
        unknown = set(values[section]["settings"]) - set(cls.model_fields)
        assert not unknown, f"{name}: {section}.settings {sorted(unknown)}"
    # k-anonymity is checked twice: the worker's threshold and the shards' must agree.
    assert (
        values["constellation"]["settings"]["min_published_sources"]
        == values["federation"]["settings"]["min_sources"]
    )


def test_values_files_hold_no_secret() -> None:
    for name in VALUES_FILES:
        text = (CHART / name).read_text()
        assert "PRIVATE KEY" not in text
        assert not re.search(r"://[^@\s/]*:[^@\s/]*@", text)


# ---------------------------------------------------------------------------------------------
# Rendered by Helm's engine (helm-python-sdk), in a child process

_RENDER = textwrap.dedent(
    """
    import json, sys
    import helm_python as helm

    jobs = json.load(sys.stdin)
    out = {"helm": helm.helm_sdk_version(), "renders": {}, "lint": None}
    for key, values in jobs["renders"].items():
        try:
            with helm.Chart.load(jobs["chart"]) as chart:
                chart.validate_schema(values)
                out["renders"][key] = {"files": chart.render(
                    values, name=jobs["release"], namespace="omega",
                    is_install=True)}
        except helm.HelmError as exc:
            out["renders"][key] = {"error": str(exc)}
    out["lint"] = helm.lint(jobs["chart"], strict=True, namespace="omega")
    json.dump(out, sys.stdout)
    """
)

EXTRA_RENDERS: dict[str, dict[str, Any]] = {
    "probeValues": {
        "constellation": {
            "ports": {"probe": 50999},
            "probes": {
                "readiness": {"periodSeconds": 7, "timeoutSeconds": 4, "failureThreshold": 5},
                "liveness": {"periodSeconds": 20, "timeoutSeconds": 6, "failureThreshold": 4},
                "startup": {"periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 30},
            },
        }
    },
    "prometheusRule": {"metrics": {"prometheusRule": {"enabled": True}}},
    "badValues": {"constellation": {"settings": {"database_url": "postgresql://x@y/z"}}},
    "externalDatabase": {"database": {"cnpg": {"enabled": False}, "host": "pg.example"}},
}


@cache
def helm_renders() -> dict[str, Any]:
    if importlib.util.find_spec("helm_python") is None:
        pytest.skip("helm-python-sdk is not installed (pyproject dev extras; run `make setup`)")
    jobs = {name: overrides(name) for name in VALUES_FILES}
    jobs.update(EXTRA_RENDERS)
    done = subprocess.run(
        [sys.executable, "-c", _RENDER],
        input=json.dumps({"chart": str(CHART), "release": RELEASE, "renders": jobs}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def rendered(key: str) -> list[Doc]:
    """The objects of one render, in template order (NOTES.txt left out)."""
    result = helm_renders()["renders"][key]
    assert "error" not in result, result.get("error")
    docs: list[Doc] = []
    for path, text in sorted(result["files"].items()):
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def test_helm_lint_strict_finds_nothing_above_info() -> None:
    lint = helm_renders()["lint"]
    assert lint["errors"] == []
    assert [m for m in lint["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("name", VALUES_FILES)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_objects_validate_against_the_kubernetes_schemas(name: str, version: str) -> None:
    assert validation_errors(rendered(name), version) == []


def _shard_0_container(docs: list[Doc]) -> Doc:
    deployment = by_name(docs, "Deployment")[f"{RELEASE}-shard-0"]
    container: Doc = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def test_default_probes_and_ports_are_those_of_k8s() -> None:
    chart = _shard_0_container(rendered("values.yaml"))
    plain = _shard_0_container(K8S_DOCS)
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert chart[kind] == plain[kind], kind
    assert chart["ports"] == plain["ports"]
    configmap = by_name(rendered("values.yaml"), "ConfigMap")[f"{RELEASE}-constellation"]
    assert configmap["data"][PROBE_PORT_ENV] == "50071"


def test_probe_port_and_timings_follow_the_values() -> None:
    docs = rendered("probeValues")
    values = EXTRA_RENDERS["probeValues"]["constellation"]
    check_constellation_probes(docs)
    check_network_policies(docs)
    for version in K8S_VERSIONS:
        assert validation_errors(docs, version) == []
    for deployment in of_kind(docs, "Deployment"):
        if "federation" in deployment["metadata"]["name"]:
            continue
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        for kind in ("readiness", "liveness", "startup"):
            probe = container[f"{kind}Probe"]
            assert probe["grpc"]["port"] == 50999
            assert {k: v for k, v in probe.items() if k != "grpc"} == values["probes"][kind]
    configmap = by_name(docs, "ConfigMap")[f"{RELEASE}-constellation"]
    assert configmap["data"][PROBE_PORT_ENV] == "50999"


@pytest.mark.parametrize("name", VALUES_FILES)
def test_one_deployment_and_services_per_listed_shard(name: str) -> None:
    values = merged(overrides(name))
    docs = rendered(name)
    shards = [s["name"] for s in values["shards"]]
    constellation = [
        d for d in of_kind(docs, "Deployment") if d["metadata"]["name"].endswith(tuple(shards))
    ]
    assert sorted(d["metadata"]["name"] for d in constellation) == sorted(
        f"{RELEASE}-{s}" for s in shards
    )
    services = by_name(docs, "Service")
    for shard in values["shards"]:
        device = services[f"{RELEASE}-{shard['name']}"]["spec"]
        assert device["type"] == values["constellation"]["service"]["type"]
        assert services[f"{RELEASE}-{shard['name']}-federation"]["spec"]["type"] == "ClusterIP"
        deployment = by_name(docs, "Deployment")[f"{RELEASE}-{shard['name']}"]
        autoscaling = merged(shard.get("autoscaling") or {}, values["constellation"]["autoscaling"])
        hpas = {h["metadata"]["name"] for h in of_kind(docs, "HorizontalPodAutoscaler")}
        if autoscaling["enabled"]:
            assert f"{RELEASE}-{shard['name']}" in hpas
            assert "replicas" not in deployment["spec"], "the HPA owns the count"
        else:
            assert f"{RELEASE}-{shard['name']}" not in hpas
            assert deployment["spec"]["replicas"] == shard["replicas"]
    databases = {d["spec"]["name"] for d in of_kind(docs, "Database")}
    assert databases == {s["database"] for s in values["shards"]}


@pytest.mark.parametrize("name", VALUES_FILES)
def test_rendered_chart_keeps_the_k8s_invariants(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered(name)
    values = merged(overrides(name))
    check_pods_are_restricted(docs)
    check_constellation_probes(docs)
    check_network_policies(docs)
    check_no_secret_values(docs, [])
    check_settings_and_wiring(docs, monkeypatch)
    check_postgres(docs, monkeypatch)
    check_hpa_and_pdb(docs)
    if values["federation"]["mode"] == "cronjob":
        check_federation_cronjob(docs)
    else:
        (worker,) = [
            d for d in of_kind(docs, "Deployment") if "federation" in d["metadata"]["name"]
        ]
        assert worker["spec"]["replicas"] == 1
        assert worker["spec"]["strategy"]["type"] == "Recreate"
        (container,) = worker["spec"]["template"]["spec"]["containers"]
        assert container["args"] == ["periodic"]
    assert referenced_secrets(docs) == set(values["secrets"].values())
    images = {
        t["metadata"]["labels"]["app.kubernetes.io/name"]: t["spec"]["containers"][0]["image"]
        for _, t in pod_templates(docs)
    }
    assert images["omega-constellation"].split(":")[0] == compose_image("constellation-0")
    assert images["omega-federation"].split(":")[0] == compose_image("federation-worker")


def test_external_database_renders_without_cloudnativepg(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = rendered("externalDatabase")
    assert not of_kind(docs, "Cluster") and not of_kind(docs, "Database")
    check_settings_and_wiring(docs, monkeypatch)
    dsn = by_name(docs, "ConfigMap")["omega-shard-0"]["data"]["OMEGA_CONSTELLATION_DATABASE_URL"]
    assert dsn == "postgresql://omega@pg.example:5432/omega_shard_0"


def test_helm_refuses_values_the_schema_refuses() -> None:
    error = helm_renders()["renders"]["badValues"].get("error", "")
    assert "database_url" in error or "schema" in error, error


@pytest.mark.parametrize("name", ["values-staging.yaml", "values-prod.yaml"])
def test_service_monitor_scrapes_the_metrics_services(name: str) -> None:
    docs = rendered(name)
    (monitor,) = of_kind(docs, "ServiceMonitor")
    assert (monitor["apiVersion"], monitor["kind"]) in SKIPPED_CRDS
    wanted = monitor["spec"]["selector"]["matchLabels"]
    scraped = [
        s
        for s in of_kind(docs, "Service")
        if all(s["metadata"]["labels"].get(k) == v for k, v in wanted.items())
    ]
    names = {s["metadata"]["name"] for s in scraped}
    assert names == {f"{RELEASE}-constellation-metrics", f"{RELEASE}-federation-metrics"}
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    for service in scraped:
        assert ports <= {p["name"] for p in service["spec"]["ports"]}


def test_prometheus_rule_ships_the_alert_rules_file() -> None:
    result = helm_renders()["renders"]["prometheusRule"]
    if not ALERTS_FILE.is_file():
        # Not copied into the chart yet: enabling the rule fails loudly, never renders empty.
        assert "files/omega-alerts.yml" in result.get("error", ""), result
        return
    docs = rendered("prometheusRule")
    (rule,) = of_kind(docs, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS_FILE.read_text())["groups"]


def test_alerts_file_in_the_chart_is_the_deploy_one() -> None:
    source = ROOT / "deploy" / "prometheus" / "rules" / "omega-alerts.yml"
    if not ALERTS_FILE.is_file():
        pytest.skip("helm/omega/files/omega-alerts.yml is not in the chart yet")
    assert ALERTS_FILE.read_text() == source.read_text()


def test_notes_name_every_secret_to_create() -> None:
    notes = (TEMPLATES / "NOTES.txt").read_text()
    for key in DEFAULTS["secrets"]:
        assert f".Values.secrets.{key}" in notes
    readme = (CHART / "README.md").read_text()
    for secret in DEFAULTS["secrets"].values():
        assert f"create secret generic {secret}" in readme, secret


def test_render_is_by_helm_itself() -> None:
    assert str(helm_renders()["helm"]).startswith("v4."), "Helm's Go SDK, not a look-alike"
