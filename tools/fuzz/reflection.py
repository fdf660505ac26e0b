"""List a server's RPCs through gRPC server reflection and build their message classes.

Nothing of the project's generated code is used here: the fuzzer fuzzes what the server says
it serves (so a service that moves to another listener is found where it went).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

__all__ = ["Rpc", "discover"]

_REFLECTION_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Rpc:
    """One method of one server, as reflection describes it.

    Attributes:
        target: ``host:port`` of the listener that serves it.
        path: The gRPC method path, e.g. ``/omega.v1.ConstellationSync/SyncPatterns``.
        request: The request message class (from a descriptor pool of this server's files).
        response: The response message class.
        client_streaming: The client sends a stream of requests.
        server_streaming: The server answers with a stream.
        also: Other listeners of the same server that list the method too (filled by the
            runner, which fuzzes a method on the first listener that lists it).
    """

    target: str
    path: str
    request: type[Message]
    response: type[Message]
    client_streaming: bool
    server_streaming: bool
    also: tuple[str, ...] = ()

    @property
    def service(self) -> str:
        """The full service name, e.g. ``omega.v1.Federation``."""
        return self.path.split("/")[1]

    @property
    def method(self) -> str:
        """The method name, e.g. ``PublishRound``."""
        return self.path.rsplit("/", 1)[-1]

    @property
    def request_descriptor(self) -> Descriptor:
        """The request message's descriptor."""
        descriptor: Any = self.request.DESCRIPTOR
        return cast(Descriptor, descriptor)


async def _ask(
    channel: grpc.aio.Channel,
    request: reflection_pb2.ServerReflectionRequest,
    metadata: Sequence[tuple[str, str]],
) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(
        iter([request]), timeout=_REFLECTION_TIMEOUT_SECONDS, metadata=tuple(metadata)
    )
    async for response in call:
        answer: reflection_pb2.ServerReflectionResponse = response
        if answer.HasField("error_response"):
            raise LookupError(f"reflection: {answer.error_response.error_message} for {request!r}")
        return answer
    raise LookupError(f"reflection answered nothing for {request!r}")


async def discover(
    channel: grpc.aio.Channel, target: str, metadata: Sequence[tuple[str, str]] = ()
) -> list[Rpc]:
    """Every method of every service the server at ``target`` lists.

    Args:
        channel: A channel to ``target``.
        target: ``host:port``, recorded in each `Rpc`.
        metadata: Sent with the reflection calls (a credential, once servers require one).

    Returns:
        The methods, in the order the server lists its services.

    Raises:
        grpc.aio.AioRpcError: the server does not answer or has no reflection.
        LookupError: reflection cannot describe a listed service.
    """
    listing = await _ask(
        channel, reflection_pb2.ServerReflectionRequest(list_services=""), metadata
    )
    services = [s.name for s in listing.list_services_response.service]
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def keep(response: reflection_pb2.ServerReflectionResponse) -> None:
        for raw in response.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
            files.setdefault(proto.name, proto)

    for name in services:
        keep(
            await _ask(
                channel,
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=name),
                metadata,
            )
        )
    missing = [d for f in list(files.values()) for d in f.dependency if d not in files]
    while missing:
        name = missing.pop()
        if name in files:
            continue
        keep(
            await _ask(
                channel, reflection_pb2.ServerReflectionRequest(file_by_filename=name), metadata
            )
        )
        missing += [d for d in files[name].dependency if d not in files]

    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:
        if name in added:
            return
        for dependency in files[name].dependency:
            add(dependency)
        pool.AddSerializedFile(files[name].SerializeToString())
        added.add(name)

    for name in sorted(files):
        add(name)
    rpcs: list[Rpc] = []
    for name in services:
        service = pool.FindServiceByName(name)
        for method in service.methods:
            rpcs.append(
                Rpc(
                    target=target,
                    path=f"/{service.full_name}/{method.name}",
                    request=message_factory.GetMessageClass(method.input_type),
                    response=message_factory.GetMessageClass(method.output_type),
                    client_streaming=bool(method.client_streaming),
                    server_streaming=bool(method.server_streaming),
                )
            )
    return rpcs
