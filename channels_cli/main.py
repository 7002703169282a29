"""The ``channels`` command group and the one place errors become exit codes.

Exit status: 0 done; 1 refused, with exactly one ``Error: ...`` line on
stderr and nothing changed (a ``channels_core.errors.ChannelsError``, an
unusable database or invalid settings); 2 a usage error (Click's own).
A domain error never prints a traceback; anything else is a bug and does.

Commands live in ``commands_*.py`` modules and are added below. A command
that needs Celery or a server (``worker``, ``beat``, ``ingress``) imports
it inside its function: importing this module must stay free of
``workers`` and Celery so every other command starts fast and works
without a broker.
"""

from __future__ import annotations

from typing import Any

import click
import pydantic
from sqlalchemy.exc import DBAPIError

from channels_cli.commands_admin import db_group, dev
from channels_cli.commands_channel import channel
from channels_cli.commands_delivery import (
    beat,
    dead_letters_command,
    deliveries,
    replay_command,
    retry_command,
    send,
    worker,
)
from channels_cli.commands_principal import principal, role
from channels_core import __version__
from channels_core.errors import ChannelsError

__all__ = ["cli", "main", "ChannelsGroup", "error_message"]


def _one_line(text: str) -> str:
    return " ".join(text.split()) if "\n" in text or "\r" in text else text


def _database_message(exc: DBAPIError) -> str:
    detail = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
    lowered = detail.lower()
    if "no such table" in lowered or ("relation" in lowered and "does not exist" in lowered):
        return f"the database has no schema ({detail}); run `channels db upgrade` first"
    return f"database error: {detail}"


def _settings_message(exc: pydantic.ValidationError) -> str:
    problems = [
        f"CHANNELS_{'_'.join(str(part) for part in err['loc']).upper()}: {err['msg']}"
        for err in exc.errors()
    ]
    return "invalid settings: " + "; ".join(problems)


def error_message(exc: BaseException) -> str | None:
    """The one line to print for an error the CLI refuses on, or ``None`` for a bug."""
    if isinstance(exc, ChannelsError):
        return _one_line(str(exc) or type(exc).__name__)
    if isinstance(exc, DBAPIError):
        return _one_line(_database_message(exc))
    if isinstance(exc, pydantic.ValidationError):
        return _one_line(_settings_message(exc))
    return None


class ChannelsGroup(click.Group):
    """A group that turns refusals into ``Error: <one line>`` and exit status 1.

    Subcommands run inside the root group's ``invoke``, so catching here
    covers every command, nested or not, in one place.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ChannelsError, DBAPIError, pydantic.ValidationError) as exc:
            message = error_message(exc)
            assert message is not None
            raise click.ClickException(message) from exc


@click.group(cls=ChannelsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="channels")
def cli() -> None:
    """Queue-backed delivery: channels, subscribers, principals and roles.

    Settings come from CHANNELS_* environment variables; with
    CHANNELS_DATABASE_URL unset, a local PostgreSQL is started under
    ./.channels/ (stop it with `channels dev stop`).
    """


channel.add_command(send)
cli.add_command(channel)
cli.add_command(principal)
cli.add_command(role)
cli.add_command(db_group)
cli.add_command(dev)
for _command in (deliveries, dead_letters_command, retry_command, replay_command, worker, beat):
    cli.add_command(_command)


def _discover() -> None:
    """Add commands from every other ``channels_cli/commands_*.py`` module.

    Such a module lists ``COMMANDS`` (top-level commands) and may give
    ``GROUP_COMMANDS`` (``{"principal": [...]}``) to extend a group. A module
    must keep heavy imports (FastAPI, websockets, Flower) inside its
    functions, so ``channels --help`` stays fast.
    """
    import importlib
    import pkgutil

    import channels_cli

    for info in pkgutil.iter_modules(channels_cli.__path__):
        if not info.name.startswith("commands_"):
            continue
        module = importlib.import_module(f"channels_cli.{info.name}")
        for command in getattr(module, "COMMANDS", ()):
            cli.add_command(command)
        for group_name, commands in getattr(module, "GROUP_COMMANDS", {}).items():
            group = cli.commands[group_name]
            assert isinstance(group, click.Group)
            for command in commands:
                group.add_command(command)


_discover()


def main() -> None:
    """The console script's entry point."""
    cli(prog_name="channels")


if __name__ == "__main__":
    main()
