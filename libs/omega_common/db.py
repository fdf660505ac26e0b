"""Postgres helpers: DSN resolution (with an embedded fallback), databases and migrations.

The embedded Postgres is `pgserver` (PyPI), which bundles PostgreSQL 16 binaries, starts in
under a second and listens on a unix socket inside its data folder; it is used only when no DSN
is configured. Several processes may share one data folder: pgserver reference-counts its
users and stops the server when the last one exits.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg

from omega_common.errors import UnavailableError

__all__ = [
    "DATABASE_UNAVAILABLE_ERRORS",
    "apply_migrations",
    "cache_dir",
    "create_database",
    "drop_database",
    "embedded_postgres_dsn",
    "is_database_unavailable",
    "load_migrations",
    "with_database",
]

DATABASE_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    # A pooled connection killed mid-protocol surfaces as "cannot switch to state ...".
    asyncpg.exceptions.InternalClientError,
)
"""Exceptions that mean "the database is down or unreachable" (mapped to UNAVAILABLE)."""

# SQLSTATE classes of an outage: 08 connection exception, 53 insufficient resources, 57P
# operator intervention (shutdown, cannot connect now, database dropped), and 55000 raised on
# connect to a database that is not accepting connections.
_UNAVAILABLE_SQLSTATE_PREFIXES = ("08", "53", "57P", "55000")


def is_database_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means the database is down or unreachable (the client should retry)."""
    if isinstance(exc, DATABASE_UNAVAILABLE_ERRORS):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    return (
        isinstance(exc, asyncpg.PostgresError)
        and isinstance(sqlstate, str)
        and (sqlstate.startswith(_UNAVAILABLE_SQLSTATE_PREFIXES))
    )


_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_MIGRATION_LOCK_KEY = 0x0E6A_0001  # pg_advisory_xact_lock key serializing migrators


def cache_dir() -> Path:
    """``$OMEGA_CACHE_DIR`` or ``~/.cache/exogenesis-omega``, created on demand."""
    path = Path(os.environ.get("OMEGA_CACHE_DIR") or Path.home() / ".cache" / "exogenesis-omega")
    path.mkdir(parents=True, exist_ok=True)
    return path


def embedded_postgres_dsn(database: str = "postgres", pgdata: Path | None = None) -> str:
    """Start (or join) the embedded Postgres and return a DSN for ``database``.

    The server keeps running while this process lives (pgserver stops it when its last user
    exits). The database is not created here: see `create_database`.

    Args:
        database: database name for the returned DSN.
        pgdata: data folder; defaults to ``<cache>/pgdata``.

    Raises:
        UnavailableError: when pgserver cannot start the server.
    """
    import pgserver  # imported lazily: only needed on machines without a configured server

    folder = pgdata or cache_dir() / "pgdata"
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        server = pgserver.get_server(folder, cleanup_mode="stop")  # type: ignore[attr-defined]
    except Exception as exc:  # pgserver raises plain exceptions from its subprocess calls
        raise UnavailableError(f"cannot start the embedded Postgres in {folder}: {exc}") from exc
    _EMBEDDED_SERVERS.append(server)  # keep the handle alive for the process lifetime
    uri: str = server.get_uri(database)
    return uri


_EMBEDDED_SERVERS: list[Any] = []


def with_database(dsn: str, database: str) -> str:
    """The same server as ``dsn`` but another database (handles unix-socket DSNs too)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def _check_identifier(name: str) -> str:
    if not _IDENT.match(name):
        raise ValueError(f"invalid database name {name!r}: use [a-z_][a-z0-9_]*")
    return name


async def create_database(admin_dsn: str, name: str) -> str:
    """Create database ``name`` unless it exists; returns its DSN.

    Raises:
        ValueError: ``name`` is not a plain lower-case identifier.
    """
    _check_identifier(name)
    conn = await asyncpg.connect(admin_dsn)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            # Another process may create it concurrently.
            with contextlib.suppress(asyncpg.exceptions.DuplicateDatabaseError):
                await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(admin_dsn, name)


async def drop_database(admin_dsn: str, name: str) -> None:
    """Drop database ``name`` if it exists, closing its other sessions first."""
    _check_identifier(name)
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def load_migrations(package: str) -> list[tuple[int, str, str]]:
    """Read ``NNN_name.sql`` files from ``package``'s ``migrations`` folder.

    Returns:
        ``(version, name, sql)`` sorted by version.

    Raises:
        ValueError: two files share a version number.
    """
    found: dict[int, tuple[int, str, str]] = {}
    for entry in resources.files(package).joinpath("migrations").iterdir():
        match = re.match(r"^(\d+)_(\w+)\.sql$", entry.name)
        if not match:
            continue
        version = int(match.group(1))
        if version in found:
            raise ValueError(f"duplicate migration version {version} in {package}")
        found[version] = (version, match.group(2), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def apply_migrations(
    conn: asyncpg.Connection, migrations: Sequence[tuple[int, str, str]]
) -> list[int]:
    """Apply the migrations not yet recorded in ``schema_migrations``, each in a transaction.

    Concurrent callers (several replicas starting at once) are serialized with a transaction
    advisory lock, so each migration runs exactly once.

    Returns:
        The versions applied by this call.
    """
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in migrations:
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
            )
            applied.append(version)
    return applied
