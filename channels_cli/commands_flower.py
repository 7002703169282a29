"""``channels flower [--port N] [--address A] [--no-auth]``: Celery's dashboard.

Replaces this process with ``celery -A workers flower`` on the configured
broker, so the PID a supervisor (or a test) holds is Flower's own.

Flower can revoke tasks and shut workers down, so it starts with HTTP basic
auth (``CHANNELS_FLOWER_BASIC_AUTH=user:password``) or not at all: without
credentials it refuses unless ``--no-auth`` says so explicitly, and then
only on a loopback address. The credentials reach Flower through its
environment (``FLOWER_BASIC_AUTH``), never its command line, where ``ps``
would show them to every user of the host.
"""

from __future__ import annotations

import ipaddress
import os
import sys

import click

from channels_cli.output import warn
from channels_core import embedded
from channels_core.errors import ConfigurationError
from channels_core.settings import get_settings

__all__ = ["flower", "flower_argv", "check_credentials", "TASKS_COLUMNS", "COMMANDS"]

# Flower's Tasks page hides arguments by default; ours are the message id,
# the channel id and the batch's delivery ids, which is what an operator
# looks for. FLOWER_TASKS_COLUMNS in the environment still wins.
TASKS_COLUMNS = "name,uuid,state,args,received,runtime,worker"


def check_credentials(value: str) -> str:
    """``user:password`` as Flower compares it; refuse what it would misread."""
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ConfigurationError("CHANNELS_FLOWER_BASIC_AUTH must be user:password, both non-empty")
    if "," in value:
        # Flower splits FLOWER_BASIC_AUTH on commas into several credentials.
        raise ConfigurationError("CHANNELS_FLOWER_BASIC_AUTH must not contain a comma")
    return value


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def flower_argv(port: int, address: str) -> list[str]:
    """The command ``channels flower`` becomes."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers",
        "flower",
        f"--address={address}",
        f"--port={port}",
    ]


@click.command("flower")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Port to listen on (default CHANNELS_FLOWER_PORT, 5555).",
)
@click.option(
    "--address",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; in a container, 0.0.0.0 with the port published to loopback.",
)
@click.option(
    "--no-auth",
    is_flag=True,
    help="Start without authentication (loopback addresses only).",
)
def flower(port: int | None, address: str, no_auth: bool) -> None:
    """Run Flower, Celery's dashboard, on the channels broker (basic auth required)."""
    settings = get_settings()
    env = dict(os.environ)
    env.pop("FLOWER_BASIC_AUTH", None)  # only what this command decides reaches Flower
    if no_auth:
        if not _is_loopback(address):
            raise ConfigurationError(
                f"--no-auth listens on loopback only, not {address}: "
                "set CHANNELS_FLOWER_BASIC_AUTH=user:password instead"
            )
        warn("starting Flower without authentication (--no-auth)")
    elif not settings.flower_basic_auth:
        raise ConfigurationError(
            "Flower needs credentials: set CHANNELS_FLOWER_BASIC_AUTH=user:password, "
            "or pass --no-auth to start it without authentication"
        )
    else:
        env["FLOWER_BASIC_AUTH"] = check_credentials(settings.flower_basic_auth)
    env.setdefault("FLOWER_TASKS_COLUMNS", TASKS_COLUMNS)
    # Resolved here, so Flower watches the broker this command sees (the
    # embedded one included) and does not start another.
    env["CHANNELS_BROKER_URL"] = embedded.broker_url()
    argv = flower_argv(port or settings.flower_port, address)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)


COMMANDS = [flower]
