"""``channels endpoints``: health, switches and limits of webhook endpoints.

``channels endpoints`` lists every endpoint the engine has had reason to
remember (a breaker transition, a limit, a disable) with its live breaker
state; ``show`` adds its recorded transitions; ``enable`` / ``disable``
flip the switch; ``limit`` sets a rate per endpoint or per host.
"""

from __future__ import annotations

from dataclasses import asdict

import click

from channels_cli.output import note, print_fields, print_json, print_table, success
from channels_cli.runtime import run
from channels_core import endpoints
from channels_core.endpoints import EndpointView

__all__ = ["endpoints_group", "COMMANDS"]

_ENDPOINT = click.argument("endpoint", metavar="ENDPOINT")


def _state(view: EndpointView) -> str:
    if not view.enabled:
        return "disabled"
    if view.breaker == endpoints.OPEN and view.open_for is not None:
        return f"open ({view.open_for:.0f}s left)"
    return view.breaker


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:g}/s"


@click.group("endpoints", invoke_without_command=True)
@click.option("--disabled", is_flag=True, help="Only disabled endpoints.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def endpoints_group(ctx: click.Context, disabled: bool, as_json: bool) -> None:
    """Webhook endpoints: breaker state, switch and limits (ENDPOINT is an id or URL)."""
    if ctx.invoked_subcommand is not None:
        return
    views = run(endpoints.list_endpoints(disabled_only=disabled))
    if as_json:
        print_json([asdict(v) for v in views])
        return
    print_table(
        ["ID", "URL", "State", "Failures", "Rate limit", "Last event"],
        [
            (
                v.id,
                v.url,
                _state(v),
                v.failures,
                _rate(v.rate_limit),
                f"{v.last_event.event}: {v.last_event.reason}" if v.last_event else None,
            )
            for v in views
        ],
        empty="No endpoints recorded yet.",
    )
    hosts = run(endpoints.host_rate_limits())
    if hosts and not disabled:
        print_table(["Host", "Rate limit"], [(h, _rate(r)) for h, r in sorted(hosts.items())])


@endpoints_group.command("show")
@_ENDPOINT
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(endpoint: str, as_json: bool) -> None:
    """One endpoint with its recorded transitions, newest first."""
    view = run(endpoints.get_endpoint(endpoint))
    history = run(endpoints.events(endpoint))
    if as_json:
        print_json({**asdict(view), "events": [asdict(e) for e in history]})
        return
    print_fields(
        [
            ("ID", view.id),
            ("URL", view.url),
            ("State", _state(view)),
            ("Disabled because", view.disabled_reason),
            ("Failures", view.failures),
            ("Rate limit", _rate(view.rate_limit)),
        ]
    )
    print_table(
        ["At", "Event", "Reason"],
        [(e.at, e.event, e.reason) for e in history],
        empty="No transitions recorded.",
    )


@endpoints_group.command("enable")
@_ENDPOINT
def enable(endpoint: str) -> None:
    """Switch an endpoint back on (its dead letters stay dead: see ``channels retry``)."""
    view = run(endpoints.enable(endpoint))
    success(f"Endpoint {view.id} enabled: {view.url}")


@endpoints_group.command("disable")
@_ENDPOINT
@click.option("--reason", default="disabled by an operator", show_default=True)
def disable(endpoint: str, reason: str) -> None:
    """Switch an endpoint off: its deliveries become dead letters with the reason."""
    view = run(endpoints.disable(endpoint, reason))
    success(f"Endpoint {view.id} disabled: {view.url} ({view.disabled_reason})")


@endpoints_group.command("limit")
@click.argument("url", required=False)
@click.option("--host", help="Limit every endpoint on this host together instead.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="Deliveries a second.")
@click.option("--clear", is_flag=True, help="Remove the limit.")
def limit(url: str | None, host: str | None, rate: float | None, clear: bool) -> None:
    """Limit deliveries a second to URL, or to every endpoint on --host."""
    if (url is None) == (host is None):
        raise click.UsageError("give either a URL or --host")
    if (rate is None) == (not clear):
        raise click.UsageError("give either --rate or --clear")
    if host is not None:
        run(endpoints.set_host_rate_limit(host, rate))
        if rate is None:
            note(f"Host {host} has no rate limit now.")
        else:
            success(f"Host {host} limited to {rate:g} deliveries a second")
        return
    assert url is not None
    view = run(endpoints.set_rate_limit(url, rate))
    if rate is None:
        note(f"Endpoint {view.id} has no rate limit of its own now: {view.url}")
    else:
        success(f"Endpoint {view.id} limited to {_rate(view.rate_limit)}: {view.url}")


COMMANDS = [endpoints_group]
