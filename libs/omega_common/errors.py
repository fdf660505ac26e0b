"""One error hierarchy for the services: each `OmegaError` knows its gRPC status code.

Servicers raise these; `omega_common.grpc_server.ErrorMappingInterceptor` is the single place
that turns them into ``context.abort(code, message)``.
"""

from __future__ import annotations

import math

import grpc

__all__ = [
    "AlreadyExistsError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "OmegaError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
]


class OmegaError(Exception):
    """Root of the project's errors; `code` is the gRPC status the client sees."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata sent with the error status (none by default)."""
        return ()


class InvalidArgumentError(OmegaError):
    """Malformed or out-of-range input (a bad delta, a wrong dimension, a zstd bomb)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(OmegaError):
    """A referenced entity does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(OmegaError):
    """The entity exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(OmegaError):
    """The request is valid but the system is not in a state to apply it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class UnavailableError(OmegaError):
    """A dependency (the database, another shard) is down; the client should retry."""

    code = grpc.StatusCode.UNAVAILABLE


class UnauthenticatedError(OmegaError):
    """No credential, or one that is malformed, forged, expired or signed by an unknown key."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(OmegaError):
    """A valid credential that does not allow this call (another device's id, wrong kind)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(OmegaError):
    """Over a rate limit or a capacity bound; the client should retry after a pause.

    The status carries the pause in its trailing metadata twice: ``retry-after-ms`` for the
    application and ``grpc-retry-pushback-ms``, which gRPC's own retry policy honours when
    RESOURCE_EXHAUSTED is among its retryable codes.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_seconds: float) -> None:
        """Args: message: the status details; retry_after_seconds: the pause, >= 0."""
        super().__init__(message)
        self.retry_after_seconds = max(0.0, retry_after_seconds)

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """``retry-after-ms`` and ``grpc-retry-pushback-ms``: the pause in whole ms, rounded up."""
        ms = str(math.ceil(self.retry_after_seconds * 1000))
        return (("retry-after-ms", ms), ("grpc-retry-pushback-ms", ms))
