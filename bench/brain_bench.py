"""bench-brain: the TV brain on one core with the MovieLens catalog and a 100K synthetic one.

For each catalog, one device with a file store (SQLite, as on a TV), default `BrainConfig`:

1. **Start**: ``Brain(...)`` on a new store file (the first power-on), then ``load_catalog``
   (index build plus persisting the catalog), then a history of viewings (60 by default:
   MovieLens: the first ratings of a real user, completion = stars / 5; synthetic: random
   items and completions), one hour apart before the recommendation moment.
2. **Latency**: ``recommend(10)`` p50/p99 over ``--calls`` calls after 5 warm-up calls, then
   ``observe`` p50/p99 over ``--calls`` viewings of unwatched items (each one store
   transaction on disk).
3. **Memory and disk**: VmRSS growth of this process from just before the first open to after
   the latency runs (/proc/self/status), the store's files on disk after ``close`` and
   ``stats().store_bytes`` while open (database plus WAL).
4. **Reopen**: ``close`` then ``Brain(...)`` on the same file, ``--reopens`` times in this
   process (median), and once in a fresh process (``cold open``: a power-on), where the VmRSS
   growth and peak (VmHWM) growth of the open are read too.
5. **Recall@10** of the brain's index (``brain.catalog.search_positions``) against exact
   search (numpy dot products) over the same vectors the brain indexed (normalized, stored as
   int8 codes and decoded, as ``load_catalog`` documents), for ``--recall-queries`` queries of
   two kinds: one taste (the unit mean of an item and its 4 exact nearest neighbours, like a pattern
   learnt from similar viewings) and mixed (the unit mean of 3 random items).
6. **Index build**: ``CatalogIndex(...)`` alone with the brain's default index settings, the
   baseline of the reopen (reopen / build near 1 means the open rebuilds the index).
7. **Encrypted**: the synthetic catalog again with ``BrainConfig.encryption_key`` set (AES-256-GCM
   at rest), the same figures, so the cost of encryption is read beside its baseline
   (``--no-encrypted`` skips it).

The synthetic catalog is `bench.recommend_latency`'s (clustered 384-dim unit vectors). Numpy
and faiss use one thread (``OMP_NUM_THREADS=1`` and friends are set before they load) and the
process is pinned to one CPU where the OS allows it. Targets: recommend p99 <= 5 ms
(ARCHITECTURE.md section 6); at 100K items reopen < 1 s, RSS growth <= 80 MB and store <= 40
MB (issue 10). The device never syncs (no shard): no global patterns, trends or model.

Usage::

    .venv/bin/python -m bench.brain_bench [--items 100000] [--calls 300] [--quick]

Prints one table and writes the ``brain`` section of ``reports/bench.json``. Figures only:
nothing fails on timing.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # after the thread limits: numpy and faiss read them at import
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.recommend_latency import _catalog as synthetic_catalog
from bench.report import DEFAULT_JSON, format_table, machine, write_section
from omega_brain import Brain, BrainConfig, CatalogIndex, ViewingEvent
from omega_protocol import dequantize_int8, quantize_int8

DEVICE = "bench-tv"
MOMENT = 1_795_300_000_000  # Saturday 2026-11-21 22:26 UTC: the recommendation moment
HOUR_MS = 3_600_000
WARMUP_CALLS = 5

TARGETS = {
    "recommend_p99_ms": ("<= 5 ms", 5.0),
    "reopen_s": ("< 1 s at 100K", 1.0),
    "rss_growth_mb": ("<= 80 MB at 100K", 80.0),
    "cold_open_rss_growth_mb": ("<= 80 MB at 100K", 80.0),
    "store_mb": ("<= 40 MB at 100K", 40.0),
}
"""Figure -> (label, upper bound): ARCHITECTURE.md section 6 and issue 10."""

FloatArray = npt.NDArray[np.float32]


@dataclass
class Catalog:
    """One catalog to measure and the device's viewing history over it."""

    name: str
    ids: list[str]
    embeddings: FloatArray  # (n, 384) float32
    titles: list[str] | None
    genres: list[list[str]] | None
    history: list[tuple[str, float]]  # (content id, completion), oldest first


def _proc_status_mb(field: str) -> float:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in MB; NaN where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _p50_p99(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1000.0
    return round(float(np.percentile(ms, 50)), 3), round(float(np.percentile(ms, 99)), 3)


def _store_bytes(path: Path) -> int:
    """Bytes of the SQLite file plus its WAL and shared-memory files, as on disk now."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        f = Path(str(path) + suffix)
        if f.exists():
            total += f.stat().st_size
    return total


def _synthetic(items: int, viewings: int) -> Catalog:
    ids, emb = synthetic_catalog(items, seed=0)
    rng = np.random.default_rng(1)
    watched = rng.choice(items, size=min(viewings, items), replace=False)
    completions = rng.uniform(0.0, 1.0, size=len(watched))
    history = [(ids[int(i)], float(c)) for i, c in zip(watched, completions, strict=True)]
    return Catalog(f"synthetic {items:,}", ids, emb.astype(np.float32), None, None, history)


def _movielens_cached() -> bool:
    """True when MovieLens and the embedding model are in the cache (`make data`)."""
    from omega_data import cache_dir

    root = cache_dir()
    return (
        any((root / "wheels").glob("recbole-1.2.1-*.whl"))
        and (root / "all-MiniLM-L6-v2" / "model.onnx").is_file()
        and any((root / "embeddings").glob("catalog-*.npz"))
    )


def _movielens(viewings: int, quick: bool) -> Catalog | None:
    """The MovieLens catalog with MiniLM embeddings, or None (with a note) when unavailable."""
    from omega_data import DataUnavailableError, catalog_embeddings, load_movielens

    if quick and not _movielens_cached():
        print("MovieLens: not in the cache, skipped (`make data` fetches it)")
        return None
    try:
        ml = load_movielens()
        item_ids, emb = catalog_embeddings(ml)
    except DataUnavailableError as exc:
        print(f"MovieLens: unavailable, skipped ({exc}); `make data` fetches it")
        return None
    items = [ml.items[int(i)] for i in item_ids]
    by_user: dict[int, list[tuple[int, int, float]]] = {}
    for r in ml.ratings:
        by_user.setdefault(r.user_id, []).append((r.timestamp, r.item_id, r.rating))
    # The first user (by id) with enough ratings; their first ratings in time order.
    user = next((u for u in ml.user_ids if len(by_user[u]) >= viewings), ml.user_ids[0])
    rated = sorted(by_user[user])[:viewings]
    history = [(str(item), min(1.0, stars / 5.0)) for _, item, stars in rated]
    return Catalog(
        f"MovieLens {len(items):,}",
        [str(int(i)) for i in item_ids],
        emb.astype(np.float32),
        [it.title for it in items],
        [list(it.genres) for it in items],
        history,
    )


def _exact_top(vectors: FloatArray, queries: FloatArray, k: int) -> npt.NDArray[np.int64]:
    """(q, k) rows of the k largest inner products per query (brute force), any order."""
    scores = queries @ vectors.T
    kk = min(k, vectors.shape[0])
    top: npt.NDArray[np.int64] = np.argpartition(-scores, kk - 1, axis=1)[:, :kk].astype(np.int64)
    return top


def _unit(x: FloatArray) -> FloatArray:
    out: FloatArray = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    return out


def _recall(index: CatalogIndex, vectors: FloatArray, queries: FloatArray, k: int = 10) -> float:
    """Mean |ANN top k & exact top k| / k over the queries."""
    exact = _exact_top(vectors, queries, k)
    found, _ = index.search_positions(queries, k)
    hits = [
        len(set(e.tolist()) & set(f.tolist())) / exact.shape[1]
        for e, f in zip(exact, found, strict=True)
    ]
    return round(float(np.mean(hits)), 4)


def _recall_queries(vectors: FloatArray, count: int) -> tuple[FloatArray, FloatArray]:
    """(one-taste, mixed) queries: unit means of an item and its 4 nearest; of 3 random items."""
    rng = np.random.default_rng(2)
    n = vectors.shape[0]
    seeds = vectors[rng.integers(0, n, count)]
    near = _exact_top(vectors, seeds, 5)
    one_taste = _unit(vectors[near].mean(axis=1))
    mixed = _unit(vectors[rng.integers(0, n, (count, 3))].mean(axis=1))
    return one_taste, mixed


def _cold_open(store: str, encryption_key: bytes | None = None) -> dict[str, float]:
    """In a fresh process: open the brain on an existing store (a power-on) and one recommend.

    Runs in a spawned interpreter, so VmRSS before the open holds only the imports.
    """
    rss0, hwm0 = _proc_status_mb("VmRSS"), _proc_status_mb("VmHWM")
    start = time.perf_counter()
    brain = Brain(DEVICE, BrainConfig(store_path=store, encryption_key=encryption_key))
    open_s = time.perf_counter() - start
    rss1, hwm1 = _proc_status_mb("VmRSS"), _proc_status_mb("VmHWM")
    start = time.perf_counter()
    recs = brain.recommend(10, timestamp_ms=MOMENT)
    first_ms = (time.perf_counter() - start) * 1000.0
    brain.close()
    return {
        "cold_open_s": round(open_s, 3),
        "cold_open_rss_growth_mb": round(rss1 - rss0, 1),
        "cold_open_peak_rss_growth_mb": round(hwm1 - max(hwm0, rss0), 1),
        "cold_first_recommend_ms": round(first_ms, 3),
        "cold_recommendations": float(len(recs)),
    }


def _measure(
    catalog: Catalog,
    work: Path,
    args: argparse.Namespace,
    encryption_key: bytes | None = None,
) -> dict[str, Any]:
    """Every figure of one catalog (see the module docstring), with the store encrypted
    under ``encryption_key`` when given."""
    n = len(catalog.ids)
    suffix = "-encrypted" if encryption_key else ""
    store = work / f"{catalog.name.split()[0].lower()}{suffix}.sqlite"
    config = BrainConfig(store_path=store, encryption_key=encryption_key)
    print(f"{catalog.name}{' (encrypted)' if encryption_key else ''}: measuring ...", flush=True)

    rss_before = _proc_status_mb("VmRSS")
    t0 = time.perf_counter()
    brain = Brain(DEVICE, config)
    start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    brain.load_catalog(catalog.ids, catalog.embeddings, catalog.titles, catalog.genres)
    load_catalog_s = time.perf_counter() - t0
    for n_view, (cid, completion) in enumerate(catalog.history):
        at = MOMENT - (len(catalog.history) - n_view) * HOUR_MS
        brain.observe(ViewingEvent(cid, at, completion=completion))

    for i in range(WARMUP_CALLS):
        brain.recommend(10, timestamp_ms=MOMENT + i)
    rec_times = []
    for i in range(args.calls):
        t0 = time.perf_counter()
        recs = brain.recommend(10, timestamp_ms=MOMENT + WARMUP_CALLS + i)
        rec_times.append(time.perf_counter() - t0)
    assert len(recs) == 10, len(recs)

    rng = np.random.default_rng(3)
    watched = {cid for cid, _ in catalog.history}
    fresh = [cid for cid in catalog.ids if cid not in watched]
    picks = rng.choice(len(fresh), size=min(args.calls, len(fresh)), replace=False)
    obs_times = []
    for i, p in enumerate(picks):
        event = ViewingEvent(fresh[int(p)], MOMENT + (i + 1) * 60_000, float(rng.uniform()))
        t0 = time.perf_counter()
        brain.observe(event)
        obs_times.append(time.perf_counter() - t0)
    rss_growth = _proc_status_mb("VmRSS") - rss_before
    stats = brain.stats()
    events = stats.events_observed
    assert events == len(catalog.history) + len(picks), stats

    reopen_times = []
    for _ in range(args.reopens):
        brain.close()
        t0 = time.perf_counter()
        brain = Brain(DEVICE, config)
        reopen_times.append(time.perf_counter() - t0)
    index = brain.catalog
    assert index is not None and len(index) == n
    assert brain.stats().events_observed == events  # nothing lost across reopens

    # Exact search over the vectors the brain indexed: normalized, int8-quantized as stored
    # (the wire's quantization), decoded and renormalized.
    vectors = _unit(dequantize_int8(*quantize_int8(_unit(catalog.embeddings))))
    one_taste, mixed = _recall_queries(vectors, args.recall_queries)
    recall, recall_mixed = _recall(index, vectors, one_taste), _recall(index, vectors, mixed)
    del vectors
    brain.close()
    del brain, index
    store_bytes = _store_bytes(store)

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        cold = pool.submit(_cold_open, str(store), encryption_key).result()

    cfg = BrainConfig()
    t0 = time.perf_counter()
    alone = CatalogIndex(
        catalog.ids,
        catalog.embeddings,
        hnsw_m=cfg.hnsw_m,
        ef_search=cfg.ef_search,
        ef_construction=cfg.hnsw_ef_construction,
        exact_max_items=cfg.exact_search_max_items,
    )
    build_s = time.perf_counter() - t0
    exact_index = alone.exact
    del alone

    reopen_s = statistics.median(reopen_times)
    rec_p50, rec_p99 = _p50_p99(rec_times)
    obs_p50, obs_p99 = _p50_p99(obs_times)
    return {
        "items": n,
        "encrypted": encryption_key is not None,
        "index": "flat (exact)" if exact_index else "HNSW SQ8",
        "viewings_before": len(catalog.history),
        "index_build_s": round(build_s, 3),
        "start_ms": round(start_s * 1000.0, 2),
        "load_catalog_s": round(load_catalog_s, 3),
        "reopen_s": round(reopen_s, 3),
        "reopen_s_each": [round(t, 3) for t in reopen_times],
        "reopen_to_build": round(reopen_s / build_s, 2) if build_s > 0 else None,
        **cold,
        "recommend_p50_ms": rec_p50,
        "recommend_p99_ms": rec_p99,
        "stats_recommend_p99_ms": round(stats.recommend_p99_ms, 3),
        "observe_p50_ms": obs_p50,
        "observe_p99_ms": obs_p99,
        "rss_growth_mb": round(rss_growth, 1),
        "store_bytes": store_bytes,
        "store_mb": round(store_bytes / 1e6, 2),
        "stats_store_bytes": stats.store_bytes,
        "stats_store_mb": round(stats.store_bytes / 1e6, 2),
        "recall_at_10": recall,
        "recall_at_10_mixed": recall_mixed,
    }


_ROWS = (
    ("index", "index", None),
    ("index build s (CatalogIndex alone)", "index_build_s", None),
    ("start ms (new store)", "start_ms", None),
    ("load_catalog s (build + persist)", "load_catalog_s", None),
    ("reopen s (close, open same file)", "reopen_s", "reopen_s"),
    ("reopen / index build", "reopen_to_build", None),
    ("cold open s (fresh process)", "cold_open_s", None),
    ("cold open RSS growth MB", "cold_open_rss_growth_mb", "cold_open_rss_growth_mb"),
    ("cold open peak RSS growth MB", "cold_open_peak_rss_growth_mb", None),
    ("recommend(10) p50 ms", "recommend_p50_ms", None),
    ("recommend(10) p99 ms", "recommend_p99_ms", "recommend_p99_ms"),
    ("observe p50 ms", "observe_p50_ms", None),
    ("observe p99 ms", "observe_p99_ms", None),
    ("RSS growth MB (build + use)", "rss_growth_mb", "rss_growth_mb"),
    ("store MB on disk (closed)", "store_mb", "store_mb"),
    ("store MB while open (stats, + WAL)", "stats_store_mb", None),
    ("recall@10 one taste (exact = 1)", "recall_at_10", None),
    ("recall@10 mixed tastes", "recall_at_10_mixed", None),
)


def _print(section: dict[str, Any]) -> None:
    catalogs = [
        (name, section[name])
        for name in ("movielens", "synthetic", "synthetic_encrypted")
        if section.get(name)
    ]
    header = ["figure"] + [f"{name} ({c['items']:,})" for name, c in catalogs] + ["target"]
    rows: list[list[object]] = []
    for label, key, target in _ROWS:
        cells = [c[key] if c[key] is not None else float("nan") for _, c in catalogs]
        rows.append([label, *cells, TARGETS[target][0] if target else ""])
    print()
    print(format_table(header, rows))
    synthetic = section["synthetic"]
    verdicts = []
    for key, (label, bound) in TARGETS.items():
        value = synthetic[key]
        verdicts.append(f"{key} {value} ({label}): {'met' if value <= bound else 'NOT met'}")
    print(f"\nsynthetic {synthetic['items']:,} items vs targets: " + "; ".join(verdicts))
    if synthetic["items"] < 100_000:
        print("(a small catalog: the 100K targets do not apply to these figures)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--items", type=int, default=100_000, help="synthetic catalog size")
    parser.add_argument("--calls", type=int, default=300, help="timed recommend/observe calls")
    parser.add_argument("--viewings", type=int, default=60, help="history before timing")
    parser.add_argument("--reopens", type=int, default=3, help="in-process reopens (median)")
    parser.add_argument("--recall-queries", type=int, default=200, help="queries per kind")
    parser.add_argument("--no-movielens", action="store_true", help="skip the MovieLens run")
    parser.add_argument(
        "--no-encrypted", action="store_true", help="skip the encrypted synthetic run"
    )
    parser.add_argument("--dir", type=Path, help="where the store files go (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="reports/bench.json")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 6,000 synthetic items (still HNSW), few calls; MovieLens only "
        "when cached",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.calls, args.reopens, args.recall_queries = 6_000, 30, 1, 50
    cpu = None
    if hasattr(os, "sched_setaffinity"):
        cpu = max(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})

    with tempfile.TemporaryDirectory(prefix="omega-bench-brain-", dir=args.dir) as tmp:
        work = Path(tmp)
        results: dict[str, dict[str, Any] | None] = {"movielens": None}
        if not args.no_movielens:
            ml = _movielens(args.viewings, args.quick)
            if ml is not None:
                results["movielens"] = _measure(ml, work, args)
                del ml
        generated = _synthetic(args.items, args.viewings)
        results["synthetic"] = _measure(generated, work, args)
        results["synthetic_encrypted"] = (
            None
            if args.no_encrypted
            else _measure(generated, work, args, encryption_key=bytes(range(32)))
        )
        del generated

    synthetic = results["synthetic"]
    assert synthetic is not None
    section: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "quick": args.quick,
            "synthetic_items": args.items,
            "calls": args.calls,
            "viewings_before": args.viewings,
            "reopens": args.reopens,
            "recall_queries": args.recall_queries,
            "pinned_cpu": cpu,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "targets": {key: label for key, (label, _) in TARGETS.items()},
        **results,
        # The synthetic catalog's headline figures, flat for scripts that compare runs.
        **{
            key: synthetic[key]
            for key in (
                "reopen_s",
                "cold_open_s",
                "cold_open_rss_growth_mb",
                "recommend_p99_ms",
                "observe_p99_ms",
                "rss_growth_mb",
                "store_mb",
                "recall_at_10",
            )
        },
    }
    _print(section)
    write_section(args.json, "brain", section)
    print(f"written: {args.json} (section 'brain')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
