"""Errors raised by the TV brain.

Every exception the brain raises on purpose derives from `BrainError`, so firmware can catch
one type. The JSON facade (`omega_brain.facade.JsonBrain`) never raises: it reports these
errors by class name in its ``{"ok": false, "error": {...}}`` replies.
"""

from __future__ import annotations

from typing import Any

import grpc

__all__ = [
    "RETRYABLE_STATUS_CODES",
    "BrainError",
    "CatalogError",
    "InvalidArgumentError",
    "InvalidEventError",
    "StoreError",
    "SyncError",
    "UnknownContentError",
]

RETRYABLE_STATUS_CODES: frozenset[grpc.StatusCode] = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        # An overloaded replica's gRPC core drops calls its event loop has not taken yet
        # (constellation ``max_pending_calls``) before any handler ran; the brain never
        # cancels its own calls, and every call it makes is idempotent.
        grpc.StatusCode.CANCELLED,
    }
)
"""gRPC status codes after which the same request may succeed when retried later."""


class BrainError(Exception):
    """Root of every error the brain raises (also: using a brain after `close()`)."""


class InvalidArgumentError(BrainError, ValueError):
    """An argument of a brain call is out of range or of the wrong type (e.g. ``k < 0``)."""


class InvalidEventError(InvalidArgumentError):
    """A `ViewingEvent` that cannot be learned from.

    Raised for an empty content id, a completion that is not a finite number in [0, 1], a
    negative or non-integer start time, or a negative/non-finite watch time.
    """


class CatalogError(BrainError):
    """Catalog data that cannot be indexed: wrong shape or dtype, NaN, zero or duplicate rows."""


class UnknownContentError(BrainError, LookupError):
    """A content id that is not in the catalog (or no catalog is loaded yet)."""


class StoreError(BrainError):
    """The local SQLite store cannot be opened, read or written (corrupt file, disk full, ...)."""


class SyncError(BrainError):
    """A call to the constellation failed.

    Attributes:
        code: the gRPC status code when the failure came from gRPC, else None.
        retryable: True when the same request may succeed if retried later
            (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED).
        retry_after_seconds: the server's hint (trailing metadata ``retry-after-ms``, e.g.
            with RESOURCE_EXHAUSTED from a rate limit) of how long to wait, else None.
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        retryable: bool = False,
        retry_after_seconds: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable
        self.retry_after_seconds = retry_after_seconds

    @classmethod
    def from_rpc_error(cls, rpc: str, exc: grpc.RpcError) -> SyncError:
        """Wrap a `grpc.RpcError` raised by the call named ``rpc``.

        Args:
            rpc: the method name, e.g. ``"SyncPatterns"`` (used in the message only).
            exc: the error raised by the stub (usually also a `grpc.Call`).

        Returns:
            A `SyncError` with `code` and `retryable` filled in; the original error is its
            ``__cause__`` once raised with ``from``.
        """
        code = _call_attr(exc, "code")
        details = _call_attr(exc, "details")
        status = code if isinstance(code, grpc.StatusCode) else None
        name = status.name if status is not None else "UNKNOWN"
        return cls(
            f"{rpc} failed: {name}: {details or exc!r}",
            code=status,
            retryable=status in RETRYABLE_STATUS_CODES,
            retry_after_seconds=_retry_after(exc),
        )


def _retry_after(exc: grpc.RpcError) -> float | None:
    """The ``retry-after-ms`` trailer of a failed call in seconds (bounded to an hour)."""
    trailers = _call_attr(exc, "trailing_metadata") or ()
    for entry in trailers:
        key, value = getattr(entry, "key", None), getattr(entry, "value", None)
        if key is None and isinstance(entry, tuple) and len(entry) == 2:
            key, value = entry
        if key == "retry-after-ms":
            if not isinstance(value, str | bytes):
                return None
            try:
                ms = float(value)
            except ValueError:
                return None
            return min(max(ms, 0.0), 3_600_000.0) / 1000.0 if ms == ms else None
    return None


def _call_attr(exc: grpc.RpcError, name: str) -> Any:
    """``exc.code()`` / ``exc.details()`` when ``exc`` is a `grpc.Call`, else None."""
    method = getattr(exc, name, None)
    if not callable(method):
        return None
    try:
        return method()
    except Exception:  # a half-initialized call object must not hide the original error
        return None
