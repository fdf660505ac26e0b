"""Differential-privacy calibration and accounting for one federated round and across rounds.

Neighbouring relation: two exports are neighbours when one of them holds every row of one more
device (add/remove one device). Each round releases, per published group, noisy sums that one
device can move by a bounded amount (see ``omega_federation.aggregation.l2_sensitivity``); this
module turns ``(epsilon, delta)`` into a noise scale and keeps the running privacy loss.

Per-round budget split (``PrivacyParams.delta`` is the *total* per-round delta):

* Gaussian: half of ``delta`` (``SELECTION_DELTA_FRACTION``) pays for the data-dependent choice of
  which groups are published (the k-anonymity gate, see ``aggregation.federated_average``), the
  other half for the Gaussian mechanism on the sums, calibrated with the analytic Gaussian mechanism
  (Balle & Wang 2018, "Improving the Gaussian Mechanism for Differential Privacy", Thm. 8), which
  is exact and, unlike the classical ``sqrt(2 ln(1.25/delta)) / epsilon`` bound (Dwork & Roth 2014,
  Thm. A.1), valid for every ``epsilon > 0``.
* Laplace: the mechanism itself is pure ``epsilon``-DP (Dwork & Roth 2014, Thm. 3.6); the whole
  ``delta`` pays for group selection.

If the selection step fails with probability at most ``p`` (a group that only exists because of
one device gets published), a round whose mechanism is ``(eps_m, delta_m)``-DP is
``(eps_m - ln(1 - p), delta_m + p)``-DP, so ``eps_m = epsilon + ln(1 - p)`` is used to report
exactly ``(epsilon, delta)`` per round.

Composition across rounds (``PrivacyAccountant``): two sound bounds are tracked and the smaller
epsilon is reported, both at the same total delta ``sum(delta_i)``:

1. basic composition: ``(sum(epsilon_i), sum(delta_i))`` (Dwork & Roth 2014, Thm. 3.16);
2. zero-concentrated DP (Bun & Steinke 2016, "Concentrated Differential Privacy: Simplifications,
   Extensions, and Lower Bounds"): a Gaussian with noise multiplier ``z`` is ``1 / (2 z^2)``-zCDP
   (Prop. 1.6), a pure ``eps``-DP Laplace round is ``eps^2 / 2``-zCDP (Prop. 1.4), rho adds up
   (Lemma 1.7), and the total is converted with ``delta' = sum(delta_mechanism_i)`` by the tighter
   of Bun & Steinke Prop. 1.3 and the RDP conversion of Canonne, Kamath & Steinke 2020 ("The
   Discrete Gaussian for Differential Privacy", Prop. 12); the selection failures add
   ``sum(p_i)`` to delta and ``-sum(ln(1 - p_i))`` to epsilon.

For many Gaussian rounds (2) grows like ``sqrt(rounds)`` instead of ``rounds``.

Known limitation: noise comes from numpy's floating-point samplers, which are not hardened against
the least-significant-bit attacks of Mironov 2012 ("On Significance of the Least Significant Bits
for Differential Privacy"); the guarantees above are those of the idealized real-valued mechanisms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist
from typing import Final, Literal

import numpy as np

Mechanism = Literal["gaussian", "laplace"]

SELECTION_DELTA_FRACTION: Final[float] = 0.5
"""Share of a Gaussian round's delta spent on the data-dependent group selection."""

_SQRT2: Final[float] = math.sqrt(2.0)
_LOG_SQRT_2PI: Final[float] = 0.5 * math.log(2.0 * math.pi)
_ASYMPTOTIC_BELOW: Final[float] = -30.0
_ACCOUNTANT_FORMAT: Final[int] = 1


def _check_epsilon(epsilon: float) -> None:
    if not (epsilon > 0.0):  # also rejects NaN
        raise ValueError(f"epsilon must be > 0 (inf disables noise), got {epsilon!r}")


def _log_ndtr(x: float) -> float:
    """Natural log of the standard normal CDF, accurate far into both tails.

    Args:
        x: Point at which to evaluate ``log(Phi(x))``.

    Returns:
        ``log(Phi(x))``; for ``x < -30`` the asymptotic series of Mills' ratio (relative error
        below 2e-12) avoids the underflow of ``erfc``.
    """
    if x >= 0.0:
        return math.log1p(-0.5 * math.erfc(x / _SQRT2))
    if x > _ASYMPTOTIC_BELOW:
        return math.log(0.5 * math.erfc(-x / _SQRT2))
    inv2 = 1.0 / (x * x)
    series = 1.0 - inv2 * (1.0 - inv2 * (3.0 - inv2 * (15.0 - 105.0 * inv2)))
    return -0.5 * x * x - math.log(-x) - _LOG_SQRT_2PI + math.log(series)


def gaussian_delta(epsilon: float, noise_multiplier: float) -> float:
    """Exact privacy profile of the Gaussian mechanism (Balle & Wang 2018, Thm. 8).

    ``delta(eps) = Phi(mu/2 - eps/mu) - e^eps * Phi(-mu/2 - eps/mu)`` with ``mu = 1 / z``, where
    ``z = sigma / l2_sensitivity``. The second term is evaluated in log space, so large epsilons
    neither overflow nor lose the tail.

    Args:
        epsilon: Privacy parameter, ``>= 0``.
        noise_multiplier: ``z = sigma / l2_sensitivity``, ``>= 0``; 0 means no noise.

    Returns:
        The smallest delta for which the mechanism is ``(epsilon, delta)``-DP, in ``[0, 1]``.

    Raises:
        ValueError: If an argument is negative or NaN.
    """
    if not (epsilon >= 0.0) or not (noise_multiplier >= 0.0):
        raise ValueError("epsilon and noise_multiplier must be >= 0")
    if noise_multiplier == 0.0:
        return 1.0
    if math.isinf(epsilon) or math.isinf(noise_multiplier):
        return 0.0
    mu = 1.0 / noise_multiplier
    a = epsilon / mu
    first = math.exp(_log_ndtr(0.5 * mu - a))
    second = math.exp(epsilon + _log_ndtr(-0.5 * mu - a))
    return min(1.0, max(0.0, first - second))


@lru_cache(maxsize=256)
def _gaussian_noise_multiplier(epsilon: float, delta: float) -> float:
    """Smallest ``z = sigma / sensitivity`` with ``gaussian_delta(epsilon, z) <= delta``."""
    # delta(z) decreases strictly in z; bisect on log z from a bracket around the classical bound.
    hi = max(1.0, math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon)
    while gaussian_delta(epsilon, hi) > delta:
        hi *= 2.0
    lo = hi / 2.0
    while lo > 1e-12 and gaussian_delta(epsilon, lo) <= delta:
        lo /= 2.0
    for _ in range(200):
        if hi / lo - 1.0 < 1e-13:
            break
        mid = math.sqrt(lo * hi)
        if gaussian_delta(epsilon, mid) <= delta:
            hi = mid
        else:
            lo = mid
    return hi  # the conservative side: gaussian_delta(epsilon, hi) <= delta


def gaussian_sigma(epsilon: float, delta: float, l2_sensitivity: float) -> float:
    """Noise standard deviation of the analytic Gaussian mechanism (Balle & Wang 2018, Alg. 1).

    Solves ``gaussian_delta(epsilon, sigma / l2_sensitivity) = delta`` by bisection (relative
    precision 1e-13, rounded up). Valid for every ``epsilon > 0``; smaller than Dwork & Roth's
    classical ``l2_sensitivity * sqrt(2 ln(1.25/delta)) / epsilon`` (which needs ``epsilon < 1``).

    Args:
        epsilon: Privacy parameter, ``> 0``; ``inf`` returns 0 (noise disabled).
        delta: Failure probability, ``0 < delta < 1``.
        l2_sensitivity: Largest L2 change of the released vector when one device is added or
            removed, ``>= 0``, in the units of the released values.

    Returns:
        sigma, in the units of ``l2_sensitivity``.

    Raises:
        ValueError: If ``epsilon <= 0``, ``delta`` outside ``(0, 1)`` or a negative/non-finite
            sensitivity.
    """
    _check_epsilon(epsilon)
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1) for the Gaussian mechanism, got {delta!r}")
    if not (math.isfinite(l2_sensitivity) and l2_sensitivity >= 0.0):
        raise ValueError(f"l2_sensitivity must be finite and >= 0, got {l2_sensitivity!r}")
    if math.isinf(epsilon) or l2_sensitivity == 0.0:
        return 0.0
    return l2_sensitivity * _gaussian_noise_multiplier(float(epsilon), float(delta))


def laplace_scale(epsilon: float, l1_sensitivity: float) -> float:
    """Scale ``b = l1_sensitivity / epsilon`` of the Laplace mechanism.

    Laplace mechanism: Dwork & Roth 2014, Def. 3.3 and Thm. 3.6 (pure ``epsilon``-DP).

    Args:
        epsilon: Privacy parameter, ``> 0``; ``inf`` returns 0 (noise disabled).
        l1_sensitivity: Largest L1 change of the released vector for one device, ``>= 0``.

    Returns:
        The Laplace scale ``b`` (standard deviation ``sqrt(2) * b``), in sensitivity units.

    Raises:
        ValueError: If ``epsilon <= 0`` or a negative/non-finite sensitivity.
    """
    _check_epsilon(epsilon)
    if not (math.isfinite(l1_sensitivity) and l1_sensitivity >= 0.0):
        raise ValueError(f"l1_sensitivity must be finite and >= 0, got {l1_sensitivity!r}")
    if math.isinf(epsilon):
        return 0.0
    return l1_sensitivity / epsilon


def zcdp_to_dp_epsilon(rho: float, delta: float) -> float:
    """Convert ``rho``-zCDP to an ``(epsilon, delta)``-DP epsilon.

    Returns the smaller of Bun & Steinke 2016 Prop. 1.3, ``rho + 2 sqrt(rho ln(1/delta))``, and
    Canonne, Kamath & Steinke 2020 Prop. 12 (rho-zCDP is (alpha, rho alpha)-RDP for every alpha),
    ``min over alpha > 1 of rho alpha +
    (ln(1/delta) + (alpha - 1) ln(1 - 1/alpha) - ln(alpha)) / (alpha - 1)``. Every alpha gives a
    valid bound, so the grid search below is sound whatever its resolution.

    Args:
        rho: zCDP parameter, ``>= 0`` (``inf`` allowed).
        delta: Target delta, ``>= 0``.

    Returns:
        epsilon, ``>= 0``; ``inf`` when ``delta == 0`` and ``rho > 0``.

    Raises:
        ValueError: If ``rho`` or ``delta`` is negative or NaN.
    """
    if not (rho >= 0.0) or not (delta >= 0.0):
        raise ValueError(f"rho and delta must be >= 0, got rho={rho!r}, delta={delta!r}")
    if rho == 0.0 or delta >= 1.0:
        return 0.0
    if math.isinf(rho) or delta == 0.0:
        return math.inf
    log_inv_delta = -math.log(delta)
    bun_steinke = rho + 2.0 * math.sqrt(rho * log_inv_delta)
    am1 = np.logspace(-8.0, 8.0, 4001)  # alpha - 1
    alpha = am1 + 1.0
    bounds = rho * alpha + (log_inv_delta + am1 * np.log1p(-1.0 / alpha) - np.log(alpha)) / am1
    best = float(np.min(bounds[np.isfinite(bounds)]))
    return max(0.0, min(bun_steinke, best))


@dataclass(frozen=True)
class PrivacyParams:
    """Differential-privacy settings of one federated round.

    Attributes:
        epsilon: Per-round epsilon, ``> 0``; ``float('inf')`` disables noise (clipping and the
            per-device group cap still apply).
        delta: Total per-round delta, ``0 <= delta < 1`` (e.g. 1e-6). Gaussian: must be ``> 0``;
            split between the mechanism and group selection (``SELECTION_DELTA_FRACTION``).
            Laplace: pays for group selection only (``federated_average`` needs it ``> 0``).
        clipping_norm: Largest weight (success_rate x sample_count) one device has in one group;
            the weight of a device in a group is ``min(w, clipping_norm)``. ``> 0``, finite.
        mechanism: ``"gaussian"`` (recommended; L2 sensitivity grows with ``sqrt(m)``) or
            ``"laplace"`` (L1 sensitivity grows with ``sqrt(384)``, far noisier for embeddings).
        max_patterns_per_device: A device contributes to at most this many groups per round
            (extra ones are dropped, highest clipped weight kept); bounds the sensitivity.

    Raises:
        ValueError: On any out-of-range value.
    """

    epsilon: float
    delta: float
    clipping_norm: float
    mechanism: Mechanism = "gaussian"
    max_patterns_per_device: int = 8

    def __post_init__(self) -> None:
        _check_epsilon(self.epsilon)
        if not (0.0 <= self.delta < 1.0):
            raise ValueError(f"delta must be in [0, 1), got {self.delta!r}")
        if self.mechanism not in ("gaussian", "laplace"):
            raise ValueError(f"mechanism must be 'gaussian' or 'laplace', got {self.mechanism!r}")
        if self.mechanism == "gaussian" and math.isfinite(self.epsilon) and self.delta <= 0.0:
            raise ValueError("the Gaussian mechanism needs delta > 0")
        if not (math.isfinite(self.clipping_norm) and self.clipping_norm > 0.0):
            raise ValueError(f"clipping_norm must be finite and > 0, got {self.clipping_norm!r}")
        m = self.max_patterns_per_device
        if isinstance(m, bool) or not isinstance(m, int | np.integer) or m < 1:
            raise ValueError(f"max_patterns_per_device must be an int >= 1, got {m!r}")

    @property
    def noise_enabled(self) -> bool:
        """True unless ``epsilon`` is infinite."""
        return math.isfinite(self.epsilon)


@dataclass(frozen=True)
class NoiseCalibration:
    """How one round's ``PrivacyParams`` are spent (see the module docstring).

    Attributes:
        mechanism: ``"gaussian"`` or ``"laplace"``.
        noise_multiplier: Gaussian ``sigma / l2_sensitivity`` or Laplace ``b / l1_sensitivity``;
            0 when noise is disabled.
        mechanism_epsilon: Epsilon the noise is calibrated for, ``epsilon + ln(1 - p)``.
        mechanism_delta: Delta of the noise mechanism (0 for Laplace).
        selection_delta: ``p``, the allowed probability that group selection publishes a group
            that exists only because of one device.
        rho: zCDP parameter of the noise mechanism (``inf`` when noise is disabled).
    """

    mechanism: Mechanism
    noise_multiplier: float
    mechanism_epsilon: float
    mechanism_delta: float
    selection_delta: float
    rho: float


def calibrate(params: PrivacyParams) -> NoiseCalibration:
    """Split a round's budget between the noise mechanism and group selection.

    Args:
        params: The round's privacy settings.

    Returns:
        The calibration (noise multiplier, per-part epsilon/delta, zCDP rho).

    Raises:
        ValueError: If ``epsilon`` is too small to absorb the selection term.
    """
    return _calibrate(params.epsilon, params.delta, params.mechanism)


@lru_cache(maxsize=64)
def _calibrate(epsilon: float, delta: float, mechanism: Mechanism) -> NoiseCalibration:
    if math.isinf(epsilon):
        return NoiseCalibration(mechanism, 0.0, math.inf, delta, 0.0, math.inf)
    p = delta * SELECTION_DELTA_FRACTION if mechanism == "gaussian" else delta
    eps_m = epsilon + math.log1p(-p)
    if not (eps_m > 0.0):
        raise ValueError(f"epsilon={epsilon!r} is too small for delta={delta!r}")
    if mechanism == "gaussian":
        delta_m = delta - p
        z = gaussian_sigma(eps_m, delta_m, 1.0)
        return NoiseCalibration(mechanism, z, eps_m, delta_m, p, 1.0 / (2.0 * z * z))
    return NoiseCalibration(mechanism, 1.0 / eps_m, eps_m, 0.0, p, 0.5 * eps_m * eps_m)


@dataclass(frozen=True)
class RoundPrivacy:
    """Privacy spent by one round and in total so far.

    Attributes:
        epsilon: This round's epsilon.
        delta: This round's delta.
        cumulative_epsilon: Epsilon of all rounds so far, this one included (see
            ``PrivacyAccountant``), at ``cumulative_delta``.
        cumulative_delta: Delta of all rounds so far.
        noise_multiplier: Gaussian ``sigma / l2_sensitivity`` or Laplace ``b / l1_sensitivity``
            (0 when noise is disabled).
    """

    epsilon: float
    delta: float
    cumulative_epsilon: float
    cumulative_delta: float
    noise_multiplier: float


_STATE_KEYS: Final = (
    "rounds",
    "sum_epsilon",
    "sum_delta",
    "rho",
    "sum_mechanism_delta",
    "sum_selection_delta",
    "selection_epsilon_shift",
)


class PrivacyAccountant:
    """Tracks epsilon and delta per round and cumulatively (basic composition and zCDP).

    The reported cumulative epsilon is ``min(sum(epsilon_i), eps_zcdp)`` where
    ``eps_zcdp = zcdp_to_dp_epsilon(sum(rho_i), sum(delta_mechanism_i)) - sum(ln(1 - p_i))``; both
    hold at ``cumulative_delta = sum(delta_i)``, so the minimum is a valid guarantee. Composition
    is adaptive: it holds even when a round's settings depend on earlier outputs.
    """

    def __init__(self) -> None:
        """Start with nothing spent."""
        self._state: dict[str, float] = dict.fromkeys(_STATE_KEYS, 0.0)

    @staticmethod
    def _after(state: Mapping[str, float], params: PrivacyParams) -> dict[str, float]:
        cal = calibrate(params)
        new = dict(state)
        new["rounds"] += 1
        new["sum_epsilon"] += params.epsilon
        new["sum_delta"] += params.delta
        new["rho"] += cal.rho
        new["sum_mechanism_delta"] += cal.mechanism_delta
        new["sum_selection_delta"] += cal.selection_delta
        new["selection_epsilon_shift"] -= math.log1p(-cal.selection_delta)
        return new

    @staticmethod
    def _epsilon(state: Mapping[str, float]) -> float:
        basic = state["sum_epsilon"]
        mech_delta = state["sum_mechanism_delta"]
        if mech_delta > 0.0 and math.isfinite(state["rho"]):
            zcdp = zcdp_to_dp_epsilon(state["rho"], mech_delta) + state["selection_epsilon_shift"]
            return min(basic, zcdp)
        return basic

    @staticmethod
    def _delta(state: Mapping[str, float]) -> float:
        # Both bounds are stated at this delta; max() absorbs floating-point rounding.
        return min(
            1.0,
            max(state["sum_delta"], state["sum_mechanism_delta"] + state["sum_selection_delta"]),
        )

    def _round(self, state: Mapping[str, float], params: PrivacyParams) -> RoundPrivacy:
        return RoundPrivacy(
            epsilon=params.epsilon,
            delta=params.delta,
            cumulative_epsilon=self._epsilon(state),
            cumulative_delta=self._delta(state),
            noise_multiplier=calibrate(params).noise_multiplier,
        )

    def preview(self, params: PrivacyParams) -> RoundPrivacy:
        """What ``spend(params)`` would report, without spending anything.

        Args:
            params: The next round's privacy settings.

        Returns:
            The round's privacy and the totals it would lead to.
        """
        return self._round(self._after(self._state, params), params)

    def spend(self, params: PrivacyParams) -> RoundPrivacy:
        """Record one round.

        Args:
            params: The round's privacy settings.

        Returns:
            The round's epsilon/delta, the new totals and the noise multiplier to use.

        Raises:
            ValueError: If ``params`` cannot be calibrated (epsilon too small for delta).
        """
        state = self._after(self._state, params)
        result = self._round(state, params)
        self._state = state
        return result

    @property
    def rounds(self) -> int:
        """Number of rounds spent."""
        return int(self._state["rounds"])

    @property
    def cumulative_epsilon(self) -> float:
        """Epsilon of all rounds so far (0 before any round) at ``cumulative_delta``."""
        return self._epsilon(self._state)

    @property
    def cumulative_delta(self) -> float:
        """Delta of all rounds so far, ``sum(delta_i)`` capped at 1."""
        return self._delta(self._state)

    @property
    def cumulative_rho(self) -> float:
        """Total zCDP rho of the noise mechanisms (``inf`` after a noise-free round)."""
        return self._state["rho"]

    def to_dict(self) -> dict[str, int | float | str]:
        """JSON-safe state for checkpointing (infinite floats are written as ``"inf"``).

        Returns:
            ``{"format": 1, "rounds": int, "sum_epsilon": ..., ...}``.
        """
        out: dict[str, int | float | str] = {"format": _ACCOUNTANT_FORMAT}
        for key in _STATE_KEYS:
            value = self._state[key]
            if key == "rounds":
                out[key] = int(value)
            else:
                out[key] = value if math.isfinite(value) else "inf"
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> PrivacyAccountant:
        """Rebuild an accountant from ``to_dict`` output.

        Args:
            data: A mapping as produced by ``to_dict`` (for example after a JSON round trip).

        Returns:
            An accountant with the same state.

        Raises:
            ValueError: On a missing key, an unknown format or a value that is not a
                non-negative number.
        """
        if data.get("format") != _ACCOUNTANT_FORMAT:
            raise ValueError(f"unknown accountant format {data.get('format')!r}")
        state: dict[str, float] = {}
        for key in _STATE_KEYS:
            if key not in data:
                raise ValueError(f"missing accountant field {key!r}")
            raw = data[key]
            if raw == "inf":
                value = math.inf
            elif isinstance(raw, int | float) and not isinstance(raw, bool):
                value = float(raw)
            else:
                raise ValueError(f"accountant field {key!r} must be a number, got {raw!r}")
            if not (value >= 0.0):
                raise ValueError(f"accountant field {key!r} must be >= 0, got {raw!r}")
            state[key] = value
        if not float(state["rounds"]).is_integer():
            raise ValueError("accountant field 'rounds' must be an integer")
        acc = cls()
        acc._state = state
        return acc


def normal_upper_quantile(tail: float) -> float:
    """``t`` with ``P(N(0, 1) >= t) = tail``.

    Args:
        tail: Upper-tail probability in ``(0, 1)``.

    Returns:
        The quantile ``t``.
    """
    return -NormalDist().inv_cdf(tail)
