"""Choose the federated collaborative-filtering hyper-parameters on a validation split; report.

What it runs: the device code (``omega_brain.collaborative``), the server's round
(``omega_federation.item_factors``) and the privacy accountant (``omega_federation.accounting``)
in one process over MovieLens 100K, every user a device: round 0 releases noisy per-item view
counts (each device's view vector clipped to L2 norm 1) and picks the model's active items;
rounds 1..T are federated noisy subspace iterations. Then every device ranks the catalog from
its own user factor, the model and the trend prior.

Honest tuning (ARCHITECTURE.md section 8, issue 5): every hyper-parameter is chosen on a
validation split carved from each user's training part (its first 80% fit, its last 20%
validate); the hold-out is only used to report the chosen configuration. Reported beside the
federated model, from the same run: popularity, and the same model trained centrally (exact
top-d eigenvectors of the whole training Gram matrix; the upper bound of the design).

Usage::

    .venv/bin/python bench/collaborative_quality.py [--quick] [--out reports/collaborative]

Writes ``quality.json`` and ``precision_vs_epsilon.png`` into the output folder and prints the
tables. ``--quick`` searches a smaller grid with one seed (for a smoke run).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from omega_brain.collaborative import (
    InteractionWeights,
    model_update,
    preference_vector,
    quality_weight,
    score_items,
    user_factor,
)
from omega_data import chronological_split, evaluate_rankings, load_movielens
from omega_data.evaluation import UserSplit
from omega_data.movielens import Rating
from omega_federation.accounting import RoundMechanism, calibrate_noise_multiplier, epsilon_for
from omega_federation.item_factors import (
    UpdateAccumulator,
    initial_item_factors,
    orthonormalize,
    top_items,
)
from omega_simulator.replay import completion_of

DELTA = 1e-5
"""Privacy delta per device over the whole run (issue 5: delta <= 1e-5)."""
EPSILONS = (1.0, 2.0, 4.0, 8.0)
"""Cumulative epsilon budgets reported (plus no noise)."""


@dataclass(frozen=True)
class Config:
    """One point of the hyper-parameter grid."""

    factors: int = 16
    active_items: int = 500
    rounds: int = 2
    partial: float = 0.5
    failure: float = 0.0
    trend_weight: float = 0.0
    full_weight_at: float = 1.0


@dataclass(frozen=True)
class Part:
    """One device's data for an evaluation: fit ratings (time order) and evaluated ratings."""

    fit: list[Rating]
    evaluated: list[Rating]


class Dataset:
    """Item positions and per-device preference vectors for one split."""

    def __init__(self, parts: Sequence[Part], item_ids: Sequence[int]) -> None:
        self.parts = list(parts)
        self.position = {item: i for i, item in enumerate(item_ids)}
        self.item_ids = list(item_ids)
        self.n_items = len(item_ids)

    def preferences(
        self, weights: InteractionWeights
    ) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], float, int]]:
        """Per device: (items, p, success rate, sample count) from its fit part."""
        out = []
        for part in self.parts:
            pairs = [(self.position[r.item_id], completion_of(r.rating)) for r in part.fit]
            items, p = preference_vector(pairs, weights)
            successes = sum(r.rating >= 4 for r in part.fit)
            out.append((items, p, successes / max(1, len(part.fit)), len(part.fit)))
        return out

    def view_matrix_rows(self) -> list[npt.NDArray[np.int64]]:
        """Per device: positions of every item it viewed (any completion)."""
        return [
            np.unique(np.array([self.position[r.item_id] for r in p.fit], dtype=np.int64))
            for p in self.parts
        ]


def evaluate(dataset: Dataset, scores: list[npt.NDArray[np.float32]]) -> dict[str, float]:
    """The section-8 metrics of per-device score vectors (training items dropped)."""
    rankings: dict[int, list[int]] = {}
    splits = {}

    for u, (part, s) in enumerate(zip(dataset.parts, scores, strict=True)):
        s = s.copy()
        seen = [dataset.position[r.item_id] for r in part.fit]
        s[seen] = -np.inf
        top = np.argpartition(-s, 20)[:20]
        top = top[np.argsort(-s[top], kind="stable")]
        rankings[u] = [dataset.item_ids[i] for i in top]
        splits[u] = UserSplit(
            user_id=u,
            train=part.fit,
            holdout=part.evaluated,
            relevant=frozenset(r.item_id for r in part.evaluated if r.rating >= 4),
        )
    m = evaluate_rankings(rankings, splits, dataset.n_items)
    return {
        "users": m.users,
        "precision_at_10": m.precision_at_10,
        "recall_at_20": m.recall_at_20,
        "ndcg_at_10": m.ndcg_at_10,
        "coverage_at_10": m.coverage_at_10,
    }


def _normalized(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    top = float(np.max(np.abs(x))) if x.size else 0.0
    return x / top if top > 0.0 else x


def federated_scores(
    dataset: Dataset, config: Config, noise_multiplier: float, seed: int
) -> list[npt.NDArray[np.float32]]:
    """Run round 0 (view counts) and ``config.rounds`` model rounds; score every device."""
    rng = np.random.default_rng(seed)
    weights = InteractionWeights(partial=config.partial, failure=config.failure)
    prefs = dataset.preferences(weights)
    # Round 0: per-item view counts, each device's 0/1 view vector clipped to L2 norm 1.
    counts = np.zeros(dataset.n_items)
    for viewed in dataset.view_matrix_rows():
        if viewed.size:
            counts[viewed] += 1.0 / math.sqrt(viewed.size)
    if noise_multiplier > 0.0:
        counts += rng.normal(0.0, noise_multiplier, size=counts.shape)
    active = top_items(counts, config.active_items)
    factors = initial_item_factors(dataset.n_items, active, config.factors, seed=seed)
    for _ in range(config.rounds):
        acc = UpdateAccumulator(active, dataset.n_items, config.factors, clipping_norm=1.0)
        for items, p, rate, samples in prefs:
            w = quality_weight(rate, samples, config.full_weight_at)
            update = model_update(factors, items, p, clipping_norm=1.0, weight=w)
            if update is not None:
                acc.add(update.items, update.p, update.direction)
        noisy = acc.noisy_sum(noise_multiplier, rng if noise_multiplier > 0.0 else None)
        factors = np.zeros_like(factors)
        factors[active] = orthonormalize(noisy)
    prior = _normalized(counts)
    scores = []
    for items, p, _, _ in prefs:
        s = score_items(factors, user_factor(factors, items, p)).astype(np.float64)
        scores.append((_normalized(s) + config.trend_weight * prior).astype(np.float32))
    return scores


def central_scores(dataset: Dataset, config: Config) -> list[npt.NDArray[np.float32]]:
    """The same model trained centrally: exact top-d eigenvectors of the training Gram matrix."""
    weights = InteractionWeights(partial=config.partial, failure=config.failure)
    prefs = dataset.preferences(weights)
    gram = np.zeros((dataset.n_items, dataset.n_items))
    for items, p, _, _ in prefs:
        gram[np.ix_(items, items)] += np.outer(p, p)
    _, vectors = np.linalg.eigh(gram)
    factors = vectors[:, ::-1][:, : config.factors].astype(np.float32)
    return [score_items(factors, user_factor(factors, items, p)) for items, p, _, _ in prefs]


def popularity_scores(dataset: Dataset) -> list[npt.NDArray[np.float32]]:
    """Count of fit ratings >= 4 per item (the section-8 popularity baseline)."""
    counts = np.zeros(dataset.n_items, dtype=np.float32)
    for part in dataset.parts:
        for r in part.fit:
            counts[dataset.position[r.item_id]] += r.rating >= 4
    # Ties by ascending item id, as omega_data.popularity_rankings: a tiny decreasing offset.
    counts -= np.arange(dataset.n_items, dtype=np.float32) * 1e-6
    return [counts] * len(dataset.parts)


def mean_metrics(
    dataset: Dataset, config: Config, z: float, seeds: Sequence[int]
) -> dict[str, float]:
    """Metrics averaged over seeds (noise and the random start)."""
    runs = [evaluate(dataset, federated_scores(dataset, config, z, s)) for s in seeds]
    return {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}


@functools.cache
def _calibrated(epsilon: float, releases: int) -> float:
    return calibrate_noise_multiplier(epsilon, DELTA, rounds=releases)


def noise_for(epsilon: float | None, config: Config) -> float:
    """Noise multiplier of every release so that round 0 + T model rounds spend ``epsilon``."""
    return 0.0 if epsilon is None else _calibrated(epsilon, config.rounds + 1)


Grid = dict[str, list[Any]]
"""Config field -> values to try."""


def search(
    grid: Grid, base: Config, measure: Callable[[Config], dict[str, float]]
) -> tuple[Config, dict[str, float], list[dict[str, object]]]:
    """Exhaustive search of ``grid`` around ``base``, keeping the best validation precision@10."""
    trials: list[dict[str, object]] = []
    best: tuple[Config, dict[str, float]] | None = None
    keys = sorted(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        config = replace(base, **dict(zip(keys, values, strict=True)))
        if config.active_items < config.factors:
            continue
        metrics = measure(config)
        trials.append({"config": asdict(config), **metrics})
        if best is None or metrics["precision_at_10"] > best[1]["precision_at_10"]:
            best = (config, metrics)
    if best is None:
        raise ValueError("empty grid")
    return best[0], best[1], trials


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small grid, one seed")
    parser.add_argument("--out", type=Path, default=Path("reports/collaborative"))
    args = parser.parse_args(argv)
    started = time.perf_counter()

    ml = load_movielens()
    item_ids = sorted(ml.items)
    splits = chronological_split(ml)
    test = Dataset([Part(s.train, s.holdout) for s in splits.values()], item_ids)
    val_parts = []
    for s in splits.values():
        n_fit = max(1, math.floor(0.8 * len(s.train) + 1e-9))
        val_parts.append(Part(s.train[:n_fit], s.train[n_fit:]))
    validation = Dataset(val_parts, item_ids)

    seeds = (0,) if args.quick else (0, 1, 2)
    n_all = len(item_ids)
    exact_grid: Grid
    noisy_grid: Grid
    if args.quick:
        exact_grid = {"factors": [8, 16], "partial": [0.5], "failure": [0.0]}
        noisy_grid = {"factors": [8, 16], "active_items": [500], "rounds": [2]}
        clean_rounds = [8]
    else:
        exact_grid = {
            "factors": [8, 16, 32, 64],
            "partial": [0.5, 1.0],
            "failure": [0.0, 0.5],
        }
        noisy_grid = {
            "factors": [4, 8, 16],
            "active_items": [250, 500, 1000],
            "rounds": [1, 2, 3],
            "trend_weight": [0.0, 0.2],
        }
        clean_rounds = [2, 4, 8, 16]

    # 1. Interaction weights and factors without noise (central model, exact eigenvectors).
    exact, exact_val, _ = search(
        exact_grid, Config(), lambda c: evaluate(validation, central_scores(validation, c))
    )
    best_exact = (exact, exact_val)
    base = replace(best_exact[0], active_items=n_all)
    print(f"central model, validation: {best_exact[0]} P@10 {best_exact[1]['precision_at_10']:.4f}")

    # 2. Rounds of the federated model without noise (all items active).
    clean, clean_val, _ = search(
        {"rounds": clean_rounds}, base, lambda c: mean_metrics(validation, c, 0.0, seeds)
    )
    print(
        f"federated, no noise, validation: rounds={clean.rounds} P@10 "
        f"{clean_val['precision_at_10']:.4f}"
    )

    # 3. Under differential privacy: per budget, factors / active items / rounds / trend weight.
    chosen: dict[str, tuple[Config, dict[str, float]]] = {}
    trials_by_eps: dict[str, list[dict[str, object]]] = {}
    for eps in EPSILONS:
        config, val_metrics, trials = search(
            noisy_grid,
            base,
            lambda c, e=eps: mean_metrics(validation, c, noise_for(e, c), seeds),  # type: ignore[misc]
        )
        chosen[str(eps)] = (config, val_metrics)
        trials_by_eps[str(eps)] = trials
        print(f"epsilon {eps}: validation {config} P@10 {val_metrics['precision_at_10']:.4f}")

    # 4. Report on the hold-out, each configuration as chosen on validation.
    rows: list[dict[str, object]] = []
    rows.append({"recommender": "popularity (central)", **evaluate(test, popularity_scores(test))})
    rows.append(
        {
            "recommender": "same model, central (exact eigenvectors)",
            **evaluate(test, central_scores(test, best_exact[0])),
        }
    )
    rows.append(
        {
            "recommender": "federated, no noise",
            "config": asdict(clean),
            **mean_metrics(test, clean, 0.0, seeds),
        }
    )
    privacy_curve = []
    for eps in EPSILONS:
        config, val_metrics = chosen[str(eps)]
        z = noise_for(eps, config)
        mechanisms = [RoundMechanism((z,))] * (config.rounds + 1)
        spent = epsilon_for(mechanisms, DELTA)
        metrics = mean_metrics(test, config, z, seeds)
        rows.append(
            {
                "recommender": f"federated, DP epsilon {eps:g}",
                "config": asdict(config),
                "noise_multiplier": z,
                "cumulative_epsilon": spent,
                "delta": DELTA,
                "validation_precision_at_10": val_metrics["precision_at_10"],
                **metrics,
            }
        )
        privacy_curve.append((spent, metrics["precision_at_10"]))

    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "delta": DELTA,
        "seeds": list(seeds),
        "quality": rows,
        "validation": {
            "central": {"config": asdict(best_exact[0]), **best_exact[1]},
            "federated_no_noise": {"config": asdict(clean), **clean_val},
            "dp_trials": trials_by_eps,
        },
        "seconds": time.perf_counter() - started,
    }
    (args.out / "quality.json").write_text(json.dumps(report, indent=2))
    print()
    print(f"{'recommender':44} {'P@10':>7} {'R@20':>7} {'NDCG@10':>8} {'cov@10':>7}")
    for row in rows:
        print(
            f"{row['recommender']!s:44} {row['precision_at_10']:7.4f} {row['recall_at_20']:7.4f} "
            f"{row['ndcg_at_10']:8.4f} {row['coverage_at_10']:7.4f}"
        )
    _plot(privacy_curve, rows, args.out / "precision_vs_epsilon.png")
    print(f"\nwritten to {args.out} in {report['seconds']:.0f} s")
    return 0


def _plot(curve: list[tuple[float, float]], rows: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {str(r["recommender"]): float(r["precision_at_10"]) for r in rows}  # type: ignore[arg-type]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([e for e, _ in curve], [p for _, p in curve], "o-", label="federated, DP")
    ax.axhline(by_name["federated, no noise"], color="C1", ls="--", label="federated, no noise")
    ax.axhline(by_name["popularity (central)"], color="C2", ls=":", label="popularity")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"cumulative epsilon per device (delta {DELTA:g})")
    ax.set_ylabel("precision@10 (MovieLens 100K hold-out)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
