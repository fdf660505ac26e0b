"""One error hierarchy for the services: each `OmegaError` knows its gRPC status code.

Servicers raise these; `omega_common.grpc_server.ErrorMappingInterceptor` is the single place
that turns them into ``context.abort(code, message)``.
"""

from __future__ import annotations

import grpc

__all__ = [
    "AlreadyExistsError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "OmegaError",
    "UnavailableError",
]


class OmegaError(Exception):
    """Root of the project's errors; `code` is the gRPC status the client sees."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


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
