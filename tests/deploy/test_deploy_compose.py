"""deploy/compose.yaml and what it mounts: the compose specification's schema, the stack's
invariants, the Prometheus and Grafana provisioning, and the dev-secrets generator.

Static only (no Docker engine here): the schema check, the parsed file, and a real run of
deploy/dev-secrets.sh whose outputs (certificates, token, env files) are checked.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from omega_common.auth import FleetKeys
from omega_common.grpc_auth import SERVICE_PREFIX
from tests.deploy.helpers import DEPLOY, ROOT, tool, unknown_omega_vars

COMPOSE_FILE = DEPLOY / "compose.yaml"
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
REPLICAS = ["constellation-0", "constellation-1", "constellation-2"]
SECRET_WORDS = re.compile(r"PASSWORD|TOKEN|SECRET|KEYS?\b|_KEY_|DSN|DATABASE_URL")


def _check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_compose_file_matches_the_compose_specification(tmp_path: Path) -> None:
    done = _check_jsonschema(COMPOSE_FILE)
    assert done.returncode == 0, done.stdout + done.stderr
    # The schema really applies: a misspelt service key is refused.
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE_FILE.read_text().replace("stop_grace_period: 30s", "grace: 30s"))
    done = _check_jsonschema(broken)
    assert done.returncode != 0, "the compose schema accepted an unknown key"


def _env(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment", {})
    assert isinstance(env, dict), f"{service}: environment as a mapping"
    return {str(k): str(v) for k, v in env.items()}


def test_three_replicas_of_one_shard_share_one_database() -> None:
    replicas = sorted(s for s in SERVICES if s.startswith("constellation"))
    assert replicas == REPLICAS
    envs = [_env(s) for s in replicas]
    assert all(env == envs[0] for env in envs), "replicas differ only by their host ports"
    env = envs[0]
    assert env["OMEGA_CONSTELLATION_SHARD_ID"] == "shard-0"
    assert json.loads(env["OMEGA_CONSTELLATION_SHARD_IDS"]) == ["shard-0"]
    # One database: the same env file (its DSN) for every replica; the worker has its own.
    files = {tuple(SERVICES[s]["env_file"]) for s in replicas}
    assert files == {("./dev-secrets/constellation.env",)}
    for replica in replicas:
        assert SERVICES[replica]["image"] == SERVICES[REPLICAS[0]]["image"]
        assert SERVICES[replica]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # Device gRPC and metrics published per replica, on distinct host ports; the internal
    # federation listener is never published.
    published: list[str] = []
    for replica in replicas:
        targets = {p.rsplit(":", 1)[1] for p in SERVICES[replica]["ports"]}
        assert targets == {env["OMEGA_CONSTELLATION_PORT"], env["OMEGA_CONSTELLATION_METRICS_PORT"]}
        assert all(p.startswith("127.0.0.1:") for p in SERVICES[replica]["ports"])
        published += [p.rsplit(":", 1)[0] for p in SERVICES[replica]["ports"]]
        assert SERVICES[replica]["expose"] == [env["OMEGA_CONSTELLATION_FEDERATION_PORT"]]
    assert len(published) == len(set(published))


def test_every_long_running_service_has_a_healthcheck() -> None:
    for name, service in SERVICES.items():
        check = service.get("healthcheck")
        assert check and check["test"][0] == "CMD", name
    assert SERVICES["constellation-0"]["healthcheck"]["test"] == [
        "CMD",
        "omega-constellation",
        "health",
    ]
    assert SERVICES["postgres"]["healthcheck"]["test"][1] == "pg_isready"


def test_every_omega_variable_is_a_settings_field() -> None:
    names = [n for service in SERVICES for n in _env(service)]
    assert any(n.startswith("OMEGA_") for n in names)
    assert unknown_omega_vars(names) == []


def test_no_secret_in_the_compose_file_only_references_to_git_ignored_files() -> None:
    text = COMPOSE_FILE.read_text()
    assert "BEGIN" not in text and "PRIVATE KEY" not in text
    assert not re.search(r"v1\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.\d+\.", text), "a token"
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), "a DSN with a password"
    assert not re.search(r"[A-Za-z0-9+/]{32,}={0,2}", text), "a base64 secret"
    secrets = COMPOSE["secrets"]
    for name, secret in secrets.items():
        assert set(secret) == {"file"}, name
        assert secret["file"].startswith("./dev-secrets/"), name
    for name, service in SERVICES.items():
        mounted = set(service.get("secrets", []))
        assert mounted <= set(secrets), name
        for env_file in service.get("env_file", []):
            assert env_file.startswith("./dev-secrets/"), name
        for key, value in _env(name).items():
            if SECRET_WORDS.search(key) and not key.endswith("FLEET_KEY_ID"):
                assert key.endswith("_FILE"), f"{name}: {key} must come from a file"
                assert value.startswith("/run/secrets/"), f"{name}: {key}"
            if value.startswith("/run/secrets/"):
                assert value.removeprefix("/run/secrets/") in mounted, f"{name}: {key}"
    ignored = subprocess.run(
        ["git", "check-ignore", "--quiet", "deploy/dev-secrets/fleet-keys.json"],
        cwd=ROOT,
        check=False,
    )
    assert ignored.returncode == 0, "deploy/dev-secrets/ must be git-ignored"


def test_the_worker_reaches_every_replica_on_the_internal_listener() -> None:
    worker = _env("federation-worker")
    replica = _env("constellation-0")
    assert SERVICES["federation-worker"]["command"] == ["periodic"]
    shards = json.loads(worker["OMEGA_FEDERATION_SHARDS"])
    assert list(shards) == [replica["OMEGA_CONSTELLATION_SHARD_ID"]]
    host, port = shards["shard-0"].rsplit(":", 1)
    assert port == replica["OMEGA_CONSTELLATION_FEDERATION_PORT"]
    for name in REPLICAS:  # the address is the network alias every replica answers
        assert host in SERVICES[name]["networks"]["default"]["aliases"]
    for key in ("TLS_CA_FILE", "TLS_CERT_FILE", "TLS_KEY_FILE", "SERVICE_TOKEN_FILE"):
        assert worker[f"OMEGA_FEDERATION_{key}"].startswith("/run/secrets/")
    assert "OMEGA_FEDERATION_PLAINTEXT" not in worker
    assert "OMEGA_CONSTELLATION_PLAINTEXT" not in replica
    assert "OMEGA_CONSTELLATION_AUTH" not in replica  # credentials required (the default)
    assert (
        worker["OMEGA_FEDERATION_MIN_SOURCES"]
        == replica["OMEGA_CONSTELLATION_MIN_PUBLISHED_SOURCES"]
    )
    assert SERVICES["federation-worker"]["env_file"] == ["./dev-secrets/federation.env"]
    for name in REPLICAS:
        assert SERVICES["federation-worker"]["depends_on"][name]["condition"] == "service_healthy"


def test_prometheus_scrapes_every_replica_and_the_worker() -> None:
    volumes = SERVICES["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {
        name: sorted(t for group in job["static_configs"] for t in group["targets"])
        for name, job in jobs.items()
    }
    metrics = _env("constellation-0")["OMEGA_CONSTELLATION_METRICS_PORT"]
    assert targets["omega-constellation"] == [f"{r}:{metrics}" for r in REPLICAS]
    worker_port = _env("federation-worker")["OMEGA_FEDERATION_METRICS_PORT"]
    assert targets["omega-federation"] == [f"federation-worker:{worker_port}"]
    for group in jobs["omega-constellation"]["static_configs"]:
        assert group["labels"]["shard"] == "shard-0"


def _mount(service: str, source: str) -> str:
    for volume in SERVICES[service]["volumes"]:
        parts = volume.split(":")
        if parts[0] == source:
            return parts[1]
    raise AssertionError(f"{service} does not mount {source}")


def test_grafana_provisions_the_prometheus_datasource_and_a_dashboard() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert _mount("grafana", "./grafana/provisioning") == "/etc/grafana/provisioning"
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in SERVICES["prometheus"]["ports"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "omega.yaml").read_text())[
        "providers"
    ]
    dashboards = provider["options"]["path"]
    assert _mount("grafana", "./grafana/dashboards") == dashboards
    files = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
    assert files
    for file in files:
        dashboard = json.loads(file.read_text())
        assert dashboard["uid"] and dashboard["panels"]
        for panel in dashboard["panels"]:
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert all(target["expr"] for target in panel["targets"])
    env = _env("grafana")
    assert env["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"


def test_postgres_creates_both_databases_from_a_password_file() -> None:
    env = _env("postgres")
    assert env["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert "POSTGRES_PASSWORD" not in env
    init = _mount("postgres", "./postgres/init-databases.sql")
    assert init.startswith("/docker-entrypoint-initdb.d/")
    sql = (DEPLOY / "postgres" / "init-databases.sql").read_text()
    assert "CREATE DATABASE omega_federation OWNER omega;" in sql
    assert env["POSTGRES_DB"] == "omega" and env["POSTGRES_USER"] == "omega"


@pytest.fixture(scope="module")
def dev_secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/dev-secrets.sh run for real into a temporary folder."""
    out = tmp_path_factory.mktemp("deploy") / "dev-secrets"
    subprocess.run(
        ["bash", str(DEPLOY / "dev-secrets.sh"), str(out)],
        env={**os.environ, "PYTHON": sys.executable},
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


def _env_file(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and line[0] != "#"]
    return dict(line.split("=", 1) for line in lines)


def test_dev_secrets_script_writes_every_file_compose_mounts(dev_secrets: Path) -> None:
    for secret in COMPOSE["secrets"].values():
        assert (DEPLOY / secret["file"]).parent == DEPLOY / "dev-secrets"
        assert (dev_secrets / Path(secret["file"]).name).is_file(), secret
    for service in SERVICES.values():
        for env_file in service.get("env_file", []):
            assert (dev_secrets / Path(env_file).name).is_file(), env_file
    assert stat.S_IMODE(dev_secrets.stat().st_mode) == 0o700
    assert stat.S_IMODE((dev_secrets / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((dev_secrets / "server.key").stat().st_mode) == 0o644


def test_dev_secrets_are_consistent_with_the_stack(dev_secrets: Path) -> None:
    keys = FleetKeys.from_file(dev_secrets / "fleet-keys.json")
    token = (dev_secrets / "federation-service-token").read_text().strip()
    assert keys.verify(token).device_id == SERVICE_PREFIX + "federation-worker"
    cert = x509.load_pem_x509_certificate((dev_secrets / "server.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(names.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    assert {*REPLICAS, "shard-0"} <= dns  # the worker's target and each replica by name
    assert "127.0.0.1" in ips  # `omega-constellation health` inside the container
    password = (dev_secrets / "postgres-password").read_text().strip()
    constellation = _env_file(dev_secrets / "constellation.env")
    federation = _env_file(dev_secrets / "federation.env")
    assert unknown_omega_vars([*constellation, *federation]) == []
    assert constellation == {
        "OMEGA_CONSTELLATION_DATABASE_URL": f"postgresql://omega:{password}@postgres:5432/omega"
    }
    assert federation == {
        "OMEGA_FEDERATION_DATABASE_URL": (
            f"postgresql://omega:{password}@postgres:5432/omega_federation"
        )
    }


def test_dev_secrets_script_never_overwrites_silently(dev_secrets: Path) -> None:
    before = (dev_secrets / "fleet-keys.json").read_text()
    again = subprocess.run(
        ["bash", str(DEPLOY / "dev-secrets.sh"), str(dev_secrets)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert again.returncode == 1
    assert "--force" in again.stderr
    assert (dev_secrets / "fleet-keys.json").read_text() == before
