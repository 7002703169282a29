"""``channels principal token | tokens | revoke-token`` and ``channels ingress --help``.

Commands run in-process through Click's runner against the per-test
database (SQLite, then PostgreSQL); ``channels ingress`` itself is started
as a real process by the other tests of this directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select

from channels_cli.main import cli
from channels_core import db, tokens
from channels_core.errors import AuthenticationError
from channels_core.models import TokenRow

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")


def channels(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _principal() -> str:
    created = channels("principal", "create", "--kind", "service", "--username", "api-client")
    assert created.exit_code == 0, created.output
    found = re.search(r"\(ID: (\d+)\)", created.stdout)
    assert found is not None
    return found.group(1)


async def _hashes() -> list[str]:
    async with db.session() as s:
        return list(await s.scalars(select(TokenRow.token_hash)))


async def test_token_is_printed_once_and_only_its_hash_is_stored(database: str) -> None:
    principal = await _in_thread(_principal)
    issued = await _in_thread(lambda: channels("principal", "token", principal))

    assert issued.exit_code == 0, issued.output
    token = issued.stdout.strip()
    # stdout is the token alone, so TOKEN=$(channels principal token 1) works.
    assert re.fullmatch(r"chn_[A-Za-z0-9_-]{40,}", token)
    assert "shown only now" in issued.stderr
    assert await _hashes() == [hashlib.sha256(token.encode()).hexdigest()]
    assert await tokens.authenticate(token) == int(principal)

    listed = await _in_thread(lambda: channels("principal", "tokens", principal, "--json"))
    [row] = json.loads(listed.stdout)
    assert row["prefix"] == token[:10] and row["revoked_at"] is None
    assert token not in listed.stdout
    table = await _in_thread(lambda: channels("principal", "tokens", principal))
    assert token[:10] in table.stdout and token not in table.stdout

    revoked = await _in_thread(lambda: channels("principal", "revoke-token", str(row["id"])))
    assert revoked.exit_code == 0 and f"Token {row['id']}" in revoked.stdout
    with pytest.raises(AuthenticationError):
        await tokens.authenticate(token)
    after = await _in_thread(lambda: channels("principal", "tokens", principal, "--json"))
    assert json.loads(after.stdout)[0]["revoked_at"] is not None


async def test_token_commands_refuse_what_does_not_exist(database: str) -> None:
    for args, message in [
        (("principal", "token", "4242"), "Error: principal 4242 not found"),
        (("principal", "tokens", "4242"), "Error: principal 4242 not found"),
        (("principal", "revoke-token", "4242"), "Error: token 4242 not found"),
        (("principal", "token", "zero"), "is not an id"),
    ]:
        result = await _in_thread(partial(CliRunner().invoke, cli, list(args)))
        assert result.exit_code != 0, result.output
        assert message in result.output
    assert await _hashes() == []


def test_ingress_command_is_there_with_its_options() -> None:
    result = CliRunner().invoke(cli, ["ingress", "--help"])
    assert result.exit_code == 0
    assert "--host" in result.output and "--port" in result.output
    bad = CliRunner().invoke(cli, ["ingress", "--port", "70000"])
    assert bad.exit_code == 2 and "70000" in bad.output


async def _in_thread(call: Callable[[], T]) -> T:
    """Each command runs its own event loop (asyncio.run); not inside this test's."""
    return await asyncio.to_thread(call)
