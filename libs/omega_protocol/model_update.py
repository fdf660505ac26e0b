"""Encoding and validation of `omega.v1.ItemFactorUpdate`, a device's share of one FL round.

One message carries two things the federation worker sums (``omega_federation.item_factors``):

* the device's preference weights over the catalog items it watched (a vector of L2 norm <= 1,
  summed into the round's noisy per-item counts), and
* once the device has a model, the direction of its rank-one update to the item factors: the
  update of the factor row of ``content_ids[j]`` is ``weights[j] * direction``.

Weights travel as an INT8 `Embedding` (one value per id), the direction as an INT8 `Embedding`
of the model's factor count. Both the brain (encoder) and the services (decoder) use this
module, so the rules live in one place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from omega.v1 import patterns_pb2
from omega_protocol.quantization import EmbeddingError, decode_embedding, encode_embedding

__all__ = [
    "MAX_MODEL_FACTORS",
    "MAX_UPDATE_ITEMS",
    "ItemFactorContribution",
    "ModelUpdateError",
    "decode_item_factor_update",
    "encode_item_factor_update",
]

MAX_MODEL_FACTORS: Final[int] = 256
"""Largest factor count a model may have."""
MAX_UPDATE_ITEMS: Final[int] = 4096
"""Most content ids one update may carry (a device sends its highest weights first)."""
MAX_CONTENT_ID_CHARS: Final[int] = 256
"""Longest content id accepted."""
_WEIGHT_NORM_SLACK: Final[float] = 1.02
"""int8 rounding lets a unit vector come back slightly longer; more than this is refused."""
_MAX_DIRECTION_NORM: Final[float] = 1e6
"""A direction longer than this cannot come from a real device (its update is clipped to 1)."""


class ModelUpdateError(ValueError):
    """A malformed `ItemFactorUpdate`: the message says which field and why."""


@dataclass(frozen=True)
class ItemFactorContribution:
    """A decoded, validated `ItemFactorUpdate`.

    Attributes:
        model_version: The model version ``direction`` was computed against (0: no model).
        content_ids: (m,) distinct content ids.
        weights: (m,) float32, >= 0, L2 norm <= 1 (up to int8 rounding).
        direction: (d,) float32, or None before the device's first model.
    """

    model_version: int
    content_ids: tuple[str, ...]
    weights: npt.NDArray[np.float32]
    direction: npt.NDArray[np.float32] | None


def encode_item_factor_update(
    model_version: int,
    content_ids: Sequence[str],
    weights: npt.ArrayLike,
    direction: npt.ArrayLike | None,
) -> patterns_pb2.ItemFactorUpdate:
    """Build the wire message (int8 weights and direction).

    Args:
        model_version: Version ``direction`` was computed against; 0 with no direction.
        content_ids: (m,) distinct content ids, 1 <= m <= `MAX_UPDATE_ITEMS`.
        weights: (m,) finite weights >= 0 with L2 norm <= 1.
        direction: (d,) finite, or None.

    Returns:
        The message.

    Raises:
        ModelUpdateError: the arguments break the rules above.
    """
    w = np.asarray(weights, dtype=np.float32)
    message = patterns_pb2.ItemFactorUpdate(model_version=model_version)
    message.content_ids.extend(content_ids)
    try:
        message.weights.CopyFrom(encode_embedding(w))
        if direction is not None:
            message.direction.CopyFrom(encode_embedding(np.asarray(direction, dtype=np.float32)))
    except EmbeddingError as exc:
        raise ModelUpdateError(f"model_update: {exc}") from exc
    decode_item_factor_update(message)  # the encoder obeys the decoder's rules
    return message


def decode_item_factor_update(
    message: patterns_pb2.ItemFactorUpdate,
    expected_factors: int | None = None,
    max_items: int = MAX_UPDATE_ITEMS,
) -> ItemFactorContribution:
    """Validate and decode a device's `ItemFactorUpdate`.

    Args:
        message: The wire message.
        expected_factors: When set, a direction must have exactly this many factors.
        max_items: Most content ids accepted.

    Returns:
        The decoded contribution.

    Raises:
        ModelUpdateError: no or too many ids, an empty, repeated or too long id, weights of
            the wrong dimension or negative, non-finite or with norm > 1, a direction with the
            wrong dimension, non-finite or absurdly long, or a direction without a model
            version.
    """
    ids = tuple(message.content_ids)
    if not 1 <= len(ids) <= max_items:
        raise ModelUpdateError(f"model_update: needs 1 to {max_items} content ids, got {len(ids)}")
    if len(set(ids)) != len(ids):
        raise ModelUpdateError("model_update: repeated content id")
    for cid in ids:
        if not cid or len(cid) > MAX_CONTENT_ID_CHARS or "\x00" in cid:
            raise ModelUpdateError(f"model_update: invalid content id {cid[:40]!r}")
    try:
        weights = decode_embedding(message.weights, expected_dim=len(ids))
    except EmbeddingError as exc:
        raise ModelUpdateError(f"model_update.weights: {exc}") from exc
    if weights.min() < 0.0:
        raise ModelUpdateError("model_update.weights: negative weight")
    if float(np.linalg.norm(weights.astype(np.float64))) > _WEIGHT_NORM_SLACK:
        raise ModelUpdateError("model_update.weights: L2 norm above 1")
    direction: npt.NDArray[np.float32] | None = None
    if message.HasField("direction"):
        if message.model_version == 0:
            raise ModelUpdateError("model_update: a direction needs a model_version")
        dim = message.direction.dim
        if expected_factors is not None and dim != expected_factors:
            raise ModelUpdateError(
                f"model_update.direction: {dim} factors, the model has {expected_factors}"
            )
        if not 1 <= dim <= MAX_MODEL_FACTORS:
            raise ModelUpdateError(f"model_update.direction: {dim} factors is out of range")
        try:
            direction = decode_embedding(message.direction, expected_dim=dim)
        except EmbeddingError as exc:
            raise ModelUpdateError(f"model_update.direction: {exc}") from exc
        norm = float(np.linalg.norm(direction.astype(np.float64)))
        if not (math.isfinite(norm) and norm <= _MAX_DIRECTION_NORM):
            raise ModelUpdateError("model_update.direction: norm out of range")
    return ItemFactorContribution(
        model_version=int(message.model_version),
        content_ids=ids,
        weights=weights,
        direction=direction,
    )
