"""`omega-brain serve`: the JSON facade over a Unix socket and stdio, run as a real subprocess.

Every request sent and every reply received here is validated against the shipped JSON Schema
(libs/omega_brain/protocol.schema.json); the example clients in examples/ (C, shell, Python)
are run against a real server.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import omega_brain
from omega.v1 import sync_pb2
from omega_brain import JsonBrain, SyncError
from omega_brain.facade import MAX_REQUEST_CHARS, ErrorCode
from omega_brain.server import MAX_LINE_BYTES, LineSplitter

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
TS = 1_700_000_000_000
SCHEMA: dict[str, Any] = json.loads(
    resources.files("omega_brain").joinpath("protocol.schema.json").read_text()
)
SCRIPT = Path(sys.executable).with_name("omega-brain")
OPS = ("init", "observe", "recommend", "sync", "stats", "forget", "shutdown")


def omega_brain_command(*args: str) -> list[str]:
    """The installed console script (what firmware images ship), else ``python -m``."""
    if SCRIPT.exists():
        return [str(SCRIPT), *args]
    return [sys.executable, "-m", "omega_brain", *args]


# ------------------------------------------------------------------------- schema helpers


def validator(name: str) -> jsonschema.Draft202012Validator:
    root = {k: v for k, v in SCHEMA.items() if k != "oneOf"}
    return jsonschema.Draft202012Validator({**root, "$ref": f"#/$defs/{name}"})


VALIDATORS = {
    name: validator(name)
    for name in ["request", "reply", "errorReply", *(f"{op}Request" for op in OPS)]
    + [f"{op}Reply" for op in OPS]
}


def check_request(request: dict[str, Any]) -> None:
    VALIDATORS["request"].validate(request)
    VALIDATORS[f"{request['op']}Request"].validate(request)


def check_reply(op: str | None, reply: dict[str, Any]) -> None:
    """The reply fits the schema: as any reply, and as the shape of its op (or an error)."""
    VALIDATORS["reply"].validate(reply)
    assert next(iter(reply)) == "ok"  # documented: "ok" comes first (prefix tests in C/shell)
    if reply["ok"] is False:
        VALIDATORS["errorReply"].validate(reply)
        if op == "sync" and "result" in reply:
            VALIDATORS["syncReply"].validate(reply)
    elif op is not None:
        VALIDATORS[f"{op}Reply"].validate(reply)


def error_code(reply: dict[str, Any]) -> int:
    assert reply["ok"] is False, reply
    code = reply["error"]["code"]
    assert isinstance(code, int)
    return code


# ------------------------------------------------------------------------- fixtures


def write_catalog(path: Path, n: int = 120) -> Path:
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((6, 384)).astype(np.float32)
    x = centers[np.arange(n) % 6] + 0.6 * rng.standard_normal((n, 384)).astype(np.float32)
    np.savez(
        path,
        content_ids=np.array([f"item-{i}" for i in range(n)]),
        embeddings=x,
        titles=np.array([f"Title {i}" for i in range(n)]),
        genres=np.array(["Drama|Comedy" if i % 2 else "Action" for i in range(n)]),
    )
    return path


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # Short: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="omega-serve-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def catalog_file(workdir: Path) -> Path:
    return write_catalog(workdir / "catalog.npz")


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], path: Path) -> None:
        self.proc, self.path = proc, path

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> tuple[int, str]:
        """Send ``signum``, wait; returns the exit code and stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            pytest.fail(f"omega-brain did not stop after {signal.Signals(signum).name}")
        return self.proc.returncode, err.decode(errors="replace")


@contextlib.contextmanager
def running_server(path: Path, *extra: str) -> Iterator[Server]:
    proc = subprocess.Popen(
        omega_brain_command("serve", "--socket", str(path), *extra),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    server = Server(proc, path)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                _, err = proc.communicate()
                pytest.fail(f"omega-brain exited {proc.returncode}: {err.decode()}")
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(path))
                break
            assert time.monotonic() < deadline, "omega-brain did not start listening"
            time.sleep(0.05)
        yield server
    finally:
        if proc.poll() is None:
            code, err = server.stop()
            assert code == 0, err
            assert "Traceback" not in err, err


@pytest.fixture(scope="module")
def server(workdir: Path) -> Iterator[Server]:
    with running_server(workdir / "brain.sock") as srv:
        yield srv


class Client:
    """One connection: raw bytes out, reply lines in (each parsed and schema-checked)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self, op: str | None = None) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        reply = json.loads(line)
        assert isinstance(reply, dict)
        check_reply(op, reply)
        return reply

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        check_request(request)
        self.send(json.dumps(request).encode() + b"\n")
        return self.reply(request["op"])

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def init_request(catalog: Path | None, **extra: Any) -> dict[str, Any]:
    request: dict[str, Any] = {"op": "init", "device_id": "tv-1", "store_path": ":memory:"}
    if catalog is not None:
        request["catalog_file"] = str(catalog)
    return {**request, **extra}


def observe_request(content_id: str = "item-3", completion: float = 0.95) -> dict[str, Any]:
    return {
        "op": "observe",
        "content_id": content_id,
        "started_at_ms": TS,
        "completion": completion,
    }


# ------------------------------------------------------------------------- CLI and schema


def test_console_script_help() -> None:
    assert SCRIPT.exists(), "console script missing: run `.venv/bin/pip install -e '.[dev]'`"
    out = subprocess.run(
        [str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    assert "serve" in out.stdout and "schema" in out.stdout and '"code": N' in out.stdout
    out = subprocess.run(
        [str(SCRIPT), "serve", "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    assert "--socket PATH" in out.stdout and "--stdio" in out.stdout
    usage = subprocess.run([str(SCRIPT), "serve"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


def test_schema_is_valid_shipped_and_lists_every_error_code() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert (Path(omega_brain.__file__).parent / "protocol.schema.json").is_file()
    listed = {(c["const"], c["title"]) for c in SCHEMA["$defs"]["errorCode"]["oneOf"]}
    assert listed == {(int(c), c.name) for c in ErrorCode if c is not ErrorCode.OK}
    printed = subprocess.run(
        omega_brain_command("schema"), capture_output=True, timeout=60, check=True
    )
    assert json.loads(printed.stdout) == SCHEMA
    # A document is a request or a reply, never both.
    root = jsonschema.Draft202012Validator(SCHEMA)
    assert root.is_valid({"op": "stats"}) and root.is_valid({"ok": True})
    assert not root.is_valid({"op": "explode"})
    assert not root.is_valid({"ok": False, "error": {"type": "X", "code": 0, "message": ""}})


# ------------------------------------------------------------------------- socket mode


def test_socket_round_trip(server: Server, catalog_file: Path, workdir: Path) -> None:
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    store = workdir / "round-trip.db"
    with Client(server.path) as c:
        reply = c.call(init_request(catalog_file, store_path=str(store), config={"ef_search": 64}))
        assert reply == {"ok": True, "device_id": "tv-1", "catalog_size": 120}
        for i in (0, 6, 12):
            reply = c.call({**observe_request(f"item-{i}"), "watch_seconds": 1200})
        assert reply == {"ok": True, "local_version": 3}
        recs = c.call({"op": "recommend", "k": 5, "timestamp_ms": TS, "use_global": False})
        assert len(recs["items"]) == 5
        assert all(item["title"].startswith("Title ") for item in recs["items"])
        assert not {item["content_id"] for item in recs["items"]} & {"item-0", "item-6", "item-12"}
        stats = c.call({"op": "stats"})["stats"]
        assert (stats["events_observed"], stats["catalog_size"], stats["local_version"]) == (
            3,
            120,
            3,
        )
        # Offline brain: sync needs a shard (code 9, any other BrainError).
        assert error_code(c.call({"op": "sync"})) == ErrorCode.BRAIN_ERROR
        assert c.call({"op": "shutdown"}) == {"ok": True}
        assert error_code(c.call({"op": "stats"})) == ErrorCode.NOT_INITIALIZED
        # The catalog was persisted in the store: a reopen without catalog_file has it.
        reply = c.call({"op": "init", "device_id": "tv-1", "store_path": str(store)})
        assert reply["catalog_size"] == 120
        assert c.call({"op": "stats"})["stats"]["local_version"] == 3
        # Another device's store is refused (code 7).
        reply = c.call({"op": "init", "device_id": "tv-2", "store_path": str(store)})
        assert error_code(reply) == ErrorCode.STORE_ERROR
        # Offline, forget erases the device's own data only (nothing confirmed by a shard).
        c.call({"op": "init", "device_id": "tv-1", "store_path": str(store)})
        assert c.call({"op": "forget"}) == {"ok": True, "forgotten": False}
        stats = c.call({"op": "stats"})["stats"]
        assert (stats["events_observed"], stats["catalog_size"]) == (0, 120)
        assert c.call({"op": "shutdown"}) == {"ok": True}


def _bad_cases(catalog: Path, workdir: Path) -> list[tuple[str, bytes, int]]:
    not_a_db = workdir / "not-a-db"
    not_a_db.write_bytes(b"\x00garbage" * 500)
    huge = b"x" * (2 * MAX_LINE_BYTES)

    def line(request: dict[str, Any]) -> bytes:
        return json.dumps(request).encode() + b"\n"

    return [
        ("garbage bytes", b"\x00\x01\x02\x7fgarbage\x1b[2J\n", ErrorCode.INVALID_REQUEST),
        ("invalid UTF-8", b'{"op": "stats", "x": "\xff\xfe\xc0"}\n', ErrorCode.INVALID_REQUEST),
        ("lone surrogate escape", b'{"op": "stats", "x": "\\ud800"}\n', ErrorCode.OK),
        ("huge line", huge + b"\n", ErrorCode.INVALID_REQUEST),
        ("huge line of JSON", b'{"op": "stats", "x": "' + huge + b'"}\n', 1),
        ("empty line", b"\n", ErrorCode.INVALID_REQUEST),
        ("not an object", b"[1, 2, 3]\n", ErrorCode.INVALID_REQUEST),
        ("deep nesting", b"[" * 100_000 + b"]" * 100_000 + b"\n", ErrorCode.INVALID_REQUEST),
        ("unknown op", line({"op": "explode"}), ErrorCode.INVALID_REQUEST),
        ("op not a string", line({"op": 7}), ErrorCode.INVALID_REQUEST),
        ("no op", line({"k": 3}), ErrorCode.INVALID_REQUEST),
        ("init without device_id", line({"op": "init"}), ErrorCode.INVALID_REQUEST),
        ("device_id wrong type", line({"op": "init", "device_id": 5}), 1),
        ("device_id too long", line({"op": "init", "device_id": "x" * 300}), 1),
        ("bad config field", line(init_request(None, config={"nope": 1})), 1),
        ("config out of range", line(init_request(None, config={"hnsw_m": -1})), 1),
        ("k wrong type", line({"op": "recommend", "k": "3"}), ErrorCode.INVALID_REQUEST),
        ("k is a bool", line({"op": "recommend", "k": True}), ErrorCode.INVALID_REQUEST),
        ("k out of range", line({"op": "recommend", "k": -1}), ErrorCode.INVALID_REQUEST),
        ("k NaN", b'{"op": "recommend", "k": NaN}\n', ErrorCode.INVALID_REQUEST),
        (
            "completion Infinity",
            b'{"op": "observe", "content_id": "item-1", "started_at_ms": 1, '
            b'"completion": Infinity}\n',
            ErrorCode.INVALID_REQUEST,
        ),
        ("observe missing completion", line({**observe_request(), "completion": None}), 1),
        ("observe without fields", line({"op": "observe"}), ErrorCode.INVALID_REQUEST),
        ("completion out of range", line(observe_request(completion=1.5)), 3),
        ("negative start", line({**observe_request(), "started_at_ms": -5}), 3),
        ("unknown content", line(observe_request("no-such-item")), ErrorCode.UNKNOWN_CONTENT),
        ("missing catalog_file", line(init_request(workdir / "nope.npz")), 5),
        ("catalog_file not npz", line(init_request(not_a_db)), ErrorCode.CATALOG_ERROR),
        ("store not a database", line(init_request(None, store_path=str(not_a_db))), 7),
        ("store is a directory", line(init_request(None, store_path=str(workdir))), 7),
        ("sync without shard", line({"op": "sync"}), ErrorCode.BRAIN_ERROR),
    ]


def test_bad_input_gets_its_code_and_the_server_keeps_answering(
    server: Server, catalog_file: Path, workdir: Path
) -> None:
    with Client(server.path) as c:
        for name, raw, expected in _bad_cases(catalog_file, workdir):
            # Each case starts from an initialized brain with the catalog, on one connection.
            assert c.call(init_request(catalog_file))["ok"] is True, name
            c.send(raw)
            reply = c.reply()
            if expected == ErrorCode.OK:
                assert reply["ok"] is True, (name, reply)
            else:
                assert error_code(reply) == expected, (name, reply)
            try:
                parsed = json.loads(raw)
            except (ValueError, RecursionError):
                parsed = None
            documented = isinstance(parsed, dict) and "config" not in parsed
            if expected in (1, 3) and documented and len(raw) <= MAX_LINE_BYTES:
                # What the server refuses as malformed, the schema refuses too (except the line
                # length, and BrainConfig's fields and ranges, documented by reference only).
                assert not VALIDATORS["request"].is_valid(parsed), name
            assert c.call({"op": "stats"})["ok"] in (True, False), name
        assert c.call({"op": "shutdown"}) == {"ok": True}
    assert server.proc.poll() is None


def test_not_initialized_code(server: Server) -> None:
    with Client(server.path) as c:
        assert c.call({"op": "shutdown"}) == {"ok": True}
        for op in ("recommend", "stats", "sync", "forget"):
            assert error_code(c.call({"op": op})) == ErrorCode.NOT_INITIALIZED
        assert error_code(c.call(observe_request())) == ErrorCode.NOT_INITIALIZED


def test_line_limit_boundary(server: Server) -> None:
    prefix, suffix = b'{"op": "shutdown", "pad": "', b'"}'
    exact = prefix + b"p" * (MAX_LINE_BYTES - len(prefix) - len(suffix)) + suffix
    assert len(exact) == MAX_LINE_BYTES <= MAX_REQUEST_CHARS
    with Client(server.path) as c:
        c.send(exact + b"\n")
        assert c.reply("shutdown") == {"ok": True}
        c.send(exact[:-2] + b'p"}\n')  # one byte over
        assert "longer than" in c.reply()["error"]["message"]
        # A too-long line is refused before its end arrives, the rest of it skipped.
        c.send(b"y" * (MAX_LINE_BYTES + 10))
        assert error_code(c.reply()) == ErrorCode.INVALID_REQUEST
        c.send(b"y" * 1000 + b'\n{"op": "shutdown"}\n')
        assert c.reply("shutdown") == {"ok": True}


def test_pipelined_and_fragmented_requests(server: Server, catalog_file: Path) -> None:
    requests = [
        init_request(catalog_file),
        observe_request("item-1"),
        observe_request("item-2"),
        {"op": "recommend", "k": 3},
        {"op": "stats"},
        {"op": "shutdown"},
    ]
    payload = b"".join(json.dumps(r).encode() + b"\n" for r in requests)
    with Client(server.path) as c:
        c.send(payload)  # all at once: one reply each, in order
        replies = [c.reply(r["op"]) for r in requests]
        assert [r["ok"] for r in replies] == [True] * 6
        assert replies[2]["local_version"] == 2
        for i in range(0, len(payload), 7):  # the same bytes in 7-byte pieces
            c.send(payload[i : i + 7])
            time.sleep(0.001)
        replies = [c.reply(r["op"]) for r in requests]
        assert [r["ok"] for r in replies] == [True] * 6


def test_last_line_without_newline_is_answered(server: Server) -> None:
    with Client(server.path) as c:
        c.send(b'{"op": "shutdown"}')
        c.sock.shutdown(socket.SHUT_WR)
        assert c.reply("shutdown") == {"ok": True}
        assert c.sock.recv(10) == b""  # then the server closes its side


def test_brain_is_shared_by_sequential_and_concurrent_clients(
    server: Server, catalog_file: Path
) -> None:
    with Client(server.path) as first:
        first.call(init_request(catalog_file))
        first.call(observe_request("item-4"))
    # The brain outlives its client.
    with Client(server.path) as second, Client(server.path) as third:
        assert second.call({"op": "stats"})["stats"]["local_version"] == 1
        third.call(observe_request("item-5"))
        assert second.call({"op": "stats"})["stats"]["local_version"] == 2
        assert third.call({"op": "shutdown"}) == {"ok": True}
    # A client that vanishes with requests in flight costs nothing.
    c = Client(server.path)
    c.send(b'{"op": "stats"}\n' * 50)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset
    c.close()
    with Client(server.path) as fourth:
        assert error_code(fourth.call({"op": "stats"})) == ErrorCode.NOT_INITIALIZED


def test_max_clients_makes_others_wait(workdir: Path) -> None:
    with running_server(workdir / "one.sock", "--max-clients", "1") as srv:
        first = Client(srv.path)
        assert first.call({"op": "shutdown"}) == {"ok": True}
        second = Client(srv.path)  # queued by the kernel, not yet accepted
        second.send(b'{"op": "shutdown"}\n')
        second.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            second.sock.recv(100)
        first.close()
        second.sock.settimeout(30)
        assert second.reply("shutdown") == {"ok": True}
        second.close()


# ------------------------------------------------------------------------- lifecycle


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_closes_brain_and_removes_socket(
    signum: int, workdir: Path, catalog_file: Path
) -> None:
    path = workdir / f"sig{int(signum)}.sock"
    store = workdir / f"sig{int(signum)}.db"
    with running_server(path) as srv:
        idle = Client(path)  # an open, idle connection must not hold the shutdown
        with Client(path) as c:
            c.call(init_request(catalog_file, store_path=str(store)))
            c.call(observe_request("item-9"))
        code, err = srv.stop(signum)
        idle.close()
    assert code == 0, err
    assert "Traceback" not in err
    assert signal.Signals(signum).name in err
    assert not path.exists()
    # The brain was closed cleanly: its store reopens with the event and the catalog.
    with omega_brain.Brain("tv-1", omega_brain.BrainConfig(store_path=store)) as brain:
        stats = brain.stats()
        assert (stats.local_version, stats.catalog_size) == (1, 120)


def test_stale_socket_file_is_replaced(workdir: Path) -> None:
    path = workdir / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # a crashed server's file: nobody listens on it
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    with running_server(path) as srv, Client(srv.path) as c:
        assert c.call({"op": "shutdown"}) == {"ok": True}
    assert not path.exists()


def test_refuses_a_live_socket_or_a_regular_file(server: Server, workdir: Path) -> None:
    second = subprocess.run(
        omega_brain_command("serve", "--socket", str(server.path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1 and "another server is listening" in second.stderr
    assert "Traceback" not in second.stderr
    with Client(server.path) as c:  # the first server is untouched
        assert c.call({"op": "shutdown"}) == {"ok": True}

    regular = workdir / "regular-file"
    regular.write_text("precious")
    out = subprocess.run(
        omega_brain_command("serve", "--socket", str(regular)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "not a socket" in out.stderr
    assert regular.read_text() == "precious"


# ------------------------------------------------------------------------- stdio mode


def test_stdio_mode(catalog_file: Path) -> None:
    lines: list[tuple[bytes, str | None, int]] = [
        (b'{"op": "stats"}', "stats", ErrorCode.NOT_INITIALIZED),
        (json.dumps(init_request(catalog_file)).encode(), "init", ErrorCode.OK),
        (json.dumps(observe_request("item-7")).encode(), "observe", ErrorCode.OK),
        (b"\xff\xfe garbage", None, ErrorCode.INVALID_REQUEST),
        (b"z" * (MAX_LINE_BYTES + 1), None, ErrorCode.INVALID_REQUEST),
        (b'{"op": "recommend", "k": NaN}', None, ErrorCode.INVALID_REQUEST),
        (b'{"op": "recommend", "k": 4}', "recommend", ErrorCode.OK),
        (b'{"op": "stats"}', "stats", ErrorCode.OK),
    ]
    stdin = b"\n".join(raw for raw, _, _ in lines)  # the last line has no newline
    out = subprocess.run(
        omega_brain_command("serve", "--stdio"), input=stdin, capture_output=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert b"Traceback" not in out.stderr
    replies = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(replies) == len(lines)
    for (_, op, code), reply in zip(lines, replies, strict=True):
        check_reply(op, reply)
        assert (reply["ok"] is True) if code == ErrorCode.OK else error_code(reply) == code
    assert replies[-1]["stats"]["local_version"] == 1
    assert len(replies[-2]["items"]) == 4


def test_stdio_mode_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        omega_brain_command("serve", "--stdio"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b'{"op": "shutdown"}\n')
    proc.stdin.flush()
    assert json.loads(proc.stdout.readline()) == {"ok": True}
    proc.send_signal(signal.SIGTERM)  # stdin still open: the signal alone ends it
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and b"Traceback" not in err


# ------------------------------------------------------------------------- example clients


def _example_output(stdout: str) -> list[tuple[str, dict[str, Any]]]:
    """``<op>: <reply>`` lines of an example client, each reply checked against the schema."""
    steps = []
    for line in stdout.splitlines():
        op, _, raw = line.partition(": ")
        reply = json.loads(raw)
        check_reply(op, reply)
        steps.append((op, reply))
    return steps


def _check_example_run(stdout: str) -> None:
    steps = _example_output(stdout)
    assert [op for op, _ in steps] == ["init", "observe", "recommend", "stats", "shutdown"]
    replies = dict(steps)
    assert all(reply["ok"] is True for reply in replies.values())
    assert replies["init"]["catalog_size"] == 120
    assert len(replies["recommend"]["items"]) == 5
    assert replies["stats"]["stats"]["events_observed"] == 1


def test_c_client(server: Server, catalog_file: Path, tmp_path: Path) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        pytest.skip("no C compiler (cc, gcc or clang) on PATH: the C example cannot be built")
    binary = tmp_path / "omega_client"
    source = str(EXAMPLES / "c" / "omega_client.c")
    build = subprocess.run(
        [compiler, "-std=c99", "-Wall", "-Wextra", "-Werror", "-O2", "-o", str(binary), source],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run(
        [str(binary), str(server.path), str(catalog_file), "item-2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    _check_example_run(run.stdout)

    # An error reply: printed, the brain shut down, exit status 2.
    run = subprocess.run(
        [str(binary), str(server.path), str(catalog_file), "no-such-item"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    steps = _example_output(run.stdout)
    assert [op for op, _ in steps] == ["init", "observe", "shutdown"]
    assert error_code(steps[1][1]) == ErrorCode.UNKNOWN_CONTENT
    # No server: exit status 1.
    run = subprocess.run(
        [str(binary), str(tmp_path / "nothing.sock")], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 1 and "connect" in run.stderr


def test_shell_client(server: Server, catalog_file: Path) -> None:
    if shutil.which("socat") is None:
        pytest.skip("socat is not installed: the shell example needs it")
    run = subprocess.run(
        ["bash", str(EXAMPLES / "shell" / "omega_client.sh"), str(server.path), str(catalog_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    _check_example_run(run.stdout)


def test_python_stdlib_client(server: Server, catalog_file: Path) -> None:
    script = EXAMPLES / "python" / "omega_client.py"
    run = subprocess.run(
        [sys.executable, "-I", str(script), str(server.path), str(catalog_file), "item-8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    _check_example_run(run.stdout)


# ------------------------------------------------------------------------- in process


class _DownTransport:
    def sync_patterns(
        self, request: sync_pb2.SyncPatternsRequest, timeout: float
    ) -> sync_pb2.SyncPatternsResponse:
        raise SyncError("shard down", code=grpc.StatusCode.PERMISSION_DENIED)

    def fetch_embeddings(
        self, request: sync_pb2.FetchEmbeddingsRequest, timeout: float
    ) -> sync_pb2.FetchEmbeddingsResponse:
        raise SyncError("shard down", code=grpc.StatusCode.PERMISSION_DENIED)


def test_sync_and_internal_error_codes(catalog_file: Path) -> None:
    facade = JsonBrain(transport_factory=lambda target: _DownTransport())

    def call(request: dict[str, Any]) -> dict[str, Any]:
        check_request(request)
        reply: dict[str, Any] = json.loads(facade.handle(json.dumps(request)))
        check_reply(request["op"], reply)
        return reply

    call(init_request(None, target="shard:50051"))
    reply = call({"op": "sync"})  # no catalog yet: the fetch fails first, then the sync
    assert error_code(reply) == ErrorCode.SYNC_ERROR
    assert reply["catalog_error"]["code"] == ErrorCode.SYNC_ERROR
    assert reply["result"]["ok"] is False

    def broken_factory(target: str) -> Any:
        raise RuntimeError("bug in a transport factory")

    broken = JsonBrain(transport_factory=broken_factory)
    reply = json.loads(broken.handle(json.dumps(init_request(None, target="t"))))
    check_reply("init", reply)
    assert error_code(reply) == ErrorCode.INTERNAL_ERROR
    assert reply["error"]["type"] == "InternalError"


def test_catalog_file_format_errors(tmp_path: Path) -> None:
    facade = JsonBrain()
    ids = np.array([f"i{k}" for k in range(3)])
    x = np.eye(3, 384, dtype=np.float32)
    cases = {
        "no-embeddings": {"content_ids": ids},
        "object-ids": {"content_ids": np.array([1, "a", None], dtype=object), "embeddings": x},
        "int-embeddings": {"content_ids": ids, "embeddings": np.ones((3, 384), dtype=np.int32)},
        "short-titles": {"content_ids": ids, "embeddings": x, "titles": np.array(["a"])},
        "wrong-dim": {"content_ids": ids, "embeddings": np.ones((3, 8), dtype=np.float32)},
        "nan": {"content_ids": ids, "embeddings": np.full((3, 384), np.nan, dtype=np.float32)},
    }
    for name, arrays in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        reply = json.loads(facade.handle(json.dumps(init_request(path))))
        check_reply("init", reply)
        assert error_code(reply) == ErrorCode.CATALOG_ERROR, name
        assert "pickle" not in reply["error"]["message"], name
    assert error_code(json.loads(facade.handle('{"op": "stats"}'))) == 2
    # A catalog_file refused while reading keeps the brain that was open; one whose vectors
    # the brain refuses (NaN) leaves no brain open.
    good = write_catalog(tmp_path / "good.npz")
    assert json.loads(facade.handle(json.dumps(init_request(good))))["ok"] is True
    bad = json.loads(facade.handle(json.dumps(init_request(tmp_path / "short-titles.npz"))))
    assert error_code(bad) == ErrorCode.CATALOG_ERROR
    assert json.loads(facade.handle('{"op": "stats"}'))["stats"]["catalog_size"] == 120
    bad = json.loads(facade.handle(json.dumps(init_request(tmp_path / "nan.npz"))))
    assert error_code(bad) == ErrorCode.CATALOG_ERROR
    assert error_code(json.loads(facade.handle('{"op": "stats"}'))) == 2


# ------------------------------------------------------------------------- line framing


def test_line_splitter_basics() -> None:
    s = LineSplitter(limit=5)
    assert s.feed(b"ab\ncd") == [b"ab"]
    assert s.feed(b"e\n\n12345\n") == [b"cde", b"", b"12345"]
    assert s.feed(b"123456") == [None]  # refused as soon as it is too long
    assert s.feed(b"789\nok\n") == [b"ok"]  # the rest of it skipped up to its newline
    assert s.feed(b"tail") == []
    assert s.finish() == [b"tail"]
    assert s.feed(b"1234567") == [None]
    assert s.finish() == []


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"")), max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=10),
    trailing_newline=st.booleans(),
)
def test_line_splitter_matches_split_for_any_chunking(
    lines: list[bytes], cuts: list[int], trailing_newline: bool
) -> None:
    limit = 6
    data = b"\n".join(lines) + (b"\n" if trailing_newline and lines else b"")
    expected: list[bytes | None] = [line if len(line) <= limit else None for line in lines]
    if lines and not trailing_newline and lines[-1] == b"":
        expected.pop()  # nothing after the last newline: no final line
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    s = LineSplitter(limit=limit)
    got: list[bytes | None] = []
    for start, end in itertools.pairwise(bounds):
        got += s.feed(data[start:end])
    got += s.finish()
    assert got == expected


def test_random_bytes_one_reply_per_line(server: Server, catalog_file: Path) -> None:
    """Random lines (JSON-ish fragments and raw bytes): exactly one schema-valid reply each."""
    rng = np.random.default_rng(11)
    atoms = [b"{", b"}", b"[", b"]", b'"op"', b":", b",", b'"init"', b'"observe"', b"NaN", b"1e999"]
    atoms += [
        b"-0",
        b"null",
        b"true",
        b'"\\u0000"',
        b'"\\ud83d"',
        b"\xc3\x28",
        b"\x00",
        b" ",
        b"\r",
    ]
    lines = []
    for _ in range(400):
        if rng.random() < 0.5:
            parts = rng.choice(len(atoms), size=int(rng.integers(0, 12)))
            lines.append(b"".join(atoms[i] for i in parts))
        else:
            raw = rng.integers(0, 256, size=int(rng.integers(0, 64)), dtype=np.uint8).tobytes()
            lines.append(raw.replace(b"\n", b""))
    with Client(server.path) as c:
        c.call(init_request(catalog_file))
        c.send(b"\n".join(lines) + b"\n")
        for _ in lines:
            c.reply()  # parsed and checked against the schema
        assert c.call({"op": "stats"})["ok"] is True  # the brain is still there
        assert c.call({"op": "shutdown"}) == {"ok": True}
