"""The collaborative model's part of a federation round (federated subspace iteration).

Inputs are the devices' latest `ItemFactorUpdate`s exported by every shard; the state carried
between rounds is `ModelState` (the current model version, its active items, the factor count
and the privacy ledger). One round does at most one of:

* **create** (no model yet): release noisy per-item counts (each device's weight vector has L2
  norm <= 1, Gaussian noise ``z`` on every catalog item), keep the ``active_items`` items with
  the highest noisy counts, publish a random orthonormal start over them (public, no data); the
  noisy counts are also returned (`ModelRoundResult.item_counts`): the worker's trending list;
* **step** (a model exists): sum the updates computed against the current version over the
  active items (each clipped to Frobenius norm 1), add Gaussian noise ``z``, orthonormalize,
  publish the new factors.

Each release is one Gaussian with noise multiplier ``z`` and sensitivity 1, charged to the
`PrivacyLedger` before anything is published (the round is checkpointed with the ledger, so
a crashed round re-publishes the same result and is charged once). A release that would pass
the budget is not made. See ``omega_federation.item_factors`` for the math and its sources.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from omega.v1 import patterns_pb2
from omega_federation.accounting import PrivacyLedger, RoundMechanism
from omega_federation.item_factors import (
    UpdateAccumulator,
    initial_item_factors,
    orthonormalize,
    top_items,
)
from omega_protocol import encode_embeddings
from omega_protocol.model_update import ItemFactorContribution

__all__ = ["ModelRoundResult", "ModelSettings", "ModelState", "model_round"]


@dataclass(frozen=True)
class ModelSettings:
    """Knobs of the collaborative model (see `FederationSettings` for their documentation)."""

    factors: int
    active_items: int
    noise_multiplier: float
    delta: float
    epsilon_budget: float
    min_devices: int = 1


@dataclass
class ModelState:
    """What the worker remembers of the model between rounds (checkpointed as JSON).

    Attributes:
        version: The current model version (the round that published it); 0 before the first.
        factors: Factor count ``d`` of the current model.
        active: Content ids of the model's rows, in row order.
        ledger: Privacy spent by the model's releases so far.
    """

    version: int = 0
    factors: int = 0
    active: list[str] = field(default_factory=list)
    ledger: PrivacyLedger | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe state."""
        return {
            "version": self.version,
            "factors": self.factors,
            "active": list(self.active),
            "ledger": None if self.ledger is None else self.ledger.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ModelState:
        """Inverse of `to_dict`; an empty or missing dict is the state before any model.

        Raises:
            ValueError: malformed data.
        """
        if not data:
            return cls()
        ledger = data.get("ledger")
        return cls(
            version=int(data["version"]),
            factors=int(data["factors"]),
            active=[str(c) for c in data["active"]],
            ledger=None if ledger is None else PrivacyLedger.from_dict(ledger),
        )


@dataclass
class ModelRoundResult:
    """What `model_round` did."""

    state: ModelState
    rows: list[patterns_pb2.ItemFactorRow]
    action: str  # "created", "stepped", "skipped_budget", "skipped_no_updates", "disabled"
    devices: int = 0
    clipped: int = 0
    epsilon_round: float = 0.0
    item_counts: dict[str, float] = field(default_factory=dict)
    """The count release's noisy per-item counts (catalog id -> count, only ids whose noisy
    count is > 0), when this round made one (``action == "created"``); empty otherwise. A
    post-processing of a release already charged, so publishing them (as trending) is free."""

    def figures(self) -> dict[str, Any]:
        """Figures for the round record and logs."""
        ledger = self.state.ledger
        return {
            "model_action": self.action,
            "model_version": self.state.version,
            "model_factors": self.state.factors,
            "model_active_items": len(self.state.active),
            "model_devices": self.devices,
            "model_clipped": self.clipped,
            "model_epsilon_round": self.epsilon_round,
            "model_cumulative_epsilon": 0.0 if ledger is None else ledger.epsilon,
            "model_delta": None if ledger is None else ledger.delta,
        }


def _rows(
    round_id: int, active: Sequence[str], factors: npt.NDArray[np.float32]
) -> list[patterns_pb2.ItemFactorRow]:
    embeddings = encode_embeddings(factors)
    return [
        patterns_pb2.ItemFactorRow(content_id=c, factor=e, model_version=round_id)
        for c, e in zip(active, embeddings, strict=True)
    ]


def model_round(
    round_id: int,
    state: ModelState,
    updates: Sequence[ItemFactorContribution],
    catalog_ids: Sequence[str],
    settings: ModelSettings,
    rng: np.random.Generator,
) -> ModelRoundResult:
    """Run the model's part of round ``round_id``.

    Args:
        round_id: This round; becomes the model version when the model changes.
        state: The state after the previous round (not modified).
        updates: Every device's latest contribution (one per device), any model version.
        catalog_ids: The public catalog, in a fixed order (rows of the count release); only
            read when ``state.version == 0``.
        settings: Factors, active items, noise multiplier, delta and budget.
        rng: Noise source.

    Returns:
        The new state, the rows to publish (empty when the model did not change) and figures.

    Raises:
        ValueError: settings out of range.
    """
    if settings.factors < 1 or settings.active_items < settings.factors:
        raise ValueError("need 1 <= factors <= active_items")
    if not (math.isfinite(settings.noise_multiplier) and settings.noise_multiplier >= 0.0):
        raise ValueError(f"noise_multiplier must be >= 0, got {settings.noise_multiplier!r}")
    z = settings.noise_multiplier
    ledger = state.ledger or PrivacyLedger(settings.delta, settings.epsilon_budget)
    new = ModelState(state.version, state.factors, list(state.active), ledger)

    if state.version == 0:
        contributors = [u for u in updates if u.weights.size]
        if len(contributors) < settings.min_devices or len(catalog_ids) < settings.factors:
            return ModelRoundResult(new, [], "skipped_no_updates", devices=len(contributors))
        position = {c: i for i, c in enumerate(catalog_ids)}
        counts = UpdateAccumulator(
            np.arange(len(catalog_ids), dtype=np.int64), len(catalog_ids), 1, clipping_norm=1.0
        )
        used = _add_all(counts, contributors, position, np.ones(1, dtype=np.float32))
        charged = _charge(ledger, z, round_id)
        if charged is None:
            return ModelRoundResult(new, [], "skipped_budget", devices=used)
        noisy = counts.noisy_sum(z, rng if z > 0 else None)[:, 0]
        active = top_items(noisy, settings.active_items)
        start = initial_item_factors(len(catalog_ids), active, settings.factors, seed=round_id)
        new.version, new.factors = round_id, settings.factors
        new.active = [catalog_ids[i] for i in active]
        positive = np.flatnonzero(noisy > 0.0).tolist()
        return ModelRoundResult(
            new,
            _rows(round_id, new.active, start[active]),
            "created",
            devices=used,
            clipped=counts.clipped,
            epsilon_round=charged,
            item_counts={catalog_ids[i]: float(noisy[i]) for i in positive},
        )

    current = [
        u
        for u in updates
        if u.model_version == state.version
        and u.direction is not None
        and u.direction.shape == (state.factors,)
    ]
    if len(current) < settings.min_devices:
        return ModelRoundResult(new, [], "skipped_no_updates", devices=len(current))
    position = {c: i for i, c in enumerate(state.active)}
    n = len(state.active)
    acc = UpdateAccumulator(np.arange(n, dtype=np.int64), n, state.factors, clipping_norm=1.0)
    used = _add_all(acc, current, position, None)
    charged = _charge(ledger, z, round_id)
    if charged is None:
        return ModelRoundResult(new, [], "skipped_budget", devices=used)
    factors = orthonormalize(acc.noisy_sum(z, rng if z > 0 else None))
    new.version = round_id
    return ModelRoundResult(
        new,
        _rows(round_id, new.active, factors),
        "stepped",
        devices=used,
        clipped=acc.clipped,
        epsilon_round=charged,
    )


def _add_all(
    acc: UpdateAccumulator,
    updates: Sequence[ItemFactorContribution],
    position: dict[str, int],
    direction: npt.NDArray[np.float32] | None,
) -> int:
    """Add every update (rows of unknown content ids dropped); returns how many were added."""
    used = 0
    for u in updates:
        known = [
            (position[c], w) for c, w in zip(u.content_ids, u.weights, strict=True) if c in position
        ]
        if not known:
            continue
        items = np.fromiter((i for i, _ in known), dtype=np.int64, count=len(known))
        weights = np.fromiter((w for _, w in known), dtype=np.float32, count=len(known))
        vector = direction if direction is not None else u.direction
        assert vector is not None
        acc.add(items, weights, vector)
        used += 1
    return used


def _charge(ledger: PrivacyLedger, z: float, round_id: int) -> float | None:
    """Charge one Gaussian release of multiplier ``z``; None when it would pass the budget.

    ``z == 0`` releases exact sums: nothing is charged and the ledger is not involved (the
    report then says the run had no differential privacy).
    """
    if z == 0.0:
        return 0.0
    mechanism = RoundMechanism((z,))
    before = ledger.epsilon
    if ledger.preview(mechanism) > ledger.epsilon_budget:
        return None
    return ledger.spend(mechanism, round_id) - before
