"""Shared fixtures: real databases, isolated per test.

The API suite runs once on SQLite and once on the embedded PostgreSQL (the
``database`` fixture is parametrized). Servers started here live under a
temporary ``CHANNELS_HOME`` and are stopped by PID when the session ends.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

# Before anything reads settings: this test session's own home for the
# embedded servers, and loopback allowed explicitly for the HTTP transport.
_HOME = Path(tempfile.mkdtemp(prefix="channels-test-"))
os.environ["CHANNELS_HOME"] = str(_HOME)
os.environ.setdefault("CHANNELS_EGRESS_ALLOW_CIDRS", "127.0.0.0/8")
for _var in ("CHANNELS_DATABASE_URL", "CHANNELS_BROKER_URL", "CHANNELS_QUEUE_URL"):
    os.environ.pop(_var, None)

from channels_core import db, embedded, migrate, shared_redis  # noqa: E402
from channels_core.dispatch import MemoryDispatcher, set_dispatcher  # noqa: E402
from channels_core.models import Base  # noqa: E402
from channels_core.settings import configure  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _embedded_home() -> Iterator[Path]:
    yield _HOME
    configure(None)
    embedded.stop()
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
async def _close_pools() -> AsyncIterator[None]:
    """Close the session loop's pools last, so no connection is left to the collector."""
    yield
    await shared_redis.aclose()
    await db.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> str:
    return embedded.ensure_postgres().url


@pytest.fixture(scope="session")
def broker_url() -> str:
    return embedded.ensure_valkey().url


def _migrated(url: str) -> str:
    configure(database_url=url)
    migrate.upgrade()
    return url


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated database URL: SQLite file or the embedded PostgreSQL."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("sqlite") / "channels.db"
        return _migrated(f"sqlite:///{path}")
    return _migrated(request.getfixturevalue("postgres_url"))


async def _truncate() -> None:
    tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
    async with db.session() as s, s.begin():
        if db.is_postgres():
            await s.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        else:
            for name in tables:
                await s.execute(text(f"DELETE FROM {name}"))
            # Tables use AUTOINCREMENT (ids are never reused), so this exists.
            await s.execute(text("DELETE FROM sqlite_sequence"))


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[str]:
    """An empty, migrated database for one test; routing jobs are recorded, not sent."""
    configure(database_url=database_url, egress_allow_cidrs="127.0.0.0/8")
    await _truncate()
    dispatcher = MemoryDispatcher()
    set_dispatcher(dispatcher)
    yield database_url
    set_dispatcher(None)


@pytest.fixture
def dispatcher(database: str) -> MemoryDispatcher:
    from channels_core.dispatch import get_dispatcher

    found = get_dispatcher()
    assert isinstance(found, MemoryDispatcher)
    return found
