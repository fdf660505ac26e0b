"""Load control of a gRPC server: in-flight RPCs against the concurrency bound, per-key rate limit.

The concurrency bound itself is gRPC's (``grpc.aio.server(maximum_concurrent_rpcs=...)``):
past it the server answers RESOURCE_EXHAUSTED before any handler or interceptor runs. This
module adds what gRPC does not:

- `LoadControlInterceptor` counts the RPCs being handled (so a servicer can tell how close the
  server is to its bound) and refuses an RPC whose key (the calling device, found by ``key_of``
  in the request or the verified credential) is over its `KeyedRateLimiter` bucket, raising
  `ResourceExhaustedError` before the handler runs (nothing is read or written). Place it after
  the interceptor that maps `OmegaError` to a status
  (`omega_common.grpc_server.ServerInterceptor`), so refusals are logged, counted and carry
  their ``retry-after-ms`` / ``grpc-retry-pushback-ms`` trailers, and after the credential
  check (`omega_common.grpc_auth.AuthInterceptor`), so only authenticated calls are charged.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from prometheus_client import Counter, Gauge

from omega_common.errors import ResourceExhaustedError
from omega_common.ratelimit import KeyedRateLimiter

__all__ = ["KeyOf", "LoadControlInterceptor", "LoadMetrics", "Metadata"]

Metadata = Sequence[tuple[str, str | bytes]] | None
KeyOf = Callable[[str, Any, Metadata], str | None]
"""(full method name such as ``/omega.v1.ConstellationSync/SyncPatterns``, deserialized
request, invocation metadata) -> the rate-limit key, or None when the RPC is not limited."""


class LoadMetrics:
    """Prometheus load metrics of one component (``omega_<component>_...``)."""

    def __init__(self, component: str) -> None:
        self.in_flight = Gauge(
            f"omega_{component}_rpcs_in_flight",
            "RPCs being handled now (admitted under the concurrency bound).",
        )
        self.rate_limited = Counter(
            f"omega_{component}_rpc_rate_limited_total",
            "RPCs refused by the per-device rate limit, by method.",
            ["method"],
        )
        self.tracked_keys = Gauge(
            f"omega_{component}_rate_limit_tracked_devices",
            "Devices whose token bucket the rate limiter currently holds.",
        )


class LoadControlInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts in-flight unary-unary and unary-stream RPCs and applies the per-key rate limit.

    Stream-request RPCs (reflection) pass through uncounted and unlimited.
    """

    def __init__(
        self,
        *,
        max_concurrent_rpcs: int,
        limiter: KeyedRateLimiter | None,
        key_of: KeyOf,
        metrics: LoadMetrics | None = None,
    ) -> None:
        """Args:
            max_concurrent_rpcs: the bound given to ``grpc.aio.server`` (>= 1); only used to
                report `concurrency_used`.
            limiter: per-key token buckets; None disables rate limiting.
            key_of: the key of an RPC (see `KeyOf`).
            metrics: where to record; None records nothing.

        Raises:
            ValueError: ``max_concurrent_rpcs`` < 1.
        """
        if max_concurrent_rpcs < 1:
            raise ValueError("max_concurrent_rpcs must be >= 1")
        self._max = max_concurrent_rpcs
        self._limiter = limiter
        self._key_of = key_of
        self._metrics = metrics
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """RPCs being handled now."""
        return self._in_flight

    def concurrency_used(self) -> float:
        """In-flight RPCs over the concurrency bound, in [0, 1]."""
        return min(1.0, self._in_flight / self._max)

    def rate_used(self, key: str) -> float:
        """How much of ``key``'s burst is spent, in [0, 1] (0 without a limiter)."""
        return 0.0 if self._limiter is None else self._limiter.used_fraction(key)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        full_method: str = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, full_method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, full_method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _admit(self, full_method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        """Charge the RPC to its key's bucket.

        Raises:
            ResourceExhaustedError: the key is over its rate (with the time until it is not).
        """
        if self._limiter is None:
            return
        key = self._key_of(full_method, request, context.invocation_metadata())
        if key is None:
            return
        decision = self._limiter.acquire(key)
        if self._metrics is not None:
            self._metrics.tracked_keys.set(len(self._limiter))
        if not decision.allowed:
            if self._metrics is not None:
                self._metrics.rate_limited.labels(full_method.rsplit("/", 1)[-1]).inc()
            raise ResourceExhaustedError(
                "device rate limit exceeded; retry after the retry-after-ms trailer",
                decision.retry_after_seconds,
            )

    def _enter(self) -> None:
        self._in_flight += 1
        if self._metrics is not None:
            self._metrics.in_flight.inc()

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._metrics is not None:
            self._metrics.in_flight.dec()

    def _wrap_unary(self, behavior: Callable[..., Any], full_method: str) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self._admit(full_method, request, context)
            self._enter()
            try:
                return await behavior(request, context)
            finally:
                self._leave()

        return wrapper

    def _wrap_stream(self, behavior: Callable[..., Any], full_method: str) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behavior):
            # A coroutine writing with context.write (health's Watch): ``async for`` over it
            # would be a TypeError (INTERNAL); it is awaited like a unary behavior.
            return self._wrap_unary(behavior, full_method)

        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            self._admit(full_method, request, context)
            self._enter()
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                self._leave()

        return wrapper
