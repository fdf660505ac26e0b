"""What every gRPC server of the project shares: interceptors, health, reflection, shutdown.

- `ServerInterceptor`: binds the RPC name into structlog's context variables, records the
  Prometheus RPC metrics and maps `OmegaError` (and database outages) to gRPC status codes:
  the single place where errors become ``context.abort`` (one that leaves no reference
  cycle: see `_abort`).
- `add_health_and_reflection`: the standard ``grpc.health.v1.Health`` service (grpcio-health-
  checking) and server reflection (grpcio-reflection), so ``grpcurl list`` works.
- `serve_until_signal`: SIGTERM/SIGINT stop the server with a grace period so rollouts drain.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Histogram

from omega_common.db import is_database_unavailable
from omega_common.errors import OmegaError

__all__ = [
    "RpcMetrics",
    "ServerInterceptor",
    "Undecodable",
    "add_health_and_reflection",
    "safe_deserializer",
    "serve_until_signal",
    "set_serving",
]

_log = structlog.get_logger(component="grpc")


class RpcMetrics:
    """Prometheus RPC metrics of one component (``omega_<component>_rpc_*``)."""

    def __init__(self, component: str) -> None:
        self.handled = Counter(
            f"omega_{component}_rpc_handled_total",
            "RPCs completed, by method and gRPC status code.",
            ["method", "code"],
        )
        self.duration = Histogram(
            f"omega_{component}_rpc_duration_seconds",
            "Server-side RPC handling time in seconds, by method.",
            ["method"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, OmegaError):
        return exc.code, str(exc)
    if isinstance(exc, NotImplementedError):
        # A generated servicer's base method (e.g. health's List, which grpcio-health-checking
        # does not implement in its asyncio servicer): the client called a method not served.
        return grpc.StatusCode.UNIMPLEMENTED, "method not implemented"
    if is_database_unavailable(exc):
        return grpc.StatusCode.UNAVAILABLE, f"database unavailable: {type(exc).__name__}"
    return grpc.StatusCode.INTERNAL, "internal error"


class Undecodable:
    """What `safe_deserializer` returns for request bytes that do not parse.

    Attributes:
        message: The fixed status message, e.g. "request is not a valid omega.v1.X".
    """

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def safe_deserializer(
    deserializer: Callable[[bytes], Any] | None,
) -> Callable[[bytes], Any] | None:
    """Wrap a request deserializer so that bytes that do not parse give an `Undecodable`.

    Left to gRPC, a deserializer that raises ends the RPC with UNKNOWN, the exception's class
    in the status message and a traceback logged per request; the interceptor's wrapper
    instead answers INVALID_ARGUMENT with a fixed message (no internals) and logs one line.

    Args:
        deserializer: A generated ``Message.FromString`` (or any bytes -> message callable);
            None (no deserialization) is returned as is.
    """
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    name = str(getattr(descriptor, "full_name", "") or "request message")
    message = f"request is not a valid {name}"

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception:  # anything raised while parsing untrusted bytes is the client's fault
            return Undecodable(message)

    return deserialize


class _Refused(Exception):
    """Ends a request stream whose request did not parse (the RPC is aborted already)."""


def _forget(abort: BaseException) -> None:
    """Drop what an AbortError links to: its traceback (the handler's frames) and context."""
    abort.__traceback__ = None
    abort.__context__ = None
    abort.__cause__ = None


async def _abort(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    details: str,
    trailers: tuple[tuple[str, str | bytes], ...] = (),
) -> None:
    """``context.abort`` (the status and trailers, no message), which returns: the caller
    must return at once; grpc.aio raises the abort itself once the handler has returned.

    grpc.aio keeps the AbortError ``context.abort`` raises on the call's state. Raised through
    the handler, its traceback holds the handler's frames (and its context the servicer's
    error, whose traceback holds them too), and those frames hold the servicer context,
    hence the call's state, and the request: a reference cycle only the cyclic garbage
    collector frees. Every refused request (up to the receive limit each, 64 MiB on an
    internal listener) then stayed in memory until the next full collection, which comes
    after hundreds of them; ``make fuzz`` found 45 MiB of requests held at the end of a run.
    Caught here and stripped, grpc.aio re-raises it from its own frames, which hold nothing,
    and the request is freed when the call ends.
    """
    try:
        await context.abort(code, details, trailing_metadata=trailers)
    except grpc.aio.AbortError as exc:
        _forget(exc)


class ServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Logging context, metrics and error mapping for unary-unary and unary-stream RPCs.

    Request bytes that do not parse as the method's request message are answered with
    INVALID_ARGUMENT ("request is not a valid <message>") for every method, streaming
    requests (server reflection) included: see `safe_deserializer`.
    """

    def __init__(self, metrics: RpcMetrics, **context: str) -> None:
        """Args: metrics: where to record; context: extra fields bound for every RPC."""
        self._metrics = metrics
        self._context = context

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        deserializer = safe_deserializer(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None and inspect.isasyncgenfunction(handler.stream_stream):
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_bidi(handler.stream_stream, method),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    async def _refused_undecodable(
        self, context: grpc.aio.ServicerContext, method: str, started: float, request: Any
    ) -> bool:
        """Abort with INVALID_ARGUMENT when ``request`` is an `Undecodable` (one log line);
        True then, and the caller returns at once (see `_abort`)."""
        if not isinstance(request, Undecodable):
            return False
        code = grpc.StatusCode.INVALID_ARGUMENT
        self._finish(method, started, code)
        _log.info("rpc_rejected", code=code.name, reason=request.message)
        await _abort(context, code, request.message)
        return True

    def _begin(self, method: str) -> float:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(rpc=method, **self._context)
        return time.perf_counter()

    def _finish(self, method: str, started: float, code: grpc.StatusCode) -> None:
        self._metrics.duration.labels(method).observe(time.perf_counter() - started)
        self._metrics.handled.labels(method, code.name).inc()

    async def _fail(
        self, context: grpc.aio.ServicerContext, method: str, started: float, exc: Exception
    ) -> None:
        """Log, count and abort a failed RPC; the caller then returns at once (see `_abort`)."""
        code, message = _status_of(exc)
        self._finish(method, started, code)
        if code is grpc.StatusCode.INTERNAL:
            _log.exception("rpc_failed")
        else:
            _log.info("rpc_rejected", code=code.name, reason=message)
        trailers = exc.trailing_metadata() if isinstance(exc, OmegaError) else ()
        await _abort(context, code, message, trailers)

    def _wrap_unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = self._begin(method)
            if await self._refused_undecodable(context, method, started, request):
                return None
            try:
                response = await behavior(request, context)
            except asyncio.CancelledError:
                self._finish(method, started, grpc.StatusCode.CANCELLED)
                raise
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):  # the servicer's own abort
                    _forget(exc)
                    return None  # grpc.aio raises it again (see _abort)
                await self._fail(context, method, started, exc)
                return None
            self._finish(method, started, grpc.StatusCode.OK)
            return response

        return wrapper

    def _wrap_stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behavior):
            # A coroutine that writes with ``context.write`` (health's Watch) returns None:
            # wrapped like a unary behavior (``async for`` over it would be a TypeError).
            return self._wrap_unary(behavior, method)

        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = self._begin(method)
            if await self._refused_undecodable(context, method, started, request):
                return
            try:
                async for item in behavior(request, context):
                    yield item
            except asyncio.CancelledError:
                self._finish(method, started, grpc.StatusCode.CANCELLED)
                raise
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):  # the servicer's own abort
                    _forget(exc)
                    return  # grpc.aio raises it again (see _abort)
                await self._fail(context, method, started, exc)
                return
            self._finish(method, started, grpc.StatusCode.OK)

        return wrapper

    def _wrap_bidi(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        """A stream-stream behavior (an async generator) whose requests are checked one by one."""

        async def wrapper(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            started = self._begin(method)

            async def checked() -> AsyncIterator[Any]:
                async for request in requests:
                    if await self._refused_undecodable(context, method, started, request):
                        raise _Refused
                    yield request

            try:
                async for item in behavior(checked(), context):
                    yield item
            except _Refused:
                return  # aborted (see _abort)
            except asyncio.CancelledError:
                self._finish(method, started, grpc.StatusCode.CANCELLED)
                raise
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):  # the servicer's own abort
                    _forget(exc)
                    return  # grpc.aio raises it again (see _abort)
                await self._fail(context, method, started, exc)
                return
            self._finish(method, started, grpc.StatusCode.OK)

        return wrapper


def add_health_and_reflection(
    server: grpc.aio.Server, service_names: Iterable[str]
) -> health.aio.HealthServicer:
    """Register the health service (every name SERVING) and reflection; return the servicer."""
    names = list(service_names)
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    return servicer


async def set_serving(
    servicer: health.aio.HealthServicer, service_names: Iterable[str], serving: bool
) -> None:
    """Mark the overall server ("") and every named service SERVING or NOT_SERVING."""
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ["", *service_names]:
        await servicer.set(name, status)


async def serve_until_signal(
    server: grpc.aio.Server,
    grace_seconds: float,
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Wait until SIGTERM or SIGINT, then stop accepting RPCs and drain for ``grace_seconds``.

    Args:
        server: a started server.
        grace_seconds: how long in-flight RPCs may take to finish.
        on_stop: awaited first (e.g. to flip health to NOT_SERVING).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(server.wait_for_termination())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if on_stop is not None:
        await on_stop()
    _log.info("shutting_down", grace_seconds=grace_seconds)
    await server.stop(grace_seconds)
    for task in (waiter, stopper):
        task.cancel()
