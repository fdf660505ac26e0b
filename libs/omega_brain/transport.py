"""How the brain talks to its constellation shard: a small synchronous transport interface.

`SyncTransport` is the three calls the brain needs; `GrpcTransport` implements it over a
synchronous gRPC channel. Tests and the simulator may pass any object with the same methods
(`fetch_model` is only called once a sync answer names a model version, so a transport of a
shard without the collaborative model may leave it out). `call_with_retries` adds exponential
backoff with full jitter (Brooker, "Exponential Backoff And Jitter", AWS Architecture Blog,
2015): before retry n the caller sleeps a uniform random time in
``[0, min(max_backoff, base * 2 ** (n - 1))]``, which spreads a fleet of TVs that failed
together instead of making them retry in lock-step.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
import numpy as np
import numpy.typing as npt

from omega.v1 import patterns_pb2, sync_pb2, sync_pb2_grpc
from omega_brain.errors import CatalogError, SyncError
from omega_protocol import EMBEDDING_DIM, EmbeddingError, decode_embedding
from omega_protocol.model_update import MAX_MODEL_FACTORS

__all__ = [
    "FetchProgress",
    "FetchedCatalog",
    "FetchedModel",
    "GrpcTransport",
    "SyncTransport",
    "backoff_seconds",
    "call_with_retries",
    "download_model",
    "fetch_catalog",
]

_MAX_RECEIVE_BYTES = 16 << 20
_MAX_CATALOG_PAGES = 100_000
_MAX_MODEL_PAGES = 100_000
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "omega.v1.ConstellationSync"}],
                # gRPC's own transparent retries of one attempt (connection refused while a
                # replica restarts, a rate limit's pushback): short, under the brain's own
                # budget-bound retries (`call_with_retries`), which span a whole restart.
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    ("grpc.max_receive_message_length", _MAX_RECEIVE_BYTES),
    ("grpc.max_send_message_length", 4 << 20),
    # Ping only while a call is in flight, every 2 min: servers refuse more frequent pings
    # (GOAWAY "too_many_pings") and TVs sync every few minutes anyway.
    ("grpc.keepalive_time_ms", 120_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
]

T = TypeVar("T")


def _bearer(credential: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the device token (gRPC metadata key ``authorization``)."""
    if credential is None:
        return ()
    if not isinstance(credential, str) or not credential or "\n" in credential:
        raise SyncError("credential must be a non-empty single-line string")
    return (("authorization", f"Bearer {credential}"),)


class SyncTransport(Protocol):
    """The calls the brain makes to a constellation shard.

    Implementations raise `SyncError` (with ``retryable`` set) for failures; any other
    exception is treated as a non-retryable failure by the brain.
    """

    def sync_patterns(
        self, request: sync_pb2.SyncPatternsRequest, timeout: float
    ) -> sync_pb2.SyncPatternsResponse:
        """Push a pattern delta, pull global patterns; ``timeout`` in seconds."""
        ...

    def fetch_embeddings(
        self, request: sync_pb2.FetchEmbeddingsRequest, timeout: float
    ) -> sync_pb2.FetchEmbeddingsResponse:
        """One page of catalog embeddings; ``timeout`` in seconds."""
        ...

    def fetch_model(
        self, request: sync_pb2.FetchModelRequest, timeout: float
    ) -> sync_pb2.FetchModelResponse:
        """One page of item-factor rows changed since a model version; ``timeout`` in seconds.

        `download_model` pages through it (with retries and the restart when the model
        version moves mid-fetch).
        """
        ...

    def forget_device(
        self, request: sync_pb2.ForgetDeviceRequest, timeout: float
    ) -> sync_pb2.ForgetDeviceResponse:
        """Ask the shard to delete what it keeps about the device (`Brain.forget`); a
        transport of an offline or test setting may leave it out."""
        ...


class GrpcTransport:
    """`SyncTransport` over a synchronous gRPC channel, TLS by default.

    Args:
        target: the shard's address, e.g. ``"shard-0.omega.example:443"`` or
            ``"127.0.0.1:50051"``.
        credential: the device's token (``omega-constellation issue-token``), sent as
            ``authorization: Bearer <token>`` on every call; None sends none (a shard that
            requires credentials then answers UNAUTHENTICATED).
        root_certificates: PEM CA bundle the shard's certificate must chain to; None trusts
            the system's roots.
        plaintext: no TLS (tests and debugging only); ``root_certificates`` is then ignored.

    The channel accepts replies up to 16 MiB and sends keepalive pings during calls. Use
    `from_channel` to share one channel between many brains (the simulator) and
    `with_credential` to give each of them its own token over it.

    Raises:
        SyncError: an empty target.
    """

    def __init__(
        self,
        target: str,
        *,
        credential: str | None = None,
        root_certificates: bytes | None = None,
        plaintext: bool = False,
    ) -> None:
        if not isinstance(target, str) or not target:
            raise SyncError("gRPC target must be a non-empty string")
        self._target = target
        if plaintext:
            self._channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        else:
            tls = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, tls, options=_CHANNEL_OPTIONS)
        self._owns_channel = True
        self._stub = sync_pb2_grpc.ConstellationSyncStub(self._channel)
        self._metadata = _bearer(credential)

    @classmethod
    def from_channel(cls, channel: grpc.Channel, credential: str | None = None) -> GrpcTransport:
        """A transport over an existing channel, which `close` leaves open."""
        self = cls.__new__(cls)
        self._target = "<shared channel>"
        self._channel = channel
        self._owns_channel = False
        self._stub = sync_pb2_grpc.ConstellationSyncStub(channel)
        self._metadata = _bearer(credential)
        return self

    def with_credential(self, credential: str | None) -> GrpcTransport:
        """A transport over this one's channel that sends ``credential`` (one per device).

        Closing it leaves the channel open; close the original when every user is done.
        """
        other = GrpcTransport.from_channel(self._channel, credential)
        other._target = self._target
        return other

    @property
    def target(self) -> str:
        """The address given at construction."""
        return self._target

    def sync_patterns(
        self, request: sync_pb2.SyncPatternsRequest, timeout: float
    ) -> sync_pb2.SyncPatternsResponse:
        """Call ``ConstellationSync.SyncPatterns``.

        Raises:
            SyncError: the call failed; ``retryable`` for UNAVAILABLE, DEADLINE_EXCEEDED,
                RESOURCE_EXHAUSTED and ABORTED.
        """
        response = self._call("SyncPatterns", self._stub.SyncPatterns, request, timeout)
        if not isinstance(response, sync_pb2.SyncPatternsResponse):
            raise SyncError(f"SyncPatterns returned {type(response).__name__}")
        return response

    def fetch_embeddings(
        self, request: sync_pb2.FetchEmbeddingsRequest, timeout: float
    ) -> sync_pb2.FetchEmbeddingsResponse:
        """Call ``ConstellationSync.FetchEmbeddings``.

        Raises:
            SyncError: as for `sync_patterns`.
        """
        response = self._call("FetchEmbeddings", self._stub.FetchEmbeddings, request, timeout)
        if not isinstance(response, sync_pb2.FetchEmbeddingsResponse):
            raise SyncError(f"FetchEmbeddings returned {type(response).__name__}")
        return response

    def fetch_model(
        self, request: sync_pb2.FetchModelRequest, timeout: float
    ) -> sync_pb2.FetchModelResponse:
        """Call ``ConstellationSync.FetchModel``.

        Raises:
            SyncError: as for `sync_patterns`.
        """
        response = self._call("FetchModel", self._stub.FetchModel, request, timeout)
        if not isinstance(response, sync_pb2.FetchModelResponse):
            raise SyncError(f"FetchModel returned {type(response).__name__}")
        return response

    def forget_device(
        self, request: sync_pb2.ForgetDeviceRequest, timeout: float
    ) -> sync_pb2.ForgetDeviceResponse:
        """Call ``ConstellationSync.ForgetDevice``.

        Raises:
            SyncError: as for `sync_patterns`.
        """
        response = self._call("ForgetDevice", self._stub.ForgetDevice, request, timeout)
        if not isinstance(response, sync_pb2.ForgetDeviceResponse):
            raise SyncError(f"ForgetDevice returned {type(response).__name__}")
        return response

    def _call(
        self, rpc: str, method: Callable[..., object], request: object, timeout: float
    ) -> object:
        try:
            return method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise SyncError.from_rpc_error(rpc, exc) from exc
        except ValueError as exc:  # e.g. "Cannot invoke RPC on closed channel!"
            raise SyncError(f"{rpc} failed: {exc}") from exc

    def close(self) -> None:
        """Close the channel if this transport created it (idempotent)."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> GrpcTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def backoff_seconds(
    retry: int, base_seconds: float, max_seconds: float, rng: random.Random
) -> float:
    """Full-jitter backoff before retry number ``retry`` (1 for the first retry).

    Returns:
        A uniform random delay in ``[0, min(max_seconds, base_seconds * 2 ** (retry - 1))]``,
        in seconds.
    """
    cap = min(max_seconds, base_seconds * 2.0 ** min(retry - 1, 62))
    return rng.uniform(0.0, cap) if cap > 0 else 0.0


@dataclass
class RetryOutcome:
    """What `call_with_retries` did: attempts made and the last attempt's duration."""

    attempts: int = 0
    last_latency_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def call_with_retries(
    call: Callable[[], T],
    *,
    max_attempts: int,
    base_backoff_seconds: float,
    max_backoff_seconds: float,
    rng: random.Random,
    outcome: RetryOutcome,
    sleep: Callable[[float], None] = time.sleep,
    budget_seconds: float = math.inf,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Run ``call`` until it succeeds, retrying only retryable `SyncError`s.

    Before retry n it waits the full-jitter backoff (`backoff_seconds`), or the server's
    ``retry-after-ms`` hint when that is longer. It stops after ``max_attempts`` attempts, or
    when the next wait would end past ``budget_seconds`` since the first attempt started
    (size the budget to span a replica restart: a few seconds).

    Args:
        call: the attempt; raises `SyncError` on failure.
        max_attempts: attempts including the first, >= 1.
        base_backoff_seconds: backoff cap before the first retry, doubled per retry.
        max_backoff_seconds: upper bound of one backoff.
        rng: source of jitter.
        outcome: filled in with attempts made and the last attempt's latency.
        sleep: how to wait (seconds).
        budget_seconds: longest time from the first attempt to the start of the last one.
        clock: monotonic seconds (tests pass a fake one with ``sleep``).

    Returns:
        The first successful result.

    Raises:
        SyncError: the last error, when an attempt failed non-retryably or the attempts or
            the budget ran out. Any other exception from ``call`` is wrapped as a
            non-retryable SyncError.
    """
    started = clock()
    while True:
        outcome.attempts += 1
        start = time.perf_counter()
        try:
            result = call()
        except SyncError as exc:
            error = exc
        except Exception as exc:  # a third-party transport: never retried, never leaked raw
            error = SyncError(f"transport failed: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
        else:
            outcome.last_latency_seconds = time.perf_counter() - start
            return result
        outcome.last_latency_seconds = time.perf_counter() - start
        outcome.errors.append(str(error))
        if not error.retryable or outcome.attempts >= max_attempts:
            raise error
        wait = backoff_seconds(outcome.attempts, base_backoff_seconds, max_backoff_seconds, rng)
        if error.retry_after_seconds is not None:
            wait = max(wait, error.retry_after_seconds)
        if clock() - started + wait > budget_seconds:
            raise error
        sleep(wait)


@dataclass(frozen=True)
class FetchedCatalog:
    """A catalog downloaded with `fetch_catalog`, ready for `CatalogIndex(...)`.

    Attributes:
        content_ids: n ids in server order.
        embeddings: (n, 384) float32, L2-normalized.
        titles: n titles.
        genres: n genre lists.
        catalog_version: the server's catalog version these items are current to.
    """

    content_ids: list[str]
    embeddings: npt.NDArray[np.float32]
    titles: list[str]
    genres: list[list[str]]
    catalog_version: int


def fetch_catalog(
    transport: SyncTransport,
    *,
    page_size: int = 500,
    since_catalog_version: int = 0,
    encoding: int = patterns_pb2.EMBEDDING_ENCODING_INT8,
    timeout_seconds: float = 5.0,
    max_attempts: int = 4,
    base_backoff_seconds: float = 0.05,
    max_backoff_seconds: float = 2.0,
    rng: random.Random | None = None,
    budget_seconds: float = math.inf,
) -> FetchedCatalog:
    """Page through ``FetchEmbeddings`` and return every item changed since a version.

    Each page is retried like a sync (retryable errors only, full-jitter backoff). An item
    that appears twice keeps its last copy.

    Args:
        transport: where to fetch from.
        page_size: items per page requested (the server may cap it).
        since_catalog_version: 0 for the whole catalog.
        encoding: embedding encoding to request (INT8 by default: a quarter of float32's
            bytes, cosine > 0.999 after decoding).
        timeout_seconds: deadline of one page request.
        max_attempts: attempts per page.
        base_backoff_seconds: see `call_with_retries`.
        max_backoff_seconds: see `call_with_retries`.
        rng: jitter source (a fresh `random.Random` by default).
        budget_seconds: retry time budget per page, see `call_with_retries`.

    Returns:
        The items, with embeddings decoded and normalized.

    Raises:
        SyncError: a page could not be fetched, or the server's paging does not terminate.
        CatalogError: an item has an empty id, or an embedding that does not decode to a
            finite non-zero 384-dim vector.
    """
    rng = rng or random.Random()
    positions: dict[str, int] = {}
    ids: list[str] = []
    titles: list[str] = []
    genres: list[list[str]] = []
    rows: list[npt.NDArray[np.float32]] = []
    version = 0
    token = ""
    seen_tokens: set[str] = set()
    for _ in range(_MAX_CATALOG_PAGES):
        request = sync_pb2.FetchEmbeddingsRequest(
            since_catalog_version=since_catalog_version,
            encoding=encoding,  # type: ignore[arg-type]
            page_size=page_size,
            page_token=token,
        )
        response = call_with_retries(
            lambda r=request: transport.fetch_embeddings(r, timeout_seconds),  # type: ignore[misc]
            max_attempts=max_attempts,
            base_backoff_seconds=base_backoff_seconds,
            max_backoff_seconds=max_backoff_seconds,
            rng=rng,
            outcome=RetryOutcome(),
            budget_seconds=budget_seconds,
        )
        version = max(version, int(response.catalog_version))
        for item in response.items:
            if not item.content_id:
                raise CatalogError("the server sent a catalog item without a content id")
            try:
                vector = decode_embedding(item.embedding, EMBEDDING_DIM)
            except EmbeddingError as exc:
                raise CatalogError(f"bad embedding for {item.content_id!r}: {exc}") from exc
            norm = float(np.linalg.norm(vector))
            if norm < 1e-6:
                raise CatalogError(f"zero embedding for {item.content_id!r}")
            entry = (item.title, list(item.genres), (vector / norm).astype(np.float32))
            pos = positions.get(item.content_id)
            if pos is None:
                positions[item.content_id] = len(ids)
                ids.append(item.content_id)
                titles.append(entry[0])
                genres.append(entry[1])
                rows.append(entry[2])
            else:
                titles[pos], genres[pos], rows[pos] = entry
        token = response.next_page_token
        if not token:
            break
        if token in seen_tokens:
            raise SyncError(f"FetchEmbeddings returned page token {token!r} twice")
        seen_tokens.add(token)
    else:
        raise SyncError(f"FetchEmbeddings did not finish within {_MAX_CATALOG_PAGES} pages")
    embeddings = np.stack(rows) if rows else np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    return FetchedCatalog(ids, embeddings, titles, genres, version)


@dataclass
class FetchProgress:
    """What `download_model` received so far, kept when it fails part-way.

    Attributes:
        pages: FetchModel replies received.
        bytes_down: their serialized size, in bytes.
        restarts: times the download started over because the model version moved.
    """

    pages: int = 0
    bytes_down: int = 0
    restarts: int = 0


@dataclass(frozen=True)
class FetchedModel:
    """Item-factor rows downloaded with `download_model`.

    Attributes:
        model_version: the version every row is current to (0: the server has no model).
        factors: factors per item (0 only when the server has no model).
        rows: ``(content_id, factor, row model_version)`` in server order, each id once (its
            last copy); ``factor`` is (factors,) float32, or None when the item left the model.
        since_model_version: the version the rows are changes since (0: a full model, which
            replaces the stored one).
        bytes_down: serialized size of every reply received, in bytes (restarts included).
    """

    model_version: int
    factors: int
    rows: list[tuple[str, npt.NDArray[np.float32] | None, int]]
    since_model_version: int
    bytes_down: int


def download_model(
    transport: SyncTransport,
    *,
    since_model_version: int = 0,
    page_size: int = 1000,
    timeout_seconds: float = 5.0,
    max_attempts: int = 4,
    base_backoff_seconds: float = 0.05,
    max_backoff_seconds: float = 2.0,
    rng: random.Random | None = None,
    budget_seconds: float = math.inf,
    progress: FetchProgress | None = None,
) -> FetchedModel:
    """Page through ``FetchModel``: every item-factor row changed since a model version.

    Every page of one fetch must carry the same model version and factor count. When a page
    names another version (a federated round was published mid-fetch), the rows gathered so
    far may mix two versions, so the download starts over once from the same
    ``since_model_version``; a second move fails. Each page is retried like a sync.

    Args:
        transport: where to fetch from.
        since_model_version: 0 for the whole model.
        page_size: rows per page requested (the server may cap it).
        timeout_seconds: deadline of one page request.
        max_attempts: attempts per page.
        base_backoff_seconds: see `call_with_retries`.
        max_backoff_seconds: see `call_with_retries`.
        rng: jitter source (a fresh `random.Random` by default).
        budget_seconds: retry time budget per page, see `call_with_retries`.
        progress: filled in with pages and bytes received, also when this raises.

    Returns:
        The rows, factors decoded to float32.

    Raises:
        SyncError: a page could not be fetched, the paging does not terminate, the model
            version moved twice, or a reply is malformed (an empty content id, a factor count
            out of range or changing between pages, a factor of the wrong dimension or not
            finite).
    """
    jitter = rng or random.Random()
    progress = progress if progress is not None else FetchProgress()

    def fetch_page(request: sync_pb2.FetchModelRequest) -> sync_pb2.FetchModelResponse:
        try:
            return call_with_retries(
                lambda: _page_or_moved(transport, request, timeout_seconds),
                max_attempts=max_attempts,
                base_backoff_seconds=base_backoff_seconds,
                max_backoff_seconds=max_backoff_seconds,
                rng=jitter,
                budget_seconds=budget_seconds,
                outcome=RetryOutcome(),
            )
        except _ModelVersionMovedError as exc:
            raise _ModelVersionMoved from exc

    for _attempt in range(2):
        try:
            return _download_model_once(since_model_version, page_size, fetch_page, progress)
        except _ModelVersionMoved:
            progress.restarts += 1
    raise SyncError("FetchModel: the model version moved twice during the download")


class _ModelVersionMoved(Exception):
    """A FetchModel page named another model version than the first page."""


class _ModelVersionMovedError(SyncError):
    """The shard answered ABORTED to a page token: the model moved since the first page."""


def _page_or_moved(
    transport: SyncTransport, request: sync_pb2.FetchModelRequest, timeout_seconds: float
) -> sync_pb2.FetchModelResponse:
    """One page; ABORTED on a continuation page means "start over", never "retry this token"."""
    try:
        return transport.fetch_model(request, timeout_seconds)
    except SyncError as exc:
        if request.page_token and exc.code == grpc.StatusCode.ABORTED:
            raise _ModelVersionMovedError(str(exc), code=exc.code, retryable=False) from exc
        raise


def _download_model_once(
    since: int,
    page_size: int,
    call: Callable[[sync_pb2.FetchModelRequest], sync_pb2.FetchModelResponse],
    progress: FetchProgress,
) -> FetchedModel:
    rows: dict[str, tuple[npt.NDArray[np.float32] | None, int]] = {}
    version: int | None = None
    factors = 0
    token = ""
    seen_tokens: set[str] = set()
    for _ in range(_MAX_MODEL_PAGES):
        request = sync_pb2.FetchModelRequest(
            since_model_version=since, page_size=page_size, page_token=token
        )
        response = call(request)
        if not isinstance(response, sync_pb2.FetchModelResponse):
            raise SyncError(f"FetchModel returned {type(response).__name__}")
        progress.pages += 1
        progress.bytes_down += response.ByteSize()
        page_version, page_factors = int(response.model_version), int(response.factors)
        if version is None:
            version, factors = page_version, page_factors
        elif page_version != version:
            raise _ModelVersionMoved
        elif page_factors != factors:
            raise SyncError(f"FetchModel: factor count changed from {factors} to {page_factors}")
        for row, factor in zip(response.rows, _decode_factors(response.rows, factors), strict=True):
            rows.pop(row.content_id, None)  # a repeated id keeps its last copy, in that place
            rows[row.content_id] = (factor, int(row.model_version))
        token = response.next_page_token
        if not token:
            break
        if token in seen_tokens:
            raise SyncError(f"FetchModel returned page token {token!r} twice")
        seen_tokens.add(token)
    else:
        raise SyncError(f"FetchModel did not finish within {_MAX_MODEL_PAGES} pages")
    return FetchedModel(
        model_version=version or 0,
        factors=factors,
        rows=[(cid, factor, v) for cid, (factor, v) in rows.items()],
        since_model_version=since,
        bytes_down=progress.bytes_down,
    )


def _decode_factors(
    rows: Sequence[patterns_pb2.ItemFactorRow], factors: int
) -> list[npt.NDArray[np.float32] | None]:
    """Decode a page of rows; INT8 factors in one vectorized pass (the common case)."""
    int8 = patterns_pb2.EMBEDDING_ENCODING_INT8
    fast = (
        1 <= factors <= MAX_MODEL_FACTORS
        and bool(rows)
        and all(
            r.content_id
            and r.HasField("factor")
            and r.factor.encoding == int8
            and r.factor.dim == factors
            and len(r.factor.data) == factors
            for r in rows
        )
    )
    if not fast:
        return [_decode_factor(row, factors) for row in rows]
    codes = np.frombuffer(b"".join(r.factor.data for r in rows), dtype=np.int8)
    scales = np.fromiter((r.factor.scale for r in rows), dtype=np.float32, count=len(rows))
    matrix = codes.reshape(len(rows), factors).astype(np.float32) * scales[:, None]
    if not (np.all(np.isfinite(matrix)) and np.all(scales >= 0)):
        return [_decode_factor(row, factors) for row in rows]  # names the bad row
    return list(matrix)


def _decode_factor(row: patterns_pb2.ItemFactorRow, factors: int) -> npt.NDArray[np.float32] | None:
    if not row.content_id:
        raise SyncError("FetchModel: a row without a content id")
    if not row.HasField("factor"):
        return None
    if not 1 <= factors <= MAX_MODEL_FACTORS:
        raise SyncError(f"FetchModel: {factors} factors is out of range")
    try:
        return decode_embedding(row.factor, factors)
    except EmbeddingError as exc:
        raise SyncError(f"FetchModel: bad factor for {row.content_id!r}: {exc}") from exc
