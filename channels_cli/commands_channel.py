"""``channels channel ...``: create and list channels, manage their subscribers.

Every command validates through the Python API before it writes, so a
refused value (an unknown id, a duplicate, a missing permission) changes
nothing.
"""

from __future__ import annotations

from typing import Any

import click

from channels_cli import output
from channels_cli.runtime import ID, run
from channels_core.primitives import Channel, Principal
from channels_core.registries import ChannelRegistry, PrincipalRegistry

__all__ = ["channel", "channel_dict", "subscriber_dict"]


def channel_dict(c: Channel, subscribers: int) -> dict[str, Any]:
    return {
        "id": c.id,
        "title": c.title,
        "subscribers": subscribers,
        "ingress_transport": c.aliases.get("ingress_transport"),
        "egress_transport": c.aliases.get("egress_transport"),
        "aliases": dict(c.aliases),
        "created_at": c.created_at,
    }


def subscriber_dict(p: Principal) -> dict[str, Any]:
    return {
        "id": p.id,
        "kind": p.kind,
        "username": p.username,
        "email": p.email,
        "aliases": output.mask_secrets(p.aliases),
        "created_at": p.created_at,
    }


@click.group()
def channel() -> None:
    """Create channels and manage their subscribers."""


@channel.command("create")
@click.argument("title")
@click.option("--ingress", metavar="NAME", help="Preferred ingress transport, e.g. http.")
@click.option(
    "--egress", metavar="NAME", help="Preferred egress transport: http, email, queue, websocket."
)
def create(title: str, ingress: str | None, egress: str | None) -> None:
    """Create a channel titled TITLE."""
    new = Channel().set_title(title)
    if ingress is not None:
        new.set_alias("ingress_transport", ingress)
    if egress is not None:
        new.set_alias("egress_transport", egress)
    saved = run(new.save())
    output.success(f"Channel created: {saved.title} (ID: {saved.id})")


async def _channels_with_counts() -> list[tuple[Channel, int]]:
    return [(c, await c.count_subscribers()) for c in await ChannelRegistry().all()]


@channel.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def list_channels(as_json: bool) -> None:
    """List every channel with its subscriber count."""
    found = run(_channels_with_counts())
    if as_json:
        output.print_json([channel_dict(c, n) for c, n in found])
        return
    output.print_table(
        ["ID", "Title", "Subscribers", "Egress"],
        [(c.id, c.title, n, c.aliases.get("egress_transport")) for c, n in found],
        empty="No channels.",
    )


async def _subscribe(channel_id: int, subscriber_id: int, by: int | None) -> int | None:
    target = await ChannelRegistry().require(channel_id)
    subscription = await target.subscribe(subscriber_id, by=by)
    return subscription.id


@channel.command("subscribe")
@click.argument("channel_id", metavar="CHANNEL", type=ID)
@click.argument("subscriber_id", metavar="SUBSCRIBER", type=ID)
@click.option(
    "--as",
    "as_principal",
    type=ID,
    metavar="PRINCIPAL",
    help="Act as this principal: it needs channel.subscribe for itself, "
    "channel.manage for anyone else.",
)
def subscribe(channel_id: int, subscriber_id: int, as_principal: int | None) -> None:
    """Subscribe principal SUBSCRIBER to channel CHANNEL."""
    subscription_id = run(_subscribe(channel_id, subscriber_id, as_principal))
    output.success(
        f"Subscribed principal {subscriber_id} to channel {channel_id} "
        f"(subscription ID: {subscription_id})"
    )


async def _unsubscribe(channel_id: int, subscriber_id: int, by: int | None) -> None:
    target = await ChannelRegistry().require(channel_id)
    # Name the unknown principal rather than a missing subscription.
    await PrincipalRegistry().require(subscriber_id)
    await target.unsubscribe(subscriber_id, by=by)


@channel.command("unsubscribe")
@click.argument("channel_id", metavar="CHANNEL", type=ID)
@click.argument("subscriber_id", metavar="SUBSCRIBER", type=ID)
@click.option(
    "--as",
    "as_principal",
    type=ID,
    metavar="PRINCIPAL",
    help="Act as this principal: anyone may unsubscribe itself, "
    "channel.manage is needed for anyone else.",
)
def unsubscribe(channel_id: int, subscriber_id: int, as_principal: int | None) -> None:
    """Unsubscribe principal SUBSCRIBER from channel CHANNEL."""
    run(_unsubscribe(channel_id, subscriber_id, as_principal))
    output.success(f"Unsubscribed principal {subscriber_id} from channel {channel_id}")


async def _subscribers(channel_id: int) -> list[Principal]:
    target = await ChannelRegistry().require(channel_id)
    return list(await target.get_subscribers())


@channel.command("list-subscribers")
@click.argument("channel_id", metavar="CHANNEL", type=ID)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def list_subscribers(channel_id: int, as_json: bool) -> None:
    """List the subscribers of channel CHANNEL.

    In subscription order; webhook secrets are masked (see `principal show`).
    """
    found = run(_subscribers(channel_id))
    if as_json:
        output.print_json([subscriber_dict(p) for p in found])
        return
    output.print_table(
        ["ID", "Kind", "Username", "Email", "Endpoint", "Queue"],
        [
            (
                p.id,
                p.kind,
                p.username,
                p.email or p.aliases.get("email"),
                p.aliases.get("endpoint"),
                p.aliases.get("queue"),
            )
            for p in found
        ],
        empty=f"Channel {channel_id} has no subscribers.",
    )
