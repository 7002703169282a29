"""``channels gateway``: the WebSocket server holding subscribers' connections.

The server lives in ``workers.gateway`` and is imported inside the command,
so every other command starts without websockets (or Celery) loaded.
"""

from __future__ import annotations

import click

from channels_core.settings import get_settings

__all__ = ["gateway", "COMMANDS"]


@click.command("gateway")
@click.option("--host", help="Interface to listen on [default: CHANNELS_GATEWAY_HOST, 127.0.0.1].")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    help="Port to listen on; 0 picks a free one [default: CHANNELS_GATEWAY_PORT, 8765].",
)
def gateway(host: str | None, port: int | None) -> None:
    """Serve WebSocket connections and deliver to them until SIGTERM or SIGINT.

    Clients connect with ?token=TOKEN (or an Authorization: Bearer header) and
    may add ?last_delivery_id=N to get what they missed. Run any number of
    gateways, on any hosts, against the same database and broker.
    """
    from workers.gateway import run

    settings = get_settings()
    run(
        host if host is not None else settings.gateway_host,
        port if port is not None else settings.gateway_port,
    )


COMMANDS = [gateway]
