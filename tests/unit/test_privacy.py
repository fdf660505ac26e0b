"""Noise calibration and privacy accounting (``omega_federation.privacy``)."""

from __future__ import annotations

import json
import math

import pytest

from omega_federation.privacy import (
    SELECTION_DELTA_FRACTION,
    PrivacyAccountant,
    PrivacyParams,
    calibrate,
    gaussian_delta,
    gaussian_sigma,
    laplace_scale,
    zcdp_to_dp_epsilon,
)


def phi(x: float) -> float:
    """Standard normal CDF, written out for the hand checks."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def exact_gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """Smallest epsilon of a Gaussian mechanism at ``delta`` (bisection on the exact profile)."""
    lo, hi = 0.0, 1000.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if gaussian_delta(mid, noise_multiplier) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def test_laplace_scale_hand_values() -> None:
    # b = sensitivity / epsilon
    assert laplace_scale(0.5, 2.0) == 4.0
    assert laplace_scale(2.0, 3.0) == 1.5
    assert laplace_scale(math.inf, 3.0) == 0.0
    assert laplace_scale(1.0, 0.0) == 0.0


def test_gaussian_delta_hand_values() -> None:
    # epsilon = 0, z = 1 (mu = 1): Phi(0.5) - Phi(-0.5) = 0.691462 - 0.308538 = 0.382925
    assert gaussian_delta(0.0, 1.0) == pytest.approx(0.382925, abs=1e-6)
    # epsilon = 1, z = 2 (mu = 0.5): Phi(0.25 - 2) - e * Phi(-0.25 - 2)
    #   = Phi(-1.75) - e * Phi(-2.25) = 0.0400592 - 2.7182818 * 0.0122245 = 0.0068296
    assert gaussian_delta(1.0, 2.0) == pytest.approx(0.0068296, abs=1e-7)
    assert gaussian_delta(1.0, 0.0) == 1.0
    assert gaussian_delta(1.0, math.inf) == 0.0
    # huge epsilon: e^eps alone would overflow, the log-space evaluation does not
    assert gaussian_delta(2000.0, 0.05) == 0.0


def test_gaussian_sigma_solves_the_exact_profile() -> None:
    # Balle & Wang 2018: for epsilon = 1, delta = 1e-5 the analytic sigma is about 3.73 (the
    # classical sqrt(2 ln(1.25 / delta)) / epsilon = 4.84).
    sigma = gaussian_sigma(1.0, 1e-5, 1.0)
    assert sigma == pytest.approx(3.7306, abs=1e-4)
    # Check against the profile written out by hand: mu = 1 / sigma
    mu = 1.0 / sigma
    delta = phi(mu / 2 - 1.0 / mu) - math.e * phi(-mu / 2 - 1.0 / mu)
    assert delta == pytest.approx(1e-5, rel=1e-6)
    assert delta <= 1e-5 * (1 + 1e-9)  # rounded to the safe side
    # linear in the sensitivity, never above the classical bound for epsilon < 1
    assert gaussian_sigma(1.0, 1e-5, 7.0) == pytest.approx(7.0 * sigma, rel=1e-12)
    for eps, delta in [(0.1, 1e-6), (0.5, 1e-9), (0.9, 1e-3)]:
        classical = math.sqrt(2.0 * math.log(1.25 / delta)) / eps
        assert gaussian_sigma(eps, delta, 1.0) < classical
    # valid for large epsilon too
    s = gaussian_sigma(50.0, 1e-6, 1.0)
    assert gaussian_delta(50.0, s) == pytest.approx(1e-6, rel=1e-6)
    assert gaussian_sigma(math.inf, 1e-6, 1.0) == 0.0


@pytest.mark.parametrize(
    ("eps", "delta", "sens"),
    [(0.0, 1e-6, 1.0), (-1.0, 1e-6, 1.0), (math.nan, 1e-6, 1.0), (1.0, 0.0, 1.0), (1.0, 1.0, 1.0),
     (1.0, 1e-6, -1.0), (1.0, 1e-6, math.inf)],
)  # fmt: skip
def test_gaussian_sigma_rejects_bad_arguments(eps: float, delta: float, sens: float) -> None:
    with pytest.raises(ValueError):
        gaussian_sigma(eps, delta, sens)


def test_laplace_scale_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        laplace_scale(0.0, 1.0)
    with pytest.raises(ValueError):
        laplace_scale(1.0, -1.0)


def test_zcdp_conversion_is_sound_and_tighter_than_bun_steinke() -> None:
    for z in [0.5, 1.0, 3.0, 10.0]:
        rho = 1.0 / (2.0 * z * z)  # Gaussian with noise multiplier z
        for delta in [1e-5, 1e-10]:
            eps = zcdp_to_dp_epsilon(rho, delta)
            bun_steinke = rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))
            assert exact_gaussian_epsilon(z, delta) <= eps <= bun_steinke
    assert zcdp_to_dp_epsilon(0.0, 1e-6) == 0.0
    assert zcdp_to_dp_epsilon(0.1, 0.0) == math.inf
    assert zcdp_to_dp_epsilon(math.inf, 1e-6) == math.inf
    with pytest.raises(ValueError):
        zcdp_to_dp_epsilon(-1.0, 1e-6)


def test_calibration_split() -> None:
    params = PrivacyParams(epsilon=1.0, delta=1e-6, clipping_norm=1.0)
    cal = calibrate(params)
    p = 1e-6 * SELECTION_DELTA_FRACTION
    assert cal.selection_delta == pytest.approx(p)
    assert cal.mechanism_delta == pytest.approx(1e-6 - p)
    assert cal.mechanism_epsilon == pytest.approx(1.0 + math.log1p(-p))
    assert cal.noise_multiplier == gaussian_sigma(cal.mechanism_epsilon, cal.mechanism_delta, 1.0)
    assert cal.rho == pytest.approx(1.0 / (2.0 * cal.noise_multiplier**2))

    lap = calibrate(PrivacyParams(epsilon=0.5, delta=0.0, clipping_norm=1.0, mechanism="laplace"))
    assert (lap.noise_multiplier, lap.mechanism_delta, lap.selection_delta) == (2.0, 0.0, 0.0)
    assert lap.rho == pytest.approx(0.125)  # eps^2 / 2

    off = calibrate(PrivacyParams(epsilon=math.inf, delta=0.0, clipping_norm=1.0))
    assert off.noise_multiplier == 0.0 and math.isinf(off.rho)
    with pytest.raises(ValueError, match="too small"):
        calibrate(PrivacyParams(epsilon=1e-9, delta=0.5, clipping_norm=1.0))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epsilon": 0.0},
        {"epsilon": math.nan},
        {"delta": -1e-9},
        {"delta": 1.0},
        {"delta": 0.0},  # Gaussian with noise needs delta > 0
        {"clipping_norm": 0.0},
        {"clipping_norm": math.inf},
        {"mechanism": "exponential"},
        {"max_patterns_per_device": 0},
        {"max_patterns_per_device": True},
    ],
)
def test_privacy_params_validation(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {"epsilon": 1.0, "delta": 1e-6, "clipping_norm": 1.0}
    with pytest.raises(ValueError):
        PrivacyParams(**(base | kwargs))  # type: ignore[arg-type]


def test_accountant_single_round_reports_the_round() -> None:
    acc = PrivacyAccountant()
    assert (acc.cumulative_epsilon, acc.cumulative_delta, acc.rounds) == (0.0, 0.0, 0)
    params = PrivacyParams(epsilon=1.0, delta=1e-6, clipping_norm=3.0)
    spent = acc.spend(params)
    assert (spent.epsilon, spent.delta) == (1.0, 1e-6)
    assert spent.cumulative_epsilon == 1.0  # one round: basic composition is the tighter bound
    assert spent.cumulative_delta == pytest.approx(1e-6)
    assert spent.noise_multiplier == calibrate(params).noise_multiplier


def test_accountant_laplace_basic_composition() -> None:
    acc = PrivacyAccountant()
    params = PrivacyParams(epsilon=0.5, delta=0.0, clipping_norm=1.0, mechanism="laplace")
    for _ in range(3):
        last = acc.spend(params)
    # pure DP, delta 0: 0.5 + 0.5 + 0.5
    assert (last.cumulative_epsilon, last.cumulative_delta) == (1.5, 0.0)
    assert last.noise_multiplier == 2.0


def test_accountant_zcdp_composition_of_gaussian_rounds() -> None:
    params = PrivacyParams(epsilon=1.0, delta=1e-6, clipping_norm=1.0)
    cal = calibrate(params)
    acc = PrivacyAccountant()
    rounds = 100
    for _ in range(rounds):
        acc.spend(params)
    # by hand: rho adds up, converted at the mechanisms' delta, plus the selection terms
    rho = rounds / (2.0 * cal.noise_multiplier**2)
    expected = zcdp_to_dp_epsilon(rho, rounds * cal.mechanism_delta) - rounds * math.log1p(
        -cal.selection_delta
    )
    assert acc.cumulative_epsilon == pytest.approx(expected, rel=1e-9)
    assert acc.cumulative_delta == pytest.approx(rounds * 1e-6)
    assert acc.cumulative_rho == pytest.approx(rho)
    # far better than basic composition (100), and never better than the exact composition of
    # the Gaussians (noise multiplier z / sqrt(rounds)), which no sound accountant can beat
    assert acc.cumulative_epsilon < 20.0
    exact = exact_gaussian_epsilon(cal.noise_multiplier / math.sqrt(rounds), acc.cumulative_delta)
    assert acc.cumulative_epsilon >= exact


def test_accountant_mixed_and_infinite_rounds() -> None:
    acc = PrivacyAccountant()
    acc.spend(PrivacyParams(epsilon=1.0, delta=1e-6, clipping_norm=1.0))
    acc.spend(PrivacyParams(epsilon=0.5, delta=1e-6, clipping_norm=1.0, mechanism="laplace"))
    assert acc.cumulative_epsilon <= 1.5
    assert acc.cumulative_delta == pytest.approx(2e-6)
    off = acc.spend(PrivacyParams(epsilon=math.inf, delta=0.0, clipping_norm=1.0))
    assert off.noise_multiplier == 0.0
    assert math.isinf(off.cumulative_epsilon) and math.isinf(acc.cumulative_epsilon)


def test_accountant_preview_does_not_spend() -> None:
    acc = PrivacyAccountant()
    params = PrivacyParams(epsilon=1.0, delta=1e-6, clipping_norm=1.0)
    preview = acc.preview(params)
    assert acc.rounds == 0 and acc.cumulative_epsilon == 0.0
    assert acc.spend(params) == preview


def test_accountant_round_trip() -> None:
    acc = PrivacyAccountant()
    for eps in (1.0, 0.3, 2.0):
        acc.spend(PrivacyParams(epsilon=eps, delta=1e-7, clipping_norm=1.0))
    data = json.loads(json.dumps(acc.to_dict()))
    back = PrivacyAccountant.from_dict(data)
    assert back.to_dict() == acc.to_dict()
    assert (back.rounds, back.cumulative_epsilon, back.cumulative_delta) == (
        3,
        acc.cumulative_epsilon,
        acc.cumulative_delta,
    )
    params = PrivacyParams(epsilon=1.0, delta=1e-7, clipping_norm=1.0)
    assert back.spend(params) == acc.spend(params)

    acc.spend(PrivacyParams(epsilon=math.inf, delta=0.0, clipping_norm=1.0))
    encoded = acc.to_dict()
    assert encoded["sum_epsilon"] == "inf"
    json.dumps(encoded, allow_nan=False)  # strict JSON (Postgres jsonb) accepts it
    assert math.isinf(PrivacyAccountant.from_dict(encoded).cumulative_epsilon)


@pytest.mark.parametrize(
    "change",
    [
        {"format": 2},
        {"rho": -1.0},
        {"rho": "lots"},
        {"rounds": 1.5},
        {"sum_delta": True},
    ],
)
def test_accountant_from_dict_rejects_bad_data(change: dict[str, object]) -> None:
    data: dict[str, object] = dict(PrivacyAccountant().to_dict())
    data.update(change)
    with pytest.raises(ValueError):
        PrivacyAccountant.from_dict(data)
    missing = dict(PrivacyAccountant().to_dict())
    del missing["rho"]
    with pytest.raises(ValueError, match="missing"):
        PrivacyAccountant.from_dict(missing)
