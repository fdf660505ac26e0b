"""The on-device learning rule: pure functions over one context bucket's pattern.

A device keeps one pattern per context bucket (time slot x day type, see
`omega_protocol.context`). Each viewing is classified by its completion:

* success (completion >= 0.8): the pattern embedding moves toward the content embedding as a
  running mean, ``e <- normalize(e + step * (c - e))`` with ``step = max(1 / (s + 1), min_step)``
  where ``s`` is the number of successes *before* this one. The first success therefore has
  step 1 and creates the pattern exactly at the content embedding; later ones average it in,
  and ``min_step`` keeps a long-lived pattern able to follow a change of taste.
* failure (completion < 0.2): the embedding moves slightly away,
  ``e <- normalize(e - failure_step * c)``. For unit ``e`` and ``c`` the norm before
  renormalizing is at least ``1 - failure_step >= 0.5``, so this is always well defined.
* neutral (anything in between): the embedding does not move.

Every event counts in ``sample_count``. A bucket whose first events are failures or neutral keeps
its counts but has no embedding (there is nothing to move away from) until its first success;
such a pattern is neither synced nor used for recommendations, and the earlier failures still
lower its success rate once the embedding exists.

The success rate uses Laplace smoothing (the rule of succession):
``(successes + 1) / (successes + failures + 2)``. It is 0.5 with no evidence, always strictly
inside (0, 1), and one lucky viewing cannot claim a perfect 1.0.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

__all__ = [
    "Outcome",
    "PatternState",
    "apply_event",
    "classify",
    "normalize",
    "success_rate",
]

_EPS = 1e-12


class Outcome(enum.IntEnum):
    """How a viewing counts for learning (stored as this int in the events table)."""

    NEUTRAL = 0
    SUCCESS = 1
    FAILURE = 2


def classify(
    completion: float, success_completion: float = 0.8, failure_completion: float = 0.2
) -> Outcome:
    """Classify a viewing by the fraction watched.

    Args:
        completion: fraction of the content watched, in [0, 1].
        success_completion: completion >= this is a success.
        failure_completion: completion < this is a failure.
    """
    if completion >= success_completion:
        return Outcome.SUCCESS
    if completion < failure_completion:
        return Outcome.FAILURE
    return Outcome.NEUTRAL


def success_rate(successes: int, failures: int) -> float:
    """Laplace-smoothed success rate ``(successes + 1) / (successes + failures + 2)``, in (0, 1)."""
    return (successes + 1) / (successes + failures + 2)


def normalize(vector: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """L2-normalize along the last axis.

    Args:
        vector: (d,) or (n, d) float array.

    Returns:
        float32 array of the same shape; rows with (near) zero norm are returned as zeros.
    """
    x = np.asarray(vector, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(norm > _EPS, x / np.maximum(norm, _EPS), 0.0).astype(np.float32)


@dataclass(frozen=True, slots=True)
class PatternState:
    """The learnable part of one bucket's pattern.

    Attributes:
        embedding: (384,) float32 unit vector, or None before the bucket's first success.
        successes: viewings with completion >= the success threshold.
        failures: viewings with completion < the failure threshold.
        neutral: the other viewings.
    """

    embedding: npt.NDArray[np.float32] | None = None
    successes: int = 0
    failures: int = 0
    neutral: int = 0

    @property
    def sample_count(self) -> int:
        """Every observed viewing in the bucket."""
        return self.successes + self.failures + self.neutral

    @property
    def success_rate(self) -> float:
        """Laplace-smoothed success rate in (0, 1); see `success_rate`."""
        return success_rate(self.successes, self.failures)


def apply_event(
    state: PatternState,
    content: npt.NDArray[np.float32],
    outcome: Outcome,
    *,
    min_step: float = 0.02,
    failure_step: float = 0.05,
) -> PatternState:
    """Return the pattern after one viewing (the input is not modified).

    Args:
        state: the bucket's pattern before the viewing.
        content: (d,) float32 unit embedding of the watched content.
        outcome: the viewing's classification (see `classify`).
        min_step: lower bound of the success step, in [0, 1].
        failure_step: how far to move away on failure, in (0, 0.5].

    Returns:
        The new state; its embedding (when set) is a fresh unit-norm float32 array.
    """
    if outcome is Outcome.NEUTRAL:
        return replace(state, neutral=state.neutral + 1)
    if outcome is Outcome.FAILURE:
        embedding = state.embedding
        if embedding is not None:
            embedding = normalize(embedding - np.float32(failure_step) * content)
        return replace(state, embedding=embedding, failures=state.failures + 1)
    if state.embedding is None:
        embedding = normalize(content)
    else:
        step = np.float32(max(1.0 / (state.successes + 1), min_step))
        moved = state.embedding + step * (content - state.embedding)
        # Only content exactly opposite the pattern at step 0.5 cancels out; restart there.
        embedding = normalize(moved) if np.linalg.norm(moved) > 1e-6 else normalize(content)
    return replace(state, embedding=embedding, successes=state.successes + 1)
