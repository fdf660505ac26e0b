"""The context steer of the in-process harness (omega_simulator.inprocess), on a tiny dataset.

Two planted tastes: A (items 1..10) and B (items 11..20). Most devices like one taste; the
"mixed" device rates A in the evening and B in the morning, and its recommendation moment
(its first evaluated rating) is a morning.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from omega_brain.collaborative import InteractionWeights, score_items, user_factor
from omega_data.movielens import Rating
from omega_federation.item_factors import central_item_factors
from omega_protocol import bucket_from_timestamp
from omega_simulator.inprocess import Config, Dataset, Part, central_scores, federated_scores

TUESDAY_NIGHT = 1_700_000_000  # seconds: Tuesday 2023-11-14 22:13 UTC
EVENING = TUESDAY_NIGHT - 3 * 3600  # 19:13 UTC
MORNING = TUESDAY_NIGHT - 13 * 3600  # 09:13 UTC
ITEMS = list(range(1, 21))
TASTE_A = list(range(1, 11))
TASTE_B = list(range(11, 21))
MIXED = 0  # index of the mixed device in the dataset


def ratings(user: int, items: list[int], start: int) -> list[Rating]:
    return [Rating(user, item, 5.0, start + 60 * n) for n, item in enumerate(items)]


def dataset(fit_shift_seconds: int = 0) -> Dataset:
    """The mixed device first, then 6 devices per taste (each skips a different item)."""
    parts = [
        Part(
            ratings(1, TASTE_A[:6], EVENING) + ratings(1, TASTE_B[:3], MORNING),
            ratings(1, [TASTE_B[5], TASTE_A[7]], MORNING + 86_400),
        )
    ]
    for n in range(6):
        for taste in (TASTE_A, TASTE_B):
            user = len(parts) + 1
            fit = ratings(user, [i for i in taste if i != taste[n]], EVENING - 86_400)
            parts.append(Part(fit, ratings(user, [taste[n]], EVENING)))
    shifted = [
        Part([replace(r, timestamp=r.timestamp + fit_shift_seconds) for r in p.fit], p.evaluated)
        for p in parts
    ]
    return Dataset(shifted, ITEMS)


def top_item(scores: np.ndarray, data: Dataset, user: int) -> int:
    s = scores.copy()
    s[[data.position[r.item_id] for r in data.parts[user].fit]] = -np.inf
    return data.item_ids[int(np.argmax(s))]


CENTRAL = Config(factors=2, active_items=20)


def test_context_preferences_are_the_fit_ratings_of_the_moments_bucket() -> None:
    data = dataset()
    weights = InteractionWeights()
    moment = bucket_from_timestamp(MORNING * 1000 + 86_400_000)
    assert moment.name == "morning/weekday"
    items, p = data.context_preferences(weights, 0)[MIXED]
    assert [data.item_ids[i] for i in items] == TASTE_B[:3]
    np.testing.assert_allclose(p, np.full(3, 1 / np.sqrt(3)), rtol=1e-6)
    # Four hours east of UTC the morning ratings (09:13 -> 13:13) are an afternoon, and so is
    # the moment: the same ratings.
    items, _ = data.context_preferences(weights, 240)[MIXED]
    assert [data.item_ids[i] for i in items] == TASTE_B[:3]
    # Ten hours west the evening ratings (19:13 -> 09:13) are a morning, but the moment and the
    # morning ratings are nights (23:13 the day before): still the morning ratings.
    items, _ = data.context_preferences(weights, -600)[MIXED]
    assert [data.item_ids[i] for i in items] == TASTE_B[:3]
    # A moment at night, or no evaluated rating at all: no rating in the bucket.
    night = Dataset(
        [
            Part(data.parts[MIXED].fit, ratings(1, [TASTE_B[5]], TUESDAY_NIGHT)),
            Part(data.parts[MIXED].fit, []),
        ],
        ITEMS,
    )
    for items, p in night.context_preferences(weights, 0):
        assert items.size == 0 and p.size == 0


def test_zero_context_weight_is_exactly_the_unsteered_central_scores() -> None:
    data = dataset()
    prefs = data.preferences(InteractionWeights())
    factors = central_item_factors(((i, p) for i, p, _, _ in prefs), data.n_items, 2)
    expected = [score_items(factors, user_factor(factors, i, p)) for i, p, _, _ in prefs]
    got = central_scores(data, CENTRAL)
    assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_zero_context_weight_ignores_the_buckets(noise: float) -> None:
    config = Config(factors=2, active_items=20, rounds=3)
    here, shifted = dataset(), dataset(fit_shift_seconds=12 * 3600)  # other buckets
    plain = federated_scores(here, config, noise, seed=3)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(plain, federated_scores(shifted, config, noise, seed=3), strict=True)
    )
    steered = replace(config, context_weight=1.0)
    a = federated_scores(here, steered, noise, seed=3)[MIXED]
    b = federated_scores(shifted, steered, noise, seed=3)[MIXED]
    assert not np.array_equal(a, b)


def test_context_weight_ranks_the_moments_taste_first() -> None:
    data = dataset()
    plain = central_scores(data, CENTRAL)[MIXED]
    assert top_item(plain, data, MIXED) in TASTE_A  # 6 ratings of A, 3 of B
    steered = central_scores(data, replace(CENTRAL, context_weight=1.0))[MIXED]
    assert top_item(steered, data, MIXED) in TASTE_B  # the morning's taste
    # Devices whose every rating shares the moment's bucket are steered towards their own
    # factor: the same scores up to scale.
    for user in range(1, len(data.parts)):
        a = central_scores(data, CENTRAL)[user]
        b = central_scores(data, replace(CENTRAL, context_weight=1.0))[user]
        np.testing.assert_allclose(a / np.abs(a).max(), b / np.abs(b).max(), atol=1e-5)
