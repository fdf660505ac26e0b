"""k8s/: the plain manifests of the example deployment (two shards).

Static only (no cluster here). Every built-in object is validated with ``kubernetes-validate``
(strict: unknown fields are errors) against the Kubernetes API schemas that package bundles,
for the oldest version the manifests support and the newest it ships; then the invariants that
matter for Omega are checked on the parsed objects: probes, security contexts, NetworkPolicy
reachability, the CronJob, Secret references only, and that every ConfigMap entry is a real,
parseable setting of the service that reads it.

The ``check_*`` functions are reused by tests/deploy/test_helm.py on the rendered chart.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from omega_constellation.server import LIVENESS_SERVICE
from omega_constellation.settings import ConstellationSettings
from omega_federation.settings import FederationSettings
from tests.deploy.helpers import DEPLOY, ROOT

K8S = ROOT / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"

# The Kubernetes versions validated against: the oldest the manifests support (CronJob
# podFailurePolicy is GA from 1.31) and the newest schema kubernetes-validate bundles.
K8S_VERSIONS = ("1.31", "1.37")

# Custom resources kubernetes-validate has no schema for. No offline copy of their published
# CRD schemas exists on PyPI or npm (CloudNativePG ships none; the npm/PyPI prometheus-operator
# models are generated code, not the CRDs' OpenAPI schema), so they are skipped by name here
# and only checked structurally below.
SKIPPED_CRDS = frozenset(
    {
        ("postgresql.cnpg.io/v1", "Cluster"),
        ("postgresql.cnpg.io/v1", "Database"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
    }
)

CONSTELLATION = "omega-constellation"
FEDERATION = "omega-federation"
PROBE_PORT_ENV = "OMEGA_CONSTELLATION_PROBE_PORT"
# The health service each probe asks the probe listener for: "" is the device listener's
# readiness (NOT_SERVING while Postgres is unreachable), LIVENESS_SERVICE stays SERVING while
# the process answers (a database outage must not restart the replicas).
PROBE_SERVICES = {
    "readinessProbe": "",
    "livenessProbe": LIVENESS_SERVICE,
    "startupProbe": LIVENESS_SERVICE,
}
PROBE_HANDLERS = ("exec", "grpc", "httpGet", "tcpSocket")
# The probe listener opens only once the replica has loaded its catalog: the start-up probe
# must allow at least this long (periodSeconds x failureThreshold) before liveness takes over.
MIN_STARTUP_SECONDS = 120
SETTINGS_CLASSES: dict[str, type[ConstellationSettings] | type[FederationSettings]] = {
    "constellation": ConstellationSettings,
    "federation": FederationSettings,
}

Doc = dict[str, Any]
Break = Callable[[list[Doc]], None]


def load_documents(paths: Iterable[Path]) -> list[Doc]:
    """Every non-empty YAML document of ``paths``, in order."""
    docs: list[Doc] = []
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert isinstance(doc, dict), f"{path}: a document is not a mapping"
                docs.append(doc)
    return docs


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p != KUSTOMIZATION)


DOCS = load_documents(manifest_files())


# ---------------------------------------------------------------------------------------------
# Helpers over parsed objects (shared with test_helm.py)


def of_kind(docs: Iterable[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d.get("kind") == kind]


def by_name(docs: Iterable[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in of_kind(docs, kind)}


def pod_templates(docs: Iterable[Doc]) -> Iterator[tuple[str, Doc]]:
    """(workload name, pod template) of every Deployment and CronJob."""
    for doc in docs:
        if doc["kind"] == "Deployment":
            yield doc["metadata"]["name"], doc["spec"]["template"]
        elif doc["kind"] == "CronJob":
            yield doc["metadata"]["name"], doc["spec"]["jobTemplate"]["spec"]["template"]


def component(template: Doc) -> str:
    """``constellation`` or ``federation``, from the pod's app.kubernetes.io/name label."""
    name = template["metadata"]["labels"]["app.kubernetes.io/name"]
    assert name in (CONSTELLATION, FEDERATION), name
    return str(name).removeprefix("omega-")


def selects(selector: Doc | None, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels only; {} selects everything) matches ``labels``."""
    selector = selector or {}
    assert not selector.get("matchExpressions"), "matchExpressions are not used here"
    wanted = selector.get("matchLabels") or {}
    return all(labels.get(k) == v for k, v in wanted.items())


def configmap_env(docs: Iterable[Doc], container: Doc) -> dict[str, str]:
    """The environment a container gets from its envFrom ConfigMaps alone."""
    maps = by_name(docs, "ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in maps, f"envFrom names a missing ConfigMap {name}"
        env.update({str(k): str(v) for k, v in maps[name]["data"].items()})
    return env


def config_env(docs: Iterable[Doc], container: Doc) -> dict[str, str]:
    """The environment a container gets from its envFrom ConfigMaps and literal env values."""
    env = configmap_env(docs, container)
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
    return env


def settings_from(env: dict[str, str], which: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Build the settings class of ``which`` from exactly ``env`` (pydantic parses the values)."""
    cls = SETTINGS_CLASSES[which]
    prefix = str(cls.model_config.get("env_prefix", ""))
    with monkeypatch.context() as patch:
        for key in list(os.environ):
            if key.startswith("OMEGA_"):
                patch.delenv(key)
        for key, value in env.items():
            patch.setenv(key, value)
        fields = {prefix + f.upper() for f in cls.model_fields}
        unknown = sorted(k for k in env if k.startswith("OMEGA_") and k not in fields)
        assert not unknown, f"not settings of {cls.__name__}: {unknown}"
        return cls()


def container_ports(container: Doc) -> dict[str, int]:
    return {p["name"]: int(p["containerPort"]) for p in container.get("ports", [])}


def validation_errors(docs: Iterable[Doc], version: str) -> list[str]:
    """kubernetes-validate (strict) of every built-in object; a missing schema is an error
    unless the kind is one of SKIPPED_CRDS."""
    errors: list[str] = []
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if key in SKIPPED_CRDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.absolute_path)
            errors.append(f"{name} ({version}): {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{name} ({version}): {exc.message}")
    return errors


# ---------------------------------------------------------------------------------------------
# Checks shared with test_helm.py


def check_pods_are_restricted(docs: list[Doc]) -> None:
    """Pod Security Standards "restricted", resources, no API token, a writable /tmp only."""
    templates = list(pod_templates(docs))
    assert templates, "no workloads"
    for name, template in templates:
        spec = template["spec"]
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, name
        assert pod_sc["runAsUser"] == 10001, f"{name}: the images' uid is 10001"
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            where = f"{name}/{container['name']}"
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in sc["capabilities"], where
            assert sc.get("privileged", False) is False, where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            resources = container["resources"]
            for field in ("cpu", "memory"):
                assert field in resources["requests"], f"{where}: requests.{field}"
            assert "memory" in resources["limits"], f"{where}: limits.memory"
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: read-only root needs an emptyDir on /tmp"
            assert "emptyDir" in volumes[mounts["/tmp"]["name"]], where
            for path, mount in mounts.items():
                volume = volumes[mount["name"]]
                if "secret" in volume:
                    assert mount.get("readOnly") is True, f"{where}: {path} read-only"
                    assert volume["secret"]["defaultMode"] == 0o440, where


def check_constellation_probes(docs: list[Doc]) -> None:
    """Native gRPC probes on the plaintext, health-only probe listener.

    The device and federation listeners serve TLS, which the kubelet's ``grpc:`` probe cannot
    speak; OMEGA_CONSTELLATION_PROBE_PORT opens a plaintext listener serving grpc.health.v1
    only. Readiness asks for service "" (NOT_SERVING while Postgres is unreachable: the replica
    leaves its Services); start-up and liveness ask for "liveness", which never follows the
    database, so an outage cannot restart every replica at once.
    """
    deployments = [
        d
        for d in of_kind(docs, "Deployment")
        if component(d["spec"]["template"]) == "constellation"
    ]
    assert deployments
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        ports = container_ports(container)
        env = config_env(docs, container)
        assert ports["grpc"] == int(env["OMEGA_CONSTELLATION_PORT"]), name
        assert ports["federation"] == int(env["OMEGA_CONSTELLATION_FEDERATION_PORT"]), name
        assert ports["metrics"] == int(env["OMEGA_CONSTELLATION_METRICS_PORT"]), name
        # The probe port: set by the ConfigMap (not a literal env entry), and the same number
        # as the container's `probe` port.
        literal = {v["name"] for v in container.get("env", [])}
        assert PROBE_PORT_ENV not in literal, f"{name}: {PROBE_PORT_ENV} belongs in the ConfigMap"
        from_maps = configmap_env(docs, container)
        assert PROBE_PORT_ENV in from_maps, f"{name}: {PROBE_PORT_ENV} not set by a ConfigMap"
        probe_port = int(from_maps[PROBE_PORT_ENV])
        assert ports.get("probe") == probe_port, f"{name}: containerPort probe != {probe_port}"
        assert len(set(ports.values())) == len(ports), f"{name}: listeners share a port {ports}"
        # The probe listener binds OMEGA_CONSTELLATION_HOST; the kubelet dials the pod's IP.
        host = env.get("OMEGA_CONSTELLATION_HOST")
        assert host in ("0.0.0.0", "::"), f"{name}: probe listener on {host}, kubelet can't dial"
        for kind, service in PROBE_SERVICES.items():
            probe = container.get(kind)
            assert probe, f"{name}: no {kind}"
            handlers = [h for h in PROBE_HANDLERS if h in probe]
            assert handlers == ["grpc"], f"{name}: {kind} is {handlers}, not a native grpc probe"
            grpc = probe["grpc"]
            assert grpc["port"] == probe_port, f"{name}: {kind} not on the probe port"
            asked = grpc.get("service", "")
            assert asked == service, f"{name}: {kind} asks for service {asked!r}, not {service!r}"
            assert "mode" not in grpc, f"{name}: {kind}: the probe listener is plaintext"
            period = probe.get("periodSeconds", 10)
            assert 1 <= probe.get("timeoutSeconds", 1) <= period, f"{name}: {kind} timeout"
        startup = container["startupProbe"]
        window = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
        assert window >= MIN_STARTUP_SECONDS, f"{name}: start-up allows {window} s to listen"
        liveness = container["livenessProbe"]
        assert liveness.get("failureThreshold", 3) >= 2, f"{name}: liveness restarts on one miss"
        grace = int(env.get("OMEGA_CONSTELLATION_GRACE_SECONDS", "10"))
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace


def _covers(rule_port: Doc, port: int, name: str | None) -> bool:
    """Whether one entry of an ingress rule's ``ports`` admits ``port`` (named ``name`` in the
    pod): no ``port`` means every port; a name matches the container port's name; a number
    with ``endPort`` is a range."""
    value = rule_port.get("port")
    if value is None:
        return True
    if isinstance(value, str) and not value.isdigit():
        return value == name
    first = int(value)
    return first <= port <= int(rule_port.get("endPort", first))


def _admitted(
    docs: list[Doc], pod_labels: dict[str, str], port: int, name: str | None = None
) -> list[Doc | None]:
    """Sources NetworkPolicies admit to ``port`` (container port name ``name``) of a pod with
    ``pod_labels``: peers (podSelector / namespaceSelector / ipBlock) or None for "any
    source"."""
    peers: list[Doc | None] = []
    for policy in of_kind(docs, "NetworkPolicy"):
        spec = policy["spec"]
        if "Ingress" not in spec.get("policyTypes", ["Ingress"]):
            continue
        if not selects(spec["podSelector"], pod_labels):
            continue
        for rule in spec.get("ingress", []):
            ports = rule.get("ports", [])
            if ports and not any(_covers(p, port, name) for p in ports):
                continue
            sources = rule.get("from")
            if not sources:
                peers.append(None)
            else:
                peers.extend(sources)
    return peers


def _pod_selected(peer: Doc | None, labels: dict[str, str]) -> bool:
    """Whether a same-namespace podSelector peer admits a pod with ``labels``."""
    return (
        peer is not None
        and "podSelector" in peer
        and "namespaceSelector" not in peer
        and selects(peer["podSelector"], labels)
    )


def check_network_policies(docs: list[Doc]) -> None:
    """Devices reach only the device port; only the worker reaches the federation listener;
    nothing reaches the probe port (the kubelet needs no rule); Postgres admits the omega pods
    and CloudNativePG, never an arbitrary source."""
    templates = dict(pod_templates(docs))
    shards = [t for t in templates.values() if component(t) == "constellation"]
    workers = [t for t in templates.values() if component(t) == "federation"]
    assert shards and workers
    worker_labels = workers[0]["metadata"]["labels"]
    stranger = {"app.kubernetes.io/name": "something-else"}
    # A default deny: a pod no other policy mentions is unreachable.
    denies = [
        p
        for p in of_kind(docs, "NetworkPolicy")
        if p["spec"].get("policyTypes") == ["Ingress"] and not p["spec"].get("ingress")
    ]
    assert denies, "no default-deny ingress policy"
    for template in shards:
        labels = template["metadata"]["labels"]
        (container,) = template["spec"]["containers"]
        ports = container_ports(container)
        # The device port: from anywhere (devices), or the configured source ranges.
        device = _admitted(docs, labels, ports["grpc"], "grpc")
        assert device, "devices cannot reach the device port"
        assert all(p is None or set(p) == {"ipBlock"} for p in device), device
        # The internal listener: only same-namespace pods that are the worker.
        federation = _admitted(docs, labels, ports["federation"], "federation")
        assert federation, "the worker cannot reach the federation listener"
        for peer in federation:
            assert _pod_selected(peer, worker_labels), f"federation port admits {peer}"
            assert not _pod_selected(peer, labels), "shards may not call each other's listener"
            assert not _pod_selected(peer, stranger)
        # Metrics: only another namespace (Prometheus), never "anyone".
        metrics = _admitted(docs, labels, ports["metrics"], "metrics")
        assert metrics and all(p is not None and "namespaceSelector" in p for p in metrics)
        # The probe port: the kubelet's only, from the pod's node, which NetworkPolicy never
        # blocks; no rule may open it to pods, namespaces or address ranges.
        probe = _admitted(docs, labels, ports["probe"], "probe")
        assert not probe, f"the probe port is open to {probe}"
        # Nothing else.
        for port in (22, 5432, 8080):
            assert not _admitted(docs, labels, port), f"shard port {port} is open"
    # The worker serves nothing but (in periodic mode) /metrics.
    for template in workers:
        labels = template["metadata"]["labels"]
        for port in (50051, 50061, 5432):
            assert not _admitted(docs, labels, port), f"worker port {port} is open"
    # Postgres: every CloudNativePG Cluster's pods.
    clusters = of_kind(docs, "Cluster")
    for cluster in clusters:
        inherited = cluster["spec"].get("inheritedMetadata", {}).get("labels", {})
        labels = {"cnpg.io/cluster": cluster["metadata"]["name"], **inherited}
        peers = _admitted(docs, labels, 5432)
        assert None not in peers, "Postgres admits any source"
        assert any(_pod_selected(p, shards[0]["metadata"]["labels"]) for p in peers)
        assert any(_pod_selected(p, worker_labels) for p in peers)
        assert not any(_pod_selected(p, stranger) for p in peers)
        for peer in peers:
            assert peer is not None
            if "podSelector" in peer and "namespaceSelector" not in peer:
                allowed = peer["podSelector"]["matchLabels"]
                assert (
                    allowed.get("app.kubernetes.io/name") in (CONSTELLATION, FEDERATION)
                    or allowed.get("cnpg.io/cluster") == cluster["metadata"]["name"]
                ), f"Postgres admits {allowed}"


def check_no_secret_values(docs: list[Doc], texts: Iterable[str]) -> None:
    """No Secret object at all, and nothing that looks like key material or a password."""
    assert not of_kind(docs, "Secret"), "Secrets are created by hand, never in the repository"
    for text in texts:
        assert "PRIVATE KEY" not in text
        assert not re.search(r"postgres(ql)?://[^@\s/]*:[^@\s/]*@", text), "password in a DSN"
    for template in (t for _, t in pod_templates(docs)):
        for container in template["spec"]["containers"]:
            for var in container.get("env", []):
                if re.search(r"PASSWORD|TOKEN|KEYS?$|SECRET", var["name"]):
                    assert "value" not in var, f"{var['name']} given literally"


def check_federation_cronjob(docs: list[Doc]) -> None:
    (cronjob,) = of_kind(docs, "CronJob")
    spec = cronjob["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    job = spec["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["args"] == ["run-once"]
    # `omega-federation run-once` exits 3 when another worker holds the round lock.
    (rule,) = job["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob"
    assert rule["onExitCodes"] == {"containerName": "federation", "operator": "In", "values": [3]}


def check_settings_and_wiring(docs: list[Doc], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every container's OMEGA_* environment builds its settings class; the shard map, the
    worker's shard addresses, the Services and the databases agree."""
    services = by_name(docs, "Service")
    shard_envs: dict[str, ConstellationSettings] = {}
    shard_labels: dict[str, dict[str, str]] = {}
    worker: FederationSettings | None = None
    for name, template in pod_templates(docs):
        (container,) = template["spec"]["containers"]
        which = component(template)
        settings = settings_from(config_env(docs, container), which, monkeypatch)
        assert settings.database_url, f"{name}: no DSN (it would start an embedded Postgres)"
        assert urlsplit(settings.database_url).password is None, f"{name}: password in DSN"
        env_names = {v["name"] for v in container.get("env", [])}
        assert "PGPASSWORD" in env_names, f"{name}: the database password comes from a Secret"
        if which == "constellation":
            assert isinstance(settings, ConstellationSettings)
            assert not settings.plaintext and settings.auth
            assert settings.tls_cert_file and settings.tls_ca_file and settings.fleet_keys_file
            assert settings.shard_id not in shard_envs, f"two Deployments of {settings.shard_id}"
            shard_envs[settings.shard_id] = settings
            shard_labels[settings.shard_id] = template["metadata"]["labels"]
        else:
            assert isinstance(settings, FederationSettings)
            assert not settings.plaintext
            assert settings.tls_cert_file and settings.tls_key_file and settings.service_token_file
            worker = settings
    assert shard_envs and worker is not None
    ids = set(shard_envs)
    for settings in shard_envs.values():
        assert set(settings.shard_ids) == ids, "the shard map lists exactly the deployed shards"
        assert settings.min_published_sources == worker.min_sources, "k-anonymity differs"
    databases = [urlsplit(s.database_url or "").path for s in shard_envs.values()]
    assert len(set(databases)) == len(databases), "each shard has its own database"
    assert urlsplit(worker.database_url or "").path not in databases
    # The worker's shard addresses are each shard's federation Service.
    assert set(worker.shards) == ids
    for shard_id, address in worker.shards.items():
        host, _, port = address.rpartition(":")
        service = services[host]["spec"]
        assert service["type"] == "ClusterIP", f"{host}: the internal listener stays inside"
        assert selects({"matchLabels": service["selector"]}, shard_labels[shard_id])
        for other, labels in shard_labels.items():
            if other != shard_id:
                assert not selects({"matchLabels": service["selector"]}, labels), host
        (service_port,) = service["ports"]
        assert service_port["port"] == int(port)
        assert service_port["targetPort"] == "federation"
    # Each shard has one device Service, exposing the device port and nothing else; no other
    # non-headless Service of the shard reaches beyond the cluster.
    for shard_id, labels in shard_labels.items():
        mine = [
            s["spec"]
            for s in services.values()
            if s["spec"].get("clusterIP") != "None"
            and selects({"matchLabels": s["spec"]["selector"]}, labels)
        ]
        device = [s for s in mine if any(p["targetPort"] == "grpc" for p in s["ports"])]
        assert len(device) == 1, f"{shard_id}: one device Service"
        assert [p["targetPort"] for p in device[0]["ports"]] == ["grpc"]
        assert all(s["type"] == "ClusterIP" for s in mine if s is not device[0])


def check_postgres(docs: list[Doc], monkeypatch: pytest.MonkeyPatch) -> None:
    """The DSNs point at the CloudNativePG primary and at databases that the Cluster
    creates; max_connections covers every replica's pool at the autoscaling maximum."""
    (cluster,) = of_kind(docs, "Cluster")
    name = cluster["metadata"]["name"]
    created = {cluster["spec"]["bootstrap"]["initdb"]["database"]}
    owner = cluster["spec"]["bootstrap"]["initdb"]["owner"]
    for database in of_kind(docs, "Database"):
        assert database["spec"]["cluster"]["name"] == name
        assert database["spec"]["owner"] == owner
        created.add(database["spec"]["name"])
    hpas = {
        h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(docs, "HorizontalPodAutoscaler")
    }
    connections = 0
    for workload, template in pod_templates(docs):
        (container,) = template["spec"]["containers"]
        which = component(template)
        settings = settings_from(config_env(docs, container), which, monkeypatch)
        dsn = urlsplit(settings.database_url)
        assert dsn.hostname == f"{name}-rw", f"{workload}: connect to the primary"
        assert dsn.username == owner
        assert dsn.path.lstrip("/") in created, f"{workload}: database {dsn.path} not created"
        if which == "constellation":
            deployment = by_name(docs, "Deployment")[workload]
            most = (
                hpas[workload]["spec"]["maxReplicas"]
                if workload in hpas
                else deployment["spec"]["replicas"]
            )
            connections += most * settings.db_pool_max_size
        else:
            connections += 5
    limit = int(cluster["spec"]["postgresql"]["parameters"]["max_connections"])
    assert connections + 10 <= limit, f"{connections} pooled connections vs {limit}"


def check_hpa_and_pdb(docs: list[Doc]) -> None:
    deployments = by_name(docs, "Deployment")
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in deployments
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        matched = [
            d
            for d in deployments.values()
            if selects(pdb["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(matched) == 1, f"{pdb['metadata']['name']} covers one shard"


def referenced_secrets(docs: list[Doc]) -> set[str]:
    names: set[str] = set()
    for _, template in pod_templates(docs):
        for volume in template["spec"].get("volumes", []):
            if "secret" in volume:
                names.add(volume["secret"]["secretName"])
        for container in template["spec"]["containers"]:
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    names.add(ref["name"])
    for cluster in of_kind(docs, "Cluster"):
        names.add(cluster["spec"]["bootstrap"]["initdb"]["secret"]["name"])
    return names


def compose_image(service: str) -> str:
    """The image repository deploy/compose.yaml gives a service (the images' source of truth)."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    image = compose["services"][service]["image"]
    return str(image).split(":", 1)[0]


# ---------------------------------------------------------------------------------------------
# Tests of k8s/


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version: str) -> None:
    assert validation_errors(DOCS, version) == []


def test_strict_validation_really_rejects_a_misspelt_field() -> None:
    deployment = copy.deepcopy(by_name(DOCS, "Deployment")["omega-shard-0"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbes"] = container.pop("readinessProbe")
    assert validation_errors([deployment], K8S_VERSIONS[0])
    # A native grpc probe takes a port number, never a port name (unlike tcpSocket): the
    # schemas refuse `port: probe`, which is why the manifests repeat the number.
    probe = copy.deepcopy(by_name(DOCS, "Deployment")["omega-shard-0"])
    probe_container = probe["spec"]["template"]["spec"]["containers"][0]
    probe_container["readinessProbe"]["grpc"]["port"] = "probe"
    for version in K8S_VERSIONS:
        assert validation_errors([probe], version)


def test_only_the_named_crds_are_skipped() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for d in DOCS}
    assert kinds & SKIPPED_CRDS == {
        ("postgresql.cnpg.io/v1", "Cluster"),
        ("postgresql.cnpg.io/v1", "Database"),
    }


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert kustomization["namespace"] == "omega"
    assert sorted(kustomization["resources"]) == sorted(p.name for p in manifest_files())
    images = {i["name"] for i in kustomization["images"]}
    used = {
        c["image"].split(":", 1)[0] for _, t in pod_templates(DOCS) for c in t["spec"]["containers"]
    }
    assert images == used


def test_namespace_enforces_the_restricted_pod_security_standard() -> None:
    (namespace,) = of_kind(DOCS, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_two_shards_that_differ_only_by_name() -> None:
    zero = load_documents([K8S / "shard-0.yaml"])
    one = load_documents([K8S / "shard-1.yaml"])
    assert [d["kind"] for d in zero] == [
        "Deployment",
        "Service",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    ]
    renamed = json.loads(json.dumps(zero).replace("shard-0", "shard-1"))
    assert renamed == one


def test_pods_run_with_a_restricted_security_context() -> None:
    check_pods_are_restricted(DOCS)


def test_constellation_probes_and_ports() -> None:
    check_constellation_probes(DOCS)


def _shard_0_container(docs: list[Doc]) -> Doc:
    deployment = by_name(docs, "Deployment")["omega-shard-0"]
    container: Doc = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def _set_env(docs: list[Doc], key: str, value: str | None) -> None:
    """Set (None: remove) ``key`` in the ConfigMap every constellation replica shares."""
    data = by_name(docs, "ConfigMap")["omega-constellation"]["data"]
    if value is None:
        del data[key]
    else:
        data[key] = value


def _break_probe(kind: str, **grpc: Any) -> Break:
    def apply(docs: list[Doc]) -> None:
        _shard_0_container(docs)[kind]["grpc"].update(grpc)

    return apply


def _replace_probe(kind: str, probe: Doc) -> Break:
    def apply(docs: list[Doc]) -> None:
        _shard_0_container(docs)[kind] = probe

    return apply


def _probe_field(kind: str, field: str, value: int) -> Break:
    def apply(docs: list[Doc]) -> None:
        _shard_0_container(docs)[kind][field] = value

    return apply


def _container_probe_port(docs: list[Doc]) -> None:
    for port in _shard_0_container(docs)["ports"]:
        if port["name"] == "probe":
            port["containerPort"] = 50072


def _probe_on_the_metrics_port(docs: list[Doc]) -> None:
    _set_env(docs, "OMEGA_CONSTELLATION_METRICS_PORT", "50071")
    for port in _shard_0_container(docs)["ports"]:
        if port["name"] == "metrics":
            port["containerPort"] = 50071


def _literal_probe_port(docs: list[Doc]) -> None:
    _shard_0_container(docs)["env"].append({"name": PROBE_PORT_ENV, "value": "50071"})


def _no_readiness(docs: list[Doc]) -> None:
    del _shard_0_container(docs)["readinessProbe"]


# Each deliberate break of the probes, with the message the check must fail with.
PROBE_BREAKS: dict[str, tuple[Break, str]] = {
    "readiness on the liveness service": (
        _break_probe("readinessProbe", service=LIVENESS_SERVICE),
        "readinessProbe asks for service 'liveness'",
    ),
    "liveness follows the database": (
        _break_probe("livenessProbe", service=""),
        "livenessProbe asks for service ''",
    ),
    "start-up follows the database": (
        _break_probe("startupProbe", service=""),
        "startupProbe asks for service ''",
    ),
    "readiness on the TLS device port": (
        _break_probe("readinessProbe", port=50051),
        "readinessProbe not on the probe port",
    ),
    "TLS mode on the plaintext listener": (
        _break_probe("livenessProbe", mode="TLS"),
        "the probe listener is plaintext",
    ),
    "exec readiness": (
        _replace_probe("readinessProbe", {"exec": {"command": ["omega-constellation", "health"]}}),
        r"readinessProbe is \['exec'\]",
    ),
    "tcpSocket liveness": (
        _replace_probe("livenessProbe", {"tcpSocket": {"port": "grpc"}}),
        r"livenessProbe is \['tcpSocket'\]",
    ),
    "grpc and exec together": (
        _replace_probe("startupProbe", {"grpc": {"port": 50071}, "exec": {"command": ["true"]}}),
        r"startupProbe is \['exec', 'grpc'\]",
    ),
    "no readiness probe": (_no_readiness, "no readinessProbe"),
    "short start-up window": (
        _probe_field("startupProbe", "failureThreshold", 3),
        "start-up allows 15 s",
    ),
    "timeout longer than the period": (
        _probe_field("readinessProbe", "timeoutSeconds", 30),
        "readinessProbe timeout",
    ),
    "liveness restarts on one miss": (
        _probe_field("livenessProbe", "failureThreshold", 1),
        "liveness restarts on one miss",
    ),
    "containerPort differs from the setting": (
        _container_probe_port,
        "containerPort probe != 50071",
    ),
    "probe port missing from the ConfigMap": (
        lambda docs: _set_env(docs, PROBE_PORT_ENV, None),
        "not set by a ConfigMap",
    ),
    "probe port given as a literal env entry": (
        _literal_probe_port,
        "belongs in the ConfigMap",
    ),
    "probe port equal to the metrics port": (
        _probe_on_the_metrics_port,
        "listeners share a port",
    ),
    "listeners on the loopback": (
        lambda docs: _set_env(docs, "OMEGA_CONSTELLATION_HOST", "127.0.0.1"),
        "kubelet can't dial",
    ),
}


@pytest.mark.parametrize("case", PROBE_BREAKS)
def test_probe_check_fails_on_each_deliberate_break(case: str) -> None:
    broken = copy.deepcopy(DOCS)
    apply, message = PROBE_BREAKS[case]
    apply(broken)
    with pytest.raises(AssertionError, match=message):
        check_constellation_probes(broken)


def test_constellation_probes_are_native_grpc_on_the_probe_port() -> None:
    container = _shard_0_container(DOCS)
    port = container_ports(container)["probe"]
    assert port == 50071
    assert container["readinessProbe"]["grpc"] == {"port": port}
    for kind in ("livenessProbe", "startupProbe"):
        assert container[kind]["grpc"] == {"port": port, "service": LIVENESS_SERVICE}
    assert LIVENESS_SERVICE == "liveness"


def test_network_policies_admit_only_the_intended_sources() -> None:
    check_network_policies(DOCS)


def test_network_policy_check_fails_when_the_federation_port_is_opened() -> None:
    opened = copy.deepcopy(DOCS)
    for policy in of_kind(opened, "NetworkPolicy"):
        if policy["metadata"]["name"] == "omega-constellation-devices":
            policy["spec"]["ingress"][0]["ports"].append({"port": 50061, "protocol": "TCP"})
    with pytest.raises(AssertionError):
        check_network_policies(opened)


@pytest.mark.parametrize(
    ("policy", "port"),
    [
        ("omega-constellation-devices", {"port": 50071, "protocol": "TCP"}),
        ("omega-constellation-federation", {"port": "probe", "protocol": "TCP"}),
        ("omega-constellation-metrics", {"port": 50070, "endPort": 50080, "protocol": "TCP"}),
    ],
    ids=["to devices", "by name to the worker", "in a range to monitoring"],
)
def test_network_policy_check_fails_when_the_probe_port_is_opened(policy: str, port: Doc) -> None:
    opened = copy.deepcopy(DOCS)
    by_name(opened, "NetworkPolicy")[policy]["spec"]["ingress"][0]["ports"].append(port)
    with pytest.raises(AssertionError, match="the probe port is open"):
        check_network_policies(opened)


def test_no_secret_in_the_repository_only_references() -> None:
    check_no_secret_values(DOCS, (p.read_text() for p in K8S.iterdir() if p.is_file()))


def test_every_referenced_secret_has_its_kubectl_command_in_the_readme() -> None:
    readme = (K8S / "README.md").read_text()
    created = set(
        re.findall(r"kubectl -n omega create secret (?:generic|tls) ([a-z0-9-]+)", readme)
    )
    assert referenced_secrets(DOCS) == created


def test_federation_worker_is_a_forbid_concurrency_cronjob() -> None:
    check_federation_cronjob(DOCS)


def test_configmaps_hold_real_settings_that_wire_the_shards_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    check_settings_and_wiring(DOCS, monkeypatch)


def test_configmap_keys_belong_to_the_settings_class_of_their_readers() -> None:
    readers: dict[str, set[str]] = {}
    for _, template in pod_templates(DOCS):
        for container in template["spec"]["containers"]:
            for source in container.get("envFrom", []):
                readers.setdefault(source["configMapRef"]["name"], set()).add(component(template))
    maps = by_name(DOCS, "ConfigMap")
    assert set(readers) == set(maps), "a ConfigMap nobody reads, or one missing"
    for name, config_map in maps.items():
        (which,) = readers[name]
        cls = SETTINGS_CLASSES[which]
        prefix = str(cls.model_config.get("env_prefix", ""))
        fields = {prefix + f.upper() for f in cls.model_fields}
        assert set(config_map["data"]) <= fields, sorted(set(config_map["data"]) - fields)


def test_postgres_cluster_creates_the_databases_the_services_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    check_postgres(DOCS, monkeypatch)


def test_autoscalers_and_disruption_budgets_target_one_shard_each() -> None:
    check_hpa_and_pdb(DOCS)
    assert len(of_kind(DOCS, "HorizontalPodAutoscaler")) == 2
    assert len(of_kind(DOCS, "PodDisruptionBudget")) == 2


def test_images_are_the_ones_deploy_builds() -> None:
    images = {
        component(t): t["spec"]["containers"][0]["image"].split(":", 1)[0]
        for _, t in pod_templates(DOCS)
    }
    assert images == {
        "constellation": compose_image("constellation-0"),
        "federation": compose_image("federation-worker"),
    }
