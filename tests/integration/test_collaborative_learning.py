"""Devices with planted co-watching structure teach it to each other over gRPC and Postgres.

Catalog: 40 items whose content embeddings say only "genre" (even vs odd item numbers). Viewers
co-watch across genres: cluster A is items 0-19, cluster B items 20-39. A device that watched
three even items of A must be recommended the rest of A (odd ones included) by the federated
model, while the content-only (genre) path recommends even items of either cluster.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest

from omega_brain import Brain, BrainConfig, CatalogIndex, GrpcTransport, ViewingEvent, fetch_catalog
from omega_federation.settings import FederationSettings
from omega_federation.state import WorkerState
from omega_federation.worker import run_round

from .conftest import StartShard

pytestmark = pytest.mark.integration

N_ITEMS = 40
EVENING = 1_795_300_000_000  # a Tuesday, 19:06 UTC
UNPACED = BrainConfig(honour_sync_pace=False)  # rounds run back to back, not at the pace


def _genre_catalog(path: Path) -> list[str]:
    rng = np.random.default_rng(11)
    genres = np.zeros((2, 384), dtype=np.float32)
    genres[0, 0] = genres[1, 1] = 1.0
    emb = genres[np.arange(N_ITEMS) % 2] + 0.05 * rng.standard_normal((N_ITEMS, 384))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    ids = [f"m{i:02d}" for i in range(N_ITEMS)]
    np.savez(
        path,
        content_ids=np.array(ids),
        titles=np.array([f"Movie {i}" for i in range(N_ITEMS)]),
        genres=np.array(["Drama" if i % 2 == 0 else "Comedy" for i in range(N_ITEMS)]),
        embeddings=emb,
    )
    return ids


def _watch(brain: Brain, items: list[int]) -> None:
    for n, i in enumerate(items):
        brain.observe(ViewingEvent(f"m{i:02d}", EVENING + n * 60_000, completion=1.0))


async def test_federated_model_learns_planted_co_watching(
    start_shard: StartShard, make_database: object, tmp_path: Path
) -> None:
    _genre_catalog(tmp_path / "catalog.npz")
    server = await start_shard(
        database_url=await make_database(),  # type: ignore[operator]
        catalog_path=tmp_path / "catalog.npz",
    )
    address = f"127.0.0.1:{server.port}"
    transport = GrpcTransport(address, plaintext=True)
    rng = np.random.default_rng(5)
    state = await WorkerState.open(await make_database())  # type: ignore[operator]
    internal = f"127.0.0.1:{server.federation_port}"
    channel = grpc.aio.insecure_channel(internal)
    settings = FederationSettings(
        shards={"shard-0": internal},
        min_sources=1,
        seed=1,
        patterns_enabled=False,  # only the model is released
        model_factors=2,
        model_active_items=N_ITEMS,
        model_noise_multiplier=0.0,
    )
    try:
        fetched = await asyncio.to_thread(fetch_catalog, transport)
        catalog = CatalogIndex(fetched.content_ids, fetched.embeddings)
        fleet = []
        watches: list[list[int]] = []
        for u in range(60):
            brain = Brain(f"tv-{u}", UNPACED, transport=transport, catalog=catalog)
            cluster = range(0, 20) if u % 2 == 0 else range(20, 40)
            watches.append([int(i) for i in rng.choice(list(cluster), size=8, replace=False)])
            _watch(brain, watches[-1])
            fleet.append(brain)
        probe = Brain(
            "tv-probe",
            BrainConfig(mmr_lambda=1.0, honour_sync_pace=False),
            transport=transport,
            catalog=catalog,
        )
        watches.append([0, 2, 4])
        _watch(probe, watches[-1])
        devices = [*fleet, probe]

        def sync_all() -> None:
            for d in devices:
                assert d.sync().ok

        genre_only = [int(r.content_id[1:]) for r in probe.recommend(10, timestamp_ms=EVENING)]
        for _ in range(4):  # create, then three steps
            await asyncio.to_thread(sync_all)  # contributions for the model each device holds
            report = await run_round(settings, state, {"shard-0": channel})
            assert report.model["model_action"] in ("created", "stepped")
            assert report.patterns_published == 0
            # Trending: the count release of the round that created the model, re-published.
            assert report.trending_published == 40
            await asyncio.to_thread(sync_all)  # fetch what the round published
        assert probe.stats().model_version == report.model["model_version"]
        learned = [int(r.content_id[1:]) for r in probe.recommend(10, timestamp_ms=EVENING)]
        trending = {t.content_id: t.score for t in (await server.service.store.load_global())[2]}
        newcomer = Brain("tv-new", BrainConfig(), transport=transport, catalog=catalog)
        assert (await asyncio.to_thread(newcomer.sync)).ok
        cold = [int(r.content_id[1:]) for r in newcomer.recommend(10, timestamp_ms=EVENING)]
        newcomer.close()
    finally:
        transport.close()
        await channel.close()
        await state.close()

    # Trending is the count release without noise: per item, the sum over devices of its unit
    # preference weight (full completions: 1 / sqrt(items watched)), decayed by seconds only.
    expected: dict[str, float] = {}
    for items in watches:
        for i in items:
            expected[f"m{i:02d}"] = expected.get(f"m{i:02d}", 0.0) + 1.0 / np.sqrt(len(items))
    assert trending.keys() == expected.keys()
    assert all(trending[c] == pytest.approx(v, rel=1e-3) for c, v in expected.items())
    # Cold start (no viewing at all): k items from that list.
    assert len(cold) == 10 and all(f"m{i:02d}" in trending for i in cold)
    # Genre-only: even items of either co-watch cluster, nothing of what A's viewers share.
    assert all(i % 2 == 0 for i in genre_only)
    assert sum(i >= 20 for i in genre_only) >= 3
    # The federated model: the rest of cluster A first, odd (other genre) items included.
    assert all(i < 20 for i in learned[:8])
    assert sum(i % 2 == 1 for i in learned[:8]) >= 3
