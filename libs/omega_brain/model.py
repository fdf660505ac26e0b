"""The collaborative model on the device: item factors laid over the catalog, the device's
preferences, and its contribution to the next federated round.

The math is `omega_brain.collaborative`; this module joins it to the brain's catalog and
viewing history (the `Brain` wires it to the store, the transport and ranking):

* `align_model`: the stored item-factor rows as an ``(n_catalog, d)`` matrix aligned with the
  catalog positions, zero rows for items the model does not know (so `user_factor`,
  `update_direction` and `score_items` work on catalog positions directly, and scoring the
  whole catalog is one matrix-vector product);
* `device_preferences`: the device's unit-norm preference vector over catalog positions from
  all its viewings (or one context bucket's), and the success rate and sample count of its
  quality weight;
* `build_model_update`: the `ItemFactorUpdate` the device sends once per model version.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from omega.v1 import patterns_pb2
from omega_brain.catalog import CatalogIndex
from omega_brain.collaborative import (
    InteractionWeights,
    preference_vector,
    quality_weight,
    update_direction,
)
from omega_brain.store import StoredModel
from omega_protocol.model_update import MAX_UPDATE_ITEMS, encode_item_factor_update

__all__ = [
    "QUALITY_FULL_WEIGHT_AT",
    "AlignedModel",
    "Preferences",
    "align_model",
    "build_model_update",
    "device_preferences",
]

QUALITY_FULL_WEIGHT_AT = 1.0
"""``success_rate x samples`` at which a device's quality weight reaches 1 (`quality_weight`):
every device with one successful viewing counts fully, as in ``bench/collaborative_quality.py``
(the saturation has not been searched yet, see the README)."""


@dataclass(frozen=True, slots=True)
class AlignedModel:
    """The item-factor model over one catalog.

    Attributes:
        version: the model version.
        factors: ``d``, factors per item.
        matrix: (n_catalog, d) float32; row i is the factor of catalog position i, zeros
            where the model does not know the item.
        known: (n_catalog,) bool, True where the row is not all zeros.
    """

    version: int
    factors: int
    matrix: npt.NDArray[np.float32]
    known: npt.NDArray[np.bool_]

    @property
    def known_count(self) -> int:
        """Catalog items the model knows."""
        return int(self.known.sum())


def align_model(model: StoredModel, catalog: CatalogIndex) -> AlignedModel | None:
    """Lay the stored rows over the catalog (rows of ids the catalog lacks are left out).

    Args:
        model: the persisted model.
        catalog: the catalog in use.

    Returns:
        The aligned model, or None when there is no model (version 0 or no factors).
    """
    if model.version <= 0 or model.factors <= 0:
        return None
    matrix = np.zeros((len(catalog), model.factors), dtype=np.float32)
    pairs = [
        (catalog.position_of(cid), i) for i, cid in enumerate(model.content_ids) if cid in catalog
    ]
    if pairs:
        positions = np.fromiter((p for p, _ in pairs), dtype=np.int64, count=len(pairs))
        rows = np.fromiter((i for _, i in pairs), dtype=np.int64, count=len(pairs))
        matrix[positions] = model.rows[rows]
    return AlignedModel(model.version, model.factors, matrix, np.any(matrix != 0.0, axis=1))


@dataclass(frozen=True, slots=True)
class Preferences:
    """The device's preferences over the catalog, from viewings of catalog items (all of the
    device's, or those of one context bucket for the context steer of `Brain.recommend`).

    Attributes:
        items: (m,) int64 ascending catalog positions with a positive weight.
        p: (m,) float32 weights, unit L2 norm (empty when no viewing has weight).
        success_rate: fraction of those viewings that were successes.
        samples: number of those viewings.
    """

    items: npt.NDArray[np.int64]
    p: npt.NDArray[np.float32]
    success_rate: float
    samples: int


def device_preferences(
    viewings: Sequence[tuple[str, float]], catalog: CatalogIndex, weights: InteractionWeights
) -> Preferences:
    """The preference vector of `preference_vector` over catalog positions.

    Args:
        viewings: ``(content_id, completion)`` of every viewing; ids not in the catalog are
            skipped.
        weights: weight of a viewing by completion (its ``success_completion`` also decides
            what counts as a success for the success rate).

    Returns:
        The preferences.
    """
    pairs = [(catalog.position_of(cid), c) for cid, c in viewings if cid in catalog]
    items, p = preference_vector(pairs, weights)
    successes = sum(1 for _, c in pairs if c >= weights.success_completion)
    return Preferences(items, p, successes / len(pairs) if pairs else 0.0, len(pairs))


def build_model_update(
    prefs: Preferences,
    catalog: CatalogIndex,
    model: AlignedModel | None,
    model_version: int,
    *,
    max_items: int = MAX_UPDATE_ITEMS,
) -> patterns_pb2.ItemFactorUpdate | None:
    """The device's `ItemFactorUpdate` for ``model_version``.

    The weights are the preference vector cut to the ``max_items`` highest weights (ties: the
    lowest catalog positions) and renormalized to unit norm; with a model, the direction is
    `update_direction` of those weights, scaled by the device's quality weight
    ``quality_weight(success_rate, samples, QUALITY_FULL_WEIGHT_AT)``. Without a model (or
    when the device has nothing to contribute to it: no item the model knows, or a quality
    weight of 0) the message carries the weights alone, which still count in the fleet's
    per-item counts.

    Args:
        prefs: the device's preferences (`device_preferences`).
        catalog: the catalog ``prefs`` refers to (positions -> content ids).
        model: the aligned model, or None.
        model_version: the device's model version (0: none).
        max_items: most content ids sent.

    Returns:
        The message, or None when no viewing has a positive weight.
    """
    if prefs.items.size == 0:
        return None
    items, p = prefs.items, prefs.p.astype(np.float64)
    if items.size > max_items:
        keep = np.sort(np.argsort(-p, kind="stable")[:max_items])
        items, p = items[keep], p[keep]
        p /= np.linalg.norm(p)
    weights = p.astype(np.float32)
    direction = None
    if model is not None:
        w = quality_weight(prefs.success_rate, prefs.samples, QUALITY_FULL_WEIGHT_AT)
        direction = update_direction(model.matrix, items, weights, weight=w)
    ids = [catalog.content_id_at(int(i)) for i in items]
    return encode_item_factor_update(model_version, ids, weights, direction)
