"""A loopback TCP fault proxy between the simulated devices and a shard.

Each shard gets one `FaultProxy`: a listener on 127.0.0.1 that forwards every connection to
the shard's address, byte for byte (TLS and HTTP/2 pass through untouched), and misbehaves
during the scenario's fault windows (`omega_simulator.fleet_scenario.Fault`), on the run's
timeline (wall seconds from the run's start, set with `FaultProxies.begin`):

- ``latency``: every chunk read from one side is written to the other ``up_ms`` (towards the
  shard) or ``down_ms`` (towards the device) later; order is kept.
- ``reset``: at the window's start a ``fraction`` of the open connections is reset (RST, both
  sides); during the window each new connection is reset on accept with that probability.
- ``cut``, ``refuse``: open connections are reset at the start, new ones reset on accept.
  ``blackhole``: new connections are accepted but not forwarded, open ones stop forwarding;
  everything resumes, bytes in order, when the window ends (as TCP does after a partition).

`FaultProxies` runs one proxy per shard on an event loop of its own in a daemon thread, so the
synchronous fleet run (and its worker processes) need not know about it beyond the addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from omega_simulator.fleet_scenario import Fault

__all__ = ["FaultProxies", "FaultProxy", "Timeline"]

_CHUNK_BYTES = 65536
_TICK_SECONDS = 0.01
_START_TIMEOUT_SECONDS = 10.0


class Timeline:
    """The run's clock as the proxies see it: wall seconds since the run's start, or None
    before `begin` (no fault is active then)."""

    def __init__(self) -> None:
        self.origin: float | None = None

    def begin(self, origin_wall: float) -> None:
        """Set the run's start (a ``time.time()`` value, possibly in the near future)."""
        self.origin = origin_wall

    def now(self) -> float | None:
        """Run time in wall seconds (negative before the start), None before `begin`."""
        return None if self.origin is None else time.time() - self.origin


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0) rather than a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Connection:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closed: bool = False

    def reset(self) -> None:
        if self.closed:
            return
        self.closed = True
        _abort(self.client)
        if self.upstream is not None:
            _abort(self.upstream)
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    """One listener on 127.0.0.1 forwarding to ``target`` with ``faults`` applied.

    Args:
        target: ``host:port`` of the shard.
        faults: the fault windows that apply to this shard.
        timeline: the run's clock.
        seed: seed of the reset draws.
    """

    def __init__(
        self, target: str, faults: Sequence[Fault], timeline: Timeline, seed: int = 0
    ) -> None:
        host, _, port = target.rpartition(":")
        self.target_host, self.target_port = host.strip("[]"), int(port)
        self.faults = tuple(faults)
        self.timeline = timeline
        self.rng = random.Random(seed)
        self.connections: set[_Connection] = set()
        self.accepted = 0
        self.resets: dict[int, int] = {}  # fault index -> connections reset by it
        self.held: dict[int, int] = {}  # fault index -> connections held (blackhole)
        self._server: asyncio.Server | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._triggered: set[int] = set()
        self.port = 0

    @property
    def address(self) -> str:
        """``127.0.0.1:port`` of the listener."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1 and start watching the fault windows."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._watcher = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        """Stop listening and reset every open connection."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.reset()
        tasks = [t for conn in self.connections for t in conn.tasks]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.connections.clear()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    def _active(self, kind: str, t: float | None) -> list[tuple[int, Fault]]:
        if t is None:
            return []
        return [(i, f) for i, f in enumerate(self.faults) if f.kind == kind and f.active(t)]

    def _cut(self, t: float | None) -> tuple[int, str] | None:
        for i, f in self._active("cut", t):
            return i, f.cut_mode
        return None

    def _delay_seconds(self, upstream: bool) -> float:
        total = 0.0
        for _, f in self._active("latency", self.timeline.now()):
            total += (f.up_ms if upstream else f.down_ms) or 0.0
        return total / 1000.0

    def _count(self, table: dict[int, int], i: int) -> None:
        table[i] = table.get(i, 0) + 1

    async def _watch(self) -> None:
        """At each window's start, reset the open connections it takes down."""
        while True:
            t = self.timeline.now()
            if t is not None:
                for i, f in enumerate(self.faults):
                    if i in self._triggered or not f.active(t):
                        continue
                    self._triggered.add(i)
                    if f.kind == "cut" and f.cut_mode == "refuse":
                        victims = list(self.connections)
                    elif f.kind == "reset":
                        share = f.fraction or 0.0
                        victims = [c for c in self.connections if self.rng.random() < share]
                    else:
                        continue
                    for conn in victims:
                        if not conn.closed:
                            self._count(self.resets, i)
                        conn.reset()
                        self.connections.discard(conn)
            await asyncio.sleep(_TICK_SECONDS)

    def _refused(self) -> int | None:
        """The fault that resets a connection being accepted now, if any."""
        t = self.timeline.now()
        cut = self._cut(t)
        if cut is not None and cut[1] == "refuse":
            return cut[0]
        for i, f in self._active("reset", t):
            if self.rng.random() < (f.fraction or 0.0):
                return i
        return None

    async def _wait_blackhole(self) -> None:
        """Return once no black-hole cut is active (at once when none is)."""
        while True:
            t = self.timeline.now()
            cut = self._cut(t)
            if t is None or cut is None or cut[1] != "blackhole":
                return
            remaining = self.faults[cut[0]].end_seconds - t
            await asyncio.sleep(max(_TICK_SECONDS, remaining))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        conn = _Connection(writer)
        refused_by = self._refused()
        if refused_by is not None:
            self._count(self.resets, refused_by)
            conn.reset()
            return
        self.connections.add(conn)
        try:
            cut = self._cut(self.timeline.now())
            if cut is not None and cut[1] == "blackhole":
                self._count(self.held, cut[0])
                await self._wait_blackhole()
            if conn.closed:
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                conn.reset()
                return
            conn.upstream = up_writer
            if conn.closed:  # reset while connecting
                _abort(up_writer)
                return
            conn.tasks = [
                asyncio.create_task(self._pump(conn, reader, up_writer, upstream=True)),
                asyncio.create_task(self._pump(conn, up_reader, writer, upstream=False)),
            ]
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        finally:
            self.connections.discard(conn)
            if not conn.closed:
                conn.closed = True
                writer.close()
                if conn.upstream is not None:
                    conn.upstream.close()

    async def _pump(
        self,
        conn: _Connection,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        *,
        upstream: bool,
    ) -> None:
        """Copy ``src`` to ``dst``, each chunk delayed by the latency active when it was read
        and held while a black-hole cut lasts; EOF is passed on as a half-close."""
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            while True:
                data = await src.read(_CHUNK_BYTES)
                chunks.put_nowait((time.monotonic() + self._delay_seconds(upstream), data))
                if not data:
                    return

        reading = asyncio.create_task(read())
        try:
            while True:
                due, data = await chunks.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._wait_blackhole()
                if not data:
                    if dst.can_write_eof():
                        dst.write_eof()
                    return
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            conn.reset()
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await reading

    def stats(self) -> dict[str, Any]:
        """Connections accepted, and per fault (by label) the connections reset or held."""
        return {
            "connections": self.accepted,
            "faults": {
                f.label(): {
                    "connections_reset": self.resets.get(i, 0),
                    "connections_held": self.held.get(i, 0),
                }
                for i, f in enumerate(self.faults)
            },
        }


class FaultProxies:
    """One `FaultProxy` per shard on an event loop in a daemon thread.

    Args:
        shards: shard id -> ``host:port``.
        faults: the scenario's faults (each goes to its shard, or to every shard).
        seed: seed of the reset draws.
    """

    def __init__(self, shards: dict[str, str], faults: Sequence[Fault], seed: int = 0) -> None:
        self.timeline = Timeline()
        self.proxies = {
            shard_id: FaultProxy(
                address,
                [f for f in faults if f.shard in (None, shard_id)],
                self.timeline,
                seed + n,
            )
            for n, (shard_id, address) in enumerate(sorted(shards.items()))
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def addresses(self) -> dict[str, str]:
        """Shard id -> the proxy's ``127.0.0.1:port`` (what the devices dial)."""
        return {shard_id: p.address for shard_id, p in self.proxies.items()}

    def begin(self, origin_wall: float) -> None:
        """Start the fault timeline at ``origin_wall`` (``time.time()`` of the run's start)."""
        self.timeline.begin(origin_wall)

    def start(self) -> dict[str, str]:
        """Start the thread and the listeners; returns `addresses`.

        Raises:
            RuntimeError: the listeners did not start in time.
        """
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()

        async def start_all() -> None:
            for p in self.proxies.values():
                await p.start()

        asyncio.run_coroutine_threadsafe(start_all(), loop).result(_START_TIMEOUT_SECONDS)
        return self.addresses

    def stop(self) -> None:
        """Stop the listeners, reset open connections and end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def stop_all() -> None:
            for p in self.proxies.values():
                await p.stop()

        try:
            asyncio.run_coroutine_threadsafe(stop_all(), loop).result(_START_TIMEOUT_SECONDS)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=5)
            if not thread.is_alive():
                loop.close()
            self._loop = self._thread = None

    @contextlib.contextmanager
    def running(self) -> Iterator[dict[str, str]]:
        """`start` ... `stop`; yields `addresses`."""
        addresses = self.start()
        try:
            yield addresses
        finally:
            self.stop()

    def stats(self) -> dict[str, Any]:
        """Each proxy's `FaultProxy.stats`, by shard id."""
        return {shard_id: p.stats() for shard_id, p in self.proxies.items()}
