"""Bring shards whose item-factor model is behind the worker's up to date (whole snapshots).

Model rows only travel with the rounds that change the model, so a shard added later or
restored (empty, or from an old backup) would never get the model once it stops changing, e.g.
when its privacy budget is spent. Every round therefore ends with a catch-up: each shard's
PublishRound answer says which model version it holds (``model_version``); for every shard
below the worker's current version, the worker reads the whole model at that version from a
shard that holds it (FetchModel since 0, paged, on the internal listener) and sends it with
PublishModelSnapshot at the same version, so versions stay consistent across shards. The
shard replaces its model in one transaction; a repeated snapshot is a no-op and an older one
never moves its model backwards, so a retried or resumed round is safe.

A shard that cannot be caught up (down, refusing, or the model too large for one message) is
logged and counted, and tried again the next round: it never fails the round for the others.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
import structlog

from omega.v1 import federation_pb2, federation_pb2_grpc, sync_pb2, sync_pb2_grpc
from omega_common.errors import OmegaError, UnavailableError
from omega_federation import metrics
from omega_federation.rpc import call_shard
from omega_federation.settings import FederationSettings

__all__ = [
    "MAX_SNAPSHOT_BYTES",
    "CatchUpReport",
    "SnapshotTooLargeError",
    "catch_up_models",
    "read_model",
    "shard_model_versions",
]

_log = structlog.get_logger(component="federation")

MAX_SNAPSHOT_BYTES: Final[int] = 63 * 1024 * 1024
"""Largest snapshot sent, in serialized bytes: under the 64 MiB both the worker's channels
send and a shard's internal listener accepts (``INTERNAL_MAX_MESSAGE_BYTES``). 100K items x 64
int8 factors with 12-character ids is 9,500,004 bytes (x 256 factors about 29 MB); read from one
shard and applied by a fresh one, it took 4.2 s end to end on 2 cores (the shard's transaction
about 2.5 s of it). A larger model fails its catch-up (logged) rather than being chunked."""
_PAGE_ROWS: Final[int] = 2000
"""Rows asked per FetchModel page (the shard's cap, ``MAX_MODEL_PAGE``)."""


class SnapshotTooLargeError(OmegaError):
    """The whole model does not fit in one PublishModelSnapshot message (`MAX_SNAPSHOT_BYTES`);
    raised inside the worker only, never sent."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass
class CatchUpReport:
    """What one catch-up did.

    Attributes:
        model_version: The worker's model version the lagging shards were brought to.
        source: The shard the model was read from (None: no shard was behind, or none could
            be read).
        sent: Shards that took the snapshot.
        failed: Shard id -> error, for shards left behind (tried again next round).
        rows: Rows per snapshot; bytes: its serialized size.
    """

    model_version: int = 0
    source: str | None = None
    sent: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    rows: int = 0
    bytes: int = 0

    def figures(self) -> dict[str, Any]:
        """Figures for the round record, its log line and `RoundReport.model`."""
        return {
            "model_snapshots_sent": len(self.sent),
            "model_snapshots_failed": len(self.failed),
            "model_snapshot_shards": sorted(self.sent),
        }


def shard_model_versions(
    responses: Mapping[str, federation_pb2.PublishRoundResponse],
) -> dict[str, int]:
    """Each shard's model version from its PublishRound answer; shards older than the field
    (it is unset) are left out: they cannot take a snapshot either."""
    return {s: r.model_version for s, r in responses.items() if r.HasField("model_version")}


async def read_model(
    stub: sync_pb2_grpc.ConstellationSyncStub,
    version: int,
    settings: FederationSettings,
    what: str,
) -> federation_pb2.PublishModelSnapshotRequest:
    """The whole model at ``version`` from one shard, as a snapshot request.

    Pages FetchModel from ``since_model_version=0`` (every row, removed ones included, each
    with the version that last changed it); each page is retried on UNAVAILABLE.

    Raises:
        UnavailableError: the shard failed, serves another version, or the model changed
            during the fetch (ABORTED).
    """
    snapshot = federation_pb2.PublishModelSnapshotRequest(model_version=version)
    token = ""
    while True:
        request = sync_pb2.FetchModelRequest(
            since_model_version=0, page_size=_PAGE_ROWS, page_token=token
        )
        page: sync_pb2.FetchModelResponse = await call_shard(
            what,
            settings.rpc_attempts,
            functools.partial(stub.FetchModel, request, timeout=settings.rpc_timeout_seconds),
        )
        if page.model_version != version:
            raise UnavailableError(
                f"{what}: serves model version {page.model_version}, not {version}"
            )
        snapshot.factors = page.factors
        snapshot.item_factors.extend(page.rows)
        token = page.next_page_token
        if not token:
            return snapshot


async def _read_from_any(
    channels: Mapping[str, grpc.aio.Channel],
    holders: list[str],
    version: int,
    settings: FederationSettings,
) -> tuple[str, federation_pb2.PublishModelSnapshotRequest]:
    """The model from the first of ``holders`` that serves it whole.

    Raises:
        UnavailableError: none did (the last error), or there is no holder.
    """
    last: UnavailableError = UnavailableError(f"no shard holds model version {version}")
    for shard_id in holders:
        stub = sync_pb2_grpc.ConstellationSyncStub(channels[shard_id])
        try:
            return shard_id, await read_model(stub, version, settings, f"model from {shard_id}")
        except UnavailableError as exc:
            _log.warning("model_source_failed", shard=shard_id, error=str(exc))
            last = exc
    raise last


async def _send(
    shard_id: str,
    channel: grpc.aio.Channel,
    snapshot: federation_pb2.PublishModelSnapshotRequest,
    settings: FederationSettings,
) -> federation_pb2.PublishModelSnapshotResponse:
    stub = federation_pb2_grpc.FederationStub(channel)
    response: federation_pb2.PublishModelSnapshotResponse = await call_shard(
        f"model snapshot to {shard_id}",
        settings.rpc_attempts,
        lambda: stub.PublishModelSnapshot(snapshot, timeout=settings.rpc_timeout_seconds),
    )
    if response.model_version < snapshot.model_version:
        raise UnavailableError(
            f"model snapshot to {shard_id}: still at version {response.model_version}"
        )
    return response


async def catch_up_models(
    channels: Mapping[str, grpc.aio.Channel],
    versions: Mapping[str, int],
    current: int,
    settings: FederationSettings,
) -> CatchUpReport:
    """Send the whole model at version ``current`` to every shard whose version is below it.

    Args:
        channels: Shard id -> channel to its internal listener.
        versions: Shard id -> the model version it holds (`shard_model_versions`).
        current: The worker's model version (`ModelState.version`); 0: no model, nothing to do.
        settings: RPC deadline and attempts.

    Returns:
        Who got it and who did not. Never raises for a shard's failure: each is logged
        (``model_snapshot_failed``) and counted, and the next round tries again.
    """
    report = CatchUpReport(model_version=current)
    behind = sorted(s for s, v in versions.items() if v < current and s in channels)
    for shard_id in sorted(s for s, v in versions.items() if v > current):
        _log.warning(
            "shard_model_ahead", shard=shard_id, shard_version=versions[shard_id], current=current
        )
    if current == 0 or not behind:
        return report
    holders = sorted(s for s, v in versions.items() if v == current and s in channels)
    try:
        report.source, snapshot = await _read_from_any(channels, holders, current, settings)
        report.rows, report.bytes = len(snapshot.item_factors), snapshot.ByteSize()
        if report.bytes > MAX_SNAPSHOT_BYTES:
            raise SnapshotTooLargeError(
                f"model version {current} is {report.bytes} bytes, above the"
                f" {MAX_SNAPSHOT_BYTES} one snapshot may carry"
            )
    except (UnavailableError, SnapshotTooLargeError) as exc:
        for shard_id in behind:
            _failed(report, shard_id, versions[shard_id], exc)
        return report

    async def one(shard_id: str) -> None:
        try:
            response = await _send(shard_id, channels[shard_id], snapshot, settings)
        except UnavailableError as exc:
            _failed(report, shard_id, versions[shard_id], exc)
            return
        report.sent.append(shard_id)
        metrics.MODEL_SNAPSHOTS.labels("sent").inc()
        _log.info(
            "model_snapshot_sent",
            shard=shard_id,
            shard_version=versions[shard_id],
            model_version=response.model_version,
            applied=response.applied,
            rows=report.rows,
            bytes=report.bytes,
            source=report.source,
        )

    await asyncio.gather(*(one(s) for s in behind))
    return report


def _failed(report: CatchUpReport, shard_id: str, version: int, exc: Exception) -> None:
    report.failed[shard_id] = str(exc)
    metrics.MODEL_SNAPSHOTS.labels("failed").inc()
    _log.warning(
        "model_snapshot_failed",
        shard=shard_id,
        shard_version=version,
        model_version=report.model_version,
        error=str(exc),
    )
