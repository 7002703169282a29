"""Engines and sessions for the configured database.

One URL serves both faces: the async engine (psycopg 3 or aiosqlite) used by
the Python API and the workers, and the sync engine used by Alembic. An
async engine's connections belong to the event loop that opened them, so
engines are kept per loop: ``asyncio.run`` twice, or the producer's private
loop beside an application's, each get their own pool.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from channels_core import embedded
from channels_core.errors import ConfigurationError

__all__ = [
    "async_url",
    "sync_url",
    "get_engine",
    "get_sync_engine",
    "session",
    "dispose",
    "is_postgres",
]

_engines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncEngine] = (
    weakref.WeakKeyDictionary()
)
_sync_engine: Engine | None = None
_url: str | None = None
# Engines of a previous URL, kept until their loop can close them: an
# engine dropped without dispose() leaves connections to the collector.
_stale: list[tuple[asyncio.AbstractEventLoop, AsyncEngine]] = []


def _base_url() -> URL:
    raw = embedded.database_url()
    try:
        return make_url(raw)
    except Exception as exc:
        raise ConfigurationError(f"CHANNELS_DATABASE_URL is not a database URL: {raw!r}") from exc


def async_url(url: URL | None = None) -> URL:
    url = url or _base_url()
    backend = url.get_backend_name()
    if backend == "postgresql":
        return url.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        return url.set(drivername="sqlite+aiosqlite")
    raise ConfigurationError(f"unsupported database {backend!r}: use postgresql or sqlite")


def sync_url(url: URL | None = None) -> URL:
    url = url or _base_url()
    backend = url.get_backend_name()
    if backend == "postgresql":
        return url.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        return url.set(drivername="sqlite")
    raise ConfigurationError(f"unsupported database {backend!r}: use postgresql or sqlite")


def insert(session: AsyncSession, table: Any) -> Any:
    """An INSERT with ``on_conflict_do_*`` for the session's backend."""
    from sqlalchemy.dialects import postgresql, sqlite

    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def is_postgres() -> bool:
    return _base_url().get_backend_name() == "postgresql"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Foreign keys are off by default in SQLite; WAL lets workers read while
    # another process writes, and busy_timeout waits instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _check_url_unchanged() -> None:
    global _url, _sync_engine
    current = str(_base_url())
    if _url != current:
        # Settings changed (tests switch databases): start afresh.
        _stale.extend(_engines.items())
        _engines.clear()
        if _sync_engine is not None:
            _sync_engine.dispose()
            _sync_engine = None
        _url = current


def get_engine() -> AsyncEngine:
    """The async engine of the running event loop, created on first use."""
    _check_url_unchanged()
    loop = asyncio.get_running_loop()
    engine = _engines.get(loop)
    if engine is None:
        url = async_url()
        kwargs: dict[str, Any] = {}
        if url.get_backend_name() == "postgresql":
            kwargs.update(pool_size=10, max_overflow=20, pool_pre_ping=True)
        engine = create_async_engine(url, **kwargs)
        # psycopg runs an executemany INSERT without RETURNING as one server
        # statement per row; batched into multi-row VALUES it is one per
        # thousand. (Inserts with ON CONFLICT batch only with RETURNING.)
        engine.sync_engine.dialect.use_insertmanyvalues_wo_returning = True
        if url.get_backend_name() == "sqlite":
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        _engines[loop] = engine
    return engine


def get_sync_engine() -> Engine:
    """A synchronous engine on the same database (migrations, admin)."""
    global _sync_engine
    _check_url_unchanged()
    if _sync_engine is None:
        url = sync_url()
        _sync_engine = create_engine(url, pool_pre_ping=True)
        if url.get_backend_name() == "sqlite":
            event.listen(_sync_engine, "connect", _sqlite_pragmas)
    return _sync_engine


@asynccontextmanager
async def session() -> AsyncIterator[AsyncSession]:
    """A session whose objects stay readable after commit."""
    if _stale:
        await _dispose_stale(asyncio.get_running_loop())
    maker = async_sessionmaker(get_engine(), expire_on_commit=False)
    async with maker() as s:
        yield s


async def _dispose_stale(loop: asyncio.AbstractEventLoop) -> None:
    mine = [engine for owner, engine in _stale if owner is loop]
    _stale[:] = [(owner, engine) for owner, engine in _stale if owner is not loop]
    for engine in mine:
        await engine.dispose()


async def dispose() -> None:
    """Close the running loop's pools (end of a CLI command, a test, a worker)."""
    loop = asyncio.get_running_loop()
    await _dispose_stale(loop)
    engine = _engines.pop(loop, None)
    if engine is not None:
        await engine.dispose()
