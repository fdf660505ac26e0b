"""Credential checks for gRPC servers (server side) and credential metadata (client side).

`AuthInterceptor` is the one place a server checks who is calling. Put it after
`omega_common.grpc_server.ServerInterceptor` in the server's interceptor list, so that its
refusals are logged, counted and mapped to status codes like every other error:

* no credential, a malformed, forged, expired or unknown-key token: UNAUTHENTICATED;
* a valid token of the wrong kind (a device token on the federation listener), or a device
  token whose device id differs from the request's ``device_id`` field: PERMISSION_DENIED.

The check runs before the servicer, so a refused call writes nothing. Health checking and
reflection stay open (probes and ``grpcurl list`` carry no credential).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final, Literal

import grpc

from omega_common.auth import (
    AuthenticationError,
    DeviceCredential,
    TokenVerifier,
    bearer,
    token_from_metadata,
)
from omega_common.errors import PermissionDeniedError, UnauthenticatedError

__all__ = ["OPEN_METHOD_PREFIXES", "AuthInterceptor", "bearer_interceptors"]

OPEN_METHOD_PREFIXES: Final[tuple[str, ...]] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
)
"""Methods any caller may use without a credential."""

SERVICE_PREFIX: Final[str] = "service:"
"""Subjects of service tokens (``service:<name>``); device ids may not start with it."""


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Require a bearer token of one kind on every RPC except `OPEN_METHOD_PREFIXES`.

    Args:
        keys: The fleet keys tokens are verified with (`FleetKeys`, or `FleetKeysFile` which
            follows a rotated file).
        kind: ``"device"``: any device token, bound to the request's ``device_id`` field when
            the request has one; ``"service"``: a token whose subject is ``service:<name>``
            with ``<name>`` in ``services``.
        services: Service names accepted when ``kind == "service"``.
        methods: Full method names or prefixes (``"/omega.v1.Federation/"``) a credential
            may call; others are PERMISSION_DENIED. None: every method of the server.
    """

    def __init__(
        self,
        keys: TokenVerifier,
        kind: Literal["device", "service"] = "device",
        services: Sequence[str] = (),
        methods: Sequence[str] | None = None,
    ) -> None:
        self._keys = keys
        self._kind = kind
        self._services = frozenset(f"{SERVICE_PREFIX}{s}" for s in services)
        self._methods = None if methods is None else tuple(methods)

    def _check(self, metadata: Any, request: Any) -> DeviceCredential:
        try:
            credential = self._keys.verify(token_from_metadata(metadata))
        except AuthenticationError as exc:
            raise UnauthenticatedError(str(exc)) from None
        subject = credential.device_id
        if self._kind == "service":
            if subject not in self._services:
                raise PermissionDeniedError("this listener needs a service credential")
            return credential
        if subject.startswith(SERVICE_PREFIX):
            raise PermissionDeniedError("a service credential cannot make device calls")
        fields = request.DESCRIPTOR.fields_by_name if request is not None else {}
        if "device_id" in fields and request.device_id != subject:
            raise PermissionDeniedError("the credential belongs to another device id")
        return credential

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        allowed = self._methods is None or method.startswith(self._methods)

        def check(metadata: Any, request: Any) -> None:
            self._check(metadata, request)
            if not allowed:
                raise PermissionDeniedError(f"{method} is not open to this credential")

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                check(context.invocation_metadata(), request)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                check(context.invocation_metadata(), request)
                async for item in inner_stream(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        raise TypeError(f"{handler_call_details.method}: streaming requests are not supported")


class _MetadataAdder:
    def __init__(self, token: str) -> None:
        self._metadata = bearer(token)

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._metadata)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _UnaryUnaryMetadata(_MetadataAdder, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStreamMetadata(_MetadataAdder, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(self._details(details), request)


def bearer_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors attaching ``token`` to every unary and server-streaming call of an
    asyncio channel (the federation worker's). Unlike ``grpc.metadata_call_credentials``
    they work on plaintext channels too. grpc.aio files an interceptor under one call kind
    only, hence one object per kind.
    """
    return [_UnaryUnaryMetadata(token), _UnaryStreamMetadata(token)]
