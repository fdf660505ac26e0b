"""Fixtures shared by the `omega-simulator fleet` integration tests (import them by name)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tools.fuzz.shard import ShardProcess, admin_dsn

__all__ = ["fleet_keys_file", "fleet_shard"]


@pytest.fixture(scope="module", name="fleet_keys")
def fleet_keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fleet-keys file with one fresh key (id ``k1``)."""
    path = tmp_path_factory.mktemp("keys") / "fleet-keys.json"
    path.write_text(json.dumps({"k1": base64.b64encode(os.urandom(32)).decode("ascii")}))
    return path


@pytest.fixture(scope="module", name="shard")
async def fleet_shard(
    tmp_path_factory: pytest.TempPathFactory, fleet_keys: Path
) -> AsyncIterator[ShardProcess]:
    """One shard process checking device tokens under ``fleet_keys``, with the default
    per-device rate limit (2/s): at 100x compression a device syncs every 3 s, under it."""
    work = tmp_path_factory.mktemp("shard")
    keys = await asyncio.to_thread(fleet_keys.read_text)
    shard = await ShardProcess.start(
        await admin_dsn(),
        work,
        {"OMEGA_CONSTELLATION_AUTH": "true", "OMEGA_CONSTELLATION_FLEET_KEYS": keys},
        auth=False,
    )
    try:
        yield shard
    finally:
        await shard.stop()
