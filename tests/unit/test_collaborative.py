"""Federated collaborative filtering: the device's update and the server's round, by hand."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from omega_brain.collaborative import (
    InteractionWeights,
    model_update,
    preference_vector,
    quality_weight,
    score_items,
    steer_factor,
    update_direction,
    user_factor,
)
from omega_federation.item_factors import (
    UpdateAccumulator,
    initial_item_factors,
    orthonormalize,
    top_items,
)
from omega_protocol import patterns_pb2
from omega_protocol.model_update import (
    ModelUpdateError,
    decode_item_factor_update,
    encode_item_factor_update,
)

# Item factors of a 4-item catalog, 2 factors; item 2 is not in the model (zero row).
V = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [0.6, 0.8]], dtype=np.float32)


def test_preference_vector_weights_by_completion_keeps_best_and_normalizes() -> None:
    # item 0 success, item 1 half watched then abandoned (keeps 0.5), item 2 abandoned (0).
    items, p = preference_vector([(0, 0.95), (1, 0.5), (2, 0.1), (1, 0.1)], InteractionWeights())
    assert items.tolist() == [0, 1]
    assert p == pytest.approx([1 / math.sqrt(1.25), 0.5 / math.sqrt(1.25)], rel=1e-6)
    assert p.dtype == np.float32


def test_preference_vector_of_nothing_positive_is_empty() -> None:
    items, p = preference_vector([(3, 0.0)], InteractionWeights())
    assert items.size == 0 and p.size == 0


def test_user_factor_and_scores_by_hand() -> None:
    items = np.array([0, 1], dtype=np.int64)
    p = np.array([0.8, 0.6], dtype=np.float32)
    x = user_factor(V, items, p)
    assert x == pytest.approx([0.8, 1.2], rel=1e-6)  # [1*0.8, 2*0.6]
    assert score_items(V, x) == pytest.approx([0.8, 2.4, 0.0, 0.48 + 0.96], rel=1e-6)


def test_steer_factor_by_hand() -> None:
    x = np.array([3.0, 4.0], dtype=np.float32)  # |x| = 5
    x_context = np.array([0.0, 2.0], dtype=np.float32)  # |x_c| = 2
    steered = steer_factor(x, x_context, 0.5)
    assert steered.dtype == np.float32
    np.testing.assert_allclose(steered, [0.6, 0.8 + 0.5], rtol=1e-6)
    np.testing.assert_allclose(steer_factor(x, x_context, 1.0), [0.6, 1.8], rtol=1e-6)


def test_steer_factor_without_a_steer_is_the_factor_itself() -> None:
    x = np.array([3.0, 4.0], dtype=np.float32)
    zero = np.zeros(2, dtype=np.float32)
    assert steer_factor(x, np.ones(2, dtype=np.float32), 0.0) is x  # weight 0: exactly today's
    assert steer_factor(x, zero, 1.0) is x  # no viewing of the bucket the model knows
    assert steer_factor(zero, x, 1.0) is zero


@pytest.mark.parametrize(
    ("context", "weight", "message"),
    [
        (np.ones(3, dtype=np.float32), 1.0, "same"),
        (np.ones(2, dtype=np.float32), -0.5, "weight"),
        (np.ones(2, dtype=np.float32), float("inf"), "weight"),
    ],
)
def test_steer_factor_rejects_bad_arguments(
    context: npt.NDArray[np.float32], weight: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        steer_factor(np.ones(2, dtype=np.float32), context, weight)


def test_model_update_by_hand() -> None:
    # Items 0, 1 and 2; item 2 has no model row so it drops out and p is renormalized.
    items = np.array([0, 1, 2], dtype=np.int64)
    p = np.array([0.6, 0.6, 0.52915026], dtype=np.float32)  # |p| = 1
    update = model_update(V, items, p, clipping_norm=2.0, weight=0.5)
    assert update is not None
    assert update.items.tolist() == [0, 1]
    s = 1 / math.sqrt(2)
    assert update.p == pytest.approx([s, s], rel=1e-6)
    # x = [s, 2s], |x| = s * sqrt(5); direction = 0.5 * 2 * x / |x| = [1, 2] / sqrt(5).
    assert update.direction == pytest.approx([1 / math.sqrt(5), 2 / math.sqrt(5)], rel=1e-6)
    assert update.norm == pytest.approx(1.0, rel=1e-6)  # weight * clipping_norm
    assert update.dense_rows() == pytest.approx(np.outer(update.p, update.direction))


def test_model_update_nothing_to_send() -> None:
    p = np.array([1.0], dtype=np.float32)
    assert model_update(V, np.array([2], dtype=np.int64), p, clipping_norm=1.0) is None
    assert model_update(V, np.array([0], dtype=np.int64), p, 1.0, weight=0.0) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clipping_norm": 0.0}, "clipping_norm"),
        ({"clipping_norm": math.nan}, "clipping_norm"),
        ({"clipping_norm": 1.0, "weight": 1.5}, "weight"),
    ],
)
def test_model_update_rejects_bad_arguments(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model_update(V, np.array([0], dtype=np.int64), np.ones(1, np.float32), **kwargs)


def test_model_update_rejects_positions_outside_the_model() -> None:
    with pytest.raises(ValueError, match="positions"):
        user_factor(V, np.array([4], dtype=np.int64), np.ones(1, np.float32))


def test_quality_weight_is_success_times_samples_clipped() -> None:
    assert quality_weight(0.5, 4, full_weight_at=10.0) == pytest.approx(0.2)
    assert quality_weight(0.9, 100, full_weight_at=10.0) == 1.0
    assert quality_weight(0.0, 100, full_weight_at=1.0) == 0.0
    with pytest.raises(ValueError):
        quality_weight(1.5, 1, 1.0)


def test_interaction_weights_validate() -> None:
    with pytest.raises(ValueError):
        InteractionWeights(success=0.0, partial=0.0, failure=0.0)
    with pytest.raises(ValueError):
        InteractionWeights(partial=-1.0)
    with pytest.raises(ValueError):
        InteractionWeights(failure_completion=0.9, success_completion=0.8)


def test_server_sum_by_hand_drops_inactive_rows_and_clips() -> None:
    acc = UpdateAccumulator(np.array([0, 1, 3]), n_items=4, dim=2, clipping_norm=1.0)
    # Norm 1: added as is.
    scale = acc.add(np.array([0, 1]), np.array([0.8, 0.6], np.float32), np.array([1.0, 0.0]))
    assert scale == pytest.approx(1.0, rel=1e-6)
    # Item 2 is not active and is dropped; what is left (item 3: 2 * [0, 3]) has norm 6 -> 1/6.
    scale = acc.add(np.array([2, 3]), np.array([1.0, 2.0], np.float32), np.array([0.0, 3.0]))
    assert scale == pytest.approx(1 / 6)
    assert acc.devices == 2 and acc.clipped == 1
    expected = np.array([[0.8, 0.0], [0.6, 0.0], [0.0, 1.0]])  # rows of items 0, 1, 3
    assert acc.noisy_sum(0.0, None) == pytest.approx(expected)


def test_one_device_moves_the_sum_by_at_most_the_clipping_norm() -> None:
    rng = np.random.default_rng(7)
    acc = UpdateAccumulator(np.arange(50), n_items=50, dim=8, clipping_norm=0.5)
    for _ in range(20):
        items = rng.choice(50, size=10, replace=False)
        acc.add(items, rng.random(10).astype(np.float32), rng.standard_normal(8))
    before = acc.noisy_sum(0.0, None)
    huge = np.full(50, 1e30, dtype=np.float32)
    acc.add(np.arange(50), huge, np.full(8, 1e30))
    moved = np.linalg.norm(acc.noisy_sum(0.0, None) - before)
    assert moved == pytest.approx(0.5, rel=1e-9)


def test_bad_update_is_rejected_and_adds_nothing() -> None:
    acc = UpdateAccumulator(np.array([0, 1]), n_items=2, dim=2, clipping_norm=1.0)
    for items, p, direction in [
        (np.array([0, 0]), np.ones(2), np.ones(2)),  # repeated item
        (np.array([5]), np.ones(1), np.ones(2)),  # outside the catalog
        (np.array([0]), np.array([math.nan]), np.ones(2)),  # not finite
        (np.array([0]), np.ones(1), np.ones(3)),  # wrong dimension
    ]:
        with pytest.raises(ValueError):
            acc.add(items, p.astype(np.float32), direction)
    assert acc.devices == 0
    assert not acc.noisy_sum(0.0, None).any()


def test_noise_has_std_noise_multiplier_times_clipping_norm() -> None:
    acc = UpdateAccumulator(np.arange(4000), n_items=4000, dim=25, clipping_norm=0.5)
    noisy = acc.noisy_sum(2.0, np.random.default_rng(1))
    # 100,000 draws: the sample std is within 1% of sigma = 2.0 * 0.5 with overwhelming odds.
    assert float(noisy.std()) == pytest.approx(1.0, rel=0.01)
    assert abs(float(noisy.mean())) < 0.01


def test_orthonormalize_is_a_deterministic_orthonormal_basis() -> None:
    m = np.random.default_rng(3).standard_normal((30, 4))
    q = orthonormalize(m)
    assert q.T @ q == pytest.approx(np.eye(4), abs=1e-5)
    # Same column space: projecting m onto span(q) gives m back.
    assert q @ (q.T @ m) == pytest.approx(m, abs=1e-4)
    assert np.array_equal(q, orthonormalize(m.copy()))
    assert (np.diag(q.T @ m) >= 0).all()  # sign convention: R has a non-negative diagonal


def test_initial_factors_are_zero_outside_active_items() -> None:
    factors = initial_item_factors(10, np.array([1, 4, 7]), 2, seed=0)
    assert not factors[[0, 2, 3, 5, 6, 8, 9]].any()
    assert factors[[1, 4, 7]].T @ factors[[1, 4, 7]] == pytest.approx(np.eye(2), abs=1e-6)
    with pytest.raises(ValueError):
        initial_item_factors(10, np.array([1]), 2, seed=0)


def test_top_items_breaks_ties_by_position() -> None:
    assert top_items(np.array([1.0, 3.0, 3.0, 0.5, 2.0]), 3).tolist() == [1, 2, 4]
    with pytest.raises(ValueError):
        top_items(np.array([1.0, math.inf]), 1)


def test_power_iteration_recovers_the_top_subspace_of_planted_clusters() -> None:
    """Devices watching within two clusters: a few clean rounds span the clusters' indicators."""
    rng = np.random.default_rng(0)
    n_items, d = 40, 2
    clusters = [np.arange(0, 20), np.arange(20, 40)]
    devices = []
    for u in range(200):
        watched = rng.choice(clusters[u % 2], size=8, replace=False)
        devices.append(preference_vector([(int(i), 1.0) for i in watched], InteractionWeights()))
    active = np.arange(n_items)
    factors = initial_item_factors(n_items, active, d, seed=1)
    for _ in range(6):
        acc = UpdateAccumulator(active, n_items, d, clipping_norm=1.0)
        for items, p in devices:
            update = model_update(factors, items, p, clipping_norm=1.0)
            assert update is not None
            acc.add(update.items, update.p, update.direction)
        factors = orthonormalize(acc.noisy_sum(0.0, None))
    indicator = np.zeros((n_items, 2))
    indicator[:20, 0] = indicator[20:, 1] = 1 / math.sqrt(20)
    # Principal angles between span(factors) and span(indicator) are ~0.
    singular = np.linalg.svd(factors.T @ indicator, compute_uv=False)
    assert singular.min() > 0.99


def test_wire_direction_gives_the_same_active_rows_as_model_update() -> None:
    items = np.array([0, 1, 2], dtype=np.int64)
    p = np.array([0.6, 0.6, 0.52915026], dtype=np.float32)
    direction = update_direction(V, items, p, weight=0.5)
    update = model_update(V, items, p, clipping_norm=1.0, weight=0.5)
    assert direction is not None and update is not None
    # The server keeps the active rows (items 0 and 1) of p ⊗ direction.
    assert np.outer(p[:2], direction) == pytest.approx(update.dense_rows(), rel=1e-5)
    acc = UpdateAccumulator(np.array([0, 1, 3]), n_items=4, dim=2, clipping_norm=1.0)
    assert acc.add(items, p, direction) == pytest.approx(1.0)  # norm 0.5: not clipped
    assert np.linalg.norm(acc.noisy_sum(0.0, None)) == pytest.approx(0.5, rel=1e-5)


def test_item_factor_update_round_trip_and_rejections() -> None:
    message = encode_item_factor_update(3, ["a", "b"], [0.8, 0.6], [0.5, -0.25])
    decoded = decode_item_factor_update(message, expected_factors=2)
    assert decoded.model_version == 3 and decoded.content_ids == ("a", "b")
    assert decoded.weights == pytest.approx([0.8, 0.6], abs=0.01)
    assert decoded.direction is not None
    assert decoded.direction == pytest.approx([0.5, -0.25], abs=0.005)
    no_model = decode_item_factor_update(encode_item_factor_update(0, ["a"], [1.0], None))
    assert no_model.direction is None
    with pytest.raises(ModelUpdateError, match="factors"):
        decode_item_factor_update(message, expected_factors=3)
    for ids, weights, direction, version in [
        (["a", "a"], [0.6, 0.8], None, 0),  # repeated id
        (["a", "b"], [0.8, 0.8], None, 0),  # norm above 1
        (["a", "b"], [0.8, -0.6], None, 0),  # negative weight
        ([""], [1.0], None, 0),  # empty id
        (["a\x00"], [1.0], None, 0),  # NUL in an id
        (["a"], [1.0], [1.0], 0),  # direction without a model version
        (["a"], [1.0], [1e7], 1),  # absurd direction
    ]:
        with pytest.raises(ModelUpdateError):
            encode_item_factor_update(version, ids, weights, direction)
    bad = patterns_pb2.ItemFactorUpdate(model_version=1, content_ids=["a"])
    bad.weights.CopyFrom(message.weights)  # 2 values for 1 id
    with pytest.raises(ModelUpdateError, match="weights"):
        decode_item_factor_update(bad)
