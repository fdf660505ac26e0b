"""The replay's reference rows and its precision-vs-epsilon plot.

* `central_reference`: the same model trained centrally on all training data (exact top-d
  eigenvectors), the upper bound of the design, on the section-8 hold-out.
* `write_privacy_plot`: precision@10 against cumulative epsilon per device. The replay itself
  measures one budget (and no noise); the other budgets come from the same device and server
  code run in one process (``omega_simulator.inprocess``) with the replay's model settings,
  averaged over 3 noise seeds. Both kinds of point are drawn and labelled as such.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omega_data import MovieLens
from omega_federation.accounting import RoundMechanism, epsilon_for
from omega_simulator.inprocess import (
    Config,
    central_scores,
    evaluate,
    mean_metrics,
    noise_for,
    splits_of,
)
from omega_simulator.report import QualityRow, SimulationReport
from omega_simulator.settings import SimulatorSettings

__all__ = ["CURVE_EPSILONS", "central_reference", "privacy_curve", "write_privacy_plot"]

CURVE_EPSILONS = (1.0, 2.0, 4.0, 8.0)
"""Budgets of the in-process curve."""
_SEEDS = (0, 1, 2)


def central_reference(ml: MovieLens, factors: int) -> QualityRow:
    """Quality of the model trained centrally on every user's training part.

    Args:
        ml: The dataset.
        factors: Factor count (the no-noise run's).

    Returns:
        The quality row "same model, trained centrally".
    """
    test, _ = splits_of(ml)
    m = evaluate(test, central_scores(test, Config(factors=factors)))
    return QualityRow(
        "same model, trained centrally",
        int(m["users"]),
        m["precision_at_10"],
        m["recall_at_20"],
        m["ndcg_at_10"],
        m["coverage_at_10"],
    )


def privacy_curve(ml: MovieLens, settings: SimulatorSettings) -> list[dict[str, float]]:
    """In-process precision@10 per budget with the replay's model settings.

    Returns:
        One ``{"epsilon", "cumulative_epsilon", "noise_multiplier", "precision_at_10",
        "recall_at_20", "ndcg_at_10"}`` per budget of `CURVE_EPSILONS`.
    """
    test, _ = splits_of(ml)
    config = Config(
        factors=settings.model_factors,
        active_items=settings.model_active_items,
        rounds=settings.model_rounds,
    )
    curve = []
    for eps in CURVE_EPSILONS:
        z = noise_for(eps, config)
        spent = epsilon_for([RoundMechanism((z,))] * (config.rounds + 1), settings.model_delta)
        m = mean_metrics(test, config, z, _SEEDS)
        curve.append(
            {
                "epsilon": eps,
                "cumulative_epsilon": spent,
                "noise_multiplier": z,
                "precision_at_10": m["precision_at_10"],
                "recall_at_20": m["recall_at_20"],
                "ndcg_at_10": m["ndcg_at_10"],
            }
        )
    return curve


def write_privacy_plot(
    report: SimulationReport, ml: MovieLens, settings: SimulatorSettings, folder: Path
) -> Path:
    """Compute the in-process curve, store it in ``report.privacy_curve`` and plot it.

    Returns:
        The PNG's path (``folder/precision_vs_epsilon.png``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = privacy_curve(ml, settings)
    report.privacy_curve = curve
    rows = {q.recommender: q.precision_at_10 for q in report.quality}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(
        [c["cumulative_epsilon"] for c in curve],
        [c["precision_at_10"] for c in curve],
        "o-",
        label="federated, DP (same code in one process, 3 seeds)",
    )
    replay_dp: Any = next((v for k, v in rows.items() if "(DP)" in k), None)
    if replay_dp is not None:
        ax.plot(
            [report.privacy["cumulative_epsilon"]],
            [replay_dp],
            "s",
            color="C3",
            markersize=9,
            label="federated, DP (the replay over gRPC + Postgres)",
        )
    for name, style, color in (
        ("brain, federated (no noise)", "--", "C1"),
        ("same model, trained centrally", "-.", "C4"),
        ("popularity (central)", ":", "C2"),
    ):
        if name in rows:
            ax.axhline(rows[name], ls=style, color=color, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"cumulative epsilon per device (delta {settings.model_delta:g})")
    ax.set_ylabel("precision@10, MovieLens 100K hold-out")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "precision_vs_epsilon.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
