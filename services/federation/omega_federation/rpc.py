"""Calling a shard from the worker: retry what a retry can fix, name the shard in the error."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from omega_common.errors import UnavailableError

__all__ = ["call_shard"]

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
T = TypeVar("T")


async def call_shard(what: str, attempts: int, fn: Callable[[], Awaitable[T]]) -> T:
    """Call a shard RPC, retrying UNAVAILABLE/DEADLINE_EXCEEDED with backoff (0.4 s, 0.8 s,
    ... at most 2 s between attempts).

    Args:
        what: Names the call in the error (e.g. ``"publish to shard-a"``).
        attempts: Calls at most (>= 1).
        fn: Makes one call.

    Raises:
        UnavailableError: any gRPC error once the attempts are spent, or at once for a status
            a retry cannot fix (its code and details in the message).
    """
    for attempt in range(1, attempts + 1):
        try:
            return await fn()
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _RETRYABLE or attempt == attempts:
                raise UnavailableError(f"{what}: {exc.code().name} {exc.details()}") from exc
            await asyncio.sleep(min(2.0, 0.2 * 2**attempt))
    raise AssertionError("unreachable")
