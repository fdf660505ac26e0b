"""Pure ranking helpers for `Brain.recommend`: global-pattern blending and MMR re-ranking."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from omega_brain.patterns import normalize

__all__ = ["GlobalSet", "blend_global", "mmr"]


@dataclass(frozen=True, slots=True)
class GlobalSet:
    """Global patterns usable for one context bucket.

    Attributes:
        embeddings: (m, 384) float32, unit rows.
        quality: (m,) float32 in [0, 1]: each pattern's quality divided by the set's maximum.
        success_rate: (m,) float32 in [0, 1].
    """

    embeddings: npt.NDArray[np.float32]
    quality: npt.NDArray[np.float32]
    success_rate: npt.NDArray[np.float32]

    @classmethod
    def build(
        cls,
        embeddings: npt.NDArray[np.float32],
        quality: npt.NDArray[np.float32],
        success_rate: npt.NDArray[np.float32],
    ) -> GlobalSet:
        """Normalize qualities to [0, 1] by the maximum (all ones when every quality is 0)."""
        q = np.asarray(quality, dtype=np.float32)
        peak = float(q.max()) if q.size else 0.0
        q = q / peak if peak > 0 else np.ones_like(q)
        return cls(
            np.asarray(embeddings, dtype=np.float32),
            q.astype(np.float32),
            np.clip(np.asarray(success_rate, dtype=np.float32), 0.0, 1.0),
        )


def blend_global(
    patterns: GlobalSet, local: npt.NDArray[np.float32] | None, top_n: int
) -> tuple[npt.NDArray[np.float32], float] | None:
    """The global part of a recommendation query.

    With a local pattern, the ``top_n`` global patterns are those maximizing
    ``quality * max(cos(global, local), 0)`` (the crowd's patterns nearest to this viewer's, the
    good ones first); without one (cold start), those of highest quality. They are averaged with
    those weights.

    Args:
        patterns: the candidates for the bucket.
        local: (384,) float32 unit local pattern, or None.
        top_n: at most this many patterns are blended.

    Returns:
        ``(vector, success_rate)``: (384,) float32 unit vector and the weighted mean success
        rate of the patterns used; None when no pattern has a positive weight.
    """
    if patterns.embeddings.shape[0] == 0:
        return None
    if local is not None:
        weights = patterns.quality * np.maximum(patterns.embeddings @ local, 0.0)
    else:
        weights = patterns.quality
    order = np.argsort(-weights, kind="stable")[:top_n]
    order = order[weights[order] > 0]
    if order.size == 0:
        return None
    w = weights[order].astype(np.float32)
    vector = normalize((w[:, None] * patterns.embeddings[order]).sum(axis=0))
    if not np.any(vector):
        return None
    rate = float((w * patterns.success_rate[order]).sum() / w.sum())
    return vector, rate


def mmr(
    vectors: npt.NDArray[np.float32], relevance: npt.NDArray[np.float32], k: int, lam: float
) -> npt.NDArray[np.int64]:
    """Maximal Marginal Relevance re-ranking (Carbonell & Goldstein, SIGIR 1998).

    Greedily picks ``argmax_i lam * relevance[i] - (1 - lam) * max_{j picked} cos(v_i, v_j)``:
    relevant items first, but an item very similar to one already picked loses ground to a
    different one.

    Args:
        vectors: (m, d) float32 unit rows of the candidates.
        relevance: (m,) float32 relevance of each candidate.
        k: how many to pick (capped at m).
        lam: in [0, 1]; 1 ranks by relevance alone.

    Returns:
        (min(k, m),) int64 candidate indices in pick order.
    """
    m = int(relevance.shape[0])
    k = min(k, m)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if lam >= 1.0:
        return np.argsort(-relevance, kind="stable")[:k].astype(np.int64)
    picked = np.empty(k, dtype=np.int64)
    taken = np.zeros(m, dtype=bool)
    max_sim = np.full(m, -np.inf, dtype=np.float32)
    gain = lam * relevance.astype(np.float32)
    for n in range(k):
        objective = gain.copy() if n == 0 else gain - (1.0 - lam) * max_sim
        objective[taken] = -np.inf
        best = int(np.argmax(objective))
        picked[n] = best
        taken[best] = True
        max_sim = np.maximum(max_sim, vectors @ vectors[best])
    return picked
