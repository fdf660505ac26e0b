"""A JSON facade over `Brain` for firmware: one string in, one string out, never raises.

Requests are JSON objects with an ``op`` and its parameters:

* ``{"op": "init", "device_id": str, "store_path": str = ":memory:", "target": str | null,
  "credential": str | null, "ca_file": str | null, "plaintext": bool = false,
  "catalog_file": str | null, "config": {BrainConfig field: value, ...}}``: opens (or
  reopens) the brain; a previous one is shut down first. ``target`` is the shard's gRPC
  address; without it the brain is offline. ``credential`` is the device's token
  (``omega-constellation issue-token``), ``ca_file`` a PEM file of the CA the shard's
  certificate chains to (default: the system's roots); ``plaintext`` turns TLS off (tests
  only). ``catalog_file`` is an ``.npz`` catalog loaded into the new brain and persisted in
  its store (`Brain.load_catalog`), for brains without a shard; see `read_catalog_file` for
  its arrays. The reply is ``{"device_id": str, "catalog_size": int}``. A failed init keeps
  the previous brain when its parameters, ``config`` or ``catalog_file`` are refused, and
  leaves none open when opening fails later.
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

Every reply is ``{"ok": true, ...}`` or ``{"ok": false, "error": {"type": str, "code": int,
"message": str}}`` where ``type`` is a `BrainError` class name, ``"InvalidRequest"`` (bad JSON,
unknown op, wrong parameter types), ``"NotInitialized"`` or ``"InternalError"``, and ``code``
is the stable `ErrorCode` of that type, for callers that branch on integers:

==  ===============  =================================================================
0   OK               never sent in an error; "no error" for callers that keep a status
1   INVALID_REQUEST  ``InvalidRequest`` (bad JSON, line too long, not UTF-8, unknown op,
                     missing or wrong-typed parameter, bad ``config``) and
                     ``InvalidArgumentError``
2   NOT_INITIALIZED  ``NotInitialized``: an op other than init/shutdown before init
3   INVALID_EVENT    ``InvalidEventError``: an observe the brain cannot learn from
4   UNKNOWN_CONTENT  ``UnknownContentError``: a content id not in the catalog
5   CATALOG_ERROR    ``CatalogError``: an unusable catalog (or ``catalog_file``)
6   SYNC_ERROR       ``SyncError``: a call to the shard failed (also a sync with ``ok`` false)
7   STORE_ERROR      ``StoreError``: the local store cannot be opened, read or written
8   INTERNAL_ERROR   ``InternalError``: a bug; the message names the exception
9   BRAIN_ERROR      any other `BrainError`, e.g. sync on a brain opened without ``target``
==  ===============  =================================================================

Codes are never renumbered; new ones are only added. The machine-readable contract of every
request and reply is ``protocol.schema.json`` beside this module (JSON Schema 2020-12), and
``omega-brain serve`` (`omega_brain.server`) carries these strings over a Unix socket or stdio.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from omega_brain.brain import Brain
from omega_brain.catalog import CatalogIndex
from omega_brain.config import BrainConfig
from omega_brain.errors import (
    BrainError,
    CatalogError,
    InvalidArgumentError,
    InvalidEventError,
    StoreError,
    SyncError,
    UnknownContentError,
)
from omega_brain.models import ViewingEvent
from omega_brain.transport import GrpcTransport, SyncTransport

__all__ = ["MAX_REQUEST_CHARS", "ErrorCode", "JsonBrain", "error_reply", "read_catalog_file"]

MAX_REQUEST_CHARS = 1 << 20
"""Longer requests are refused without parsing (1 MiB characters)."""

_MAX_K = 1000


class ErrorCode(enum.IntEnum):
    """The stable integer ``code`` of an error reply (see the module docstring's table)."""

    OK = 0
    INVALID_REQUEST = 1
    NOT_INITIALIZED = 2
    INVALID_EVENT = 3
    UNKNOWN_CONTENT = 4
    CATALOG_ERROR = 5
    SYNC_ERROR = 6
    STORE_ERROR = 7
    INTERNAL_ERROR = 8
    BRAIN_ERROR = 9


# Most specific first: InvalidEventError is an InvalidArgumentError, everything a BrainError.
_BRAIN_ERROR_CODES: tuple[tuple[type[BrainError], ErrorCode], ...] = (
    (InvalidEventError, ErrorCode.INVALID_EVENT),
    (InvalidArgumentError, ErrorCode.INVALID_REQUEST),
    (UnknownContentError, ErrorCode.UNKNOWN_CONTENT),
    (CatalogError, ErrorCode.CATALOG_ERROR),
    (SyncError, ErrorCode.SYNC_ERROR),
    (StoreError, ErrorCode.STORE_ERROR),
    (BrainError, ErrorCode.BRAIN_ERROR),
)


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
            return error_reply("InvalidRequest", ErrorCode.INVALID_REQUEST, str(exc))
        except _NotInitializedError as exc:
            return error_reply("NotInitialized", ErrorCode.NOT_INITIALIZED, str(exc))
        except BrainError as exc:
            return error_reply(type(exc).__name__, _code_of(exc), str(exc))
        except Exception as exc:  # the facade's contract: report, never raise
            return error_reply(
                "InternalError", ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"
            )

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
        overrides = dict(_param(req, "config", dict, {}))
        key = overrides.get("encryption_key")
        if isinstance(key, str):
            # JSON has no bytes: the key travels as 64 hex digits (never echoed back).
            try:
                overrides["encryption_key"] = bytes.fromhex(key)
            except ValueError:
                raise _RequestError("bad config: encryption_key must be hex digits") from None
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
        catalog_file = _param(req, "catalog_file", str, None, nullable=True)
        catalog_data = read_catalog_file(catalog_file) if catalog_file is not None else None
        self._shutdown({})
        transport = self._transport_factory(target, **security) if target else None
        try:
            brain = Brain(
                device_id, config, transport=transport, catalog=self._catalog, clock=self._clock
            )
        except BaseException:
            _close_transport(transport)
            raise
        if catalog_data is not None:
            try:
                brain.load_catalog(*catalog_data)
            except BaseException:
                brain.close()
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
                reply["catalog_error"] = _error_fields(type(exc).__name__, _code_of(exc), str(exc))
        result = brain.sync()
        fields = dataclasses.asdict(result)
        fields["latency_seconds"] = _finite_or_zero(result.latency_seconds)
        reply.update(ok=result.ok, result=fields)
        if not result.ok:
            reply["error"] = _error_fields(
                "SyncError", ErrorCode.SYNC_ERROR, result.error or "sync failed"
            )
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


def read_catalog_file(
    path: str,
) -> tuple[list[str], npt.NDArray[np.float32], list[str] | None, list[list[str]] | None]:
    """Read an ``.npz`` catalog for `Brain.load_catalog` (the ``catalog_file`` of ``init``).

    The file holds ``content_ids``: (n,) str; ``embeddings``: (n, 384) float16/32/64; and
    optionally ``titles``: (n,) str and ``genres``: (n,) str, each item's genres joined by
    ``"|"``. Written e.g. by ``np.savez(path, content_ids=np.array(ids), embeddings=x)``.
    Object arrays (pickles) are refused.

    Args:
        path: the file.

    Returns:
        ``(content_ids, embeddings, titles or None, genres or None)``.

    Raises:
        CatalogError: the file cannot be read, is not such an ``.npz``, or its arrays have
            the wrong kinds or lengths (shapes and values are checked by `load_catalog`).
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except OSError as exc:
        raise CatalogError(f"cannot read catalog_file: {exc.strerror or exc}") from None
    except Exception as exc:  # zipfile/numpy raise many kinds on a file that is not an .npz
        # numpy's own message about pickles would invite loading the file unsafely: not shown.
        raise CatalogError(
            f"catalog_file is not an .npz of plain arrays ({type(exc).__name__})"
        ) from None
    if "content_ids" not in arrays or "embeddings" not in arrays:
        raise CatalogError("catalog_file needs the arrays 'content_ids' and 'embeddings'")
    texts: dict[str, list[str]] = {}
    for name in ("content_ids", "titles", "genres"):
        if name in arrays:
            column = arrays[name]
            if column.dtype.kind != "U" or column.ndim != 1:
                raise CatalogError(f"catalog_file array {name!r} must be a 1-D str array")
            texts[name] = [str(v) for v in column]
    ids = texts["content_ids"]
    for name in ("titles", "genres"):
        if name in texts and len(texts[name]) != len(ids):
            raise CatalogError(f"catalog_file array {name!r} must have one entry per content id")
    x = arrays["embeddings"]
    if x.dtype.kind != "f":
        raise CatalogError("catalog_file array 'embeddings' must be floats")
    genres = None
    if "genres" in texts:
        genres = [[g for g in v.split("|") if g] for v in texts["genres"]]
    return ids, x.astype(np.float32, copy=False), texts.get("titles"), genres


def error_reply(kind: str, code: int, message: str) -> str:
    """An ``{"ok": false, "error": {...}}`` reply as a JSON string (message cut at 2000 chars).

    Args:
        kind: the error ``type``, e.g. ``"InvalidRequest"``.
        code: its `ErrorCode`.
        message: what went wrong, for humans.
    """
    return json.dumps({"ok": False, "error": _error_fields(kind, code, message)})


def _error_fields(kind: str, code: int, message: str) -> dict[str, Any]:
    return {"type": kind, "code": int(code), "message": message[:2000]}


def _code_of(exc: BrainError) -> ErrorCode:
    for cls, code in _BRAIN_ERROR_CODES:
        if isinstance(exc, cls):
            return code
    return ErrorCode.BRAIN_ERROR
