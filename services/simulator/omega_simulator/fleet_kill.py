"""The ``kill`` fault: a shard replica SIGKILLed at a window's start and restarted at its end.

`ReplicaKills` plays a scenario's ``kill`` faults on the run's timeline (wall seconds from the
run's start, set with `ReplicaKills.begin`, as the fault proxy's) against anything that can
kill and restart a shard replica: `omega_simulator.stack.LocalStack` for ``--local`` runs.
Each fault gets a thread of its own; each records what happened and when, so the report can
say how long the replica was really down (kill to SERVING again).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from omega_simulator.fleet_scenario import Fault

__all__ = ["ReplicaKiller", "ReplicaKills"]

_RESTART_JOIN_SECONDS = 90.0


class ReplicaKiller(Protocol):
    """What `ReplicaKills` needs of a stack (`omega_simulator.stack.LocalStack` has it)."""

    def kill_shard(self, shard_id: str, replica: int = 0) -> int:
        """SIGKILL a replica; returns its pid."""
        ...

    def restart_shard(self, shard_id: str, replica: int = 0, *, wait: bool = True) -> int:
        """Start it again and wait until it is SERVING; returns the new pid."""
        ...


class ReplicaKills:
    """The scenario's ``kill`` faults against ``stack``.

    Args:
        stack: kills and restarts the replicas.
        faults: the ``kill`` faults (others are ignored).
        shards: the shard ids (a fault without ``shard`` applies to each).
    """

    def __init__(self, stack: ReplicaKiller, faults: Sequence[Fault], shards: Iterable[str]):
        self.stack = stack
        self._plan = [
            (f, shard_id)
            for f in faults
            if f.kind == "kill"
            for shard_id in ([f.shard] if f.shard is not None else sorted(shards))
        ]
        self._events: list[dict[str, Any]] = [
            {
                "label": f.label(),
                "shard": shard_id,
                "replica": f.replica or 0,
                "planned_seconds": [f.start_seconds, f.end_seconds],
                "killed_at_seconds": None,
                "killed_pid": None,
                "restarted_at_seconds": None,
                "serving_at_seconds": None,
                "pid": None,
                "error": None,
            }
            for f, shard_id in self._plan
        ]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._origin = 0.0

    def begin(self, origin_wall: float) -> None:
        """Start the timeline at ``origin_wall`` (``time.time()`` of the run's start)."""
        self._origin = origin_wall
        for n in range(len(self._plan)):
            thread = threading.Thread(
                target=self._play, args=(n,), name=f"replica-kill-{n}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _now(self) -> float:
        return time.time() - self._origin

    def _play(self, n: int) -> None:
        fault, shard_id = self._plan[n]
        event = self._events[n]
        replica = fault.replica or 0
        if self._stop.wait(max(0.0, fault.start_seconds - self._now())):
            return  # the run ended before the window
        try:
            event["killed_at_seconds"] = round(self._now(), 3)
            event["killed_pid"] = self.stack.kill_shard(shard_id, replica)
            # a run ending early restarts it at once: the stack stops what it started
            self._stop.wait(max(0.0, fault.end_seconds - self._now()))
            event["restarted_at_seconds"] = round(self._now(), 3)
            event["pid"] = self.stack.restart_shard(shard_id, replica, wait=True)
            event["serving_at_seconds"] = round(self._now(), 3)
        except Exception as exc:  # reported in the run's report, not raised
            event["error"] = f"{type(exc).__name__}: {exc}"

    def stop(self) -> None:
        """End the timeline: replicas still down are restarted now; waits for the threads."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=_RESTART_JOIN_SECONDS)
        self._threads.clear()

    def events(self) -> list[dict[str, Any]]:
        """Per kill: planned window, when it was killed (pid), restarted, SERVING again (run
        seconds), the new pid, and an error if the kill or the restart failed."""
        return [dict(e) for e in self._events]
