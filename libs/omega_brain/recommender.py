"""Recommending: builds the query of a moment and ranks the catalog for `Brain.recommend`.

The query mixes the local pattern of the moment's context bucket with the nearest good global
patterns; candidates come from the catalog index and the trending items; with the
collaborative model the whole catalog is scored instead (see `Brain.recommend` for the rules).
The pure scoring pieces (global blending, model relevance, MMR) live in `omega_brain.ranking`;
this module applies them to a `BrainContext` and explains each pick with its reasons.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from omega_brain.catalog import CatalogIndex
from omega_brain.collaborative import score_items, steer_factor, user_factor
from omega_brain.context import BrainContext, Trends
from omega_brain.models import Recommendation
from omega_brain.patterns import normalize
from omega_brain.ranking import blend_global, mmr, model_relevance, top_unexcluded
from omega_protocol import EMBEDDING_DIM, ContextBucket

__all__ = [
    "REASON_DISCOVER",
    "REASON_GLOBAL",
    "REASON_HISTORY",
    "REASON_MODEL",
    "REASON_TRENDING",
    "Recommender",
]

REASON_TRENDING = "trending"
REASON_GLOBAL = "liked by similar viewers"
REASON_HISTORY = "matches your viewing history"
REASON_MODEL = "viewers with your taste watched this"
REASON_DISCOVER = "something new to try"

_LATENCY_WINDOW = 1024


@dataclass(frozen=True, slots=True)
class _Query:
    """The parts of one recommendation query (vectors are (384,) float32 unit)."""

    local: npt.NDArray[np.float32] | None
    local_weight: float
    local_reason: str
    glob: npt.NDArray[np.float32] | None
    global_weight: float


class Recommender:
    """Ranks the catalog for one moment (see `Brain.recommend`); callers hold ``ctx.lock``.

    Attributes:
        latencies: seconds of the last 1,024 `Brain.recommend` calls.
        calls: `Brain.recommend` calls served.
    """

    def __init__(self, ctx: BrainContext) -> None:
        self._ctx = ctx
        self.latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)
        self.calls = 0

    def record(self, seconds: float) -> None:
        """Count one served call and its latency."""
        self.calls += 1
        self.latencies.append(seconds)

    def recommend(
        self, k: int, bucket: ContextBucket, use_global: bool, exclude_watched: bool
    ) -> list[Recommendation]:
        """Up to ``k`` (>= 1) recommendations for a moment of context ``bucket``."""
        ctx = self._ctx
        cfg = ctx.config
        watched: set[str] = ctx.watched if exclude_watched else set()
        catalog = ctx.catalog
        trends = ctx.trends() if use_global else None
        if catalog is None or len(catalog) == 0:
            return self._trending_without_catalog(k, watched) if use_global else []
        query = self._query(bucket, use_global)
        if use_global:
            with_model = self._recommend_with_model(k, catalog, query, trends, watched, bucket)
            if with_model is not None:
                return with_model
        if query is None:
            if trends is None or trends.positions.size == 0:
                return []
            return self._trending_only(catalog, trends, k, watched)
        q = _query_vector(query)
        pool = self._candidates(catalog, q, k, watched)
        if trends is not None:
            extra = [
                int(p)
                for p in trends.positions[: k * cfg.candidate_multiplier]
                if int(p) not in pool and catalog.content_id_at(int(p)) not in watched
            ]
            pool.update(dict.fromkeys(extra))
        if not pool:
            return []
        positions = np.fromiter(pool, dtype=np.int64, count=len(pool))
        vectors = catalog.vectors(positions)
        trend = np.zeros(len(positions), dtype=np.float32)
        if trends is not None:
            trend = np.array(
                [trends.by_position.get(int(p), 0.0) for p in positions], dtype=np.float32
            )
        relevance = vectors @ q + np.float32(cfg.trend_weight) * trend
        order = mmr(vectors, relevance, k, cfg.mmr_lambda)
        total = query.local_weight + query.global_weight
        out: list[Recommendation] = []
        for i in order:
            contributions: list[tuple[float, str]] = []
            if query.local is not None:
                share = query.local_weight / total
                contributions.append((share * float(vectors[i] @ query.local), query.local_reason))
            if query.glob is not None:
                share = query.global_weight / total
                contributions.append((share * float(vectors[i] @ query.glob), REASON_GLOBAL))
            if trend[i] > 0:
                contributions.append((cfg.trend_weight * float(trend[i]), REASON_TRENDING))
            reasons = tuple(r for c, r in sorted(contributions, key=lambda t: -t[0]) if c > 0)
            if not reasons:
                reasons = (query.local_reason if query.local is not None else REASON_GLOBAL,)
            cid = catalog.content_id_at(int(positions[i]))
            out.append(Recommendation(cid, float(relevance[i]), reasons))
        return out

    def _recommend_with_model(
        self,
        k: int,
        catalog: CatalogIndex,
        query: _Query | None,
        trends: Trends | None,
        watched: set[str],
        bucket: ContextBucket,
    ) -> list[Recommendation] | None:
        """Whole-catalog ranking with the collaborative model; None without a model or with
        a zero user factor (the caller then ranks as without a model).

        With ``model_context_weight > 0`` the user factor is steered towards the factor of
        the viewings of ``bucket`` (`steer_factor`), and an item whose score that steer raises
        gets the bucket's reason.
        """
        ctx = self._ctx
        cfg = ctx.config
        model = ctx.aligned_model()
        prefs = ctx.preferences()
        if model is None or prefs is None or prefs.items.size == 0:
            return None
        x = user_factor(model.matrix, prefs.items, prefs.p)
        if not np.any(x):
            return None
        steer: npt.NDArray[np.float32] | None = None  # the context's part of the factor
        if cfg.model_context_weight > 0.0:
            context = ctx.context_preferences(bucket.index)
            if context is not None and context.items.size:
                x_context = user_factor(model.matrix, context.items, context.p)
                steered = steer_factor(x, x_context, cfg.model_context_weight)
                if steered is not x:
                    scale = cfg.model_context_weight / float(np.linalg.norm(x_context))
                    steer = (np.float32(scale) * x_context).astype(np.float32)
                    x = steered
        cold_positions: npt.NDArray[np.int64] | None = None
        cold_similarity: npt.NDArray[np.float32] | None = None
        if query is not None and cfg.model_cold_weight > 0.0:
            q = _query_vector(query)
            pool = self._candidates(catalog, q, k, watched)
            cold_positions = np.fromiter(pool, dtype=np.int64, count=len(pool))
            cold_similarity = catalog.vectors(cold_positions) @ q
        scored = model_relevance(
            score_items(model.matrix, x),
            model.known,
            trend=trends.dense if trends is not None else None,
            trend_weight=cfg.model_trend_weight,
            cold_positions=cold_positions,
            cold_similarity=cold_similarity,
            cold_weight=cfg.model_cold_weight,
        )
        excluded = np.zeros(len(catalog), dtype=bool)
        if watched:
            excluded[[catalog.position_of(c) for c in watched if c in catalog]] = True
        positions = top_unexcluded(scored.total, excluded, max(k * cfg.candidate_multiplier, k))
        if positions.size == 0:
            return []
        vectors = catalog.vectors(positions)
        order = mmr(vectors, scored.total[positions], k, cfg.mmr_lambda)
        content_reason = REASON_GLOBAL
        if query is not None and query.local is not None:
            content_reason = query.local_reason
        context_reason = _bucket_reason(bucket)
        out: list[Recommendation] = []
        for i in order:
            p = int(positions[i])
            context_part = 0.0
            if steer is not None and model.known[p]:
                context_part = float(model.matrix[p] @ steer) / scored.scale
            parts = (
                (float(scored.model[p]) - context_part, REASON_MODEL),
                (context_part, context_reason),
                (float(scored.content[p]), content_reason),
                (float(scored.trend[p]), REASON_TRENDING),
            )
            reasons = tuple(
                dict.fromkeys(r for c, r in sorted(parts, key=lambda t: -t[0]) if c > 0)
            )
            out.append(
                Recommendation(
                    catalog.content_id_at(p), float(scored.total[p]), reasons or (REASON_DISCOVER,)
                )
            )
        return out

    def _query(self, bucket: ContextBucket, use_global: bool) -> _Query | None:
        ctx = self._ctx
        cfg = ctx.config
        local: npt.NDArray[np.float32] | None = None
        local_rate = 0.0
        reason = REASON_HISTORY
        row = ctx.patterns.get(bucket.index)
        if row is not None and row.state.embedding is not None:
            local, local_rate = row.state.embedding, row.state.success_rate
            reason = _bucket_reason(bucket)
        else:
            learned = [r.state for r in ctx.patterns.values() if r.state.embedding is not None]
            if learned:
                w = np.array([s.sample_count for s in learned], dtype=np.float32)
                stacked = np.stack([s.embedding for s in learned if s.embedding is not None])
                mean = normalize((w[:, None] * stacked).sum(axis=0))
                if np.any(mean):
                    local = mean
                    local_rate = float(
                        (w * np.array([s.success_rate for s in learned])).sum() / w.sum()
                    )
        glob: npt.NDArray[np.float32] | None = None
        global_rate = 0.0
        if use_global:
            candidates = ctx.globals.by_bucket.get(bucket.index) or ctx.globals.anywhere
            if candidates is not None:
                blended = blend_global(candidates, local, cfg.global_top_n)
                if blended is not None:
                    glob, global_rate = blended
        local_weight = cfg.local_weight * local_rate if local is not None else 0.0
        global_weight = cfg.global_weight * global_rate if glob is not None else 0.0
        if local_weight <= 0 and global_weight <= 0:
            # A zero weight (e.g. local_weight=0 config) must not hide a pattern we do have.
            if local is None and glob is None:
                return None
            local_weight = 1.0 if local is not None else 0.0
            global_weight = 1.0 if glob is not None else 0.0
        return _Query(
            local if local_weight > 0 else None,
            local_weight,
            reason,
            glob if global_weight > 0 else None,
            global_weight,
        )

    def _candidates(
        self, catalog: CatalogIndex, q: npt.NDArray[np.float32], k: int, watched: set[str]
    ) -> dict[int, None]:
        """The ``k x candidate_multiplier`` nearest unwatched rows to ``q``, best first.

        Searches ``k x candidate_multiplier + len(watched)`` neighbours (enough even if every
        watched item is among them); if HNSW still comes back short of k, searches wider.
        Returns an insertion-ordered set (dict keys).
        """
        wanted = k * self._ctx.config.candidate_multiplier
        n = min(len(catalog), wanted + len(watched))
        while True:
            positions, _ = catalog.search_positions(q, n)
            pool: dict[int, None] = {}
            for p in positions[0]:
                if p >= 0 and catalog.content_id_at(int(p)) not in watched:
                    pool[int(p)] = None
                    if len(pool) == wanted:
                        return pool
            if len(pool) >= k or n >= len(catalog):
                return pool
            n = min(len(catalog), n * 4)

    def _trending_only(
        self, catalog: CatalogIndex, trends: Trends, k: int, watched: set[str]
    ) -> list[Recommendation]:
        cfg = self._ctx.config
        keep = [
            i
            for i, p in enumerate(trends.positions)
            if catalog.content_id_at(int(p)) not in watched
        ][: max(k * cfg.candidate_multiplier, k)]
        if not keep:
            return []
        positions = trends.positions[keep]
        relevance = trends.scores[keep]
        order = mmr(catalog.vectors(positions), relevance, k, cfg.mmr_lambda)
        return [
            Recommendation(
                catalog.content_id_at(int(positions[i])), float(relevance[i]), (REASON_TRENDING,)
            )
            for i in order
        ]

    def _trending_without_catalog(self, k: int, watched: set[str]) -> list[Recommendation]:
        trending = self._ctx.globals.trending
        items = [(c, s) for c, s in trending if c not in watched and s > 0][:k]
        if not items:
            return []
        peak = trending[0][1]  # sorted by score, highest first
        return [Recommendation(c, s / peak, (REASON_TRENDING,)) for c, s in items]


def _bucket_reason(bucket: ContextBucket) -> str:
    """The reason of a context bucket's part, e.g. ``"matches your evening/weekday viewing"``."""
    return f"matches your {bucket.name} viewing"


def _query_vector(query: _Query) -> npt.NDArray[np.float32]:
    """The (384,) unit pattern query: local and global parts mixed by their weights."""
    mix = np.zeros(EMBEDDING_DIM, dtype=np.float32)
    if query.local is not None:
        mix += np.float32(query.local_weight) * query.local
    if query.glob is not None:
        mix += np.float32(query.global_weight) * query.glob
    q = normalize(mix)
    if not np.any(q):  # local and global exactly opposite: trust the viewer
        q = query.local if query.local is not None else normalize(mix)
    return q
