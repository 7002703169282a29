"""What every command shares: running the async API, and argument types.

``run(coro)`` is the only place the CLI starts an event loop. Each command
gets a fresh loop (``asyncio.run``), and the database engine of that loop is
disposed before the loop closes, so no connection outlives the command.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import click

from channels_core import db

__all__ = ["run", "ID", "IdType", "KeyValue", "KEY_VALUE"]

T = TypeVar("T")

_MAX_ID = 2**63 - 1


class IdType(click.ParamType):
    """A row id: a positive integer that fits the BIGINT (and SQLite INTEGER)
    it is stored in. Anything else is a usage error before the database is
    touched."""

    name = "id"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = int(str(value).strip(), 10)
            except ValueError:
                self.fail(f"{value!r} is not an id (a positive integer)", param, ctx)
        if not 1 <= number <= _MAX_ID:
            self.fail(f"{value!r} is not an id (a positive integer)", param, ctx)
        return number


ID = IdType()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one command's coroutine on a fresh event loop and close its pool."""

    async def _main() -> T:
        try:
            return await coro
        finally:
            await db.dispose()

    return asyncio.run(_main())


class KeyValue(click.ParamType):
    """``KEY=VALUE``, split at the first ``=``; the value may be empty or hold ``=``.

    Only the shape is checked here; whether the key and value are acceptable
    is the domain's call (``check_alias``), so the rules live in one place.
    """

    name = "KEY=VALUE"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, str]:
        if isinstance(value, tuple):
            return value  # already converted (a default)
        key, sep, rest = str(value).partition("=")
        if not sep or not key:
            self.fail(f"{value!r} is not KEY=VALUE", param, ctx)
        return key, rest


KEY_VALUE = KeyValue()
