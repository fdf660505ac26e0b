"""Shared fixtures: a real Postgres (127.0.0.1:5432 when it answers, else embedded)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from omega_common.db import create_database, drop_database, embedded_postgres_dsn, with_database

LOCAL_POSTGRES = os.environ.get(
    "OMEGA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="session")
async def pg_admin_dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    """DSN of a maintenance database on a real server."""
    try:
        conn = await asyncpg.connect(LOCAL_POSTGRES, timeout=3)
    except (OSError, asyncpg.PostgresError):
        pgdata = tmp_path_factory.mktemp("pg") / "data"
        return embedded_postgres_dsn("postgres", pgdata)
    await conn.close()
    return LOCAL_POSTGRES


@pytest.fixture
async def make_database(pg_admin_dsn: str) -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """Factory of fresh, empty databases, all dropped after the test."""
    names: list[str] = []

    async def make() -> str:
        name = f"omega_test_{uuid.uuid4().hex[:12]}"
        await create_database(pg_admin_dsn, name)
        names.append(name)
        return with_database(pg_admin_dsn, name)

    yield make
    for name in names:
        await drop_database(pg_admin_dsn, name)


@pytest.fixture
async def database_url(make_database: Callable[[], Awaitable[str]]) -> str:
    """A fresh, empty database for one test, dropped afterwards."""
    return await make_database()
