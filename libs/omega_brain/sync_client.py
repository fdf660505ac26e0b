"""The sync client: the brain's conversation with its shard.

`SyncClient.sync` pushes the pattern delta and pulls global patterns and trends (see
`Brain.sync` for the rules): it honours the shard's pace, learns the device's last version
on the shard before a new store's first delta, settles a send whose answer was lost before
numbering newer changes, retries retryable errors, and fetches the collaborative model when
the shard names a newer one. A redirect leaves the store as a new store of a known device
(`SyncClient._forget_server_state`), so the next shard receives every pattern.
`fetch_catalog` downloads catalog changes and `forget_on_shard` erases the device on the
shard. What a request carries and how an answer is booked is
`omega_brain.sync_delta`; the network part of every call runs without ``ctx.lock`` but under
``ctx.sync_lock``.
"""

from __future__ import annotations

import base64
import json

import grpc
from google.protobuf.message import DecodeError

from omega.v1 import patterns_pb2, sync_pb2
from omega_brain.context import BrainContext
from omega_brain.errors import BrainError, StoreError, SyncError
from omega_brain.models import SyncResult
from omega_brain.sync_delta import (
    MAX_ADOPTED_VERSION,
    Sent,
    apply_model,
    apply_response,
    build_request,
)
from omega_brain.transport import (
    FetchedModel,
    FetchProgress,
    RetryOutcome,
    SyncTransport,
    call_with_retries,
    download_model,
    fetch_catalog,
)
from omega_protocol import encode_payload

__all__ = ["SyncClient"]

_REFUSED_BEFORE_WRITING = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.NOT_FOUND,
    }
)
"""Answers the shard gives before writing anything: the send needs no settling."""


class SyncClient:
    """Talks to the shard for one brain (see the module docstring).

    Args:
        ctx: the brain's shared state.
        transport: how to reach the shard, or None (offline: `sync` and `fetch_catalog`
            raise `BrainError`, `forget_on_shard` does nothing).
    """

    def __init__(self, ctx: BrainContext, transport: SyncTransport | None) -> None:
        self._ctx = ctx
        self._transport = transport

    def require_transport(self) -> SyncTransport:
        """The transport; raises `BrainError` when none is configured."""
        if self._transport is None:
            raise BrainError("no transport configured: pass transport= to Brain")
        return self._transport

    def sync(self) -> SyncResult:
        """One sync (see `Brain.sync`)."""
        transport = self.require_transport()
        cfg = self._ctx.config
        with self._ctx.sync_lock:
            paced = self._paced_result()
            if paced is not None:
                return paced
            if not self._ctx.state["server_version_known"] and self._ctx.state["local_version"] > 0:
                failed = self._learn_server_version(transport)
                if failed is not None:
                    return failed
            failed = self._settle_unconfirmed(transport)
            if failed is not None:
                return failed
            with self._ctx.lock:
                self._ctx.check_open()
                request, sent = build_request(self._ctx)
            if sent.local_version > 0:
                # Write-ahead: recorded before it is sent, so that a device killed after the
                # shard applied it but before the answer was stored settles it (sends it
                # again, a duplicate for the shard) instead of counting its views twice
                # under a newer version.
                self._record_unconfirmed(request, sent)
            patterns_sent = len(sent.patterns)
            outcome = RetryOutcome()
            try:
                response = call_with_retries(
                    lambda: transport.sync_patterns(request, cfg.timeout_seconds),
                    **self._ctx.retry_policy(),
                    outcome=outcome,
                )
            except SyncError as exc:
                code = f" [{exc.code.name}]" if exc.code is not None else ""
                message = f"{exc}{code} after {outcome.attempts} attempt(s)"
                if exc.code in _REFUSED_BEFORE_WRITING:
                    self._clear_unconfirmed()  # refused before anything was written
                return self._sync_failed(request, sent, outcome, patterns_sent, message, 0, None)
            if not isinstance(response, sync_pb2.SyncPatternsResponse):
                return self._sync_failed(
                    request,
                    sent,
                    outcome,
                    patterns_sent,
                    "transport returned a non-response",
                    0,
                    None,
                )
            bytes_down = response.ByteSize()
            if response.redirect_shard_id:
                self._forget_server_state()  # nothing was applied; the next shard starts anew
                message = f"device belongs to shard {response.redirect_shard_id!r}"
                return self._sync_failed(
                    request,
                    sent,
                    outcome,
                    patterns_sent,
                    message,
                    bytes_down,
                    response.redirect_shard_id,
                )
            with self._ctx.lock:
                self._ctx.check_open()
                received, error = apply_response(self._ctx, sent, response)
                # Booked (or, when the shard acknowledged less, to be sent again with the
                # newer changes): either way no longer in doubt. A kill just before this
                # leaves a record at or below the acknowledged version, which is dropped.
                self._ctx.store.set_unconfirmed_send(None)
                since_model = self._ctx.state["model_version"]
            fetched_rows, model_bytes, model_error = 0, 0, None
            if error is None and int(response.model_version) > since_model:
                fetched_rows, model_bytes, model_error = self._update_model(transport, since_model)
            with self._ctx.lock:
                self._ctx.check_open()
                return SyncResult(
                    ok=error is None,
                    attempts=outcome.attempts,
                    bytes_up=request.ByteSize(),
                    bytes_down=bytes_down,
                    latency_seconds=outcome.last_latency_seconds,
                    acknowledged_version=self._ctx.state["acked_version"],
                    global_version=self._ctx.state["global_version"],
                    patterns_sent=patterns_sent,
                    global_patterns_received=received,
                    error=error,
                    server_pattern_count=response.patterns_stored,
                    model_version=self._ctx.state["model_version"],
                    model_update_sent=sent.model_update_version is not None,
                    model_rows_received=fetched_rows,
                    model_bytes_down=model_bytes,
                    model_error=model_error,
                    next_sync_at_ms=self._ctx.state["next_sync_at_ms"],
                )

    def _paced_result(self) -> SyncResult | None:
        """The result of a call made before the shard's requested time, else None."""
        with self._ctx.lock:
            self._ctx.check_open()
            due = int(self._ctx.state["next_sync_at_ms"])
            if not self._ctx.config.honour_sync_pace or due <= 0:
                return None
            wait_ms = due - self._ctx.now_ms()
            if wait_ms <= 0 or wait_ms > self._ctx.config.max_sync_pause_seconds * 1000.0:
                return None  # due, or a clock that went backwards: sync now
            return SyncResult(
                ok=False,
                attempts=0,
                bytes_up=0,
                bytes_down=0,
                latency_seconds=0.0,
                acknowledged_version=self._ctx.state["acked_version"],
                global_version=self._ctx.state["global_version"],
                patterns_sent=0,
                global_patterns_received=0,
                error=f"paced: the shard asked for the next sync in {wait_ms} ms",
                model_version=self._ctx.state["model_version"],
                paced=True,
                next_sync_at_ms=due,
            )

    def forget_on_shard(self) -> bool:
        """Erase the device's data on its shard (``ForgetDevice``, retried like a sync);
        called under ``ctx.sync_lock``.

        Returns:
            True when the shard held data for the device (False: nothing there, or offline).

        Raises:
            SyncError: the shard could not be reached or refused.
        """
        forgotten = False
        if self._transport is not None:
            transport = self._transport
            forget = getattr(transport, "forget_device", None)
            if forget is None:
                raise SyncError("the transport cannot forget devices (no forget_device)")
            request = sync_pb2.ForgetDeviceRequest(device_id=self._ctx.device_id)
            response = call_with_retries(
                lambda: forget(request, self._ctx.config.timeout_seconds),
                **self._ctx.retry_policy(),
                outcome=RetryOutcome(),
            )
            forgotten = bool(getattr(response, "forgotten", False))
        return forgotten

    def _record_unconfirmed(self, request: sync_pb2.SyncPatternsRequest, sent: Sent) -> None:
        """Keep a send whose outcome is unknown (the shard may have applied it, its answer
        lost), so that the next sync settles it before numbering newer changes: views and
        added samples are increments, and sending them again in a newer delta would count
        them twice."""
        record = {
            "request": base64.b64encode(request.SerializeToString()).decode("ascii"),
            "local_version": sent.local_version,
            "patterns": sent.patterns,
            "views": sent.views,
            "model_update_version": sent.model_update_version,
            "model_update_items": sent.model_update_items,
        }
        with self._ctx.lock:
            if not self._ctx.closed:
                self._ctx.store.set_unconfirmed_send(json.dumps(record))

    def _forget_server_state(self) -> None:
        """After a redirect: forget what this brain knew of its shard, in one transaction.

        The replica applied nothing (the unconfirmed send is dropped), and the device's next
        shard may know nothing of it (a shard added, or removed and its devices handed back),
        so the store is left as a new store of a known device: ``server_version_known`` 0
        (the next sync first pulls to learn that shard's last version for the device, see
        `_learn_server_version`), every acknowledgement cleared and ``acked_version`` 0 (the
        next delta, from base 0, carries every pattern, numbered past that version), and the
        model update to be sent again (``model_update_version`` -1), as after a factory reset.
        View counts the old shard acknowledged were removed from the pending views when it
        acknowledged them, so they are not sent again; pending ones are sent as usual. A
        partly received global-pattern transfer restarts. Nothing grows: a device redirected
        on every call (two shards with mismatched maps) only rewrites these values and counts
        ``syncs_redirected``; re-sending is what the next accepted sync does.
        """
        with self._ctx.lock:
            if self._ctx.closed:
                return
            updates = {
                "server_version_known": 0,
                "acked_version": 0,
                "model_update_version": -1,
                "model_update_items": 0,
                "global_page_version": 0,
                "global_page_offset": 0,
                "syncs_redirected": self._ctx.state["syncs_redirected"] + 1,
            }
            with self._ctx.store.transaction():
                self._ctx.store.set_unconfirmed_send(None)
                self._ctx.store.clear_acked()
                self._ctx.store.set_state(updates)
            self._ctx.state.update(updates)

    def _clear_unconfirmed(self) -> None:
        with self._ctx.lock:
            if not self._ctx.closed:
                self._ctx.store.set_unconfirmed_send(None)

    def _settle_unconfirmed(self, transport: SyncTransport) -> SyncResult | None:
        """Send the recorded unconfirmed request again, unchanged (the shard applies a
        ``(device, version)`` once), and book its answer as its own (called in `sync`).

        Returns:
            None when there was nothing to settle or it is settled; a failed `SyncResult`
            when the shard cannot be reached (the record is kept for the next sync).
        """
        with self._ctx.lock:
            self._ctx.check_open()
            text = self._ctx.store.unconfirmed_send()
        if text is None:
            return None
        try:
            record = json.loads(text)
            request = sync_pb2.SyncPatternsRequest.FromString(base64.b64decode(record["request"]))
            sent = Sent(
                int(record["local_version"]),
                [(str(p), int(n)) for p, n in record["patterns"]],
                {str(c): int(v) for c, v in record["views"].items()},
                None
                if record["model_update_version"] is None
                else int(record["model_update_version"]),
                int(record["model_update_items"]),
            )
        except (ValueError, KeyError, TypeError, DecodeError):
            sent = None  # unreadable: drop it (its changes are re-sent as not acknowledged)
        if sent is None or sent.local_version <= self._ctx.state["acked_version"]:
            with self._ctx.lock:
                self._ctx.store.set_unconfirmed_send(None)
            return None
        outcome = RetryOutcome()
        try:
            response = call_with_retries(
                lambda: transport.sync_patterns(request, self._ctx.config.timeout_seconds),
                **self._ctx.retry_policy(),
                outcome=outcome,
            )
        except SyncError as exc:
            if exc.code in _REFUSED_BEFORE_WRITING:
                with self._ctx.lock:
                    self._ctx.store.set_unconfirmed_send(None)
                return None
            code = f" [{exc.code.name}]" if exc.code is not None else ""
            message = f"settling the unconfirmed send: {exc}{code}"
            return self._sync_failed(request, sent, outcome, len(sent.patterns), message, 0, None)
        with self._ctx.lock:
            self._ctx.check_open()
            if isinstance(response, sync_pb2.SyncPatternsResponse) and (
                not response.redirect_shard_id
            ):
                apply_response(self._ctx, sent, response)
            self._ctx.store.set_unconfirmed_send(None)
        return None

    def _learn_server_version(self, transport: SyncTransport) -> SyncResult | None:
        """Before this store's first delta (or the first after a redirect), ask the shard
        for the device's last version.

        A pull (version 0, empty delta) writes nothing; its answer acknowledges the last
        version the shard applied for this device id. A new store of a device the shard
        knows (factory reset) numbers its changes past it, so they are applied rather than
        taken for duplicates, and the patterns it learns replace the old ones. Called in
        `sync` under the sync lock.

        Returns:
            None when learned (or nothing to learn); a failed `SyncResult` otherwise.
        """
        cfg = self._ctx.config
        request = sync_pb2.SyncPatternsRequest(
            device_id=self._ctx.device_id,
            local_version=0,
            since_global_version=self._ctx.state["global_version"],
            delta=encode_payload(patterns_pb2.PatternDelta(), compress=False),
        )
        outcome = RetryOutcome()
        try:
            response = call_with_retries(
                lambda: transport.sync_patterns(request, cfg.timeout_seconds),
                **self._ctx.retry_policy(),
                outcome=outcome,
            )
        except SyncError as exc:
            code = f" [{exc.code.name}]" if exc.code is not None else ""
            message = f"{exc}{code} after {outcome.attempts} attempt(s)"
            empty = Sent(0, [], {}, None, 0)
            return self._sync_failed(request, empty, outcome, 0, message, 0, None)
        if not isinstance(response, sync_pb2.SyncPatternsResponse) or response.redirect_shard_id:
            return None  # the real sync reports the redirect (or the bad transport)
        last = int(response.acknowledged_version)
        with self._ctx.lock:
            self._ctx.check_open()
            updates = {"server_version_known": 1}
            if self._ctx.state["acked_version"] < last <= MAX_ADOPTED_VERSION:
                # The shard applied versions this store never saw acknowledged: re-send
                # everything, numbered past them.
                updates["local_version"] = max(self._ctx.state["local_version"], last) + 1
                updates["acked_version"] = 0
                updates["model_update_version"] = -1
                updates["model_update_items"] = 0
            with self._ctx.store.transaction():
                if "acked_version" in updates:
                    self._ctx.store.clear_acked()
                self._ctx.store.set_state(updates)
            self._ctx.state.update(updates)
        return None

    def _update_model(self, transport: SyncTransport, since: int) -> tuple[int, int, str | None]:
        """Fetch and apply the model rows changed since ``since`` (called in `sync`, without
        the brain lock); returns (rows applied, bytes received, error or None).

        A fetch answering another factor count than the stored model's cannot be applied as
        a change: the whole model is fetched again and replaces it.
        """
        cfg = self._ctx.config
        progress = FetchProgress()

        def fetch(since_version: int) -> FetchedModel:
            return download_model(
                transport,
                since_model_version=since_version,
                page_size=cfg.model_page_size,
                timeout_seconds=cfg.timeout_seconds,
                **self._ctx.retry_policy(),
                progress=progress,
            )

        rows = 0
        error: str | None = None
        try:
            fetched = fetch(since)
            if since > 0 and fetched.factors not in (0, self._ctx.state["model_factors"]):
                fetched = fetch(0)
            with self._ctx.lock:
                self._ctx.check_open()
                rows = apply_model(self._ctx, fetched)
        except SyncError as exc:  # also a transport without fetch_model (wrapped as one)
            code = f" [{exc.code.name}]" if exc.code is not None else ""
            error = f"model not updated: {exc}{code}"
        except StoreError as exc:  # rolled back; the sync's own writes are already committed
            error = f"model not updated: {exc}"
        with self._ctx.lock:
            if not self._ctx.closed and progress.bytes_down:
                total = self._ctx.state["model_bytes_down"] + progress.bytes_down
                self._ctx.store.set_state({"model_bytes_down": total})
                self._ctx.state["model_bytes_down"] = total
        return rows, progress.bytes_down, error

    def _sync_failed(
        self,
        request: sync_pb2.SyncPatternsRequest,
        sent: Sent,
        outcome: RetryOutcome,
        patterns_sent: int,
        error: str,
        bytes_down: int,
        redirect: str | None,
    ) -> SyncResult:
        with self._ctx.lock:
            if not self._ctx.closed:
                failed = self._ctx.state["syncs_failed"] + 1
                self._ctx.store.set_state({"syncs_failed": failed})
                self._ctx.state["syncs_failed"] = failed
            return SyncResult(
                ok=False,
                attempts=outcome.attempts,
                bytes_up=request.ByteSize(),
                bytes_down=bytes_down,
                latency_seconds=outcome.last_latency_seconds,
                acknowledged_version=self._ctx.state["acked_version"],
                global_version=self._ctx.state["global_version"],
                patterns_sent=patterns_sent,
                global_patterns_received=0,
                error=error,
                redirect_shard_id=redirect,
                model_version=self._ctx.state["model_version"],
                model_update_sent=sent.model_update_version is not None,
                next_sync_at_ms=self._ctx.state["next_sync_at_ms"],
            )

    def fetch_catalog(self) -> int:
        """Download catalog changes and apply them (see `Brain.fetch_catalog`)."""
        transport = self.require_transport()
        cfg = self._ctx.config
        with self._ctx.sync_lock:
            with self._ctx.lock:
                self._ctx.check_open()
                since = self._ctx.state["catalog_version"]  # > 0 only after a stored fetch
            fetched = fetch_catalog(
                transport,
                page_size=cfg.catalog_page_size,
                since_catalog_version=since,
                timeout_seconds=cfg.timeout_seconds,
                **self._ctx.retry_policy(),
            )
            with self._ctx.lock:
                self._ctx.check_open()
                version = max(fetched.catalog_version, since)
                current = self._ctx.catalog
                if not fetched.content_ids and self._ctx.owns_catalog and current is not None:
                    self._ctx.store.set_state({"catalog_version": version})
                    self._ctx.state["catalog_version"] = version
                    return len(current)
                if not fetched.content_ids:
                    return len(current) if current is not None else 0
                # Since version 0 the answer is the whole catalog; later, only changes.
                apply = self._ctx.keeper.upsert if since else self._ctx.keeper.replace
                index = apply(
                    fetched.content_ids,
                    fetched.embeddings,
                    fetched.titles,
                    fetched.genres,
                    catalog_version=version,
                )
                self._ctx.state["catalog_version"] = version
                self._ctx.set_catalog(index)
                return len(index)
