"""Run a fuzz campaign against a shard and check what must hold afterwards.

Checks (each failure is listed in `FuzzReport.failures`):

1. no answer has status UNKNOWN or INTERNAL (every hostile request is refused cleanly);
2. the health service answered SERVING on every listener throughout (polled every second);
3. the server's resident memory grew by less than ``max_rss_growth_bytes`` after the first
   ``rss_settle_cases`` cases (when its pid is known; see `FuzzConfig`);
4. requests that were refused wrote nothing: refused cases are sent again in batches and
   every table's row count and content digest must be unchanged across a batch in which
   every case was refused again (when the database is known);
5. the server logged no stack trace (when its log is known): only INTERNAL errors may log one.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
from google.protobuf import message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tools.fuzz.cases import Case, CasePlan
from tools.fuzz.reflection import Rpc, discover
from tools.fuzz.seeds import seed_builders
from tools.fuzz.shard import database_state, rss_bytes

__all__ = ["FuzzConfig", "FuzzReport", "MetadataHook", "run_fuzz"]

MetadataHook = Callable[[str], Sequence[tuple[str, str]]]
"""method path -> metadata to send with the call (where a device or service credential will
go once servers require one)."""

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
        max_rss_growth_bytes: Largest accepted growth of the server's resident memory,
            from the end of the settling cases to the end of the run.
        rss_settle_cases: Cases sent before the memory baseline (None: half the run). The
            server's resident memory rises over the first thousands of hostile cases and then
            holds (the allocator's high-water mark under concurrent large messages, which the
            internal listener accepts up to 256 MiB; the Python heap itself grows by a few
            hundred KiB): what must not happen is growth that goes on with the number of
            requests (a leak, a cache without a bound), so the second part of the run is
            compared with the first.
        replay_rejected: Send refused cases again to check that they write nothing.
        max_replayed: Most refused cases sent again (a seeded sample when there are more).
        replay_batch: Refused cases per database comparison.
        services: Only fuzz these services (full names); None: every listed service.
        metadata: Credentials hook (None: no metadata).
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
    rss_settle_cases: int | None = None
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
        kinds: Case kind -> count.
        failures: Every violated check, one line each.
        examples: Failing cases (index, kind, method, status, note, details), the first 20.
        rss_start_bytes: Server memory after the warm-up (0: unknown).
        rss_settled_bytes: Server memory after the settling cases: the growth baseline.
        rss_end_bytes: Server memory at the end (0: unknown).
        rss_peak_bytes: Largest sample.
        rss_samples: (cases answered, server memory in bytes), one per health poll.
        health_polls: Health polls made.
        health_failures: The polls that did not answer SERVING.
        replayed: Refused cases sent again.
        replay_batches_checked: Batches whose database comparison applied.
        replay_batches_inconclusive: Batches in which some case was accepted on replay.
        tracebacks: Stack traces in the server's log.
        seconds: Wall time of the run.
        truncated: The time limit stopped the run early.
        records: Every case's outcome (with ``FuzzConfig.record``).
        slowest: The five slowest cases (seconds from send to the end of the answer).
    """

    cases_run: int = 0
    statuses: Counter[tuple[str, str]] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)
    rss_start_bytes: int = 0
    rss_settled_bytes: int = 0
    rss_end_bytes: int = 0
    rss_peak_bytes: int = 0
    rss_samples: list[tuple[int, int]] = field(default_factory=list)
    health_polls: int = 0
    health_failures: list[str] = field(default_factory=list)
    replayed: int = 0
    replay_batches_checked: int = 0
    replay_batches_inconclusive: int = 0
    tracebacks: int = 0
    seconds: float = 0.0
    truncated: bool = False
    records: list[dict[str, Any]] = field(default_factory=list)
    slowest: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No check failed."""
        return not self.failures

    def table(self) -> str:
        """Status counts per method as a text table."""
        codes = sorted({c for _, c in self.statuses})
        methods = sorted({m for m, _ in self.statuses})
        width = max([len(m) for m in methods] + [6])
        lines = ["method".ljust(width) + "".join(f"{c:>20}" for c in codes)]
        for m in methods:
            lines.append(m.ljust(width) + "".join(f"{self.statuses[m, c]:>20}" for c in codes))
        totals = Counter[str]()
        for (_, c), n in self.statuses.items():
            totals[c] += n
        lines.append("total".ljust(width) + "".join(f"{totals[c]:>20}" for c in codes))
        return "\n".join(lines)

    def summary(self) -> str:
        """A human-readable summary: figures, the status table, failures."""
        mib = 1 << 20
        start, settled = self.rss_start_bytes / mib, self.rss_settled_bytes / mib
        end, peak = self.rss_end_bytes / mib, self.rss_peak_bytes / mib
        rss = (
            f"RSS {start:.1f} MiB at the start, {settled:.1f} after settling, {end:.1f} at the"
            f" end: growth {end - settled:+.1f} MiB since settling ({end - start:+.1f} in all),"
            f" peak {peak:.1f} MiB"
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
            "slowest: "
            + ", ".join(
                f"case {r['index']} {r['method'].rsplit('/', 1)[-1]} {r['status']}"
                f" {r['seconds']:.2f} s"
                for r in self.slowest
            ),
            "",
            self.table(),
            "",
        ]
        if self.failures:
            lines.append(f"FAILED ({len(self.failures)}):")
            lines += [f"  - {f}" for f in self.failures]
            for e in self.examples:
                lines.append(f"    case {e['index']} [{e['kind']}] {e['method']}: {e['status']}")
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
    def __init__(self, config: FuzzConfig, channels: dict[str, grpc.aio.Channel]) -> None:
        self.config = config
        self.channels = channels
        self.done = 0

    def metadata(self, path: str) -> tuple[tuple[str, str], ...]:
        hook = self.config.metadata
        return tuple(hook(path)) if hook is not None else ()

    async def call(self, case: Case) -> tuple[str, str]:
        """Send one case; returns (status code name, details). Streams are read to the end."""
        rpc = case.rpc
        channel = self.channels[rpc.target]
        subscription = rpc.path in _SUBSCRIPTIONS
        timeout = (
            self.config.subscription_timeout_seconds
            if subscription
            else self.config.call_timeout_seconds
        )
        kwargs: dict[str, Any] = {"timeout": timeout, "metadata": self.metadata(rpc.path)}
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
                return "OK", "subscription open until the deadline"
            return code, str(exc.details() or "")
        return "OK", ""


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


async def _run_cases(
    runner: _Runner, plan: CasePlan, indices: Sequence[int], deadline: float | None
) -> tuple[list[tuple[Case, str, str, float]], bool]:
    """Send the cases ``indices`` with bounded concurrency; (results in order, truncated)."""
    results: dict[int, tuple[Case, str, str, float]] = {}
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
            code, details = await runner.call(case)
            results[index] = (case, code, details, time.monotonic() - began)
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
        if any(code == "OK" for _, code, _, _ in results):
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
            known = {r.path for r in rpcs}
            rpcs += [r for r in found if r.path not in known]
            if found:
                pools.append(found[0].request.DESCRIPTOR.file.pool)
        if not rpcs:
            raise RuntimeError(f"no server answered reflection at {list(targets)}")
        if config.services is not None:
            rpcs = [r for r in rpcs if r.service in config.services]
        runner = _Runner(config, channels)
        pool = pools[0]
        plan = CasePlan(
            rpcs,
            seed_builders(await _catalog_ids(runner, rpcs)),
            _classes(pool),
            config.seed,
            max_request_bytes,
        )
        # Warm-up: every seed once (imports, caches, pools), then the first memory figure.
        for rpc in rpcs:
            await runner.call(Case(-1, rpc, "seed", "warm-up", plan.seed_bytes(rpc, -1)))
        if pid is not None:
            report.rss_start_bytes = report.rss_peak_bytes = rss_bytes(pid)
        stop = asyncio.Event()
        monitor = asyncio.create_task(_health_loop(runner, report, pid, stop))
        chosen = list(range(config.cases)) if indices is None else list(indices)
        settle = len(chosen) // 2
        if config.rss_settle_cases is not None:
            settle = min(config.rss_settle_cases, settle)
        deadline = started + config.time_limit_seconds
        try:
            results, report.truncated = await _run_cases(runner, plan, chosen[:settle], deadline)
            if pid is not None:
                report.rss_settled_bytes = rss_bytes(pid)
            if not report.truncated:
                rest, report.truncated = await _run_cases(runner, plan, chosen[settle:], deadline)
                results += rest
        finally:
            stop.set()
            await monitor
        report.cases_run = len(results)
        refused: list[int] = []
        for case, code, details, seconds in results:
            report.statuses[case.rpc.path, code] += 1
            report.kinds[case.kind] += 1
            record = {
                "index": case.index,
                "kind": case.kind,
                "method": case.rpc.path,
                "status": code,
                "note": case.note,
                "details": details,
                "bytes": len(case.payload),
                "seconds": round(seconds, 4),
            }
            report.slowest = sorted([*report.slowest, record], key=lambda r: -r["seconds"])[:5]
            if config.record:
                report.records.append(record)
            if code in _FORBIDDEN:
                if len(report.examples) < _MAX_EXAMPLES:
                    report.examples.append(record)
            elif code not in _NOT_REFUSED:
                refused.append(case.index)
        if report.health_failures:
            report.failures.append(
                f"{len(report.health_failures)} health polls not SERVING, the first:"
                f" {report.health_failures[0]}"
            )
        forbidden = sum(n for (_, c), n in report.statuses.items() if c in _FORBIDDEN)
        if forbidden:
            report.failures.append(f"{forbidden} answers with status UNKNOWN or INTERNAL")
        if pid is not None:
            await asyncio.sleep(0.5)
            report.rss_end_bytes = rss_bytes(pid)
            report.rss_peak_bytes = max(report.rss_peak_bytes, report.rss_end_bytes)
            growth = report.rss_end_bytes - report.rss_settled_bytes
            if growth >= config.max_rss_growth_bytes:
                report.failures.append(
                    f"server memory grew by {growth / (1 << 20):.1f} MiB after the first"
                    f" {settle} cases (limit {config.max_rss_growth_bytes / (1 << 20):.0f} MiB)"
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
