"""Unit tests of the evaluation protocol (omega_data.evaluation) on hand-computed examples."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omega_data import (
    Item,
    MovieLens,
    Rating,
    UserSplit,
    chronological_split,
    evaluate_rankings,
    popularity_rankings,
)


def _dataset(*ratings: tuple[int, int, float, int]) -> MovieLens:
    """A MovieLens from (user, item, rating, timestamp) tuples; items are named after ids."""
    rows = [Rating(user_id=u, item_id=i, rating=r, timestamp=t) for u, i, r, t in ratings]
    items = {
        r.item_id: Item(item_id=r.item_id, title=f"m{r.item_id}", year=None, genres=())
        for r in rows
    }
    return MovieLens(ratings=rows, items=items, user_ids=sorted({r.user_id for r in rows}))


def _split(user_id: int, relevant: set[int], train_items: tuple[int, ...] = ()) -> UserSplit:
    train = [Rating(user_id, item, 5.0, n) for n, item in enumerate(train_items)]
    holdout = [Rating(user_id, item, 5.0, 1000 + n) for n, item in enumerate(sorted(relevant))]
    return UserSplit(user_id=user_id, train=train, holdout=holdout, relevant=frozenset(relevant))


def _dcg(positions: list[int]) -> float:
    return sum(1.0 / math.log2(p + 2) for p in positions)


# --- chronological_split -------------------------------------------------------------------


def test_split_takes_floor_of_80_percent_in_time_order() -> None:
    # 7 ratings: floor(0.8 * 7) = floor(5.6) = 5 training, 2 hold-out (round() would give 6).
    ml = _dataset(*[(1, item, 3.0, 100 - item) for item in range(1, 8)])
    split = chronological_split(ml)[1]
    assert [r.item_id for r in split.train] == [7, 6, 5, 4, 3]
    assert [r.item_id for r in split.holdout] == [2, 1]


@pytest.mark.parametrize(
    ("n", "n_train"), [(1, 1), (2, 1), (4, 3), (5, 4), (10, 8), (20, 16), (24, 19), (737, 589)]
)
def test_split_sizes(n: int, n_train: int) -> None:
    ml = _dataset(*[(1, item, 5.0, item) for item in range(n)])
    split = chronological_split(ml)[1]
    assert len(split.train) == n_train
    assert len(split.holdout) == n - n_train


def test_split_breaks_timestamp_ties_by_item_id() -> None:
    ml = _dataset((1, 30, 5.0, 10), (1, 10, 5.0, 10), (1, 20, 5.0, 10), (1, 5, 5.0, 11),
                  (1, 1, 5.0, 12))  # fmt: skip
    split = chronological_split(ml)[1]
    assert [r.item_id for r in split.train] == [10, 20, 30, 5]
    assert [r.item_id for r in split.holdout] == [1]


def test_split_relevant_are_holdout_ratings_of_at_least_4() -> None:
    # 10 ratings -> 8 training (all 5 stars), hold-out items 9 (3.5: not relevant) and 10 (4.0).
    ratings = [(1, item, 5.0, item) for item in range(1, 9)]
    ratings += [(1, 9, 3.5, 9), (1, 10, 4.0, 10)]
    split = chronological_split(_dataset(*ratings))[1]
    assert split.relevant == frozenset({10})
    assert all(r.item_id not in split.relevant for r in split.train)  # 5-star training items


def test_split_covers_every_user_in_ascending_order() -> None:
    ml = _dataset((3, 1, 5.0, 1), (1, 1, 5.0, 1), (2, 2, 1.0, 1), (1, 2, 5.0, 2))
    splits = chronological_split(ml)
    assert list(splits) == [1, 2, 3]
    assert splits[1].relevant == frozenset({2})
    assert splits[2].holdout == [] and splits[2].relevant == frozenset()


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="train_fraction"):
        chronological_split(_dataset((1, 1, 5.0, 1)), train_fraction=fraction)


# --- evaluate_rankings ---------------------------------------------------------------------


def test_metrics_hand_computed() -> None:
    splits = {
        1: _split(1, {1, 2, 3}),  # hits at ranks 0 and 2 in the top 10, a third at rank 14
        2: _split(2, {5}),  # hit at rank 1
        3: _split(3, set()),  # no relevant item: skipped, needs no ranking
        4: _split(4, {99}),  # never ranked: all zeros
    }
    filler = list(range(100, 200))
    rankings = {
        1: [1, 100, 2, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 3, 112, 113, 114,
            115, 116],
        2: [150, 5, *filler[:18]],
        4: filler[:20],
        7: [1, 2, 3],  # a user not in the splits: ignored
    }  # fmt: skip
    metrics = evaluate_rankings(rankings, splits, catalog_size=200)

    assert metrics.users == 3
    assert metrics.precision_at_10 == pytest.approx((2 / 10 + 1 / 10 + 0) / 3)
    assert metrics.recall_at_20 == pytest.approx((3 / 3 + 1 / 1 + 0) / 3)
    ndcg_1 = _dcg([0, 2]) / _dcg([0, 1, 2])  # (1 + 1/2) / (1 + 1/log2 3 + 1/2) = 0.7039
    ndcg_2 = _dcg([1]) / _dcg([0])  # 1/log2 3 = 0.6309
    assert ndcg_1 == pytest.approx(0.703918, abs=1e-6)
    assert metrics.ndcg_at_10 == pytest.approx((ndcg_1 + ndcg_2 + 0) / 3)
    # Distinct top-10 items: 1, 2, 5, 150 and 100..109 (shared by users 1, 2 and 4) = 14.
    assert metrics.coverage_at_10 == pytest.approx(14 / 200)


def test_ideal_dcg_is_capped_at_ten_relevant_items() -> None:
    relevant = set(range(1, 13))  # 12 relevant items
    ranking = [*range(1, 11), 50, 51, 11, *range(52, 59)]  # 10 hits, then item 11 at rank 12
    metrics = evaluate_rankings({1: ranking}, {1: _split(1, relevant)}, catalog_size=100)
    assert metrics.precision_at_10 == pytest.approx(1.0)
    assert metrics.ndcg_at_10 == pytest.approx(1.0)
    assert metrics.recall_at_20 == pytest.approx(11 / 12)
    assert metrics.coverage_at_10 == pytest.approx(10 / 100)


def test_only_the_first_20_items_count() -> None:
    ranking = [*range(100, 120), 1]  # the relevant item at rank 20 (0-based) is too late
    metrics = evaluate_rankings({1: ranking}, {1: _split(1, {1})}, catalog_size=200)
    assert metrics.recall_at_20 == 0.0
    assert metrics.precision_at_10 == 0.0
    assert metrics.ndcg_at_10 == 0.0


def test_hit_at_rank_20_counts_for_recall_only() -> None:
    ranking = [*range(100, 119), 1]
    metrics = evaluate_rankings({1: ranking}, {1: _split(1, {1, 2})}, catalog_size=200)
    assert metrics.recall_at_20 == pytest.approx(0.5)
    assert metrics.precision_at_10 == 0.0


@pytest.mark.parametrize(
    ("rankings", "catalog_size", "message"),
    [
        ({}, 100, "no ranking"),
        ({1: list(range(19))}, 100, "at least 20"),
        ({1: [1, *range(18), 1]}, 100, "repeats"),
        ({1: list(range(20))}, 0, "catalog_size"),
    ],
)
def test_evaluate_rejects_bad_input(
    rankings: dict[int, list[int]], catalog_size: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate_rankings(rankings, {1: _split(1, {1})}, catalog_size=catalog_size)


def test_evaluate_needs_a_user_with_relevant_items() -> None:
    with pytest.raises(ValueError, match="no user"):
        evaluate_rankings({1: list(range(20))}, {1: _split(1, set())}, catalog_size=100)


@settings(max_examples=50, deadline=None)
@given(
    relevant=st.sets(st.integers(0, 59), min_size=1, max_size=30),
    ranking=st.permutations(list(range(60))),
)
def test_metrics_are_bounded_and_perfect_ranking_is_ideal(
    relevant: set[int], ranking: list[int]
) -> None:
    splits = {1: _split(1, relevant)}
    metrics = evaluate_rankings({1: ranking}, splits, catalog_size=60)
    for value in (metrics.precision_at_10, metrics.recall_at_20, metrics.ndcg_at_10):
        assert 0.0 <= value <= 1.0 + 1e-12
    perfect = sorted(relevant) + [i for i in range(60) if i not in relevant]
    best = evaluate_rankings({1: perfect}, splits, catalog_size=60)
    assert best.ndcg_at_10 == pytest.approx(1.0)
    assert best.precision_at_10 == pytest.approx(min(len(relevant), 10) / 10)
    assert best.recall_at_20 == pytest.approx(min(len(relevant), 20) / len(relevant))
    assert best.ndcg_at_10 >= metrics.ndcg_at_10 - 1e-12


# --- popularity_rankings -------------------------------------------------------------------


def test_popularity_counts_training_ratings_of_at_least_4() -> None:
    ml = _dataset(
        # user 1: 5 ratings -> 4 training (items 10, 11, 12, 13), hold-out item 14
        (1, 10, 5.0, 1), (1, 11, 4.0, 2), (1, 12, 3.0, 3), (1, 13, 5.0, 4), (1, 14, 5.0, 5),
        # user 2: training items 11, 12, 20, 21; hold-out item 22
        (2, 11, 5.0, 1), (2, 12, 4.0, 2), (2, 20, 2.0, 3), (2, 21, 4.0, 4), (2, 22, 5.0, 5),
        # user 3: training item 10 only; hold-out item 12 rated 5 (must not count)
        (3, 10, 4.0, 1), (3, 12, 5.0, 2),
    )  # fmt: skip
    splits = chronological_split(ml)
    # Counts of training ratings >= 4: 10 -> 2, 11 -> 2, 12 -> 1, 13 -> 1, 21 -> 1, 20 -> 0.
    # Order by (-count, item id): 10, 11, 12, 13, 21, 20. Hold-out items 14, 22 never appear.
    rankings = popularity_rankings(splits, k=20)
    assert rankings[1] == [21, 20]
    assert rankings[2] == [10, 13]
    assert rankings[3] == [11, 12, 13, 21, 20]
    assert popularity_rankings(splits, k=2)[3] == [11, 12]


def test_popularity_rejects_bad_k() -> None:
    with pytest.raises(ValueError, match="k must be positive"):
        popularity_rankings({}, k=0)
