"""Fixtures for the CLI suite: an empty database per test, reached synchronously.

The CLI runs ``asyncio.run`` per command, so its tests are plain sync
functions; ``cli_db`` does what the async ``database`` fixture does (the same
parametrized SQLite / embedded PostgreSQL URLs) with the sync engine.
``db_state`` snapshots every row of every table so a refused command can be
shown to have changed nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import inspect, text

from channels_cli.main import cli
from channels_core import db
from channels_core.dispatch import MemoryDispatcher, set_dispatcher
from channels_core.models import Base
from channels_core.settings import configure

State = dict[str, list[str]]


def _tables_in_database() -> list[str]:
    """Tables that exist, children before parents (as far as the models know)."""
    with db.get_sync_engine().connect() as conn:
        present = set(inspect(conn).get_table_names()) - {"alembic_version"}
    known = [t.name for t in reversed(Base.metadata.sorted_tables) if t.name in present]
    return sorted(present - set(known)) + known


def _truncate_sync() -> None:
    tables = _tables_in_database()
    with db.get_sync_engine().begin() as conn:
        if db.is_postgres():
            conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
            return
        for name in tables:
            conn.execute(text(f"DELETE FROM {name}"))
        has_sequence = conn.execute(
            text("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'")
        ).first()
        if has_sequence:
            conn.execute(text("DELETE FROM sqlite_sequence"))


def snapshot() -> State:
    """Every row of every table, as sorted reprs: equal snapshots, equal data."""
    state: State = {}
    with db.get_sync_engine().connect() as conn:
        for name in _tables_in_database():
            rows = conn.execute(text(f"SELECT * FROM {name}")).all()
            state[name] = sorted(repr(tuple(row)) for row in rows)
    return state


@pytest.fixture
def cli_db(database_url: str) -> Iterator[str]:
    """An empty, migrated database for one CLI test (SQLite, then PostgreSQL)."""
    configure(database_url=database_url, egress_allow_cidrs="127.0.0.0/8")
    _truncate_sync()
    set_dispatcher(MemoryDispatcher())
    yield database_url
    set_dispatcher(None)


@pytest.fixture
def db_state(cli_db: str) -> Callable[[], State]:
    return snapshot


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()


class Cli:
    """Runs ``channels`` in-process and states what an outcome must look like."""

    def __init__(self) -> None:
        self._runner = CliRunner()

    def __call__(self, *args: str) -> Outcome:
        result = self._runner.invoke(cli, list(args), prog_name="channels")
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception  # a crash is a bug: show its traceback
        return Outcome(result.exit_code, result.stdout, result.stderr)

    def ok(self, *args: str) -> Outcome:
        outcome = self(*args)
        assert outcome.exit_code == 0, (args, outcome.stdout, outcome.stderr)
        return outcome

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args).stdout)

    @staticmethod
    def refused(outcome: Outcome, message: str, *, exit_code: int = 1) -> None:
        """Exit ``exit_code``, nothing on stdout, and on stderr exactly one line
        ``Error: <message>...`` (exit 1), or Click's usage text with exactly one
        ``Error:`` line holding ``message`` (exit 2). Never a traceback."""
        assert outcome.exit_code == exit_code, (outcome.exit_code, outcome.stdout, outcome.stderr)
        assert outcome.stdout == ""
        assert "Traceback" not in outcome.stderr
        if exit_code == 1:
            assert len(outcome.stderr_lines) == 1, outcome.stderr
            assert outcome.stderr_lines[0].startswith(f"Error: {message}"), outcome.stderr
        else:
            errors = [line for line in outcome.stderr_lines if line.startswith("Error:")]
            assert len(errors) == 1 and message in errors[0], outcome.stderr

    @staticmethod
    def rows(stdout: str) -> list[list[str]]:
        """A printed table as cells: columns are separated by two or more spaces."""
        return [re.split(r"\s{2,}", line.strip()) for line in stdout.splitlines() if line.strip()]


@pytest.fixture
def run_cli() -> Cli:
    return Cli()
