"""Which global patterns a replica must hold so that every sync answer stays what it would be.

A sync answer for a device at global version ``since`` sends the first
``max_global_patterns_per_sync`` (K) patterns, best quality first, whose round is above
``since``. A pattern is sent by some answer if and only if fewer than K better patterns have a
round at least its own (the answer for ``since = its round - 1`` is the most favourable to it).
Every other pattern can be dropped without changing any answer. Streaming the patterns best
first, `SyncAnswerFilter` keeps exactly those, in O(log rounds) per pattern, and says when no
later (worse) pattern can be kept any more: once K patterns of the newest round were seen, or
once the held bound is reached (best first: the answer to a new device, ``since = 0``, is kept
whole as long as the bound is at least K).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

__all__ = ["SyncAnswerFilter", "patterns_for_sync"]


class _HasRound(Protocol):
    @property
    def round(self) -> int: ...


R = TypeVar("R", bound=_HasRound)


class SyncAnswerFilter:
    """Decides, for patterns offered best first, which some sync answer sends."""

    def __init__(self, rounds: Iterable[int], per_sync: int, max_held: int | None = None) -> None:
        """Args:
        rounds: every round the offered patterns can have (distinct or not).
        per_sync: patterns one sync answer sends at most (K, >= 0).
        max_held: stop keeping after this many (None: no bound).
        """
        ordered = sorted(set(rounds), reverse=True)
        self._position = {r: i + 1 for i, r in enumerate(ordered)}  # 1-based, newest first
        self._tree = [0] * (len(ordered) + 1)  # Fenwick tree: prefix = rows of newer rounds
        self._per_sync = per_sync
        self._max_held = max_held
        self._held = 0
        self._newest_seen = 0
        self._done = per_sync <= 0 or max_held == 0 or not ordered

    @property
    def done(self) -> bool:
        """True when no pattern offered from now on (a worse one) can be kept."""
        return self._done

    def offer(self, round_: int) -> bool:
        """Whether to keep the next pattern (the best one not offered yet) of round ``round_``.

        Raises:
            KeyError: ``round_`` was not among ``rounds``.
        """
        if self._done:
            return False
        i = self._position[round_]
        newer_or_same, j = 0, i
        while j > 0:
            newer_or_same += self._tree[j]
            j -= j & -j
        j = i
        while j < len(self._tree):
            self._tree[j] += 1
            j += j & -j
        if i == 1:
            self._newest_seen += 1
            if self._newest_seen >= self._per_sync:
                self._done = True  # every later pattern has K better ones at least as new
        keep = newer_or_same < self._per_sync
        if keep:
            self._held += 1
            if self._max_held is not None and self._held >= self._max_held:
                self._done = True
        return keep


def patterns_for_sync(rows: Sequence[R], per_sync: int, max_held: int | None = None) -> list[R]:
    """The rows (best first) some sync answer sends, at most ``max_held`` of them, in order."""
    selector = SyncAnswerFilter((r.round for r in rows), per_sync, max_held)
    kept: list[R] = []
    for row in rows:
        if selector.done:
            break
        if selector.offer(row.round):
            kept.append(row)
    return kept
