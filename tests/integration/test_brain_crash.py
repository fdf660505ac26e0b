"""Crash-proof brain: SIGKILL at random points of observe, sync and catalog updates.

A fork server (`tests/integration/brain_crash_child.py`) forks one worker per life; the worker
opens the brain on a store file in ``tmp_path`` and runs a seeded random mix of ``observe``,
``sync`` (against a real shard on loopback, Postgres behind it), ``fetch_catalog`` and
``load_catalog`` (a catalog with a few items changed), logging each call before it starts and
after it returns. The worker is killed with SIGKILL after a seeded random delay. The test
then reopens the store in this process and checks, against the worker's log:

* the store opens, and the catalog index file beside it is either used or found
  missing/stale/corrupt and rebuilt (never a crash); the catalog the brain serves is the one
  before or after the call in flight, its rows are the right vectors, and its catalog
  version names it (the catalog and its version are one transaction);
* nothing acknowledged is lost: every ``observe`` that returned is in the store (the one in
  flight may or may not be), and no event appears that was not observed;
* every sync the shard acknowledged stays acknowledged: the brain's acked version never goes
  backwards and the shard's stored version for the device is at least the brain's;
* versions never go backwards: local, acked, global, model and catalog versions (except that
  ``load_catalog`` sets the catalog version to 0 by design: a locally loaded catalog).

Between lives the shard's catalog changes now and then (a few items, so ``fetch_catalog``
applies them incrementally) and a federation round is published (global patterns in parts,
trends and item factors), so syncs also store global patterns and fetch the model. Every
few lives the test also deletes, truncates or flips a byte of the index file before the
reopen (what a power cut could do; a SIGKILL cannot, the file is renamed into place): it
must be detected and rebuilt, never used.

The loop also measures whether every view reaches the shard exactly once (``view_surplus``
in the printed report); `test_views_are_counted_once_across_a_kill_after_the_shard_applied`
pins the kill point where it once did not (the brain now records a send before sending it,
and settles it after a kill instead of counting its views again).

The short loop (200 kills, about 35 s) runs in ``make test``; 1,000 kills run with
``OMEGA_CHAOS=1`` (``make chaos``), seed from ``OMEGA_CHAOS_SEED``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import numpy as np
import pytest

from omega.v1 import federation_pb2, federation_pb2_grpc, patterns_pb2
from omega_brain import Brain, BrainConfig
from omega_brain.catalog_keeper import CatalogKeeper
from omega_brain.index_file import index_path
from omega_brain.store import Store
from omega_constellation.server import RunningServer
from omega_protocol import encode_embedding

from .brain_crash_child import (
    DEVICE_ID,
    Variant,
    brain_settings,
    fingerprint,
    variant,
)
from .conftest import StartShard

pytestmark = pytest.mark.integration

CHILD = Path(__file__).with_name("brain_crash_child.py")
DAMAGE: list[str | None] = [{10: "truncate", 12: "flip", 14: "delete"}.get(i) for i in range(15)]
"""Lives whose index file the test damages before the reopen (in this order, cyclically)."""
MIN_ROW_COSINE = 0.95
"""A served row against the catalog's float embedding (int8 codes, then the index's SQ8)."""

long_only = pytest.mark.skipif(
    not os.environ.get("OMEGA_CHAOS"), reason="long fault test: run with `make chaos`"
)


# ---------------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class Versions:
    """The versions a brain reports, and its catalog's fingerprint ("" without one)."""

    local: int = 0
    acked: int = 0
    glob: int = 0
    catalog: int = 0
    model: int = 0
    fp: str = ""

    @staticmethod
    def of(record: dict[str, Any]) -> Versions:
        return Versions(
            local=int(record["local"]),
            acked=int(record["acked"]),
            glob=int(record["global"]),
            catalog=int(record["catalog"]),
            model=int(record["model"]),
            fp=str(record["fp"]),
        )


@dataclass(slots=True)
class Reopened:
    """What the reopened store holds."""

    versions: Versions
    events: dict[int, tuple[str, int]]
    """local version -> (content id, started_at_ms) of every stored event."""
    events_observed: int
    index_outcome: str
    """"loaded" when the index file was used, else why it was rebuilt."""
    min_row_cosine: float
    leftover_tmp: bool
    """A temp index file was there before the reopen (the kill hit a write)."""
    pending_views: int
    """Views not yet sent (sum over content ids)."""


@dataclass(slots=True)
class Report:
    """What a crash loop did (printed, and asserted on by the tests)."""

    iterations: int = 0
    kills: int = 0
    seconds: float = 0.0
    kill_points: collections.Counter[str] = field(default_factory=collections.Counter)
    index_outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    ops_done: collections.Counter[str] = field(default_factory=collections.Counter)
    sync_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    leftover_tmp: int = 0
    view_surplus: int = 0
    view_surplus_changes: collections.Counter[str] = field(default_factory=collections.Counter)
    shard_catalog_changes: int = 0
    rounds_published: int = 0
    final: Versions = Versions()

    def record(
        self, point: str, damage: str | None, found: Reopened, records: list[dict[str, Any]]
    ) -> None:
        """Count one checked life."""
        self.kill_points[point] += 1
        outcome = found.index_outcome
        self.index_outcomes[outcome if damage is None else f"{outcome} (after {damage})"] += 1
        self.leftover_tmp += int(found.leftover_tmp)
        for r in records:
            if "done" in r:
                self.ops_done[str(r["done"])] += 1
                if r["done"] == "sync" and not r["ok"]:
                    self.sync_errors[str(r["error"])[:80]] += 1

    def summary(self) -> str:
        return json.dumps(
            {
                "iterations": self.iterations,
                "kills": self.kills,
                "seconds": round(self.seconds, 1),
                "kill_points": dict(sorted(self.kill_points.items())),
                "index_outcomes": dict(sorted(self.index_outcomes.items())),
                "ops_done": dict(sorted(self.ops_done.items())),
                "sync_errors": dict(self.sync_errors),
                "leftover_index_tmp_files": self.leftover_tmp,
                "view_surplus": self.view_surplus,
                "view_surplus_changed_at": dict(self.view_surplus_changes),
                "shard_catalog_changes": self.shard_catalog_changes,
                "rounds_published": self.rounds_published,
                "final_versions": {
                    "local": self.final.local,
                    "acked": self.final.acked,
                    "global": self.final.glob,
                    "catalog": self.final.catalog,
                    "model": self.final.model,
                },
            },
            indent=1,
        )


# ---------------------------------------------------------------------------------- reopen


def damage_index_file(path: Path, how: str, rng: random.Random) -> None:
    """What a power cut or a bad flash block could do to the index file (a SIGKILL cannot:
    the file is replaced by an atomic rename)."""
    if not path.exists():
        return
    if how == "delete":
        path.unlink()
        return
    size = path.stat().st_size
    with open(path, "r+b") as f:
        if how == "truncate":
            f.truncate(rng.randrange(size))
        else:  # flip one byte of the faiss part (the trailer is the last few hundred bytes)
            at = rng.randrange(max(size - 1024, 1))
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0xFF]))


def reopen(
    store_path: Path, catalogs: dict[str, Variant], damage: str | None, seed: int
) -> Reopened:
    """Open the store as a brain would and read what it holds (runs in a thread).

    The keeper is opened first on its own, to learn whether the index file was used or
    rebuilt (and why); then the brain itself, for its versions and its catalog. ``damage``
    (``delete``, ``truncate`` or ``flip``) damages the index file first.
    """
    cfg = BrainConfig(**brain_settings(str(store_path)))
    file = index_path(cfg.store_path)
    assert file is not None
    tmp = file.with_name(file.name + ".tmp")
    leftover_tmp = tmp.exists()
    if damage is not None:
        damage_index_file(file, damage, random.Random(seed))
    store = Store(cfg.store_path, DEVICE_ID)
    try:
        keeper = CatalogKeeper(
            store,
            index_path(cfg.store_path),
            hnsw_m=cfg.hnsw_m,
            ef_search=cfg.ef_search,
            ef_construction=cfg.hnsw_ef_construction,
            exact_max_items=cfg.exact_search_max_items,
        )
        index = keeper.open()
        if index is None:
            outcome = "no catalog"
        elif keeper.counters.file_loads:
            outcome = "loaded"
        else:
            outcome = keeper.counters.last_rebuild_reason.split(":")[0]
    finally:
        store.close()
    with Brain(DEVICE_ID, cfg) as brain:
        stats = brain.stats()
        catalog = brain.catalog
        fp, cosine = "", 1.0
        if catalog is not None:
            ids = list(catalog.content_ids)
            fp = fingerprint(ids, [catalog.title_of(c) for c in ids])
            known = catalogs.get(fp)
            if known is None:
                cosine = -1.0  # a catalog that was never given: the check names it
            else:
                row_of = {c: i for i, c in enumerate(known.ids)}
                expected = known.embeddings[[row_of[c] for c in ids]]
                served = catalog.vectors(np.arange(len(ids)))
                cosine = float(np.min(np.sum(served * expected, axis=1)))
        versions = Versions(
            local=stats.local_version,
            acked=stats.acked_version,
            glob=stats.global_version,
            catalog=stats.catalog_version,
            model=stats.model_version,
            fp=fp,
        )
        observed = stats.events_observed
    with sqlite3.connect(f"file:{store_path}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT local_version, content_id, started_at_ms FROM events")
        events = {int(v): (str(c), int(s)) for v, c, s in rows}
        pending = int(
            conn.execute("SELECT coalesce(sum(views), 0) FROM pending_views").fetchone()[0]
        )
    conn.close()
    assert not tmp.exists(), "the reopen left a temp index file behind"
    return Reopened(versions, events, observed, outcome, cosine, leftover_tmp, pending)


# ---------------------------------------------------------------------------------- the loop


def read_log(path: Path, *, delete: bool = False) -> list[dict[str, Any]]:
    """The worker's complete log lines (a torn last line, if any, is ignored)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().split("\n"):
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    if delete:
        path.unlink()
    return records


def global_pattern(i: int, round_: int) -> patterns_pb2.GlobalPattern:
    rng = np.random.default_rng(i + 1000 * round_)
    v = rng.standard_normal(384).astype(np.float32)
    return patterns_pb2.GlobalPattern(
        pattern_key=f"r{round_}-k{i:03d}",
        embedding=encode_embedding(v / np.linalg.norm(v)),
        quality=0.4 * round_ - i / 1000,
        source_count=5,
        success_rate=0.9,
        context=patterns_pb2.PatternContext(
            time_slot=patterns_pb2.TIME_SLOT_EVENING, day_type=patterns_pb2.DAY_TYPE_WEEKEND
        ),
        round=round_,
    )


async def publish_round(shard: RunningServer, round_: int) -> None:
    """A federation round: 16 global patterns (more than one answer's budget: they arrive in
    parts), trends and item factors for 40 items."""
    rng = np.random.default_rng(round_)
    factors = []
    for i in range(40):
        row = patterns_pb2.ItemFactorRow(content_id=f"c{(i * 7 + round_) % 300:04d}")
        row.factor.CopyFrom(encode_embedding(rng.standard_normal(4).astype(np.float32)))
        factors.append(row)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{shard.federation_port}") as channel:
        await federation_pb2_grpc.FederationStub(channel).PublishRound(
            federation_pb2.PublishRoundRequest(
                round=round_,
                patterns=[global_pattern(i, round_) for i in range(16)],
                trending=[
                    patterns_pb2.TrendingContent(
                        content_id=f"c{(i + round_) % 300:04d}", score=30.0 - i
                    )
                    for i in range(30)
                ],
                item_factors=factors,
                factors=4,
            )
        )


def write_shard_catalog(path: Path, cat: Variant) -> None:
    np.savez(
        path,
        content_ids=np.array(cat.ids),
        titles=np.array(cat.titles),
        genres=np.array(["|".join(g) for g in cat.genres]),
        embeddings=cat.embeddings,
    )


def kill_delay_ms(rng: random.Random) -> float:
    """When to kill, from the fork: mostly while the brain works, sometimes while it opens."""
    if rng.random() < 0.1:
        return rng.uniform(0.0, 40.0)
    return rng.uniform(30.0, 220.0)


class ForkServer:
    """The fork server of `brain_crash_child`: one call of `life` runs one worker life."""

    def __init__(self, process: asyncio.subprocess.Process, stderr: Path) -> None:
        self._process = process
        self._stderr = stderr

    @classmethod
    @contextlib.asynccontextmanager
    async def started(cls, tmp_path: Path) -> AsyncIterator[ForkServer]:
        """Start it (one thread per numeric library: two shared cores) and stop it after."""
        stderr_path = tmp_path / "fork_server.stderr"
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "GRPC_ENABLE_FORK_SUPPORT": "false",
        }
        with stderr_path.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(CHILD),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env=env,
            )
        server = cls(process, stderr_path)
        try:
            ready = await server._answer()
            assert ready.get("ready"), stderr_path.read_text()
            yield server
        finally:
            if process.stdin is not None:
                process.stdin.close()
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()  # our own fork server, by its handle
                await process.wait()

    async def life(self, command: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Run one life; returns how it ended and its log (which is then deleted).

        Raises:
            AssertionError: the worker failed (an exception in a brain call).
        """
        stdin = self._process.stdin
        assert stdin is not None
        stdin.write((json.dumps(command) + "\n").encode())
        await stdin.drain()
        answer = await self._answer()
        records = read_log(Path(command["log"]), delete=True)
        failures = [r["failed"] for r in records if "failed" in r]
        assert not failures, f"the worker failed:\n{failures[0]}"
        return answer, records

    async def _answer(self) -> dict[str, Any]:
        stdout = self._process.stdout
        assert stdout is not None
        line = await asyncio.wait_for(stdout.readline(), 60)
        assert line, f"the fork server ended: {self._stderr.read_text()[-2000:]}"
        answer: dict[str, Any] = json.loads(line)
        return answer


async def start_crash_shard(
    start_shard: StartShard, database_url: str, catalog_path: Path
) -> RunningServer:
    """A shard whose catalog file is ``catalog_path`` (the base catalog for now)."""
    write_shard_catalog(catalog_path, variant("S", 0))
    return await start_shard(database_url=database_url, catalog_path=catalog_path)


async def run_crash_loop(
    start_shard: StartShard, database_url: str, tmp_path: Path, *, iterations: int, seed: int
) -> Report:
    """Kill a brain ``iterations`` times and check every reopen (see the module docstring)."""
    rng = random.Random(seed)
    report = Report()
    began = time.monotonic()
    shard_catalog = tmp_path / "shard_catalog.npz"
    shard = await start_crash_shard(start_shard, database_url, shard_catalog)
    base = variant("S", 0)
    catalogs: dict[str, Variant] = {base.fingerprint: base}
    shard_fps = {shard.service.catalog.version: base.fingerprint}
    local_fps: set[str] = set()
    store_path = tmp_path / "brain.db"
    state = Versions()
    acknowledged: dict[int, tuple[str, int]] = {}  # observes that returned (or were stored)
    shard_version = 0
    round_ = 0
    async with ForkServer.started(tmp_path) as server:
        conn = await asyncpg.connect(database_url)
        try:
            for life in range(iterations):
                if life % 20 == 10:  # the shard's catalog changes: five items, a new version
                    cat = variant("S", report.shard_catalog_changes + 1)
                    catalogs[cat.fingerprint] = cat
                    write_shard_catalog(shard_catalog, cat)
                    await shard.service.start()  # reloads a changed catalog file
                    shard_fps[shard.service.catalog.version] = cat.fingerprint
                    report.shard_catalog_changes += 1
                if life % 15 == 7:
                    round_ += 1
                    await publish_round(shard, round_)
                    report.rounds_published += 1
                answer, records = await server.life(
                    {
                        "store": str(store_path),
                        "log": str(tmp_path / f"life-{life}.log"),
                        "target": f"127.0.0.1:{shard.port}",
                        "seed": rng.randrange(1 << 30),
                        "generation": life * 1000,
                        "max_ops": 10_000,
                        "mix": "viewing" if rng.random() < 0.25 else "mixed",
                        "kill_after_ms": kill_delay_ms(rng),
                    }
                )
                assert answer.get("killed"), f"life {life}: the worker was not killed: {answer}"
                report.kills += 1
                for r in records:
                    if r.get("begin") == "load_catalog" and str(r["expect"]) not in catalogs:
                        catalogs[str(r["expect"])] = variant("L", int(r["generation"]))
                        local_fps.add(str(r["expect"]))
                damage = DAMAGE[life % len(DAMAGE)]
                found = await asyncio.to_thread(
                    reopen, store_path, catalogs, damage, rng.randrange(1 << 30)
                )
                row = await conn.fetchval(
                    "SELECT last_local_version FROM devices WHERE device_id = $1", DEVICE_ID
                )
                now_shard = int(row or 0)
                point = check_life(
                    life,
                    state,
                    records,
                    found,
                    acknowledged,
                    shard_version,
                    now_shard,
                    shard_fps,
                    local_fps,
                )
                assert damage is None or found.index_outcome != "loaded", (
                    f"life {life}: a damaged index file ({damage}) was used"
                )
                report.record(point, damage, found, records)
                # Views counted by the shard plus views still pending, minus views observed:
                # 0 when every view is counted exactly once (measured here; asserted by
                # test_views_are_counted_once_across_a_kill_after_the_shard_applied).
                views = await conn.fetchval("SELECT coalesce(sum(views), 0) FROM content_views")
                surplus = int(views) + found.pending_views - len(acknowledged)
                if surplus != report.view_surplus:
                    report.view_surplus_changes[point] += 1
                report.view_surplus = surplus
                state = found.versions
                shard_version = now_shard
                report.iterations += 1
        finally:
            await conn.close()
    report.final = state
    report.seconds = time.monotonic() - began
    return report


def check_life(
    life: int,
    before: Versions,
    records: list[dict[str, Any]],
    found: Reopened,
    acknowledged: dict[int, tuple[str, int]],
    shard_before: int,
    shard_now: int,
    shard_fps: dict[int, str],
    local_fps: set[str],
) -> str:
    """Check one reopen against the life's log; returns where the kill landed.

    ``acknowledged`` (every observe known stored) is updated in place.
    """
    where = f"life {life}"
    last = before
    in_flight: dict[str, Any] | None = None
    opened = False
    for r in records:
        if "begin" in r:
            in_flight = r
        elif "done" in r:
            op = str(r["done"])
            assert in_flight is not None and in_flight["begin"] == op, (where, r)
            now = Versions.of(r)
            # What the brain reported never went backwards (load_catalog resets the
            # catalog version by design: a local catalog has version 0).
            assert now.local >= last.local, (where, "local_version went back", last, r)
            assert now.acked >= last.acked, (where, "acked_version went back", last, r)
            assert now.glob >= last.glob, (where, "global_version went back", last, r)
            assert now.model >= last.model, (where, "model_version went back", last, r)
            if op != "load_catalog":
                assert now.catalog >= last.catalog, (where, "catalog_version went back", r)
            if op == "observe":
                version = int(r["version"])
                assert now.local == version, (where, r)
                acknowledged[version] = (str(in_flight["content"]), int(in_flight["started"]))
            if op == "open":
                assert now == before, (where, "reopened differently than checked", before, r)
                opened = True
            last = now
            in_flight = None
    point = "between calls" if in_flight is None else str(in_flight["begin"])
    if not opened:
        point = "open"
    got = found.versions
    # Versions never go backwards across the kill.
    assert got.local >= last.local, (where, "local_version went back", last, got)
    assert got.acked >= last.acked, (where, "acked_version went back", last, got)
    assert got.glob >= last.glob, (where, "global_version went back", last, got)
    assert got.model >= last.model, (where, "model_version went back", last, got)
    if not (in_flight is not None and in_flight["begin"] == "load_catalog"):
        assert got.catalog >= last.catalog, (where, "catalog_version went back", last, got)
    # Nothing acknowledged is lost; at most the observe in flight is added. (A sync may bump
    # the local version too, without an event: a model update with no new viewing needs a
    # version of its own.)
    observing = in_flight is not None and in_flight["begin"] == "observe"
    bumping = observing or (in_flight is not None and in_flight["begin"] == "sync")
    assert got.local <= last.local + int(bumping), (where, "unexpected local version", got)
    if observing and in_flight is not None and int(in_flight["version"]) in found.events:
        assert got.local == int(in_flight["version"]), (where, "event without its version")
        acknowledged[got.local] = (str(in_flight["content"]), int(in_flight["started"]))
        point = "observe (stored)"
    missing = {v: e for v, e in acknowledged.items() if found.events.get(v) != e}
    assert not missing, (where, "acknowledged observes lost", sorted(missing)[:10])
    assert set(found.events) == set(acknowledged), (where, "events nobody observed")
    assert found.events_observed == len(acknowledged), (where, found.events_observed)
    # Every acknowledged sync stays acknowledged on both sides.
    assert shard_now >= shard_before, (where, "the shard's version went back")
    assert shard_now >= got.acked, (where, "brain acked past the shard", shard_now, got)
    if in_flight is not None and in_flight["begin"] == "sync" and shard_now > got.acked:
        point = "sync (shard applied, ack not stored)" if shard_now > shard_before else point
    # The catalog is the one before or after the call in flight, its version names it, and
    # the index rows are its vectors (whether the index file was used or rebuilt).
    allowed = {last.fp}
    if in_flight is not None and in_flight["begin"] == "load_catalog":
        allowed.add(str(in_flight["expect"]))
    if in_flight is not None and in_flight["begin"] == "fetch_catalog":
        allowed.add(shard_fps[max(shard_fps)])
    assert got.fp in allowed, (where, "catalog is neither before nor after", got.fp, allowed)
    if got.catalog > 0:
        assert shard_fps.get(got.catalog) == got.fp, (where, "catalog version/catalog", got)
    elif got.fp:
        assert got.fp in local_fps, (where, "a shard's catalog with version 0", got)
    assert found.min_row_cosine >= MIN_ROW_COSINE, (where, "index rows", found.min_row_cosine)
    assert found.index_outcome != "no catalog" or not got.fp, where
    return point


# ---------------------------------------------------------------------------------- tests


@pytest.mark.timeout(240)
async def test_brain_survives_sigkill_at_random_points(
    start_shard: StartShard, database_url: str, tmp_path: Path
) -> None:
    report = await run_crash_loop(start_shard, database_url, tmp_path, iterations=200, seed=20250)
    print(report.summary())
    assert report.kills == 200
    # The kills land in every kind of call (the seed is fixed: a regression in spread shows).
    for point in ("observe", "sync", "fetch_catalog", "load_catalog"):
        assert any(p.startswith(point) for p in report.kill_points), report.summary()
    assert report.final.local > 0 and report.final.acked > 0 and report.final.model > 0


@pytest.mark.chaos
@long_only
@pytest.mark.timeout(900)
async def test_chaos_brain_survives_1000_sigkills(
    start_shard: StartShard, database_url: str, tmp_path: Path
) -> None:
    seed = int(os.environ.get("OMEGA_CHAOS_SEED", "7"))
    report = await run_crash_loop(start_shard, database_url, tmp_path, iterations=1000, seed=seed)
    print(report.summary())
    assert report.kills == 1000


@pytest.mark.timeout(120)
async def test_views_are_counted_once_across_a_kill_after_the_shard_applied(
    start_shard: StartShard, database_url: str, tmp_path: Path
) -> None:
    shard = await start_crash_shard(start_shard, database_url, tmp_path / "shard_catalog.npz")
    store_path = tmp_path / "brain.db"
    common = {
        "store": str(store_path),
        "target": f"127.0.0.1:{shard.port}",
        "seed": 1,
        "generation": 0,
        "mix": "mixed",
        "kill_after_ms": 60_000,
    }
    async with ForkServer.started(tmp_path) as server:
        # Three viewings; the worker dies the moment the shard has answered their sync.
        first, _ = await server.life(
            {
                **common,
                "log": str(tmp_path / "life-0.log"),
                "script": ["fetch_catalog", "observe", "observe", "observe", "sync"],
                "die_after_reply": True,
            }
        )
        assert first["killed"], first
        # The next life views once more and syncs normally.
        second, records = await server.life(
            {**common, "log": str(tmp_path / "life-1.log"), "script": ["observe", "sync"]}
        )
        assert second["exit_code"] == 0 and not second["killed"], second
    synced = [r for r in records if r.get("done") == "sync"]
    assert synced and synced[0]["ok"] and synced[0]["acked"] == synced[0]["local"] == 4
    found = await asyncio.to_thread(reopen, store_path, {}, None, 0)
    assert found.events_observed == 4 and found.pending_views == 0
    conn = await asyncpg.connect(database_url)
    try:
        views = await conn.fetchval("SELECT coalesce(sum(views), 0) FROM content_views")
    finally:
        await conn.close()
    assert views == 4  # each viewing counted once (fails: 7, the first three twice)
