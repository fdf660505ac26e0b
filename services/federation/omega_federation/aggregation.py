"""Federated averaging of exported device patterns, with clipping, k-anonymity and DP noise.

One round (ARCHITECTURE.md section 4): every exported pattern is keyed by
``(context bucket, nearest codebook centroid)``; within a group each device counts once; groups
backed by fewer than ``min_sources`` devices are dropped; the others publish the weighted mean
direction of their embeddings (FedAvg, McMahan et al. 2017, "Communication-Efficient Learning of
Deep Networks from Decentralized Data", Alg. 1: a mean weighted by each client's data size, here
``success_rate x sample_count``), their mean clipped weight (quality), weighted success rate and
device count, optionally with differential privacy (Dwork & Roth 2014, "The Algorithmic Foundations
of Differential Privacy"; calibration and accounting in ``omega_federation.privacy``).

Everything is columnar numpy: per batch, one faiss assignment pass, a few sorts of integers and
one pass over the embeddings group by group with BLAS. Rounds stream: `GroupAccumulator` takes
batches of whole devices and keeps only per-group sums (``groups x dim`` float64), and
`release_round` adds the noise and publishes, so a round's memory does not grow with its number
of patterns; `federated_average` is the same over one batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from omega_federation.codebook import Codebook
from omega_federation.privacy import (
    PrivacyAccountant,
    PrivacyParams,
    RoundPrivacy,
    calibrate,
    normal_upper_quantile,
)

EMBEDDING_DIM: Final[int] = 384
"""Embedding size on the wire (all-MiniLM-L6-v2); other sizes are accepted for tests."""

UNIT_NORM_TOLERANCE: Final[float] = 0.01
"""Rows whose L2 norm is off by more than this are rejected; accepted rows are re-normalized
exactly before use (this absorbs float16/int8 wire quantization, about 1e-3)."""

_CHUNK_ROWS: Final[int] = 8192
_MAX_BUCKET: Final[int] = 2**31 - 1
_MAX_SAMPLE_COUNT: Final[int] = 2**53  # exact in float64
_RELEASED_BLOCKS: Final[int] = 3  # weight sum, weighted success sum, scaled count


def _readonly(arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
    view = arr.view()
    view.setflags(write=False)
    return view


def _vector(value: Any, name: str, n: int | None) -> npt.NDArray[Any]:
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} rows, expected {n}")
    return arr


@dataclass(frozen=True, eq=False)
class Contributions:
    """Columnar batch of exported device patterns, one row per pattern.

    Construction validates and normalizes dtypes (no copy when they already match); the stored
    arrays are read-only views.

    Attributes:
        device_keys: ``(n,)`` opaque device ids: int64 (any integer dtype), str/bytes or object
            (hashable values). Rows with equal keys belong to the same device.
        buckets: ``(n,)`` int32 context bucket ids in ``[0, 2**31)`` (opaque here).
        embeddings: ``(n, dim)`` float32, L2-normalized (within ``UNIT_NORM_TOLERANCE``), finite;
            ``dim`` is ``EMBEDDING_DIM`` (384) on the wire.
        success_rates: ``(n,)`` float32 in ``[0, 1]``.
        sample_counts: ``(n,)`` int64, ``>= 1``.

    Raises:
        ValueError: On mismatched lengths, wrong shapes or dtypes, NaN/inf, out-of-range values or
            embeddings that are not unit vectors.
    """

    device_keys: npt.NDArray[Any]
    buckets: npt.NDArray[np.int32]
    embeddings: npt.NDArray[np.float32]
    success_rates: npt.NDArray[np.float32]
    sample_counts: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        keys = _vector(self.device_keys, "device_keys", None)
        if keys.dtype.kind not in "iuUSO":
            raise ValueError(f"device_keys must be integers, strings or objects, not {keys.dtype}")
        n = int(keys.shape[0])

        buckets = _vector(self.buckets, "buckets", n)
        if buckets.dtype.kind not in "iu":
            raise ValueError(f"buckets must be integers, got dtype {buckets.dtype}")
        if n and (int(buckets.min()) < 0 or int(buckets.max()) > _MAX_BUCKET):
            raise ValueError("buckets must be in [0, 2**31)")

        emb = np.asarray(self.embeddings)
        if emb.ndim != 2 or emb.shape[0] != n or emb.shape[1] < 1:
            raise ValueError(f"embeddings must have shape ({n}, dim), got {emb.shape}")
        if emb.dtype.kind != "f":
            raise ValueError(f"embeddings must be floating point, got dtype {emb.dtype}")
        emb = np.asarray(emb, dtype=np.float32)
        for start in range(0, n, 4 * _CHUNK_ROWS):
            block = emb[start : start + 4 * _CHUNK_ROWS]
            sq = np.einsum("ij,ij->i", block, block)
            if not np.isfinite(sq).all():
                raise ValueError("embeddings contain NaN or infinite values")
            bad = np.abs(np.sqrt(sq) - 1.0) > UNIT_NORM_TOLERANCE
            if bad.any():
                row = start + int(np.argmax(bad))
                raise ValueError(f"embedding row {row} is not L2-normalized")

        rates = _vector(self.success_rates, "success_rates", n)
        if rates.dtype.kind not in "fiu":
            raise ValueError(f"success_rates must be numeric, got dtype {rates.dtype}")
        rates = np.asarray(rates, dtype=np.float32)
        if n and not (np.isfinite(rates).all() and rates.min() >= 0.0 and rates.max() <= 1.0):
            raise ValueError("success_rates must be finite and in [0, 1]")

        counts = _vector(self.sample_counts, "sample_counts", n)
        if counts.dtype.kind not in "iu":
            raise ValueError(f"sample_counts must be integers, got dtype {counts.dtype}")
        if n and (int(counts.min()) < 1 or int(counts.max()) > _MAX_SAMPLE_COUNT):
            raise ValueError("sample_counts must be in [1, 2**53]")

        object.__setattr__(self, "device_keys", _readonly(keys))
        object.__setattr__(self, "buckets", _readonly(buckets.astype(np.int32, copy=False)))
        object.__setattr__(self, "embeddings", _readonly(emb))
        object.__setattr__(self, "success_rates", _readonly(rates))
        object.__setattr__(self, "sample_counts", _readonly(counts.astype(np.int64, copy=False)))

    def __len__(self) -> int:
        return int(self.buckets.shape[0])

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.embeddings.shape[1])

    @classmethod
    def empty(cls, dim: int = EMBEDDING_DIM) -> Contributions:
        """A batch with no rows.

        Args:
            dim: Embedding dimension, ``>= 1``.

        Returns:
            An empty batch (int64 device keys).
        """
        return cls(
            device_keys=np.empty(0, dtype=np.int64),
            buckets=np.empty(0, dtype=np.int32),
            embeddings=np.empty((0, dim), dtype=np.float32),
            success_rates=np.empty(0, dtype=np.float32),
            sample_counts=np.empty(0, dtype=np.int64),
        )

    @classmethod
    def concat(cls, batches: Iterable[Contributions]) -> Contributions:
        """Concatenate batches (for example one per shard) into one.

        Device keys keep their dtype when all batches share it; otherwise they become ``object``
        so that, say, the int ``1`` and the string ``"1"`` stay different devices.

        Args:
            batches: One or more batches with the same embedding dimension.

        Returns:
            A new batch with all rows, in order (the arrays are copied once).

        Raises:
            ValueError: If there are no batches or their dimensions differ.
        """
        items = list(batches)
        if not items:
            raise ValueError("concat needs at least one batch")
        dims = {b.dim for b in items}
        if len(dims) != 1:
            raise ValueError(f"batches have different embedding dimensions: {sorted(dims)}")
        key_dtypes = {b.device_keys.dtype for b in items}
        if len(key_dtypes) == 1:
            keys = np.concatenate([b.device_keys for b in items])
        else:
            keys = np.concatenate([b.device_keys.astype(object) for b in items])
        return cls(
            device_keys=keys,
            buckets=np.concatenate([b.buckets for b in items]),
            embeddings=np.concatenate([b.embeddings for b in items]),
            success_rates=np.concatenate([b.success_rates for b in items]),
            sample_counts=np.concatenate([b.sample_counts for b in items]),
        )


@dataclass(frozen=True, eq=False)
class AggregatedPattern:
    """One published global pattern.

    Attributes:
        pattern_key: ``f"{bucket}:{centroid}"``.
        bucket: Context bucket id.
        centroid: Codebook centroid index.
        embedding: ``(dim,)`` float32, L2-normalized, read-only.
        quality: Mean clipped weight ``sum(w) / n`` (noisy under DP, then clipped to
            ``[0, clipping_norm]``), ``>= 0``; units of success_rate x sample_count.
        success_rate: Weighted mean success rate ``sum(w s) / sum(w)``, clipped to ``[0, 1]``.
        source_count: Distinct devices behind the pattern (rounded noisy count under DP),
            ``>= min_sources``.
    """

    pattern_key: str
    bucket: int
    centroid: int
    embedding: npt.NDArray[np.float32]
    quality: float
    success_rate: float
    source_count: int


@dataclass(frozen=True)
class AggregationResult:
    """Outcome of one ``federated_average`` call.

    Attributes:
        patterns: Published patterns sorted by ``pattern_key`` (string order).
        privacy: Privacy spent by this round and cumulatively, or None without DP.
        groups_total: Groups with at least one contribution (after the per-device group cap).
        groups_kept: Groups published, ``len(patterns)``.
        contributions_used: Input rows that went into published patterns.

    ``groups_total`` and ``contributions_used`` are exact operator metrics, not covered by the
    DP guarantee: log them, never publish them to devices.
    """

    patterns: list[AggregatedPattern]
    privacy: RoundPrivacy | None
    groups_total: int
    groups_kept: int
    contributions_used: int


def l2_sensitivity(clipping_norm: float, max_patterns_per_device: int) -> float:
    """L2 sensitivity of one round's released sums when one device is added or removed.

    Per group a device adds ``(v, w, w s, C)`` to the released
    ``(sum w e, sum w, sum w s, C x count)``, with ``||v||_2 <= w <= C`` (unit embeddings, clipped
    weight), ``0 <= w s <= w`` and the count scaled by ``C`` so all four blocks have the same
    sensitivity; that is at most ``2 C`` in L2 per group, and a device touches at most ``m``
    groups, so ``2 C sqrt(m)``.

    Args:
        clipping_norm: ``C``, largest weight of one device in one group.
        max_patterns_per_device: ``m``, largest number of groups one device contributes to.

    Returns:
        ``2 * C * sqrt(m)``.
    """
    return 2.0 * clipping_norm * math.sqrt(max_patterns_per_device)


def l1_sensitivity(clipping_norm: float, max_patterns_per_device: int, dim: int) -> float:
    """L1 sensitivity of the same release (``||v||_1 <= sqrt(dim) ||v||_2``).

    Args:
        clipping_norm: ``C``.
        max_patterns_per_device: ``m``.
        dim: Embedding dimension.

    Returns:
        ``m * C * (sqrt(dim) + 3)``.
    """
    return max_patterns_per_device * clipping_norm * (math.sqrt(dim) + _RELEASED_BLOCKS)


def selection_margin(params: PrivacyParams, dim: int) -> float:
    """Extra devices the noisy count must show, above ``min_sources``, for a group to be published.

    Chosen so that a group sitting exactly at ``min_sources`` true devices (one that the k-anonymity
    gate would drop without the added device) is published with probability at most
    ``selection_delta / m`` per group, i.e. at most ``selection_delta`` for the ``m`` groups of one
    device (see ``federated_average``).

    Args:
        params: The round's privacy settings.
        dim: Embedding dimension (Laplace sensitivity depends on it).

    Returns:
        The margin in devices, ``>= 0``; 0 when noise is disabled, ``inf`` when the budget leaves
        nothing for selection (Laplace with ``delta == 0``).
    """
    cal = calibrate(params)
    if cal.noise_multiplier == 0.0:
        return 0.0
    m = params.max_patterns_per_device
    tail = cal.selection_delta / m
    if tail <= 0.0:
        return math.inf
    if cal.mechanism == "gaussian":
        count_sigma = cal.noise_multiplier * l2_sensitivity(1.0, m)
        return max(0.0, count_sigma * normal_upper_quantile(min(tail, 0.5)))
    count_scale = cal.noise_multiplier * l1_sensitivity(1.0, m, dim)
    return max(0.0, count_scale * math.log(0.5 / tail)) if tail < 0.5 else 0.0


def _factorize(keys: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    """Dense int64 codes for device keys (equal keys, equal codes)."""
    if keys.dtype.kind != "O":
        _, inverse = np.unique(keys, return_inverse=True)
        return inverse.reshape(-1).astype(np.int64, copy=False)
    table: dict[object, int] = {}
    try:
        return np.fromiter(
            (table.setdefault(key, len(table)) for key in keys.tolist()),
            dtype=np.int64,
            count=keys.shape[0],
        )
    except TypeError as exc:
        raise ValueError(f"device_keys must be hashable: {exc}") from exc


def _float_bincount(
    index: npt.NDArray[np.int64], weights: npt.NDArray[np.float64], length: int
) -> npt.NDArray[np.float64]:
    """``out[j] = sum(weights[index == j])`` for ``j < length``, float64."""
    return np.bincount(index, weights=weights, minlength=length).astype(np.float64, copy=False)


@dataclass(frozen=True)
class _GroupSums:
    """Exact per-group sums for groups that pass the k-anonymity gate (before noise)."""

    keys: npt.NDArray[np.int64]  # (g,) bucket * k + centroid, ascending
    counts: npt.NDArray[np.int64]  # (g,) distinct devices
    weight_sums: npt.NDArray[np.float64]  # (g,) sum of clipped weights
    success_sums: npt.NDArray[np.float64]  # (g,) sum of clipped weight x success rate
    vector_sums: npt.NDArray[np.float64]  # (g, dim) sum of clipped weight x unit embedding
    rows_used: npt.NDArray[np.int64]  # (g,) input rows behind each group's sums
    groups_total: int


def _weighted_vector_sums(
    embeddings: npt.NDArray[np.float32],
    row_group: npt.NDArray[np.int64],
    row_coef: npt.NDArray[np.float64],
    n_groups: int,
) -> npt.NDArray[np.float64]:
    """``out[g] = sum over rows r with row_group[r] == g of row_coef[r] * e_r / ||e_r||``.

    Rows are sorted by group once; each group is then one float64 matrix-vector product (BLAS)
    over its gathered rows, in slices of at most ``_CHUNK_ROWS`` rows so the gathered block stays
    below ``_CHUNK_ROWS x dim x 8`` bytes. Much faster than ``np.add.reduceat`` over rows.
    """
    out = np.zeros((n_groups, embeddings.shape[1]), dtype=np.float64)
    used = np.flatnonzero(row_group >= 0)
    if used.size == 0:
        return out
    rows = used[np.argsort(row_group[used], kind="stable")]  # ascending rows within a group
    groups = row_group[rows]
    bounds = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1], True])
    for begin, end in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        acc = out[groups[begin]]
        for lo in range(begin, end, _CHUNK_ROWS):
            part = rows[lo : min(end, lo + _CHUNK_ROWS)]
            block = embeddings[part].astype(np.float64)
            norms = np.sqrt(np.einsum("ij,ij->i", block, block))
            acc += (row_coef[part] / norms) @ block
    return out


class GroupAccumulator:
    """Running per-group sums of one round, fed batch by batch (streaming aggregation).

    Steps 1 and 2 of `federated_average` (keying, per-device merge, clipping and the per-device
    group cap) need every row of a device at once; so each `add` must hold *whole devices*:
    a device's rows all in one call (the shards export their rows in device order, see
    ``omega_federation.worker``). Only the per-group sums are kept between calls, so memory
    is ``O(groups x dim)`` whatever the number of rows, and the sums of a stream equal those
    of the same rows in one batch (up to the order of float additions).

    Attributes:
        rows: Input rows added so far.
    """

    def __init__(
        self,
        codebook: Codebook,
        *,
        clipping_norm: float | None,
        max_groups: int | None,
    ) -> None:
        """Args:
        codebook: Keys rows by ``(bucket, nearest centroid)``.
        clipping_norm: Largest weight of one device in one group (None: no clipping).
        max_groups: Groups one device contributes to at most, its heaviest (None: all).
        """
        self._codebook = codebook
        self._clip = clipping_norm
        self._max_groups = max_groups
        self._index: dict[int, int] = {}
        self._capacity = 0
        self._counts = np.zeros(0, dtype=np.int64)
        self._weights = np.zeros(0, dtype=np.float64)
        self._success = np.zeros(0, dtype=np.float64)
        self._rows_used = np.zeros(0, dtype=np.int64)
        self._vectors = np.zeros((0, codebook.dim), dtype=np.float64)
        self.rows = 0

    @property
    def codebook(self) -> Codebook:
        """The codebook rows are keyed with."""
        return self._codebook

    @property
    def dim(self) -> int:
        """Embedding dimension (the codebook's)."""
        return self._codebook.dim

    def _slots(self, keys: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Indices of the accumulators of ``keys`` (created, zeroed, when new)."""
        slots = np.empty(keys.shape[0], dtype=np.int64)
        for i, key in enumerate(keys.tolist()):
            slot = self._index.get(key)
            if slot is None:
                slot = self._index[key] = len(self._index)
            slots[i] = slot
        needed = len(self._index)
        if needed > self._capacity:
            grow = max(needed, 2 * self._capacity, 64)
            self._counts = np.resize(self._counts, grow)
            self._counts[self._capacity :] = 0
            self._weights = np.resize(self._weights, grow)
            self._weights[self._capacity :] = 0.0
            self._success = np.resize(self._success, grow)
            self._success[self._capacity :] = 0.0
            self._rows_used = np.resize(self._rows_used, grow)
            self._rows_used[self._capacity :] = 0
            vectors = np.zeros((grow, self.dim), dtype=np.float64)
            vectors[: self._capacity] = self._vectors[: self._capacity]
            self._vectors = vectors
            self._capacity = grow
        return slots

    def add(self, contributions: Contributions) -> None:
        """Add a batch of whole devices (every row of each of its devices).

        Raises:
            ValueError: the batch's embedding dimension is not the codebook's.
        """
        if contributions.dim != self.dim:
            raise ValueError(
                f"embedding dimension {contributions.dim} does not match the codebook's {self.dim}"
            )
        n = len(contributions)
        if n == 0:
            return
        codebook = self._codebook
        group = contributions.buckets.astype(np.int64) * codebook.k + codebook.assign(
            contributions.embeddings
        )
        device = _factorize(contributions.device_keys)
        rates = contributions.success_rates.astype(np.float64)
        weight = rates * contributions.sample_counts.astype(np.float64)

        # One entry per (device, group): merge a device's rows in a group, then clip the
        # merged weight.
        group_keys, group_code = np.unique(group, return_inverse=True)
        group_code = group_code.reshape(-1)
        n_groups = int(group_keys.shape[0])
        pair_keys, pair_of_row = np.unique(device * n_groups + group_code, return_inverse=True)
        pair_of_row = pair_of_row.reshape(-1)
        n_pairs = int(pair_keys.shape[0])
        pair_device = pair_keys // n_groups
        pair_group = pair_keys % n_groups
        pair_weight = _float_bincount(pair_of_row, weight, n_pairs)
        pair_success = _float_bincount(pair_of_row, weight * rates, n_pairs)
        if self._clip is None:
            scale = np.ones(n_pairs, dtype=np.float64)
        else:
            scale = np.minimum(
                1.0,
                np.divide(
                    self._clip,
                    pair_weight,
                    out=np.ones(n_pairs, dtype=np.float64),
                    where=pair_weight > self._clip,
                ),
            )
        pair_weight *= scale
        pair_success *= scale

        # Per device keep its max_groups heaviest groups (ties: lower group key first).
        keep = np.ones(n_pairs, dtype=bool)
        if self._max_groups is not None:
            order = np.lexsort((pair_group, -pair_weight, pair_device))
            dev_sorted = pair_device[order]
            run_starts = np.flatnonzero(np.r_[True, dev_sorted[1:] != dev_sorted[:-1]])
            run_lengths = np.diff(np.r_[run_starts, n_pairs])
            rank = np.arange(n_pairs) - np.repeat(run_starts, run_lengths)
            keep[order] = rank < self._max_groups

        kept_group = pair_group[keep]
        row_group = np.where(keep[pair_of_row], group_code, -1)
        row_coef = weight * scale[pair_of_row]
        slots = self._slots(group_keys.astype(np.int64))
        self._counts[slots] += np.bincount(kept_group, minlength=n_groups)
        self._weights[slots] += _float_bincount(kept_group, pair_weight[keep], n_groups)
        self._success[slots] += _float_bincount(kept_group, pair_success[keep], n_groups)
        used = row_group[row_group >= 0]
        self._rows_used[slots] += np.bincount(used, minlength=n_groups)
        self._vectors[slots] += _weighted_vector_sums(
            contributions.embeddings, row_group, row_coef, n_groups
        )
        self.rows += n

    def merge(self, other: GroupAccumulator) -> None:
        """Add another accumulator's sums (e.g. one shard's, once its export completed).

        Raises:
            ValueError: the two use different codebooks or settings.
        """
        if (other._codebook is not self._codebook) or (
            (other._clip, other._max_groups) != (self._clip, self._max_groups)
        ):
            raise ValueError("accumulators of different codebooks or settings")
        if not other._index:
            return
        keys = np.fromiter(other._index.keys(), dtype=np.int64, count=len(other._index))
        theirs = np.fromiter(other._index.values(), dtype=np.int64, count=len(other._index))
        slots = self._slots(keys)
        self._counts[slots] += other._counts[theirs]
        self._weights[slots] += other._weights[theirs]
        self._success[slots] += other._success[theirs]
        self._rows_used[slots] += other._rows_used[theirs]
        self._vectors[slots] += other._vectors[theirs]
        self.rows += other.rows

    def sums(self, min_sources: int) -> _GroupSums:
        """The exact sums of the groups with ``>= min_sources`` devices, ascending keys."""
        keys = np.fromiter(self._index.keys(), dtype=np.int64, count=len(self._index))
        slots = np.fromiter(self._index.values(), dtype=np.int64, count=len(self._index))
        order = np.argsort(keys, kind="stable")
        keys, slots = keys[order], slots[order]
        counts = self._counts[slots]
        candidates = slots[counts >= min_sources]
        return _GroupSums(
            keys=keys[counts >= min_sources],
            counts=self._counts[candidates].copy(),
            weight_sums=self._weights[candidates].copy(),
            success_sums=self._success[candidates].copy(),
            vector_sums=self._vectors[candidates].copy(),
            rows_used=self._rows_used[candidates].copy(),
            groups_total=int(np.count_nonzero(counts)),
        )


def federated_average(
    contributions: Contributions,
    codebook: Codebook,
    *,
    min_sources: int,
    privacy: PrivacyParams | None,
    accountant: PrivacyAccountant | None,
    rng: np.random.Generator,
) -> AggregationResult:
    """Aggregate one round of exported patterns into global patterns (FedAvg with optional DP).

    Steps:

    1. Key every row by ``(bucket, codebook.assign(embedding))``.
    2. Weight ``w = success_rate x sample_count``. A device with several rows in one group counts
       once: its weights are summed, then (with ``privacy``) clipped to ``clipping_norm``; its
       vector ``sum(w e)`` and ``sum(w s)`` are scaled by the same factor. With ``privacy`` a device
       keeps only its ``max_patterns_per_device`` heaviest groups. Without ``privacy`` nothing is
       clipped or capped.
    3. k-anonymity: a group needs ``>= min_sources`` distinct devices, counted exactly.
    4. With noise (``privacy.epsilon`` finite) one noise vector is added to the released
       ``(sum w e, sum w, sum w s, C x count)`` of every group that passed step 3: Gaussian with
       ``sigma = noise_multiplier x l2_sensitivity(C, m)`` or Laplace with
       ``b = noise_multiplier x l1_sensitivity(C, m, dim)``. The group is published only if its
       noisy count is ``>= min_sources + selection_margin(privacy, dim)`` and its noisy weight sum
       is ``> 0``.
    5. ``embedding = normalize(sum w e)`` (dividing by ``sum w`` first does not change the direction
       and would flip it when a noisy ``sum w`` is negative; the group's centroid is used in the
       degenerate case of a zero vector); ``quality = sum w / count``;
       ``success_rate = sum w s / sum w``; ``source_count = count``.

    Why the k-anonymity gate uses the exact count *and* a noisy count with a margin: the exact gate
    is the product guarantee (never publish a pattern backed by fewer than ``min_sources`` devices),
    which a noisy-only gate would break. An exact gate alone is not differentially private: adding
    one device can lift a group from ``min_sources - 1`` to ``min_sources`` and make it appear. The
    noisy gate makes that happen with probability at most ``selection_delta / m`` per group, so at
    most ``selection_delta`` for the device's ``m`` groups, which the round's delta pays for
    (``omega_federation.privacy``). Everything released is then ``(epsilon, delta)``-DP for adding
    or removing one device, provided the codebook does not depend on this round's data. The cost is
    that with DP a group needs about ``selection_margin`` more devices than ``min_sources``
    (negligible for ``min_sources = 1000``; large for the ``min_sources = 3`` of tests).

    Args:
        contributions: The round's exported patterns.
        codebook: Codebook with the same embedding dimension.
        min_sources: k of k-anonymity, ``>= 1``.
        privacy: DP settings, or None for plain FedAvg (no clipping, no noise).
        accountant: Charged once per call when ``privacy`` is set (also for an empty batch, whose
            outcome is still a release). If None, the result's ``privacy`` covers this round only.
        rng: Source of all noise; the result is a deterministic function of the inputs and the
            generator state.

    Returns:
        Published patterns sorted by ``pattern_key`` plus round figures.

    Raises:
        ValueError: If ``min_sources < 1``, the dimensions of the batch and codebook differ, or the
            privacy budget leaves nothing for group selection (Laplace with ``delta == 0``). Raised
            before anything is charged to ``accountant``.
    """
    _check_min_sources(min_sources)
    if codebook.dim != contributions.dim:
        raise ValueError(
            f"embedding dimension {contributions.dim} does not match the codebook's {codebook.dim}"
        )
    if privacy is not None and math.isinf(selection_margin(privacy, contributions.dim)):
        raise ValueError(_NO_SELECTION)
    accumulator = GroupAccumulator(
        codebook,
        clipping_norm=None if privacy is None else privacy.clipping_norm,
        max_groups=None if privacy is None else privacy.max_patterns_per_device,
    )
    accumulator.add(contributions)
    return release_round(
        accumulator, min_sources=min_sources, privacy=privacy, accountant=accountant, rng=rng
    )


def release_round(
    accumulator: GroupAccumulator,
    *,
    min_sources: int,
    privacy: PrivacyParams | None,
    accountant: PrivacyAccountant | None,
    rng: np.random.Generator,
) -> AggregationResult:
    """Steps 3 to 5 of `federated_average` over the sums of a streamed round.

    Args:
        accumulator: Every exported row of the round, added as whole devices; built with
            ``clipping_norm`` and ``max_groups`` from ``privacy`` (None, None without it).
        min_sources: k of k-anonymity, ``>= 1``.
        privacy: DP settings, or None for plain FedAvg.
        accountant: Charged once when ``privacy`` is set (see `federated_average`).
        rng: Source of all noise.

    Returns:
        Published patterns sorted by ``pattern_key`` plus round figures.

    Raises:
        ValueError: ``min_sources < 1``, or the budget leaves nothing for group selection;
            raised before anything is charged.
    """
    _check_min_sources(min_sources)
    codebook = accumulator.codebook
    dim = accumulator.dim
    margin = 0.0
    noisy = privacy is not None and privacy.noise_enabled
    if privacy is not None:
        margin = selection_margin(privacy, dim)
        if math.isinf(margin):
            raise ValueError(_NO_SELECTION)
        round_privacy: RoundPrivacy | None = (accountant or PrivacyAccountant()).spend(privacy)
    else:
        round_privacy = None

    sums = accumulator.sums(int(min_sources))
    vectors = sums.vector_sums
    weight_sums = sums.weight_sums
    success_sums = sums.success_sums
    counts = sums.counts.astype(np.float64)
    n_candidates = int(sums.keys.shape[0])

    if noisy and privacy is not None and round_privacy is not None and n_candidates:
        m = privacy.max_patterns_per_device
        clip = privacy.clipping_norm
        size = (n_candidates, dim + _RELEASED_BLOCKS)
        if privacy.mechanism == "gaussian":
            sigma = round_privacy.noise_multiplier * l2_sensitivity(clip, m)
            noise = rng.normal(0.0, sigma, size=size)
        else:
            scale = round_privacy.noise_multiplier * l1_sensitivity(clip, m, dim)
            noise = rng.laplace(0.0, scale, size=size)
        vectors = vectors + noise[:, :dim]
        weight_sums = weight_sums + noise[:, dim]
        success_sums = success_sums + noise[:, dim + 1]
        counts = counts + noise[:, dim + 2] / clip

    publish = (counts >= min_sources + margin) & (weight_sums > 0.0)
    norms = np.linalg.norm(vectors, axis=1)
    degenerate = norms <= 1e-12 * np.maximum(np.abs(weight_sums), 1e-300)
    safe_norms = np.where(degenerate, 1.0, norms)
    directions = vectors / safe_norms[:, None]
    centroid_of = sums.keys % codebook.k
    if degenerate.any():
        directions[degenerate] = codebook.centroids[centroid_of[degenerate]]
    with np.errstate(divide="ignore", invalid="ignore"):
        quality = weight_sums / counts
        success = np.clip(success_sums / weight_sums, 0.0, 1.0)
    quality = np.maximum(quality, 0.0)
    if privacy is not None:
        quality = np.minimum(quality, privacy.clipping_norm)

    patterns: list[AggregatedPattern] = []
    for i in np.flatnonzero(publish).tolist():
        bucket, centroid = divmod(int(sums.keys[i]), codebook.k)
        source_count = int(sums.counts[i]) if not noisy else max(min_sources, round(counts[i]))
        embedding = directions[i].astype(np.float32)
        embedding /= np.float32(np.linalg.norm(embedding))
        embedding.setflags(write=False)
        patterns.append(
            AggregatedPattern(
                pattern_key=f"{bucket}:{centroid}",
                bucket=bucket,
                centroid=centroid,
                embedding=embedding,
                quality=float(quality[i]),
                success_rate=float(success[i]),
                source_count=int(source_count),
            )
        )
    patterns.sort(key=lambda p: p.pattern_key)

    return AggregationResult(
        patterns=patterns,
        privacy=round_privacy,
        groups_total=sums.groups_total,
        groups_kept=len(patterns),
        contributions_used=int(sums.rows_used[publish].sum()),
    )


_NO_SELECTION = (
    "group selection needs delta > 0 (Laplace with delta = 0 cannot publish groups "
    "chosen from the data under pure epsilon-DP)"
)


def _check_min_sources(min_sources: int) -> None:
    if isinstance(min_sources, bool) or not isinstance(min_sources, int | np.integer):
        raise ValueError(f"min_sources must be an int, got {min_sources!r}")
    if min_sources < 1:
        raise ValueError(f"min_sources must be >= 1, got {min_sources}")
