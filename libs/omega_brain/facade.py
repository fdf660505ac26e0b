"""A JSON facade over `Brain` for firmware: one string in, one string out, never raises.

Requests are JSON objects with an ``op`` and its parameters:

* ``{"op": "init", "device_id": str, "store_path": str = ":memory:", "target": str | null,
  "credential": str | null, "ca_file": str | null, "plaintext": bool = false,
  "config": {BrainConfig field: value, ...}}``: opens (or reopens) the brain; a previous one
  is shut down first. ``target`` is the shard's gRPC address; without it the brain is offline.
  ``credential`` is the device's token (``omega-constellation issue-token``), ``ca_file`` a
  PEM file of the CA the shard's certificate chains to (default: the system's roots);
  ``plaintext`` turns TLS off (tests only).
* ``{"op": "recommend", "k": int = 10, "timestamp_ms": int | null, "use_global": bool = true,
  "exclude_watched": bool = true}`` -> ``{"items": [{"content_id", "title", "score",
  "reasons"}]}``.
* ``{"op": "observe", "content_id": str, "started_at_ms": int, "completion": float,
  "watch_seconds": float = 0}`` -> ``{"local_version": int}``.
* ``{"op": "sync"}`` -> ``{"result": {SyncResult fields}}``; fetches the catalog first when the
  brain has none. ``ok`` is the sync's own ``ok``.
* ``{"op": "stats"}`` -> ``{"stats": {BrainStats fields}}``.
* ``{"op": "forget"}`` -> ``{"forgotten": bool}``: erases the device's data on its shard and
  then on the device (`Brain.forget`).
* ``{"op": "shutdown"}``: closes the brain (and the gRPC channel it opened).

Every reply is ``{"ok": true, ...}`` or ``{"ok": false, "error": {"type": ..., "message":
...}}`` where ``type`` is a `BrainError` class name, ``"InvalidRequest"`` (bad JSON, unknown op,
wrong parameter types), ``"NotInitialized"`` or ``"InternalError"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from omega_brain.brain import Brain
from omega_brain.catalog import CatalogIndex
from omega_brain.config import BrainConfig
from omega_brain.errors import BrainError
from omega_brain.models import ViewingEvent
from omega_brain.transport import GrpcTransport, SyncTransport

__all__ = ["MAX_REQUEST_CHARS", "JsonBrain"]

MAX_REQUEST_CHARS = 1 << 20
"""Longer requests are refused without parsing (1 MiB characters)."""

_MAX_K = 1000


class _RequestError(Exception):
    """A request that is not valid JSON or has wrong parameters (reported as InvalidRequest)."""


class JsonBrain:
    """The brain behind a ``handle(json) -> json`` call, for firmware bindings.

    Args:
        catalog: a prebuilt catalog shared with the brain (optional).
        transport_factory: builds the transport for an ``init`` ``target`` (default:
            `GrpcTransport`), called with the target and, when ``init`` gives them, the
            keyword arguments ``credential``, ``root_certificates`` and ``plaintext``; a
            transport with a ``close()`` method is closed at shutdown.
        clock: wall clock for the brain, seconds since the epoch.
    """

    def __init__(
        self,
        *,
        catalog: CatalogIndex | None = None,
        transport_factory: Callable[..., SyncTransport] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._catalog = catalog
        self._transport_factory = transport_factory or GrpcTransport
        self._clock = clock
        self._brain: Brain | None = None
        self._transport: SyncTransport | None = None
        self._lock = threading.Lock()

    def handle(self, request_json: str) -> str:
        """Run one request; always returns a JSON object as a string (never raises)."""
        try:
            with self._lock:
                reply = self._dispatch(request_json)
            return json.dumps({"ok": True, **reply}, allow_nan=False)
        except _RequestError as exc:
            return _error("InvalidRequest", str(exc))
        except _NotInitializedError as exc:
            return _error("NotInitialized", str(exc))
        except BrainError as exc:
            return _error(type(exc).__name__, str(exc))
        except Exception as exc:  # the facade's contract: report, never raise
            return _error("InternalError", f"{type(exc).__name__}: {exc}")

    def _dispatch(self, request_json: object) -> dict[str, Any]:
        if isinstance(request_json, bytes | bytearray):
            try:
                request_json = request_json.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _RequestError(f"request is not UTF-8: {exc}") from None
        if not isinstance(request_json, str):
            raise _RequestError("request must be a JSON string")
        if len(request_json) > MAX_REQUEST_CHARS:
            raise _RequestError(f"request longer than {MAX_REQUEST_CHARS} characters")
        try:
            request = json.loads(request_json, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as exc:
            raise _RequestError(f"request is not valid JSON: {exc}") from None
        if not isinstance(request, dict):
            raise _RequestError("request must be a JSON object")
        op = request.get("op")
        handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "init": self._init,
            "recommend": self._recommend,
            "observe": self._observe,
            "sync": self._sync,
            "stats": self._stats,
            "forget": self._forget,
            "shutdown": self._shutdown,
        }
        if not isinstance(op, str) or op not in handlers:
            raise _RequestError(f"unknown op {op!r}; expected one of {sorted(handlers)}")
        return handlers[op](request)

    # ------------------------------------------------------------------ ops

    def _init(self, req: dict[str, Any]) -> dict[str, Any]:
        device_id = _param(req, "device_id", str)
        store_path = _param(req, "store_path", str, ":memory:")
        target = _param(req, "target", str, None, nullable=True)
        overrides = _param(req, "config", dict, {})
        try:
            config = BrainConfig(store_path=store_path, **overrides)
        except (TypeError, ValueError) as exc:
            raise _RequestError(f"bad config: {exc}") from None
        security: dict[str, Any] = {}
        credential = _param(req, "credential", str, None, nullable=True)
        ca_file = _param(req, "ca_file", str, None, nullable=True)
        if credential is not None:
            security["credential"] = credential
        if ca_file is not None:
            try:
                with open(ca_file, "rb") as f:
                    security["root_certificates"] = f.read(1 << 20)
            except OSError as exc:
                raise _RequestError(f"cannot read ca_file: {exc.strerror}") from None
        if _param(req, "plaintext", bool, False):
            security["plaintext"] = True
        self._shutdown({})
        transport = self._transport_factory(target, **security) if target else None
        try:
            brain = Brain(
                device_id, config, transport=transport, catalog=self._catalog, clock=self._clock
            )
        except BaseException:
            _close_transport(transport)
            raise
        self._brain, self._transport = brain, transport
        catalog = brain.catalog
        return {"device_id": device_id, "catalog_size": len(catalog) if catalog else 0}

    def _recommend(self, req: dict[str, Any]) -> dict[str, Any]:
        brain = self._require_brain()
        k = _param(req, "k", int, 10)
        if not 0 <= k <= _MAX_K:
            raise _RequestError(f"k must be in [0, {_MAX_K}]")
        recs = brain.recommend(
            k,
            timestamp_ms=_param(req, "timestamp_ms", int, None, nullable=True),
            use_global=_param(req, "use_global", bool, True),
            exclude_watched=_param(req, "exclude_watched", bool, True),
        )
        catalog = brain.catalog
        return {
            "items": [
                {
                    "content_id": r.content_id,
                    "title": catalog.title_of(r.content_id)
                    if catalog is not None and r.content_id in catalog
                    else "",
                    "score": _finite_or_zero(r.score),
                    "reasons": list(r.reasons),
                }
                for r in recs
            ]
        }

    def _observe(self, req: dict[str, Any]) -> dict[str, Any]:
        brain = self._require_brain()
        event = ViewingEvent(
            content_id=_param(req, "content_id", str),
            started_at_ms=_param(req, "started_at_ms", int),
            completion=_number(req, "completion"),
            watch_seconds=_number(req, "watch_seconds", 0.0),
        )
        brain.observe(event)
        return {"local_version": brain.stats().local_version}

    def _sync(self, req: dict[str, Any]) -> dict[str, Any]:
        brain = self._require_brain()
        reply: dict[str, Any] = {}
        if brain.catalog is None or len(brain.catalog) == 0:
            try:
                reply["catalog_size"] = brain.fetch_catalog()
            except BrainError as exc:
                reply["catalog_error"] = {"type": type(exc).__name__, "message": str(exc)}
        result = brain.sync()
        fields = dataclasses.asdict(result)
        fields["latency_seconds"] = _finite_or_zero(result.latency_seconds)
        reply.update(ok=result.ok, result=fields)
        if not result.ok:
            reply["error"] = {"type": "SyncError", "message": result.error or "sync failed"}
        return reply

    def _forget(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"forgotten": self._require_brain().forget()}

    def _stats(self, req: dict[str, Any]) -> dict[str, Any]:
        stats = dataclasses.asdict(self._require_brain().stats())
        return {"stats": {k: _finite_or_zero(v) for k, v in stats.items()}}

    def _shutdown(self, req: dict[str, Any]) -> dict[str, Any]:
        brain, transport = self._brain, self._transport
        self._brain, self._transport = None, None
        try:
            if brain is not None:
                brain.close()
        finally:
            _close_transport(transport)
        return {}

    def _require_brain(self) -> Brain:
        if self._brain is None:
            raise _NotInitializedError("call init first")
        return self._brain


class _NotInitializedError(Exception):
    """An op other than init before init (reported as NotInitialized)."""


def _param(
    req: dict[str, Any],
    name: str,
    kind: type[Any],
    default: Any = dataclasses.MISSING,
    *,
    nullable: bool = False,
) -> Any:
    if name not in req or (nullable and req[name] is None):
        if default is dataclasses.MISSING:
            raise _RequestError(f"missing parameter {name!r}")
        return default
    value = req[name]
    # bool is an int in Python but not in JSON: refuse true/false for int parameters.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _RequestError(f"parameter {name!r} must be a {kind.__name__}")
    return value


def _number(req: dict[str, Any], name: str, default: float | None = None) -> float:
    if name not in req and default is not None:
        return default
    if name not in req:
        raise _RequestError(f"missing parameter {name!r}")
    value = req[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _RequestError(f"parameter {name!r} must be a number")
    return float(value)


def _finite_or_zero(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return 0.0
    return value


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _close_transport(transport: object) -> None:
    close = getattr(transport, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):  # a broken channel must not fail a shutdown
            close()


def _error(kind: str, message: str) -> str:
    return json.dumps({"ok": False, "error": {"type": kind, "message": message[:2000]}})
