"""The device's side of federated collaborative filtering: user factor, model update, scores.

The global model is a matrix of item factors ``V`` (``n_items x d``, orthonormal columns over
the model's active items) trained by the fleet with federated subspace iteration: the power
method of PureSVD (Cremonesi, Koren & Turrin 2010, "Performance of Recommender Algorithms on
Top-N Recommendation Tasks") run as federated averaging, with each device's update clipped
and Gaussian noise on the sum (the noisy power method of Hardt & Price 2014, "The Noisy Power
Method: A Meta Algorithm with Applications"; DP-FedAvg of McMahan et al. 2018). It is the
federated collaborative filtering of Ammad-ud-din et al. 2019 (arXiv 1901.09888) with a
closed-form user step: item factors are global, every user factor stays on its device.

On one device, from its own viewings only:

* **preference vector** ``p`` (``m`` interacted items): each viewing's completion gives a
  weight (success, partial, failure; `InteractionWeights`), repeated viewings keep the highest,
  and ``p`` is scaled to unit L2 norm so that every device counts the same whatever the length
  of its history;
* **user factor** ``x = V_S^T p`` (``d``), ``V_S`` the model rows of the device's items: the
  least-squares fold-in of the device into the model's column space, kept on the device;
* **model update** ``U = w * C * p x^T / |x|`` (rows ``S``): the device's share of the next
  power-method product ``G V`` with ``G = sum_u p_u p_u^T``, scaled to the clipping norm ``C``
  so that the device spends its whole privacy share (normalizing instead of only clipping
  measured +0.013 precision@10 on the validation split at epsilon 8), times the device's quality
  weight ``w`` in [0, 1];
* **context steer** ``x = x / |x| + beta * x_c / |x_c|`` (`steer_factor`): ``x_c = V_S^T p_c``
  folded in from the viewings of one context bucket only (time slot x day type), so that the
  ranking of a moment leans towards what the viewer watches at that time of day;
* **scores** ``V x``: the device's predicted preference for every item the model knows.

Everything here is pure numpy on small arrays; nothing is sent or stored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "InteractionWeights",
    "ModelUpdate",
    "model_update",
    "preference_vector",
    "quality_weight",
    "score_items",
    "steer_factor",
    "update_direction",
    "user_factor",
]


@dataclass(frozen=True)
class InteractionWeights:
    """How much one viewing says the viewer likes the item, by its completion.

    The defaults were chosen on the validation split of the MovieLens replay (each user's first
    80% of training ratings fit, the last 20% validate; ``bench/tune_collaborative.py``):
    abandoned viewings carry no preference, half-watched ones half.

    Raises:
        ValueError: a weight is negative, not finite, or all three are 0; or the completion
            thresholds are outside [0, 1] or out of order.
    """

    success: float = 1.0
    """Weight of a viewing with completion >= ``success_completion``."""
    partial: float = 0.5
    """Weight of a viewing between the two thresholds."""
    failure: float = 0.0
    """Weight of a viewing with completion < ``failure_completion``."""
    success_completion: float = 0.8
    """Completion at or above which a viewing is a success."""
    failure_completion: float = 0.2
    """Completion below which a viewing is a failure."""

    def __post_init__(self) -> None:
        for name in ("success", "partial", "failure"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} weight must be a finite number >= 0, got {value!r}")
        if self.success == self.partial == self.failure == 0.0:
            raise ValueError("at least one interaction weight must be > 0")
        if not 0.0 <= self.failure_completion <= self.success_completion <= 1.0:
            raise ValueError(
                "need 0 <= failure_completion <= success_completion <= 1, got "
                f"{self.failure_completion!r}, {self.success_completion!r}"
            )

    def of(self, completion: float) -> float:
        """Weight of one viewing.

        Args:
            completion: Fraction watched in [0, 1] (values outside are clamped by comparison).

        Returns:
            ``success``, ``partial`` or ``failure``.
        """
        if completion >= self.success_completion:
            return self.success
        if completion < self.failure_completion:
            return self.failure
        return self.partial


def preference_vector(
    completions: Iterable[tuple[int, float]], weights: InteractionWeights
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """The device's unit-norm preference vector over the items it watched.

    Args:
        completions: ``(item position, completion)`` per viewing, any order; an item viewed
            several times keeps its highest weight.
        weights: Weight of a viewing by completion.

    Returns:
        ``(items, p)``: ``items`` (m,) int64 ascending distinct item positions with a positive
        weight, ``p`` (m,) float32 with ``|p|_2 = 1``; both empty when no viewing has weight.

    Raises:
        ValueError: an item position is negative or a completion is not finite.
    """
    best: dict[int, float] = {}
    for item, completion in completions:
        if item < 0:
            raise ValueError(f"item positions must be >= 0, got {item}")
        if not math.isfinite(completion):
            raise ValueError(f"completion must be finite, got {completion!r}")
        w = weights.of(completion)
        if w > best.get(item, 0.0):
            best[item] = w
    if not best:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    items = np.fromiter(sorted(best), dtype=np.int64, count=len(best))
    p = np.array([best[int(i)] for i in items], dtype=np.float64)
    p /= np.linalg.norm(p)
    return items, p.astype(np.float32)


def quality_weight(success_rate: float, sample_count: int, full_weight_at: float) -> float:
    """The device's weight in quality-weighted federated averaging, clipped to [0, 1].

    ``min(1, success_rate * sample_count / full_weight_at)``: a device with few viewings or few
    successes moves the model less; past ``full_weight_at`` every device counts the same, so no
    single device can buy influence with volume (the per-device clip of DP-FedAvg bounds it
    anyway).

    Args:
        success_rate: Fraction of successful viewings in [0, 1].
        sample_count: Number of viewings, >= 0.
        full_weight_at: ``success_rate * sample_count`` at which the weight reaches 1, > 0.

    Returns:
        The weight in [0, 1].

    Raises:
        ValueError: an argument is out of range or not finite.
    """
    if not (math.isfinite(success_rate) and 0.0 <= success_rate <= 1.0):
        raise ValueError(f"success_rate must be in [0, 1], got {success_rate!r}")
    if sample_count < 0:
        raise ValueError(f"sample_count must be >= 0, got {sample_count}")
    if not (math.isfinite(full_weight_at) and full_weight_at > 0.0):
        raise ValueError(f"full_weight_at must be > 0, got {full_weight_at!r}")
    return min(1.0, success_rate * sample_count / full_weight_at)


def _rows_of(
    item_factors: npt.NDArray[np.float32], items: npt.NDArray[np.int64]
) -> npt.NDArray[np.float32]:
    if item_factors.ndim != 2:
        raise ValueError(f"item_factors must be (n_items, d), got shape {item_factors.shape}")
    if items.size and (int(items.min()) < 0 or int(items.max()) >= item_factors.shape[0]):
        raise ValueError(f"item positions must be in [0, {item_factors.shape[0]})")
    return item_factors[items]


def user_factor(
    item_factors: npt.NDArray[np.float32],
    items: npt.NDArray[np.int64],
    p: npt.NDArray[np.float32],
) -> npt.NDArray[np.float32]:
    """The device's user factor ``x = V_S^T p`` (fold-in; stays on the device).

    Args:
        item_factors: ``V``, (n_items, d) float32; rows of items outside the model are 0.
        items: (m,) int64 positions of the device's items (from `preference_vector`).
        p: (m,) float32 preference weights.

    Returns:
        (d,) float32; zeros when the device has no item the model knows.

    Raises:
        ValueError: shapes disagree or a position is outside ``V``.
    """
    if items.shape != p.shape:
        raise ValueError(f"items {items.shape} and p {p.shape} must have the same shape")
    rows = _rows_of(item_factors, items)
    return (rows.T.astype(np.float64) @ p.astype(np.float64)).astype(np.float32)


def steer_factor(
    factor: npt.NDArray[np.float32], context_factor: npt.NDArray[np.float32], weight: float
) -> npt.NDArray[np.float32]:
    """The user factor steered towards a context: ``x / |x| + weight * x_c / |x_c|``.

    ``x`` is the fold-in of the whole history, ``x_c`` that of the viewings of one context
    bucket (`user_factor` over their preference vector). Both are scaled to unit norm first, so
    ``weight`` is the context's share whatever the lengths of the two histories: 0 ranks by the
    whole history, 1 gives both the same say. Only the direction of the result matters to a
    ranking (``V x`` is compared item against item).

    Args:
        factor: ``x``, (d,) float32, from the whole history.
        context_factor: ``x_c``, (d,) float32, from the context's viewings.
        weight: ``beta`` >= 0, finite.

    Returns:
        (d,) float32: ``factor`` itself (the same array, not a copy) when ``weight`` is 0 or
        either factor is all zeros (no steer: the ranking is exactly the unsteered one), else
        the blend.

    Raises:
        ValueError: the shapes differ or ``weight`` is negative or not finite.
    """
    if factor.shape != context_factor.shape or factor.ndim != 1:
        raise ValueError(
            f"factor {factor.shape} and context_factor {context_factor.shape} must be the same"
            " (d,) shape"
        )
    if not (math.isfinite(weight) and weight >= 0.0):
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    norm = float(np.linalg.norm(factor.astype(np.float64)))
    context_norm = float(np.linalg.norm(context_factor.astype(np.float64)))
    if weight == 0.0 or norm == 0.0 or context_norm == 0.0:
        return factor
    steered = factor.astype(np.float64) / norm + (weight / context_norm) * context_factor.astype(
        np.float64
    )
    return steered.astype(np.float32)


@dataclass(frozen=True)
class ModelUpdate:
    """A device's update to the item factors, in its rank-one form ``rows = p_i * direction``.

    Attributes:
        items: (m,) int64 item positions the update touches, ascending.
        p: (m,) float32 preference weights of those items.
        direction: (d,) float32; the update of row ``items[j]`` is ``p[j] * direction``.
            Its L2 norm times ``|p|`` is the update's Frobenius norm.
    """

    items: npt.NDArray[np.int64]
    p: npt.NDArray[np.float32]
    direction: npt.NDArray[np.float32]

    def dense_rows(self) -> npt.NDArray[np.float32]:
        """The update as (m, d) float32 rows, row ``j`` for item ``items[j]``."""
        return np.outer(self.p, self.direction).astype(np.float32)

    @property
    def norm(self) -> float:
        """Frobenius norm of the update."""
        return float(np.linalg.norm(self.p) * np.linalg.norm(self.direction))


def model_update(
    item_factors: npt.NDArray[np.float32],
    items: npt.NDArray[np.int64],
    p: npt.NDArray[np.float32],
    clipping_norm: float,
    weight: float = 1.0,
) -> ModelUpdate | None:
    """The device's update to the item factors for the next federated round.

    Only the model's active items take part (rows of ``V`` that are not all zero); ``p`` is
    renormalized over them. The update ``weight * clipping_norm * p x^T / |x|`` has Frobenius
    norm exactly ``weight * clipping_norm``.

    Args:
        item_factors: ``V``, (n_items, d) float32, the model version the update is for.
        items: (m,) int64 positions of the device's items.
        p: (m,) float32 preference weights.
        clipping_norm: ``C`` > 0, the per-device L2 bound of DP-FedAvg.
        weight: Quality weight in [0, 1] (`quality_weight`).

    Returns:
        The update, or None when the device has nothing to contribute (no active item, a zero
        user factor, or weight 0).

    Raises:
        ValueError: shapes disagree, a position is outside ``V``, or ``clipping_norm`` /
            ``weight`` are out of range.
    """
    if not (math.isfinite(clipping_norm) and clipping_norm > 0.0):
        raise ValueError(f"clipping_norm must be > 0, got {clipping_norm!r}")
    if not (math.isfinite(weight) and 0.0 <= weight <= 1.0):
        raise ValueError(f"weight must be in [0, 1], got {weight!r}")
    if items.shape != p.shape:
        raise ValueError(f"items {items.shape} and p {p.shape} must have the same shape")
    rows = _rows_of(item_factors, items)
    active = np.any(rows != 0.0, axis=1) & (p > 0.0)
    if weight == 0.0 or not active.any():
        return None
    items, p, rows = items[active], p[active].astype(np.float64), rows[active]
    p /= np.linalg.norm(p)
    x = rows.T.astype(np.float64) @ p
    x_norm = float(np.linalg.norm(x))
    if x_norm == 0.0 or not math.isfinite(x_norm):
        return None
    direction = (weight * clipping_norm / x_norm) * x
    return ModelUpdate(items=items, p=p.astype(np.float32), direction=direction.astype(np.float32))


def update_direction(
    item_factors: npt.NDArray[np.float32],
    items: npt.NDArray[np.int64],
    p: npt.NDArray[np.float32],
    weight: float = 1.0,
) -> npt.NDArray[np.float32] | None:
    """The direction a device sends with its full preference vector (`ItemFactorUpdate`).

    The wire carries ``p`` over *all* the device's items (it also feeds the per-item counts);
    the server keeps the rows of active items, ``p_A ⊗ direction``. This returns
    ``model_update(...).direction / |p_A|`` so that those rows are exactly the `model_update`
    rows, of Frobenius norm ``weight`` (the clipping norm of the protocol is 1).

    Args:
        item_factors: ``V``, (n_items, d) float32.
        items: (m,) int64 positions of the device's items.
        p: (m,) float32 preference weights, unit norm.
        weight: Quality weight in [0, 1].

    Returns:
        (d,) float32, or None when the device has nothing to contribute to the model.

    Raises:
        ValueError: as `model_update`.
    """
    update = model_update(item_factors, items, p, clipping_norm=1.0, weight=weight)
    if update is None:
        return None
    active = np.isin(items, update.items)
    active_norm = float(np.linalg.norm(p[active].astype(np.float64)))
    return (update.direction / active_norm).astype(np.float32)


def score_items(
    item_factors: npt.NDArray[np.float32], factor: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """Predicted preference ``V x`` for every item (0 for items the model does not know).

    Args:
        item_factors: ``V``, (n_items, d) float32.
        factor: (d,) float32 user factor.

    Returns:
        (n_items,) float32 scores.

    Raises:
        ValueError: the dimensions disagree.
    """
    if factor.shape != (item_factors.shape[1],):
        raise ValueError(f"factor must have shape ({item_factors.shape[1]},), got {factor.shape}")
    return item_factors @ factor
