"""Run a fuzz campaign against a shard and check what must hold afterwards.

Checks (each failure is listed in `FuzzReport.failures`):

1. no answer has status UNKNOWN or INTERNAL (every hostile request is refused cleanly,
   whatever credential it carries: UNAUTHENTICATED and PERMISSION_DENIED are answers);
2. the health service answered SERVING on every listener throughout (polled every second);
3. the server's resident memory at the end exceeds its memory after the warm-up (every seed
   once, then the first ``rss_warmup_cases`` cases) by less than ``max_rss_growth_bytes``
   (when its pid is known; see `FuzzConfig`);
4. requests that were refused wrote nothing: refused cases are sent again in batches (with
   the same credential) and every table's row count and content digest must be unchanged
   across a batch in which every case was refused again (when the database is known);
5. the server logged no stack trace (when its log is known): only INTERNAL errors may log one;
6. a call whose credential must be refused (`Credential.expect`: none, forged, another
   device's, the wrong kind for the listener) got that refusal, or one that comes before
   the credential check (a request over the listener's receive limit, bytes that do not
   parse as the request): any other answer came from behind the check.

With a `MetadataHook` (`tools.fuzz.credentials.CredentialMix` for a server that checks
credentials) every case carries the credential the hook gives it; the report counts answers
per credential kind as well as per method.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import grpc
from google.protobuf import message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tools.fuzz.cases import Case, CasePlan
from tools.fuzz.credentials import NO_CREDENTIAL, Credential, MetadataHook
from tools.fuzz.reflection import Rpc, discover
from tools.fuzz.seeds import seed_builders
from tools.fuzz.shard import database_state, rss_bytes

__all__ = ["FuzzConfig", "FuzzReport", "MetadataHook", "run_fuzz"]

_FORBIDDEN: Final[frozenset[str]] = frozenset({"UNKNOWN", "INTERNAL"})
_SUBSCRIPTIONS: Final[frozenset[str]] = frozenset({"/grpc.health.v1.Health/Watch"})
"""Server streams that never end by design: read with a short deadline."""
_LOCAL_HOSTS: Final[frozenset[str]] = frozenset({"127.0.0.1", "localhost"})
_MAX_EXAMPLES: Final[int] = 20
_NOT_REFUSED: Final[frozenset[str]] = frozenset({"OK", "DEADLINE_EXCEEDED", "CANCELLED"})
"""Outcomes that are not a refusal (a timed-out request may still be applied)."""
_REFLECTION_PATH: Final[str] = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


@dataclass(frozen=True)
class FuzzConfig:
    """How a run goes.

    Attributes:
        cases: Cases to send (the sweep first, then random ones).
        seed: The run's seed: the same seed and server give the same cases.
        concurrency: Requests in flight at once.
        time_limit_seconds: The run stops sending new cases after this long.
        call_timeout_seconds: Deadline of one call.
        subscription_timeout_seconds: Deadline of a call to a never-ending stream (Watch).
        health_interval_seconds: Pause between two health polls.
        max_rss_growth_bytes: Largest accepted growth of the server's resident memory, from
            the end of the warm-up to the end of the run (50 MiB).
        rss_warmup_cases: Cases sent after the seeds and before the memory baseline (100, at
            most half the cases run): the first requests of each kind load code paths,
            caches and pools (the database pool's connections, protobuf and numpy code,
            gRPC's buffers), which is not growth with the number of requests; everything
            after them counts, a leak as well as memory the allocator keeps.
        replay_rejected: Send refused cases again to check that they write nothing.
        max_replayed: Most refused cases sent again (a seeded sample when there are more).
        replay_batch: Refused cases per database comparison.
        services: Only fuzz these services (full names); None: every listed service.
        metadata: The credential of each call (None: none, for a server without credentials;
            `tools.fuzz.credentials.CredentialMix` for one with).
        record: Keep every case's outcome in `FuzzReport.records` (to reproduce some).
    """

    cases: int = 10_000
    seed: int = 0
    concurrency: int = 8
    time_limit_seconds: float = 900.0
    call_timeout_seconds: float = 15.0
    subscription_timeout_seconds: float = 0.3
    health_interval_seconds: float = 1.0
    max_rss_growth_bytes: int = 50 << 20
    rss_warmup_cases: int = 100
    replay_rejected: bool = True
    max_replayed: int = 10_000
    replay_batch: int = 25
    services: frozenset[str] | None = None
    metadata: MetadataHook | None = None
    record: bool = False


@dataclass
class FuzzReport:
    """What a run did and found.

    Attributes:
        cases_run: Cases sent (fewer than asked when the time limit was reached).
        statuses: (method path, status code name) -> count.
        credentials: (credential kind, status code name) -> count (``plain`` without a hook).
        kinds: Case kind -> count.
        failures: Every violated check, one line each.
        examples: Failing cases (index, kind, credential, method, status, note, details), the
            first 20.
        rss_start_bytes: Server memory after every seed was sent once (0: unknown).
        rss_baseline_bytes: Server memory after the warm-up cases: the growth baseline.
        rss_warmup_cases: Cases sent before the baseline.
        rss_end_bytes: Server memory at the end (0: unknown).
        rss_peak_bytes: Largest sample.
        rss_samples: (cases answered, server memory in bytes), one per health poll.
        health_polls: Health polls made.
        health_failures: The polls that did not answer SERVING.
        replayed: Refused cases sent again.
        replay_batches_checked: Batches whose database comparison applied.
        replay_batches_inconclusive: Batches in which some case was accepted on replay.
        tracebacks: Stack traces in the server's log.
        past_the_check: Calls whose credential must be refused that were answered otherwise.
        seconds: Wall time of the run.
        truncated: The time limit stopped the run early.
        records: Every case's outcome (with ``FuzzConfig.record``).
        slowest: The five slowest cases (seconds from send to the end of the answer).
    """

    cases_run: int = 0
    statuses: Counter[tuple[str, str]] = field(default_factory=Counter)
    credentials: Counter[tuple[str, str]] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)
    rss_start_bytes: int = 0
    rss_baseline_bytes: int = 0
    rss_warmup_cases: int = 0
    rss_end_bytes: int = 0
    rss_peak_bytes: int = 0
    rss_samples: list[tuple[int, int]] = field(default_factory=list)
    health_polls: int = 0
    health_failures: list[str] = field(default_factory=list)
    replayed: int = 0
    replay_batches_checked: int = 0
    replay_batches_inconclusive: int = 0
    tracebacks: int = 0
    past_the_check: int = 0
    seconds: float = 0.0
    truncated: bool = False
    records: list[dict[str, Any]] = field(default_factory=list)
    slowest: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No check failed."""
        return not self.failures

    @property
    def rss_growth_bytes(self) -> int:
        """Server memory at the end minus after the warm-up (0: not measured)."""
        if not self.rss_baseline_bytes or not self.rss_end_bytes:
            return 0
        return self.rss_end_bytes - self.rss_baseline_bytes

    def table(self, by: str = "method") -> str:
        """Status counts per method (``by="method"``) or per credential kind (``"credential"``)
        as a text table."""
        counts = self.statuses if by == "method" else self.credentials
        codes = sorted({c for _, c in counts})
        rows = sorted({r for r, _ in counts})
        width = max([len(r) for r in rows] + [len(by)])
        cell = max([len(c) for c in codes] + [7]) + 2
        lines = [by.ljust(width) + "".join(f"{c:>{cell}}" for c in codes)]
        for r in rows:
            lines.append(r.ljust(width) + "".join(f"{counts[r, c]:>{cell}}" for c in codes))
        totals = Counter[str]()
        for (_, c), n in counts.items():
            totals[c] += n
        lines.append("total".ljust(width) + "".join(f"{totals[c]:>{cell}}" for c in codes))
        return "\n".join(lines)

    def summary(self) -> str:
        """A human-readable summary: figures, the status table, failures."""
        mib = 1 << 20
        start, baseline = self.rss_start_bytes / mib, self.rss_baseline_bytes / mib
        end, peak = self.rss_end_bytes / mib, self.rss_peak_bytes / mib
        rss = (
            f"RSS {start:.1f} MiB after the seeds, {baseline:.1f} after"
            f" {self.rss_warmup_cases} warm-up cases, {end:.1f} at the end, peak {peak:.1f}:"
            f" growth {end - baseline:+.1f} MiB since the warm-up (peak {peak - baseline:+.1f})"
            if self.rss_start_bytes
            else "RSS not measured (server pid unknown)"
        )
        lines = [
            f"cases: {self.cases_run}; {self.seconds:.1f} s in all, the replay included"
            + (" (time limit reached)" if self.truncated else ""),
            "kinds: " + ", ".join(f"{k} {n}" for k, n in sorted(self.kinds.items())),
            rss,
            f"health polls: {self.health_polls} ({len(self.health_failures)} not SERVING)",
            f"refused cases replayed: {self.replayed} ({self.replay_batches_checked} batches"
            f" compared, {self.replay_batches_inconclusive} inconclusive)",
            f"stack traces in the server log: {self.tracebacks}",
            "calls with a credential that must be refused answered from behind the check:"
            f" {self.past_the_check}",
            "slowest: "
            + ", ".join(
                f"case {r['index']} {r['method'].rsplit('/', 1)[-1]} {r['status']}"
                f" {r['seconds']:.2f} s"
                for r in self.slowest
            ),
            "",
            self.table(),
            "",
            self.table("credential"),
            "",
        ]
        if self.failures:
            lines.append(f"FAILED ({len(self.failures)}):")
            lines += [f"  - {f}" for f in self.failures]
            for e in self.examples:
                lines.append(
                    f"    case {e['index']} [{e['kind']}, {e['credential']}] {e['method']}:"
                    f" {e['status']}"
                )
                lines.append(f"      {e['note'][:200]}")
                lines.append(f"      details: {e['details'][:200]}")
        else:
            lines.append("OK: every check passed")
        return "\n".join(lines)


def _check_local(target: str) -> None:
    host = target.rsplit(":", 1)[0].strip("[]")
    if host not in _LOCAL_HOSTS:
        raise ValueError(f"the fuzzer only talks to 127.0.0.1, not {target}")


class _Runner:
    def __init__(
        self,
        config: FuzzConfig,
        channels: dict[str, grpc.aio.Channel],
        limits: dict[str, int] | None = None,
    ) -> None:
        self.config = config
        self.channels = channels
        self.limits = limits or {}  # receive limit by target
        self.done = 0

    def credential(self, path: str, case: Case | None = None) -> Credential:
        """What a call carries: the hook's credential (`NO_CREDENTIAL` without a hook)."""
        hook = self.config.metadata
        return hook(path, case) if hook is not None else NO_CREDENTIAL

    def metadata(self, path: str) -> tuple[tuple[str, str], ...]:
        """The metadata of one of the fuzzer's own calls (reflection, health, catalog)."""
        return self.credential(path).metadata

    async def call(self, case: Case) -> tuple[Credential, str, str]:
        """Send one case; returns (its credential, status code name, details). Streams are
        read to the end."""
        rpc = case.rpc
        credential = self.credential(rpc.path, case)
        channel = self.channels[credential.target or rpc.target]
        subscription = rpc.path in _SUBSCRIPTIONS
        timeout = (
            self.config.subscription_timeout_seconds
            if subscription
            else self.config.call_timeout_seconds
        )
        kwargs: dict[str, Any] = {"timeout": timeout, "metadata": credential.metadata}
        try:
            if rpc.client_streaming and rpc.server_streaming:
                call = channel.stream_stream(rpc.path)(iter([case.payload]), **kwargs)
                async for _ in call:
                    pass
            elif rpc.server_streaming:
                call = channel.unary_stream(rpc.path)(case.payload, **kwargs)
                async for _ in call:
                    pass
            elif rpc.client_streaming:
                await channel.stream_unary(rpc.path)(iter([case.payload]), **kwargs)
            else:
                await channel.unary_unary(rpc.path)(case.payload, **kwargs)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            if subscription and code == "DEADLINE_EXCEEDED":
                return credential, "OK", "subscription open until the deadline"
            return credential, code, str(exc.details() or "")
        return credential, "OK", ""

    def past_the_check(self, case: Case, credential: Credential, code: str) -> bool:
        """The answer to a call whose credential must be refused came from behind the check:
        neither the expected refusal nor one that comes before the check."""
        if not credential.expect or code in credential.expect or code in _NOT_REFUSED - {"OK"}:
            return False
        target = credential.target or case.rpc.target
        if code == "RESOURCE_EXHAUSTED" and len(case.payload) > self.limits.get(target, 0):
            return False  # over the receive limit: refused before any interceptor
        if code == "INVALID_ARGUMENT":
            try:
                case.rpc.request.FromString(case.payload)
            except Exception:  # bytes that do not parse: refused before the check
                return False
        return True


async def _health_loop(
    runner: _Runner, report: FuzzReport, pid: int | None, stop: asyncio.Event
) -> None:
    """Poll health on every listener and sample memory until ``stop`` is set."""
    while not stop.is_set():
        for target, channel in runner.channels.items():
            try:
                answer = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""),
                    timeout=5.0,
                    metadata=runner.metadata("/grpc.health.v1.Health/Check"),
                )
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            except grpc.aio.AioRpcError as exc:
                status = exc.code().name
            report.health_polls += 1
            if status != "SERVING":
                report.health_failures.append(f"{target} was {status}")
        if pid is not None:
            rss = rss_bytes(pid)
            report.rss_peak_bytes = max(report.rss_peak_bytes, rss)
            report.rss_samples.append((runner.done, rss))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), runner.config.health_interval_seconds)


@dataclass(frozen=True)
class _Result:
    """One case's outcome (without its payload: a run may send gigabytes; rebuild it from
    the plan and the index)."""

    case: Case
    size: int
    credential: str
    code: str
    details: str
    seconds: float
    past_the_check: bool


async def _run_cases(
    runner: _Runner, plan: CasePlan, indices: Sequence[int], deadline: float | None
) -> tuple[list[_Result], bool]:
    """Send the cases ``indices`` with bounded concurrency; (results in order, truncated)."""
    results: dict[int, _Result] = {}
    queue = list(reversed(indices))
    truncated = False

    async def worker() -> None:
        nonlocal truncated
        while queue:
            if deadline is not None and time.monotonic() > deadline:
                truncated = True
                return
            index = queue.pop()
            case = plan.case(index)
            began = time.monotonic()
            credential, code, details = await runner.call(case)
            seconds = time.monotonic() - began
            past = runner.past_the_check(case, credential, code)
            light = replace(case, payload=b"")
            results[index] = _Result(
                light, len(case.payload), credential.kind, code, details, seconds, past
            )
            runner.done += 1

    await asyncio.gather(*(worker() for _ in range(runner.config.concurrency)))
    return [results[i] for i in indices if i in results], truncated


async def _replay(
    runner: _Runner, plan: CasePlan, refused: list[int], dsn: str, report: FuzzReport
) -> None:
    """Send refused cases again in batches; each fully refused batch must write nothing."""
    config = runner.config
    count = min(len(refused), config.max_replayed)
    sample = sorted(random.Random(config.seed).sample(refused, count))
    for start in range(0, len(sample), config.replay_batch):
        batch = sample[start : start + config.replay_batch]
        before = await database_state(dsn)
        results, _ = await _run_cases(runner, plan, batch, None)
        after = await database_state(dsn)
        report.replayed += len(results)
        if any(r.code == "OK" for r in results):
            report.replay_batches_inconclusive += 1
            continue
        report.replay_batches_checked += 1
        changed = sorted(t for t in after if after[t] != before.get(t))
        if changed:
            report.failures.append(
                f"refused cases {batch[0]}..{batch[-1]} changed tables {changed}"
            )


def _classes(pool: Any) -> Callable[[str], type[Message]]:
    def find(name: str) -> type[Message]:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))

    return find


async def _catalog_ids(runner: _Runner, rpcs: Sequence[Rpc]) -> list[str]:
    """A few content ids of the server's catalog (FetchEmbeddings), for the seeds."""
    fetch = next((r for r in rpcs if r.path.endswith("/ConstellationSync/FetchEmbeddings")), None)
    if fetch is None:
        return []
    request = fetch.request()
    request.page_size = 5  # type: ignore[attr-defined]
    try:
        raw = await runner.channels[fetch.target].unary_unary(fetch.path)(
            request.SerializeToString(), timeout=10.0, metadata=runner.metadata(fetch.path)
        )
    except grpc.aio.AioRpcError:
        return []
    answer = fetch.response.FromString(raw)
    return [item.content_id for item in answer.items]  # type: ignore[attr-defined]


async def run_fuzz(
    targets: Sequence[str],
    config: FuzzConfig,
    *,
    pid: int | None = None,
    database_url: str | None = None,
    log_path: Path | None = None,
    max_request_bytes: int = 1 << 20,
    internal_max_request_bytes: int | None = None,
    indices: Sequence[int] | None = None,
) -> FuzzReport:
    """Fuzz every RPC the servers at ``targets`` list by reflection, then run the checks.

    Args:
        targets: ``127.0.0.1:port`` of each listener (the first is the device listener); a
            target that does not answer reflection is skipped, a method listed by several is
            fuzzed on the first.
        config: The run's settings.
        pid: The server's process id (memory check), if known.
        database_url: The server's database (nothing-written check), if known.
        log_path: The server's log (stack trace check), if known.
        max_request_bytes: The device listener's receive limit (oversize cases exceed it).
        internal_max_request_bytes: The receive limit of the other listeners (the internal
            one); None: ``max_request_bytes``.
        indices: Only these cases (to reproduce some); default ``range(config.cases)``.

    Returns:
        The report; ``report.ok`` is False when a check failed.

    Raises:
        ValueError: a target that is not on 127.0.0.1.
        RuntimeError: no target answered reflection.
    """
    for target in targets:
        _check_local(target)
    started = time.monotonic()
    report = FuzzReport()
    channels: dict[str, grpc.aio.Channel] = {}
    options = [("grpc.max_receive_message_length", 64 << 20)]
    try:
        rpcs: list[Rpc] = []
        pools: list[Any] = []
        reflection_metadata = _Runner(config, {}).metadata(_REFLECTION_PATH)
        for target in targets:
            channel = grpc.aio.insecure_channel(target, options=options)
            try:
                found = await discover(channel, target, reflection_metadata)
            except (grpc.aio.AioRpcError, LookupError):
                await channel.close()
                continue
            channels[target] = channel
            known = {r.path: i for i, r in enumerate(rpcs)}
            for r in found:  # fuzzed on the first listener; the others are noted in `also`
                if r.path in known:
                    first = rpcs[known[r.path]]
                    rpcs[known[r.path]] = replace(first, also=(*first.also, target))
                else:
                    rpcs.append(r)
            if found:
                pools.append(found[0].request.DESCRIPTOR.file.pool)
        if not rpcs:
            raise RuntimeError(f"no server answered reflection at {list(targets)}")
        if config.services is not None:
            rpcs = [r for r in rpcs if r.service in config.services]
        limits = {t: max_request_bytes for t in targets}
        for t in targets[1:]:
            limits[t] = internal_max_request_bytes or max_request_bytes
        runner = _Runner(config, channels, limits)
        pool = pools[0]
        plan = CasePlan(
            rpcs,
            seed_builders(await _catalog_ids(runner, rpcs)),
            _classes(pool),
            config.seed,
            max_request_bytes,
            {t: internal_max_request_bytes for t in targets[1:]}
            if internal_max_request_bytes is not None
            else None,
        )
        # Warm-up: every seed once (imports, caches, pools), then the first memory figure.
        for rpc in rpcs:
            await runner.call(Case(-1, rpc, "seed", "warm-up", plan.seed_bytes(rpc, -1)))
        if pid is not None:
            report.rss_start_bytes = report.rss_peak_bytes = rss_bytes(pid)
        stop = asyncio.Event()
        monitor = asyncio.create_task(_health_loop(runner, report, pid, stop))
        chosen = list(range(config.cases)) if indices is None else list(indices)
        warmup = report.rss_warmup_cases = min(config.rss_warmup_cases, len(chosen) // 2)
        deadline = started + config.time_limit_seconds
        try:
            results, report.truncated = await _run_cases(runner, plan, chosen[:warmup], deadline)
            if pid is not None:
                report.rss_baseline_bytes = rss_bytes(pid)
            if not report.truncated:
                rest, report.truncated = await _run_cases(runner, plan, chosen[warmup:], deadline)
                results += rest
        finally:
            stop.set()
            await monitor
        report.cases_run = len(results)
        refused: list[int] = []
        for result in results:
            case, code = result.case, result.code
            report.statuses[case.rpc.path, code] += 1
            report.credentials[result.credential, code] += 1
            report.kinds[case.kind] += 1
            record = {
                "index": case.index,
                "kind": case.kind,
                "credential": result.credential,
                "method": case.rpc.path,
                "status": code,
                "note": case.note,
                "details": result.details,
                "bytes": result.size,
                "seconds": round(result.seconds, 4),
            }
            report.slowest = sorted([*report.slowest, record], key=lambda r: -r["seconds"])[:5]
            if config.record:
                report.records.append(record)
            if result.past_the_check:
                report.past_the_check += 1
            failed = code in _FORBIDDEN or result.past_the_check
            if failed and len(report.examples) < _MAX_EXAMPLES:
                report.examples.append(record)
            if code not in _FORBIDDEN and code not in _NOT_REFUSED:
                refused.append(case.index)
        if report.health_failures:
            report.failures.append(
                f"{len(report.health_failures)} health polls not SERVING, the first:"
                f" {report.health_failures[0]}"
            )
        forbidden = sum(n for (_, c), n in report.statuses.items() if c in _FORBIDDEN)
        if forbidden:
            report.failures.append(f"{forbidden} answers with status UNKNOWN or INTERNAL")
        if report.past_the_check:
            report.failures.append(
                f"{report.past_the_check} calls with a credential that must be refused were"
                " answered from behind the credential check"
            )
        if pid is not None:
            await asyncio.sleep(0.5)
            report.rss_end_bytes = rss_bytes(pid)
            report.rss_peak_bytes = max(report.rss_peak_bytes, report.rss_end_bytes)
            growth = report.rss_growth_bytes
            if growth >= config.max_rss_growth_bytes:
                report.failures.append(
                    f"server memory grew by {growth / (1 << 20):.1f} MiB after the first"
                    f" {warmup} cases (limit {config.max_rss_growth_bytes / (1 << 20):.0f} MiB)"
                )
        if database_url is not None and config.replay_rejected and refused:
            await _replay(runner, plan, refused, database_url, report)
        if log_path is not None:
            text = await asyncio.to_thread(log_path.read_text, errors="replace")
            report.tracebacks = text.count("Traceback (most recent call last)")
            if report.tracebacks:
                report.failures.append(f"{report.tracebacks} stack traces in the server log")
    finally:
        for channel in channels.values():
            await channel.close()
    report.seconds = time.monotonic() - started
    return report
