"""The server's side of federated collaborative filtering: one round of noisy subspace iteration.

The global model is a matrix of item factors ``V`` (``n_items x d``) whose non-zero rows are the
round's *active items* ``A`` (a public set: the top items by the previous round's noisy view
counts) and whose columns are orthonormal. A round is one step of the power method for the
top-``d`` eigenvectors of ``G = sum_u p_u p_u^T`` (PureSVD's item space, Cremonesi et al. 2010),
computed as differentially private federated averaging (McMahan et al. 2018, DP-FedAvg):

1. every device sends ``U_u = p_u x_u^T`` scaled to the clipping norm (see
   ``omega_brain.collaborative.model_update``); the server re-clips each update to ``C``
   (Frobenius norm) and drops rows outside ``A``, so one device moves the sum by at most ``C``
   whatever it sends;
2. the sum ``S = sum_u U_u`` over the active rows gets Gaussian noise ``N(0, (z C)^2)`` on every
   one of its ``|A| x d`` coordinates (the Gaussian mechanism with L2 sensitivity ``C``; account
   it as a ``GaussianDpEvent(z)``, ``omega_federation.accounting``);
3. the server step orthonormalizes: ``V' = QR(S)`` with the signs fixed so that ``R`` has a
   non-negative diagonal (the normalization of the noisy power method, Hardt & Price 2014).

Everything after the noise is post-processing and costs no privacy. Memory is bounded by the
``n_items x d`` accumulator whatever the number of devices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

__all__ = [
    "UpdateAccumulator",
    "central_item_factors",
    "initial_item_factors",
    "orthonormalize",
    "top_items",
]


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


class UpdateAccumulator:
    """Sums clipped device updates to the item factors, row by row, in bounded memory.

    Args:
        active: (m,) int64 ascending distinct positions of the round's active items, in
            ``[0, n_items)``.
        n_items: Catalog size.
        dim: Number of factors ``d``.
        clipping_norm: ``C`` > 0; each update is scaled down to Frobenius norm <= ``C`` after
            its inactive rows are dropped.

    Raises:
        ValueError: an argument is out of range.
    """

    def __init__(
        self, active: npt.NDArray[np.int64], n_items: int, dim: int, clipping_norm: float
    ) -> None:
        if n_items <= 0 or dim <= 0:
            raise ValueError(f"n_items and dim must be > 0, got {n_items}, {dim}")
        _check_positive("clipping_norm", clipping_norm)
        active = np.asarray(active, dtype=np.int64)
        if active.ndim != 1 or (active.size and (active[0] < 0 or active[-1] >= n_items)):
            raise ValueError(f"active must be a 1-d array of positions in [0, {n_items})")
        if active.size > 1 and not (np.diff(active) > 0).all():
            raise ValueError("active positions must be ascending and distinct")
        self._active = active
        self._row_of = np.full(n_items, -1, dtype=np.int64)
        self._row_of[active] = np.arange(active.size)
        self._sum = np.zeros((active.size, dim), dtype=np.float64)
        self._n_items = n_items
        self._dim = dim
        self._clip = clipping_norm
        self.devices = 0
        """Updates added so far."""
        self.clipped = 0
        """Updates scaled down by more than 1% (int8 rounding of exact-norm ones not counted)."""

    @property
    def active(self) -> npt.NDArray[np.int64]:
        """(m,) int64 positions of the active items."""
        return self._active

    def add(
        self,
        items: npt.NDArray[np.int64],
        p: npt.NDArray[np.float32],
        direction: npt.NDArray[np.float32],
    ) -> float:
        """Add one device's rank-one update ``rows[j] = p[j] * direction`` for ``items[j]``.

        Args:
            items: (k,) int64 distinct item positions in ``[0, n_items)``.
            p: (k,) float32 row weights, finite.
            direction: (d,) float32, finite.

        Returns:
            The scale applied to the update (1.0 unless it was clipped; 0.0 when it touched no
            active item).

        Raises:
            ValueError: shapes disagree, a position is out of range or repeated, or a value is
                not finite. Nothing is added then.
        """
        items = np.asarray(items, dtype=np.int64)
        p = np.asarray(p, dtype=np.float64)
        direction = np.asarray(direction, dtype=np.float64)
        if items.ndim != 1 or p.shape != items.shape or direction.shape != (self._dim,):
            raise ValueError(
                f"need items (k,), p (k,), direction ({self._dim},); got {items.shape}, "
                f"{p.shape}, {direction.shape}"
            )
        if items.size and (items.min() < 0 or items.max() >= self._n_items):
            raise ValueError(f"item positions must be in [0, {self._n_items})")
        if np.unique(items).size != items.size:
            raise ValueError("item positions must be distinct")
        if not (np.isfinite(p).all() and np.isfinite(direction).all()):
            raise ValueError("update values must be finite")
        rows = self._row_of[items]
        keep = rows >= 0
        rows, p = rows[keep], p[keep]
        norm = float(np.linalg.norm(p)) * float(np.linalg.norm(direction))
        if rows.size == 0 or norm == 0.0:
            self.devices += 1
            return 0.0
        scale = 1.0
        if norm > self._clip:
            scale = self._clip / norm
            # Updates sent at exactly the clipping norm come back an int8 rounding above it.
            self.clipped += norm > self._clip * 1.01
        self._sum[rows] += np.outer(p * scale, direction)
        self.devices += 1
        return scale

    def noisy_sum(
        self, noise_multiplier: float, rng: np.random.Generator | None
    ) -> npt.NDArray[np.float64]:
        """The sum over the active rows with Gaussian noise of std ``noise_multiplier * C``.

        Args:
            noise_multiplier: ``z`` >= 0; 0 releases the exact sum (no privacy).
            rng: Noise source, required when ``z > 0``.

        Returns:
            (m, d) float64, row ``j`` for item ``active[j]``.

        Raises:
            ValueError: ``z`` is negative or not finite, or ``z > 0`` without ``rng``.
        """
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0.0):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
        if noise_multiplier == 0.0:
            return self._sum.copy()
        if rng is None:
            raise ValueError("noise_multiplier > 0 needs an rng")
        noise = rng.normal(0.0, noise_multiplier * self._clip, size=self._sum.shape)
        return self._sum + noise


def orthonormalize(matrix: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """Orthonormal basis of the column space of ``matrix`` (the power method's server step).

    A thin QR decomposition with the signs fixed so that ``R`` has a non-negative diagonal, so
    the result is a deterministic function of the input.

    Args:
        matrix: (m, d) float, finite, ``m >= d``.

    Returns:
        (m, d) float32 ``Q`` with ``Q^T Q = I`` (to float32 precision) and ``matrix = Q R``.

    Raises:
        ValueError: ``matrix`` is not 2-d, has fewer rows than columns, or is not finite.
    """
    if matrix.ndim != 2 or matrix.shape[0] < matrix.shape[1]:
        raise ValueError(f"need an (m, d) matrix with m >= d, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError("matrix must be finite")
    q, r = np.linalg.qr(matrix.astype(np.float64))
    signs = np.where(np.diag(r) < 0.0, -1.0, 1.0)
    return (q * signs).astype(np.float32)


def initial_item_factors(
    n_items: int, active: npt.NDArray[np.int64], dim: int, seed: int
) -> npt.NDArray[np.float32]:
    """A random orthonormal starting point over the active items (data-independent, public).

    Args:
        n_items: Catalog size.
        active: (m,) int64 positions of the active items, ``m >= dim``.
        dim: Number of factors ``d``.
        seed: Seed of the random start.

    Returns:
        (n_items, d) float32 item factors, zero outside ``active``.

    Raises:
        ValueError: fewer active items than factors, or positions out of range.
    """
    active = np.asarray(active, dtype=np.int64)
    if active.size < dim:
        raise ValueError(f"need at least {dim} active items, got {active.size}")
    if active.min() < 0 or active.max() >= n_items:
        raise ValueError(f"active positions must be in [0, {n_items})")
    rng = np.random.default_rng(seed)
    factors = np.zeros((n_items, dim), dtype=np.float32)
    factors[active] = orthonormalize(rng.standard_normal((active.size, dim)))
    return factors


def top_items(noisy_counts: npt.NDArray[np.float64], m: int) -> npt.NDArray[np.int64]:
    """The ``m`` items with the highest released (already noised) counts, ascending positions.

    Post-processing of a differentially private release: choosing the active items from it
    costs no further privacy. Ties break by position, so the result is deterministic.

    Args:
        noisy_counts: (n_items,) float, finite.
        m: Number of items to keep, 1 <= m.

    Returns:
        (min(m, n_items),) int64 ascending positions.

    Raises:
        ValueError: ``m < 1`` or a count is not finite.
    """
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    counts = np.asarray(noisy_counts, dtype=np.float64)
    if not np.isfinite(counts).all():
        raise ValueError("counts must be finite")
    order = np.argsort(-counts, kind="stable")[:m]
    return np.sort(order).astype(np.int64)


def central_item_factors(
    preferences: Iterable[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]],
    n_items: int,
    dim: int,
) -> npt.NDArray[np.float32]:
    """The model trained centrally: the exact top-``dim`` eigenvectors of ``G = sum p p^T``.

    The fixed point the federated rounds approach without noise (PureSVD's item space); used
    as the upper bound of the design in reports and benchmarks, never by the fleet.

    Args:
        preferences: Per device ``(items (m,) int64, p (m,) float32)``.
        n_items: Catalog size (the Gram matrix is ``n_items x n_items`` float64).
        dim: Number of factors, ``1 <= dim <= n_items``.

    Returns:
        (n_items, dim) float32 orthonormal columns, leading eigenvector first.

    Raises:
        ValueError: ``dim`` out of range or a position outside the catalog.
    """
    if not 1 <= dim <= n_items:
        raise ValueError(f"dim must be in [1, {n_items}], got {dim}")
    gram = np.zeros((n_items, n_items), dtype=np.float64)
    for items, p in preferences:
        if items.size and (items.min() < 0 or items.max() >= n_items):
            raise ValueError(f"item positions must be in [0, {n_items})")
        gram[np.ix_(items, items)] += np.outer(p, p)
    _, vectors = np.linalg.eigh(gram)
    return np.ascontiguousarray(vectors[:, ::-1][:, :dim]).astype(np.float32)
