"""The brain's public surface: exported names, configuration, errors and the JSON facade."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest

import omega_brain
from omega.v1 import patterns_pb2, sync_pb2
from omega_brain import BrainConfig, CatalogIndex, JsonBrain, SyncError
from omega_brain.errors import BrainError, InvalidArgumentError, InvalidEventError
from omega_protocol import decode_payload

TS = 1_700_000_000_000  # 2023-11-14 22:13 UTC, a Tuesday: night/weekday


def make_catalog(n: int = 200, seed: int = 0) -> tuple[list[str], npt.NDArray[np.float32]]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((8, 384)).astype(np.float32)
    x = centers[np.arange(n) % 8] + 0.6 * rng.standard_normal((n, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return [f"item-{i}" for i in range(n)], x


def test_exported_names_are_frozen() -> None:
    # Changing this list changes the firmware-facing API: review it with the firmware teams.
    assert omega_brain.__all__ == [
        "Brain",
        "BrainConfig",
        "BrainError",
        "BrainStats",
        "CatalogError",
        "CatalogIndex",
        "FetchedCatalog",
        "GrpcTransport",
        "InvalidArgumentError",
        "InvalidEventError",
        "JsonBrain",
        "Recommendation",
        "StoreError",
        "SyncError",
        "SyncResult",
        "SyncTransport",
        "UnknownContentError",
        "ViewingEvent",
        "__version__",
        "fetch_catalog",
    ]
    for name in omega_brain.__all__:
        assert hasattr(omega_brain, name)
    assert isinstance(omega_brain.__version__, str)


def test_ships_py_typed() -> None:
    assert (Path(omega_brain.__file__).parent / "py.typed").is_file()


def test_imports_nothing_server_side() -> None:
    code = (
        "import sys, omega_brain, omega_brain.facade;"
        "bad = {'asyncpg', 'prometheus_client', 'structlog', 'pydantic', 'pydantic_settings',"
        " 'omega_common'};"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_error_hierarchy() -> None:
    assert issubclass(InvalidEventError, InvalidArgumentError)
    assert issubclass(InvalidArgumentError, ValueError)
    for cls in (
        omega_brain.CatalogError,
        omega_brain.InvalidEventError,
        omega_brain.StoreError,
        omega_brain.SyncError,
        omega_brain.UnknownContentError,
    ):
        assert issubclass(cls, BrainError)


class _FakeRpcError(grpc.RpcError):  # type: ignore[misc]  # grpc ships no type stubs
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "boom"


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        (grpc.StatusCode.UNAVAILABLE, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, True),
        (grpc.StatusCode.ABORTED, True),
        (grpc.StatusCode.CANCELLED, True),  # an overloaded replica's core dropped the call
        (grpc.StatusCode.INVALID_ARGUMENT, False),
        (grpc.StatusCode.PERMISSION_DENIED, False),
    ],
)
def test_sync_error_wraps_rpc_error(code: grpc.StatusCode, retryable: bool) -> None:
    err = SyncError.from_rpc_error("SyncPatterns", _FakeRpcError(code))
    assert err.code is code
    assert err.retryable is retryable
    assert str(err).startswith("SyncPatterns failed: ") and "boom" in str(err)


def test_sync_error_from_bare_rpc_error() -> None:
    err = SyncError.from_rpc_error("SyncPatterns", grpc.RpcError())
    assert err.code is None and not err.retryable


@pytest.mark.parametrize(
    "overrides",
    [
        {"store_path": ""},
        {"min_step": -0.1},
        {"min_step": 1.5},
        {"failure_step": 0.0},
        {"failure_step": 0.9},
        {"success_completion": 0.1, "failure_completion": 0.5},
        {"hnsw_m": 1},
        {"ef_search": 0},
        {"candidate_multiplier": 0},
        {"mmr_lambda": 1.5},
        {"trend_weight": float("nan")},
        {"local_weight": 0.0, "global_weight": 0.0},
        {"max_attempts": 0},
        {"timeout_seconds": 0.0},
        {"base_backoff_seconds": -1.0},
        {"utc_offset_minutes": 24 * 60},
        {"hnsw_m": True},
        {"ef_search": 12.5},
        {"honour_sync_pace": 1},
        {"max_sync_pause_seconds": -1.0},
    ],
)
def test_config_rejects_out_of_range(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        BrainConfig(**overrides)  # type: ignore[arg-type]


def test_config_defaults() -> None:
    cfg = BrainConfig()
    assert cfg.store_path == ":memory:"
    assert (cfg.hnsw_m, cfg.ef_search, cfg.max_attempts) == (32, 128, 14)
    assert cfg.retry_budget_seconds == 15.0
    assert (cfg.base_backoff_seconds, cfg.max_backoff_seconds, cfg.timeout_seconds) == (
        0.25,
        2.0,
        5.0,
    )
    assert cfg.utc_offset_minutes == 0


# ---------------------------------------------------------------------------- facade


class _EchoTransport:
    """Acknowledges every delta; serves no catalog."""

    def __init__(self) -> None:
        self.closed = False
        self.requests: list[sync_pb2.SyncPatternsRequest] = []

    def sync_patterns(
        self, request: sync_pb2.SyncPatternsRequest, timeout: float
    ) -> sync_pb2.SyncPatternsResponse:
        self.requests.append(request)
        return sync_pb2.SyncPatternsResponse(acknowledged_version=request.local_version)

    def fetch_embeddings(
        self, request: sync_pb2.FetchEmbeddingsRequest, timeout: float
    ) -> sync_pb2.FetchEmbeddingsResponse:
        return sync_pb2.FetchEmbeddingsResponse()

    def close(self) -> None:
        self.closed = True


@pytest.fixture(scope="module")
def shared_catalog() -> CatalogIndex:
    ids, x = make_catalog()
    return CatalogIndex(ids, x, titles=[f"Title {i}" for i in range(len(ids))])


def call(facade: JsonBrain, request: object) -> dict[str, object]:
    raw = request if isinstance(request, str) else json.dumps(request)
    reply = json.loads(facade.handle(raw))
    assert isinstance(reply, dict)
    return reply


GARBAGE: list[object] = [
    "",
    "not json",
    "{",
    "[]",
    "null",
    "42",
    '"op"',
    '{"op": 7}',
    '{"op": "explode"}',
    '{"op": "init"}',
    '{"op": "init", "device_id": 5}',
    '{"op": "init", "device_id": "x", "config": {"hnsw_m": -1}}',
    '{"op": "init", "device_id": "x", "config": {"no_such_field": 1}}',
    '{"op": "init", "device_id": "x", "config": []}',
    '{"op": "recommend", "k": NaN}',
    "[" * 100_000 + "]" * 100_000,
    "x" * (2 << 20),
    "\ud800",
]


@pytest.mark.parametrize("request_json", GARBAGE)
def test_facade_never_raises_on_garbage(request_json: str) -> None:
    reply = call(JsonBrain(), request_json)
    assert reply["ok"] is False
    error = reply["error"]
    assert isinstance(error, dict)
    assert isinstance(error["type"], str) and isinstance(error["message"], str)


@pytest.mark.parametrize("value", [None, b"\xff\xfe", 12, ["op"]])
def test_facade_survives_non_string_input(value: object) -> None:
    reply = json.loads(JsonBrain().handle(value))  # type: ignore[arg-type]
    assert reply["ok"] is False


def test_facade_ops_before_init(shared_catalog: CatalogIndex) -> None:
    facade = JsonBrain(catalog=shared_catalog)
    for op in ("recommend", "observe", "sync", "stats"):
        reply = call(facade, {"op": op})
        assert reply["ok"] is False
        assert reply["error"] == {
            "type": "NotInitialized",
            "code": 2,
            "message": "call init first",
        }
    assert call(facade, {"op": "shutdown"}) == {"ok": True}


def test_facade_round_trip(shared_catalog: CatalogIndex, tmp_path: Path) -> None:
    transport = _EchoTransport()
    facade = JsonBrain(catalog=shared_catalog, transport_factory=lambda target: transport)
    store = str(tmp_path / "brain.db")
    reply = call(facade, {"op": "init", "device_id": "tv-1", "store_path": store, "target": "t"})
    assert reply == {"ok": True, "device_id": "tv-1", "catalog_size": 200}

    bad = call(facade, {"op": "observe", "content_id": "item-0", "started_at_ms": TS})
    assert bad["ok"] is False and bad["error"]["type"] == "InvalidRequest"  # type: ignore[index]
    bad = call(
        facade,
        {"op": "observe", "content_id": "item-0", "started_at_ms": TS, "completion": 1.5},
    )
    assert bad["error"]["type"] == "InvalidEventError"  # type: ignore[index]
    bad = call(
        facade, {"op": "observe", "content_id": "nope", "started_at_ms": TS, "completion": 1.0}
    )
    assert bad["error"]["type"] == "UnknownContentError"  # type: ignore[index]
    bad = call(
        facade, {"op": "observe", "content_id": "item-0", "started_at_ms": True, "completion": 1}
    )
    assert bad["error"]["type"] == "InvalidRequest"  # type: ignore[index]

    for i in (0, 8, 16):
        ok = call(
            facade,
            {"op": "observe", "content_id": f"item-{i}", "started_at_ms": TS, "completion": 1},
        )
        assert ok["ok"] is True
    assert ok["local_version"] == 3

    recs = call(facade, {"op": "recommend", "k": 4, "timestamp_ms": TS})
    assert recs["ok"] is True
    items = recs["items"]
    assert isinstance(items, list) and len(items) == 4
    assert all(item["title"].startswith("Title ") for item in items)
    assert not {item["content_id"] for item in items} & {"item-0", "item-8", "item-16"}
    assert call(facade, {"op": "recommend", "k": -1})["ok"] is False
    assert call(facade, {"op": "recommend", "k": "3"})["ok"] is False

    synced = call(facade, {"op": "sync"})
    assert synced["ok"] is True
    assert synced["result"]["acknowledged_version"] == 3  # type: ignore[index]
    delta = decode_payload(transport.requests[-1].delta, patterns_pb2.PatternDelta)
    assert len(delta.added) == 1

    stats = call(facade, {"op": "stats"})
    assert stats["stats"]["acked_version"] == 3  # type: ignore[index]
    assert call(facade, {"op": "shutdown"}) == {"ok": True}
    assert transport.closed
    assert call(facade, {"op": "recommend"})["error"]["type"] == "NotInitialized"  # type: ignore[index]

    # Re-init on the same store: the brain comes back.
    call(facade, {"op": "init", "device_id": "tv-1", "store_path": store})
    assert call(facade, {"op": "stats"})["stats"]["local_version"] == 3  # type: ignore[index]
    reply = call(facade, {"op": "sync"})
    assert reply["ok"] is False and reply["error"]["type"] == "BrainError"  # type: ignore[index]
    # Another device's store is refused with a clear error.
    reply = call(facade, {"op": "init", "device_id": "tv-2", "store_path": store})
    assert reply["ok"] is False and reply["error"]["type"] == "StoreError"  # type: ignore[index]


def test_facade_sync_failure_is_reported(shared_catalog: CatalogIndex) -> None:
    class Down(_EchoTransport):
        def sync_patterns(
            self, request: sync_pb2.SyncPatternsRequest, timeout: float
        ) -> sync_pb2.SyncPatternsResponse:
            raise SyncError("down", code=grpc.StatusCode.PERMISSION_DENIED)

    facade = JsonBrain(catalog=shared_catalog, transport_factory=lambda target: Down())
    call(facade, {"op": "init", "device_id": "tv-1", "target": "t"})
    reply = call(facade, {"op": "sync"})
    assert reply["ok"] is False
    assert reply["error"]["type"] == "SyncError"  # type: ignore[index]
    assert reply["result"]["attempts"] == 1  # type: ignore[index]


def test_brain_rejects_bad_constructor_arguments() -> None:
    with pytest.raises(InvalidArgumentError):
        omega_brain.Brain("")
    with pytest.raises(InvalidArgumentError):
        omega_brain.Brain("x" * 300)
    with pytest.raises(InvalidArgumentError):
        omega_brain.Brain("tv", config="nope")  # type: ignore[arg-type]
