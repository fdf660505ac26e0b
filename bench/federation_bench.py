"""bench-federation: the federation worker's cost at 10K, 100K and 1M exported patterns.

Two measurements per size, each in a fresh child process so sizes do not pollute each other:

1. **Aggregation alone**: ``federated_average`` over N exported patterns held as the worker
   holds them (int8 codes and scales, shard-qualified device keys). The child builds the
   float32 ``Contributions`` in chunks (the least memory that API needs) and aggregates with
   the patterns pipeline's settings and a codebook trained on a synthetic catalog. Peak RSS is
   the child's VmHWM, reset (``/proc/self/clear_refs``) once the input exists, so it is the
   peak while preparing and aggregating, input included. All N go in as one batch, so this
   holds the whole ``(N, 384)`` float32 matrix (1.5 KB a pattern); the round below streams.
2. **A whole round over gRPC**: a real shard process (``python -m omega_constellation`` on
   127.0.0.1, its own database) is filled with N device patterns by COPY into ``devices`` and
   ``device_patterns``; a bare ExportPatterns stream is timed (the export figure), then a child
   process runs the worker's ``run_round`` (patterns pipeline on, model off, codebook already
   stored as in a steady-state round) and reports the round's wall time and its peak RSS
   (VmHWM reset just before the round: the process's whole peak, its ~150 MB of imports and
   connections included).

The synthetic fleet: devices hold 1-8 patterns (one per context bucket, mean about 3.8, evening
buckets most common); each pattern is the mean of six catalog items drawn mostly from the
device's two favourite genre clusters, quantized to int8 as on the wire; success rates in
[0.8, 1] (all pass the round threshold, so N patterns are exported), sample counts log-normal;
each device's patterns share one sync time in the last hour.

Usage::

    .venv/bin/python -m bench.federation_bench [--sizes 10000 100000 1000000] [--quick]

Prints a table, the targets (1M round <= 60 s and < 500 MB peak RSS; export of 100K < 2 s)
and how cost grows with size; writes the ``federation`` section of ``reports/bench.json``
(``peak_rss_mb_1m`` and ``per_size``). Figures only: nothing fails on timing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import math
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.report import DEFAULT_JSON, format_table, machine, write_section

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SIZES = [10_000, 100_000, 1_000_000]
QUICK_SIZES = [2_000, 10_000]
TARGET_ROUND_SECONDS_1M = 60.0
TARGET_PEAK_RSS_MB_1M = 500.0
TARGET_EXPORT_SECONDS_100K = 2.0
SHARD_ID = "shard-0"
WORKER_ENV = {"MALLOC_ARENA_MAX": "2"}
"""As the federation image sets it (deploy/docker/federation.Dockerfile)."""
CHILD_TIMEOUT_SECONDS = 1200.0
_RESULT = "BENCH_RESULT "
_DIM = 384
_CATALOG_ITEMS = 4000
_CLUSTERS = 40
_ITEMS_PER_PATTERN = 6
_CHUNK = 8192
_PATTERN_COUNT_P = np.array([0.10, 0.16, 0.20, 0.18, 0.14, 0.10, 0.07, 0.05])
"""P(a device holds 1..8 patterns): at most one per context bucket."""
_BUCKET_P = np.array([0.10, 0.08, 0.09, 0.10, 0.30, 0.18, 0.08, 0.07])
"""Popularity of buckets 0..7 ((time slot - 1) * 2 + (day type - 1)): evenings lead."""
_MAX_GRPC_MESSAGE = 64 * 1024 * 1024


# ---- memory of a process ---------------------------------------------------------------------


def _status_kb(field: str, pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(f"no {field} in /proc/{pid}/status")


def _mb(kb: int) -> float:
    return round(kb / 1024, 1)


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False when refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# ---- synthetic catalog and fleet --------------------------------------------------------------


@dataclass(frozen=True)
class Catalog:
    """Synthetic content: ``embeddings`` (n, 384) float32 unit rows grouped in genre clusters."""

    ids: list[str]
    genres: list[str]
    embeddings: npt.NDArray[np.float32]
    cluster_start: npt.NDArray[np.int64]  # (clusters,) first item of each cluster
    cluster_size: npt.NDArray[np.int64]  # (clusters,)
    cluster_p: npt.NDArray[np.float64]  # (clusters,) popularity


def _unit(x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    out: npt.NDArray[np.float32] = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(
        np.float32
    )
    return out


def synthetic_catalog(seed: int = 0) -> Catalog:
    """A catalog clustered like sentence embeddings of real titles.

    A shared direction plus one center per genre cluster; items scatter around their center
    (cosine about 0.6 within a cluster, about 0.1 across). Cluster sizes and popularity are
    Zipf-like.
    """
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(_DIM) / math.sqrt(_DIM)
    centers = _unit(0.4 * shared + rng.standard_normal((_CLUSTERS, _DIM)) / math.sqrt(_DIM))
    zipf = 1.0 / np.arange(1, _CLUSTERS + 1) ** 0.8
    sizes = np.maximum(20, np.round(zipf / zipf.sum() * _CATALOG_ITEMS)).astype(np.int64)
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    cluster_of = np.repeat(np.arange(_CLUSTERS), sizes)
    noise = rng.standard_normal((cluster_of.shape[0], _DIM)) / math.sqrt(_DIM)
    embeddings = _unit(centers[cluster_of] + 0.8 * noise)
    return Catalog(
        ids=[f"c{i:05d}" for i in range(cluster_of.shape[0])],
        genres=[f"genre{c}" for c in cluster_of.tolist()],
        embeddings=embeddings,
        cluster_start=start,
        cluster_size=sizes,
        cluster_p=zipf / zipf.sum(),
    )


def write_catalog_file(catalog: Catalog, path: Path) -> None:
    """The catalog as the shard loads it (``OMEGA_CONSTELLATION_CATALOG_PATH``)."""
    np.savez(
        path,
        content_ids=np.array(catalog.ids),
        titles=np.array([f"Title {c}" for c in catalog.ids]),
        genres=np.array(catalog.genres),
        embeddings=catalog.embeddings,
    )


@dataclass(frozen=True)
class Chunk:
    """Exported patterns ``[start, start + m)`` of the fleet, as a shard stores them."""

    start: int
    device: npt.NDArray[np.int64]  # (m,) device index
    bucket: npt.NDArray[np.int64]  # (m,) context bucket 0..7
    codes: npt.NDArray[np.int8]  # (m, 384)
    scales: npt.NDArray[np.float32]  # (m,)
    rates: npt.NDArray[np.float32]  # (m,) in [0.8, 1]
    samples: npt.NDArray[np.int64]  # (m,) >= 1
    synced_ago_ms: npt.NDArray[np.int64]  # (m,) the device's last sync, ms before now


@dataclass(frozen=True)
class Fleet:
    """N patterns over synthetic devices, generated chunk by chunk (bounded memory)."""

    n: int
    device: npt.NDArray[np.int64]  # (n,) device index, devices contiguous
    bucket: npt.NDArray[np.int64]  # (n,)
    devices: int
    seed: int

    @classmethod
    def plan(cls, n: int, seed: int) -> Fleet:
        """Devices with realistic pattern counts, enough to hold exactly ``n`` patterns."""
        rng = np.random.default_rng([seed, n, 1])
        guess = int(n / float(np.dot(np.arange(1, 9), _PATTERN_COUNT_P))) + 16
        counts = rng.choice(np.arange(1, 9), size=guess, p=_PATTERN_COUNT_P)
        while counts.sum() < n:
            counts = np.concatenate([counts, rng.choice(np.arange(1, 9), 64, p=_PATTERN_COUNT_P)])
        ends = np.cumsum(counts)
        devices = int(np.searchsorted(ends, n)) + 1
        counts = counts[:devices].copy()
        counts[-1] -= int(ends[devices - 1]) - n
        # Distinct buckets per device, weighted by popularity (Gumbel top-k).
        scores = np.log(_BUCKET_P) + rng.gumbel(size=(devices, 8))
        order = np.argsort(-scores, axis=1)
        take = np.arange(8)[None, :] < counts[:, None]
        return cls(
            n=n,
            device=np.repeat(np.arange(devices, dtype=np.int64), counts),
            bucket=order[take].astype(np.int64),
            devices=devices,
            seed=seed,
        )

    def chunks(self, catalog: Catalog) -> Iterator[Chunk]:
        """The patterns in chunks of 8,192 rows."""
        rng = np.random.default_rng([self.seed, self.n, 2])
        p = catalog.cluster_p
        favourite = rng.choice(_CLUSTERS, size=(self.devices, 2), p=p)
        synced_ago = rng.integers(5_000, 3_600_000, size=self.devices)
        for start in range(0, self.n, _CHUNK):
            dev = self.device[start : start + _CHUNK]
            m = dev.shape[0]
            pick = rng.random((m, _ITEMS_PER_PATTERN))
            cluster = np.where(
                pick < 0.6,
                favourite[dev, 0][:, None],
                np.where(
                    pick < 0.85,
                    favourite[dev, 1][:, None],
                    rng.choice(_CLUSTERS, size=(m, _ITEMS_PER_PATTERN), p=p),
                ),
            )
            offset = (rng.random((m, _ITEMS_PER_PATTERN)) * catalog.cluster_size[cluster]).astype(
                np.int64
            )
            items = catalog.cluster_start[cluster] + offset
            mean = catalog.embeddings[items].sum(axis=1)
            vectors = _unit(mean)
            peak = np.abs(vectors).max(axis=1)
            scales = (peak / 127.0).astype(np.float32)
            codes = np.clip(np.rint(vectors / scales[:, None]), -127, 127).astype(np.int8)
            yield Chunk(
                start=start,
                device=dev,
                bucket=self.bucket[start : start + m],
                codes=codes,
                scales=scales,
                rates=(0.8 + 0.2 * np.asarray(rng.beta(5.0, 2.0, size=m))).astype(np.float32),
                samples=np.minimum(
                    1 + np.asarray(rng.lognormal(1.5, 1.0, size=m)).astype(np.int64), 500
                ),
                synced_ago_ms=synced_ago[dev],
            )


def device_key(index: int) -> str:
    """The opaque key a shard exports for device ``index``."""
    return f"k{index:08x}"


# ---- the patterns pipeline's settings --------------------------------------------------------


def pipeline_settings(min_sources: int, seed: int, shards: dict[str, str] | None = None) -> Any:
    """`FederationSettings` of the patterns pipeline: defaults, patterns on, model off."""
    from omega_federation.settings import FederationSettings

    return FederationSettings(
        shards=shards or {SHARD_ID: "127.0.0.1:1"},
        plaintext=True,
        patterns_enabled=True,
        model_factors=0,
        min_sources=min_sources,
        seed=seed,
        log_level="WARNING",
    )


# ---- child 1: aggregation alone --------------------------------------------------------------


def aggregate_child(n: int, seed: int, min_sources: int) -> dict[str, Any]:
    """Generate N exported patterns, then time and measure `federated_average` over them."""
    from omega_federation.aggregation import Contributions, federated_average
    from omega_federation.codebook import Codebook
    from omega_federation.privacy import PrivacyAccountant, PrivacyParams

    settings = pipeline_settings(min_sources, seed)
    baseline_kb = _status_kb("VmRSS")
    catalog = synthetic_catalog(seed)
    codebook = Codebook.train(catalog.embeddings, settings.codebook_size, seed)
    fleet = Fleet.plan(n, seed)
    # What the worker holds after export: int8 codes + scales and per-row columns.
    codes = np.empty((n, _DIM), dtype=np.int8)
    scales = np.empty(n, dtype=np.float32)
    rates = np.empty(n, dtype=np.float32)
    samples = np.empty(n, dtype=np.int64)
    for chunk in fleet.chunks(catalog):
        rows = slice(chunk.start, chunk.start + chunk.device.shape[0])
        codes[rows], scales[rows] = chunk.codes, chunk.scales
        rates[rows], samples[rows] = chunk.rates, chunk.samples
    keys = np.array([f"{SHARD_ID}/{device_key(d)}" for d in fleet.device.tolist()], dtype=object)
    buckets = fleet.bucket.astype(np.int32)
    gc.collect()
    input_kb = _status_kb("VmRSS")
    reset = _reset_peak()

    started = time.perf_counter()
    embeddings = np.empty((n, _DIM), dtype=np.float32)
    for s in range(0, n, 65_536):
        block = codes[s : s + 65_536].astype(np.float32)
        block *= scales[s : s + 65_536, None]
        block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
        embeddings[s : s + 65_536] = block
    contributions = Contributions(
        device_keys=keys,
        buckets=buckets,
        embeddings=embeddings,
        success_rates=rates,
        sample_counts=samples,
    )
    prepared = time.perf_counter()
    prepare_peak_kb = _status_kb("VmHWM")
    result = federated_average(
        contributions,
        codebook,
        min_sources=settings.min_sources,
        privacy=PrivacyParams(
            epsilon=settings.epsilon,
            delta=settings.delta,
            clipping_norm=settings.clipping_norm,
            mechanism=settings.mechanism,
            max_patterns_per_device=settings.max_patterns_per_device,
        ),
        accountant=PrivacyAccountant(),
        rng=np.random.default_rng(seed),
    )
    finished = time.perf_counter()
    return {
        "patterns": n,
        "devices": fleet.devices,
        "seconds": round(finished - started, 4),
        "prepare_seconds": round(prepared - started, 4),
        "average_seconds": round(finished - prepared, 4),
        "peak_rss_mb": _mb(_status_kb("VmHWM")),
        "prepare_peak_rss_mb": _mb(prepare_peak_kb),
        "input_rss_mb": _mb(input_kb),
        "baseline_rss_mb": _mb(baseline_kb),
        "peak_reset": reset,
        "groups_total": result.groups_total,
        "patterns_published": result.groups_kept,
        "codebook_k": codebook.k,
    }


# ---- child 2: one round of the worker --------------------------------------------------------


async def round_child(
    target: str, database_url: str, min_sources: int, seed: int
) -> dict[str, Any]:
    """Run one `run_round` against the shard at ``target``; time and peak RSS of this process."""
    import grpc

    from omega_common.logging import configure_logging
    from omega_federation.state import WorkerState
    from omega_federation.worker import run_round

    configure_logging("WARNING", json=True)
    settings = pipeline_settings(min_sources, seed, {SHARD_ID: target})
    state = await WorkerState.open(database_url)
    options = [
        ("grpc.max_receive_message_length", _MAX_GRPC_MESSAGE),
        ("grpc.max_send_message_length", _MAX_GRPC_MESSAGE),
    ]
    channels = {SHARD_ID: grpc.aio.insecure_channel(target, options=options)}
    try:
        gc.collect()
        baseline_kb = _status_kb("VmRSS")
        reset = _reset_peak()
        started = time.perf_counter()
        report = await run_round(settings, state, channels)
        seconds = time.perf_counter() - started
        peak_kb = _status_kb("VmHWM")
    finally:
        for channel in channels.values():
            await channel.close()
        await state.close()
    return {
        "seconds": round(seconds, 4),
        "peak_rss_mb": _mb(peak_kb),
        "baseline_rss_mb": _mb(baseline_kb),
        "peak_reset": reset,
        "status": report.status,
        "exported_patterns": report.exported_patterns,
        "groups_total": report.groups_total,
        "patterns_published": report.patterns_published,
        "trending_published": report.trending_published,
    }


async def _spawn(args: list[str], limit_seconds: float) -> dict[str, Any]:
    """Run ``python -m bench.federation_bench --child ...``; its result line, or an error."""
    env = {**os.environ, **WORKER_ENV}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.federation_bench",
        *args,
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit_seconds)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return {"error": f"timed out after {limit_seconds:.0f} s"}
    for line in out.decode(errors="replace").splitlines():
        if line.startswith(_RESULT):
            result: dict[str, Any] = json.loads(line[len(_RESULT) :])
            return result
    tail = err.decode(errors="replace")[-1500:]
    return {"error": f"exit {proc.returncode}: {tail}"}


# ---- the shard: fill, export, round ----------------------------------------------------------


async def _fill(dsn: str, fleet: Fleet, catalog: Catalog) -> float:
    """COPY the fleet into the shard's ``devices`` and ``device_patterns``; seconds taken."""
    import asyncpg

    started = time.perf_counter()
    now_ms = int(time.time() * 1000)
    counts = np.bincount(fleet.device, minlength=fleet.devices)
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.copy_records_to_table(
                "devices",
                columns=[
                    "device_id",
                    "device_key",
                    "shard_id",
                    "last_local_version",
                    "pattern_count",
                ],
                records=(
                    (f"tv-{d:08d}", device_key(d), SHARD_ID, 1, int(c))
                    for d, c in enumerate(counts.tolist())
                ),
            )
            for chunk in fleet.chunks(catalog):
                stored = (now_ms - chunk.synced_ago_ms).tolist()
                buckets = chunk.bucket.tolist()
                rows = [
                    (
                        f"tv-{d:08d}",
                        f"p{b}",
                        chunk.codes[i].tobytes(),
                        float(chunk.scales[i]),
                        float(chunk.rates[i]),
                        int(chunk.samples[i]),
                        b // 2 + 1,
                        b % 2 + 1,
                        1,
                        stored[i] - 86_400_000,
                        stored[i],
                        stored[i],
                    )
                    for i, (d, b) in enumerate(zip(chunk.device.tolist(), buckets, strict=True))
                ]
                await conn.copy_records_to_table(
                    "device_patterns",
                    columns=[
                        "device_id",
                        "pattern_id",
                        "embedding",
                        "embedding_scale",
                        "success_rate",
                        "sample_count",
                        "time_slot",
                        "day_type",
                        "version",
                        "created_at_ms",
                        "updated_at_ms",
                        "stored_at_ms",
                    ],
                    records=rows,
                )
            views = np.random.default_rng(fleet.seed).zipf(1.5, size=len(catalog.ids))
            await conn.copy_records_to_table(
                "content_views",
                columns=["content_id", "round", "views"],
                records=[
                    (c, 0, int(min(v, 10**6))) for c, v in zip(catalog.ids, views, strict=True)
                ],
            )
        await conn.execute("ANALYZE devices; ANALYZE device_patterns; ANALYZE content_views")
    finally:
        await conn.close()
    return time.perf_counter() - started


async def _bare_export(target: str, batch_size: int) -> tuple[float, int]:
    """Stream ExportPatterns (everything, as a first round asks) and count; (seconds, patterns)."""
    import grpc

    from omega.v1 import federation_pb2, federation_pb2_grpc

    options = [("grpc.max_receive_message_length", _MAX_GRPC_MESSAGE)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = federation_pb2_grpc.FederationStub(channel)
        started = time.perf_counter()
        count = 0
        call = stub.ExportPatterns(
            federation_pb2.ExportPatternsRequest(
                since_updated_at_ms=0, min_success_rate=0.8, batch_size=batch_size
            ),
            timeout=CHILD_TIMEOUT_SECONDS,
        )
        async for batch in call:
            count += len(batch.patterns)
        return time.perf_counter() - started, count


async def measure_round(
    admin: str, n: int, seed: int, min_sources: int, catalog: Catalog, work: Path
) -> dict[str, Any]:
    """A fresh shard with N patterns: fill, bare export, then one worker round in a child."""
    from omega_common.db import create_database, drop_database
    from omega_federation.codebook import Codebook
    from omega_federation.state import WorkerState
    from tools.fuzz.shard import ShardProcess

    settings = pipeline_settings(min_sources, seed)
    catalog_path = work / f"bench-catalog-{n}.npz"
    write_catalog_file(catalog, catalog_path)
    shard = await ShardProcess.start(
        admin,
        work,
        {
            "OMEGA_CONSTELLATION_CATALOG_PATH": str(catalog_path),
            "OMEGA_CONSTELLATION_LOG_LEVEL": "WARNING",
            # The shard re-checks k-anonymity on publish: the same k as the worker's.
            "OMEGA_CONSTELLATION_MIN_PUBLISHED_SOURCES": str(min_sources),
        },
        auth=False,
    )
    worker_db = f"omega_bench_fed_{uuid.uuid4().hex[:12]}"
    try:
        fleet = Fleet.plan(n, seed)
        fill_seconds = await _fill(shard.database_url, fleet, catalog)
        internal = shard.targets[1]
        export_seconds, exported = await _bare_export(internal, settings.export_batch_size)
        dsn = await create_database(admin, worker_db)
        state = await WorkerState.open(dsn)  # migrations, and the codebook of a steady state
        try:
            codebook = Codebook.train(catalog.embeddings, settings.codebook_size, seed)
            await state.save_codebook(codebook.to_bytes())
        finally:
            await state.close()
        child = await _spawn(
            [
                "--child",
                "round",
                "--target",
                internal,
                "--database-url",
                dsn,
                "--min-sources",
                str(min_sources),
                "--seed",
                str(seed),
            ],
            CHILD_TIMEOUT_SECONDS,
        )
        shard_peak_kb = _status_kb("VmHWM", shard.pid)
    finally:
        await shard.stop()
        await drop_database(admin, worker_db)
    return {
        "patterns": n,
        "devices": fleet.devices,
        "fill_seconds": round(fill_seconds, 2),
        "export_seconds": round(export_seconds, 4),
        "export_patterns": exported,
        "export_patterns_per_second": round(exported / export_seconds) if export_seconds else None,
        "shard_peak_rss_mb": _mb(shard_peak_kb),
        **child,
    }


# ---- the run ---------------------------------------------------------------------------------


def _exponent(n1: int, y1: float | None, n2: int, y2: float | None) -> float | None:
    """``k`` in ``cost ~ n^k`` between two sizes (1.0: linear)."""
    if not y1 or not y2 or y1 <= 0 or y2 <= 0:
        return None
    return round(math.log(y2 / y1) / math.log(n2 / n1), 2)


def _per_pattern(n1: int, y1: float | None, n2: int, y2: float | None) -> float | None:
    """Extra bytes of peak RSS per extra pattern between two sizes."""
    if y1 is None or y2 is None:
        return None
    return round((y2 - y1) * 1024 * 1024 / (n2 - n1))


def growth(per_size: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """How each cost grows between consecutive sizes."""
    sizes = sorted(int(s) for s in per_size)
    out = []
    for a, b in itertools.pairwise(sizes):
        pa, pb = per_size[str(a)], per_size[str(b)]
        agg_a, agg_b = pa.get("aggregation") or {}, pb.get("aggregation") or {}
        rnd_a, rnd_b = pa.get("round") or {}, pb.get("round") or {}
        out.append(
            {
                "from": a,
                "to": b,
                "aggregation_time_exponent": _exponent(
                    a, agg_a.get("seconds"), b, agg_b.get("seconds")
                ),
                "aggregation_rss_bytes_per_pattern": _per_pattern(
                    a, agg_a.get("peak_rss_mb"), b, agg_b.get("peak_rss_mb")
                ),
                "round_time_exponent": _exponent(a, rnd_a.get("seconds"), b, rnd_b.get("seconds")),
                "export_time_exponent": _exponent(
                    a, rnd_a.get("export_seconds"), b, rnd_b.get("export_seconds")
                ),
                "round_rss_bytes_per_pattern": _per_pattern(
                    a, rnd_a.get("peak_rss_mb"), b, rnd_b.get("peak_rss_mb")
                ),
            }
        )
    return out


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    from tools.fuzz.shard import admin_dsn

    catalog = synthetic_catalog(args.seed)
    per_size: dict[str, dict[str, Any]] = {}
    admin = None if args.skip_round else await admin_dsn(args.postgres_url)
    with tempfile.TemporaryDirectory(prefix="omega-bench-federation-") as tmp:
        for n in args.sizes:
            entry: dict[str, Any] = {"aggregation": None, "round": None}
            if not args.skip_aggregation:
                print(f"[{n:,}] aggregation alone ...", flush=True)
                entry["aggregation"] = await _spawn(
                    [
                        "--child",
                        "aggregate",
                        "--size",
                        str(n),
                        "--min-sources",
                        str(args.min_sources),
                        "--seed",
                        str(args.seed),
                    ],
                    CHILD_TIMEOUT_SECONDS,
                )
            if admin is not None:
                print(f"[{n:,}] round over gRPC (fill, export, run_round) ...", flush=True)
                entry["round"] = await measure_round(
                    admin, n, args.seed, args.min_sources, catalog, Path(tmp)
                )
            per_size[str(n)] = entry
    return per_size


def _figure(per_size: dict[str, dict[str, Any]], n: int, part: str, key: str) -> float | None:
    value = ((per_size.get(str(n)) or {}).get(part) or {}).get(key)
    return float(value) if isinstance(value, int | float) else None


def section(args: argparse.Namespace, per_size: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``federation`` section of reports/bench.json."""
    settings = pipeline_settings(args.min_sources, args.seed)
    return {
        "machine": machine(),
        "settings": {
            "sizes": args.sizes,
            "quick": args.quick,
            "seed": args.seed,
            "min_sources": settings.min_sources,
            "codebook_size": settings.codebook_size,
            "epsilon": settings.epsilon,
            "delta": settings.delta,
            "clipping_norm": settings.clipping_norm,
            "max_patterns_per_device": settings.max_patterns_per_device,
            "export_batch_size": settings.export_batch_size,
            "catalog_items": _CATALOG_ITEMS,
            "worker_env": WORKER_ENV,
        },
        "targets": {
            "round_seconds_1m": TARGET_ROUND_SECONDS_1M,
            "peak_rss_mb_1m": TARGET_PEAK_RSS_MB_1M,
            "export_seconds_100k": TARGET_EXPORT_SECONDS_100K,
        },
        "peak_rss_mb_1m": _figure(per_size, 1_000_000, "round", "peak_rss_mb"),
        "round_seconds_1m": _figure(per_size, 1_000_000, "round", "seconds"),
        "export_seconds_100k": _figure(per_size, 100_000, "round", "export_seconds"),
        "aggregation_peak_rss_mb_1m": _figure(per_size, 1_000_000, "aggregation", "peak_rss_mb"),
        "per_size": per_size,
        "growth": growth(per_size),
    }


def _verdict(value: float | None, target: float, inclusive: bool) -> str:
    if value is None:
        return "not measured"
    met = value <= target if inclusive else value < target
    return f"{value:,.2f} ({'met' if met else 'MISSED'})"


def print_report(sec: dict[str, Any]) -> None:
    """The table, the targets and the growth between sizes."""
    rows = []
    for n, entry in sorted(sec["per_size"].items(), key=lambda kv: int(kv[0])):
        agg, rnd = entry.get("aggregation") or {}, entry.get("round") or {}
        rows.append(
            [
                f"{int(n):,} patterns",
                agg.get("seconds", "-"),
                agg.get("peak_rss_mb", "-"),
                rnd.get("seconds", "-"),
                rnd.get("peak_rss_mb", "-"),
                rnd.get("export_seconds", "-"),
                rnd.get("export_patterns_per_second", "-"),
                rnd.get("shard_peak_rss_mb", "-"),
                rnd.get("patterns_published", "-"),
            ]
        )
        for part, result in (("aggregation", agg), ("round", rnd)):
            if "error" in result:
                print(f"  {n} {part} failed: {result['error']}")
    header = [
        "size",
        "aggregate s",
        "aggregate peak MB",
        "round s",
        "worker peak MB",
        "export s",
        "export patterns/s",
        "shard peak MB",
        "published",
    ]
    print(format_table(header, rows))
    print(
        f"targets: 1M round <= {TARGET_ROUND_SECONDS_1M:g} s: "
        f"{_verdict(sec['round_seconds_1m'], TARGET_ROUND_SECONDS_1M, True)};"
        f" 1M round peak RSS < {TARGET_PEAK_RSS_MB_1M:g} MB: "
        f"{_verdict(sec['peak_rss_mb_1m'], TARGET_PEAK_RSS_MB_1M, False)};"
        f" export of 100K < {TARGET_EXPORT_SECONDS_100K:g} s: "
        f"{_verdict(sec['export_seconds_100k'], TARGET_EXPORT_SECONDS_100K, False)}"
    )
    if sec["growth"]:
        print("growth (time exponent k in cost ~ n^k; extra peak RSS per extra pattern):")
        print(
            format_table(
                [
                    "sizes",
                    "aggregate k",
                    "aggregate B/pattern",
                    "round k",
                    "export k",
                    "round B/pattern",
                ],
                [
                    [
                        f"{g['from']:,} -> {g['to']:,}",
                        _dash(g["aggregation_time_exponent"]),
                        _dash(g["aggregation_rss_bytes_per_pattern"]),
                        _dash(g["round_time_exponent"]),
                        _dash(g["export_time_exponent"]),
                        _dash(g["round_rss_bytes_per_pattern"]),
                    ]
                    for g in sec["growth"]
                ],
            )
        )


def _dash(value: object) -> object:
    return "-" if value is None else value


def _sizes(values: list[str]) -> list[int]:
    out = [int(v.replace("_", "")) for item in values for v in item.split(",") if v]
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError("sizes must be positive integers")
    return sorted(set(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--sizes", nargs="+", default=None, help="patterns per size (10000 100000 1000000)"
    )
    parser.add_argument("--quick", action="store_true", help="sizes 2,000 and 10,000 (seconds)")
    parser.add_argument("--min-sources", type=int, default=5, help="k-anonymity k (5)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data and DP noise seed")
    parser.add_argument("--postgres-url", help="maintenance DSN (default: local, else embedded)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="reports/bench.json")
    parser.add_argument("--skip-round", action="store_true", help="aggregation alone only")
    parser.add_argument("--skip-aggregation", action="store_true", help="rounds only")
    parser.add_argument("--child", choices=["aggregate", "round"], help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "aggregate":
        print(_RESULT + json.dumps(aggregate_child(args.size, args.seed, args.min_sources)))
        return 0
    if args.child == "round":
        result = asyncio.run(
            round_child(args.target, args.database_url, args.min_sources, args.seed)
        )
        print(_RESULT + json.dumps(result))
        return 0
    args.sizes = (
        _sizes(args.sizes) if args.sizes else (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    )
    per_size = asyncio.run(_run(args))
    sec = section(args, per_size)
    print_report(sec)
    write_section(args.json, "federation", sec)
    print(f"written: {args.json} (section 'federation')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
