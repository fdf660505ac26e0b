"""Privacy accounting (``omega_federation.accounting``) pinned against independent references.

Every privacy figure is checked against a value computed here with ``mpmath`` at 50 significant
digits, without any ``dp_accounting`` code:

* ``exact_gaussian_epsilon``: the exact privacy profile of the Gaussian mechanism (Balle & Wang
  2018, "Improving the Gaussian Mechanism for Differential Privacy", Thm. 8).
* ``rdp_to_epsilon``: the RDP-to-(epsilon, delta) conversion that ``dp_accounting`` 0.6.0's
  ``RdpAccountant`` applies (``rdp_privacy_accountant.compute_epsilon``: Canonne, Kamath & Steinke
  2020, Prop. 12, minimised over the orders; 0 where ``delta^2 > 1 - exp(-rdp)``, and only orders
  above 1.01), rewritten from the formula.
* ``sampled_gaussian_rdp``: the RDP of the Poisson-sampled Gaussian at integer orders by the
  binomial expansion of Mironov, Talwar & Zhang 2019 ("Renyi Differential Privacy of the Sampled
  Gaussian Mechanism", Sec. 3.3).
* ``exact_sampled_gaussian_epsilon``: the exact one-round profile of the Poisson-sampled Gaussian
  under add/remove. It is the larger of the two hockey-stick divergences between ``N(0, z^2)`` and
  ``(1 - q) N(0, z^2) + q N(1, z^2)``, in closed form with the normal CDF.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import dp_accounting
import mpmath
import pytest

from omega_federation.accounting import (
    BudgetExceededError,
    PrivacyLedger,
    RoundMechanism,
    calibrate_noise_multiplier,
    epsilon_for,
)

DPS = 50
"""Significant digits of the mpmath references."""

RDP_ORDERS: list[float] = (
    [1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
)
"""``dp_accounting`` 0.6.0's ``DEFAULT_RDP_ORDERS``, written out (the accountant's default)."""

INTEGER_ORDERS: list[int] = [*range(2, 64), 128, 256, 512, 1024]
"""The integer orders among ``RDP_ORDERS`` (plus 2..10), where the binomial expansion is exact."""


# ---------------------------------------------------------------- independent references


def _bisect_decreasing(f: Callable[[Any], Any], lo: float, hi: float, steps: int = 200) -> Any:
    """Smallest ``x`` in ``[lo, hi]`` with ``f(x) <= 0`` for a decreasing ``f`` (mpmath)."""
    a, b = mpmath.mpf(lo), mpmath.mpf(hi)
    assert f(a) > 0 >= f(b), "bracket does not contain the root"
    for _ in range(steps):
        mid = (a + b) / 2
        if f(mid) > 0:
            a = mid
        else:
            b = mid
    return b


def gaussian_delta(epsilon: Any, z: Any) -> Any:
    """Balle & Wang 2018, Thm. 8, sensitivity 1, noise std ``z``."""
    eps, z = mpmath.mpf(epsilon), mpmath.mpf(z)
    return mpmath.ncdf(1 / (2 * z) - eps * z) - mpmath.exp(eps) * mpmath.ncdf(
        -1 / (2 * z) - eps * z
    )


def exact_gaussian_epsilon(z: float, delta: float) -> float:
    """Smallest epsilon for which the Gaussian with multiplier ``z`` is (epsilon, delta)-DP."""
    with mpmath.workdps(DPS):
        target = mpmath.mpf(delta)
        return float(_bisect_decreasing(lambda e: gaussian_delta(e, z) - target, 0.0, 200.0))


def exact_gaussian_noise_multiplier(epsilon: float, delta: float) -> float:
    """Smallest ``z`` for which the Gaussian is (epsilon, delta)-DP (delta decreases in z)."""
    with mpmath.workdps(DPS):
        target = mpmath.mpf(delta)
        return float(
            _bisect_decreasing(lambda z: gaussian_delta(epsilon, z) - target, 0.01, 1000.0)
        )


def rdp_to_epsilon(orders: Sequence[float], rdp: Sequence[Any], delta: float) -> float:
    """min over orders of ``rdp + log(1 - 1/a) - log(delta * a) / (a - 1)`` (CKS 2020, Prop. 12)."""
    with mpmath.workdps(DPS):
        d = mpmath.mpf(delta)
        best = mpmath.inf
        for order, r in zip(orders, rdp, strict=True):
            a = mpmath.mpf(order)
            if d**2 + mpmath.expm1(-r) > 0:  # KL bound: delta <= sqrt(1 - exp(-rdp))
                eps = mpmath.mpf(0)
            elif a > mpmath.mpf("1.01"):
                eps = r + mpmath.log(1 - 1 / a) - mpmath.log(d * a) / (a - 1)
            else:
                eps = mpmath.inf
            best = min(best, eps)
        return float(max(mpmath.mpf(0), best))


def gaussian_rdp(order: float, z: float) -> Any:
    """RDP of the Gaussian mechanism: ``alpha / (2 z^2)`` (Mironov 2017, Prop. 7)."""
    return mpmath.mpf(order) / (2 * mpmath.mpf(z) ** 2)


def sampled_gaussian_rdp(order: int, q: float, z: float) -> Any:
    """``log(A_alpha) / (alpha - 1)`` with the binomial expansion of MTZ 2019, Sec. 3.3."""
    qq, zz = mpmath.mpf(q), mpmath.mpf(z)
    a_alpha = mpmath.fsum(
        mpmath.binomial(order, k)
        * (1 - qq) ** (order - k)
        * qq**k
        * mpmath.exp(mpmath.mpf(k * k - k) / (2 * zz**2))
        for k in range(order + 1)
    )
    return mpmath.log(a_alpha) / (order - 1)


def sampled_gaussian_delta(epsilon: Any, q: float, z: float) -> Any:
    """Exact delta(epsilon) of one Poisson-sampled Gaussian round under add/remove.

    With ``P = N(0, z^2)`` and ``M = (1 - q) P + q N(1, z^2)``, delta is the larger of
    ``int (M - e^eps P)_+`` and ``int (P - e^eps M)_+``. The likelihood ratio is monotone in
    ``x``, so each integral is taken over a half-line whose end solves ``M = e^eps P`` (resp.
    ``P = e^eps M``).
    """
    eps, qq, zz = mpmath.mpf(epsilon), mpmath.mpf(q), mpmath.mpf(z)
    e = mpmath.exp(eps)
    half = mpmath.mpf(1) / 2
    # add: q N(1) - (e - 1 + q) N(0) > 0  iff  x > x_add
    x_add = zz**2 * mpmath.log((e - 1 + qq) / qq) + half
    delta_add = qq * mpmath.ncdf((1 - x_add) / zz) - (e - 1 + qq) * mpmath.ncdf(-x_add / zz)
    # remove: (1 - e (1 - q)) N(0) - e q N(1) > 0  iff  x < x_remove (empty if the factor <= 0)
    factor = 1 - e * (1 - qq)
    delta_remove = mpmath.mpf(0)
    if factor > 0:
        x_remove = zz**2 * mpmath.log(factor / (e * qq)) + half
        delta_remove = factor * mpmath.ncdf(x_remove / zz) - e * qq * mpmath.ncdf(
            (x_remove - 1) / zz
        )
    return max(delta_add, delta_remove)


def exact_sampled_gaussian_epsilon(q: float, z: float, delta: float) -> float:
    """Smallest epsilon of one Poisson-sampled Gaussian round at ``delta``."""
    with mpmath.workdps(DPS):
        target = mpmath.mpf(delta)
        return float(
            _bisect_decreasing(lambda e: sampled_gaussian_delta(e, q, z) - target, 0.0, 50.0)
        )


def effective_z(*zs: float) -> float:
    """``(sum z_i^-2)^-1/2`` at high precision."""
    with mpmath.workdps(DPS):
        return float(1 / mpmath.sqrt(mpmath.fsum(1 / mpmath.mpf(z) ** 2 for z in zs)))


def test_reference_orders_are_dp_accountings_defaults() -> None:
    # The RDP references minimise over the accountant's own default orders.
    from dp_accounting.rdp import rdp_privacy_accountant

    assert rdp_privacy_accountant.DEFAULT_RDP_ORDERS == RDP_ORDERS


def test_reference_gaussian_matches_published_figure() -> None:
    # Balle & Wang 2018, Sec. 5: at epsilon = 1, delta = 1e-5 the analytic sigma is about 3.73
    # (the classical bound needs 4.84).
    assert exact_gaussian_noise_multiplier(1.0, 1e-5) == pytest.approx(3.73, abs=0.01)
    # The sampled profile tends to the plain Gaussian as q -> 1.
    assert exact_sampled_gaussian_epsilon(1 - 1e-12, 1.0, 1e-5) == pytest.approx(
        exact_gaussian_epsilon(1.0, 1e-5), rel=1e-9
    )


# ---------------------------------------------------------------- 1. single Gaussian, PLD


@pytest.mark.parametrize(
    ("z", "delta", "pinned"),
    [(1.0, 1e-5, 4.377178), (0.6, 1e-5, 8.003691), (2.0, 1e-6, 2.254085)],
)
def test_pld_single_gaussian_matches_analytic_gaussian(
    z: float, delta: float, pinned: float
) -> None:
    exact = exact_gaussian_epsilon(z, delta)
    assert exact == pytest.approx(pinned, abs=1e-6)
    got = epsilon_for([RoundMechanism((z,))], delta, method="pld")
    # The PLD discretisation is pessimistic: never below the exact value beyond float noise.
    assert exact - 1e-6 <= got <= exact * (1 + 1e-3)
    # RDP is a sound but looser bound.
    assert epsilon_for([RoundMechanism((z,))], delta) > got


# ---------------------------------------------------------------- 2. T-fold composition, RDP


@pytest.mark.parametrize(
    ("z", "rounds", "delta", "pinned"),
    [(1.275, 4, 1e-5, 8.002561), (3.0, 100, 1e-6, 21.97754)],
)
def test_rdp_composition_of_unsampled_gaussians(
    z: float, rounds: int, delta: float, pinned: float
) -> None:
    with mpmath.workdps(DPS):
        rdp = [rounds * gaussian_rdp(a, z) for a in RDP_ORDERS]
    reference = rdp_to_epsilon(RDP_ORDERS, rdp, delta)
    assert reference == pytest.approx(pinned, abs=1e-5)

    composed = epsilon_for([RoundMechanism((z,))] * rounds, delta)
    one_round = epsilon_for([RoundMechanism((z / math.sqrt(rounds),))], delta)
    assert composed == pytest.approx(reference, rel=1e-6)
    assert composed == pytest.approx(one_round, rel=1e-9)


def test_pld_composition_of_unsampled_gaussians_is_one_gaussian() -> None:
    # T Gaussians of multiplier z are exactly one Gaussian of multiplier z / sqrt(T).
    z, rounds, delta = 1.275, 4, 1e-5
    exact = exact_gaussian_epsilon(z / math.sqrt(rounds), delta)
    got = epsilon_for([RoundMechanism((z,))] * rounds, delta, method="pld")
    assert exact - 1e-6 <= got <= exact * (1 + 1e-3)
    assert got == pytest.approx(7.439903, abs=1e-4)


def test_empty_composition_costs_nothing() -> None:
    assert epsilon_for([], 1e-5) == 0.0
    assert epsilon_for([], 1e-5, method="pld") == 0.0


# ---------------------------------------------------------------- 3. several releases per round


def test_effective_noise_multiplier() -> None:
    assert RoundMechanism((1.0, 2.0)).effective_noise_multiplier == pytest.approx(
        effective_z(1.0, 2.0), rel=1e-14
    )
    assert RoundMechanism((0.7,)).effective_noise_multiplier == pytest.approx(0.7, rel=1e-15)
    # Three equal releases: z / sqrt(3).
    assert RoundMechanism((1.5, 1.5, 1.5)).effective_noise_multiplier == pytest.approx(
        1.5 / math.sqrt(3.0), rel=1e-14
    )


@pytest.mark.parametrize("method", ["rdp", "pld"])
def test_two_release_round_equals_effective_gaussian(method: str) -> None:
    z1, z2, delta = 1.0, 2.0, 1e-5
    both = epsilon_for([RoundMechanism((z1, z2))], delta, method)  # type: ignore[arg-type]
    combined = epsilon_for([RoundMechanism((effective_z(z1, z2),))], delta, method)  # type: ignore[arg-type]
    alone1 = epsilon_for([RoundMechanism((z1,))], delta, method)  # type: ignore[arg-type]
    alone2 = epsilon_for([RoundMechanism((z2,))], delta, method)  # type: ignore[arg-type]
    assert both == pytest.approx(combined, rel=1e-3 if method == "pld" else 1e-9)
    assert both > alone1 > alone2
    if method == "pld":
        exact = exact_gaussian_epsilon(effective_z(z1, z2), delta)
        assert exact - 1e-6 <= both <= exact * (1 + 1e-3)
    else:
        with mpmath.workdps(DPS):
            rdp = [gaussian_rdp(a, z1) + gaussian_rdp(a, z2) for a in RDP_ORDERS]
        assert both == pytest.approx(rdp_to_epsilon(RDP_ORDERS, rdp, delta), rel=1e-6)


def test_release_order_within_a_round_does_not_matter() -> None:
    assert epsilon_for([RoundMechanism((1.0, 2.0))], 1e-5) == pytest.approx(
        epsilon_for([RoundMechanism((2.0, 1.0))], 1e-5), rel=1e-12
    )


# ---------------------------------------------------------------- 4. Poisson sampling


@pytest.mark.parametrize("method", ["rdp", "pld"])
def test_sampling_reduces_epsilon(method: str) -> None:
    full = epsilon_for([RoundMechanism((2.0,))] * 10, 1e-5, method)  # type: ignore[arg-type]
    sampled = epsilon_for([RoundMechanism((2.0,), 0.2)] * 10, 1e-5, method)  # type: ignore[arg-type]
    assert 0.0 < sampled < full


def test_dp_event_structure() -> None:
    unsampled = RoundMechanism((1.0, 2.0)).dp_event()
    assert unsampled == dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(1.0), dp_accounting.GaussianDpEvent(2.0)]
    )
    sampled = RoundMechanism((1.0, 2.0), 0.1).dp_event()
    assert isinstance(sampled, dp_accounting.PoissonSampledDpEvent)
    assert sampled.sampling_probability == 0.1
    assert sampled.event.noise_multiplier == pytest.approx(effective_z(1.0, 2.0), rel=1e-14)


def test_sampled_rdp_matches_binomial_expansion() -> None:
    # Two releases on one sampled cohort: z_eff = (1.3^-2 + 2^-2)^-1/2 = 1.0898.
    zs, q, rounds, delta = (1.3, 2.0), 0.01, 1000, 1e-5
    z = effective_z(*zs)
    with mpmath.workdps(DPS):
        rdp = [rounds * sampled_gaussian_rdp(a, q, z) for a in INTEGER_ORDERS]
    reference = rdp_to_epsilon(INTEGER_ORDERS, rdp, delta)
    assert reference == pytest.approx(1.751081, abs=1e-5)

    mechanism = RoundMechanism(zs, q)
    # The round's event, accounted over the integer orders only, is the reference.
    accountant = dp_accounting.rdp.RdpAccountant(orders=INTEGER_ORDERS)
    accountant.compose(dp_accounting.SelfComposedDpEvent(mechanism.dp_event(), rounds))
    assert accountant.get_epsilon(delta) == pytest.approx(reference, rel=1e-6)
    # With the default orders the fractional orders can only lower it, and only a little.
    got = epsilon_for([mechanism] * rounds, delta)
    assert reference * 0.97 <= got <= reference * (1 + 1e-9)


def test_sampled_pld_single_round_matches_exact_profile() -> None:
    zs, q, delta = (1.3, 2.0), 0.01, 1e-5
    exact = exact_sampled_gaussian_epsilon(q, effective_z(*zs), delta)
    assert exact == pytest.approx(0.146816, abs=1e-6)
    got = epsilon_for([RoundMechanism(zs, q)], delta, method="pld")
    assert exact - 1e-6 <= got <= exact * (1 + 1e-3)


# ---------------------------------------------------------------- 5. calibration


@pytest.mark.parametrize(
    ("target", "delta", "rounds", "q"),
    [(8.0, 1e-5, 4, 1.0), (1.0, 1e-5, 1, 1.0), (2.0, 1e-6, 500, 0.02), (0.5, 1e-5, 3, 1.0)],
)
def test_calibration_is_safe_and_tight(target: float, delta: float, rounds: int, q: float) -> None:
    tolerance = 1e-3
    z = calibrate_noise_multiplier(target, delta, rounds, q, tolerance=tolerance)
    assert epsilon_for([RoundMechanism((z,), q)] * rounds, delta) <= target
    smaller = z * (1 - 2 * tolerance)
    assert epsilon_for([RoundMechanism((smaller,), q)] * rounds, delta) > target


def test_calibration_matches_the_rdp_reference_for_z_1_275() -> None:
    # Test 2 found epsilon = 8.0026 for 4 rounds of z = 1.275, so epsilon = 8 needs a little more.
    z = calibrate_noise_multiplier(8.0, 1e-5, 4, tolerance=1e-4)
    assert 1.275 < z < 1.275 * 1.001
    with mpmath.workdps(DPS):
        rdp = [4 * gaussian_rdp(a, z) for a in RDP_ORDERS]
        rdp_smaller = [4 * gaussian_rdp(a, z / (1 + 2e-4)) for a in RDP_ORDERS]
    assert (
        rdp_to_epsilon(RDP_ORDERS, rdp, 1e-5) <= 8.0 < rdp_to_epsilon(RDP_ORDERS, rdp_smaller, 1e-5)
    )


def test_calibration_is_monotone_in_rounds() -> None:
    zs = [calibrate_noise_multiplier(4.0, 1e-5, t) for t in (1, 10, 100, 1000)]
    assert zs == sorted(zs) and len(set(zs)) == 4
    # Unsampled Gaussians: T rounds of z cost what one round of z / sqrt(T) does.
    for t, z in zip((10, 100, 1000), zs[1:], strict=True):
        assert z / math.sqrt(t) == pytest.approx(zs[0], rel=2e-3)
    # Sampling lowers the noise needed.
    assert calibrate_noise_multiplier(4.0, 1e-5, 1000, sampling_rate=0.01) < zs[3]


def test_pld_calibration_matches_the_analytic_gaussian() -> None:
    tolerance = 1e-2
    exact = exact_gaussian_noise_multiplier(1.0, 1e-5)
    z = calibrate_noise_multiplier(1.0, 1e-5, 1, method="pld", tolerance=tolerance)
    assert exact * (1 - 1e-6) <= z <= exact * (1 + tolerance) * (1 + 1e-4)


def test_calibration_unreachable_target() -> None:
    # Even z = 1e6 leaves epsilon near sqrt(2 ln(1/delta)) / z = 7e-6 at delta = 1e-12.
    with pytest.raises(ValueError, match="above"):
        calibrate_noise_multiplier(1e-9, 1e-12, 1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_epsilon": 0.0},
        {"target_epsilon": -1.0},
        {"target_epsilon": math.nan},
        {"target_epsilon": math.inf},
        {"delta": 0.0},
        {"delta": 1.0},
        {"delta": math.nan},
        {"rounds": 0},
        {"rounds": 2.5},
        {"rounds": True},
        {"sampling_rate": 0.0},
        {"sampling_rate": 1.5},
        {"sampling_rate": math.nan},
        {"method": "zcdp"},
        {"tolerance": 0.0},
        {"tolerance": 1.0},
        {"tolerance": math.nan},
    ],
)
def test_calibration_rejects_bad_input(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"target_epsilon": 1.0, "delta": 1e-5, "rounds": 10}
    args.update(kwargs)
    with pytest.raises(ValueError):
        calibrate_noise_multiplier(**args)


# ---------------------------------------------------------------- 6. the ledger


def test_ledger_spends_in_order_and_caches() -> None:
    a, b = RoundMechanism((1.2, 2.5)), RoundMechanism((1.5,), 0.1)
    ledger = PrivacyLedger(delta=1e-5)
    assert ledger.epsilon == 0.0 and list(ledger.rounds) == []
    preview = ledger.preview(a)
    assert ledger.epsilon == 0.0 and list(ledger.rounds) == []  # preview spends nothing
    assert ledger.spend(a, 1) == preview == ledger.epsilon_of_round(a)
    assert ledger.spend(b, 2) == ledger.epsilon
    assert ledger.spend(a, 5) == ledger.epsilon
    assert ledger.rounds == (a, b, a) and ledger.round_ids == (1, 2, 5)
    assert ledger.epsilon == epsilon_for([a, b, a], 1e-5)
    # Independent check of the two unsampled rounds alone: 2 * (1.2^-2 + 2.5^-2) per unit order.
    two = PrivacyLedger(delta=1e-5)
    two.spend(a, 1)
    two.spend(a, 2)
    with mpmath.workdps(DPS):
        rdp = [2 * (gaussian_rdp(o, 1.2) + gaussian_rdp(o, 2.5)) for o in RDP_ORDERS]
    assert two.epsilon == pytest.approx(rdp_to_epsilon(RDP_ORDERS, rdp, 1e-5), rel=1e-6)
    assert ledger.epsilon_of_round(b) == epsilon_for([b], 1e-5)


def test_ledger_enforces_the_budget() -> None:
    m = RoundMechanism((1.0,))
    budget = epsilon_for([m, m], 1e-5) * (1 + 1e-9)
    ledger = PrivacyLedger(delta=1e-5, epsilon_budget=budget)
    ledger.spend(m, 0)
    before = ledger.epsilon
    ledger.spend(m, 1)
    would_be = ledger.preview(m)
    with pytest.raises(BudgetExceededError) as info:
        ledger.spend(m, 2)
    assert info.value.epsilon == would_be and info.value.budget == budget
    assert f"{would_be:.6g}" in str(info.value) and f"{budget:.6g}" in str(info.value)
    assert ledger.rounds == (m, m) and ledger.round_ids == (0, 1)
    assert ledger.epsilon == epsilon_for([m, m], 1e-5) > before
    # The failed id is still free once the budget allows it.
    assert PrivacyLedger.from_dict(ledger.to_dict()).round_ids == (0, 1)


def test_ledger_respend_is_idempotent() -> None:
    m, other = RoundMechanism((1.0, 3.0)), RoundMechanism((2.0,))
    ledger = PrivacyLedger(delta=1e-5, epsilon_budget=100.0)
    first = ledger.spend(m, 7)
    assert ledger.spend(m, 7) == first
    assert list(ledger.rounds) == [m] and list(ledger.round_ids) == [7]
    second = ledger.spend(other, 8)
    assert ledger.spend(m, 7) == second  # an older id, re-published: no new charge
    assert ledger.spend(other, 8) == second
    assert ledger.rounds == (m, other)
    with pytest.raises(ValueError, match="already spent"):
        ledger.spend(other, 7)  # same id, different mechanism: a bug, never a free pass


def test_ledger_rejects_out_of_order_round_ids() -> None:
    m = RoundMechanism((1.0,))
    ledger = PrivacyLedger(delta=1e-5)
    ledger.spend(m, 5)
    with pytest.raises(ValueError, match="increase"):
        ledger.spend(m, 3)
    with pytest.raises(ValueError, match="increase"):
        ledger.spend(m, 4)
    for bad_id in (True, 6.0, "6"):
        with pytest.raises(ValueError, match="round_id"):
            ledger.spend(m, bad_id)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="RoundMechanism"):
        ledger.spend((1.0,), 6)  # type: ignore[arg-type]
    assert ledger.round_ids == (5,)


@pytest.mark.parametrize(("method", "budget"), [("rdp", math.inf), ("pld", 50.0)])
def test_ledger_round_trip_through_json(method: str, budget: float) -> None:
    ledger = PrivacyLedger(delta=1e-6, epsilon_budget=budget, method=method)  # type: ignore[arg-type]
    ledger.spend(RoundMechanism((2.0, 3.0), 0.2), 3)
    ledger.spend(RoundMechanism((0.9,)), 4)
    ledger.spend(RoundMechanism((2.0, 3.0), 0.2), 10)
    text = json.dumps(ledger.to_dict(), allow_nan=False)  # strict JSON: no Infinity
    restored = PrivacyLedger.from_dict(json.loads(text))
    assert restored.epsilon == ledger.epsilon  # exactly
    assert restored.rounds == ledger.rounds and restored.round_ids == ledger.round_ids
    assert restored.delta == ledger.delta and restored.method == ledger.method
    assert restored.epsilon_budget == budget
    assert restored.to_dict() == ledger.to_dict()
    # Still idempotent and ordered after a restart.
    assert restored.spend(RoundMechanism((0.9,)), 4) == ledger.epsilon
    with pytest.raises(ValueError):
        restored.spend(RoundMechanism((0.9,)), 9)


def _valid_ledger_dict() -> dict[str, Any]:
    """A well-formed serialized ledger, written out by hand (format 1)."""
    return {
        "format": 1,
        "delta": 1e-5,
        "epsilon_budget": 10.0,
        "method": "rdp",
        "rounds": [
            {"round_id": 1, "noise_multipliers": [1.0, 2.0], "sampling_rate": 1.0},
            {"round_id": 2, "noise_multipliers": [1.5], "sampling_rate": 1.0},
        ],
    }


def _set(path: Sequence[str | int], value: Any) -> dict[str, Any]:
    data = _valid_ledger_dict()
    target: Any = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


def _without(key: str) -> dict[str, Any]:
    data = _valid_ledger_dict()
    del data[key]
    return data


@pytest.mark.parametrize(
    "data",
    [
        [],
        "ledger",
        _without("delta"),
        _without("rounds"),
        {**_valid_ledger_dict(), "epsilon": 1.0},
        _set(["format"], 2),
        _set(["format"], True),
        _set(["delta"], 0.0),
        _set(["delta"], "1e-5"),
        _set(["delta"], None),
        _set(["epsilon_budget"], -1.0),
        _set(["epsilon_budget"], "inf"),
        _set(["method"], "zcdp"),
        _set(["rounds"], {"1": {}}),
        _set(["rounds", 0], [1, [1.0], 1.0]),
        _set(["rounds", 0, "round_id"], "1"),
        _set(["rounds", 0, "round_id"], False),
        _set(["rounds", 1, "round_id"], 1),
        _set(["rounds", 1, "round_id"], 0),
        _set(["rounds", 0, "noise_multipliers"], []),
        _set(["rounds", 0, "noise_multipliers"], [1.0, -2.0]),
        _set(["rounds", 0, "noise_multipliers"], [1.0, None]),
        _set(["rounds", 0, "noise_multipliers"], "1.0"),
        _set(["rounds", 0, "noise_multipliers"], 1.0),
        _set(["rounds", 0, "sampling_rate"], 1.5),
        _set(["rounds", 0, "sampling_rate"], 0),
        _set(["rounds", 0, "extra"], 1),
    ],
)
def test_ledger_from_dict_rejects_malformed_data(data: Any) -> None:
    with pytest.raises(ValueError):
        PrivacyLedger.from_dict(data)


def test_ledger_from_dict_accepts_the_valid_fixture() -> None:
    ledger = PrivacyLedger.from_dict(_valid_ledger_dict())
    assert ledger.round_ids == (1, 2)
    assert ledger.rounds == (RoundMechanism((1.0, 2.0)), RoundMechanism((1.5,)))
    assert ledger.to_dict() == _valid_ledger_dict()
    # Three unsampled releases (1, 2, 1.5): RDP alpha * (1 + 1/4 + 1/2.25) / 2.
    with mpmath.workdps(DPS):
        rdp = [
            gaussian_rdp(a, 1.0) + gaussian_rdp(a, 2.0) + gaussian_rdp(a, 1.5) for a in RDP_ORDERS
        ]
    assert ledger.epsilon == pytest.approx(rdp_to_epsilon(RDP_ORDERS, rdp, 1e-5), rel=1e-6)


# ---------------------------------------------------------------- 7. bad inputs


@pytest.mark.parametrize(
    ("zs", "q"),
    [
        ((), 1.0),
        ((math.nan,), 1.0),
        ((1.0, math.nan), 1.0),
        ((-1.0,), 1.0),
        ((0.0,), 1.0),
        ((math.inf,), 1.0),
        ((True,), 1.0),
        (("1.0",), 1.0),
        ((1.0,), 0.0),
        ((1.0,), -0.1),
        ((1.0,), 1.0 + 1e-12),
        ((1.0,), math.nan),
        ((1.0,), math.inf),
    ],
)
def test_round_mechanism_rejects_bad_input(zs: tuple[Any, ...], q: float) -> None:
    with pytest.raises(ValueError):
        RoundMechanism(zs, q)


def test_round_mechanism_normalises_and_hashes() -> None:
    m = RoundMechanism([1, 2.0], 1)  # type: ignore[arg-type]
    assert m.noise_multipliers == (1.0, 2.0) and m.sampling_rate == 1.0
    assert m == RoundMechanism((1.0, 2.0)) and hash(m) == hash(RoundMechanism((1.0, 2.0)))


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 1.5, math.nan, math.inf])
def test_epsilon_for_rejects_bad_delta(delta: float) -> None:
    with pytest.raises(ValueError, match="delta"):
        epsilon_for([RoundMechanism((1.0,))], delta)


def test_epsilon_for_rejects_bad_method_and_rounds() -> None:
    with pytest.raises(ValueError, match="method"):
        epsilon_for([RoundMechanism((1.0,))], 1e-5, method="zcdp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="RoundMechanism"):
        epsilon_for([1.0], 1e-5)  # type: ignore[list-item]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delta": 0.0},
        {"delta": 1.0},
        {"delta": math.nan},
        {"delta": 1e-5, "epsilon_budget": 0.0},
        {"delta": 1e-5, "epsilon_budget": -1.0},
        {"delta": 1e-5, "epsilon_budget": math.nan},
        {"delta": 1e-5, "method": "moments"},
    ],
)
def test_ledger_rejects_bad_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PrivacyLedger(**kwargs)
