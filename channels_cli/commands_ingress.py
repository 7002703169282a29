"""``channels ingress`` and the API tokens it authenticates.

``channels ingress`` serves ``producer.ingress:create_app`` with uvicorn;
FastAPI and uvicorn are imported inside the command so every other command
starts without them. ``channels principal token | tokens | revoke-token``
issue, list and revoke bearer tokens: a token is printed once, when issued,
and only its hash is stored.
"""

from __future__ import annotations

import click

from channels_cli import output
from channels_cli.runtime import ID, run
from channels_core.registries import PrincipalRegistry
from channels_core.settings import get_settings
from channels_core.tokens import IssuedToken, TokenInfo, issue, revoke, tokens_of

__all__ = ["ingress", "token", "tokens", "revoke_token", "COMMANDS", "GROUP_COMMANDS"]


@click.command("ingress")
@click.option("--host", help="Interface to listen on [default: CHANNELS_INGRESS_HOST, 127.0.0.1].")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    help="Port to listen on [default: CHANNELS_INGRESS_PORT, 8000].",
)
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
)
def ingress(host: str | None, port: int | None, log_level: str) -> None:
    """Serve the HTTP API for submitting messages and reading deliveries."""
    import uvicorn

    settings = get_settings()
    uvicorn.run(
        "producer.ingress:create_app",
        factory=True,
        host=host if host is not None else settings.ingress_host,
        port=port if port is not None else settings.ingress_port,
        log_level=log_level,
        # The client's address is the peer's; X-Forwarded-* is trusted only
        # where a deployment puts a proxy in front and says so.
        proxy_headers=False,
        server_header=False,
    )


async def _issue(principal_id: int) -> IssuedToken:
    await PrincipalRegistry().require(principal_id)
    return await issue(principal_id)


@click.command("token")
@click.argument("principal_id", metavar="PRINCIPAL", type=ID)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead.")
def token(principal_id: int, as_json: bool) -> None:
    """Issue an API token for PRINCIPAL and print it, once.

    Only the token's hash is stored: copy it now. The token alone goes to
    stdout (the note to stderr), so TOKEN=$(channels principal token 5) works.
    """
    issued = run(_issue(principal_id))
    if as_json:
        output.print_json(
            {
                "id": issued.id,
                "principal_id": issued.principal_id,
                "prefix": issued.token[:10],
                "token": issued.token,
            }
        )
        return
    click.echo(
        f"Token {issued.id} issued for principal {principal_id}; it is shown only now.", err=True
    )
    click.echo(issued.token)


async def _tokens(principal_id: int) -> list[TokenInfo]:
    await PrincipalRegistry().require(principal_id)
    return await tokens_of(principal_id)


@click.command("tokens")
@click.argument("principal_id", metavar="PRINCIPAL", type=ID)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def tokens(principal_id: int, as_json: bool) -> None:
    """List PRINCIPAL's API tokens (their prefixes; tokens are never shown again)."""
    found = run(_tokens(principal_id))
    if as_json:
        output.print_json(
            [
                {
                    "id": t.id,
                    "principal_id": t.principal_id,
                    "prefix": t.prefix,
                    "created_at": t.created_at,
                    "revoked_at": t.revoked_at,
                    "last_used_at": t.last_used_at,
                }
                for t in found
            ]
        )
        return
    output.print_table(
        ["ID", "Prefix", "Created", "Revoked", "Last used"],
        [(t.id, t.prefix, t.created_at, t.revoked_at, t.last_used_at) for t in found],
        empty=f"Principal {principal_id} has no tokens.",
    )


@click.command("revoke-token")
@click.argument("token_id", metavar="TOKEN_ID", type=ID)
def revoke_token(token_id: int) -> None:
    """Revoke API token TOKEN_ID; requests with it are refused from now on."""
    info = run(revoke(token_id))
    assert info.revoked_at is not None
    output.success(
        f"Token {info.id} ({info.prefix}...) of principal {info.principal_id} "
        f"revoked at {info.revoked_at.isoformat(timespec='seconds')}"
    )


COMMANDS = [ingress]
GROUP_COMMANDS = {"principal": [token, tokens, revoke_token]}
