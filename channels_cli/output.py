"""How commands print: Rich for people, plain JSON for programs.

Tables and confirmations go through Rich with markup and highlighting off,
so a channel titled ``[bold]`` prints as written, and soft wrapping on, so
a confirmation is one line however long. ``--json`` output is a plain
``json.dumps`` on stdout with no Rich involved: a list of objects for every
listing, one object for ``show``. Secrets (``webhook_secret``) are masked
in listings and shown only by ``principal show``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

__all__ = [
    "console",
    "success",
    "note",
    "warn",
    "print_json",
    "print_table",
    "print_fields",
    "mask_secrets",
    "SECRET_ALIASES",
]

# Aliases whose values are credentials.
SECRET_ALIASES = frozenset({"webhook_secret"})
_MASK = "********"
_UNBOUNDED = 100_000


def console() -> Console:
    # Made per call: the console binds to sys.stdout as it is now, which is
    # what CliRunner (and anyone redirecting stdout) expects.
    return Console(markup=False, highlight=False, soft_wrap=True, emoji=False)


def _check_mark(con: Console) -> str:
    try:
        "✓".encode(con.encoding)
    except (UnicodeEncodeError, LookupError):
        return "+"
    return "✓"


def success(message: str) -> None:
    """``✓ Channel created: General Chat (ID: 1)``."""
    con = console()
    con.print(Text.assemble((_check_mark(con), "green"), " ", message))


def note(message: str) -> None:
    """A neutral line on stdout: an empty listing, a no-op."""
    console().print(Text(message, style="dim"))


def warn(message: str) -> None:
    """A warning on stderr; the command still succeeds."""
    click.echo(f"Warning: {message}", err=True)


def _aware(value: datetime) -> datetime:
    # Rows are written in UTC; SQLite hands them back without the zone.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return _aware(value).isoformat()
    return str(value)


def print_json(data: Any) -> None:
    """Plain JSON on stdout, no Rich markup, datetimes as ISO 8601."""
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=_jsonable))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return _aware(value).isoformat(timespec="seconds")
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) if value else "-"
    return str(value)


def _print_renderable(renderable: Any) -> None:
    con = console()
    if con.is_terminal:
        con.print(renderable)
        return
    # Piped or captured: one row per line however wide (Rich would wrap at
    # 80 columns), without the padding Rich leaves after the last column, so
    # lines grep and compare cleanly.
    natural = Measurement.get(con, con.options.update_width(_UNBOUNDED), renderable).maximum
    if natural > con.width:
        con = Console(markup=False, highlight=False, soft_wrap=True, emoji=False, width=natural)
    with con.capture() as captured:
        con.print(renderable)
    lines = captured.get().splitlines()
    con.file.write("".join(line.rstrip() + "\n" for line in lines))
    con.file.flush()


def print_table(
    columns: Sequence[str], rows: Sequence[Sequence[Any]], *, empty: str = "Nothing to list."
) -> None:
    """A borderless table, as the seed's ``ID  Title  Subscribers``."""
    if not rows:
        note(empty)
        return
    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    for name in columns:
        # fold, not ellipsis: a listing must never hide part of a value.
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    _print_renderable(table)


def print_fields(fields: Sequence[tuple[str, Any]]) -> None:
    """A two-column key/value listing for ``show`` commands."""
    table = Table(box=None, pad_edge=False, show_header=False, show_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in fields:
        if isinstance(value, Mapping):
            text = "\n".join(f"{k} = {v}" for k, v in value.items()) if value else "-"
        else:
            text = _cell(value)
        table.add_row(key, text)
    _print_renderable(table)


def mask_secrets(aliases: Mapping[str, str]) -> dict[str, str]:
    return {k: (_MASK if k in SECRET_ALIASES else v) for k, v in aliases.items()}
