"""Pure ranking helpers for `Brain.recommend`: global-pattern blending, whole-catalog scores
with the collaborative model, top-candidate selection and MMR re-ranking."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from omega_brain.patterns import normalize

__all__ = [
    "GlobalSet",
    "ModelRelevance",
    "blend_global",
    "mmr",
    "model_relevance",
    "top_unexcluded",
]


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


@dataclass(frozen=True, slots=True)
class ModelRelevance:
    """Relevance of every catalog item with the collaborative model, and its parts.

    Attributes:
        total: (n,) float32, ``model + content + trend``.
        model: (n,) float32, ``V x`` divided by its largest absolute value (0 where the model
            does not know the item).
        content: (n,) float32, the content part of items the model does not know (0 elsewhere).
        trend: (n,) float32, ``trend_weight x`` the trending score normalized to [0, 1].
        scale: the largest absolute value of ``V x`` that ``model`` was divided by (1.0 when
            every score is 0), so that a part ``V x'`` of the scores (``x = x' + x''``) is
            ``V x' / scale`` on the same footing as ``model``.
    """

    total: npt.NDArray[np.float32]
    model: npt.NDArray[np.float32]
    content: npt.NDArray[np.float32]
    trend: npt.NDArray[np.float32]
    scale: float = 1.0


def model_relevance(
    scores: npt.NDArray[np.float32],
    known: npt.NDArray[np.bool_],
    *,
    trend: npt.NDArray[np.float32] | None,
    trend_weight: float,
    cold_positions: npt.NDArray[np.int64] | None = None,
    cold_similarity: npt.NDArray[np.float32] | None = None,
    cold_weight: float = 0.0,
) -> ModelRelevance:
    """Score every catalog item: ``norm(V x) + trend_weight x norm(trend)``, cold items by content.

    ``norm`` divides by the largest absolute value, so the model part is in [-1, 1] with the
    device's best item at 1 whatever the scale of ``V`` and ``x``. Items the model does not
    know get no model score; those among ``cold_positions`` (the content-similarity candidates
    of the pattern query) with a positive similarity get ``cold_weight x similarity / (largest
    such similarity)``, in (0, cold_weight], so the best cold item ranks like a known item
    with ``cold_weight`` of the best model score. Every other item has only its trend part.

    Args:
        scores: (n,) float32 ``V x`` (`score_items`).
        known: (n,) bool, items the model knows.
        trend: (n,) float32 trending scores normalized to [0, 1], or None.
        trend_weight: weight of the trend, >= 0.
        cold_positions: (c,) int64 catalog positions with a content similarity, or None.
        cold_similarity: (c,) float32 their cosine similarity to the pattern query.
        cold_weight: weight of the content part, >= 0.

    Returns:
        The relevance and its parts, each (n,) float32.
    """
    n = int(scores.shape[0])
    top = float(np.max(np.abs(scores))) if scores.size else 0.0
    scale = top if top > 0.0 else 1.0
    normalized = (scores / np.float32(top)).astype(np.float32) if top > 0.0 else scores
    model = np.where(known, normalized, np.float32(0.0)).astype(np.float32)
    content = np.zeros(n, dtype=np.float32)
    if cold_positions is not None and cold_similarity is not None and cold_positions.size:
        usable = ~known[cold_positions] & (cold_similarity > 0.0)
        if usable.any():
            sims = cold_similarity[usable]
            content[cold_positions[usable]] = np.float32(cold_weight) * sims / sims.max()
    trend_part = (
        np.float32(trend_weight) * trend.astype(np.float32)
        if trend is not None and trend_weight > 0.0
        else np.zeros(n, dtype=np.float32)
    )
    return ModelRelevance(model + content + trend_part, model, content, trend_part, scale)


def top_unexcluded(
    relevance: npt.NDArray[np.float32], excluded: npt.NDArray[np.bool_], count: int
) -> npt.NDArray[np.int64]:
    """The ``count`` most relevant positions not excluded, best first (ties: lowest position).

    One ``argpartition`` over the catalog, then a sort of the ``count`` kept.

    Args:
        relevance: (n,) float32.
        excluded: (n,) bool, positions never returned.
        count: how many, >= 0 (capped at the number not excluded).

    Returns:
        (min(count, n - excluded),) int64 positions.
    """
    allowed = np.flatnonzero(~excluded)
    if count <= 0 or allowed.size == 0:
        return np.zeros(0, dtype=np.int64)
    values = relevance[allowed]
    if count < allowed.size:
        threshold = -np.partition(-values, count - 1)[count - 1]  # the count-th largest value
        above = np.flatnonzero(values > threshold)
        ties = np.flatnonzero(values == threshold)[: count - above.size]  # lowest positions
        keep = np.concatenate([above, ties])
        allowed, values = allowed[keep], values[keep]
    order = np.lexsort((allowed, -values))
    return allowed[order].astype(np.int64)
