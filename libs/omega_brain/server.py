"""`omega-brain serve`: the JSON facade as newline-delimited JSON over a Unix socket or stdio.

Wire protocol (the schema is ``protocol.schema.json`` beside this module):

* A request is one JSON object (see `omega_brain.facade`) on one line, UTF-8, ended by ``\\n``;
  every line gets exactly one reply line, in order. A final line without ``\\n`` before the
  client closes its side is still answered. A reply is one JSON object whose first member is
  ``"ok"`` (clients without a JSON parser may test for the prefix ``{"ok": true``), with
  control characters and non-ASCII escaped, so it never holds a raw newline.
* A line longer than `MAX_LINE_BYTES` bytes is answered with an ``InvalidRequest`` error (code
  1) as soon as the limit is passed; the rest of it, up to the next ``\\n``, is discarded and
  the connection stays usable. A line that is not UTF-8 gets the same error.
* One brain per process, shared by every client: ``init`` opens it, ``shutdown`` closes it,
  and it stays open when a client disconnects. Requests are run one at a time in arrival
  order (one thread, `selectors`), so a slow ``sync`` delays other clients' requests.
* On SIGTERM or SIGINT the request in progress finishes, replies already computed are sent
  (for at most `FLUSH_SECONDS`), the brain is closed and the socket file removed; exit 0.

The socket file is created with mode 0600 (owner only). A socket file left by a dead server
is replaced; a live server on the same path, or a path that is not a socket, is left alone
and the start fails. Only the standard library is used.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from omega_brain.facade import MAX_REQUEST_CHARS, ErrorCode, JsonBrain, error_reply

__all__ = [
    "FLUSH_SECONDS",
    "MAX_CLIENTS",
    "MAX_LINE_BYTES",
    "LineSplitter",
    "ServeError",
    "serve_stdio",
    "serve_unix",
]

MAX_LINE_BYTES = MAX_REQUEST_CHARS
"""Longest request line in bytes, without its ``\\n`` (1 MiB; UTF-8 is >= 1 byte a character)."""

MAX_CLIENTS = 16
"""Connections served at once by default; further clients wait in the listen backlog."""

MAX_PENDING_REPLY_BYTES = 4 << 20
"""A client with this many reply bytes unread is not read from until it catches up."""

FLUSH_SECONDS = 2.0
"""At shutdown, how long computed replies may take to reach slow clients."""

_READ_BYTES = 64 << 10
_SHUTDOWN_REQUEST = '{"op": "shutdown"}'


class ServeError(Exception):
    """The server cannot start (socket path in use, not a socket, too long, ...)."""


class LineSplitter:
    """Splits a byte stream into request lines of at most ``limit`` bytes.

    `feed` returns complete lines (without ``\\n``) and ``None`` for each line that passed
    ``limit``: reported once, as soon as it is too long, then skipped up to its ``\\n``. The
    buffer never holds more than ``limit`` plus one chunk.

    Args:
        limit: the longest line accepted, in bytes.
    """

    def __init__(self, limit: int = MAX_LINE_BYTES) -> None:
        self._limit = limit
        self._buf = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> list[bytes | None]:
        """Add ``data``; return the lines it completes (``None``: a line that was too long)."""
        out: list[bytes | None] = []
        self._buf += data
        start = 0
        while True:
            end = self._buf.find(b"\n", start)
            if end < 0:
                break
            if self._skipping:
                self._skipping = False
            elif end - start > self._limit:
                out.append(None)
            else:
                out.append(bytes(self._buf[start:end]))
            start = end + 1
        del self._buf[:start]
        if self._skipping:
            self._buf.clear()
        elif len(self._buf) > self._limit:
            out.append(None)
            self._skipping = True
            self._buf.clear()
        return out

    def finish(self) -> list[bytes | None]:
        """At end of input: the last line if it had no ``\\n`` (and was not skipped)."""
        rest, skipping = bytes(self._buf), self._skipping
        self._buf.clear()
        self._skipping = False
        return [rest] if rest and not skipping else []


def answer(facade: JsonBrain, line: bytes | None) -> bytes:
    """The reply line (with ``\\n``) to one request line from `LineSplitter`.

    Args:
        facade: the brain.
        line: a request line, or None for one that was too long.

    Returns:
        One JSON object and ``\\n``, UTF-8 (ASCII in practice: non-ASCII is escaped).
    """
    if line is None:
        reply = error_reply(
            "InvalidRequest",
            ErrorCode.INVALID_REQUEST,
            f"request line longer than {MAX_LINE_BYTES} bytes; skipped up to its newline",
        )
    else:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            reply = error_reply(
                "InvalidRequest",
                ErrorCode.INVALID_REQUEST,
                f"request is not UTF-8: invalid byte at offset {exc.start}",
            )
        else:
            reply = facade.handle(text)
    return reply.encode("utf-8") + b"\n"


class _Stop:
    """SIGTERM/SIGINT set a flag and wake the selector through a pipe (`signal.set_wakeup_fd`)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self.wake_fd, self._write_fd = os.pipe()
        os.set_blocking(self.wake_fd, False)
        os.set_blocking(self._write_fd, False)
        self._previous: dict[int, Any] = {}
        self._previous_wakeup = -1

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._on_signal)
        self._previous_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_fd, 512):
                pass

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous_wakeup)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        os.close(self.wake_fd)
        os.close(self._write_fd)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_Stop]:
    stop = _Stop()
    stop.install()
    try:
        yield stop
    finally:
        stop.close()


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    lines: LineSplitter = field(default_factory=LineSplitter)
    out: bytearray = field(default_factory=bytearray)
    eof: bool = False


def _log(message: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(f"omega-brain: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- Unix socket


def bind_unix(path: str, backlog: int = 16) -> tuple[socket.socket, tuple[int, int]]:
    """Listen on ``path`` (mode 0600), replacing a stale socket file left by a dead server.

    Args:
        path: the socket file.
        backlog: pending connections the kernel queues.

    Returns:
        The non-blocking listening socket and ``(st_dev, st_ino)`` of the file it created.

    Raises:
        ServeError: the path is too long, exists and is not a socket, a live server answers
            on it, or it cannot be bound.
    """
    if len(os.fsencode(path)) > 107:
        raise ServeError(f"socket path longer than 107 bytes: {path!r}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise ServeError(f"cannot inspect {path!r}: {exc.strerror}") from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ServeError(f"{path!r} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:  # nobody listens: a dead server's file
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ServeError(f"cannot probe the socket {path!r}: {exc}") from None
        else:
            raise ServeError(f"another server is listening on {path!r}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the file is born 0600: no window where others may connect
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(backlog)
        created = os.stat(path)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {path!r}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    sock.setblocking(False)
    return sock, (created.st_dev, created.st_ino)


def _remove_if_ours(path: str, identity: tuple[int, int]) -> None:
    """Unlink the socket file unless another server has replaced it since."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == identity:
            os.unlink(path)


def serve_unix(
    path: str,
    facade: JsonBrain | None = None,
    *,
    max_clients: int = MAX_CLIENTS,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Serve the facade on a Unix socket until SIGTERM or SIGINT (then close the brain).

    Args:
        path: the socket file (created 0600; removed at exit).
        facade: the brain (default: a new `JsonBrain`).
        max_clients: connections served at once.
        on_ready: called once the socket accepts connections.

    Raises:
        ServeError: the socket cannot be created (see `bind_unix`).
    """
    if facade is None:
        facade = JsonBrain()
    with _stop_on_signals() as stop:
        listener, identity = bind_unix(path, backlog=max(max_clients, 16))
        sel = selectors.DefaultSelector()
        clients: dict[int, _Client] = {}
        try:
            sel.register(stop.wake_fd, selectors.EVENT_READ)
            sel.register(listener, selectors.EVENT_READ)
            accepting = True
            if on_ready is not None:
                on_ready()
            while not stop.requested:
                for key, events in sel.select():
                    if key.fileobj == stop.wake_fd:
                        stop.drain()
                    elif key.fileobj is listener:
                        _accept(listener, sel, clients)
                    else:
                        _serve_client(clients[key.fd], events, facade, sel, clients, stop)
                    if stop.requested:
                        break
                full = len(clients) >= max_clients
                if full == accepting:  # pause or resume accepting at the limit
                    accepting = not full
                    if accepting:
                        sel.register(listener, selectors.EVENT_READ)
                    else:
                        sel.unregister(listener)
        finally:
            listener.close()
            _remove_if_ours(path, identity)
            _flush_all(list(clients.values()))
            for client in clients.values():
                client.sock.close()
            sel.close()
            facade.handle(_SHUTDOWN_REQUEST)
        if stop.signal_name:
            _log(f"{stop.signal_name}: brain closed, {path} removed")


def _accept(
    listener: socket.socket, sel: selectors.BaseSelector, clients: dict[int, _Client]
) -> None:
    try:
        sock, _ = listener.accept()
    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
        return
    except OSError as exc:  # EMFILE and the like: keep serving the clients we have
        _log(f"accept failed: {exc}")
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            time.sleep(0.1)
        return
    sock.setblocking(False)
    client = _Client(sock)
    clients[sock.fileno()] = client
    sel.register(sock, selectors.EVENT_READ)


def _serve_client(
    client: _Client,
    events: int,
    facade: JsonBrain,
    sel: selectors.BaseSelector,
    clients: dict[int, _Client],
    stop: _Stop,
) -> None:
    try:
        if events & selectors.EVENT_WRITE:
            _send(client)
        if events & selectors.EVENT_READ:
            try:
                data = client.sock.recv(_READ_BYTES)
            except (BlockingIOError, InterruptedError):
                data = None
            if data is not None:
                lines = client.lines.feed(data) if data else client.lines.finish()
                client.eof = not data
                for line in lines:
                    client.out += answer(facade, line)
                    if stop.requested:  # finish the request in progress, then stop
                        break
                _send(client)
    except OSError:  # reset by the peer, broken pipe: this client is gone
        client.out.clear()
        client.eof = True
    except Exception as exc:  # a bug here must cost one client, not the server
        _log(f"dropped a client: {type(exc).__name__}: {exc}")
        client.out.clear()
        client.eof = True
    if client.eof and not client.out:
        sel.unregister(client.sock)
        del clients[client.sock.fileno()]
        client.sock.close()
        return
    wanted = 0
    if not client.eof and len(client.out) < MAX_PENDING_REPLY_BYTES:
        wanted |= selectors.EVENT_READ
    if client.out:
        wanted |= selectors.EVENT_WRITE
    sel.modify(client.sock, wanted)


def _send(client: _Client) -> None:
    while client.out:
        try:
            sent = client.sock.send(client.out)
        except (BlockingIOError, InterruptedError):
            return
        del client.out[:sent]


def _flush_all(clients: list[_Client]) -> None:
    """Best effort: send replies already computed, for at most `FLUSH_SECONDS` in all."""
    deadline = time.monotonic() + FLUSH_SECONDS
    for client in clients:
        left = deadline - time.monotonic()
        if not client.out or left <= 0:
            continue
        with contextlib.suppress(OSError):
            client.sock.settimeout(left)
            client.sock.sendall(client.out)


# ---------------------------------------------------------------------- stdin/stdout


def serve_stdio(facade: JsonBrain | None = None, *, in_fd: int = 0, out_fd: int = 1) -> None:
    """Serve one client on stdin/stdout until end of input, SIGTERM or SIGINT.

    Nothing but replies is written to ``out_fd``; the brain is closed at the end.

    Args:
        facade: the brain (default: a new `JsonBrain`).
        in_fd: where requests come from.
        out_fd: where replies go (written blocking; a closed reader ends the server).
    """
    if facade is None:
        facade = JsonBrain()
    lines = LineSplitter()
    # select() rather than epoll: stdin may be a regular file, which epoll refuses.
    sel = selectors.SelectSelector()
    with _stop_on_signals() as stop:
        try:
            sel.register(stop.wake_fd, selectors.EVENT_READ)
            sel.register(in_fd, selectors.EVENT_READ)
            done = False
            while not done and not stop.requested:
                for key, _ in sel.select():
                    if key.fileobj == stop.wake_fd:
                        stop.drain()
                        continue
                    try:
                        data = os.read(in_fd, _READ_BYTES)
                    except (BlockingIOError, InterruptedError):
                        continue
                    done = not data
                    for line in lines.feed(data) if data else lines.finish():
                        _write_all(out_fd, answer(facade, line))
                        if stop.requested:
                            break
        except OSError as exc:  # stdout closed by the reader, stdin gone: end quietly
            if exc.errno != errno.EPIPE:
                _log(f"stdio: {exc}")
        finally:
            sel.close()
            facade.handle(_SHUTDOWN_REQUEST)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:  # an inherited non-blocking stdout: wait until writable
            with selectors.SelectSelector() as wait:
                wait.register(fd, selectors.EVENT_WRITE)
                wait.select(1.0)
            continue
        view = view[written:]
