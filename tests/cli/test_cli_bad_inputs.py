"""Every bad input: the right exit status, one clear line, and nothing changed.

Each case runs against the same small world (built through the CLI), takes
a snapshot of every row of every table, runs the bad command, and compares.
Exit 1 is a refusal by the domain (one ``Error:`` line on stderr); exit 2 is
a usage error found by Click before anything is read or written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.cli.conftest import Cli, State


@pytest.fixture
def world(cli_db: str, run_cli: Cli) -> None:
    """Channel 1; role 1 'member' (submit, subscribe); principal 1 alice
    (member, subscribed to channel 1); principal 2 bob (no roles)."""
    run_cli.ok("channel", "create", "General")
    run_cli.ok(
        "role",
        "create",
        "member",
        "--permission",
        "channel.submit",
        "--permission",
        "channel.subscribe",
    )
    run_cli.ok(
        "principal",
        "create",
        "--username",
        "alice",
        "--email",
        "alice@example.com",
        "--role",
        "member",
    )
    run_cli.ok("principal", "create", "--username", "bob")
    run_cli.ok("channel", "subscribe", "1", "1")


# (args, exit status, what the one Error line says)
BAD_INPUTS: list[tuple[list[str], int, str]] = [
    # unknown ids
    (["channel", "subscribe", "99", "1"], 1, "channel 99 not found"),
    (["channel", "subscribe", "1", "99"], 1, "principal 99 not found"),
    (["channel", "unsubscribe", "99", "1"], 1, "channel 99 not found"),
    (["channel", "unsubscribe", "1", "99"], 1, "principal 99 not found"),
    (["channel", "list-subscribers", "99"], 1, "channel 99 not found"),
    (["principal", "show", "99"], 1, "principal 99 not found"),
    (["principal", "grant", "99", "member"], 1, "principal 99 not found"),
    (["principal", "grant", "2", "ghost"], 1, "role 'ghost' not found"),
    (["principal", "grant", "2", "42"], 1, "role 42 not found"),
    (
        ["principal", "create", "--username", "carol", "--role", "ghost"],
        1,
        "role 'ghost' not found",
    ),
    # duplicates and states that do not hold
    (["channel", "subscribe", "1", "1"], 1, "principal 1 is already subscribed to channel 1"),
    (["channel", "unsubscribe", "1", "2"], 1, "subscription of principal 2 to channel 1 not found"),
    (["principal", "create", "--username", "alice"], 1, "username 'alice' is taken by principal 1"),
    (
        ["role", "create", "member", "--permission", "channel.manage"],
        1,
        "role 'member' already exists (id 1)",
    ),
    (["principal", "revoke", "2", "member"], 1, "principal 2 does not have role 'member'"),
    # malformed values the domain refuses
    (
        ["principal", "create", "--email", "not-an-email"],
        1,
        "email 'not-an-email' is not an email address",
    ),
    (
        ["principal", "create", "--alias", "endpoint=ftp://x"],
        1,
        "endpoint 'ftp://x' must use http or https",
    ),
    (["principal", "create", "--alias", "endpoint=https://"], 1, "endpoint 'https://' has no host"),
    (["principal", "create", "--alias", "email=bob@"], 1, "email 'bob@' is not an email address"),
    (["principal", "create", "--alias", "queue=no spaces"], 1, "queue 'no spaces' must be"),
    (["principal", "create", "--alias", "Bad-Key=x"], 1, "alias key 'Bad-Key' must start"),
    (["principal", "create", "--kind", ""], 1, "kind must be a non-empty string"),
    (["channel", "create", ""], 1, "title must be a non-empty string"),
    (["channel", "create", "Two\nLines"], 1, "title must not contain CR, LF or NUL characters"),
    (["channel", "create", "Ops", "--egress", "smtp"], 1, "unknown egress transport 'smtp'"),
    (
        ["channel", "create", "Ops", "--egress", "htp"],
        1,
        "unknown egress transport 'htp' (did you mean 'http'?)",
    ),
    (
        ["channel", "create", "Ops", "--ingress", "carrier-pigeon"],
        1,
        "unknown ingress transport 'carrier-pigeon'",
    ),
    (["role", "create", "poster", "--permission", ""], 1, "permission must be a non-empty string"),
    # missing permissions when acting as a principal
    (
        ["channel", "subscribe", "1", "2", "--as", "2"],
        1,
        "principal 2 lacks permission 'channel.subscribe' on channel 1",
    ),
    (
        ["channel", "subscribe", "1", "2", "--as", "1"],
        1,
        "principal 1 lacks permission 'channel.manage' on channel 1",
    ),
    (
        ["channel", "unsubscribe", "1", "1", "--as", "2"],
        1,
        "principal 2 lacks permission 'channel.manage' on channel 1",
    ),
    (["channel", "subscribe", "1", "2", "--as", "99"], 1, "principal 99 not found"),
    # usage errors: found before anything is read
    (["channel", "subscribe", "one", "1"], 2, "'one' is not an id (a positive integer)"),
    (["channel", "subscribe", "1", "1.5"], 2, "'1.5' is not an id (a positive integer)"),
    (["channel", "subscribe", "0", "1"], 2, "'0' is not an id (a positive integer)"),
    (["channel", "subscribe", "1", "2", "--as", "me"], 2, "'me' is not an id"),
    (["channel", "list-subscribers", "99999999999999999999"], 2, "is not an id"),
    (["principal", "show", "abc"], 2, "'abc' is not an id"),
    (["principal", "create", "--alias", "endpoint"], 2, "'endpoint' is not KEY=VALUE"),
    (["principal", "create", "--alias", "=https://example.com"], 2, "is not KEY=VALUE"),
    (["channel", "subscribe", "1"], 2, "Missing argument 'SUBSCRIBER'"),
    (["channel", "create"], 2, "Missing argument 'TITLE'"),
    (["channel", "list", "--jsn"], 2, "No such option '--jsn'"),
    (["channel", "frobnicate"], 2, "No such command 'frobnicate'"),
]


@pytest.mark.parametrize(
    ("args", "exit_code", "message"),
    BAD_INPUTS,
    ids=[" ".join(args).replace("\n", "\\n") or "<empty>" for args, _, _ in BAD_INPUTS],
)
def test_bad_input_is_refused_and_changes_nothing(
    world: None,
    run_cli: Cli,
    db_state: Callable[[], State],
    args: list[str],
    exit_code: int,
    message: str,
) -> None:
    before = db_state()
    outcome = run_cli(*args)
    run_cli.refused(outcome, message, exit_code=exit_code)
    assert db_state() == before


def test_the_world_is_what_the_cases_assume(world: None, run_cli: Cli) -> None:
    shown = run_cli.json("principal", "show", "1", "--json")
    assert isinstance(shown, dict)
    assert shown["permissions"] == ["channel.submit", "channel.subscribe"]
    assert shown["subscriptions"] == [1]
    bob = run_cli.json("principal", "show", "2", "--json")
    assert isinstance(bob, dict)
    assert bob["roles"] == [] and bob["subscriptions"] == []


def test_a_refused_role_leaves_no_permission_behind(
    world: None, run_cli: Cli, db_state: Callable[[], State]
) -> None:
    """`role create` makes missing permissions; a refused one must not."""
    before = db_state()
    run_cli.refused(
        run_cli("role", "create", "member", "--permission", "channel.manage"),
        "role 'member' already exists",
    )
    assert db_state() == before
    assert "channel.manage" not in str(before["permissions"])
