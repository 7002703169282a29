"""``channels db ...`` and ``channels dev ...``: the schema and the embedded servers.

``db upgrade`` is idempotent: run it on every deploy. ``dev`` reports and
stops the embedded PostgreSQL and Valkey that commands start on demand when
``CHANNELS_DATABASE_URL`` / ``CHANNELS_BROKER_URL`` are unset; it stops them
by the PIDs recorded under ``CHANNELS_HOME`` and touches nothing else.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import click

from channels_cli import output
from channels_core import embedded
from channels_core.db import sync_url
from channels_core.settings import get_settings

__all__ = ["db_group", "dev"]


@click.group("db")
def db_group() -> None:
    """Create or upgrade the database schema."""


@db_group.command("upgrade")
def upgrade() -> None:
    """Bring the schema to the newest revision; a no-op when it is already there."""
    from channels_core import migrate  # Alembic is slow to import; only these need it

    before = migrate.current_revision()
    after = migrate.upgrade()
    if before == after:
        output.success(f"Database already at revision {after}")
    else:
        output.success(f"Database upgraded to revision {after} (was: {before or 'empty'})")


@db_group.command("current")
def current() -> None:
    """Show the database, its schema revision and the newest one."""
    from channels_core import migrate

    rev, head = migrate.current_revision(), migrate.head_revision()
    state = "up to date" if rev == head else "run `channels db upgrade`"
    url = sync_url().render_as_string(hide_password=True)
    output.note(f"{url}: revision {rev or 'none'}, newest {head} ({state})")


@click.group()
def dev() -> None:
    """The embedded development servers (PostgreSQL, Valkey)."""


def _server_dict(server: embedded.EmbeddedServer) -> dict[str, Any]:
    return {**asdict(server), "running": server.running}


@dev.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def status(as_json: bool) -> None:
    """List the embedded servers of this CHANNELS_HOME, running or not."""
    servers = [_server_dict(s) for s in embedded.status()]
    if as_json:
        output.print_json(servers)
        return
    output.print_table(
        ["Name", "PID", "Port", "URL", "Running"],
        [(s["name"], s["pid"], s["port"], s["url"], s["running"]) for s in servers],
        empty=f"No embedded servers under {get_settings().home.resolve()}.",
    )


@dev.command("stop")
def stop() -> None:
    """Stop the embedded servers of this CHANNELS_HOME."""
    stopped = embedded.stop()
    if not stopped:
        output.note("No embedded servers were running.")
    for server in stopped:
        output.success(f"Stopped {server.name} (PID {server.pid})")
