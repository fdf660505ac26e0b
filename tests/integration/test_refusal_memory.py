"""A refused call leaves nothing behind for the cyclic garbage collector.

grpc.aio keeps the exception ``context.abort`` raises on the call's state; its traceback
holds the handler's frames, which hold the context (so the call's state) and the request: a
reference cycle. Refused requests (up to the receive limit each) then stayed in memory until
the next full collection, hundreds of them (``make fuzz`` found 45 MiB of requests held at
the end of a run). `omega_common.grpc_server.ServerInterceptor` catches the abort (its own
and a servicer's, e.g. grpc_health's Check of an unknown service) and strips it of its
traceback and context before grpc.aio raises it again from its own frames.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omega_common.errors import InvalidArgumentError, ResourceExhaustedError
from omega_common.grpc_server import RpcMetrics, ServerInterceptor, add_health_and_reflection

pytestmark = pytest.mark.integration

_METRICS = RpcMetrics("refusal_memory_test")
_CALLS = 40


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
    raise InvalidArgumentError(f"no ({len(request.service)} chars)")


async def _refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    yield health_pb2.HealthCheckResponse()
    raise ResourceExhaustedError("over", retry_after_seconds=0.5)


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[ServerInterceptor(_METRICS)])
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(
            _refuse,
            request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        ),
        "Stream": grpc.unary_stream_rpc_method_handler(
            _refuse_stream,
            request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        ),
    }
    generic = grpc.method_handlers_generic_handler("test.Refuse", handlers)
    server.add_generic_rpc_handlers((generic,))
    add_health_and_reflection(server, ["test.Refuse"])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
        yield chan
    await server.stop(None)


async def _code(call: Any) -> str:
    try:
        result = call
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await result
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return "OK"


async def test_refused_calls_leave_no_reference_cycle(channel: grpc.aio.Channel) -> None:
    request = health_pb2.HealthCheckRequest(service="x" * 100_000).SerializeToString()
    unary = channel.unary_unary("/test.Refuse/Unary")
    stream = channel.unary_stream("/test.Refuse/Stream")
    check = health_pb2_grpc.HealthStub(channel).Check
    calls = [
        (lambda: unary(request), "INVALID_ARGUMENT"),  # a servicer's error
        (lambda: unary(b"\xff\xff\xff"), "INVALID_ARGUMENT"),  # bytes that do not parse
        (lambda: stream(request), "RESOURCE_EXHAUSTED"),  # an error after a streamed item
        (
            lambda: check(health_pb2.HealthCheckRequest(service="unknown" * 10_000)),
            "NOT_FOUND",  # grpc_health's own context.abort
        ),
    ]
    for make, expected in calls:  # warm-up: first-call caches are not garbage
        assert await _code(make()) == expected
    gc.collect()
    gc.disable()
    try:
        for make, expected in calls:
            for _ in range(_CALLS):
                assert await _code(make()) == expected
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        garbage = Counter(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    # Before: per refused call a cycle of frames (holding the request), tracebacks, the
    # AbortError and the call's state. grpc.aio's own method lookup still leaves a few small
    # objects (its handler-details closure), which hold no request.
    held = {k: garbage[k] for k in ("frame", "traceback", "AbortError", "RPCState")}
    assert not any(held.values()), held
