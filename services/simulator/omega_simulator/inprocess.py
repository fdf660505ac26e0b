"""Federated collaborative filtering run in one process, for tuning and reference figures.

The device code (``omega_brain.collaborative``), the server's round
(``omega_federation.item_factors``) and the accountant (``omega_federation.accounting``) over
MovieLens splits, every user a device, exactly as the fleet runs them but without the network:
round 0 releases noisy per-item counts of the devices' weight vectors and picks the active
items, rounds 1..T are noisy subspace iterations, then every device ranks the catalog, its user
factor optionally steered towards the context bucket of the recommendation moment as the
brain's ``model_context_weight`` does (`omega_brain.collaborative.steer_factor`).
Used by ``bench/collaborative_quality.py`` (hyper-parameter search on a validation split) and
by ``omega-simulator run`` (the same model trained centrally, and the precision-vs-epsilon
curve beside the replay's own figures).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from omega_brain.collaborative import (
    InteractionWeights,
    model_update,
    preference_vector,
    quality_weight,
    score_items,
    steer_factor,
    user_factor,
)
from omega_brain.ranking import mmr
from omega_data import MovieLens, catalog_embeddings, chronological_split, evaluate_rankings
from omega_data.evaluation import UserSplit
from omega_data.movielens import Rating
from omega_federation.accounting import calibrate_noise_multiplier
from omega_federation.item_factors import (
    UpdateAccumulator,
    central_item_factors,
    initial_item_factors,
    orthonormalize,
    top_items,
)
from omega_protocol import bucket_from_timestamp
from omega_simulator.replay import completion_of

__all__ = [
    "DELTA",
    "Config",
    "Dataset",
    "Part",
    "central_scores",
    "evaluate",
    "federated_scores",
    "mean_metrics",
    "noise_for",
    "popularity_scores",
    "splits_of",
]

DELTA = 1e-5
"""Privacy delta per device over the whole run (issue 5: delta <= 1e-5)."""


@dataclass(frozen=True)
class Config:
    """One point of the hyper-parameter grid."""

    factors: int = 16
    active_items: int = 500
    rounds: int = 2
    partial: float = 0.5
    failure: float = 0.0
    trend_weight: float = 0.0
    full_weight_at: float = 1.0
    mmr_lambda: float = 1.0
    """MMR re-ranking of the top candidates as the brain does (1.0: relevance order)."""
    context_weight: float = 0.0
    """The brain's ``model_context_weight`` (beta >= 0): the user factor becomes
    ``x / |x| + beta x_c / |x_c|``, ``x_c`` folded in from the device's fit ratings in the
    context bucket of its recommendation moment (the bucket of its first evaluated rating's
    timestamp). 0: the unsteered factor, exactly the scores without a context."""
    utc_offset_minutes: int = 0
    """Offset from UTC of every device's context buckets, in minutes. 0, as the MovieLens
    replay (`omega_simulator.replay` keeps ``BrainConfig.utc_offset_minutes`` at its default
    0): the rating timestamps are UTC and the users' time zones are unknown."""


@dataclass(frozen=True)
class Part:
    """One device's data for an evaluation: fit ratings (time order) and evaluated ratings."""

    fit: list[Rating]
    evaluated: list[Rating]


class Dataset:
    """Item positions and per-device preference vectors for one split."""

    def __init__(self, parts: Sequence[Part], item_ids: Sequence[int]) -> None:
        self.parts = list(parts)
        self.position = {item: i for i, item in enumerate(item_ids)}
        self.item_ids = list(item_ids)
        self.n_items = len(item_ids)
        self._vectors: npt.NDArray[np.float32] | None = None
        self._ml: MovieLens | None = None
        self._buckets: dict[int, list[tuple[int, list[int]]]] = {}

    def vectors(self) -> npt.NDArray[np.float32]:
        """(n_items, 384) float32 unit content embeddings in item order (for MMR), cached."""
        if self._vectors is None:
            if self._ml is None:
                raise ValueError("this dataset has no catalog to embed")
            ids, embeddings = catalog_embeddings(self._ml)
            order = {int(i): k for k, i in enumerate(ids)}
            rows = embeddings[[order[i] for i in self.item_ids]].astype(np.float32)
            self._vectors = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        return self._vectors

    def preferences(
        self, weights: InteractionWeights
    ) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], float, int]]:
        """Per device: (items, p, success rate, sample count) from its fit part."""
        out = []
        for part in self.parts:
            pairs = [(self.position[r.item_id], completion_of(r.rating)) for r in part.fit]
            items, p = preference_vector(pairs, weights)
            successes = sum(r.rating >= 4 for r in part.fit)
            out.append((items, p, successes / max(1, len(part.fit)), len(part.fit)))
        return out

    def context_preferences(
        self, weights: InteractionWeights, utc_offset_minutes: int
    ) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]]:
        """Per device: ``(items, p)`` (`preference_vector`) of the fit ratings in the context
        bucket of its recommendation moment, the first evaluated rating's timestamp (empty
        arrays for a device with no evaluated rating or no fit rating in that bucket).

        Buckets come from `omega_protocol.bucket_from_timestamp`, as the brain files events;
        they are cached per UTC offset.
        """
        buckets = self._buckets.get(utc_offset_minutes)
        if buckets is None:

            def bucket(timestamp_s: int) -> int:
                return bucket_from_timestamp(timestamp_s * 1000, utc_offset_minutes).index

            buckets = [
                (
                    bucket(part.evaluated[0].timestamp) if part.evaluated else -1,
                    [bucket(r.timestamp) for r in part.fit],
                )
                for part in self.parts
            ]
            self._buckets[utc_offset_minutes] = buckets
        out = []
        for part, (moment, fit_buckets) in zip(self.parts, buckets, strict=True):
            pairs = [
                (self.position[r.item_id], completion_of(r.rating))
                for r, b in zip(part.fit, fit_buckets, strict=True)
                if b == moment
            ]
            out.append(preference_vector(pairs, weights))
        return out


def evaluate(
    dataset: Dataset, scores: list[npt.NDArray[np.float32]], mmr_lambda: float = 1.0
) -> dict[str, float]:
    """The section-8 metrics of per-device score vectors (training items dropped).

    With ``mmr_lambda < 1`` the top ``20 x 5`` candidates are re-ranked with the brain's MMR
    (``omega_brain.ranking.mmr``) over the catalog's content embeddings, relevance being the
    score divided by its maximum, as ``Brain.recommend`` does with the model.
    """
    rankings: dict[int, list[int]] = {}
    splits = {}
    vectors = dataset.vectors() if mmr_lambda < 1.0 else None
    for u, (part, s) in enumerate(zip(dataset.parts, scores, strict=True)):
        s = s.copy()
        seen = [dataset.position[r.item_id] for r in part.fit]
        s[seen] = -np.inf
        if vectors is None:
            top = np.argpartition(-s, 20)[:20]
            top = top[np.argsort(-s[top], kind="stable")]
        else:
            pool = np.argpartition(-s, 100)[:100]
            pool = pool[np.argsort(-s[pool], kind="stable")]
            relevance = s[pool] / max(float(np.max(np.abs(s[pool]))), 1e-12)
            top = pool[mmr(vectors[pool], relevance.astype(np.float32), 20, mmr_lambda)]
        rankings[u] = [dataset.item_ids[i] for i in top]
        splits[u] = UserSplit(
            user_id=u,
            train=part.fit,
            holdout=part.evaluated,
            relevant=frozenset(r.item_id for r in part.evaluated if r.rating >= 4),
        )
    m = evaluate_rankings(rankings, splits, dataset.n_items)
    return {
        "users": m.users,
        "precision_at_10": m.precision_at_10,
        "recall_at_20": m.recall_at_20,
        "ndcg_at_10": m.ndcg_at_10,
        "coverage_at_10": m.coverage_at_10,
    }


def _normalized(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    top = float(np.max(np.abs(x))) if x.size else 0.0
    return x / top if top > 0.0 else x


def federated_scores(
    dataset: Dataset, config: Config, noise_multiplier: float, seed: int
) -> list[npt.NDArray[np.float32]]:
    """Round 0 (noisy per-item counts of the weight vectors), ``config.rounds`` model rounds.

    Returns:
        Per device, (n_items,) float32 scores: normalized ``V x`` plus the weighted count prior.
    """
    rng = np.random.default_rng(seed)
    weights = InteractionWeights(partial=config.partial, failure=config.failure)
    prefs = dataset.preferences(weights)
    # Round 0: per-item counts of the devices' unit-norm weight vectors (as the worker does).
    counts = np.zeros(dataset.n_items)
    for items, p, _, _ in prefs:
        counts[items] += p
    if noise_multiplier > 0.0:
        counts += rng.normal(0.0, noise_multiplier, size=counts.shape)
    active = top_items(counts, config.active_items)
    factors = initial_item_factors(dataset.n_items, active, config.factors, seed=seed)
    for _ in range(config.rounds):
        acc = UpdateAccumulator(active, dataset.n_items, config.factors, clipping_norm=1.0)
        for items, p, rate, samples in prefs:
            w = quality_weight(rate, samples, config.full_weight_at)
            update = model_update(factors, items, p, clipping_norm=1.0, weight=w)
            if update is not None:
                acc.add(update.items, update.p, update.direction)
        noisy = acc.noisy_sum(noise_multiplier, rng if noise_multiplier > 0.0 else None)
        factors = np.zeros_like(factors)
        factors[active] = orthonormalize(noisy)
    prior = _normalized(counts)
    scores = []
    for x in _user_factors(dataset, config, weights, factors, prefs):
        s = score_items(factors, x).astype(np.float64)
        scores.append((_normalized(s) + config.trend_weight * prior).astype(np.float32))
    return scores


def _user_factors(
    dataset: Dataset,
    config: Config,
    weights: InteractionWeights,
    factors: npt.NDArray[np.float32],
    prefs: Sequence[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], float, int]],
) -> list[npt.NDArray[np.float32]]:
    """Per device, the (d,) float32 user factor, steered towards the context of its
    recommendation moment with ``config.context_weight`` (unsteered at 0)."""
    xs = [user_factor(factors, items, p) for items, p, _, _ in prefs]
    if config.context_weight == 0.0:
        return xs
    contexts = dataset.context_preferences(weights, config.utc_offset_minutes)
    return [
        steer_factor(x, user_factor(factors, items, p), config.context_weight)
        for x, (items, p) in zip(xs, contexts, strict=True)
    ]


def central_scores(dataset: Dataset, config: Config) -> list[npt.NDArray[np.float32]]:
    """The same model trained centrally: exact top-d eigenvectors of the training Gram matrix."""
    weights = InteractionWeights(partial=config.partial, failure=config.failure)
    prefs = dataset.preferences(weights)
    factors = central_item_factors(
        ((i, p) for i, p, _, _ in prefs), dataset.n_items, config.factors
    )
    return [
        score_items(factors, x) for x in _user_factors(dataset, config, weights, factors, prefs)
    ]


def popularity_scores(dataset: Dataset) -> list[npt.NDArray[np.float32]]:
    """Count of fit ratings >= 4 per item (the section-8 popularity baseline)."""
    counts = np.zeros(dataset.n_items, dtype=np.float32)
    for part in dataset.parts:
        for r in part.fit:
            counts[dataset.position[r.item_id]] += r.rating >= 4
    # Ties by ascending item id, as omega_data.popularity_rankings: a tiny decreasing offset.
    counts -= np.arange(dataset.n_items, dtype=np.float32) * 1e-6
    return [counts] * len(dataset.parts)


def mean_metrics(
    dataset: Dataset, config: Config, z: float, seeds: Sequence[int]
) -> dict[str, float]:
    """Metrics averaged over seeds (noise and the random start)."""
    runs = [
        evaluate(dataset, federated_scores(dataset, config, z, s), config.mmr_lambda) for s in seeds
    ]
    return {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}


@functools.cache
def _calibrated(epsilon: float, releases: int) -> float:
    return calibrate_noise_multiplier(epsilon, DELTA, rounds=releases)


def noise_for(epsilon: float | None, config: Config) -> float:
    """Noise multiplier of every release so that round 0 + T model rounds spend ``epsilon``."""
    return 0.0 if epsilon is None else _calibrated(epsilon, config.rounds + 1)


def splits_of(ml: MovieLens) -> tuple[Dataset, Dataset]:
    """``(test, validation)``: the section-8 split, and one carved from each training part.

    Validation: each user's training ratings, first 80% fit, last 20% evaluated.
    """
    item_ids = sorted(ml.items)
    splits = chronological_split(ml)
    test = Dataset([Part(s.train, s.holdout) for s in splits.values()], item_ids)
    parts = []
    for s in splits.values():
        n_fit = max(1, math.floor(0.8 * len(s.train) + 1e-9))
        parts.append(Part(s.train[:n_fit], s.train[n_fit:]))
    validation = Dataset(parts, item_ids)
    test._ml = validation._ml = ml
    return test, validation
