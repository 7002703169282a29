"""``db.autocommit`` keeps a few connections between uses instead of checking
each one in and out of the pool (``channels_core.db``), on the ``database``
fixture's real SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from channels_core import db

pytestmark = pytest.mark.timeout(60)


@contextlib.contextmanager
def _checkouts(engine: AsyncEngine) -> Iterator[list[int]]:
    """Count the pool's checkouts while the block runs."""
    seen: list[int] = []

    def _count(*_: Any) -> None:
        seen.append(1)

    event.listen(engine.sync_engine, "checkout", _count)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "checkout", _count)


async def _driver(conn: AsyncConnection) -> Any:
    return (await conn.get_raw_connection()).driver_connection


async def test_a_connection_used_a_moment_ago_is_used_again_without_a_checkout(
    database: str,
) -> None:
    engine = db.get_engine(autocommit=True)
    async with db.autocommit() as conn:
        first = await _driver(conn)
    with _checkouts(engine) as seen:
        async with db.autocommit() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
            again = await _driver(conn)
    assert again is first
    assert seen == []


async def test_a_connection_whose_block_raised_goes_back_to_the_pool(database: str) -> None:
    await db.dispose()  # nothing kept by earlier tests on this loop: a clean pool
    engine = db.get_engine(autocommit=True)
    with pytest.raises(DBAPIError):
        async with db.autocommit() as conn:
            failed = await _driver(conn)
            await conn.execute(text("SELECT * FROM no_such_table"))
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    with _checkouts(engine) as seen:
        async with db.autocommit() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    # Checked out of the pool afresh (SQLite's pool may hand back the same one).
    assert seen == [1]
    assert failed is not None


async def test_a_connection_kept_past_the_ping_interval_is_pinged_before_use(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not db.is_postgres():
        pytest.skip("pings are PostgreSQL's (the pool's checkout listener)")
    engine = db.get_engine(autocommit=True)
    async with db.autocommit():
        pass
    pings: list[Any] = []
    dialect = engine.sync_engine.dialect
    real_ping = dialect.do_ping

    def _ping(dbapi_connection: Any) -> bool:
        pings.append(dbapi_connection)
        return real_ping(dbapi_connection)

    monkeypatch.setattr(dialect, "do_ping", _ping)
    async with db.autocommit() as conn:
        assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    assert pings == [], "used a moment ago: no ping"
    monkeypatch.setattr(db, "PING_IDLE_AFTER", 0.0)
    async with db.autocommit() as conn:
        assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    assert len(pings) == 1


async def test_no_more_than_keep_are_kept_and_dispose_returns_them(database: str) -> None:
    engine = db.get_engine(autocommit=True)
    pool = engine.sync_engine.pool
    async with contextlib.AsyncExitStack() as stack:
        held = [await stack.enter_async_context(db.autocommit()) for _ in range(db.KEEP + 2)]
        for conn in held:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
        assert pool.checkedout() == db.KEEP + 2  # type: ignore[attr-defined]
    assert pool.checkedout() == db.KEEP  # type: ignore[attr-defined]
    await db.dispose()
    assert pool.checkedout() == 0  # type: ignore[attr-defined]
    assert all(conn.closed for conn in held)


async def test_kept_connections_are_dropped_once_one_finds_its_server_gone(
    database: str,
) -> None:
    """A restarted server leaves every kept connection dead; the first use
    fails, as it would on a pooled connection used a moment ago, and the
    next goes to a fresh one instead of failing on the next dead one."""
    if not db.is_postgres():
        pytest.skip("server-side disconnects are PostgreSQL's")
    async with contextlib.AsyncExitStack() as stack:
        held = [await stack.enter_async_context(db.autocommit()) for _ in range(2)]
        pids = [(await conn.execute(text("SELECT pg_backend_pid()"))).scalar() for conn in held]
    async with db.session() as s:
        for pid in pids:
            await s.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    with pytest.raises(DBAPIError):
        async with db.autocommit() as conn:
            await conn.execute(text("SELECT 1"))
    async with db.autocommit() as conn:
        assert (await conn.execute(text("SELECT pg_backend_pid()"))).scalar() not in pids


def test_a_loop_ended_without_dispose_leaves_its_engine_to_the_collector(database: str) -> None:
    """Kept connections belong to their loop, as its engines do: a loop an
    application ends without ``db.dispose()`` does not keep its engine, pool
    and connections alive for the rest of the process. In a fresh
    interpreter, so that nothing of this session holds on to them.

    PostgreSQL only: aiosqlite's connection threads hold their loop, and
    with it the loop's engines, until the connections are closed.
    """
    if not database.startswith("postgresql"):
        pytest.skip("aiosqlite's threads keep an undisposed loop alive anyway")
    script = textwrap.dedent(
        """
        import asyncio, gc, warnings, weakref
        from sqlalchemy import text
        from channels_core import db

        async def use():
            async with db.autocommit() as conn:
                await conn.execute(text("SELECT 1"))
            return weakref.ref(db.get_engine(autocommit=True))

        engines = [asyncio.run(use()) for _ in range(3)]
        # SQLAlchemy warns of the checked-out connections the collector takes.
        warnings.simplefilter("ignore")
        gc.collect()
        print(sum(ref() is not None for ref in engines))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "CHANNELS_DATABASE_URL": database},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0", "engines still alive after the collector ran"


async def test_a_cancelled_statement_leaves_the_other_kept_connections_kept(
    database: str,
) -> None:
    """SQLAlchemy reports a cancelled statement as a disconnect; the server
    is still there, so only the cancelled connection is given up."""
    if not db.is_postgres():
        pytest.skip("server-side statements to cancel are PostgreSQL's")
    async with contextlib.AsyncExitStack() as stack:
        held = [await stack.enter_async_context(db.autocommit()) for _ in range(2)]
        drivers = [await _driver(conn) for conn in held]

    cancelled: list[Any] = []

    async def sleep() -> None:
        async with db.autocommit() as conn:
            cancelled.append(await _driver(conn))
            await conn.execute(text("SELECT pg_sleep(5)"))

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(sleep(), 0.3)
    [other] = [d for d in drivers if d is not cancelled[0]]
    async with db.autocommit() as conn:
        assert await _driver(conn) is other


async def test_a_connection_in_use_while_its_engine_is_disposed_is_closed_not_kept(
    database: str,
) -> None:
    engine = db.get_engine(autocommit=True)
    async with db.autocommit() as conn:
        assert (await conn.execute(text("SELECT 1"))).scalar() == 1
        await db.dispose()
    assert conn.closed
    assert not db._kept.get(asyncio.get_running_loop(), {}).get(engine)
