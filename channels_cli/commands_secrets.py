"""``channels principal rotate-secret PRINCIPAL [--overlap SECONDS]``."""

from __future__ import annotations

import click

from channels_cli.output import note, success
from channels_cli.runtime import ID, run
from channels_core.secrets import rotate_secret
from channels_core.settings import get_settings

__all__ = ["rotate", "GROUP_COMMANDS"]


@click.command("rotate-secret")
@click.argument("principal_id", metavar="PRINCIPAL", type=ID)
@click.option(
    "--overlap",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds the old secret keeps signing beside the new one "
    "(default CHANNELS_SECRET_OVERLAP).",
)
def rotate(principal_id: int, overlap: float | None) -> None:
    """Give PRINCIPAL a new webhook secret; the old one signs too during the overlap."""
    secret = run(rotate_secret(principal_id, overlap=overlap))
    seconds = get_settings().secret_overlap if overlap is None else overlap
    success(f"New webhook secret for principal {principal_id}: {secret}")
    note(f"The previous secret keeps signing for {seconds:g} more seconds.")


GROUP_COMMANDS = {"principal": [rotate]}
