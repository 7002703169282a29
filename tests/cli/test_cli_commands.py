"""The ``channels`` commands, in-process, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from channels_core.primitives import Channel
from channels_core.registries import ChannelRegistry
from channels_core.settings import Settings, configure, get_settings

if TYPE_CHECKING:
    from tests.cli.conftest import Cli


def test_channel_create_prints_the_seed_line(cli_db: str, run_cli: Cli) -> None:
    out = run_cli.ok("channel", "create", "General Chat")
    assert out.lines == ["✓ Channel created: General Chat (ID: 1)"]
    assert out.stderr == ""


def test_channel_create_with_transports(cli_db: str, run_cli: Cli) -> None:
    run_cli.ok("channel", "create", "Support", "--ingress", "http", "--egress", "websocket")
    [listed] = run_cli.json("channel", "list", "--json")
    assert listed["ingress_transport"] == "http"
    assert listed["egress_transport"] == "websocket"


def test_channel_list_table_and_json(cli_db: str, run_cli: Cli) -> None:
    run_cli.ok("channel", "create", "General Chat")
    run_cli.ok("channel", "create", "Support", "--egress", "http")
    run_cli.ok("principal", "create", "--username", "alice")
    run_cli.ok("channel", "subscribe", "1", "1")

    rows = run_cli.rows(run_cli.ok("channel", "list").stdout)
    assert rows == [
        ["ID", "Title", "Subscribers", "Egress"],
        ["1", "General Chat", "1", "-"],
        ["2", "Support", "0", "http"],
    ]
    listed = run_cli.json("channel", "list", "--json")
    assert isinstance(listed, list)
    assert [(c["id"], c["title"], c["subscribers"]) for c in listed] == [
        (1, "General Chat", 1),
        (2, "Support", 0),
    ]


def test_empty_listings(cli_db: str, run_cli: Cli) -> None:
    assert run_cli.ok("channel", "list").lines == ["No channels."]
    assert run_cli.ok("principal", "list").lines == ["No principals."]
    assert run_cli.ok("role", "list").lines == ["No roles."]
    for command in (["channel", "list"], ["principal", "list"], ["role", "list"]):
        assert run_cli.json(*command, "--json") == []


def test_every_listing_prints_plain_json(cli_db: str, run_cli: Cli, tmp_path: Path) -> None:
    run_cli.ok("channel", "create", "General Chat")
    run_cli.ok("role", "create", "member", "--permission", "channel.submit")
    run_cli.ok(
        "principal",
        "create",
        "--username",
        "alice",
        "--role",
        "member",
        "--alias",
        "webhook_secret=whsec_dGVzdA==",
    )
    run_cli.ok("channel", "subscribe", "1", "1")
    for command in (
        ["channel", "list"],
        ["channel", "list-subscribers", "1"],
        ["principal", "list"],
        ["role", "list"],
        ["dev", "status"],
    ):
        out = run_cli.ok(*command, "--json")
        data = json.loads(out.stdout)
        assert isinstance(data, list), command
        assert data or command[0] == "dev", command
        assert all(isinstance(item, dict) for item in data), command
        assert "\x1b[" not in out.stdout  # no terminal styling
        assert "whsec_dGVzdA==" not in out.stdout  # listings mask secrets
    shown = run_cli.json("principal", "show", "1", "--json")
    assert isinstance(shown, dict)
    assert shown["aliases"]["webhook_secret"] == "whsec_dGVzdA=="


def test_subscribe_list_and_unsubscribe(cli_db: str, run_cli: Cli) -> None:
    run_cli.ok("channel", "create", "General Chat")
    run_cli.ok(
        "principal",
        "create",
        "--username",
        "alice",
        "--email",
        "alice@example.com",
        "--alias",
        "endpoint=https://example.com/hooks/alice",
    )
    run_cli.ok("principal", "create", "--kind", "bot", "--alias", "queue=bots.inbox")

    assert run_cli.ok("channel", "subscribe", "1", "1").lines == [
        "✓ Subscribed principal 1 to channel 1 (subscription ID: 1)"
    ]
    run_cli.ok("channel", "subscribe", "1", "2")

    rows = run_cli.rows(run_cli.ok("channel", "list-subscribers", "1").stdout)
    assert rows[0] == ["ID", "Kind", "Username", "Email", "Endpoint", "Queue"]
    assert rows[1] == [
        "1",
        "user",
        "alice",
        "alice@example.com",
        "https://example.com/hooks/alice",
        "-",
    ]
    assert rows[2] == ["2", "bot", "-", "-", "-", "bots.inbox"]

    subscribers = run_cli.json("channel", "list-subscribers", "1", "--json")
    assert isinstance(subscribers, list)
    assert [s["id"] for s in subscribers] == [1, 2]
    assert subscribers[0]["aliases"] == {"endpoint": "https://example.com/hooks/alice"}

    assert run_cli.ok("channel", "unsubscribe", "1", "1").lines == [
        "✓ Unsubscribed principal 1 from channel 1"
    ]
    assert [s["id"] for s in run_cli.json("channel", "list-subscribers", "1", "--json")] == [2]
    run_cli.ok("channel", "unsubscribe", "1", "2")
    assert run_cli.ok("channel", "list-subscribers", "1").lines == ["Channel 1 has no subscribers."]


def test_subscribe_as_a_principal_is_checked(cli_db: str, run_cli: Cli) -> None:
    run_cli.ok("channel", "create", "General")
    run_cli.ok("role", "create", "member", "--permission", "channel.subscribe")
    run_cli.ok("role", "create", "admin", "--permission", "channel.manage")
    run_cli.ok("principal", "create", "--username", "alice", "--role", "member")
    run_cli.ok("principal", "create", "--username", "root", "--role", "admin")
    run_cli.ok("principal", "create", "--username", "bob")

    # channel.subscribe lets alice subscribe herself; channel.manage lets root subscribe bob.
    run_cli.ok("channel", "subscribe", "1", "1", "--as", "1")
    run_cli.ok("channel", "subscribe", "1", "3", "--as", "2")
    # Anyone may unsubscribe itself; root may unsubscribe others.
    run_cli.ok("channel", "unsubscribe", "1", "3", "--as", "3")
    run_cli.ok("channel", "unsubscribe", "1", "1", "--as", "2")
    assert run_cli.json("channel", "list-subscribers", "1", "--json") == []


def test_principal_create_list_and_show(cli_db: str, run_cli: Cli) -> None:
    run_cli.ok(
        "role",
        "create",
        "member",
        "--permission",
        "channel.submit",
        "--permission",
        "channel.subscribe",
    )
    out = run_cli.ok(
        "principal",
        "create",
        "--kind",
        "user",
        "--username",
        "alice",
        "--email",
        "alice@example.com",
        "--alias",
        "endpoint=https://example.com/a?x=1",
        "--alias",
        "webhook_secret=whsec_c2VjcmV0",
        "--role",
        "member",
    )
    assert out.lines == ["✓ Principal created: alice (ID: 1)"]
    run_cli.ok("principal", "create", "--kind", "bot", "--alias", "name=Notifier")
    run_cli.ok("channel", "create", "General")
    run_cli.ok("channel", "subscribe", "1", "1")

    listed = run_cli.json("principal", "list", "--json")
    assert isinstance(listed, list)
    alice, bot = listed
    assert alice["username"] == "alice" and alice["kind"] == "user"
    assert alice["roles"] == [{"id": 1, "title": "member"}]
    # Listings never show a secret; `principal show` does.
    assert alice["aliases"]["webhook_secret"] == "********"
    assert alice["aliases"]["endpoint"] == "https://example.com/a?x=1"
    assert bot["kind"] == "bot" and bot["username"] is None

    table = run_cli.rows(run_cli.ok("principal", "list").stdout)
    assert table[0] == ["ID", "Kind", "Username", "Email", "Roles", "Endpoint"]
    assert table[1] == [
        "1",
        "user",
        "alice",
        "alice@example.com",
        "member",
        "https://example.com/a?x=1",
    ]

    shown = run_cli.json("principal", "show", "1", "--json")
    assert isinstance(shown, dict)
    assert shown["aliases"] == {
        "endpoint": "https://example.com/a?x=1",
        "webhook_secret": "whsec_c2VjcmV0",
    }
    assert shown["roles"] == [{"id": 1, "title": "member"}]
    assert shown["permissions"] == ["channel.submit", "channel.subscribe"]
    assert shown["subscriptions"] == [1]
    assert shown["created_at"].endswith("+00:00")

    text = run_cli.ok("principal", "show", "1").stdout
    assert "whsec_c2VjcmV0" in text
    assert "member (1)" in text
    assert "channel.submit, channel.subscribe" in text


def test_principal_label_falls_back_to_a_name(cli_db: str, run_cli: Cli) -> None:
    assert run_cli.ok(
        "principal", "create", "--kind", "bot", "--alias", "name=Notification Bot"
    ).lines == ["✓ Principal created: Notification Bot (ID: 1)"]
    assert run_cli.ok("principal", "create", "--kind", "service").lines == [
        "✓ Principal created: service (ID: 2)"
    ]


def test_roles_and_grants(cli_db: str, run_cli: Cli) -> None:
    out = run_cli.ok(
        "role",
        "create",
        "member",
        "--permission",
        "channel.submit",
        "--permission",
        "channel.subscribe",
        "--permission",
        "channel.submit",
    )
    assert out.lines == ["✓ Role created: member (ID: 1) with channel.submit, channel.subscribe"]
    # An existing permission row is reused, not duplicated.
    run_cli.ok("role", "create", "poster", "--permission", "channel.submit")
    assert run_cli.json("role", "list", "--json") == [
        {"id": 1, "title": "member", "permissions": ["channel.submit", "channel.subscribe"]},
        {"id": 2, "title": "poster", "permissions": ["channel.submit"]},
    ]
    assert run_cli.rows(run_cli.ok("role", "list").stdout)[1] == [
        "1",
        "member",
        "channel.submit, channel.subscribe",
    ]

    run_cli.ok("principal", "create", "--username", "bob")
    assert run_cli.ok("principal", "grant", "1", "member").lines == [
        "✓ Granted role member (ID: 1) to principal 1"
    ]
    assert run_cli.ok("principal", "grant", "1", "2").lines == [
        "✓ Granted role poster (ID: 2) to principal 1"
    ]
    # Granting again is a no-op, not an error.
    assert run_cli.ok("principal", "grant", "1", "member").lines == [
        "Principal 1 already has role member (ID: 1)"
    ]
    shown = run_cli.json("principal", "show", "1", "--json")
    assert isinstance(shown, dict)
    assert [r["title"] for r in shown["roles"]] == ["member", "poster"]

    assert run_cli.ok("principal", "revoke", "1", "poster").lines == [
        "✓ Revoked role poster (ID: 2) from principal 1"
    ]
    shown = run_cli.json("principal", "show", "1", "--json")
    assert isinstance(shown, dict)
    assert [r["title"] for r in shown["roles"]] == ["member"]


def test_role_with_an_unknown_permission_title_warns(cli_db: str, run_cli: Cli) -> None:
    out = run_cli.ok("role", "create", "typo", "--permission", "channel.sumbit")
    assert out.lines == ["✓ Role created: typo (ID: 1) with channel.sumbit"]
    assert out.stderr_lines == [
        "Warning: 'channel.sumbit' is not a built-in permission; did you mean 'channel.submit'?"
    ]


def test_titles_print_as_written(cli_db: str, run_cli: Cli) -> None:
    """Rich markup in user data is data, not markup."""
    out = run_cli.ok("channel", "create", "[bold]Ops[/bold] :smile:")
    assert out.lines == ["✓ Channel created: [bold]Ops[/bold] :smile: (ID: 1)"]
    [listed] = run_cli.json("channel", "list", "--json")
    assert listed["title"] == "[bold]Ops[/bold] :smile:"


def test_long_confirmation_stays_on_one_line(cli_db: str, run_cli: Cli) -> None:
    title = "A channel title long enough to wrap an eighty column terminal " * 3
    out = run_cli.ok("channel", "create", title.strip())
    assert len(out.lines) == 1


def test_the_cli_sees_what_the_python_api_wrote(cli_db: str, run_cli: Cli) -> None:
    import asyncio

    async def write() -> None:
        from channels_core import db

        await Channel("From Python").save()
        await db.dispose()

    asyncio.run(write())
    run_cli.ok("channel", "create", "From CLI")

    async def read() -> list[str]:
        from channels_core import db

        titles = [c.title for c in await ChannelRegistry().all()]
        await db.dispose()
        return titles

    assert asyncio.run(read()) == ["From Python", "From CLI"]


# -- db -----------------------------------------------------------------------


@pytest.fixture
def fresh_sqlite(tmp_path: Path) -> Iterator[str]:
    previous: Settings = get_settings()
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    configure(database_url=url)
    yield url
    configure(previous)


def test_db_upgrade_is_idempotent(fresh_sqlite: str, run_cli: Cli) -> None:
    from channels_core.migrate import head_revision

    head = head_revision()
    assert run_cli.ok("db", "upgrade").lines == [
        f"✓ Database upgraded to revision {head} (was: empty)"
    ]
    assert run_cli.ok("db", "upgrade").lines == [f"✓ Database already at revision {head}"]
    assert run_cli.ok("db", "current").lines == [
        f"{fresh_sqlite}: revision {head}, newest {head} (up to date)"
    ]
    run_cli.ok("channel", "create", "General Chat")


def test_db_upgrade_on_a_migrated_database_is_a_no_op(cli_db: str, run_cli: Cli) -> None:
    run_cli.ok("channel", "create", "Kept")
    assert run_cli.ok("db", "upgrade").lines[0].startswith("✓ Database already at revision ")
    assert [c["title"] for c in run_cli.json("channel", "list", "--json")] == ["Kept"]


def test_a_database_without_schema_is_one_clear_line(fresh_sqlite: str, run_cli: Cli) -> None:
    run_cli.refused(
        run_cli("channel", "list"),
        "the database has no schema (no such table: channels); run `channels db upgrade` first",
    )


# -- dev ----------------------------------------------------------------------


@pytest.fixture
def dev_home(tmp_path: Path) -> Iterator[Path]:
    """A CHANNELS_HOME of this test's own, so `dev stop` cannot reach the
    servers the test session runs."""
    previous = get_settings()
    home = tmp_path / "home"
    configure(home=home)
    assert get_settings().home == home
    yield home
    configure(previous)


def test_dev_status_and_stop_with_nothing_running(dev_home: Path, run_cli: Cli) -> None:
    assert run_cli.ok("dev", "status").lines == [f"No embedded servers under {dev_home}."]
    assert run_cli.json("dev", "status", "--json") == []
    assert run_cli.ok("dev", "stop").lines == ["No embedded servers were running."]


def test_dev_status_and_stop_a_recorded_server(dev_home: Path, run_cli: Cli) -> None:
    # A stand-in server this test starts and owns, recorded as the embedded one.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dev_home.mkdir(parents=True, exist_ok=True)
        record = {
            "name": "valkey",
            "pid": proc.pid,
            "port": 6399,
            "url": "redis://127.0.0.1:6399/0",
            "data_dir": str(dev_home / "valkey"),
        }
        (dev_home / "state.json").write_text(json.dumps({"valkey": record}))

        assert run_cli.json("dev", "status", "--json") == [{**record, "running": True}]
        rows = run_cli.rows(run_cli.ok("dev", "status").stdout)
        assert rows == [
            ["Name", "PID", "Port", "URL", "Running"],
            ["valkey", str(proc.pid), "6399", "redis://127.0.0.1:6399/0", "yes"],
        ]

        assert run_cli.ok("dev", "stop").lines == [f"✓ Stopped valkey (PID {proc.pid})"]
        assert proc.wait(timeout=10) != 0  # ended by the signal
        after = run_cli.json("dev", "status", "--json")
        assert isinstance(after, list)
        assert not any(server["running"] for server in after)
        assert run_cli.ok("dev", "stop").lines == ["No embedded servers were running."]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


# -- the package's shape ---------------------------------------------------------


def test_importing_the_cli_loads_no_celery_or_workers() -> None:
    code = (
        "import sys, channels_cli.main; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('celery', 'workers')); "
        "print(bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


def test_help_lists_the_command_groups(run_cli: Cli) -> None:
    out = run_cli.ok("--help").stdout
    for group in ("channel", "principal", "role", "db", "dev"):
        assert f"  {group} " in out
