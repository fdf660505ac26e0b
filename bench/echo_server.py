"""A bare grpc.aio server answering SyncPatterns with fixed bytes: the baseline of
``bench/sync_throughput.py``.

It takes the request bytes and answers without decoding them, so it measures what gRPC,
HTTP/2 and Python's event loop cost on this machine; the shard's pipeline is compared with it.
"""

from __future__ import annotations

import asyncio
import signal

import grpc

__all__ = ["serve_echo"]


async def _serve(port: int, reply: bytes, ready: object) -> None:
    async def sync_patterns(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return reply

    handler = grpc.method_handlers_generic_handler(
        "omega.v1.ConstellationSync",
        {"SyncPatterns": grpc.unary_unary_rpc_method_handler(sync_patterns)},
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    ready.set()  # type: ignore[attr-defined]
    await stop.wait()
    await server.stop(1.0)


def serve_echo(port: int, reply: bytes, ready: object) -> None:
    """Serve on 127.0.0.1:``port`` until SIGTERM; sets the ``ready`` event once listening."""
    asyncio.run(_serve(port, reply, ready))
