"""recommend() latency with the collaborative model at 100K items, against the brain without it.

A synthetic catalog of clustered 384-dim embeddings (HNSW index, as a TV would have), a random
orthonormal item-factor model over every item, and one device with 60 viewings. The baseline is
the same brain ranking without the model (content patterns and trends), measured in the same
run; a third brain adds the context steer (``model_context_weight=1``; the viewings spread over
every context bucket, so the moment's bucket has some). All on one core (``OMP_NUM_THREADS=1``
is set before numpy and faiss load).

Usage::

    .venv/bin/python bench/recommend_latency.py [--items 100000] [--factors 32] [--calls 300]

Prints p50 / p99 per configuration and the ratio to the baseline; ARCHITECTURE.md section 6
targets a p99 of 5 ms or less.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # after OMP_NUM_THREADS: numpy and faiss read it at import
import time
from collections.abc import Sequence

import numpy as np

from omega_brain import Brain, BrainConfig, CatalogIndex, ViewingEvent
from omega_protocol import bucket_from_timestamp

MOMENT = 1_795_300_000_000  # Saturday 2026-11-21 22:26 UTC: night/weekend


def _catalog(items: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((200, 384)).astype(np.float32)
    emb = centers[rng.integers(0, 200, items)] + 0.5 * rng.standard_normal((items, 384)).astype(
        np.float32
    )
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return [f"c{i:06d}" for i in range(items)], emb


def _percentiles(brain: Brain, calls: int) -> tuple[float, float]:
    times = []
    for i in range(calls):
        start = time.perf_counter()
        recs = brain.recommend(10, timestamp_ms=MOMENT + i)
        times.append(time.perf_counter() - start)
        assert len(recs) == 10
    ms = np.asarray(times) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--factors", type=int, default=32)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args(argv)

    ids, emb = _catalog(args.items, seed=0)
    t0 = time.perf_counter()
    catalog = CatalogIndex(ids, emb)
    print(f"catalog: {args.items} items, index built in {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(1)
    watched = rng.choice(args.items, size=60, replace=False)
    factors = np.linalg.qr(rng.standard_normal((args.items, args.factors)))[0].astype(np.float32)

    rows: dict[str, tuple[float, float]] = {}
    runs = (
        ("without model (baseline)", False, 0.0),
        ("with model", True, 0.0),
        ("with model, context steer", True, 1.0),
    )
    for name, with_model, context_weight in runs:
        config = BrainConfig(model_context_weight=context_weight)
        brain = Brain(f"bench-{with_model}-{context_weight}", config, catalog=catalog)
        for n, i in enumerate(watched):
            brain.observe(ViewingEvent(ids[i], MOMENT - (n + 1) * 3_600_000, completion=1.0))
        if with_model:
            # Install the model as a fetch would (rows, version, factor count) in one transaction.
            store = brain._store  # private: installs a model without a shard
            with store.transaction():
                store.apply_model_rows(
                    ((ids[i], factors[i], 1) for i in range(args.items)),
                    replace=True,
                    factors=args.factors,
                )
                store.set_state({"model_version": 1, "model_factors": args.factors})
            brain._state.update({"model_version": 1, "model_factors": args.factors})
            brain._model = store.model()
            brain._aligned_cache = None
            reasons = brain.recommend(1, timestamp_ms=MOMENT)[0].reasons
            assert "viewers with your taste watched this" in reasons
            # The steer is active where it is on: its reason appears.
            context = f"matches your {bucket_from_timestamp(MOMENT).name} viewing"
            assert (context in reasons) == (context_weight > 0), reasons
        brain.recommend(10, timestamp_ms=MOMENT)  # warm caches (aligned model, trends)
        rows[name] = _percentiles(brain, args.calls)
        brain.close()

    _, base_p99 = rows["without model (baseline)"]
    print(f"\n{'recommend(10)':28} {'p50 ms':>8} {'p99 ms':>8} {'p99 / baseline':>15}")
    for name, (p50, p99) in rows.items():
        print(f"{name:28} {p50:8.2f} {p99:8.2f} {p99 / base_p99:15.2f}")
    print("\ntarget (ARCHITECTURE.md section 6): p99 <= 5 ms at 100K items, one core")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
