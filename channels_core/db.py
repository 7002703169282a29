"""Engines and sessions for the configured database.

One URL serves both faces: the async engine (psycopg 3 or aiosqlite) used by
the Python API and the workers, and the sync engine used by Alembic. An
async engine's connections belong to the event loop that opened them, so
engines are kept per loop: ``asyncio.run`` twice, or the producer's private
loop beside an application's, each get their own pool.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import cache
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Engine,
    Integer,
    Text,
    any_,
    bindparam,
    cast,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
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
    "one_of",
    "one_of_param",
    "one_of_value",
    "unnest",
    "arrays",
    "constant",
    "autocommit",
    "insert_rows",
    "insert_rows_statement",
    "existing_ids",
]

# Per event loop, an engine for transactions (False) and one whose
# connections are in autocommit (True).
_engines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[bool, AsyncEngine]] = (
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


def one_of(column: Any, values: Sequence[Any]) -> ColumnElement[bool]:
    """``column IN (values)``, as each backend runs it best.

    PostgreSQL gets one array parameter (``= ANY(...)``): the statement's
    text is the same for 3 ids or 300, so psycopg keeps it parsed and
    prepared, where an expanded IN list is a new statement of hundreds of
    placeholders that psycopg re-parses in Python on every execute.
    """
    matches: ColumnElement[bool]
    if is_postgres():
        matches = column == any_(array_bind(None, column.type, values))
    else:
        matches = column.in_(list(values))
    return matches


def one_of_param(column: Any, name: str, postgres: bool) -> ColumnElement[bool]:
    """``one_of`` with its values given at execute (``one_of_value`` makes
    them), for a statement built once per backend."""
    matches: ColumnElement[bool]
    if postgres:
        matches = column == any_(array_bind(name, column.type))
    else:
        matches = column.in_(bindparam(name, expanding=True))
    return matches


def one_of_value(column: Any, values: Sequence[Any], postgres: bool) -> Any:
    """The parameter of ``one_of_param(column, ...)`` for ``values``."""
    return array_value(column.type, values) if postgres else list(values)


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
        _stale.extend((loop, e) for loop, pair in _engines.items() for e in pair.values())
        _engines.clear()
        if _sync_engine is not None:
            _sync_engine.dispose()
            _sync_engine = None
        _url = current


def get_engine(*, autocommit: bool = False) -> AsyncEngine:
    """The async engine of the running event loop, created on first use.

    With ``autocommit``, an engine of its own whose connections stay in
    autocommit: switching a pooled connection in and out of it cost as much
    CPU as the statement it ran.
    """
    _check_url_unchanged()
    loop = asyncio.get_running_loop()
    pair = _engines.get(loop)
    if pair is None:
        pair = _engines[loop] = {}
    engine = pair.get(autocommit)
    if engine is None:
        url = async_url()
        kwargs: dict[str, Any] = {}
        if autocommit:
            kwargs.update(isolation_level="AUTOCOMMIT")
        if url.get_backend_name() == "postgresql":
            kwargs.update(pool_size=10, max_overflow=20)
        engine = create_async_engine(url, **kwargs)
        if url.get_backend_name() == "postgresql":
            _ping_when_idle(engine.sync_engine)
            event.listen(engine.sync_engine, "handle_error", _note_disconnect)
        # psycopg runs an executemany INSERT without RETURNING as one server
        # statement per row; batched into multi-row VALUES it is one per
        # thousand. (Inserts with ON CONFLICT batch only with RETURNING.)
        engine.sync_engine.dialect.use_insertmanyvalues_wo_returning = True
        if url.get_backend_name() == "sqlite":
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        pair[autocommit] = engine
    return engine


# A pooled connection idle longer than this is pinged before it is handed
# out; one used more recently is handed out as it is.
PING_IDLE_AFTER = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """``pool_pre_ping``, for connections that have sat in the pool a while.

    A ping before every checkout was a round trip per statement on the
    delivery path, half the cost of a short statement. A connection used a
    moment ago is alive or its server has just gone away; in the second case
    the statement fails, SQLAlchemy invalidates the whole pool, and the next
    checkout connects afresh, as after a failure in mid-statement.
    """

    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_connection: Any, record: Any) -> None:
        # Already set when ``autocommit`` kept it idle before handing it back.
        record.info.setdefault("idle_since", time.monotonic())

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.pop("idle_since", None)
        if since is None or time.monotonic() - since < PING_IDLE_AFTER:
            return  # just connected, or used a moment ago
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # The pool drops this connection and checks out another.
            raise DisconnectionError(f"pooled connection failed its ping: {exc}") from exc


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


def _as_text(type_: Any) -> bool:
    return isinstance(type_, Integer)


def array_bind(name: str | None, type_: Any, values: Sequence[Any] | None = None) -> Any:
    """A parameter holding an array of ``type_``: ``values``, or given at
    execute as ``array_value`` makes it.

    Integer arrays travel as one comma-separated string split on the server
    (``string_to_array``, an empty item is NULL): psycopg dumps a list
    element by element in Python, which cost a few percent of a worker's
    time, where ``str.join`` does it at C speed.
    """
    kwargs = {} if values is None else {"value": array_value(type_, values)}
    if _as_text(type_):
        joined = bindparam(name, type_=Text(), **kwargs)
        return cast(func.string_to_array(joined, ",", ""), postgresql.ARRAY(type_))
    return bindparam(name, type_=postgresql.ARRAY(type_), **kwargs)


def array_value(type_: Any, values: Sequence[Any]) -> Any:
    """``values`` as ``array_bind`` of ``type_`` takes them."""
    if _as_text(type_):
        # str() of an int never contains "None": the replace touches only nulls.
        return ",".join(map(str, values)).replace("None", "")
    return list(values)


def unnest(model: Any, name: str, columns: Sequence[str], *, ordinal: bool = False) -> Any:
    """PostgreSQL: ``unnest(:name_c1, :name_c2, ...) AS name(c1, c2, ...)``.

    Rows as column arrays: ``INSERT ... SELECT`` from it, or ``UPDATE ...
    FROM`` it, writes any number of rows with one parameter per column
    (``arrays`` makes them). The statement's text does not grow with the
    rows, so psycopg parses and prepares it once and PostgreSQL plans it
    once. Each array is cast to its column's type; what is the same for
    every row belongs in a plain parameter instead. With ``ordinal`` a
    column ``ordinal`` numbers the rows from 1.
    """
    table = model.__table__
    params = [array_bind(f"{name}_{column}", table.c[column].type) for column in columns]
    return (
        func.unnest(*params)
        .table_valued(*columns, with_ordinality="ordinal" if ordinal else None)
        .render_derived(name=name)
    )


def arrays(
    model: Any, name: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """The parameters of ``unnest(model, name, columns)`` for ``rows``."""
    table = model.__table__
    return {
        f"{name}_{column}": array_value(table.c[column].type, [row[column] for row in rows])
        for column in columns
    }


def insert_rows(
    model: Any, rows: Sequence[Mapping[str, Any]], *, returning: Sequence[str] = ()
) -> tuple[Any, dict[str, Any]]:
    """PostgreSQL: ``INSERT ... SELECT ... FROM unnest(...) ORDER BY ordinal``,
    and its parameters: run it as ``execute(*insert_rows(...))``.

    ``rows`` all have the same keys. Rows are inserted in their order, so a
    sequence numbers them in that order: sorted, the ids RETURNING gives are
    the rows' ids in order (what SQLAlchemy's ``sort_by_parameter_order``
    relies on for PostgreSQL). ``returning`` names the columns to return.
    """
    names = tuple(rows[0])
    return insert_rows_statement(model, names, tuple(returning)), arrays(model, "r", names, rows)


@cache
def insert_rows_statement(
    model: Any, names: tuple[str, ...], returning: tuple[str, ...] = ()
) -> Any:
    """The statement ``insert_rows`` runs, for a statement built around it."""
    # Built once per shape: building it again for every call cost more CPU
    # than the round trip of a one-message send.
    source = unnest(model, "r", names, ordinal=True)
    ordered = select(*(source.c[n] for n in names)).order_by(source.c.ordinal)
    statement = postgresql.insert(model).from_select(names, ordered)
    if returning:
        return statement.returning(*(model.__table__.c[n] for n in returning))
    return statement


async def existing_ids(s: AsyncSession, column: Any, ids: Iterable[int]) -> set[int]:
    """Which of ``ids`` are in ``column``, in one query on PostgreSQL
    (``one_of``) and in ``IN`` lists of a bounded size on SQLite."""
    # An id past 64 bits cannot be in the table; sent to the database it
    # fails the driver's conversion instead of being reported missing.
    wanted = [i for i in dict.fromkeys(ids) if i < 2**63]
    found: set[int] = set()
    step = len(wanted) if is_postgres() else 5000  # SQLite's bound-parameter limit
    for i in range(0, len(wanted), max(1, step)):
        found.update(await s.scalars(select(column).where(one_of(column, wanted[i : i + step]))))
    return found


def constant(model: Any, column: str, value: Any) -> Any:
    """``value`` as a parameter of ``column``'s type, labelled with its name."""
    return bindparam(None, value, type_=model.__table__.c[column].type).label(column)


# Autocommit connections kept between uses, per loop and engine, most
# recent last. A pool checkout and checkin (greenlet switches, events, the
# reset) cost more than the short statement run between them: 0.9 ms of a
# 3 ms statement in a process that had been idle 50 ms (S4's light load). A
# connection is kept only while nothing went wrong on it. Held by the loop,
# as its engines are, so a loop ended without dispose() takes them along.
_kept: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[AsyncEngine, list[AsyncConnection]]
] = weakref.WeakKeyDictionary()
KEEP = 4
# When a statement last found its server gone, per (sync) engine: the pool
# then replaces every connection it holds, and drops those kept before it too.
_gone_at: weakref.WeakKeyDictionary[Engine, float] = weakref.WeakKeyDictionary()


def _note_disconnect(context: Any) -> None:
    # A cancelled statement counts as a disconnect too, but it leaves the
    # server and the other connections as they were.
    if context.is_disconnect and context.invalidate_pool_on_disconnect:
        _gone_at[context.engine] = time.monotonic()


async def _take(engine: AsyncEngine) -> AsyncConnection:
    kept = _kept.get(asyncio.get_running_loop(), {}).get(engine)
    while kept:
        conn = kept.pop()
        kept_at = conn.info["idle_since"]
        fresh = time.monotonic() - kept_at < PING_IDLE_AFTER
        if fresh and kept_at > _gone_at.get(engine.sync_engine, 0.0):
            del conn.info["idle_since"]
            return conn
        # Idle too long, or kept from before the server went away: back to
        # the pool, which pings it (its idle_since stays as set here) or
        # replaces it at its next checkout.
        await conn.close()
    return await engine.connect()


async def _keep(engine: AsyncEngine, conn: AsyncConnection) -> None:
    loop = asyncio.get_running_loop()
    if _engines.get(loop, {}).get(True) is not engine:
        # Disposed while in use: its pool is gone, and a connection handed
        # back to it would stay open until the collector found it.
        await conn.invalidate()
        await conn.close()
        return
    kept = _kept.setdefault(loop, {}).setdefault(engine, [])
    if conn.closed or conn.invalidated or len(kept) >= KEEP:
        await conn.close()
        return
    conn.info["idle_since"] = time.monotonic()
    kept.append(conn)


async def _release_kept(loop: asyncio.AbstractEventLoop, engine: AsyncEngine) -> None:
    for conn in _kept.get(loop, {}).pop(engine, []):
        await conn.close()


@asynccontextmanager
async def autocommit() -> AsyncIterator[AsyncConnection]:
    """A Core connection whose every statement commits on its own: no BEGIN,
    COMMIT or ROLLBACK round trips, no ORM (the delivery engine's hot path)."""
    if _stale:
        await _dispose_stale(asyncio.get_running_loop())
    engine = get_engine(autocommit=True)
    conn = await _take(engine)
    try:
        yield conn
    except BaseException:
        # Whatever state the failure left it in, the pool sorts it out;
        # shielded, as SQLAlchemy's own exit is, so a cancel cannot leak it.
        await asyncio.shield(conn.close())
        raise
    await _keep(engine, conn)


@asynccontextmanager
async def session(*, autocommit: bool = False) -> AsyncIterator[AsyncSession]:
    """A session whose objects stay readable after commit.

    With ``autocommit`` every statement commits on its own and no BEGIN,
    COMMIT or ROLLBACK is sent: for the delivery engine's hot path, where
    each step is one statement that is atomic by itself.
    """
    if _stale:
        await _dispose_stale(asyncio.get_running_loop())
    async with AsyncSession(get_engine(autocommit=autocommit), expire_on_commit=False) as s:
        yield s


async def _dispose_stale(loop: asyncio.AbstractEventLoop) -> None:
    mine = [engine for owner, engine in _stale if owner is loop]
    _stale[:] = [(owner, engine) for owner, engine in _stale if owner is not loop]
    for engine in mine:
        await _release_kept(loop, engine)
        await engine.dispose()


async def dispose() -> None:
    """Close the running loop's pools (end of a CLI command, a test, a worker)."""
    loop = asyncio.get_running_loop()
    await _dispose_stale(loop)
    for engine in _engines.pop(loop, {}).values():
        await _release_kept(loop, engine)
        await engine.dispose()
