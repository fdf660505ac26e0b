"""Cheap change detection of mounted secret files (certificates, keys, tokens).

Kubernetes updates a mounted Secret in place by swapping a symlink to a new directory, and
cert-manager renews certificates that way; a manual ``cp`` rewrites a file in place. Either
way the file's ``os.stat`` (following symlinks) changes: its inode, modification time or
size. `WatchedFiles` compares those stamps, at most once per ``recheck_seconds`` (a
monotonic-time gate), so a caller on a hot path (a TLS handshake, a token check) pays one
clock read per call and a few ``stat`` calls every few seconds.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["FileStamp", "WatchedFiles", "file_stamps"]

FileStamp = tuple[int, int, int] | None
"""(inode, mtime in ns, size) of a file, None when it cannot be stat'ed."""


def file_stamps(paths: Iterable[Path]) -> tuple[FileStamp, ...]:
    """The stamp of each path (following symlinks); None for a missing or unreadable one."""
    stamps: list[FileStamp] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            stamps.append(None)
        else:
            stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(stamps)


class WatchedFiles:
    """Files whose change a caller polls for, at most once per ``recheck_seconds``.

    Create it *before* reading the files: a change made between the stamp and the read is
    then seen by the next poll (and the files read again), never missed.

    Args:
        paths: The files; None entries are skipped (an optional file not configured).
        recheck_seconds: Least time between two ``stat`` rounds.
        clock: Monotonic seconds (tests).
    """

    def __init__(
        self,
        paths: Iterable[Path | None],
        recheck_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not recheck_seconds > 0:
            raise ValueError(f"recheck_seconds must be > 0, got {recheck_seconds!r}")
        self.paths: tuple[Path, ...] = tuple(p for p in paths if p is not None)
        self.recheck_seconds = recheck_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._stamps = file_stamps(self.paths)
        self._next_check = clock() + recheck_seconds

    def changed(self) -> bool:
        """True once per change of the files' stamps (thread-safe).

        Between checks (``recheck_seconds``) it returns False without a system call. A change
        reported is not reported again, whether or not the caller could use the new files: a
        broken file set is acted on (refused, logged) once, and read again when it changes.
        """
        now = self._clock()
        if now < self._next_check:
            return False
        with self._lock:
            if now < self._next_check:
                return False
            self._next_check = now + self.recheck_seconds
            stamps = file_stamps(self.paths)
            if stamps == self._stamps:
                return False
            self._stamps = stamps
            return True
