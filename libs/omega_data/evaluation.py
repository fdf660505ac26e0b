"""The offline evaluation protocol of ARCHITECTURE.md section 8.

Each user's ratings are sorted by ``(timestamp, item_id)``; the first ``floor(0.8 * n)`` (at
least one) are training, the rest the hold-out. Relevant items are hold-out ratings >= 4.
Every user gets a ranked list from the whole catalog minus their training items; metrics are
averaged over the users with at least one relevant item (908 of 943 on MovieLens 100K).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from omega_data.movielens import MovieLens, Rating

__all__ = [
    "RELEVANT_RATING",
    "RankingMetrics",
    "UserSplit",
    "chronological_split",
    "evaluate_rankings",
    "popularity_rankings",
]

RELEVANT_RATING = 4.0
"""Hold-out ratings at or above this are relevant; training ratings at or above it are positive."""

_PRECISION_K = 10
_RECALL_K = 20


@dataclass(frozen=True)
class UserSplit:
    """One user's chronological train / hold-out split.

    Attributes:
        user_id: MovieLens user id.
        train: The first ``floor(train_fraction * n)`` ratings (at least one), oldest first.
        holdout: The remaining ratings, oldest first (may be empty for a user with one rating).
        relevant: Item ids of hold-out ratings >= 4.
    """

    user_id: int
    train: list[Rating]
    holdout: list[Rating]
    relevant: frozenset[int]


@dataclass(frozen=True)
class RankingMetrics:
    """Metrics averaged over the evaluated users (those with at least one relevant item).

    Attributes:
        users: Number of evaluated users.
        precision_at_10: Mean of (relevant hits in the top 10) / 10.
        recall_at_20: Mean of (relevant hits in the top 20) / (number of relevant items).
        ndcg_at_10: Mean NDCG@10 with binary gains; the ideal DCG places
            ``min(|relevant|, 10)`` hits at the top.
        coverage_at_10: Distinct items over all evaluated users' top 10s / catalog size.
    """

    users: int
    precision_at_10: float
    recall_at_20: float
    ndcg_at_10: float
    coverage_at_10: float


def chronological_split(ml: MovieLens, train_fraction: float = 0.8) -> dict[int, UserSplit]:
    """Split every user's ratings in time order into training and hold-out parts.

    Ratings are sorted by ``(timestamp, item_id)``. With ``n`` ratings, the first
    ``max(1, floor(train_fraction * n))`` are training (floor, not round, so the hold-out is
    never smaller than ``(1 - train_fraction) * n``), the rest hold-out. The floor is computed
    on ``train_fraction * n`` with a small tolerance so that e.g. ``0.8 * 20`` gives 16.

    Args:
        ml: The dataset.
        train_fraction: Fraction of each user's ratings used for training, in (0, 1).

    Returns:
        Splits keyed by user id, for every user in ``ml.user_ids`` that has ratings, in
        ascending user id order.

    Raises:
        ValueError: ``train_fraction`` is not strictly between 0 and 1.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    by_user: dict[int, list[Rating]] = {}
    for rating in ml.ratings:
        by_user.setdefault(rating.user_id, []).append(rating)
    splits: dict[int, UserSplit] = {}
    for user_id in sorted(by_user):
        ratings = sorted(by_user[user_id], key=lambda r: (r.timestamp, r.item_id))
        n_train = max(1, math.floor(train_fraction * len(ratings) + 1e-9))
        holdout = ratings[n_train:]
        splits[user_id] = UserSplit(
            user_id=user_id,
            train=ratings[:n_train],
            holdout=holdout,
            relevant=frozenset(r.item_id for r in holdout if r.rating >= RELEVANT_RATING),
        )
    return splits


def _dcg(hit_positions: Sequence[int]) -> float:
    """Discounted cumulative gain of binary hits at 0-based ranks."""
    return sum(1.0 / math.log2(position + 2) for position in hit_positions)


def evaluate_rankings(
    rankings: Mapping[int, Sequence[int]],
    splits: Mapping[int, UserSplit],
    catalog_size: int,
) -> RankingMetrics:
    """Score ranked recommendation lists against the hold-out.

    Only users of ``splits`` with at least one relevant item are evaluated; other entries of
    ``rankings`` are ignored. Rankings should exclude each user's training items (the
    protocol ranks the catalog minus the training part); this is not checked here, such items
    simply count as misses.

    Args:
        rankings: User id -> item ids, best first, at least 20 distinct items per user
            (only the first 20 are read).
        splits: Output of :func:`chronological_split`.
        catalog_size: Number of items in the catalog (1,682 for ML-100K); the denominator of
            coverage@10.

    Returns:
        Metrics averaged over the evaluated users.

    Raises:
        ValueError: ``catalog_size`` is not positive, no user has a relevant item, an evaluated
            user has no ranking, a ranking has fewer than 20 items, or its top 20 repeat an item.
    """
    if catalog_size <= 0:
        raise ValueError(f"catalog_size must be positive, got {catalog_size}")
    users = 0
    precision = recall = ndcg = 0.0
    covered: set[int] = set()
    for user_id, split in splits.items():
        if not split.relevant:
            continue
        ranking = rankings.get(user_id)
        if ranking is None:
            raise ValueError(f"no ranking for evaluated user {user_id}")
        top = list(ranking[:_RECALL_K])
        if len(top) < _RECALL_K:
            raise ValueError(
                f"ranking of user {user_id} has {len(top)} items; at least {_RECALL_K} needed"
            )
        if len(set(top)) != len(top):
            raise ValueError(f"ranking of user {user_id} repeats an item in its top {_RECALL_K}")
        top10 = top[:_PRECISION_K]
        hit_positions = [i for i, item in enumerate(top10) if item in split.relevant]
        ideal = _dcg(range(min(len(split.relevant), _PRECISION_K)))
        users += 1
        precision += len(hit_positions) / _PRECISION_K
        recall += sum(item in split.relevant for item in top) / len(split.relevant)
        ndcg += _dcg(hit_positions) / ideal
        covered.update(top10)
    if users == 0:
        raise ValueError("no user has a relevant hold-out item; nothing to evaluate")
    return RankingMetrics(
        users=users,
        precision_at_10=precision / users,
        recall_at_20=recall / users,
        ndcg_at_10=ndcg / users,
        coverage_at_10=len(covered) / catalog_size,
    )


def popularity_rankings(splits: Mapping[int, UserSplit], k: int = 20) -> dict[int, list[int]]:
    """Rank items by how many training ratings >= 4 they received, over all users.

    Ties are broken by ascending item id. Items rated in training but never >= 4 follow with a
    count of zero; hold-out ratings are never looked at. Each user's own training items are
    left out of their list.

    Args:
        splits: Output of :func:`chronological_split`.
        k: Length of each list.

    Returns:
        User id -> up to ``k`` item ids, most popular first (shorter only when the user's
        training part covers nearly every item seen in training), for every user of ``splits``.

    Raises:
        ValueError: ``k`` is not positive.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    counts: Counter[int] = Counter()
    for split in splits.values():
        for rating in split.train:
            counts[rating.item_id] += rating.rating >= RELEVANT_RATING
    order = sorted(counts, key=lambda item: (-counts[item], item))
    rankings: dict[int, list[int]] = {}
    for user_id, split in splits.items():
        seen = {rating.item_id for rating in split.train}
        ranked: list[int] = []
        for item in order:
            if item not in seen:
                ranked.append(item)
                if len(ranked) == k:
                    break
        rankings[user_id] = ranked
    return rankings
