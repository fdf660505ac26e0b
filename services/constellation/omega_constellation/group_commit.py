"""Group commit: concurrent syncs coalesced into one transaction per batch.

Each SyncPatterns call submits its validated delta and waits; a dispatcher forms batches
from the queue and runs each as one `ShardStore.apply_batch` transaction. A caller is
answered only after its batch commits.

Batches run one at a time while they are quick: while a batch runs, the queue fills, and the
next batch takes everything queued (up to ``max_batch``), so batches grow with the load and
commits per second stay bounded (the classic group commit of databases). Measured with
``make bench-sync``: one batch at a time applies the most syncs per second, because each
extra concurrent transaction splits the queue into smaller batches. A batch that has run
longer than ``slow_batch_seconds`` (waiting on a row lock, a slow disk) no longer counts:
the next batch starts beside it, up to ``max_concurrent_batches``, so one slow batch does not
hold the others hostage.

Ordering: a batch holds at most one delta per device, and a device with a delta in a running
batch gets none in another batch until that one ends; deltas of one device leave the queue
in arrival order. So a batch never holds two versions of one device, and the store's
exactly-once rules (per device and local version, under the device row's lock) are the same
as with one transaction per sync.

With ``max_wait_seconds`` > 0 a batch smaller than ``max_batch`` first waits that long for
more deltas (off by default: under load batches grow by themselves).

Bounded: past ``max_pending`` queued deltas a submission is refused with
`ResourceExhaustedError` at once, instead of waiting for the pool to time out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import asyncpg

from omega_common.errors import InvalidArgumentError, ResourceExhaustedError
from omega_constellation import metrics
from omega_constellation.converters import ValidatedDelta
from omega_constellation.store import SyncOutcome

__all__ = ["ApplyBatch", "GroupCommitter"]

ApplyBatch = Callable[
    [Sequence[ValidatedDelta]], Awaitable[list[SyncOutcome | InvalidArgumentError]]
]
"""Applies deltas of distinct devices in one transaction (`ShardStore.apply_batch`)."""

_RETRIED = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
_ATTEMPTS = 3


@dataclass(eq=False)
class _Item:
    delta: ValidatedDelta
    future: asyncio.Future[SyncOutcome] = field(repr=False)
    queued_at: float


class GroupCommitter:
    """Queues validated deltas and applies them in batches (see the module docstring)."""

    def __init__(
        self,
        apply_batch: ApplyBatch,
        *,
        max_batch: int = 256,
        max_wait_seconds: float = 0.0,
        max_pending: int = 4096,
        max_concurrent_batches: int = 4,
        slow_batch_seconds: float = 0.05,
    ) -> None:
        """Args:
        apply_batch: The transaction of one batch.
        max_batch: Most deltas per batch (>= 1).
        max_wait_seconds: How long a batch smaller than ``max_batch`` waits for more once
            a slot is free (0: never; batches still grow under load).
        max_pending: Most deltas queued (not yet in a running batch); past it, refused.
        max_concurrent_batches: Batches running at once, at most (each holds one
            connection).
        slow_batch_seconds: A batch running longer than this lets the next one start beside
            it (while fewer than ``max_concurrent_batches`` run).
        """
        if max_batch < 1 or max_pending < 1 or max_concurrent_batches < 1:
            raise ValueError("max_batch, max_pending and max_concurrent_batches must be >= 1")
        self._apply = apply_batch
        self._max_batch = max_batch
        self._max_wait = max(0.0, max_wait_seconds)
        self._max_pending = max_pending
        self._slots = max_concurrent_batches
        self._queue: deque[_Item] = deque()
        self._busy: set[str] = set()  # devices with a delta in a running batch
        self._running: dict[asyncio.Task[None], float] = {}  # task -> start (monotonic)
        self._slow = max(0.0, slow_batch_seconds)
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._closed = False
        self._batch_seconds = 0.01  # moving average of a batch's duration

    def _drain_seconds(self) -> float:
        """About how long the queue takes to drain at the recent batch duration (the hint)."""
        batches = len(self._queue) / self._max_batch
        return min(5.0, max(0.05, batches * self._batch_seconds))

    @property
    def pending(self) -> int:
        """Deltas queued, not yet in a running batch."""
        return len(self._queue)

    async def submit(self, delta: ValidatedDelta) -> SyncOutcome:
        """Queue ``delta`` and wait until its batch has committed.

        Raises:
            ResourceExhaustedError: ``max_pending`` deltas are already queued (nothing
                queued; the client retries later).
            InvalidArgumentError: the store refused this delta (see
                `ShardStore.apply_batch`); nothing of it was written.
            asyncpg.PostgresError, OSError: the batch's transaction failed; nothing of it
                was written.
            RuntimeError: the committer is closed.
        """
        if self._closed:
            raise RuntimeError("the group committer is closed")
        if len(self._queue) >= self._max_pending:
            metrics.SYNC_BATCH_REFUSED.inc()
            raise ResourceExhaustedError(
                f"{len(self._queue)} syncs are queued for the database; retry later",
                self._drain_seconds(),
            )
        loop = asyncio.get_running_loop()
        item = _Item(delta, loop.create_future(), time.monotonic())
        self._queue.append(item)
        if self._dispatcher is None:
            self._dispatcher = asyncio.create_task(self._dispatch())
        self._wake.set()
        return await item.future

    async def close(self) -> None:
        """Stop taking deltas; running batches finish, queued ones fail with RuntimeError."""
        self._closed = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        if self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(RuntimeError("the server is shutting down"))

    async def _dispatch(self) -> None:
        while True:
            wait = self._free_slot_in()
            if wait is None or not self._queue:
                await self._wake.wait()
                self._wake.clear()
                continue
            if wait > 0:
                # Every running batch is young: wait until the youngest turns slow (or
                # something finishes or arrives).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                self._wake.clear()
                continue
            if self._max_wait > 0 and len(self._queue) < self._max_batch:
                left = self._queue[0].queued_at + self._max_wait - time.monotonic()
                if left > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._filled(), left)
            batch = self._take()
            if not batch:
                # Every queued delta waits for its device's running batch.
                await self._wake.wait()
                self._wake.clear()
                continue
            task = asyncio.create_task(self._run(batch))
            self._running[task] = time.monotonic()
            task.add_done_callback(self._finished)

    def _free_slot_in(self) -> float | None:
        """Seconds until a batch may start (0: now), or None while every slot is taken."""
        if not self._running:
            return 0.0
        if len(self._running) >= self._slots:
            return None
        youngest = max(self._running.values())
        return max(0.0, youngest + self._slow - time.monotonic())

    async def _filled(self) -> None:
        while len(self._queue) < self._max_batch:
            self._wake.clear()
            await self._wake.wait()

    def _take(self) -> list[_Item]:
        """Up to ``max_batch`` queued deltas of distinct, idle devices, in arrival order."""
        batch: list[_Item] = []
        kept: deque[_Item] = deque()
        taken: set[str] = set()
        while self._queue:
            item = self._queue.popleft()
            if item.future.done():  # the caller went away (deadline, cancellation)
                continue
            device = item.delta.device_id
            if len(batch) >= self._max_batch or device in self._busy or device in taken:
                kept.append(item)
                continue
            taken.add(device)
            batch.append(item)
        self._queue = kept
        self._busy |= taken
        return batch

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._wake.set()

    async def _run(self, batch: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            for attempt in range(_ATTEMPTS):
                try:
                    results = await self._apply([i.delta for i in batch])
                    break
                except _RETRIED:
                    # Another replica's batch took the same rows in another order (or a
                    # serialization failure): the whole transaction rolled back; run it again.
                    if attempt == _ATTEMPTS - 1:
                        raise
        except BaseException as exc:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            for item, result in zip(batch, results, strict=True):
                if item.future.done():
                    continue
                if isinstance(result, InvalidArgumentError):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)
        finally:
            self._busy.difference_update(i.delta.device_id for i in batch)
            seconds = time.perf_counter() - started
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
            metrics.SYNC_BATCH_SIZE.observe(len(batch))
            metrics.SYNC_BATCH_SECONDS.observe(seconds)
