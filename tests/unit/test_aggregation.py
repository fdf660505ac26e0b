"""Federated averaging (``omega_federation.aggregation``) and its codebook.

Hand-computed examples use 384-dim embeddings whose only non-zero entries are the first two, and a
codebook whose centroids are the first two unit axes, so every number can be checked on paper.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omega_federation.aggregation import (
    AggregationResult,
    Contributions,
    federated_average,
    l1_sensitivity,
    l2_sensitivity,
    selection_margin,
)
from omega_federation.codebook import Codebook
from omega_federation.privacy import PrivacyAccountant, PrivacyParams, calibrate, gaussian_sigma

DIM = 384
AXES = Codebook(np.eye(2, DIM))  # centroid 0 = x axis, centroid 1 = y axis


def vec(x: float, y: float, dim: int = DIM) -> npt.NDArray[np.float32]:
    """A 2-D-like unit vector padded with zeros."""
    out = np.zeros(dim, dtype=np.float32)
    out[:2] = (x, y)
    return out


def batch(
    rows: list[tuple[object, int, tuple[float, float], float, int]], dim: int = DIM
) -> Contributions:
    """Rows of (device, bucket, (x, y), success_rate, sample_count)."""
    if not rows:
        return Contributions.empty(dim)
    return Contributions(
        device_keys=np.array([r[0] for r in rows], dtype=object),
        buckets=np.array([r[1] for r in rows], dtype=np.int32),
        embeddings=np.stack([vec(*r[2], dim=dim) for r in rows]),
        success_rates=np.array([r[3] for r in rows], dtype=np.float32),
        sample_counts=np.array([r[4] for r in rows], dtype=np.int64),
    )


def run(
    data: Contributions,
    *,
    min_sources: int = 3,
    privacy: PrivacyParams | None = None,
    codebook: Codebook = AXES,
    seed: int = 0,
    accountant: PrivacyAccountant | None = None,
) -> AggregationResult:
    return federated_average(
        data,
        codebook,
        min_sources=min_sources,
        privacy=privacy,
        accountant=accountant,
        rng=np.random.default_rng(seed),
    )


NO_NOISE = math.inf

# Group "0:0": three devices near the x axis. w = success_rate x sample_count.
#   A: e = (1, 0),      s = 0.65, n = 10 -> w = 6.5
#   B: e = (0.8, 0.6),  s = 1.0,  n = 20 -> w = 20
#   C: e = (0.6, -0.8), s = 0.5,  n = 5  -> w = 2.5
# Group "1:1": two devices near the y axis (dropped with min_sources = 3).
HAND_ROWS: list[tuple[object, int, tuple[float, float], float, int]] = [
    ("A", 0, (1.0, 0.0), 0.65, 10),
    ("B", 0, (0.8, 0.6), 1.0, 20),
    ("C", 0, (0.6, -0.8), 0.5, 5),
    ("A", 1, (0.0, 1.0), 1.0, 3),
    ("B", 1, (0.6, 0.8), 1.0, 3),
]


def test_fedavg_hand_computed() -> None:
    result = run(batch(HAND_ROWS), min_sources=3)
    # sum w   = 6.5 + 20 + 2.5 = 29
    # sum w e = 6.5 (1, 0) + 20 (0.8, 0.6) + 2.5 (0.6, -0.8) = (6.5 + 16 + 1.5, 12 - 2) = (24, 10)
    # |(24, 10)| = 26 -> embedding (12/13, 5/13)
    # quality = 29 / 3
    # success = (6.5 * 0.65 + 20 * 1.0 + 2.5 * 0.5) / 29 = (4.225 + 20 + 1.25) / 29 = 25.475 / 29
    assert result.privacy is None
    assert (result.groups_total, result.groups_kept, result.contributions_used) == (2, 1, 3)
    [p] = result.patterns
    assert (p.pattern_key, p.bucket, p.centroid, p.source_count) == ("0:0", 0, 0, 3)
    np.testing.assert_allclose(p.embedding, vec(12 / 13, 5 / 13), atol=1e-6)
    assert p.embedding.dtype == np.float32 and p.embedding.shape == (DIM,)
    assert p.quality == pytest.approx(29 / 3, rel=1e-6)
    assert p.success_rate == pytest.approx(25.475 / 29, rel=1e-6)


def test_min_sources_filters_small_groups() -> None:
    result = run(batch(HAND_ROWS), min_sources=2)
    assert [p.pattern_key for p in result.patterns] == ["0:0", "1:1"]
    two = result.patterns[1]
    # (3 (0, 1) + 3 (0.6, 0.8)) / |.| = (1.8, 5.4) / 5.6921 ; quality 6 / 2 = 3
    np.testing.assert_allclose(two.embedding[:2], np.array([1.8, 5.4]) / math.hypot(1.8, 5.4))
    assert (two.source_count, two.success_rate) == (2, 1.0)
    assert two.quality == pytest.approx(3.0)
    assert run(batch(HAND_ROWS), min_sources=4).patterns == []
    assert run(batch(HAND_ROWS), min_sources=4).groups_total == 2


def test_clipping_hand_computed() -> None:
    privacy = PrivacyParams(epsilon=NO_NOISE, delta=0.0, clipping_norm=5.0)
    result = run(batch(HAND_ROWS), privacy=privacy)
    # clipped: A 6.5 -> 5, B 20 -> 5, C 2.5 stays; sum w = 12.5, quality = 12.5 / 3
    # sum w e = 5 (1, 0) + 5 (0.8, 0.6) + 2.5 (0.6, -0.8) = (10.5, 1.0)
    # sum w s scales with w: 6.5*0.65*(5/6.5) + 20*(5/20) + 1.25 = 3.25 + 5 + 1.25 = 9.5 -> 0.76
    [p] = result.patterns
    np.testing.assert_allclose(p.embedding[:2], np.array([10.5, 1.0]) / math.sqrt(111.25))
    assert p.quality == pytest.approx(12.5 / 3, rel=1e-6)
    assert p.success_rate == pytest.approx(0.76, rel=1e-6)
    assert result.privacy is not None and result.privacy.noise_multiplier == 0.0
    assert math.isinf(result.privacy.epsilon)


def test_duplicate_device_rows_count_once_and_merge_before_clipping() -> None:
    rows: list[tuple[object, int, tuple[float, float], float, int]] = [
        ("A", 0, (1.0, 0.0), 1.0, 4),  # w = 4
        ("A", 0, (0.8, 0.6), 0.5, 10),  # w = 5, same device and group
        ("B", 0, (0.8, 0.6), 1.0, 20),  # w = 20
    ]
    # Three rows but two devices: not enough for k = 3.
    assert run(batch(rows), min_sources=3).patterns == []
    [p] = run(batch(rows), min_sources=2).patterns
    # sum w = 29, sum w e = (4 + 4 + 16, 3 + 12) = (24, 15), success = (4 + 2.5 + 20) / 29
    assert p.source_count == 2
    np.testing.assert_allclose(p.embedding[:2], np.array([24.0, 15.0]) / math.sqrt(801.0))
    assert p.quality == pytest.approx(29 / 2)
    assert p.success_rate == pytest.approx(26.5 / 29)

    # C = 6: A's merged weight 9 is clipped to 6 (scale 2/3); clipping each row (4, 5) would not
    # clip at all. B: 20 -> 6 (scale 0.3).
    # sum w = 12 -> quality 6; sum w e = (2/3)(8, 3) + 0.3 (16, 12) = (16/3 + 4.8, 2 + 3.6)
    # sum w s = (2/3)(4 + 2.5) + 6 = 31/3 -> success (31/3) / 12 = 31/36
    privacy = PrivacyParams(epsilon=NO_NOISE, delta=0.0, clipping_norm=6.0)
    [q] = run(batch(rows), min_sources=2, privacy=privacy).patterns
    expected = np.array([16 / 3 + 4.8, 5.6])
    np.testing.assert_allclose(q.embedding[:2], expected / np.linalg.norm(expected), rtol=1e-6)
    assert q.quality == pytest.approx(6.0)
    assert q.success_rate == pytest.approx(31 / 36)


def test_max_patterns_per_device_keeps_heaviest_groups() -> None:
    rows: list[tuple[object, int, tuple[float, float], float, int]] = [
        ("D", 0, (1.0, 0.0), 1.0, 3),  # w = 3, kept
        ("D", 1, (1.0, 0.0), 1.0, 1),  # w = 1, dropped (lightest)
        ("D", 2, (1.0, 0.0), 1.0, 2),  # w = 2, kept
        ("E", 3, (1.0, 0.0), 1.0, 5),  # w = 5 ties with the next one
        ("E", 4, (1.0, 0.0), 1.0, 5),
        ("E", 5, (1.0, 0.0), 1.0, 5),  # ties: lower group key wins, so bucket 5 is dropped
    ]
    privacy = PrivacyParams(
        epsilon=NO_NOISE, delta=0.0, clipping_norm=100.0, max_patterns_per_device=2
    )
    result = run(batch(rows), min_sources=1, privacy=privacy)
    assert [p.pattern_key for p in result.patterns] == ["0:0", "2:0", "3:0", "4:0"]
    assert result.groups_total == 4 and result.contributions_used == 4
    # Without privacy nothing is capped.
    assert run(batch(rows), min_sources=1).groups_kept == 6


def test_output_sorted_by_pattern_key_string() -> None:
    rows: list[tuple[object, int, tuple[float, float], float, int]] = [
        (i, b, (1.0, 0.0), 1.0, 1) for i, b in enumerate([10, 2, 1, 2, 10, 1])
    ]
    keys = [p.pattern_key for p in run(batch(rows), min_sources=1).patterns]
    assert keys == ["10:0", "1:0", "2:0"]


def test_empty_batch() -> None:
    acc = PrivacyAccountant()
    privacy = PrivacyParams(epsilon=1.0, delta=1e-6, clipping_norm=1.0)
    result = run(Contributions.empty(), privacy=privacy, accountant=acc)
    assert (result.patterns, result.groups_total, result.contributions_used) == ([], 0, 0)
    assert acc.rounds == 1  # an empty release is still a release


def test_zero_weight_group_is_not_published() -> None:
    rows: list[tuple[object, int, tuple[float, float], float, int]] = [
        (i, 0, (1.0, 0.0), 0.0, 5) for i in range(3)
    ]
    assert run(batch(rows)).patterns == []


def test_cancelling_embeddings_fall_back_to_centroid() -> None:
    codebook = Codebook(np.stack([vec(0.6, 0.8), vec(0.6, -0.8)]))
    rows: list[tuple[object, int, tuple[float, float], float, int]] = [
        ("a", 0, (1.0, 0.0), 1.0, 1),
        ("b", 0, (-1.0, 0.0), 1.0, 1),  # sum w e = 0: no direction
    ]
    [p] = run(batch(rows), min_sources=2, codebook=codebook).patterns
    assert p.embedding.tolist() == codebook.centroids[p.centroid].tolist()


def test_embeddings_are_renormalized() -> None:
    rows = batch([("a", 0, (0.8, 0.6), 1.0, 1), ("b", 0, (0.6, -0.8), 1.0, 1)])
    scaled = Contributions(
        device_keys=rows.device_keys,
        buckets=rows.buckets,
        embeddings=rows.embeddings * np.array([[1.005], [0.995]], dtype=np.float32),
        success_rates=rows.success_rates,
        sample_counts=rows.sample_counts,
    )
    [p] = run(scaled, min_sources=2).patterns
    # rows scaled by 1.005 and 0.995 still weigh the same: (1.4, -0.2) / |(1.4, -0.2)|
    np.testing.assert_allclose(p.embedding[:2], np.array([1.4, -0.2]) / math.sqrt(2.0), rtol=1e-6)


# --- differential privacy -------------------------------------------------------------------------


def big_groups(
    groups: int, devices: int, dim: int = 8, weight: int = 5
) -> tuple[Contributions, Codebook]:
    """``groups`` buckets, ``devices`` devices each, all rows e_0 with weight ``weight``."""
    n = groups * devices
    emb = np.zeros((n, dim), dtype=np.float32)
    emb[:, 0] = 1.0
    data = Contributions(
        device_keys=np.arange(n, dtype=np.int64),
        buckets=np.repeat(np.arange(groups, dtype=np.int32), devices),
        embeddings=emb,
        success_rates=np.ones(n, dtype=np.float32),
        sample_counts=np.full(n, weight, dtype=np.int64),
    )
    return data, Codebook(np.eye(1, dim))


def test_gaussian_noise_magnitude_matches_sigma() -> None:
    groups, devices, dim, clip = 400, 150, 8, 10.0
    data, codebook = big_groups(groups, devices, dim)
    privacy = PrivacyParams(epsilon=2.0, delta=1e-6, clipping_norm=clip, max_patterns_per_device=1)
    result = run(data, min_sources=3, privacy=privacy, codebook=codebook, seed=7)
    assert result.privacy is not None
    sigma = result.privacy.noise_multiplier * l2_sensitivity(clip, 1)
    cal = calibrate(privacy)
    assert sigma == pytest.approx(gaussian_sigma(cal.mechanism_epsilon, 0.5e-6, 2 * clip))
    assert result.groups_kept == groups  # 150 devices is far above 3 + margin

    counts = np.array([p.source_count for p in result.patterns], dtype=np.float64)
    quality = np.array([p.quality for p in result.patterns])
    emb = np.stack([p.embedding for p in result.patterns]).astype(np.float64)
    # count released as C x count + N(0, sigma^2): count noise sd = sigma / C (+ rounding 1/12)
    assert np.std(counts - devices) == pytest.approx(math.hypot(sigma / clip, 12**-0.5), rel=0.2)
    # quality = (750 + N1) / (150 + N3 / C) ~ 5 + (N1 - 5 N3 / C) / 150
    assert np.std(quality) == pytest.approx(sigma * math.hypot(1.0, 5 / clip) / devices, rel=0.2)
    # direction: (750 e0 + N) -> tan^2 of the angle ~ |N_perp|^2 / 750^2, E|N_perp|^2 = 7 sigma^2
    tan2 = (emb[:, 1:] ** 2).sum(axis=1) / emb[:, 0] ** 2
    assert np.mean(tan2) * (devices * 5) ** 2 == pytest.approx((dim - 1) * sigma**2, rel=0.2)


def test_laplace_noise_magnitude_matches_scale() -> None:
    groups, devices, dim, clip = 400, 150, 8, 10.0
    data, codebook = big_groups(groups, devices, dim)
    privacy = PrivacyParams(
        epsilon=2.0, delta=1e-6, clipping_norm=clip, mechanism="laplace", max_patterns_per_device=1
    )
    result = run(data, min_sources=3, privacy=privacy, codebook=codebook, seed=3)
    assert result.privacy is not None
    b = result.privacy.noise_multiplier * l1_sensitivity(clip, 1, dim)
    assert b == pytest.approx(clip * (math.sqrt(dim) + 3) / calibrate(privacy).mechanism_epsilon)
    assert result.groups_kept == groups
    counts = np.array([p.source_count for p in result.patterns], dtype=np.float64)
    # Laplace(b) has sd sqrt(2) b; in devices: sqrt(2) b / C
    assert np.std(counts - devices) == pytest.approx(math.sqrt(2) * b / clip, rel=0.2)


def test_dp_selection_margin_drops_groups_near_min_sources() -> None:
    privacy = PrivacyParams(epsilon=1.0, delta=1e-6, clipping_norm=10.0, max_patterns_per_device=4)
    z = calibrate(privacy).noise_multiplier
    margin = selection_margin(privacy, DIM)
    # count noise sd in devices = z * 2 sqrt(m); tail (delta / 2) / m = 1.25e-7 -> 5.157 sd
    assert margin == pytest.approx(z * 2 * 2 * 5.1570, rel=1e-3)
    data, codebook = big_groups(20, 5, DIM)
    result = run(data, min_sources=3, privacy=privacy, codebook=codebook)
    assert result.groups_total == 20 and result.patterns == []  # 5 devices << 3 + margin
    assert selection_margin(PrivacyParams(NO_NOISE, 0.0, 1.0), DIM) == 0.0


def test_laplace_without_delta_is_refused_before_spending() -> None:
    acc = PrivacyAccountant()
    privacy = PrivacyParams(epsilon=1.0, delta=0.0, clipping_norm=1.0, mechanism="laplace")
    with pytest.raises(ValueError, match="delta > 0"):
        run(batch(HAND_ROWS), privacy=privacy, accountant=acc)
    assert acc.rounds == 0


def test_accountant_is_charged_once_per_round() -> None:
    acc = PrivacyAccountant()
    privacy = PrivacyParams(epsilon=0.5, delta=1e-7, clipping_norm=5.0)
    first = run(batch(HAND_ROWS), privacy=privacy, accountant=acc)
    second = run(batch(HAND_ROWS), privacy=privacy, accountant=acc)
    assert first.privacy is not None and second.privacy is not None
    assert first.privacy.cumulative_epsilon == 0.5
    # zCDP composition of two Gaussian rounds beats basic composition (0.5 + 0.5)
    assert 0.5 * math.sqrt(2) < second.privacy.cumulative_epsilon < 1.0
    assert second.privacy.cumulative_epsilon == acc.cumulative_epsilon
    assert second.privacy.cumulative_delta == pytest.approx(2e-7)
    assert acc.rounds == 2


def test_deterministic_given_seed() -> None:
    data, codebook = big_groups(10, 150)
    privacy = PrivacyParams(epsilon=1.0, delta=1e-6, clipping_norm=10.0, max_patterns_per_device=1)

    def snapshot(seed: int) -> list[tuple[str, list[float], float, float, int]]:
        res = run(data, min_sources=3, privacy=privacy, codebook=codebook, seed=seed)
        return [
            (p.pattern_key, p.embedding.tolist(), p.quality, p.success_rate, p.source_count)
            for p in res.patterns
        ]

    assert snapshot(1) == snapshot(1)
    assert snapshot(1) != snapshot(2)
    # Row order does not matter either (up to float summation order).
    perm = np.random.default_rng(0).permutation(len(data))
    shuffled = Contributions(
        device_keys=data.device_keys[perm],
        buckets=data.buckets[perm],
        embeddings=data.embeddings[perm],
        success_rates=data.success_rates[perm],
        sample_counts=data.sample_counts[perm],
    )
    a = run(data, min_sources=3, privacy=privacy, codebook=codebook, seed=5).patterns
    b = run(shuffled, min_sources=3, privacy=privacy, codebook=codebook, seed=5).patterns
    assert [p.source_count for p in a] == [p.source_count for p in b]
    np.testing.assert_allclose([p.quality for p in a], [p.quality for p in b], rtol=1e-9)


# --- validation -----------------------------------------------------------------------------------


def good_columns(n: int = 3, dim: int = 4) -> dict[str, Any]:
    emb = np.zeros((n, dim), dtype=np.float32)
    emb[:, 0] = 1.0
    return {
        "device_keys": np.arange(n, dtype=np.int64),
        "buckets": np.zeros(n, dtype=np.int32),
        "embeddings": emb,
        "success_rates": np.full(n, 0.9, dtype=np.float32),
        "sample_counts": np.ones(n, dtype=np.int64),
    }


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("device_keys", np.arange(4), "expected 4|rows"),
        ("device_keys", np.zeros(3, dtype=np.float64), "integers, strings or objects"),
        ("buckets", np.zeros(2, dtype=np.int32), "buckets has 2 rows"),
        ("buckets", np.array([0, -1, 0]), r"\[0, 2\*\*31\)"),
        ("buckets", np.zeros(3, dtype=np.float32), "integers"),
        ("embeddings", np.zeros(3, dtype=np.float32), "shape"),
        ("embeddings", np.full((3, 4), np.nan, dtype=np.float32), "NaN"),
        ("embeddings", np.full((3, 4), 1.0, dtype=np.float32), "L2-normalized"),
        ("embeddings", np.zeros((3, 4), dtype=np.int64), "floating point"),
        ("success_rates", np.array([0.5, 1.5, 0.5]), r"\[0, 1\]"),
        ("success_rates", np.array([0.5, np.nan, 0.5]), r"\[0, 1\]"),
        ("sample_counts", np.array([1, 0, 1]), "sample_counts"),
        ("sample_counts", np.array([1.0, 2.0, 3.0]), "integers"),
        ("success_rates", np.zeros((3, 1)), "one-dimensional"),
    ],
)
def test_contributions_validation(field: str, value: npt.NDArray[np.generic], message: str) -> None:
    columns = good_columns()
    columns[field] = value
    with pytest.raises(ValueError, match=message):
        Contributions(**columns)


def test_contributions_coerce_and_freeze() -> None:
    columns = good_columns()
    columns["embeddings"] = columns["embeddings"].astype(np.float64)
    columns["buckets"] = np.array([0, 1, 2], dtype=np.int64)
    data = Contributions(**columns)
    assert data.embeddings.dtype == np.float32 and data.buckets.dtype == np.int32
    with pytest.raises(ValueError, match="read-only"):
        data.success_rates[0] = 0.1
    assert len(data) == 3 and data.dim == 4


def test_concat() -> None:
    a = Contributions(**good_columns(2))
    b_cols = good_columns(3)
    b_cols["device_keys"] = np.array(["x", "y", "z"], dtype=object)
    b = Contributions(**b_cols)
    both = Contributions.concat([a, b])
    assert len(both) == 5 and both.device_keys.dtype == object
    assert both.device_keys.tolist() == [0, 1, "x", "y", "z"]
    assert Contributions.concat([a, a]).device_keys.dtype == np.int64
    with pytest.raises(ValueError, match="at least one"):
        Contributions.concat([])
    with pytest.raises(ValueError, match="dimensions"):
        Contributions.concat([a, Contributions.empty(5)])


def test_federated_average_argument_errors() -> None:
    data = Contributions(**good_columns())
    with pytest.raises(ValueError, match="codebook"):
        run(data)  # dim 4 vs 384
    with pytest.raises(ValueError, match="min_sources"):
        run(data, min_sources=0, codebook=Codebook(np.eye(1, 4)))
    unhashable = good_columns()
    keys = np.empty(3, dtype=object)
    for i in range(3):
        keys[i] = [i]  # lists are not hashable
    unhashable["device_keys"] = keys
    with pytest.raises(ValueError, match="hashable"):
        run(Contributions(**unhashable), codebook=Codebook(np.eye(1, 4)))


# --- property test --------------------------------------------------------------------------------

PROP_DIM = 4
PROP_CODEBOOK = Codebook(np.random.default_rng(42).standard_normal((3, PROP_DIM)))

row_strategy = st.tuples(
    st.integers(0, 7),  # device
    st.integers(0, 2),  # bucket
    st.lists(st.floats(-1.0, 1.0), min_size=PROP_DIM, max_size=PROP_DIM).filter(
        lambda v: math.hypot(*v) > 0.1
    ),
    st.sampled_from([0.0, 0.3, 0.8, 1.0]),
    st.integers(1, 1000),
)
privacy_strategy = st.one_of(
    st.none(),
    st.builds(
        PrivacyParams,
        epsilon=st.sampled_from([math.inf, 1.0, 50.0]),
        delta=st.sampled_from([1e-6, 0.3]),
        clipping_norm=st.sampled_from([0.5, 10.0, 1000.0]),
        mechanism=st.sampled_from(["gaussian", "laplace"]),
        max_patterns_per_device=st.integers(1, 3),
    ),
)


@settings(max_examples=80, deadline=None)
@given(
    rows=st.lists(row_strategy, max_size=30),
    min_sources=st.integers(1, 4),
    privacy=privacy_strategy,
    seed=st.integers(0, 2**16),
)
def test_property_outputs_are_well_formed(
    rows: list[tuple[int, int, list[float], float, int]],
    min_sources: int,
    privacy: PrivacyParams | None,
    seed: int,
) -> None:
    if rows:
        emb = np.array([r[2] for r in rows], dtype=np.float64)
        data = Contributions(
            device_keys=np.array([r[0] for r in rows], dtype=np.int64),
            buckets=np.array([r[1] for r in rows], dtype=np.int32),
            embeddings=(emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32),
            success_rates=np.array([r[3] for r in rows], dtype=np.float32),
            sample_counts=np.array([r[4] for r in rows], dtype=np.int64),
        )
    else:
        data = Contributions.empty(PROP_DIM)
    result = run(data, min_sources=min_sources, privacy=privacy, codebook=PROP_CODEBOOK, seed=seed)
    keys = [p.pattern_key for p in result.patterns]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert result.groups_kept == len(result.patterns) <= result.groups_total
    assert result.contributions_used <= len(data)
    for p in result.patterns:
        assert float(np.linalg.norm(p.embedding.astype(np.float64))) == pytest.approx(1.0, abs=1e-5)
        assert p.quality >= 0.0 and 0.0 <= p.success_rate <= 1.0
        assert p.source_count >= min_sources
        assert p.pattern_key == f"{p.bucket}:{p.centroid}"
        if privacy is not None:
            assert p.quality <= privacy.clipping_norm
    # Exact counts: check them (with privacy on, max_patterns_per_device may drop rows).
    if privacy is None:
        centroids = PROP_CODEBOOK.assign(data.embeddings).tolist()
        for p in result.patterns:
            devices = {
                r[0]
                for r, c in zip(rows, centroids, strict=True)
                if (r[1], c) == (p.bucket, p.centroid)
            }
            assert p.source_count == len(devices)


# --- codebook -------------------------------------------------------------------------------------


def clustered(
    n_per: int, centers: npt.NDArray[np.float64], seed: int = 0
) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n_per * len(centers), centers.shape[1]))
    points: npt.NDArray[np.float64] = np.repeat(centers, n_per, axis=0) + 0.05 * noise
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32)


def test_codebook_train_and_assign_recovers_clusters() -> None:
    centers = np.eye(4, 16)
    x = clustered(60, centers)
    codebook = Codebook.train(x, k=4, seed=1)
    assert codebook.centroids.shape == (4, 16) and codebook.centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(codebook.centroids, axis=1), 1.0, rtol=1e-5)
    labels = codebook.assign(x)
    assert labels.dtype == np.int64 and labels.shape == (240,)
    # each true cluster maps to exactly one centroid, and all four are used
    per_cluster = labels.reshape(4, 60)
    assert all(len(set(row.tolist())) == 1 for row in per_cluster)
    assert len(set(per_cluster[:, 0].tolist())) == 4
    np.testing.assert_array_equal(labels, np.argmax(x @ codebook.centroids.T, axis=1))
    again = Codebook.train(x, k=4, seed=1)
    np.testing.assert_allclose(again.centroids, codebook.centroids, atol=1e-6)


def test_codebook_small_n_reduces_k() -> None:
    x = clustered(20, np.eye(5, 8))  # 100 points -> at most 100 // 39 = 2 centroids
    assert Codebook.train(x, k=5).k == 2
    few = x[:3]  # n < k: one centroid, the normalized mean direction
    one = Codebook.train(few, k=8)
    mean = few.astype(np.float64).sum(axis=0)
    np.testing.assert_allclose(one.centroids[0], mean / np.linalg.norm(mean), rtol=1e-5)
    assert one.assign(few).tolist() == [0, 0, 0]
    assert Codebook.train(x[:1], k=1).k == 1


def test_codebook_bytes_round_trip_and_corruption() -> None:
    codebook = Codebook.train(clustered(50, np.eye(3, 16)), k=3)
    data = codebook.to_bytes()
    assert len(data) == 20 + 4 * 3 * 16
    back = Codebook.from_bytes(data)
    np.testing.assert_array_equal(back.centroids, codebook.centroids)
    assert Codebook.from_bytes(memoryview(bytearray(data))).k == 3

    flipped = bytearray(data)
    flipped[30] ^= 0x01
    bad_version = bytearray(data)
    bad_version[4] = 9
    for broken, message in [
        (b"", "too short"),
        (b"XXXX" + data[4:], "magic"),
        (bytes(bad_version), "version"),
        (data[:-1], "expected"),
        (data + b"\0", "expected"),
        (bytes(flipped), "checksum"),
    ]:
        with pytest.raises(ValueError, match=message):
            Codebook.from_bytes(broken)


def test_codebook_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        Codebook(np.zeros((2, 4)))
    with pytest.raises(ValueError):
        Codebook(np.full((2, 4), np.nan))
    with pytest.raises(ValueError):
        Codebook.train(np.zeros((0, 4), dtype=np.float32), k=2)
    with pytest.raises(ValueError):
        Codebook.train(np.eye(3, 4, dtype=np.float32), k=0)
    with pytest.raises(ValueError, match="shape"):
        Codebook(np.eye(2, 4)).assign(np.ones((3, 5), dtype=np.float32))


def _random_rows(
    seed: int, devices: int
) -> list[tuple[object, int, tuple[float, float], float, int]]:
    rng = np.random.default_rng(seed)
    rows: list[tuple[object, int, tuple[float, float], float, int]] = []
    for d in range(devices):
        for _ in range(int(rng.integers(1, 5))):
            angle = float(rng.uniform(0, 2 * math.pi))
            rows.append(
                (
                    f"dev-{d}",
                    int(rng.integers(0, 3)),
                    (math.cos(angle), math.sin(angle)),
                    float(rng.uniform(0.2, 1.0)),
                    int(rng.integers(1, 40)),
                )
            )
    return rows


CLIPPED = PrivacyParams(epsilon=NO_NOISE, delta=0.0, clipping_norm=5.0, max_patterns_per_device=2)


@pytest.mark.parametrize("privacy", [None, CLIPPED])
def test_streamed_whole_devices_release_what_one_batch_does(privacy: PrivacyParams | None) -> None:
    from omega_federation.aggregation import GroupAccumulator, release_round

    rows = _random_rows(4, 60)
    one = run(batch(rows), privacy=privacy)
    # Three streams (shards), each cut into batches at device boundaries, merged at the end.
    devices = sorted({str(r[0]) for r in rows})
    clip = None if privacy is None else privacy.clipping_norm
    cap = None if privacy is None else privacy.max_patterns_per_device
    total = GroupAccumulator(AXES, clipping_norm=clip, max_groups=cap)
    for shard in range(3):
        part = GroupAccumulator(AXES, clipping_norm=clip, max_groups=cap)
        mine = devices[shard::3]
        for lo in range(0, len(mine), 7):
            chunk = set(mine[lo : lo + 7])
            part.add(batch([r for r in rows if r[0] in chunk]))
        total.merge(part)
    assert total.rows == len(rows)
    streamed = release_round(
        total, min_sources=3, privacy=privacy, accountant=None, rng=np.random.default_rng(0)
    )
    assert [p.pattern_key for p in streamed.patterns] == [p.pattern_key for p in one.patterns]
    assert one.patterns  # the comparison is not vacuous
    for a, b in zip(streamed.patterns, one.patterns, strict=True):
        assert a.source_count == b.source_count
        assert a.quality == pytest.approx(b.quality, rel=1e-9)
        assert a.success_rate == pytest.approx(b.success_rate, rel=1e-9)
        assert np.allclose(a.embedding, b.embedding, atol=1e-6)
    assert (streamed.groups_total, streamed.contributions_used) == (
        one.groups_total,
        one.contributions_used,
    )


def test_accumulators_of_other_settings_do_not_merge() -> None:
    from omega_federation.aggregation import GroupAccumulator

    a = GroupAccumulator(AXES, clipping_norm=1.0, max_groups=2)
    with pytest.raises(ValueError, match="different"):
        a.merge(GroupAccumulator(AXES, clipping_norm=2.0, max_groups=2))
    with pytest.raises(ValueError, match="dimension"):
        a.add(batch([("d", 0, (1.0, 0.0), 1.0, 1)], dim=8))
