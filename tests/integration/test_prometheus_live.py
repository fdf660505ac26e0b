"""A real Prometheus scraping a real shard and federation worker, with Omega's alert rules.

The local stack runs as OS processes configured only through their environment, TLS and
credentials on: one constellation replica (`fault_support.ShardProcesses`, its own database)
with its /metrics port, and ``omega-federation periodic`` (its own database, every second,
mutual TLS and its service token). Real brains sync with the replica (and one call with a
forged token is refused). Debian's ``prometheus`` binary runs with deploy/prometheus's
configuration, its targets pointed at these processes, scraping and evaluating every second.

Checked through the Prometheus HTTP API (urllib): every target is up; the sync counters equal
what the devices did; every dashboard expression evaluates and returns series; every metric
the alert rules read has live series and every rule expression evaluates; the rule groups
load and evaluate with health "ok"; the model's epsilon gauges equal the worker's round
record; and stopping the worker makes OmegaReplicaDown go pending for it.

Bounded: the stack must be ready within ``BUDGET_SECONDS``; every process is killed and the
temporary folder removed whatever happens. Skipped, saying why, without the prometheus binary.

Also here: the federation worker's model epsilon gauges after an in-process round (no
Prometheus needed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import yaml
from prometheus_client import REGISTRY

from omega.v1 import sync_pb2
from omega_brain import (
    Brain,
    BrainConfig,
    CatalogIndex,
    GrpcTransport,
    ViewingEvent,
    fetch_catalog,
)
from omega_brain.errors import SyncError
from omega_common.grpc_auth import SERVICE_PREFIX
from omega_federation.settings import FederationSettings
from omega_federation.state import WorkerState
from omega_federation.worker import run_round
from tests.deploy.promql import (
    INSTALL_HINT,
    PROMETHEUS_DIR,
    RULES_FILE,
    dashboard_expressions,
    metric_names,
    rule_expressions,
)

from .conftest import StartShard, write_catalog
from .fault_support import Fleet, ShardProcesses, free_port, shard_catalog

pytestmark = pytest.mark.integration

BUDGET_SECONDS = 50.0
"""From the first process started to every check passed (the test's own limit is 60 s)."""
DEVICES = 3


def _prometheus_binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").is_file() else None
    )
    if found is None:
        pytest.skip(f"the prometheus binary is not installed: {INSTALL_HINT}")
    return found


class PrometheusApi:
    """The HTTP API of a Prometheus on 127.0.0.1 (stdlib urllib only)."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        """``data`` of a successful API answer.

        Raises:
            RuntimeError: the API answered an error (its errorType and error in the message).
        """
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                body = json.load(answer)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result (a vector; a scalar becomes one sample)."""
        data = self.get("/api/v1/query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The value of a one-series query, None when it returns nothing."""
        result = self.query(expr)
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else None

    def ready(self) -> bool:
        """/-/ready answers 200."""
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False


def _config(shard_metrics: int, worker_metrics: int, prometheus: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with every interval 1 s, the rules by absolute path
    and each job's first target group pointed at the local processes (labels kept)."""
    config: dict[str, Any] = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / pattern) for pattern in config["rule_files"]]
    live = {
        "omega-constellation": f"127.0.0.1:{shard_metrics}",
        "omega-federation": f"127.0.0.1:{worker_metrics}",
        "prometheus": f"127.0.0.1:{prometheus}",
    }
    assert {job["job_name"] for job in config["scrape_configs"]} == set(live)
    for job in config["scrape_configs"]:
        group = job["static_configs"][0]
        job["static_configs"] = [{**group, "targets": [live[job["job_name"]]]}]
    return config


@contextlib.contextmanager
def _process(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child process (output to ``log``), SIGTERMed then SIGKILLed on exit, always reaped."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        yield process
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _tail(*logs: Path) -> str:
    return "\n".join(
        f"--- {log.name}\n{log.read_text(errors='replace')[-2500:]}" for log in logs if log.exists()
    )


async def _until(
    what: str, check: Callable[[], Any], deadline: float, logs: Callable[[], str]
) -> Any:
    """Poll ``check`` (in a thread) every 0.25 s until it returns a truthy value."""
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await asyncio.to_thread(check)
        except (OSError, RuntimeError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})\n{logs()}")


@pytest.mark.timeout(90)
async def test_prometheus_scrapes_the_live_stack_with_the_rules_and_dashboard(
    make_database: Callable[[], Awaitable[str]],
) -> None:
    binary = _prometheus_binary()
    shard_dsn, worker_dsn = await make_database(), await make_database()
    started = time.monotonic()
    deadline = started + BUDGET_SECONDS
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="omega-prom-")))
        shard_metrics, worker_metrics, prometheus_port = free_port(), free_port(), free_port()
        write_catalog(work / "catalog.npz")
        shard = ShardProcesses(
            work / "shard",
            shard_dsn,
            work / "catalog.npz",
            replicas=1,
            extra_env={"OMEGA_CONSTELLATION_METRICS_PORT": str(shard_metrics)},
        )
        replica = shard.replicas[0]
        (work / "prometheus.yml").write_text(
            yaml.safe_dump(_config(shard_metrics, worker_metrics, prometheus_port))
        )
        worker_log, prometheus_log = work / "worker.log", work / "prometheus.log"

        def logs() -> str:
            return shard.logs() + "\n" + _tail(worker_log, prometheus_log)

        # Prometheus first: it starts while the replica does.
        stack.enter_context(
            _process(
                [
                    binary,
                    f"--config.file={work / 'prometheus.yml'}",
                    f"--storage.tsdb.path={work / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prometheus_port}",
                    "--log.level=warn",
                ],
                {},
                prometheus_log,
            )
        )
        api = PrometheusApi(prometheus_port)
        stack.callback(shard.close)
        await asyncio.to_thread(shard.__enter__)

        # Real devices: brains over TLS with their own tokens, a few syncs each.
        catalog = await asyncio.to_thread(shard_catalog, shard)
        fleet = Fleet(shard, catalog, work / "devices", DEVICES, seed=5)
        stack.callback(fleet.close)
        await asyncio.to_thread(fleet.replay, 4, 2, 0.01)
        await asyncio.to_thread(fleet.finish)
        syncs_ok = sum(d.transport.attempts - len(d.transport.failures) for d in fleet.devices)
        assert syncs_ok >= DEVICES * 4, fleet.failures()
        # One sync with a forged token: refused, counted as UNAUTHENTICATED.
        forged = GrpcTransport(
            replica.address, credential="forged", root_certificates=shard.root_certificates
        )
        stack.callback(forged.close)
        with pytest.raises(SyncError) as refused:
            forged.sync_patterns(sync_pb2.SyncPatternsRequest(device_id="tv-forged"), 5.0)
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED

        # The federation worker, every second, over mutual TLS with its service token.
        worker_cert, worker_key = shard.pki.client_certs["federation-worker"]
        worker = stack.enter_context(
            _process(
                [sys.executable, "-m", "omega_federation", "periodic"],
                {
                    "OMEGA_FEDERATION_SHARDS": json.dumps(
                        {"shard-0": f"127.0.0.1:{replica.federation_port}"}
                    ),
                    "OMEGA_FEDERATION_DATABASE_URL": worker_dsn,
                    "OMEGA_FEDERATION_METRICS_PORT": str(worker_metrics),
                    "OMEGA_FEDERATION_INTERVAL_SECONDS": "1",
                    "OMEGA_FEDERATION_TLS_CA_FILE": str(shard.pki.ca_cert),
                    "OMEGA_FEDERATION_TLS_CERT_FILE": str(worker_cert),
                    "OMEGA_FEDERATION_TLS_KEY_FILE": str(worker_key),
                    "OMEGA_FEDERATION_SERVICE_TOKEN": shard.keys.issue(
                        SERVICE_PREFIX + "federation-worker"
                    ),
                    "OMEGA_FEDERATION_SEED": "3",
                    "OMEGA_FEDERATION_MODEL_FACTORS": "4",
                    "OMEGA_FEDERATION_MODEL_ACTIVE_ITEMS": "30",
                    "OMEGA_FEDERATION_RPC_TIMEOUT_SECONDS": "10",
                    "OMEGA_FEDERATION_LOG_LEVEL": "WARNING",
                },
                worker_log,
            )
        )

        await _until("Prometheus ready", api.ready, deadline, logs)

        def targets_up() -> list[dict[str, Any]] | None:
            active: list[dict[str, Any]] = api.get("/api/v1/targets")["activeTargets"]
            jobs = {t["labels"]["job"] for t in active}
            ok = len(active) == 3 and jobs == {
                "omega-constellation",
                "omega-federation",
                "prometheus",
            }
            return active if ok and all(t["health"] == "up" for t in active) else None

        active = await _until("every target up", targets_up, deadline, logs)
        assert {t["scrapeUrl"] for t in active} >= {
            f"http://127.0.0.1:{shard_metrics}/metrics",
            f"http://127.0.0.1:{worker_metrics}/metrics",
        }
        await _until(
            "a federation round published",
            lambda: (api.value('omega_federation_rounds_total{status="published"}') or 0) >= 1,
            deadline,
            logs,
        )

        # Every dashboard expression evaluates and returns series (rates need two scrapes).
        expressions = dashboard_expressions()

        def empty_panels() -> list[str]:
            return [where for where, expr in expressions if not api.query(expr)]

        def dashboard_full() -> bool:
            return not empty_panels()

        try:
            await _until(
                "every dashboard expression to return series", dashboard_full, deadline, logs
            )
        except AssertionError as exc:
            raise AssertionError(f"empty: {empty_panels()}\n{exc}") from None

        # The sync counters are what the devices did.
        sync = 'omega_constellation_rpc_handled_total{method="SyncPatterns"'
        assert api.value(f'sum({sync},code="OK"}})') == syncs_ok
        assert api.value(f'sum({sync},code="UNAUTHENTICATED"}})') == 1
        assert (
            api.value(f"sum({sync.replace('handled_total', 'duration_seconds_count')}}})") or 0
        ) >= syncs_ok + 1
        assert api.value('omega_constellation_database_up{job="omega-constellation"}') == 1

        # Every metric the rules read has live series; every rule expression evaluates.
        for alert, expr in rule_expressions():
            for name in sorted(metric_names(expr)):
                assert api.query(f"count({name})"), f"{alert}: no live series of {name}"
            api.query(expr)  # raises on an evaluation error

        # The rule groups are loaded and evaluated without error.
        def rules_evaluated() -> list[dict[str, Any]] | None:
            groups: list[dict[str, Any]] = api.get("/api/v1/rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            evaluated = all(not r["lastEvaluation"].startswith("0001-") for r in rules)
            return rules if rules and evaluated else None

        rules = await _until("every rule evaluated", rules_evaluated, deadline, logs)
        loaded = yaml.safe_load(RULES_FILE.read_text())
        assert sorted(r["name"] for r in rules) == sorted(
            r["alert"] for g in loaded["groups"] for r in g["rules"]
        )
        for rule in rules:
            assert rule["health"] == "ok" and not rule.get("lastError"), rule

        # The model's privacy gauges equal the worker's own record of its last round.
        conn = await asyncpg.connect(worker_dsn)
        try:
            figures = json.loads(
                await conn.fetchval(
                    "SELECT figures::text FROM federation_rounds WHERE status = 'published' "
                    "ORDER BY round_id DESC LIMIT 1"
                )
            )
        finally:
            await conn.close()
        epsilon = api.value("omega_federation_model_cumulative_epsilon")
        assert (
            epsilon is not None
            and epsilon > 0
            and figures["model_action"]
            in (
                "created",
                "skipped_no_updates",
            )
        ), figures
        assert epsilon == pytest.approx(figures["model_cumulative_epsilon"])
        assert api.value("omega_federation_model_epsilon_budget") == pytest.approx(
            FederationSettings().model_epsilon_budget
        )
        assert api.value("omega_federation_round_interval_seconds") == 1.0
        since = api.value("time() - omega_federation_last_success_timestamp_seconds")
        assert since is not None and since < 30

        # Stopping the worker: its target goes down and OmegaReplicaDown is pending for it.
        _stop(worker)
        assert worker.returncode == 0, logs()  # SIGTERM: a clean stop

        def replica_down_pending() -> bool:
            alerts = api.get("/api/v1/alerts")["alerts"]
            return any(
                a["labels"]["alertname"] == "OmegaReplicaDown"
                and a["labels"]["job"] == "omega-federation"
                and a["state"] == "pending"
                for a in alerts
            )

        await _until(
            "OmegaReplicaDown pending for the worker", replica_down_pending, deadline, logs
        )
        elapsed = time.monotonic() - started
        print(f"live Prometheus stack checked in {elapsed:.1f} s")
        assert elapsed < BUDGET_SECONDS


async def test_a_round_sets_the_model_privacy_gauges(
    start_shard: StartShard, make_database: Callable[[], Awaitable[str]], tmp_path: Path
) -> None:
    """The gauges OmegaPrivacyBudgetNearlySpent reads, after a real in-process round."""
    write_catalog(tmp_path / "catalog.npz")
    shard = await start_shard(
        database_url=await make_database(), catalog_path=tmp_path / "catalog.npz"
    )
    # Two devices' viewings, so that the round creates the model (its count release).
    with GrpcTransport(f"127.0.0.1:{shard.port}", plaintext=True) as transport:
        fetched = await asyncio.to_thread(fetch_catalog, transport)
        catalog = CatalogIndex(fetched.content_ids, fetched.embeddings)
        for i in range(2):
            with Brain(
                f"tv-gauge-{i}",
                BrainConfig(store_path=tmp_path / f"tv-{i}.sqlite", honour_sync_pace=False),
                transport=transport,
                catalog=catalog,
            ) as brain:
                for n in range(3):
                    content = fetched.content_ids[(i * 7 + n * 3) % len(fetched.content_ids)]
                    brain.observe(
                        ViewingEvent(content, 1_795_300_000_000 + n * 60_000, completion=1.0)
                    )
                result = await asyncio.to_thread(brain.sync)
                assert result.ok, result.error
    settings = FederationSettings(
        shards={"shard-0": f"127.0.0.1:{shard.federation_port}"},
        plaintext=True,
        seed=1,
        model_factors=4,
        model_active_items=30,
        model_epsilon_budget=6.0,
    )
    state = await WorkerState.open(await make_database())
    channel = grpc.aio.insecure_channel(settings.shards["shard-0"])
    try:
        report = await run_round(settings, state, {"shard-0": channel})
    finally:
        await channel.close()
        await state.close()
    assert report.status == "published" and report.model["model_action"] == "created"
    assert REGISTRY.get_sample_value("omega_federation_model_epsilon_budget") == 6.0
    spent = REGISTRY.get_sample_value("omega_federation_model_cumulative_epsilon")
    assert spent is not None and 0 < spent <= 6.0
    assert spent == report.model["model_cumulative_epsilon"]
