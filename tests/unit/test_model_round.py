"""The collaborative model's part of a round: create, step, privacy charged once per release."""

from __future__ import annotations

import math

import numpy as np
import pytest

from omega_brain.collaborative import InteractionWeights, preference_vector, update_direction
from omega_federation.accounting import RoundMechanism, epsilon_for
from omega_federation.model_round import ModelSettings, ModelState, model_round
from omega_protocol import decode_embedding
from omega_protocol.model_update import ItemFactorContribution

CATALOG = [f"item-{i:02d}" for i in range(40)]


def _settings(z: float = 0.0, budget: float = math.inf) -> ModelSettings:
    return ModelSettings(
        factors=2, active_items=30, noise_multiplier=z, delta=1e-5, epsilon_budget=budget
    )


def _fleet(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """200 devices watching 8 items within one of two clusters (items 0-19, 20-39)."""
    rng = np.random.default_rng(seed)
    fleet = []
    for u in range(200):
        cluster = np.arange(0, 20) if u % 2 == 0 else np.arange(20, 40)
        watched = rng.choice(cluster, size=8, replace=False)
        fleet.append(preference_vector([(int(i), 1.0) for i in watched], InteractionWeights()))
    return fleet


def _contributions(
    fleet: list[tuple[np.ndarray, np.ndarray]], state: ModelState, factors: np.ndarray | None
) -> list[ItemFactorContribution]:
    out = []
    for items, p in fleet:
        direction = None if factors is None else update_direction(factors, items, p)
        out.append(
            ItemFactorContribution(
                model_version=state.version,
                content_ids=tuple(CATALOG[i] for i in items),
                weights=p,
                direction=direction,
            )
        )
    return out


def _matrix(state: ModelState, rows: list) -> np.ndarray:  # type: ignore[type-arg]
    position = {c: i for i, c in enumerate(CATALOG)}
    factors = np.zeros((len(CATALOG), state.factors), dtype=np.float32)
    for row in rows:
        factors[position[row.content_id]] = decode_embedding(row.factor, state.factors)
    return factors


def test_first_round_creates_a_model_over_the_most_watched_items() -> None:
    fleet = _fleet()
    # Nobody watches items 38 and 39: they must not be among the 30 active items (no noise).
    fleet = [(i[i < 38], p[i < 38] / np.linalg.norm(p[i < 38])) for i, p in fleet]
    result = model_round(
        7,
        ModelState(),
        _contributions(fleet, ModelState(), None),
        CATALOG,
        _settings(),
        np.random.default_rng(0),
    )
    assert result.action == "created"
    assert result.state.version == 7 and result.state.factors == 2
    assert len(result.state.active) == 30
    assert {"item-38", "item-39"}.isdisjoint(result.state.active)
    assert [r.content_id for r in result.rows] == result.state.active
    assert all(r.model_version == 7 for r in result.rows)
    assert result.devices == 200
    # The count release's noisy counts (exact here) are returned for the trending list:
    # per item, the sum of the devices' unit preference weights; unwatched items are absent.
    exact: dict[str, float] = {}
    for items, p in fleet:
        for i, w in zip(items.tolist(), p.tolist(), strict=True):
            exact[CATALOG[i]] = exact.get(CATALOG[i], 0.0) + w
    assert result.item_counts.keys() == exact.keys()
    assert all(result.item_counts[c] == pytest.approx(v, rel=1e-5) for c, v in exact.items())


def test_count_release_noise_has_the_multiplier_s_scale() -> None:
    # Nobody contributes: every catalog item's count is pure N(0, z^2) noise (sensitivity 1),
    # and only the positive ones are kept for trending.
    z = 3.0
    one = [
        ItemFactorContribution(
            model_version=0,
            content_ids=(CATALOG[0],),
            weights=np.ones(1, dtype=np.float32),
            direction=None,
        )
    ]
    draws = []
    for seed in range(60):
        result = model_round(
            1, ModelState(), one, CATALOG, _settings(z=z), np.random.default_rng(seed)
        )
        assert all(v > 0 for v in result.item_counts.values())
        draws.extend(v for c, v in result.item_counts.items() if c != CATALOG[0])
    # E[X | X > 0] = z sqrt(2 / pi) for X ~ N(0, z^2) (half-normal mean).
    assert np.mean(draws) == pytest.approx(z * math.sqrt(2 / math.pi), rel=0.08)


def test_noise_free_steps_learn_the_clusters() -> None:
    fleet = _fleet()
    state = ModelState()
    rng = np.random.default_rng(0)
    result = model_round(1, state, _contributions(fleet, state, None), CATALOG, _settings(), rng)
    state, factors = result.state, _matrix(result.state, result.rows)
    for round_id in range(2, 8):
        result = model_round(
            round_id, state, _contributions(fleet, state, factors), CATALOG, _settings(), rng
        )
        assert result.action == "stepped" and result.state.version == round_id
        state, factors = result.state, _matrix(result.state, result.rows)
    # The active items' factors span the two cluster indicators (restricted to active rows).
    active = [CATALOG.index(c) for c in state.active]
    indicator = np.zeros((len(CATALOG), 2))
    indicator[:20, 0] = indicator[20:, 1] = 1.0
    indicator = indicator[active] / np.linalg.norm(indicator[active], axis=0)
    singular = np.linalg.svd(factors[active].T @ indicator, compute_uv=False)
    assert singular.min() > 0.98


def test_updates_for_an_old_model_version_are_ignored() -> None:
    fleet = _fleet()
    rng = np.random.default_rng(0)
    created = model_round(
        1, ModelState(), _contributions(fleet, ModelState(), None), CATALOG, _settings(), rng
    )
    stale = _contributions(fleet, ModelState(version=0), None)  # version 0, no direction
    result = model_round(2, created.state, stale, CATALOG, _settings(), rng)
    assert result.action == "skipped_no_updates" and result.rows == []
    assert result.state.version == 1


def test_each_release_is_charged_once_and_the_budget_is_enforced() -> None:
    z = 1.5
    one = epsilon_for([RoundMechanism((z,))], 1e-5)
    two = epsilon_for([RoundMechanism((z,))] * 2, 1e-5)
    budget = (two + epsilon_for([RoundMechanism((z,))] * 3, 1e-5)) / 2  # room for 2 releases
    fleet = _fleet()
    rng = np.random.default_rng(1)
    settings = _settings(z=z, budget=budget)
    first = model_round(
        1, ModelState(), _contributions(fleet, ModelState(), None), CATALOG, settings, rng
    )
    assert first.action == "created"
    assert first.epsilon_round == pytest.approx(one)
    assert first.state.ledger is not None and first.state.ledger.epsilon == pytest.approx(one)
    # The ledger survives a JSON round trip (the worker checkpoints it between rounds).
    state = ModelState.from_dict(first.state.to_dict())
    factors = _matrix(state, first.rows)
    second = model_round(2, state, _contributions(fleet, state, factors), CATALOG, settings, rng)
    assert second.action == "stepped"
    assert second.state.ledger is not None
    assert second.state.ledger.epsilon == pytest.approx(two)
    factors = _matrix(second.state, second.rows)
    third = model_round(
        3, second.state, _contributions(fleet, second.state, factors), CATALOG, settings, rng
    )
    assert third.action == "skipped_budget" and third.rows == []
    assert third.state.ledger is not None and third.state.ledger.epsilon == pytest.approx(two)
    assert third.state.version == 2


def test_noise_reaches_the_published_factors() -> None:
    fleet = _fleet()
    state = ModelState()
    first = model_round(
        1, state, _contributions(fleet, state, None), CATALOG, _settings(), np.random.default_rng(0)
    )
    factors = _matrix(first.state, first.rows)
    updates = _contributions(fleet, first.state, factors)
    clean = model_round(2, first.state, updates, CATALOG, _settings(0.0), np.random.default_rng(5))
    noisy = model_round(2, first.state, updates, CATALOG, _settings(50.0), np.random.default_rng(5))
    a, b = _matrix(clean.state, clean.rows), _matrix(noisy.state, noisy.rows)
    # Huge noise: the noisy subspace is far from the clean one.
    singular = np.linalg.svd(a.T @ b, compute_uv=False)
    assert singular.min() < 0.9
