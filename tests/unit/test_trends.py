"""Trend scores (``omega_federation.trends``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from omega_federation.trends import trend_scores


def test_decay_by_hand() -> None:
    # a: 10 * 0.95^2 + 3 = 10 * 0.9025 + 3 = 12.025
    # b: 0 + 5 = 5 ; c: 4 * 0.9025 = 3.61 (no new views)
    scores = trend_scores({"a": 3, "b": 5}, {"a": 10.0, "c": 4.0}, 2.0)
    assert scores == [
        ("a", pytest.approx(12.025)),
        ("b", 5.0),
        ("c", pytest.approx(3.61)),
    ]


def test_fractional_hours_and_custom_decay() -> None:
    # 8 * 0.5^1.5 = 8 * 0.353553 = 2.828427
    [(cid, score)] = trend_scores({}, {"x": 8.0}, 1.5, decay_per_hour=0.5)
    assert cid == "x" and score == pytest.approx(8.0 * 0.5**1.5)
    # no time elapsed: no decay
    assert trend_scores({"x": 1}, {"x": 8.0}, 0.0) == [("x", 9.0)]
    # infinitely long ago: only the new views count
    assert trend_scores({"x": 1}, {"x": 8.0}, math.inf) == [("x", 1.0)]


def test_ordering_ties_by_id_and_top_n() -> None:
    views = {"d": 2, "b": 7, "a": 7, "c": 1, "e": 7}
    assert trend_scores(views, {}, 1.0) == [
        ("a", 7.0),
        ("b", 7.0),
        ("e", 7.0),
        ("d", 2.0),
        ("c", 1.0),
    ]
    assert [cid for cid, _ in trend_scores(views, {}, 1.0, top_n=2)] == ["a", "b"]
    assert trend_scores(views, {}, 1.0, top_n=0) == []


def test_zero_scores_are_dropped() -> None:
    assert trend_scores({"a": 0, "b": 1}, {"c": 0.0}, 1.0) == [("b", 1.0)]
    assert trend_scores({}, {}, 1.0) == []


def test_noise_is_deterministic_nonnegative_and_order_independent() -> None:
    views = {f"c{i:03d}": i % 5 for i in range(200)}
    reordered = dict(reversed(list(views.items())))
    a = trend_scores(views, {}, 1.0, noise_scale=2.0, rng=np.random.default_rng(3), top_n=500)
    b = trend_scores(reordered, {}, 1.0, noise_scale=2.0, rng=np.random.default_rng(3), top_n=500)
    assert a == b
    assert all(score > 0 for _, score in a)
    assert a != trend_scores(views, {}, 1.0)
    # zero counts plus noise are clipped at 0: only positive draws survive, about half of them
    zeros = trend_scores({f"z{i}": 0 for i in range(1000)}, {}, 1.0, noise_scale=1.0,
                         rng=np.random.default_rng(0), top_n=1000)  # fmt: skip
    assert 400 < len(zeros) < 600


def test_noise_magnitude() -> None:
    views = {f"c{i:04d}": 1000 for i in range(4000)}
    scores = trend_scores(views, {}, 1.0, noise_scale=3.0, rng=np.random.default_rng(1), top_n=5000)
    values = np.array([s for _, s in scores])
    # Laplace(b) has standard deviation sqrt(2) * b
    assert np.std(values) == pytest.approx(math.sqrt(2.0) * 3.0, rel=0.1)
    assert np.mean(values) == pytest.approx(1000.0, abs=0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hours_since_last": -1.0}, "hours_since_last"),
        ({"hours_since_last": math.nan}, "hours_since_last"),
        ({"decay_per_hour": 0.0}, "decay_per_hour"),
        ({"decay_per_hour": 1.5}, "decay_per_hour"),
        ({"noise_scale": -1.0}, "noise_scale"),
        ({"noise_scale": 1.0}, "rng"),
        ({"top_n": -1}, "top_n"),
        ({"view_counts": {"a": -1}}, "view counts"),
        ({"previous": {"a": math.nan}}, "previous"),
        ({"previous": {"a": -2.0}}, "previous"),
    ],
)
def test_validation(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"view_counts": {"a": 1}, "previous": {}, "hours_since_last": 1.0}
    with pytest.raises(ValueError, match=message):
        trend_scores(**(args | kwargs))  # type: ignore[arg-type]
