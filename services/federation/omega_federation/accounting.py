"""Privacy accounting for DP-FedAvg rounds with Google's ``dp_accounting``.

Privacy unit and neighbouring relation: user-level DP where the user is one device. Two
fleets are neighbours when one of them holds the whole data of one more device (add/remove one
device, ``dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE``); every guarantee reported here
is for that relation, across every round composed.

What a round releases: several Gaussian-noised sums over the same cohort of devices, typically
the item-factor model update sum and the per-content trend counts. This module does not see the
data. It trusts that the aggregation code enforces each sum's L2 sensitivity by clipping every
device's contribution to a norm ``C`` and adds noise of standard deviation ``z * C``, where ``z``
is that release's noise multiplier. Averages must use a fixed (data-independent) denominator, or
the participant count becomes an unaccounted release (McMahan et al. 2018). Only Gaussian
releases are accounted: any other data-dependent step, such as a threshold deciding which groups
get published, needs its own accounting.

Several Gaussian releases on the same data are one Gaussian mechanism. Scale each noisy sum by
``1 / (z_i C_i)``: the scaled releases are a vector query with unit noise in every coordinate and
L2 sensitivity ``sqrt(sum_i z_i^-2)``. So a round is exactly one Gaussian with noise multiplier
``z_eff = (sum_i z_i^-2)^-1/2`` (McMahan, Andrew, Erlingsson et al. 2018, "A General Approach to
Adding Differential Privacy to Iterative Training Procedures", Sec. 3). This is a lossless
equivalence, not a bound: dropping a release from the account under-reports the loss.

Optional device sampling: each device takes part in a round independently with probability
``q`` (Poisson sampling), and which devices took part is never published. Privacy amplification
by sampling then applies to the round's joint release.

Accountants:

* RDP (default): Renyi DP (Mironov 2017, "Renyi Differential Privacy", CSF) composes by adding the
  Renyi divergence at every order. A Gaussian with multiplier ``z`` is ``(alpha, alpha / (2 z^2))``
  -RDP, and the Poisson-sampled Gaussian is computed as in Mironov, Talwar & Zhang 2019 ("Renyi
  Differential Privacy of the Sampled Gaussian Mechanism", Sec. 3.3). ``dp_accounting`` 0.6.0
  converts to ``(epsilon, delta)`` with Canonne, Kamath & Steinke 2020 ("The Discrete Gaussian for
  Differential Privacy", Prop. 12), minimised over its default orders. It is fast, and its bound
  is sound but a little loose.
* PLD: privacy loss distributions (Sommer, Meiser & Mohammadi 2019; Koskela, Jalko & Honkela 2020,
  "Computing Tight Differential Privacy Guarantees Using FFT") compose exactly by convolution.
  Google's ``dp_accounting`` implementation discretises pessimistically (Doroshenko et al. 2022,
  "Connect the Dots"), so the epsilon is a tight upper bound. A PLD evaluation takes a few tenths
  of a second instead of milliseconds.

This is the moments-accountant analysis of DP-SGD (Abadi et al. 2016, "Deep Learning with
Differential Privacy") applied to user-level DP-FedAvg (McMahan, Ramage, Talwar & Zhang 2018,
"Learning Differentially Private Recurrent Language Models"), with one step per round.

Cost: an epsilon is computed from the multiset of rounds, grouping identical rounds into one
``SelfComposedDpEvent``. It therefore costs one accountant evaluation per distinct round
mechanism, not per round, and it does not depend on the order in which rounds were spent.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import dp_accounting  # untyped: see the mypy override in pyproject.toml

Method = Literal["rdp", "pld"]

_METHODS: Final[frozenset[str]] = frozenset({"rdp", "pld"})
_LEDGER_FORMAT: Final[int] = 1
_LEDGER_KEYS: Final[frozenset[str]] = frozenset(
    {"format", "delta", "epsilon_budget", "method", "rounds"}
)
_ROUND_KEYS: Final[frozenset[str]] = frozenset({"round_id", "noise_multipliers", "sampling_rate"})
_PLD_VALUE_DISCRETIZATION: Final[float] = 1e-4
"""Privacy-loss grid of the PLD accountant (``dp_accounting``'s default)."""
_CALIBRATION_Z_MIN: Final[float] = 1e-3
_CALIBRATION_Z_MAX: Final[float] = 1e6


def _real(value: object, what: str) -> float:
    """Return ``value`` as a float, rejecting booleans and non-numbers with ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a real number, got {value!r}")
    return float(value)


def _check_delta(delta: object) -> float:
    d = _real(delta, "delta")
    if not 0.0 < d < 1.0:  # also rejects NaN
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return d


def _check_method(method: object) -> Method:
    if method == "rdp":
        return "rdp"
    if method == "pld":
        return "pld"
    raise ValueError(f"method must be one of {sorted(_METHODS)}, got {method!r}")


@dataclass(frozen=True)
class RoundMechanism:
    """The Gaussian releases of one federated round, as seen by the accountant.

    Attributes:
        noise_multipliers: One ``z > 0`` (finite) per Gaussian release of the round: the noise
            standard deviation divided by that release's L2 sensitivity (the clipping norm). At
            least one release is needed; a round that releases nothing is not spent at all. A
            list is accepted and stored as a tuple.
        sampling_rate: Poisson sampling probability ``q`` in ``(0, 1]`` with which each device
            takes part in the round; 1.0 means every device.

    Raises:
        ValueError: From ``__post_init__`` if a multiplier is not a finite positive number,
            there are no releases, or ``sampling_rate`` is outside ``(0, 1]`` (NaN included).
    """

    noise_multipliers: tuple[float, ...]
    sampling_rate: float = 1.0

    def __post_init__(self) -> None:
        raw = self.noise_multipliers
        if isinstance(raw, str | bytes) or not isinstance(raw, Iterable):
            raise ValueError(f"noise_multipliers must be a sequence of numbers, got {raw!r}")
        zs = tuple(_real(z, "noise multiplier") for z in raw)
        if not zs:
            raise ValueError("a round needs at least one noise multiplier (one per release)")
        for z in zs:
            if not (0.0 < z < math.inf):  # also rejects NaN
                raise ValueError(f"noise multipliers must be finite and > 0, got {z!r}")
        q = _real(self.sampling_rate, "sampling_rate")
        if not 0.0 < q <= 1.0:  # also rejects NaN
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate!r}")
        object.__setattr__(self, "noise_multipliers", zs)
        object.__setattr__(self, "sampling_rate", q)

    @property
    def effective_noise_multiplier(self) -> float:
        """Multiplier of the single Gaussian equivalent to all of the round's releases.

        Returns:
            ``(sum_i z_i^-2)^-1/2``, which is at most ``min_i z_i`` (see the module docstring).
        """
        return 1.0 / math.sqrt(math.fsum(z**-2 for z in self.noise_multipliers))

    def dp_event(self) -> dp_accounting.DpEvent:
        """The round as a ``dp_accounting.DpEvent``.

        Returns:
            A ``ComposedDpEvent`` of one ``GaussianDpEvent`` per release when
            ``sampling_rate == 1``. Otherwise it is ``PoissonSampledDpEvent(q,
            GaussianDpEvent(effective_noise_multiplier))``: one Poisson-sampled cohort
            receives all releases, and the equivalent single Gaussian is exact. ``dp_accounting``'s
            PLD accountant only accepts a bare Gaussian under Poisson sampling, and its RDP
            accountant reduces a composition to the same effective multiplier itself.
        """
        if self.sampling_rate == 1.0:
            return dp_accounting.ComposedDpEvent(
                [dp_accounting.GaussianDpEvent(z) for z in self.noise_multipliers]
            )
        return dp_accounting.PoissonSampledDpEvent(
            self.sampling_rate, dp_accounting.GaussianDpEvent(self.effective_noise_multiplier)
        )


def _sort_key(mechanism: RoundMechanism) -> tuple[float, tuple[float, ...]]:
    return (mechanism.sampling_rate, mechanism.noise_multipliers)


def _epsilon(counts: Mapping[RoundMechanism, int], delta: float, method: Method) -> float:
    """Epsilon of composing ``counts[m]`` copies of every mechanism ``m`` (arguments checked)."""
    if not counts:
        return 0.0
    accountant: Any
    if method == "rdp":
        accountant = dp_accounting.rdp.RdpAccountant()
    else:
        accountant = dp_accounting.pld.PLDAccountant(
            value_discretization_interval=_PLD_VALUE_DISCRETIZATION
        )
    # A canonical order makes the result a function of the multiset, bit for bit.
    for mechanism in sorted(counts, key=_sort_key):
        accountant.compose(
            dp_accounting.SelfComposedDpEvent(mechanism.dp_event(), counts[mechanism])
        )
    epsilon = float(accountant.get_epsilon(delta))
    if math.isnan(epsilon):  # never expected; fail closed rather than report no loss
        raise ArithmeticError("dp_accounting returned NaN for epsilon")
    return epsilon


def epsilon_for(rounds: Sequence[RoundMechanism], delta: float, method: Method = "rdp") -> float:
    """Cumulative epsilon of composing ``rounds`` at ``delta``.

    Args:
        rounds: The rounds spent, in any order (composition is commutative).
        delta: Target delta of the whole composition, in ``(0, 1)``.
        method: ``"rdp"`` (Renyi DP, fast) or ``"pld"`` (privacy loss distributions, tighter).

    Returns:
        The epsilon, ``>= 0``; ``0.0`` for no rounds; ``math.inf`` if unbounded.

    Raises:
        ValueError: If ``delta`` is not in ``(0, 1)``, ``method`` is unknown, or an element of
            ``rounds`` is not a ``RoundMechanism``.
    """
    delta = _check_delta(delta)
    method = _check_method(method)
    for mechanism in rounds:
        if not isinstance(mechanism, RoundMechanism):
            raise ValueError(f"rounds must hold RoundMechanism objects, got {mechanism!r}")
    return _epsilon(Counter(rounds), delta, method)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    rounds: int,
    sampling_rate: float = 1.0,
    method: Method = "rdp",
    tolerance: float = 1e-3,
) -> float:
    """Smallest noise multiplier that keeps ``rounds`` rounds within ``target_epsilon``.

    Each round is a single Gaussian release of multiplier ``z``, Poisson-sampled at
    ``sampling_rate``. Epsilon decreases in ``z``, so bisection on ``log z`` runs until the
    bracket ``[lo, hi]`` has ``hi / lo <= 1 + tolerance``, with ``epsilon(lo) > target`` and
    ``epsilon(hi) <= target``. The bound is always on the safe side (``hi`` is returned). A round
    with several releases needs its releases' multipliers to combine to the returned ``z``
    (``RoundMechanism.effective_noise_multiplier``).

    Args:
        target_epsilon: Total epsilon allowed over all rounds, ``> 0``, finite.
        delta: Target delta of the composition, in ``(0, 1)``.
        rounds: Number of rounds, ``>= 1``.
        sampling_rate: Poisson sampling probability per round, in ``(0, 1]``.
        method: ``"rdp"`` or ``"pld"``. With PLD each probe costs a few tenths of a second, and
            a calibration makes about 15 probes.
        tolerance: Relative precision of the returned ``z``, in ``(0, 1)``.

    Returns:
        ``z`` such that the composition has ``epsilon <= target_epsilon`` and ``z / (1 +
        tolerance)`` does not. If even ``z = 1e-3`` meets the target, ``1e-3`` is returned.

    Raises:
        ValueError: On an out-of-range or NaN argument, or if the target cannot be met with
            ``z <= 1e6``.
    """
    target = _real(target_epsilon, "target_epsilon")
    if not 0.0 < target < math.inf:
        raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon!r}")
    delta = _check_delta(delta)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    method = _check_method(method)
    tol = _real(tolerance, "tolerance")
    if not 0.0 < tol < 1.0:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance!r}")
    RoundMechanism((1.0,), sampling_rate)  # validates sampling_rate

    def fits(z: float) -> bool:
        mechanism = RoundMechanism((z,), sampling_rate)
        return _epsilon({mechanism: rounds}, delta, method) <= target

    lo = hi = 1.0
    if fits(hi):
        while True:  # halve until the target is missed: then epsilon(lo) > target
            if hi <= _CALIBRATION_Z_MIN:
                return hi
            lo = max(hi / 2.0, _CALIBRATION_Z_MIN)
            if not fits(lo):
                break
            hi = lo
    else:
        while True:  # double until the target is met: then epsilon(hi) <= target
            if lo >= _CALIBRATION_Z_MAX:
                raise ValueError(
                    f"target_epsilon={target!r} at delta={delta!r} needs a noise multiplier "
                    f"above {_CALIBRATION_Z_MAX:g} for {rounds} rounds"
                )
            hi = min(lo * 2.0, _CALIBRATION_Z_MAX)
            if fits(hi):
                break
            lo = hi
    while hi / lo > 1.0 + tol:
        mid = math.sqrt(lo * hi)  # midpoint in log space
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


class BudgetExceededError(Exception):
    """A spend would take the cumulative epsilon past the ledger's budget.

    Attributes:
        epsilon: The cumulative epsilon the spend would have led to.
        budget: The ledger's epsilon budget.
    """

    def __init__(self, epsilon: float, budget: float) -> None:
        super().__init__(
            f"spending this round would bring epsilon to {epsilon:.6g}, "
            f"past the budget of {budget:.6g}"
        )
        self.epsilon = epsilon
        self.budget = budget


class PrivacyLedger:
    """The persistent privacy accountant of one fleet: every round spent, in order.

    The cumulative epsilon is cached. Spending recomputes it once from the multiset of rounds
    (see the module docstring), so ``epsilon`` is free and a ledger restored with
    ``from_dict`` reports exactly the same value. This class is not thread-safe.

    Args:
        delta: Target delta of the whole composition, in ``(0, 1)``.
        epsilon_budget: Largest cumulative epsilon allowed, ``> 0``; ``math.inf`` for no limit.
        method: ``"rdp"`` or ``"pld"``, see ``epsilon_for``.

    Raises:
        ValueError: On an out-of-range or NaN argument or an unknown method.
    """

    def __init__(
        self, delta: float, epsilon_budget: float = math.inf, method: Method = "rdp"
    ) -> None:
        self._delta = _check_delta(delta)
        budget = _real(epsilon_budget, "epsilon_budget")
        if not budget > 0.0:  # also rejects NaN
            raise ValueError(f"epsilon_budget must be > 0, got {epsilon_budget!r}")
        self._budget = budget
        self._method: Method = _check_method(method)
        self._rounds: list[RoundMechanism] = []
        self._round_ids: list[int] = []
        self._by_id: dict[int, RoundMechanism] = {}
        self._counts: Counter[RoundMechanism] = Counter()
        self._epsilon = 0.0

    @property
    def delta(self) -> float:
        """Target delta of the composition."""
        return self._delta

    @property
    def epsilon_budget(self) -> float:
        """Largest cumulative epsilon allowed (``math.inf``: no limit)."""
        return self._budget

    @property
    def method(self) -> Method:
        """Accounting method, ``"rdp"`` or ``"pld"``."""
        return self._method

    @property
    def rounds(self) -> tuple[RoundMechanism, ...]:
        """The rounds spent, in spending order."""
        return tuple(self._rounds)

    @property
    def round_ids(self) -> tuple[int, ...]:
        """The ids of ``rounds``, strictly increasing."""
        return tuple(self._round_ids)

    @property
    def epsilon(self) -> float:
        """Cumulative epsilon of every round spent, at ``delta`` (cached)."""
        return self._epsilon

    def _check_mechanism(self, mechanism: object) -> RoundMechanism:
        if not isinstance(mechanism, RoundMechanism):
            raise ValueError(f"expected a RoundMechanism, got {mechanism!r}")
        return mechanism

    def preview(self, mechanism: RoundMechanism) -> float:
        """Cumulative epsilon if ``mechanism`` were spent now; nothing is recorded.

        Args:
            mechanism: The round about to be released.

        Returns:
            The would-be cumulative epsilon at ``delta`` (the budget is not checked).

        Raises:
            ValueError: If ``mechanism`` is not a ``RoundMechanism``.
        """
        mechanism = self._check_mechanism(mechanism)
        return _epsilon(self._counts + Counter([mechanism]), self._delta, self._method)

    def spend(self, mechanism: RoundMechanism, round_id: int) -> float:
        """Record round ``round_id`` as released with ``mechanism``.

        Call this before the round's result leaves the process. When a crash happens after the
        spend, the checkpointed round may be published again under the same id: this spend is
        idempotent and charges nothing more.

        Args:
            mechanism: The round's Gaussian releases.
            round_id: Id of the round, larger than every id spent so far, or equal to an id
                already spent with the same mechanism (idempotent re-spend).

        Returns:
            The new cumulative epsilon (unchanged for an idempotent re-spend).

        Raises:
            BudgetExceededError: If the cumulative epsilon would pass ``epsilon_budget``; the
                ledger is unchanged.
            ValueError: If ``round_id`` is not an int, is not larger than the last id spent
                and unknown, or was spent with a different mechanism.
        """
        mechanism = self._check_mechanism(mechanism)
        if isinstance(round_id, bool) or not isinstance(round_id, int):
            raise ValueError(f"round_id must be an int, got {round_id!r}")
        spent = self._by_id.get(round_id)
        if spent is not None:
            if spent != mechanism:
                raise ValueError(
                    f"round {round_id} was already spent with {spent!r}, not {mechanism!r}"
                )
            return self._epsilon
        if self._round_ids and round_id <= self._round_ids[-1]:
            raise ValueError(f"round ids must increase: got {round_id} after {self._round_ids[-1]}")
        counts = self._counts + Counter([mechanism])
        epsilon = _epsilon(counts, self._delta, self._method)
        if epsilon > self._budget:
            raise BudgetExceededError(epsilon, self._budget)
        self._rounds.append(mechanism)
        self._round_ids.append(round_id)
        self._by_id[round_id] = mechanism
        self._counts = counts
        self._epsilon = epsilon
        return epsilon

    def epsilon_of_round(self, mechanism: RoundMechanism) -> float:
        """Epsilon of ``mechanism`` alone, at ``delta`` with this ledger's method.

        Args:
            mechanism: One round.

        Returns:
            The round's own epsilon (cumulative epsilons do not add up these values).

        Raises:
            ValueError: If ``mechanism`` is not a ``RoundMechanism``.
        """
        mechanism = self._check_mechanism(mechanism)
        return _epsilon({mechanism: 1}, self._delta, self._method)

    def to_dict(self) -> dict[str, Any]:
        """The ledger as JSON-serializable plain types.

        Returns:
            ``{"format": 1, "delta": float, "epsilon_budget": float | None (None: no limit),
            "method": "rdp" | "pld", "rounds": [{"round_id": int, "noise_multipliers":
            [float, ...], "sampling_rate": float}, ...]}``. It holds no infinities or NaNs, so
            strict JSON parsers (PostgreSQL ``jsonb``) accept it.
        """
        return {
            "format": _LEDGER_FORMAT,
            "delta": self._delta,
            "epsilon_budget": None if math.isinf(self._budget) else self._budget,
            "method": self._method,
            "rounds": [
                {
                    "round_id": round_id,
                    "noise_multipliers": list(mechanism.noise_multipliers),
                    "sampling_rate": mechanism.sampling_rate,
                }
                for round_id, mechanism in zip(self._round_ids, self._rounds, strict=True)
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyLedger:
        """Rebuild a ledger written by ``to_dict`` and recompute its epsilon.

        The rounds were released already, so they are loaded even if together they pass the
        budget; the next ``spend`` then fails.

        Args:
            data: Output of ``to_dict``, possibly through ``json.dumps``/``json.loads``.

        Returns:
            The ledger, whose ``epsilon`` equals that of the ledger that was saved.

        Raises:
            ValueError: If ``data`` is malformed: wrong format version, missing or unknown
                keys, wrong types, invalid values, or round ids that do not increase.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"ledger data must be a mapping, got {type(data).__name__}")
        keys = set(data)
        if keys != _LEDGER_KEYS:
            raise ValueError(
                f"ledger keys must be {sorted(_LEDGER_KEYS)}; missing "
                f"{sorted(_LEDGER_KEYS - keys)}, unknown {sorted(map(str, keys - _LEDGER_KEYS))}"
            )
        version = data["format"]
        if isinstance(version, bool) or version != _LEDGER_FORMAT:
            raise ValueError(f"unsupported ledger format {version!r}, expected {_LEDGER_FORMAT}")
        budget = data["epsilon_budget"]
        ledger = cls(
            delta=data["delta"],
            epsilon_budget=math.inf if budget is None else budget,
            method=data["method"],
        )
        rounds = data["rounds"]
        if not isinstance(rounds, list):
            raise ValueError(f"ledger rounds must be a list, got {type(rounds).__name__}")
        for index, entry in enumerate(rounds):
            if not isinstance(entry, Mapping) or set(entry) != _ROUND_KEYS:
                raise ValueError(f"round {index} must be a mapping with keys {sorted(_ROUND_KEYS)}")
            round_id = entry["round_id"]
            if isinstance(round_id, bool) or not isinstance(round_id, int):
                raise ValueError(f"round {index}: round_id must be an int, got {round_id!r}")
            if ledger._round_ids and round_id <= ledger._round_ids[-1]:
                raise ValueError(f"round {index}: round ids must increase, got {round_id}")
            multipliers = entry["noise_multipliers"]
            if not isinstance(multipliers, list):
                raise ValueError(f"round {index}: noise_multipliers must be a list")
            mechanism = RoundMechanism(tuple(multipliers), entry["sampling_rate"])
            ledger._rounds.append(mechanism)
            ledger._round_ids.append(round_id)
            ledger._by_id[round_id] = mechanism
            ledger._counts[mechanism] += 1
        ledger._epsilon = _epsilon(ledger._counts, ledger._delta, ledger._method)
        return ledger
