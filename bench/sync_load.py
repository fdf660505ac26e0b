"""The load generator of ``bench/sync_throughput.py``: realistic SyncPatterns requests, sent
closed- or open-loop by worker processes, each over its own grpc.aio channel.

The requests are a real brain's: `template_request` runs an offline `Brain` over the bench
catalog (two viewing sessions; the second sync's request, without the one-off model update,
is the template), and `request_bytes` re-targets its delta to another device and version.
Workers send serialized bytes (no protobuf work in the timed loop), so the same bytes drive
the shard and the bare echo server.

Latency: closed loop from the send; open loop from the *scheduled* send time (each worker's
sends are scheduled in advance at a fixed rate), so a server that falls behind shows its
queueing in the figures instead of slowing the generator down (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from omega.v1 import patterns_pb2, sync_pb2
from omega_brain import Brain, BrainConfig, CatalogIndex, ViewingEvent
from omega_protocol import decode_payload, encode_payload

__all__ = [
    "SYNC_METHOD",
    "LoadResult",
    "request_bytes",
    "run_worker",
    "template_request",
]

SYNC_METHOD = "/omega.v1.ConstellationSync/SyncPatterns"
EVENING_MS = 1_795_300_000_000  # a Tuesday, 19:06 UTC


class _Recorder:
    """A transport that acknowledges every delta and keeps the requests."""

    def __init__(self) -> None:
        self.requests: list[sync_pb2.SyncPatternsRequest] = []

    def sync_patterns(
        self, request: sync_pb2.SyncPatternsRequest, timeout: float
    ) -> sync_pb2.SyncPatternsResponse:
        self.requests.append(request)
        return sync_pb2.SyncPatternsResponse(acknowledged_version=request.local_version)

    def fetch_embeddings(
        self, request: sync_pb2.FetchEmbeddingsRequest, timeout: float
    ) -> sync_pb2.FetchEmbeddingsResponse:
        raise NotImplementedError

    def fetch_model(
        self, request: sync_pb2.FetchModelRequest, timeout: float
    ) -> sync_pb2.FetchModelResponse:
        raise NotImplementedError

    def forget_device(
        self, request: sync_pb2.ForgetDeviceRequest, timeout: float
    ) -> sync_pb2.ForgetDeviceResponse:
        raise NotImplementedError


def template_request(catalog_path: Path) -> sync_pb2.SyncPatternsRequest:
    """A brain's second sync after two evening sessions of five viewings each.

    The first sync carries the device's one-off model contribution; the second is a
    steady-state sync: the patterns changed by the second session and five view counts.
    """
    with np.load(catalog_path) as npz:
        ids = [str(c) for c in npz["content_ids"]]
        catalog = CatalogIndex(ids, npz["embeddings"].astype(np.float32))
    recorder = _Recorder()
    config = BrainConfig(honour_sync_pace=False)
    with Brain("bench-template", config, transport=recorder, catalog=catalog) as brain:
        for session in range(2):
            for i in range(5):
                started = EVENING_MS + session * 86_400_000 + i * 1_800_000
                brain.observe(ViewingEvent(ids[session * 5 + i], started, completion=0.95))
            result = brain.sync()
            if not result.ok:
                raise RuntimeError(f"template sync failed: {result.error}")
    return recorder.requests[-1]


def request_bytes(template: sync_pb2.SyncPatternsRequest, device_id: str, version: int) -> bytes:
    """The template's delta as device ``device_id``'s local version ``version``, serialized."""
    delta = decode_payload(template.delta, patterns_pb2.PatternDelta)
    delta.local_version = version
    delta.base_version = version - 1
    request = sync_pb2.SyncPatternsRequest(
        device_id=device_id,
        local_version=version,
        since_global_version=template.since_global_version,
        delta=encode_payload(delta),
    )
    return request.SerializeToString()


@dataclass
class LoadResult:
    """What one worker measured in one phase (latencies in ms)."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    bytes_up: int = 0
    bytes_down: int = 0
    sent: int = 0
    elapsed_seconds: float = 0.0
    cpu_seconds: float = 0.0


async def _closed(
    stubs: list[grpc.aio.UnaryUnaryMultiCallable],
    requests: list[bytes],
    start_index: int,
    concurrency: int,
    seconds: float,
    rpc_timeout: float,
) -> tuple[LoadResult, int]:
    result = LoadResult()
    next_index = start_index
    deadline = time.perf_counter() + seconds

    async def lane(stub: grpc.aio.UnaryUnaryMultiCallable) -> None:
        nonlocal next_index
        while time.perf_counter() < deadline and next_index < len(requests):
            body = requests[next_index]
            next_index += 1
            t0 = time.perf_counter()
            try:
                answer = await stub(body, timeout=rpc_timeout)
            except grpc.aio.AioRpcError as exc:
                result.errors[exc.code().name] += 1
                continue
            finally:
                result.sent += 1
                result.bytes_up += len(body)
            result.latencies_ms.append((time.perf_counter() - t0) * 1000.0)
            result.bytes_down += len(answer)

    t_start = time.perf_counter()
    await asyncio.gather(*(lane(stubs[i % len(stubs)]) for i in range(concurrency)))
    result.elapsed_seconds = time.perf_counter() - t_start
    return result, next_index


async def _open(
    stubs: list[grpc.aio.UnaryUnaryMultiCallable],
    requests: list[bytes],
    start_index: int,
    rate: float,
    seconds: float,
    rpc_timeout: float,
) -> tuple[LoadResult, int]:
    result = LoadResult()
    count = min(int(rate * seconds), len(requests) - start_index)
    t_start = time.perf_counter()

    async def one(stub: grpc.aio.UnaryUnaryMultiCallable, body: bytes, scheduled: float) -> None:
        try:
            answer = await stub(body, timeout=rpc_timeout)
        except grpc.aio.AioRpcError as exc:
            result.errors[exc.code().name] += 1
            return
        result.latencies_ms.append((time.perf_counter() - scheduled) * 1000.0)
        result.bytes_down += len(answer)

    tasks = []
    for k in range(count):
        scheduled = t_start + k / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        body = requests[start_index + k]
        result.sent += 1
        result.bytes_up += len(body)
        tasks.append(asyncio.create_task(one(stubs[k % len(stubs)], body, scheduled)))
    await asyncio.gather(*tasks)
    result.elapsed_seconds = time.perf_counter() - t_start
    return result, start_index + count


async def _run_phases(
    target: str,
    requests: list[bytes],
    phases: list[tuple[str, float, float]],
    rpc_timeout: float,
    connections: int,
) -> list[LoadResult]:
    results: list[LoadResult] = []
    index = 0
    # Each channel its own TCP connection (no shared subchannel), so that several server
    # processes on one port (SO_REUSEPORT) each get some of them.
    options = [
        ("grpc.max_receive_message_length", 16 << 20),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(connections)]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 30)
        stubs = [c.unary_unary(SYNC_METHOD) for c in channels]
        for kind, amount, seconds in phases:
            cpu0 = time.process_time()
            if kind == "closed":
                result, index = await _closed(
                    stubs, requests, index, int(amount), seconds, rpc_timeout
                )
            else:
                result, index = await _open(stubs, requests, index, amount, seconds, rpc_timeout)
            result.cpu_seconds = time.process_time() - cpu0
            results.append(result)
    finally:
        for channel in channels:
            await channel.close()
    return results


def run_worker(
    worker: int,
    target: str,
    catalog_path: str,
    devices: int,
    total_requests: int,
    phases: list[tuple[str, float, float]],
    device_prefix: str,
    timeout: float = 10.0,
    connections: int = 1,
) -> list[LoadResult]:
    """One load-generator process: build its requests, then run the phases in order.

    Args:
        worker: Index of this worker (its devices are ``{prefix}-{worker}-{i}``).
        target: ``host:port`` of the server (plaintext).
        catalog_path: The bench catalog (.npz) for the template request.
        devices: Devices this worker cycles through; device ``i`` sends versions 1, 2, ...
            in order (consecutive requests of one device are ``devices`` sends apart, so a
            device never has two syncs in flight unless more than ``devices`` are).
        total_requests: Requests built in advance (enough for every phase).
        phases: ``("closed", concurrency, seconds)`` or ``("open", syncs per second,
            seconds)`` for this worker.
        device_prefix: Distinguishes the devices of different runs against one database.
        timeout: Deadline of each RPC, in seconds.
        connections: TCP connections (gRPC channels) this worker spreads its calls over.

    Returns:
        One `LoadResult` per phase.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    template = template_request(Path(catalog_path))
    requests = [
        request_bytes(template, f"{device_prefix}-{worker}-{k % devices}", k // devices + 1)
        for k in range(total_requests)
    ]
    return asyncio.run(_run_phases(target, requests, phases, timeout, connections))
