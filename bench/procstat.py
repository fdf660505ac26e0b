"""CPU time of processes from /proc, for the benchmarks' "where did the CPU go" columns.

Per-process deltas: a snapshot maps pid -> CPU seconds, and `cpu_between` adds, for every
process alive at the end, what it used since the first snapshot (all of it for a process
started in between). A process that exited in between is not counted (its time is gone from
/proc), so a delta is never negative, at worst an undercount.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cpu_between", "cpu_seconds", "postgres_snapshot", "snapshot"]

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def snapshot(pids: list[int]) -> dict[int, float]:
    """CPU seconds of each of ``pids`` now (absent: gone)."""
    out = {}
    for pid in pids:
        value = cpu_seconds(pid)
        if value or Path(f"/proc/{pid}").exists():
            out[pid] = value
    return out


def postgres_snapshot() -> dict[int, float]:
    """CPU seconds of every process named postgres (server, backends, WAL writer, ...)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == "postgres":
                pids.append(int(entry.name))
        except OSError:
            continue
    return snapshot(pids)


def cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two snapshots by the processes of ``after`` (>= 0)."""
    return sum(max(0.0, value - before.get(pid, 0.0)) for pid, value in after.items())
