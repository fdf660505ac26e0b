"""Integration fixtures: constellation replicas on free loopback ports over real databases."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from omega.v1 import sync_pb2_grpc
from omega_constellation.server import RunningServer, start_server
from omega_constellation.settings import ConstellationSettings

pytestmark = pytest.mark.integration

StartShard = Callable[..., Awaitable[RunningServer]]


def write_catalog(path: Path, n: int = 50, seed: int = 7) -> tuple[list[str], np.ndarray]:
    """A small random catalog file; returns (ids, (n, 384) float32 unit embeddings)."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, 384)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = [f"c{i:04d}" for i in range(n)]
    np.savez(
        path,
        content_ids=np.array(ids),
        titles=np.array([f"Title {i}" for i in range(n)]),
        genres=np.array(["Drama|Comedy" if i % 2 else "Sci-Fi" for i in range(n)]),
        embeddings=emb,
    )
    return ids, emb


@pytest.fixture
async def start_shard(make_database: object) -> AsyncIterator[StartShard]:
    """Factory starting replicas; each call may pass settings overrides.

    Depends on ``make_database`` so that replicas stop before their databases are dropped.
    """
    started: list[RunningServer] = []

    async def start(**overrides: Any) -> RunningServer:
        # Plaintext and no credentials unless a test asks (test_security.py covers both).
        values: dict[str, Any] = {
            "port": 0,
            "federation_port": 0,
            "log_json": True,
            "export_settle_ms": 0,
            "plaintext": True,
            "auth": False,
            "min_published_sources": 1,  # tests publish patterns of a few devices
        }
        values.update(overrides)
        running = await start_server(ConstellationSettings(**values))
        started.append(running)
        return running

    yield start
    for running in started:
        await running.stop()


@pytest.fixture
async def shard(start_shard: StartShard, database_url: str, tmp_path: Path) -> RunningServer:
    """One shard (id shard-0 of a one-shard map) with a 50-item catalog."""
    write_catalog(tmp_path / "catalog.npz")
    return await start_shard(database_url=database_url, catalog_path=tmp_path / "catalog.npz")


@pytest.fixture
async def stub(shard: RunningServer) -> AsyncIterator[sync_pb2_grpc.ConstellationSyncStub]:
    """An aio client stub connected to ``shard``."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{shard.port}") as channel:
        yield sync_pb2_grpc.ConstellationSyncStub(channel)
