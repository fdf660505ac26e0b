"""Trending content: decayed scores from (optionally noised) per-content counts.

Two sources feed it (``omega_federation.worker``): the collaborative model's Gaussian count
release (the default; already noised and charged to the model's ledger, so ``noise_scale`` is
0 here), or, in the legacy pattern pipeline, the shards' per-content view counts with the
Laplace noise below.

``score = previous * decay_per_hour ** hours_since_last + max(0, views + Laplace(noise_scale))``.

Privacy note: with per-device view counts capped at ``L`` views in total per round (L1
sensitivity ``L``), ``noise_scale = L / epsilon`` makes the noisy counts ``epsilon``-DP (Laplace
mechanism, Dwork & Roth 2014, Thm. 3.6; account it with a ``PrivacyParams(mechanism="laplace")``
round). Which ids appear must not depend on the data either: pass every catalog id (with 0 views)
in ``view_counts``, the catalog being public, rather than only the ids that were viewed. Clipping
negative noisy counts, decay and top-n selection are post-processing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def trend_scores(
    view_counts: Mapping[str, float],
    previous: Mapping[str, float],
    hours_since_last: float,
    *,
    decay_per_hour: float = 0.95,
    noise_scale: float = 0.0,
    rng: np.random.Generator | None = None,
    top_n: int = 100,
) -> list[tuple[str, float]]:
    """Decay the previous scores, add this round's noisy view counts and keep the top ones.

    Every id in ``view_counts`` or ``previous`` is scored (a missing count is 0 and still gets
    noise). Noise is drawn in sorted-id order, so the result depends only on the inputs and the
    generator state, not on mapping order.

    Args:
        view_counts: Content id to views since the last round (or any non-negative count,
            such as a clipped noisy count), finite and ``>= 0``.
        previous: Content id to the score published last round, finite and ``>= 0``.
        hours_since_last: Hours since the previous round, ``>= 0`` (``inf`` forgets the past).
        decay_per_hour: Multiplicative decay per hour, in ``(0, 1]``.
        noise_scale: Laplace scale ``b`` (in views) added to each count, ``>= 0``; 0 disables noise.
        rng: Noise source; required when ``noise_scale > 0``.
        top_n: Number of ids to return, ``>= 0``.

    Returns:
        Up to ``top_n`` ``(content_id, score)`` pairs with ``score > 0``, by score descending,
        ties by id ascending.

    Raises:
        ValueError: On a negative or non-finite count, previous score, interval, decay or noise
            scale, a negative ``top_n``, or ``noise_scale > 0`` without ``rng``.
    """
    if not (hours_since_last >= 0.0):
        raise ValueError(f"hours_since_last must be >= 0, got {hours_since_last!r}")
    if not (0.0 < decay_per_hour <= 1.0):
        raise ValueError(f"decay_per_hour must be in (0, 1], got {decay_per_hour!r}")
    if not (math.isfinite(noise_scale) and noise_scale >= 0.0):
        raise ValueError(f"noise_scale must be finite and >= 0, got {noise_scale!r}")
    if noise_scale > 0.0 and rng is None:
        raise ValueError("noise_scale > 0 needs an rng")
    if isinstance(top_n, bool) or top_n < 0:
        raise ValueError(f"top_n must be an int >= 0, got {top_n!r}")

    ids = sorted(set(view_counts) | set(previous))
    if not ids or top_n == 0:
        return []
    counts = np.fromiter((view_counts.get(i, 0) for i in ids), dtype=np.float64, count=len(ids))
    prev = np.fromiter((previous.get(i, 0.0) for i in ids), dtype=np.float64, count=len(ids))
    if not (np.isfinite(counts).all() and counts.min() >= 0.0):
        raise ValueError("view counts must be finite and >= 0")
    if not (np.isfinite(prev).all() and prev.min() >= 0.0):
        raise ValueError("previous scores must be finite and >= 0")

    decay = decay_per_hour**hours_since_last  # 0.95 ** inf == 0.0, 1.0 ** inf == 1.0
    if noise_scale > 0.0 and rng is not None:
        counts = np.maximum(counts + rng.laplace(0.0, noise_scale, size=counts.shape), 0.0)
    scores = prev * decay + counts

    order = np.argsort(-scores, kind="stable")  # ids are sorted, so ties stay by id
    top = [int(i) for i in order[:top_n] if scores[i] > 0.0]
    return [(ids[i], float(scores[i])) for i in top]
